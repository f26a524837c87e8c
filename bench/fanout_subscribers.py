"""Many WebSocket subscribers in one process, for the ``fanout`` scenario.

``python bench/fanout_subscribers.py URL N OUT``: opens N trio-websocket
connections to URL, sends ``{"type": "subscribe"}`` on each and waits for each
one's first ``spend`` (the current state); then prints one line,
``subscribed N to URL``, and records every ``spend`` push: its ``seq`` and
``time.time()`` as soon as trio-websocket hands the message over. When a line
``stop`` (or EOF) arrives on standard input it writes OUT and prints
``done PUSHES``, then exits without closing the connections one by one.

OUT holds, per connection in connection order: the number of pushes as an
int64, then that many int64 seqs, then that many float64 times (native byte
order: the bench reads it on the same machine).
Imports nothing from ``bench`` (it runs by path, as its own process).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from array import array
from typing import BinaryIO

import msgspec
import trio
from trio_websocket import WebSocketConnection, connect_websocket_url

# Connections being opened at once: enough to open 1,000 in a few seconds,
# few enough that the service's accept loop and handshake timeout are not
# stressed by the set-up itself.
CONNECT_AT_ONCE = 50


class _Push(msgspec.Struct):
    type: str
    seq: int = -1


_decode = msgspec.json.Decoder(_Push).decode


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Subscriber:
    __slots__ = ("seqs", "times", "ws")

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.seqs = array("q")
        self.times = array("d")

    async def run(self) -> None:
        ws, seqs, times, now, decode = self.ws, self.seqs, self.times, time.time, _decode
        while True:
            frame = await ws.get_message()
            at = now()
            push = decode(frame)
            if push.type == "spend":
                seqs.append(push.seq)
                times.append(at)


async def main(url: str, count: int, out: str) -> None:
    subscribers: list[Subscriber | None] = [None] * count
    subscribed = 0
    all_subscribed = trio.Event()
    limiter = trio.CapacityLimiter(CONNECT_AT_ONCE)

    async def connect(nursery: trio.Nursery, index: int) -> None:
        nonlocal subscribed
        async with limiter:
            ws = await connect_websocket_url(nursery, url)
            await ws.send_message('{"type":"subscribe"}')
            subscriber = Subscriber(ws)
            first = _decode(await ws.get_message())
            if first.type != "spend":
                raise RuntimeError(f"connection {index}: first message was {first.type!r}")
        subscribers[index] = subscriber
        subscribed += 1
        if subscribed == count:
            all_subscribed.set()
        await subscriber.run()

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(connect, nursery, index)
        with trio.fail_after(120):
            await all_subscribed.wait()
        print(f"subscribed {count} to {url}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        # Synchronous on purpose: no push is recorded while the file is written.
        pushes = _save(out, subscribers)
        print(f"done {pushes}", flush=True)
        # 1,000 closing handshakes would only add noise to the service's figures
        # and time to the run; the service sees the sockets close.
        os._exit(0)


def _save(out: str, subscribers: list[Subscriber | None]) -> int:
    with open(out, "wb") as file:
        return _write(file, subscribers)


def _write(file: BinaryIO, subscribers: list[Subscriber | None]) -> int:
    total = 0
    for subscriber in subscribers:
        assert subscriber is not None
        n = len(subscriber.seqs)
        total += n
        array("q", [n]).tofile(file)
        subscriber.seqs.tofile(file)
        subscriber.times.tofile(file)
    return total


if __name__ == "__main__":
    url_arg, count_arg, out_arg = sys.argv[1:4]
    _raise_fd_limit(int(count_arg) + 256)
    trio.run(main, url_arg, int(count_arg), out_arg)
