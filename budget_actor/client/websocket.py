"""A small WebSocket client: wsproto (sans I/O) over AnyIO streams.

It runs on asyncio and on trio alike, because it only uses AnyIO's streams
and primitives; wsproto does the framing. It does what the budget protocol
needs and no more: text messages, ping/pong, the closing handshake, a bearer
token, extra headers, TLS (``wss://``), and a bound on incoming messages.

:func:`connect` opens a connection; :class:`WebSocket` sends and receives
text. A closed or broken connection raises :class:`ConnectionClosed` (with
the close code, 1006 when the TCP connection simply broke). A refused
handshake raises :class:`HandshakeRejected` with the HTTP status.
"""

from __future__ import annotations

import collections
import ssl
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

# Largest message we accept from the service. Its biggest message (health) is
# about a kilobyte; anything near this bound is not the budget service.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Bytes asked of the stream per read: one TCP window's worth of frames.
READ_BYTES = 65536
# A refused handshake's body is read up to this size, for the error message.
MAX_REJECT_BODY = 4096
# How long the closing handshake may take before the stream is just closed.
CLOSE_TIMEOUT_S = 2.0
# Close code for "the connection broke without a close frame" (RFC 6455).
ABNORMAL_CLOSURE = 1006


class ConnectionClosed(Exception):
    """The WebSocket is closed: by the peer (``code`` from its close frame),
    by us, or because the TCP connection broke (``code`` 1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{' ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        text = body.decode("utf-8", "replace").strip()
        super().__init__(f"HTTP {status}{': ' + text if text else ''}")
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class WebSocket:
    """One open client connection. ``send`` may be called from several tasks
    at once; ``receive`` from one task at a time."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        ws: WSConnection,
        max_message_bytes: int,
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._ready: collections.deque[str] = collections.deque()
        # When the peer last sent anything (a pong counts): a keepalive reads it.
        self.last_activity = anyio.current_time()
        self._send_lock = anyio.Lock()
        self._parts: list[str] = []
        self._size = 0
        self._max = max_message_bytes
        self._closed: ConnectionClosed | None = None

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection closed, or None while it is open."""
        return self._closed

    async def send(self, text: str) -> None:
        """Send one text message. Raises :class:`ConnectionClosed` if the
        connection is (or becomes) closed."""
        if self._closed is not None:
            raise self._closed
        await self._write(TextMessage(data=text))

    async def receive(self) -> str:
        """The next text message. Answers pings and the peer's close frame on
        the way. Raises :class:`ConnectionClosed` when the connection ends."""
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._closed is not None:
                raise self._closed
            try:
                data = await self._stream.receive(READ_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            except (OSError, ssl.SSLError) as exc:
                self._closed = ConnectionClosed(ABNORMAL_CLOSURE, str(exc))
                raise self._closed from None
            if data:
                self.last_activity = anyio.current_time()
            try:
                self._ws.receive_data(data or None)
                await self._handle_events(self._ws.events())
            except (RemoteProtocolError, LocalProtocolError) as exc:
                self._closed = ConnectionClosed(ABNORMAL_CLOSURE, f"protocol error: {exc}")
                await self._abort()
                raise self._closed from None

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping (the pong arrives as traffic; receive() swallows it)."""
        if self._closed is not None:
            raise self._closed
        await self._write(Ping(payload=payload))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake and close the stream (bounded in time;
        never raises for a connection that is already broken)."""
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
            if self._ws.state is ConnectionState.OPEN:
                try:
                    await self._write(CloseConnection(code=code, reason=reason), closing=True)
                except ConnectionClosed:
                    pass
        await self._abort()

    async def _handle_events(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, TextMessage):
                self._size += len(event.data)
                if self._size > self._max:
                    self._closed = ConnectionClosed(1009, "message too big")
                    await self._write(CloseConnection(code=1009), closing=True)
                    await self._abort()
                    raise self._closed
                self._parts.append(event.data)
                if event.message_finished:
                    self._ready.append("".join(self._parts))
                    self._parts.clear()
                    self._size = 0
            elif isinstance(event, Ping):
                await self._write(event.response())
            elif isinstance(event, CloseConnection):
                if self._closed is None:
                    self._closed = ConnectionClosed(event.code, event.reason or "")
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._write(event.response(), closing=True)
                await self._abort()
            elif isinstance(event, BytesMessage):
                pass  # the protocol is text; a binary message carries nothing for us

    async def _write(
        self, event: TextMessage | Ping | Pong | CloseConnection, *, closing: bool = False
    ) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            if closing:
                return
            raise self._closed or ConnectionClosed(ABNORMAL_CLOSURE) from None
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                if closing:
                    return
                if self._closed is None:
                    self._closed = ConnectionClosed(ABNORMAL_CLOSURE, str(exc))
                raise self._closed from None

    async def _abort(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._stream.aclose()
            except (OSError, anyio.BrokenResourceError, ssl.SSLError):
                pass


def _target(url: str) -> tuple[str, str, int, str, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in URL: {url!r}")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host = parts.hostname
    header_host = f"[{host}]" if ":" in host else host
    return host, f"{header_host}:{port}", port, path, tls


async def connect(
    url: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    headers: Sequence[tuple[str, str]] = (),
    connect_timeout: float = 10.0,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> WebSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``).

    ``token`` goes out as ``Authorization: Bearer TOKEN``. ``ssl_context``
    defaults to the system's trust store for ``wss://``. The TCP connection,
    TLS and the handshake together must finish within ``connect_timeout`` seconds
    (``TimeoutError`` otherwise). Raises :class:`HandshakeRejected` for an
    HTTP answer other than 101, ``OSError`` when the host cannot be reached,
    ``ValueError`` for a URL that is not ``ws://`` or ``wss://``.
    """
    host, host_header, port, target, tls = _target(url)
    extra = [(name.encode(), value.encode()) for name, value in headers]
    if token:
        extra.append((b"authorization", f"Bearer {token}".encode()))
    with anyio.fail_after(connect_timeout):
        stream: anyio.abc.ByteStream
        if tls:
            context = ssl_context or ssl.create_default_context()
            stream = await anyio.connect_tcp(
                host, port, ssl_context=context, tls_hostname=host, tls_standard_compatible=False
            )
        else:
            stream = await anyio.connect_tcp(host, port)
        try:
            return await _handshake(stream, host_header, target, extra, max_message_bytes)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise


async def _handshake(
    stream: anyio.abc.ByteStream,
    host: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    max_message_bytes: int,
) -> WebSocket:
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send(ws.send(Request(host=host, target=target, extra_headers=headers)))
    rejected: RejectConnection | None = None
    body = b""
    while True:
        try:
            data = await stream.receive(READ_BYTES)
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            if rejected is not None:
                headers = list(rejected.headers)
                raise HandshakeRejected(rejected.status_code, headers, body) from None
            raise ConnectionClosed(ABNORMAL_CLOSURE, "closed during the handshake") from exc
        try:
            ws.receive_data(data)
            events = list(ws.events())
        except RemoteProtocolError as exc:
            raise ConnectionClosed(ABNORMAL_CLOSURE, f"bad handshake answer: {exc}") from None
        for index, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                socket = WebSocket(stream, ws, max_message_bytes)
                # Frames that came in the same read as the 101.
                await socket._handle_events(events[index + 1 :])
                return socket
            if isinstance(event, RejectConnection):
                rejected = event
                if not event.has_body:
                    raise HandshakeRejected(event.status_code, list(event.headers), b"")
            elif isinstance(event, RejectData) and rejected is not None:
                body = (body + event.data)[:MAX_REJECT_BODY]
                if event.body_finished:
                    raise HandshakeRejected(rejected.status_code, list(rejected.headers), body)
