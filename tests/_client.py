"""Black-box helpers for the acceptance tests: run ``budget-actor`` as a real
process, talk to it over WebSocket and HTTP, and read its database directly.

The service is driven only through its command line, its wire protocol, its
HTTP endpoints, its database rows (as ``PROTOCOL.md`` describes them) and its
public client library. :func:`connect` gives a raw-frame connection
(:class:`Conn`), for tests whose subject is the wire itself: exact frames,
hostile input, close codes. :func:`dispatcher` gives the project's own client
(:class:`budget_actor.client.BudgetClient`), for tests that only need costs
counted or figures read.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from budget_actor.client import BudgetClient

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
RECV_TIMEOUT = 5.0

_READY_RE = re.compile(r"wss?://(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+)/ws")


# --------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "budget_actor", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child, without any BUDGET_* leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass
class Service:
    proc: subprocess.Popen[str]
    stderr_path: Path
    ready_line: str = ""
    host: str = ""
    port: int = 0

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def http_base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            with trio.fail_after(timeout):
                line = await trio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise AssertionError(
                f"no ready line within {timeout}s; stderr:\n{self.stderr_text()}"
            ) from None
        if not line:
            code = await trio.to_thread.run_sync(self.proc.wait)
            raise AssertionError(
                f"service exited with {code} before its ready line; stderr:\n{self.stderr_text()}"
            )
        match = _READY_RE.search(line)
        assert match, f"ready line has no ws://HOST:PORT/ws: {line!r}"
        self.ready_line = line
        self.host = match["host"]
        self.port = int(match["port"])
        assert self.port != 0, f"ready line shows port 0: {line!r}"

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    async def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        def wait() -> int:
            return self.proc.wait(timeout)

        try:
            return await trio.to_thread.run_sync(wait)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"service did not exit within {timeout}s; stderr:\n{self.stderr_text()}"
            ) from None

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; the exit code."""
        self.signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def terminate_sync(self) -> None:
        """Teardown: SIGTERM, then SIGKILL after a timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Launcher:
    """Starts services and guarantees they are stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self._n = 0

    def spawn(self, database: str | None, *args: str, env: dict[str, str] | None = None) -> Service:
        self._n += 1
        stderr_path = self.workdir / f"serve-{self._n}.stderr"
        argv = ["serve", "--port", "0"]
        if database is not None:
            argv += ["--database", database]
        argv += list(args)
        with stderr_path.open("w") as err:
            proc = subprocess.Popen(
                command(*argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=self.workdir,
                env=child_env(env),
            )
        service = Service(proc, stderr_path)
        self.services.append(service)
        return service

    async def start(
        self, database: str | None, *args: str, env: dict[str, str] | None = None
    ) -> Service:
        service = self.spawn(database, *args, env=env)
        await service.wait_ready()
        return service

    def close(self) -> None:
        for service in self.services:
            service.terminate_sync()


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0, cwd: Path | None = None
) -> Finished:
    """Run ``budget-actor ARGS`` to completion (in a thread) and collect its output."""

    def run() -> Finished:
        done = subprocess.run(
            command(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(env),
            cwd=cwd,
        )
        return Finished(done.returncode, done.stdout, done.stderr)

    return await trio.to_thread.run_sync(run)


def free_closed_port() -> int:
    """A port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------
# WebSocket
# --------------------------------------------------------------------------


@dataclass
class Conn:
    ws: WebSocketConnection
    log: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        await self.ws.send_message(text)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next message (already-buffered ones first), parsed; logged."""
        if self._pending:
            return self._pending.pop(0)
        with trio.fail_after(timeout):
            raw = await self.ws.get_message()
        assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
        message = json.loads(raw)
        assert isinstance(message, dict), f"message is not an object: {raw!r}"
        assert "type" in message, f"message has no type: {raw!r}"
        self.log.append(message)
        return message

    async def recv_type(self, *types: str, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next message of one of ``types``; others stay buffered for later."""
        skipped: list[dict[str, Any]] = []
        try:
            with trio.fail_after(timeout):
                while True:
                    if self._pending:
                        message = self._pending.pop(0)
                    else:
                        message = await self.recv(timeout=timeout)
                    if message["type"] in types:
                        return message
                    skipped.append(message)
        finally:
            self._pending[:0] = skipped

    async def request(
        self, message: dict[str, Any] | str, reply: str, timeout: float = RECV_TIMEOUT
    ) -> dict[str, Any]:
        await self.send(message)
        return await self.recv_type(reply, timeout=timeout)

    async def cost(self, dispatch_id: str, usd: Any, **extra: Any) -> dict[str, Any]:
        """Send a cost; the ack (an ``error`` fails the test)."""
        if isinstance(usd, str) and usd.startswith("#"):
            # "#0.045864": a JSON *number* written exactly as given.
            body = json.dumps({"type": "cost", "dispatch_id": dispatch_id, **extra})
            text = body[:-1] + f', "usd": {usd[1:]}}}'
            await self.send(text)
        else:
            await self.send({"type": "cost", "dispatch_id": dispatch_id, "usd": usd, **extra})
        message = await self.recv_type("ack", "error")
        assert message["type"] == "ack", f"cost {dispatch_id} {usd!r} refused: {message}"
        assert message["dispatch_id"] == dispatch_id, message
        return message

    async def health(self, id: str | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "health"}
        if id is not None:
            message["id"] = id
        reply = await self.request(message, "health")
        return reply

    async def subscribe(self) -> dict[str, Any]:
        """Subscribe; the immediate spend snapshot."""
        await self.send({"type": "subscribe"})
        return await self.recv_type("spend")

    async def spend_at(self, seq: int, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """Read pushes until a spend with ``seq`` at least ``seq``; that spend."""
        with trio.fail_after(timeout):
            while True:
                message = await self.recv_type("spend", timeout=timeout)
                if message["seq"] >= seq:
                    return message

    async def drain(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Everything that arrives until ``quiet`` seconds pass with nothing."""
        got = list(self._pending)
        self._pending.clear()
        while True:
            with trio.move_on_after(quiet):
                got.append(await self.recv(timeout=quiet + 1))
                continue
            return got

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.log if m["type"] == type_]


@asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[Conn]:
    kwargs.setdefault("connect_timeout", 10)
    kwargs.setdefault("disconnect_timeout", 5)
    async with open_websocket_url(url, **kwargs) as ws:
        yield Conn(ws)


@asynccontextmanager
async def dispatcher(
    url: str, token: str | None = None, **kwargs: Any
) -> AsyncIterator[BudgetClient]:
    """The client library, connected to ``url`` (see the module docstring)."""
    async with BudgetClient(url, token, **kwargs) as client:
        yield client


# --------------------------------------------------------------------------
# Raw WebSocket over a socket that stops reading
# --------------------------------------------------------------------------


def frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, length: int | None = None
) -> bytes:
    """One masked client frame; ``length`` lets the header lie about the payload."""
    n = len(payload) if length is None else length
    header = bytearray([(0x80 if fin else 0) | opcode])
    if n < 126:
        header.append(0x80 | n)
    elif n < 1 << 16:
        header.append(0x80 | 126)
        header += n.to_bytes(2, "big")
    else:
        header.append(0x80 | 127)
        header += n.to_bytes(8, "big")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(header) + mask + masked


class StuckClient:
    """A WebSocket client on a raw socket with a tiny receive buffer (or the
    system's default, with ``receive_buffer=None``), which completes the
    handshake and then never reads again."""

    def __init__(self, host: str, port: int, receive_buffer: int | None = 1024) -> None:
        self.host = host
        self.port = port
        self.sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if receive_buffer is not None:
            try:
                self.sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
            except OSError:
                pass

    async def open(self) -> None:
        await self.sock.connect((self.host, self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        await self.send_raw(request)
        # Read only the handshake response, byte by byte, so nothing after it
        # is consumed.
        head = b""
        with trio.fail_after(10):
            while not head.endswith(b"\r\n\r\n"):
                chunk = await self.sock.recv(1)
                assert chunk, f"closed during handshake: {head!r}"
                head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    async def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(frame(json.dumps(message).encode()))

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_get(url: str, timeout: float = 10.0) -> HttpReply:
    def get() -> HttpReply:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                headers = {k.lower(): v for k, v in reply.headers.items()}
                return HttpReply(reply.status, headers, reply.read())
        except urllib.error.HTTPError as err:
            headers = {k.lower(): v for k, v in err.headers.items()}
            return HttpReply(err.code, headers, err.read())

    return await trio.to_thread.run_sync(get)


# --------------------------------------------------------------------------
# The database, read directly
# --------------------------------------------------------------------------


def _sqlite_path(url: str) -> str:
    assert url.startswith("sqlite:///"), url
    return url[len("sqlite:///") :]


@dataclass
class Row:
    type: str
    name: str
    body: dict[str, Any]
    created_at: Any
    updated_at: Any


def _fetch_rows(url: str, where: str, params: Iterable[Any]) -> list[Row]:
    sql = f"SELECT type, name, body, created_at, updated_at FROM quilt_patches {where}"
    if url.startswith("sqlite:"):
        path = _sqlite_path(url)
        if not Path(path).exists():
            return []
        con = sqlite3.connect(path, timeout=5)
        try:
            try:
                rows = con.execute(sql.replace("%s", "?"), tuple(params)).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
        finally:
            con.close()
        return [Row(t, n, json.loads(b), c, u) for t, n, b, c, u in rows]
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as pg:
        exists = pg.execute("SELECT to_regclass('quilt_patches')").fetchone()
        if exists is None or exists[0] is None:
            return []
        found = pg.execute(sql.encode(), tuple(params)).fetchall()
        return [Row(t, n, b, c, u) for t, n, b, c, u in found]


async def fetch_row(url: str, type_: str, name: str) -> Row | None:
    rows = await trio.to_thread.run_sync(
        _fetch_rows, url, "WHERE type = %s AND name = %s", (type_, name)
    )
    return rows[0] if rows else None


async def fetch_all(url: str) -> list[Row]:
    return await trio.to_thread.run_sync(_fetch_rows, url, "ORDER BY type, name", ())


async def wait_row(
    url: str, type_: str, name: str, until: Any = None, timeout: float = 10.0
) -> Row:
    """Poll until the row exists (and ``until(row)`` holds, if given)."""
    last: Row | None = None
    with trio.move_on_after(timeout):
        while True:
            last = await fetch_row(url, type_, name)
            if last is not None and (until is None or until(last)):
                return last
            await trio.sleep(0.05)
    raise AssertionError(f"no row ({type_!r}, {name!r}) within {timeout}s; last seen: {last}")


def sql_setup(url: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Run statements directly against the test database (before a service starts)."""
    if url.startswith("sqlite:"):
        con = sqlite3.connect(_sqlite_path(url))
        try:
            for sql, params in statements:
                con.execute(sql.replace("%s", "?"), params)
            con.commit()
        finally:
            con.close()
        return
    with psycopg.connect(url, autocommit=True) as pg:
        for sql, params in statements:
            pg.execute(sql.encode(), params)
