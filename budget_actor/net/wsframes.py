"""Pre-framed WebSocket writes and reads, one level below trio-websocket's API.

trio-websocket sends every message through wsproto and writes it with one
``send_all`` under the connection's stream lock: per message a wsproto event,
a UTF-8 round trip, a lock and at least two scheduler passes. What the
service sends most, spend states (the same bytes for every subscriber) and
acks (often many ready at once), is framed here instead, once, and written to
the same stream under the same lock. On the way in, :func:`eager_receive`
lets trio-websocket's reader queue the frames it parsed without a scheduler
pass per frame, and :func:`message_nowait` takes them without one either.

Why writing beside trio-websocket is safe:

* The server never negotiates an extension (trio-websocket's ``accept``
  offers none, and :class:`FrameWriter` checks wsproto's frame protocol), so
  a server frame is just FIN + opcode, the length and the unmasked payload
  (RFC 6455, section 5.2).
* Every byte trio-websocket writes goes through ``WebSocketConnection._send``
  under ``_stream_lock``. Writing while holding that lock, or synchronously
  while nobody holds it (no task can take it in between), never interleaves
  two frames.
* A message is always one whole FIN frame, so wsproto's fragmentation state
  is never in the middle of a message.
* Nothing is written once the connection is closing: trio-websocket sets
  ``_close_reason`` before it sends a close frame.

The trio-websocket internals used (0.12): ``WebSocketConnection._stream``,
``._stream_lock``, ``._close_reason``, ``._recv_channel``, ``._send_channel``,
``._abort_web_socket()`` and ``._wsproto`` (wsproto 1.x: ``connection._proto``).
``tests/test_wsframes.py`` checks the frames against a real trio-websocket
client and the behaviour this module relies on.
"""

from __future__ import annotations

import array
import fcntl
import os
import sys
import termios

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

# A synchronous write happens only if the bytes the peer has not yet
# acknowledged plus the new ones stay within this. Far below any TCP send
# buffer (at least 4 KiB, 16 KiB by default on Linux), so the kernel takes
# such a write whole; a spend state is ~250 bytes, so a peer may be a few
# pushes behind (delayed ACKs) and still be written to directly.
DIRECT_LIMIT = 2048
# Linux only: the ioctl that reads how much a TCP socket has not had
# acknowledged. Elsewhere every write takes the awaited path.
_OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


def text_frame(payload: bytes) -> bytes:
    """One server-to-client text frame (FIN, unmasked) around UTF-8 ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class _EagerQueue:
    """trio-websocket's queue of received messages, seen from its reader task:
    a message is queued without a scheduler pass while the queue has room."""

    __slots__ = ("_inner",)

    def __init__(self, inner: trio.MemorySendChannel[str | bytes]) -> None:
        self._inner = inner

    async def send(self, message: str | bytes) -> None:
        try:
            self._inner.send_nowait(message)
        except trio.WouldBlock:
            await self._inner.send(message)  # full: wait, as trio-websocket does

    async def aclose(self) -> None:
        await self._inner.aclose()


def eager_receive(ws: WebSocketConnection) -> None:
    """Let the connection's reader task queue each parsed message without a
    scheduler pass (trio's ``send`` makes one even when there is room).

    A pipelining client's frames arrive many per network read; trio-websocket
    would hand them over one scheduler pass each, and every pass also runs
    every other runnable task. Its reader still waits (a checkpoint) when the
    queue is full and at every network read, so it never runs for long.
    Closing is unchanged: the queue is the same channel underneath.
    """
    ws._send_channel = _EagerQueue(ws._send_channel)  # type: ignore[assignment]


def message_nowait(ws: WebSocketConnection) -> str | bytes | None:
    """A message trio-websocket has already received, or None if there is none
    yet; unlike ``get_message`` it never passes through the scheduler.

    Raises ``ConnectionClosed`` once the connection is closed and drained, as
    ``get_message`` does.
    """
    try:
        message: str | bytes = ws._recv_channel.receive_nowait()
    except trio.WouldBlock:
        return None
    except (trio.EndOfChannel, trio.ClosedResourceError):
        raise ConnectionClosed(ws._close_reason) from None
    return message


class FrameWriter:
    """Writes pre-built frames to one server-side connection.

    ``transport`` is the plain TCP stream beneath the connection, if it is one
    (not TLS): only then can :meth:`write_now` write without waiting.
    """

    def __init__(self, ws: WebSocketConnection, transport: trio.abc.Stream | None) -> None:
        self._ws = ws
        self._lock = ws._stream_lock
        self._stream = ws._stream
        connection = ws._wsproto.connection
        if connection is None or connection._proto.extensions:
            raise ValueError("not an open WebSocket without extensions; frames would differ")
        self._socket: trio.socket.SocketType | None = None
        if _OUTQ is not None and isinstance(transport, trio.SocketStream):
            self._socket = transport.socket
        self._outq = array.array("i", [0])

    @property
    def closed(self) -> bool:
        return self._ws._close_reason is not None

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` (whole frames) at once if that needs no waiting.

        Returns True when the caller is done with ``data``: it was written
        whole, or (should the kernel take only part of it) the connection was
        cut, since a partial frame cannot be completed without waiting and
        nothing else may be written after it. Returns False, having written
        nothing, when the connection is closing, another write holds the
        lock, the transport is not plain TCP, the peer is behind (its
        unacknowledged bytes and ``data`` exceed :data:`DIRECT_LIMIT`) or the
        socket is full or broken; the caller then uses :meth:`send` from a
        task that may wait.
        Never awaits, so no other task runs in between.
        """
        sock = self._socket
        size = len(data)
        if (
            sock is None
            or size > DIRECT_LIMIT
            or self._ws._close_reason is not None
            or self._lock.locked()
        ):
            return False
        fd = sock.fileno()
        if fd < 0:
            return False
        outq = self._outq
        try:
            fcntl.ioctl(fd, _OUTQ, outq)  # type: ignore[arg-type]
            if outq[0] + size > DIRECT_LIMIT:
                return False
            sent = os.write(fd, data)
        except OSError:
            # Would block, or broken: the awaited path waits, or finds out
            # and closes the connection the way trio-websocket does.
            return False
        if sent < size:
            # The peer's buffers filled up between the check and the write.
            # trio wakes the connection's reader, which ends the session.
            sock.close()
        return True

    async def send(self, data: bytes) -> None:
        """Write ``data`` (whole frames) under the connection's lock, waiting
        for the lock and for the socket as needed.

        Raises ``ConnectionClosed`` if the connection is closed or closing,
        or breaks while writing (then aborted, as ``send_message`` does).
        Cancellation may leave a frame half written; the connection is then
        unusable, as with trio-websocket's own sends.
        """
        ws = self._ws
        if ws._close_reason is not None:
            raise ConnectionClosed(ws._close_reason)
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if ws._close_reason is not None:
                raise ConnectionClosed(ws._close_reason)
            sent = self._write_some(data)
            if sent < len(data):
                await self._stream.send_all(memoryview(data)[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws._close_reason) from None
        finally:
            lock.release()

    def _write_some(self, data: bytes) -> int:
        """As much of ``data`` as the socket takes now (the lock is held)."""
        sock = self._socket
        if sock is None:
            return 0
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was already closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError from exc
