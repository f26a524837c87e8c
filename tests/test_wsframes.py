"""Pre-framed writes beside trio-websocket (``net/wsframes.py``), against a
real trio-websocket client: frames it parses, no interleaving with the
library's own sends, nothing written when the peer is behind or the
connection is closing."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from budget_actor.net.wsframes import (
    DIRECT_LIMIT,
    FrameWriter,
    eager_receive,
    message_nowait,
    text_frame,
)

from ._client import StuckClient

Handler = Callable[[WebSocketConnection, FrameWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    """A trio-websocket server whose connections run ``handler``; its port."""

    async def accept(request: WebSocketRequest) -> None:
        ws = await request.accept()
        # The client going away ends a handler; that is not a failure here.
        with contextlib.suppress(ConnectionClosed):
            await handler(ws, FrameWriter(ws, ws._stream))

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, accept, "127.0.0.1", 0, None)
        yield listener.port
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
async def test_text_frames_of_every_length_form_are_read_by_trio_websocket(size: int) -> None:
    payload = "é" * (size // 2) + "x" * (size % 2)  # two UTF-8 bytes per é
    data = payload.encode()
    assert len(data) == size

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        await writer.send(text_frame(data))
        # Only small frames are written without waiting.
        direct = writer.write_now(text_frame(data))
        assert direct == (len(text_frame(data)) <= DIRECT_LIMIT)
        if not direct:
            await writer.send(text_frame(data))
        await ws.get_message()  # until the client closes

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/", max_message_size=1 << 20) as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == payload
                assert await ws.get_message() == payload


async def test_many_frames_in_one_write_arrive_as_separate_messages() -> None:
    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        await writer.send(b"".join(text_frame(f'{{"n":{i}}}'.encode()) for i in range(500)))
        await ws.get_message()

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            with trio.fail_after(10):
                got = [json.loads(await ws.get_message())["n"] for _ in range(500)]
    assert got == list(range(500))


async def test_pre_framed_writes_never_interleave_with_trio_websockets_sends() -> None:
    """Three writers at once on one connection: trio-websocket's send_message,
    FrameWriter.send and FrameWriter.write_now. Every message arrives whole,
    and each writer's messages in its own order."""
    count = 400
    big = "z" * 1500  # long enough that a torn frame would show

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        async def library() -> None:
            for i in range(count):
                await ws.send_message(json.dumps({"w": "lib", "i": i, "pad": big}))

        async def awaited() -> None:
            for i in range(count):
                message = {"w": "send", "i": i, "pad": big}
                await writer.send(text_frame(json.dumps(message).encode()))

        async def direct() -> None:
            i = 0
            while i < count:
                frame = text_frame(json.dumps({"w": "now", "i": i, "pad": big}).encode())
                if writer.write_now(frame):
                    i += 1
                else:
                    await writer.send(frame)
                    i += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(library)
            nursery.start_soon(awaited)
            nursery.start_soon(direct)
        await ws.get_message()

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/", message_queue_size=64) as ws:
            seen: dict[str, list[int]] = {"lib": [], "send": [], "now": []}
            with trio.fail_after(30):
                for _ in range(3 * count):
                    message = json.loads(await ws.get_message())
                    assert message["pad"] == big
                    seen[message["w"]].append(message["i"])
    assert seen == {name: list(range(count)) for name in seen}


async def test_write_now_refuses_while_another_write_holds_the_lock() -> None:
    results: list[bool] = []

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        frame = text_frame(b'"x"')
        async with ws._stream_lock:
            results.append(writer.write_now(frame))
        results.append(writer.write_now(frame))
        await ws.get_message()

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == '"x"'
    assert results == [False, True]


async def test_a_peer_that_stops_reading_gets_no_direct_write_and_no_torn_frame() -> None:
    """write_now stops (returns False) once the peer is behind, without
    cutting the connection; what it reported written arrives whole, in
    order, when the peer reads again, followed by an awaited send."""
    written: list[int] = []
    refused = trio.Event()
    resume = trio.Event()

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        for i in range(100_000):
            if not writer.write_now(text_frame(json.dumps({"i": i, "pad": "p" * 200}).encode())):
                break
            written.append(i)
        refused.set()
        await resume.wait()
        await writer.send(text_frame(b'{"i":"last"}'))
        await ws.get_message()

    async with server(handler) as port:
        stuck = StuckClient("127.0.0.1", port)
        await stuck.open()  # tiny receive buffer, reads nothing after the handshake
        with trio.fail_after(10):
            await refused.wait()
        assert written, "nothing could be written to a fresh connection"
        resume.set()
        raw = stuck.sock
        buffer = b""
        messages: list[object] = []
        with trio.fail_after(20):
            while not messages or messages[-1] != "last":
                buffer += await raw.recv(65536)
                while len(buffer) >= 2:
                    assert buffer[0] == 0x81, buffer[:4]
                    n, start = buffer[1], 2
                    if n == 126:
                        if len(buffer) < 4:
                            break
                        n, start = int.from_bytes(buffer[2:4], "big"), 4
                    if len(buffer) < start + n:
                        break
                    messages.append(json.loads(buffer[start : start + n])["i"])
                    buffer = buffer[start + n :]
        stuck.close()
    assert messages == [*written, "last"]


async def test_nothing_is_written_once_the_connection_is_closing() -> None:
    outcome: list[object] = []

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        await ws.aclose(1000)
        outcome.append(writer.closed)
        outcome.append(writer.write_now(text_frame(b'"late"')))
        try:
            await writer.send(text_frame(b'"late"'))
        except ConnectionClosed:
            outcome.append("closed")

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1000
    assert outcome == [True, False, "closed"]


async def test_a_send_to_a_vanished_peer_raises_connection_closed() -> None:
    gone = trio.Event()
    outcome: list[object] = []

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        await gone.wait()
        try:
            for _ in range(1000):  # until the reset is noticed
                await writer.send(text_frame(b'"x"' * 1000))
                await trio.sleep(0.001)
        except ConnectionClosed as exc:
            outcome.append(exc.reason.code)

    async with server(handler) as port:
        peer = StuckClient("127.0.0.1", port)
        await peer.open()
        linger = struct.pack("ii", 1, 0)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        peer.close()  # a reset, not a closing handshake
        gone.set()
        with trio.fail_after(10):
            while not outcome:
                await trio.sleep(0.01)
    assert outcome == [1006]


async def test_message_nowait_takes_what_was_already_received() -> None:
    taken: list[object] = []

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        first = await ws.get_message()
        taken.append(first)
        while len(taken) < 5:
            message = message_nowait(ws)
            if message is None:
                taken.append(await ws.get_message())
            else:
                taken.append(message)
        assert message_nowait(ws) is None
        await writer.send(text_frame(b'"done"'))
        with pytest.raises(ConnectionClosed):
            while True:
                if message_nowait(ws) is None:
                    await ws.get_message()

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            for i in range(5):
                await ws.send_message(f"m{i}")
            with trio.fail_after(10):
                assert await ws.get_message() == '"done"'
    assert taken == [f"m{i}" for i in range(5)]


async def test_eager_receive_queues_without_a_checkpoint_and_waits_when_full() -> None:
    """After eager_receive, the reader's queueing of a message makes no
    scheduler pass while the queue has room, and still waits when it is full."""
    outcome: list[object] = []

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        eager_receive(ws)
        queue = ws._send_channel  # what trio-websocket's reader sends into
        room = ws._recv_channel.statistics().max_buffer_size
        with trio.testing.assert_no_checkpoints():
            for i in range(room):
                await queue.send(f"injected {i}")
        blocked = trio.Event()

        async def one_more() -> None:
            with trio.testing.assert_checkpoints():
                await queue.send("one more")
            blocked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_more)
            await trio.testing.wait_all_tasks_blocked()
            outcome.append(blocked.is_set())  # still waiting: the queue is full
            outcome.append(await ws.get_message())
        outcome.append(blocked.is_set())
        await writer.send(text_frame(b'"done"'))
        await ws.get_message()

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            with trio.fail_after(10):
                assert await ws.get_message() == '"done"'
    assert outcome == [False, "injected 0", True]


async def test_eager_receive_keeps_every_message_in_order_and_closes_as_before() -> None:
    got: list[str | bytes] = []
    closed: list[int] = []

    async def handler(ws: WebSocketConnection, writer: FrameWriter) -> None:
        eager_receive(ws)
        try:
            while True:
                message = message_nowait(ws)
                got.append(await ws.get_message() if message is None else message)
        except ConnectionClosed as exc:
            closed.append(exc.reason.code)

    async with server(handler) as port:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            for i in range(2000):
                await ws.send_message(f"m{i}")
        with trio.fail_after(10):
            while not closed:
                await trio.sleep(0.01)
    assert got == [f"m{i}" for i in range(2000)]
    assert closed == [1000]
