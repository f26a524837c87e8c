"""Many WebSocket subscribers in one process, for the ``fanout`` scenario.

``python bench/fanout_subscribers.py URL N OUT``: opens N WebSocket
connections to URL, sends ``{"type": "subscribe"}`` on each and waits for
each one's first ``spend`` (the current state); then prints one line,
``subscribed N to URL``, and records every ``spend`` push: its ``seq`` and
``time.time()`` when the read that brought it returned. When a line ``stop``
(or EOF) arrives on standard input it writes OUT and prints ``done PUSHES``,
then exits without closing the connections one by one.

A lean client on purpose: one thread, non-blocking sockets under epoll, and
a minimal RFC 6455 client (handshake, masked frames out; unmasked frames in,
pings answered). On the 2-core benchmark machine, 1,000 trio-websocket
clients spent more CPU receiving than the service spent sending, which
measured the subscribers' process more than the service. The tests check
the service with real trio-websocket clients.

OUT holds, per connection in connection order: the number of pushes as an
int64, then that many int64 seqs, then that many float64 times (native byte
order: the bench reads it on the same machine).
Imports nothing from ``bench`` (it runs by path, as its own process).
"""

from __future__ import annotations

import base64
import os
import resource
import selectors
import socket
import sys
import time
from array import array
from urllib.parse import urlsplit

import msgspec

HANDSHAKE_TIMEOUT_S = 30.0
READ_BYTES = 65536


class _Push(msgspec.Struct):
    type: str
    seq: int = -1


_decode = msgspec.json.Decoder(_Push).decode


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (payloads here are short)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


class Subscriber:
    __slots__ = ("buffer", "first", "seqs", "sock", "times")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.first = False
        self.seqs = array("q")
        self.times = array("d")

    def received(self, data: bytes, at: float) -> None:
        """Parse every whole frame in the buffer; record spend pushes."""
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 2:
            opcode, n, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if n == 126:
                if len(buffer) < 4:
                    return
                n, start = int.from_bytes(buffer[2:4], "big"), 4
            elif n == 127:
                if len(buffer) < 10:
                    return
                n, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + n:
                return
            payload = bytes(buffer[start : start + n])
            del buffer[: start + n]
            if opcode == 0x1:
                push = _decode(payload)
                if push.type == "spend":
                    if self.first:
                        self.seqs.append(push.seq)
                        self.times.append(at)
                    self.first = True
            elif opcode == 0x9:  # ping: the service drops peers that do not answer
                self.sock.sendall(_client_frame(0xA, payload))
            elif opcode == 0x8:
                raise ConnectionError(f"service closed the connection: {payload!r}")


def handshake(host: str, port: int, path: str = "/ws") -> socket.socket:
    """A WebSocket connection on a plain blocking socket: the upgrade, read
    exactly to the end of the reply's head (no frame may follow it yet)."""
    sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        status = head.partition(b"\r\n")[0]
        raise ConnectionError(f"handshake refused: {status!r}")
    if not head.endswith(b"\r\n\r\n"):
        raise ConnectionError(f"data after the handshake reply: {head[:200]!r}")
    return sock


def _connect(host: str, port: int, path: str) -> socket.socket:
    sock = handshake(host, port, path)
    sock.sendall(_client_frame(0x1, b'{"type":"subscribe"}'))
    sock.setblocking(False)
    return sock


def main(url: str, count: int, out: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    selector = selectors.EpollSelector()
    subscribers: list[Subscriber] = []
    for _ in range(count):
        subscriber = Subscriber(_connect(host, port, parts.path or "/"))
        subscribers.append(subscriber)
        selector.register(subscriber.sock, selectors.EVENT_READ, subscriber)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    selector.register(stdin, selectors.EVENT_READ, None)
    waiting = count
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    command = b""
    now = time.time
    while True:
        events = selector.select(timeout=1.0)
        at = now()
        for key, _ in events:
            subscriber = key.data
            if subscriber is None:
                data = os.read(stdin, 4096)
                command += data
                if not data or b"\n" in command:
                    pushes = _save(out, subscribers)
                    print(f"done {pushes}", flush=True)
                    # 1,000 closing handshakes would only add noise and time.
                    os._exit(0)
                continue
            try:
                data = subscriber.sock.recv(READ_BYTES)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("the service closed a subscriber's connection")
            first = subscriber.first
            subscriber.received(data, at)
            if not first and subscriber.first:
                waiting -= 1
                if waiting == 0:
                    print(f"subscribed {count} to {url}", flush=True)
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"{waiting} of {count} subscribers got no first state")


def _save(out: str, subscribers: list[Subscriber]) -> int:
    total = 0
    with open(out, "wb") as file:
        for subscriber in subscribers:
            n = len(subscriber.seqs)
            total += n
            array("q", [n]).tofile(file)
            subscriber.seqs.tofile(file)
            subscriber.times.tofile(file)
    return total


if __name__ == "__main__":
    url_arg, count_arg, out_arg = sys.argv[1:4]
    _raise_fd_limit(int(count_arg) + 256)
    main(url_arg, int(count_arg), out_arg)
