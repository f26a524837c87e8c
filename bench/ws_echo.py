"""A bare trio-websocket server that answers every ``cost`` frame with an ``ack``.

The ceiling for the ``ws-ingest`` scenario: the same client, the same frames
and the same kind of reply as the service, with no budget behind it. Each frame
is decoded (msgspec, the service's JSON library) for its ``dispatch_id`` and
answered at once with ``{"type": "ack", "dispatch_id", "duplicate", "seq"}``.

Run by path (``python bench/ws_echo.py``); prints ``ws://127.0.0.1:PORT/ws``
when ready, and runs until killed (SIGTERM). Imports nothing from ``bench``.
"""

from __future__ import annotations

import sys

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


class Cost(msgspec.Struct):
    dispatch_id: str


class Ack(msgspec.Struct, tag="ack", tag_field="type"):
    dispatch_id: str
    duplicate: bool
    seq: int


_decode = msgspec.json.Decoder(Cost).decode
_encode = msgspec.json.Encoder().encode


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    seq = 0
    try:
        while True:
            frame = await ws.get_message()
            seq += 1
            cost = _decode(frame)
            await ws.send_message(_encode(Ack(cost.dispatch_id, False, seq)).decode())
    except ConnectionClosed:
        pass


async def main() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        print(f"ws echo serving ws://127.0.0.1:{server.port}/ws", flush=True)


if __name__ == "__main__":
    sys.exit(trio.run(main))
