"""The network face: WebSocket ``/ws`` plus ``GET /health`` and ``GET /metrics``,
all on one port.

Each TCP connection starts with an HTTP request head, read here with h11
(bounded in size and time). A WebSocket upgrade to ``/ws`` is handed to
trio-websocket by replaying the bytes already read into it; a plain ``GET`` of
``/health`` or ``/metrics`` is answered directly; anything else gets a 404.

The server is only a client of the in-process :class:`~budget_actor.Budget`
API. Per WebSocket connection there is a reader (decode, validate, forward), an
ack writer (acks go out in order, each once its cost is durable) and, after
``subscribe``, a pusher that drains the connection's latest-value
subscription. A slow or dead peer blocks only its own tasks.

Containment: every connection runs inside :func:`_contain`, which logs any
exception with the peer's address and closes only that connection. trio-websocket
would otherwise let a handler's exception take down the whole server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11
import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from . import _metrics
from ._fanout import Published, Subscription
from ._messages import CostReceipt
from ._service import Budget, ServiceStopped
from ._wire import Ack as AckMessage
from ._wire import (
    AdmitRequest,
    CostRequest,
    CycleRequest,
    HealthRequest,
    SubscribeRequest,
    WireError,
    decode,
    encode,
)

log = logging.getLogger("budget_actor.server")

# The contract's frame limit; larger frames close the connection with 1009.
MAX_FRAME_BYTES = 64 * 1024
# An HTTP request head larger than this is not a browser or a client library.
MAX_HEAD_BYTES = 16 * 1024
# A peer that cannot send its request head within this is dropped, so idle
# sockets cannot pile up.
HANDSHAKE_TIMEOUT_S = 10.0
# Costs a pipelining dispatcher may have in flight before its reader stops
# taking frames (TCP backpressure then slows it down).
ACK_WINDOW = 1024
WS_PATH = "/ws"


class _ReplayStream(trio.abc.Stream):
    """A stream that first yields ``prefix``, then reads from ``stream``."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof: Callable[[], Awaitable[None]] | None = getattr(self._stream, "send_eof", None)
        if send_eof is not None:
            await send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def serve(
    budget: Budget,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 = any free port) until cancelled.

    ``task_status.started`` receives the real port. Raises ``OSError`` if the
    address cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    real_port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _contain(budget, stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(real_port)


async def _contain(budget: Budget, stream: trio.SocketStream) -> None:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        peer = "?"
    try:
        await _connection(budget, stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
        pass  # the peer went away; nothing to report
    except ServiceStopped:
        pass
    except Exception:
        log.exception("connection from %s failed; closing it", peer)
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


async def _connection(budget: Budget, stream: trio.SocketStream) -> None:
    with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
        head = await _read_head(stream)
    if head is None:
        return
    raw, request = head
    target = request.target.decode("latin-1").split("?", 1)[0]
    if _is_upgrade(request):
        if target != WS_PATH:
            await _respond(stream, 404, b"not found: the WebSocket is at /ws\n")
            return
        await _websocket(budget, _ReplayStream(stream, raw))
        return
    head_only = request.method == b"HEAD"
    if request.method not in (b"GET", b"HEAD"):
        await _respond(stream, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
    elif target == "/health":
        health = await budget.health()
        code = 200 if health.ok else 503
        await _respond(stream, code, encode(health), json=True, head_only=head_only)
    elif target == "/metrics":
        body = _metrics.render(await budget.health()).encode()
        kind = [(b"content-type", b"text/plain; version=0.0.4")]
        await _respond(stream, 200, body, kind, head_only=head_only)
    else:
        await _respond(
            stream, 404, b"not found: try /ws, /health or /metrics\n", head_only=head_only
        )


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, h11.Request] | None:
    """Read until h11 sees a whole request head; None if the peer gives up or
    sends garbage (a 400 is sent for garbage)."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            await _respond(stream, 400, b"bad request\n")
            return None
        if isinstance(event, h11.Request):
            return bytes(raw), event
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                return None
            raw += data
            parser.receive_data(data)
        else:
            return None


def _is_upgrade(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"upgrade" and value.lower() == b"websocket":
            return True
    return False


async def _respond(
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    json: bool = False,
    head_only: bool = False,
) -> None:
    """Send one HTTP response; for HEAD, the headers of the same response."""
    conn = h11.Connection(h11.SERVER)
    # h11 must have seen a request before it will write a response.
    method = b"HEAD" if head_only else b"GET"
    conn.receive_data(method + b" / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    all_headers = [
        (b"content-type", b"application/json" if json else b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
    ]
    if headers:
        names = {name for name, _ in headers}
        all_headers = [h for h in all_headers if h[0] not in names] + headers
    reason = HTTPStatus(status).phrase.encode()
    data = conn.send(h11.Response(status_code=status, headers=all_headers, reason=reason))
    if not head_only:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _websocket(budget: Budget, stream: _ReplayStream) -> None:
    async with trio.open_nursery() as nursery:
        request = await wrap_server_stream(nursery, stream, max_message_size=MAX_FRAME_BYTES)
        ws = await request.accept()
        try:
            await _session(budget, ws)
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def _session(budget: Budget, ws: WebSocketConnection) -> None:
    """One client's conversation: read frames until the peer closes."""
    max_cost = budget.config.max_cost
    acks_in, acks_out = trio.open_memory_channel[tuple[str, CostReceipt]](ACK_WINDOW)
    subscription: Subscription | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ack_writer, ws, acks_out)
            while True:
                try:
                    frame = await ws.get_message()
                except ConnectionClosed:
                    break
                try:
                    request = decode(frame, max_cost=max_cost)
                except WireError as exc:
                    await ws.send_message(exc.frame().decode())
                    continue
                if isinstance(request, CostRequest):
                    receipt = await budget.submit(request)
                    await acks_in.send((request.dispatch_id, receipt))
                elif isinstance(request, CycleRequest):
                    await budget.cycle()
                elif isinstance(request, HealthRequest):
                    health = await budget.health()
                    if request.id is not None:
                        health = msgspec.structs.replace(health, id=request.id)
                    await ws.send_message(encode(health).decode())
                elif isinstance(request, SubscribeRequest):
                    if subscription is None:
                        subscription = await budget.open_subscription()
                        nursery.start_soon(_pusher, ws, subscription)
                elif isinstance(request, AdmitRequest):
                    await ws.send_message(
                        WireError("invalid_message", "`admit` is not supported by this version")
                        .frame()
                        .decode()
                    )
            nursery.cancel_scope.cancel()
    finally:
        if subscription is not None:
            budget.unsubscribe(subscription)


async def _ack_writer(
    ws: WebSocketConnection, acks: trio.MemoryReceiveChannel[tuple[str, CostReceipt]]
) -> None:
    async for dispatch_id, receipt in acks:
        await receipt.durable.wait()
        await ws.send_message(
            encode(AckMessage(dispatch_id, receipt.duplicate, receipt.seq)).decode()
        )


async def _pusher(ws: WebSocketConnection, subscription: Subscription) -> None:
    while True:
        try:
            item = await subscription.next()
        except trio.EndOfChannel:
            if subscription.overflowed:
                await ws.aclose(1008, "subscriber is not reading its alerts")
            return
        if isinstance(item, Published):
            await ws.send_message(item.frame())
        else:
            await ws.send_message(encode(item).decode())
