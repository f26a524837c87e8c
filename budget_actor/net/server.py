"""The network face: WebSocket ``/ws`` plus ``GET /health`` and ``GET /metrics``,
all on one port.

Each TCP connection starts with an HTTP request head, read here with h11
(bounded in size and time). A WebSocket upgrade to ``/ws`` is handed to
trio-websocket by replaying the bytes already read into it; a plain ``GET`` of
``/health`` or ``/metrics`` is answered directly; anything else gets a 404.

The server is only a client of the in-process :class:`~budget_actor.Budget`
API. Per WebSocket connection there is a reader (decode, validate, forward), an
ack writer (acks go out in order, each once its cost is durable, as many in one
write as are ready) and, after ``subscribe``, a pusher task; one task for the
whole server writes each released spend state to every subscriber
(``pushes.py``), with pre-built frames (``wsframes.py``). A slow or dead peer
blocks only its own tasks.

Containment: every connection runs inside :meth:`_Server.handle`, which logs
any exception with the peer's address and closes only that connection.
trio-websocket would otherwise let a handler's exception take down the whole
server. Access (tokens, roles) and limits are in :class:`ServerOptions`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ..core.access import (
    DEFAULT_DISPATCHER_SLOTS,
    DEFAULT_MAX_PER_ADDRESS,
    Access,
    Role,
    Slots,
    TokenBucket,
    address_key,
    may,
)
from ..core.cost import Cost
from ..core.history import parse_days
from ..core.views import Receipt
from ..core.wire import Ack as AckMessage
from ..core.wire import (
    Acks,
    AdmitRequest,
    CostsRequest,
    CycleRequest,
    ErrorCode,
    HealthRequest,
    SubscribeRequest,
    WireError,
    decode,
    encode,
    peek_type,
)
from ..runtime.fanout import Subscription
from ..runtime.messages import BatchReceipt, CostReceipt, ServiceStopped
from ..runtime.service import Budget
from ..stores.store import StoreError
from . import metrics as _metrics
from . import page as _page
from .pushes import Pusher, Pushes
from .wsframes import FrameWriter, eager_receive, message_nowait, text_frame

log = logging.getLogger("budget_actor.server")

WS_PATH = "/ws"
# An HTTP request head larger than this is not a browser or a client library.
MAX_HEAD_BYTES = 16 * 1024
# Costs a pipelining dispatcher may have in flight before its reader stops
# taking frames (TCP backpressure then slows it down).
ACK_WINDOW = 1024
# Frames trio-websocket may hold for the reader. Its default of 1 costs a task
# switch per frame for a pipelining dispatcher; 8 lets it parse a whole TCP
# read at once, while bounding what an unread connection holds (8 x 64 KiB).
MESSAGE_QUEUE = 8
# Acks written in one call at most: bounds the bytes built up for one write
# (~80 bytes each) while letting a pipelining dispatcher's acks that became
# durable in the same commit leave together.
ACK_BATCH = 512
# Seconds a client refused for want of a slot should wait before trying
# again: long enough that a crowd retrying does not spin, short enough that a
# dispatcher whose old connection is just closing gets back in at once.
RETRY_AFTER_S = b"1"
# A peer that does not finish the WebSocket closing handshake in this time is
# simply disconnected.
CLOSE_TIMEOUT_S = 2.0
# trio logs every failed accept() (no descriptor left, EMFILE) with a
# traceback and retries every 0.1 s: ten tracebacks a second for as long as
# the shortage lasts. One line per interval says the same.
ACCEPT_ERROR_LOG_EVERY_S = 10.0


class ServerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Limits and access of the network face; every default is documented in
    docs/security.md."""

    access: Access = Access()
    # The contract's frame limit; a larger frame closes the connection with 1009.
    max_frame_bytes: int = 64 * 1024
    # WebSocket connections at once; the next handshake gets HTTP 503. Of
    # these, dispatcher_slots are never given to observers, and one client
    # address may hold at most max_per_address (see core.access.Slots).
    max_connections: int = 1000
    dispatcher_slots: int = DEFAULT_DISPATCHER_SLOTS
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    # Per-connection message budget. Far above what a real dispatcher sends
    # (a pipelining client reaches ~10k/s), so only a flood meets it.
    rate_per_s: float = 20_000.0
    burst: int = 40_000
    # `overloaded` errors a flooding client gets within overload_window_s
    # before it is closed with 1008. Counted per window, not forever: a client
    # that now and then goes a little over the rate is answered `overloaded`
    # each time but never closed; one that keeps flooding is closed within
    # seconds (at twice the rate it earns 100 refusals in 10 ms).
    max_overloads: int = 100
    overload_window_s: float = 10.0
    # A peer must send its request head (and finish TLS) within this time.
    handshake_timeout_s: float = 10.0
    # Ping every interval; a peer that does not answer within the timeout is dead.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    ssl_context: ssl.SSLContext | None = None


class _ReplayStream(trio.abc.Stream):
    """A stream that first yields ``prefix``, then reads from ``stream``."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    @property
    def transport(self) -> trio.abc.Stream:
        """The stream beneath (for writes that bypass this wrapper)."""
        return self._stream

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
    options: ServerOptions | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 = any free port) until cancelled.

    ``task_status.started`` receives the real port. Raises ``OSError`` if the
    address cannot be bound. No exception from a connection ever escapes: each
    is logged and closes that connection only.
    """
    server = _Server(budget, options or ServerOptions())
    _quiet_accept_errors()
    tcp = await trio.open_tcp_listeners(port, host=host)
    real_port = tcp[0].socket.getsockname()[1]
    if port == 0 and any(t.socket.getsockname()[1] != real_port for t in tcp):
        # "localhost" gives an IPv4 and an IPv6 listener, and port 0 a port
        # each; the ready line names one port, so all must share it.
        for listener in tcp:
            await listener.aclose()
        try:
            tcp = await trio.open_tcp_listeners(real_port, host=host)
        except OSError:
            tcp = await trio.open_tcp_listeners(0, host=host)
            tcp = tcp[:1]
            real_port = tcp[0].socket.getsockname()[1]
    listeners: list[trio.abc.Listener[Any]] = list(tcp)
    if server.options.ssl_context is not None:
        listeners = [
            trio.SSLListener(listener, server.options.ssl_context, https_compatible=True)
            for listener in tcp
        ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.pushes.run)
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(real_port)


class _OncePer(logging.Filter):
    """Lets one record through per interval, without its traceback; the next
    one that passes says how many were held back meanwhile."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._passed_at = -math.inf
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._passed_at < self.interval_s:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.msg} (and %d times more since the last report)"
            record.args = (*(record.args if isinstance(record.args, tuple) else ()), self._held)
        record.exc_info = record.exc_text = None
        self._passed_at, self._held = now, 0
        return True


def _quiet_accept_errors() -> None:
    accept_log = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, _OncePer) for f in accept_log.filters):
        accept_log.addFilter(_OncePer(ACCEPT_ERROR_LOG_EVERY_S))


class _Server:
    def __init__(self, budget: Budget, options: ServerOptions) -> None:
        self.budget = budget
        self.options = options
        self.slots = Slots(
            options.max_connections, options.dispatcher_slots, options.max_per_address
        )
        self.pushes = Pushes(budget.fanout)
        # Error replies sent, by code, for /metrics.
        self.errors: collections.Counter[str] = collections.Counter()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Containment: whatever happens in here stays in this connection."""
        peer = _peer(stream)
        try:
            await self._connection(stream)
        except Exception as exc:
            if not _only_disconnects(exc):
                # The peer's address, never the request target: it may hold a token.
                log.exception("connection from %s failed; closing it", peer)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
                cleanup.shield = True
                await _linger(stream)
            await trio.aclose_forcefully(stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        exchange = None
        with trio.move_on_after(self.options.handshake_timeout_s):
            exchange = await _Exchange.read(stream)
        if exchange is None:
            return
        request = exchange.request
        target = request.target.decode("latin-1").split("?", 1)[0]
        if _is_upgrade(request):
            await self._upgrade(exchange, target)
        elif request.method not in (b"GET", b"HEAD"):
            await exchange.respond(405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        elif target == "/health":
            health = await self.budget.health()
            await exchange.respond(200 if health.ok else 503, encode(health), json=True)
        elif target == "/metrics":
            accept = ", ".join(_header_values(request, b"accept"))
            health = await self.budget.health()
            body, content_type = _metrics.exposition(health, self.budget.stats, self.errors, accept)
            await exchange.respond(200, body, [(b"content-type", content_type.encode())])
        elif target == "/history":
            await self._history(exchange)
        elif target == "/":
            # The live page; it needs no token (its WebSocket does).
            await exchange.respond(200, _page.PAGE, _page.HEADERS)
        else:
            await exchange.respond(404, b"not found: try /ws, /health, /metrics or /history\n")

    async def _history(self, exchange: _Exchange) -> None:
        """``GET /history?days=N``: observer role when tokens are set."""
        request = exchange.request
        if self.options.access.role(list(request.headers), request.target) is None:
            await exchange.respond(
                401,
                b"unauthorized: present a token as 'Authorization: Bearer TOKEN' or ?token=\n",
                [(b"www-authenticate", b'Bearer realm="budget_actor"')],
            )
            return
        query = urlsplit(request.target.decode("latin-1")).query
        try:
            days = parse_days(parse_qs(query, keep_blank_values=True).get("days"))
        except ValueError as exc:
            await exchange.respond(400, f"bad request: {exc}\n".encode())
            return
        try:
            history = await self.budget.history(days)
        except StoreError as exc:
            log.warning("history unavailable: %s", exc)
            await exchange.respond(
                503,
                b"history unavailable: the database cannot be read\n",
                [(b"retry-after", b"5")],
            )
            return
        await exchange.respond(200, history.json(), json=True)

    async def _upgrade(self, exchange: _Exchange, target: str) -> None:
        request, stream = exchange.request, exchange.stream
        if target != WS_PATH:
            await exchange.respond(404, b"not found: the WebSocket is at /ws\n")
            return
        # Before the token: a page from elsewhere is refused whatever it presents.
        origins = _header_values(request, b"origin")
        if origins and not (
            len(origins) == 1
            and self.options.access.origin_allowed(
                origins[0],
                _single(_header_values(request, b"host")),
                secure=self.options.ssl_context is not None,
            )
        ):
            await exchange.respond(
                403,
                b"forbidden: pages from this origin may not open the WebSocket;"
                b" the operator can allow it with --allow-origin\n",
            )
            return
        role = self.options.access.role(list(request.headers), request.target)
        if role is None:
            await exchange.respond(
                401,
                b"unauthorized: present a token as 'Authorization: Bearer TOKEN' or ?token=\n",
                [(b"www-authenticate", b'Bearer realm="budget_actor"')],
            )
            return
        address = address_key(_peer_host(stream))
        refused = self.slots.take(role, address)
        if refused is not None:
            body = f"service unavailable: {refused}; retry later\n".encode()
            await exchange.respond(503, body, [(b"retry-after", RETRY_AFTER_S)])
            return
        try:
            # trio-websocket (wsproto) does the handshake itself, from the
            # bytes this exchange has already read.
            await self._websocket(_ReplayStream(stream, exchange.raw), role)
        finally:
            self.slots.give_back(role, address)

    async def _websocket(self, stream: _ReplayStream, role: Role) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=MESSAGE_QUEUE,
                max_message_size=self.options.max_frame_bytes,
            )
            ws = await request.accept()
            eager_receive(ws)
            writer = FrameWriter(ws, stream.transport)
            try:
                await _Session(self, ws, writer, role).run()
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT_S) as closing:
                    closing.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()


# A peer going away, or the service stopping, ends a connection; neither is
# a failure worth a traceback in the log.
_DISCONNECTS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ConnectionClosed,
    ServiceStopped,
)


def _only_disconnects(exc: BaseException) -> bool:
    """True if ``exc`` (or every exception inside a group) is a disconnect."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(inner) for inner in exc.exceptions)
    return isinstance(exc, _DISCONNECTS)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read and drop what the peer still sends until it closes.

    Closing a socket with unread data in its buffer makes the kernel send a
    reset, which can destroy our last frames (a close code, an error) before
    the peer reads them. Bounded by the caller's deadline.
    """
    if not isinstance(stream, trio.SocketStream):
        return
    try:
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _peer(stream: trio.abc.Stream) -> str:
    inner: Any = getattr(stream, "transport_stream", stream)
    try:
        host, port = inner.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError):
        return "?"


def _peer_host(stream: trio.abc.Stream) -> str:
    """The peer's IP address ("?" if the socket no longer knows it)."""
    inner: Any = getattr(stream, "transport_stream", stream)
    try:
        host: str = inner.socket.getpeername()[0]
        return host
    except (AttributeError, OSError):
        return "?"


class _Exchange:
    """One HTTP request and its response, both on the h11 connection that
    parsed the request (h11 then frames the response as that request needs:
    no body for HEAD, and a refusal of a WebSocket upgrade)."""

    def __init__(
        self, stream: trio.abc.Stream, conn: h11.Connection, raw: bytes, request: h11.Request
    ) -> None:
        self.stream = stream
        self.conn = conn
        #: Every byte read so far (replayed to trio-websocket on an upgrade).
        self.raw = raw
        self.request = request

    @classmethod
    async def read(cls, stream: trio.abc.Stream) -> _Exchange | None:
        """Read until h11 sees a whole request head; None if the peer gives up
        or breaks the protocol. A broken request is answered first, with the
        status h11 suggests for it (``error_status_hint``: 431 for a head
        over :data:`MAX_HEAD_BYTES`, 400 for garbage)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        raw = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                reason = HTTPStatus(status).phrase.lower().encode()
                await _send_response(stream, conn, status, reason + b"\n")
                return None
            if isinstance(event, h11.Request):
                return cls(stream, conn, bytes(raw), event)
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    return None
                raw += data
                conn.receive_data(bytes(data))
            else:
                return None

    async def respond(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        json: bool = False,
    ) -> None:
        """Send the response, then the connection closes (one request each)."""
        head_only = self.request.method == b"HEAD"
        await _send_response(
            self.stream, self.conn, status, body, headers, json=json, head_only=head_only
        )


def _header_values(request: h11.Request, name: bytes) -> list[str]:
    """Every value of header ``name`` (lower case), as text."""
    return [value.decode("latin-1") for key, value in request.headers if key == name]


def _single(values: list[str]) -> str | None:
    return values[0] if len(values) == 1 else None


def _is_upgrade(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"upgrade" and value.lower() == b"websocket":
            return True
    return False


async def _send_response(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    json: bool = False,
    head_only: bool = False,
) -> None:
    """Send one response through ``conn``; for HEAD, its headers only."""
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


_KIND: dict[type[Any], str] = {
    SubscribeRequest: "subscribe",
    Cost: "cost",
    CostsRequest: "costs",
    CycleRequest: "cycle",
    HealthRequest: "health",
    AdmitRequest: "admit",
}


# What the ack writer waits for, in order: one cost (its dispatch_id) or a
# `costs` batch (its dispatch_ids, answered by one BatchReceipt).
_Awaited = tuple[str | list[str], CostReceipt]


def _ack(dispatch_id: str | list[str], receipt: CostReceipt) -> AckMessage | Acks:
    """The `ack` of a durable cost, or the `acks` of a durable batch."""
    if isinstance(receipt, BatchReceipt):
        assert isinstance(dispatch_id, list)
        items = zip(dispatch_id, receipt.seqs, receipt.duplicates, strict=True)
        return Acks([Receipt(*item) for item in items])
    assert isinstance(dispatch_id, str)
    return AckMessage(dispatch_id, receipt.duplicate, receipt.seq)


class _Session:
    """One WebSocket client's conversation.

    The reader decodes, checks the role and the rate, and forwards; acks go
    out from their own task, in order, each once its cost is durable; the
    subscriber's pusher task and the server's push task send spend states
    and alerts; a keepalive task drops a dead peer.
    """

    def __init__(
        self, server: _Server, ws: WebSocketConnection, writer: FrameWriter, role: Role
    ) -> None:
        self.server = server
        self.budget = server.budget
        self.ws = ws
        self.writer = writer
        self.role = role
        self.options = server.options
        self.errors = server.errors
        self.subscription: Subscription | None = None

    async def run(self) -> None:
        acks_in, acks_out = trio.open_memory_channel[_Awaited](ACK_WINDOW)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ack_writer, acks_out)
                nursery.start_soon(self._keepalive, nursery.cancel_scope)
                await self._read(nursery, acks_in)
                nursery.cancel_scope.cancel()
        finally:
            if self.subscription is not None:
                self.budget.unsubscribe(self.subscription)

    async def _read(
        self,
        nursery: trio.Nursery,
        acks: trio.MemorySendChannel[_Awaited],
    ) -> None:
        ws, budget, options = self.ws, self.budget, self.options
        max_cost = budget.config.max_cost
        bucket = TokenBucket(options.rate_per_s, options.burst, trio.current_time())
        overloads = 0
        window_started = trio.current_time()
        while True:
            try:
                # Frames already parsed are taken without a scheduler pass each.
                frame = message_nowait(ws)
                if frame is None:
                    frame = await ws.get_message()
            except ConnectionClosed:
                return
            now = trio.current_time()
            if not bucket.take(now):
                if now - window_started >= options.overload_window_s:
                    window_started, overloads = now, 0
                overloads += 1
                if overloads > options.max_overloads:
                    await ws.aclose(1008, "message rate limit exceeded")
                    return
                await self._error("overloaded", "message rate limit exceeded; slow down")
                continue
            if self.role != "dispatcher":
                # The role first: an observer's `cost` is refused for what it
                # is, before any of its fields costs a check.
                kind = peek_type(frame)
                if kind is not None and not may(self.role, kind):
                    await self._error("forbidden", f"an {self.role} may not send `{kind}`")
                    continue
            try:
                request = decode(frame, max_cost=max_cost)
            except WireError as exc:
                await self._error(exc.code, exc.detail)
                continue
            kind = _KIND[type(request)]
            if not may(self.role, kind):
                await self._error("forbidden", f"an {self.role} may not send `{kind}`")
            elif isinstance(request, Cost):
                receipt = await budget.submit(request)
                try:
                    acks.send_nowait((request.dispatch_id, receipt))
                except trio.WouldBlock:
                    await acks.send((request.dispatch_id, receipt))  # window full: wait
            elif isinstance(request, CostsRequest):
                costs = request.costs
                batch = await budget.submit_many(costs)
                awaited: _Awaited = ([cost.dispatch_id for cost in costs], batch)
                try:
                    acks.send_nowait(awaited)
                except trio.WouldBlock:
                    await acks.send(awaited)  # window full: wait
            elif isinstance(request, CycleRequest):
                await budget.cycle()
            elif isinstance(request, HealthRequest):
                health = await budget.health()
                if request.id is not None:
                    health = msgspec.structs.replace(health, id=request.id)
                await self.writer.send(text_frame(encode(health)))
            elif isinstance(request, SubscribeRequest):
                if self.subscription is None:
                    self.subscription = await budget.open_subscription(paced=False)
                    nursery.start_soon(self._pusher, self.subscription)
            elif isinstance(request, AdmitRequest):
                admission = await budget.admit(request.dispatch_id, request.estimate_usd)
                await self.writer.send(text_frame(encode(admission)))

    async def _error(self, code: ErrorCode, detail: str) -> None:
        self.errors[code] += 1
        await self.writer.send(text_frame(WireError(code, detail).frame()))

    async def _ack_writer(self, acks: trio.MemoryReceiveChannel[_Awaited]) -> None:
        """Send acks in order, each once durable: every answer that is ready
        (durable, and after the ones before it) goes out in one write."""
        # A closing connection ends the writers quietly: raising here would
        # cancel the reader in the middle of its closing handshake, and the
        # peer would see an abnormal closure (1006) instead of our close code.
        writer = self.writer
        with contextlib.suppress(ConnectionClosed, trio.EndOfChannel):
            waiting: _Awaited | None = None
            while True:
                dispatch_id, receipt = waiting or await acks.receive()
                waiting = None
                frames: list[bytes] = []
                while True:
                    if not receipt.durable.is_set():
                        if frames:
                            waiting = dispatch_id, receipt  # send the ready ones first
                            break
                        await receipt.durable.wait()
                    if receipt.failed and not receipt.unavailable:
                        if frames:
                            await writer.send(b"".join(frames))
                        # Never acknowledged: the client must resend from here on.
                        await self.ws.aclose(1011, "service stopped; resend unacknowledged costs")
                        return
                    frames.append(self._answer(dispatch_id, receipt))
                    if len(frames) == ACK_BATCH:
                        break
                    try:
                        dispatch_id, receipt = acks.receive_nowait()
                    except trio.WouldBlock:
                        break
                await writer.send(b"".join(frames))

    def _answer(self, dispatch_id: str | list[str], receipt: CostReceipt) -> bytes:
        """The frame answering a durable cost (`ack`) or batch (`acks`), or the
        `unavailable` error of one that could not be made durable."""
        if receipt.unavailable:
            # Not counted, not acknowledged; the service runs on.
            if isinstance(dispatch_id, str):
                first = dispatch_id
                detail = (
                    f"cost {first!r} could not be made durable now (database and spill"
                    " file failing); it was not counted: resend it later with the same"
                    " dispatch_id"
                )
            else:
                first = dispatch_id[0]
                detail = (
                    f"the batch of {len(dispatch_id)} costs from {first!r} could not all"
                    " be made durable now (database and spill file failing); what was"
                    " not durable was not counted: resend the batch later (what did"
                    " count comes back as duplicates)"
                )
            self.errors["unavailable"] += 1
            return text_frame(WireError("unavailable", detail, first).frame())
        return text_frame(encode(_ack(dispatch_id, receipt)))

    async def _pusher(self, subscription: Subscription) -> None:
        pusher = Pusher(self.writer, subscription)
        with contextlib.suppress(ConnectionClosed):  # see _ack_writer
            await pusher.run(self.server.pushes, self.ws.aclose)

    async def _keepalive(self, session: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.options.ping_interval_s)
            with trio.move_on_after(self.options.ping_timeout_s):
                await self.ws.ping()
                continue
            log.info(
                "peer did not answer a ping in %.0fs; dropping it", self.options.ping_timeout_s
            )
            session.cancel()
            return
