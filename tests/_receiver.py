"""A local webhook receiver for the tests: an HTTP/1.1 server (h11 on trio)
whose behaviour the test switches at will.

``mode`` decides how the next request is answered: ``"ok"`` (200), ``"fail"``
(500), ``"hang"`` (read the request, never answer, keep the connection open)
or ``"close"`` (read the request, close without a word). Every request is
recorded, whatever the mode.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

import h11
import trio

Mode = Literal["ok", "fail", "hang", "close"]


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    # The status it was answered with (None: not answered).
    status: int | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    mode: Mode = "ok"
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    # Requests being held open right now (mode "hang").
    hanging: int = 0

    def url(self, path: str = "/hooks/T000/B000/secret-token?channel=budget") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def run(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled (HTTPS with ``ssl_context``)."""
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[Any]] = list(tcp)
        if ssl_context is not None:
            listeners = [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def answered(self, status: int = 200) -> list[Request]:
        return [r for r in self.requests if r.status == status]

    async def wait_for(self, check: Any, timeout: float = 15.0, what: str = "") -> None:
        with trio.move_on_after(timeout):
            while not check():
                await trio.sleep(0.02)
            return
        raise AssertionError(
            f"receiver: not {what or check} within {timeout}s; got"
            f" {[(r.target, r.status) for r in self.requests]}"
        )

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                elif isinstance(event, h11.Request):
                    request = Request(
                        event.method.decode(),
                        event.target.decode(),
                        {k.decode().lower(): v.decode() for k, v in event.headers},
                        b"",
                    )
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            request.body = body
            self.requests.append(request)
            mode = self.mode
            if mode == "hang":
                self.hanging += 1
                try:
                    await trio.sleep_forever()
                finally:
                    self.hanging -= 1
            if mode == "close":
                return
            status = 200 if mode == "ok" else 500
            reply = b"ok" if status == 200 else b"receiver failing on purpose"
            data = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[("content-length", str(len(reply))), ("connection", "close")],
                )
            )
            data = (data or b"") + (conn.send(h11.Data(data=reply)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            request.status = status
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)
