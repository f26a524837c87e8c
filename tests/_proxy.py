"""A TCP proxy that a test can cut and restore, or stall and resume: a database
outage on demand, without touching the machine's shared PostgreSQL server."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import trio


class CuttableProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.down = False
        self._live: set[trio.CancelScope] = set()
        # Set while bytes flow; a stall replaces it with an unset one.
        self._flowing = trio.Event()
        self._flowing.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until :meth:`restore`."""
        self.down = True
        for scope in self._live:
            scope.cancel()

    def restore(self) -> None:
        self.down = False

    def stall(self) -> None:
        """Keep every connection open and accept new ones, but pass no byte
        on until :meth:`resume`: a server that accepts and never answers. The
        kernel still acknowledges what the client sends, so no TCP timeout
        fires on the client's side."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.down:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._live.add(scope)
            try:
                await self._flowing.wait()
                upstream = await trio.open_tcp_stream(*self.target)
                async with upstream, client, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._live.discard(scope)
        await trio.aclose_forcefully(client)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


def target_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432
