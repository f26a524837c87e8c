"""Hostile clients, written from PROTOCOL.md ("Access", the error codes, the
frame limit) and issue 5 (limits, containment, TLS).

Every scenario runs against a real ``budget-actor serve`` process and talks to
it only over the network. After each one the service must still answer a fresh
client. The one exception is containment, which needs a fault injected into a
connection's handler and so runs the server in process.

Raw clients (:class:`RawWS`, :func:`raw_http`) do what a polite library will
not: invalid UTF-8 in a text frame, a frame header that lies about its length,
a request pipelined behind a refused handshake, a peer that never answers a
ping.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import re
import secrets
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from budget_actor import make_config, open_budget
from budget_actor.net.server import ServerOptions, serve

from ._client import Conn, Launcher, Service, connect, frame, http_get, run_cli

pytestmark = pytest.mark.slow

DISPATCHER = "disp-" + secrets.token_urlsafe(24)
OBSERVER = "obs-" + secrets.token_urlsafe(24)
WRONG = "wrong-" + secrets.token_urlsafe(24)
TOKENS = {"BUDGET_DISPATCHER_TOKEN": DISPATCHER, "BUDGET_OBSERVER_TOKEN": OBSERVER}
CONTRACT_CODES = {
    "invalid_message",
    "invalid_cost",
    "forbidden",
    "unauthorized",
    "too_large",
    "overloaded",
}
FRAME_LIMIT = 64 * 1024


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


# --------------------------------------------------------------------------
# Raw clients
# --------------------------------------------------------------------------


class Closed(Exception):
    """The service closed the WebSocket (``code``) or the TCP stream (``code`` None)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def upgrade_request(
    host: str, port: int, target: str = "/ws", headers: list[tuple[str, str]] | None = None
) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(head: bytes) -> int:
    """The status code of an HTTP response head; 0 if there is none."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0
    return int(parts[1])


async def read_until_eof(stream: trio.abc.Stream, timeout: float) -> bytes:
    """Everything the service sends until it closes; fails after ``timeout``."""
    data = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # a reset counts as closed
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk


async def raw_http(host: str, port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a fresh TCP connection; the whole reply, up to EOF."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        return await read_until_eof(stream, timeout)


class RawWS:
    """A WebSocket client on a bare TCP stream: sends any frame, reads the
    service's frames as they are, and answers pings only if told to."""

    def __init__(self, stream: trio.SocketStream, rest: bytes, *, answer_pings: bool) -> None:
        self.stream = stream
        self.buffer = bytearray(rest)
        self.answer_pings = answer_pings
        self.pings = 0

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        token: str | None = DISPATCHER,
        *,
        answer_pings: bool = True,
    ) -> RawWS:
        stream = await trio.open_tcp_stream(host, port)
        headers = [("Authorization", f"Bearer {token}")] if token else []
        await stream.send_all(upgrade_request(host, port, headers=headers))
        head = bytearray()
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                assert chunk, f"closed during the handshake: {bytes(head)!r}"
                head += chunk
        end = head.index(b"\r\n\r\n") + 4
        assert status_of(bytes(head)) == 101, bytes(head[:end])
        return cls(stream, bytes(head[end:]), answer_pings=answer_pings)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_frame(self, payload: bytes, opcode: int = 0x1, **kwargs: Any) -> None:
        await self.send(frame(payload, opcode, **kwargs))

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_frame(json.dumps(message).encode())

    async def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                raise Closed(None, "the service closed the TCP connection")
            self.buffer += chunk

    async def _take(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def recv_frame(self) -> tuple[int, bytes]:
        """The next frame from the service (opcode, payload)."""
        first, second = await self._take(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self._take(2), "big")
        elif length == 127:
            length = int.from_bytes(await self._take(8), "big")
        mask = await self._take(4) if second & 0x80 else b""
        payload = await self._take(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return first & 0x0F, payload

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message; raises :class:`Closed` on a close frame or EOF."""
        with trio.fail_after(timeout):
            while True:
                opcode, payload = await self.recv_frame()
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    raise Closed(code, payload[2:].decode(errors="replace"))
                if opcode == 0x9:
                    self.pings += 1
                    if self.answer_pings:
                        await self.send_frame(payload, 0xA)
                    continue
                if opcode == 0x1:
                    message: dict[str, Any] = json.loads(payload)
                    return message

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Read until the service closes; its close code (None: no close frame)."""
        try:
            while True:
                await self.recv(timeout)
        except Closed as closed:
            return closed.code

    async def aclose(self) -> None:
        await self.stream.aclose()


# --------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service with both tokens, shared by the tests that only need the
    defaults (it must survive all of them). At the end it must stop cleanly,
    with no connection failure logged and no token in its log."""
    workdir = tmp_path_factory.mktemp("guarded")
    launch = Launcher(workdir)
    try:
        service = launch.spawn(f"sqlite:///{workdir / 'budget.db'}", env=TOKENS)
        trio.run(service.wait_ready)
        yield service
        assert service.proc.poll() is None, "the shared service died:\n" + service.stderr_text()
        service.signal(signal.SIGTERM)
        assert service.proc.wait(15) == 0, service.stderr_text()
        log = service.stderr_text()
        for secret in (DISPATCHER, OBSERVER, WRONG):
            assert secret not in log
        unexpected = unexpected_failures(log)
        assert not unexpected, "\n".join(unexpected)
    finally:
        launch.close()


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d", re.MULTILINE)
_RAISED = re.compile(
    r"^[\s|]*([A-Za-z_][\w.]*(?:Error|Exception|Closed|Group|Exit))\b", re.MULTILINE
)
# A peer that leaves while the service writes to it: reported separately by
# test_a_peer_that_vanishes_mid_conversation_is_not_reported_as_a_failure.
_PEER_GONE = {
    "ExceptionGroup",
    "BaseExceptionGroup",
    "trio_websocket._impl.ConnectionClosed",
    "trio.BrokenResourceError",
    "trio.ClosedResourceError",
}


def unexpected_failures(log: str) -> list[str]:
    """Log records at ERROR or with a traceback, other than a peer going away."""
    starts = [m.start() for m in _RECORD.finditer(log)] + [len(log)]
    found = []
    for begin, end in itertools.pairwise(starts):
        record = log[begin:end]
        if " ERROR " not in record.split("\n", 1)[0] and "Traceback" not in record:
            continue
        raised = set(_RAISED.findall(record))
        if not raised or not raised <= _PEER_GONE:
            found.append(record)
    return found


@asynccontextmanager
async def as_dispatcher(service: Service) -> AsyncIterator[Conn]:
    async with connect(service.ws_url, extra_headers=bearer(DISPATCHER)) as conn:
        yield conn


@asynccontextmanager
async def as_observer(service: Service) -> AsyncIterator[Conn]:
    async with connect(service.ws_url, extra_headers=bearer(OBSERVER)) as conn:
        yield conn


async def state(service: Service, token: str | None = DISPATCHER) -> dict[str, Any]:
    """Health over a fresh connection (so: the service is up)."""
    headers = bearer(token) if token else None
    async with connect(service.ws_url, extra_headers=headers) as conn:
        return await conn.health("state")


def counters(health: dict[str, Any]) -> tuple[Decimal, int, int]:
    """What a bad message must not change: spend, cycles, alerts sent."""
    return Decimal(health["daily_spend"]), health["cycle_count"], len(health["alerts_sent"])


async def spend_and_dispatches(service: Service) -> tuple[Decimal, int]:
    async with as_observer(service) as conn:
        spend = await conn.subscribe()
        return Decimal(spend["daily_spend"]), int(spend["dispatches"])


async def assert_up(service: Service, token: str | None = DISPATCHER) -> None:
    assert service.proc.poll() is None, "service died:\n" + service.stderr_text()
    reply = await http_get(service.http_base + "/health")
    assert reply.status == 200, reply
    await state(service, token)


# --------------------------------------------------------------------------
# Access
# --------------------------------------------------------------------------


REFUSED_HANDSHAKES = [
    ("no token", "/ws", []),
    ("wrong bearer", "/ws", [("Authorization", f"Bearer {WRONG}")]),
    ("wrong ?token=", f"/ws?token={WRONG}", []),
    ("empty bearer", "/ws", [("Authorization", "Bearer ")]),
    ("empty ?token=", "/ws?token=", []),
    ("not a bearer", "/ws", [("Authorization", f"Basic {DISPATCHER}")]),
    ("token prefix", "/ws", [("Authorization", f"Bearer {DISPATCHER[:-1]}")]),
    ("token plus a byte", "/ws", [("Authorization", f"Bearer {DISPATCHER}x")]),
    ("token in another header", "/ws", [("X-Token", DISPATCHER)]),
]


@pytest.mark.parametrize(
    ("name", "target", "headers"), [pytest.param(*case, id=case[0]) for case in REFUSED_HANDSHAKES]
)
async def test_missing_or_wrong_token_gets_401_at_the_handshake(
    guarded: Service, name: str, target: str, headers: list[tuple[str, str]]
) -> None:
    before = await spend_and_dispatches(guarded)
    # A cost pipelined right behind the request must never be read.
    cost = json.dumps({"type": "cost", "dispatch_id": f"sneak-{name}", "usd": "1"})
    request = upgrade_request(guarded.host, guarded.port, target, headers)
    reply = await raw_http(guarded.host, guarded.port, request + frame(cost.encode()))
    assert status_of(reply) == 401, reply[:200]
    assert await spend_and_dispatches(guarded) == before
    await assert_up(guarded)


async def test_an_oversized_request_head_gets_431_and_changes_nothing(guarded: Service) -> None:
    """h11's own verdict (error_status_hint): Request Header Fields Too Large,
    not a generic 400; garbage still gets 400; the service stays up."""
    before = await spend_and_dispatches(guarded)
    padding = "x" * 64 * 1024  # far over the 16 KiB head limit
    request = upgrade_request(
        guarded.host, guarded.port, headers=[("Authorization", f"Bearer {DISPATCHER}")]
    )
    big = request.replace(b"\r\n\r\n", f"\r\nX-Padding: {padding}\r\n\r\n".encode(), 1)
    reply = await raw_http(guarded.host, guarded.port, big)
    assert status_of(reply) == 431, reply[:200]
    assert b"request header fields too large" in reply
    garbage = await raw_http(guarded.host, guarded.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(garbage) == 400, garbage[:200]
    assert await spend_and_dispatches(guarded) == before
    await assert_up(guarded)


async def test_a_refused_client_library_sees_401(guarded: Service) -> None:
    for headers in (None, bearer(WRONG)):
        with pytest.raises(ConnectionRejected) as refused:
            async with connect(guarded.ws_url, extra_headers=headers):
                pass
        assert refused.value.status_code == 401
    with pytest.raises(ConnectionRejected) as refused:
        async with connect(f"{guarded.ws_url}?token={WRONG}"):
            pass
    assert refused.value.status_code == 401


@pytest.mark.parametrize("how", ["header", "query"])
async def test_the_dispatcher_token_may_do_everything(guarded: Service, how: str) -> None:
    url, headers = guarded.ws_url, None
    if how == "header":
        headers = bearer(DISPATCHER)
    else:
        url += f"?token={DISPATCHER}"
    before = await state(guarded)
    async with connect(url, extra_headers=headers) as conn:
        spend = await conn.subscribe()
        ack = await conn.cost(f"dispatcher-{how}", "0.25")
        assert ack["duplicate"] is False
        assert (await conn.spend_at(ack["seq"]))["seq"] >= ack["seq"]
        await conn.send({"type": "cycle"})
        after = await conn.health(how)
    assert after["id"] == how
    assert Decimal(after["daily_spend"]) == Decimal(before["daily_spend"]) + Decimal("0.25")
    assert after["cycle_count"] == before["cycle_count"] + 1
    assert spend["type"] == "spend"


@pytest.mark.parametrize("how", ["header", "query"])
async def test_an_observer_may_subscribe_and_ask_health(guarded: Service, how: str) -> None:
    url, headers = guarded.ws_url, None
    if how == "header":
        headers = bearer(OBSERVER)
    else:
        url += f"?token={OBSERVER}"
    async with connect(url, extra_headers=headers) as observer:
        first = await observer.subscribe()
        health = await observer.health("obs")
        assert health["id"] == "obs" and health["type"] == "health"
        async with as_dispatcher(guarded) as dispatcher:
            ack = await dispatcher.cost(f"seen-by-observer-{how}", "0.5")
        pushed = await observer.spend_at(ack["seq"])
        assert Decimal(pushed["daily_spend"]) == Decimal(first["daily_spend"]) + Decimal("0.5")


@pytest.mark.parametrize(
    "message",
    [
        {"type": "cost", "dispatch_id": "observer-cost", "usd": "2.50"},
        {"type": "cost", "dispatch_id": "observer-cost-n", "usd": 1, "model": "m"},
        {"type": "cycle"},
        {"type": "admit", "dispatch_id": "observer-admit", "estimate_usd": "1"},
    ],
)
async def test_an_observer_that_sends_cost_or_cycle_is_forbidden_and_nothing_changes(
    guarded: Service, message: dict[str, Any]
) -> None:
    before = await state(guarded)
    spend_before = await spend_and_dispatches(guarded)
    async with as_observer(guarded) as observer:
        error = await observer.request(message, "error")
        assert error["code"] == "forbidden", error
        assert message["type"] in error["detail"], error
        # The connection stays open and usable.
        assert (await observer.health("still"))["id"] == "still"
        extra = await observer.drain(quiet=0.1)
        assert not [m for m in extra if m["type"] in ("ack", "admission")], extra
    after = await state(guarded)
    assert counters(after) == counters(before)
    assert await spend_and_dispatches(guarded) == spend_before
    if message["type"] == "cost":
        # The refused id was not remembered either: the dispatcher's cost counts.
        async with as_dispatcher(guarded) as dispatcher:
            ack = await dispatcher.cost(message["dispatch_id"], "0")
            assert ack["duplicate"] is False


async def test_health_and_metrics_need_no_token(guarded: Service) -> None:
    health = await http_get(guarded.http_base + "/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    metrics = await http_get(guarded.http_base + "/metrics")
    assert metrics.status == 200 and metrics.body


async def test_status_presents_its_token(guarded: Service) -> None:
    done = await run_cli("status", "--url", guarded.ws_url, "--token", OBSERVER, "--json")
    assert done.code == 0, done
    assert json.loads(done.stdout)["status"] == "ok"
    refused = await run_cli("status", "--url", guarded.ws_url)
    assert refused.code == 2, refused
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert OBSERVER not in refused.stderr + done.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--host", "0.0.0.0"), {}),
        (("--host", "::"), {}),
        (("--host", "192.0.2.10"), {}),
        ((), {"BUDGET_HOST": "0.0.0.0"}),
    ],
)
async def test_no_tokens_refuses_a_non_loopback_host(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    database = f"sqlite:///{tmp_path / 'open.db'}"
    done = await run_cli("serve", "--port", "0", "--database", database, *args, env=env)
    assert done.code == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "token" in lines[0].lower(), lines[0]
    assert "ws://" not in done.stdout


async def test_with_a_token_a_non_loopback_host_is_allowed(launcher: Launcher) -> None:
    service = await launcher.start(None, "--host", "0.0.0.0", env=TOKENS)
    assert "ws://0.0.0.0:" in service.ready_line, service.ready_line
    service.host = "127.0.0.1"
    async with as_dispatcher(service) as conn:
        await conn.cost("anywhere", "1")
    with pytest.raises(ConnectionRejected):
        async with connect(service.ws_url):
            pass


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
async def test_tokens_never_appear_in_the_log(launcher: Launcher, log_level: str) -> None:
    # The dispatcher token on the command line, the observer's in the environment.
    service = await launcher.start(
        None,
        "--dispatcher-token",
        DISPATCHER,
        "--log-level",
        log_level,
        env={"BUDGET_OBSERVER_TOKEN": OBSERVER},
    )
    for target in (f"/ws?token={WRONG}", f"/ws?token={DISPATCHER}x"):
        reply = await raw_http(
            service.host, service.port, upgrade_request(service.host, service.port, target)
        )
        assert status_of(reply) == 401
    headers = [("Authorization", f"Bearer {WRONG}")]
    reply = await raw_http(
        service.host, service.port, upgrade_request(service.host, service.port, headers=headers)
    )
    assert status_of(reply) == 401
    async with connect(f"{service.ws_url}?token={DISPATCHER}") as conn:
        await conn.cost("logged?", "0.1")
        await conn.send("not json")
        await conn.recv_type("error")
    async with connect(f"{service.ws_url}?token={OBSERVER}") as conn:
        await conn.request({"type": "cost", "dispatch_id": "o", "usd": "1"}, "error")
    # A connection that breaks the protocol and one that vanishes mid-frame.
    raw = await RawWS.open(service.host, service.port, OBSERVER)
    await raw.send_frame(b"\xff\xfe")
    await raw.close_code()
    await raw.aclose()
    raw = await RawWS.open(service.host, service.port, DISPATCHER)
    await raw.send(frame(b"x" * 100)[:50])
    await raw.aclose()
    await assert_up(service)
    assert await service.stop() == 0
    log = service.stderr_text()
    assert log, "expected some log lines"
    for secret in (DISPATCHER, OBSERVER, WRONG):
        assert secret not in log, f"a token is in the {log_level} log:\n{log}"
        assert secret not in service.ready_line
    assert "token=" not in log, log


# --------------------------------------------------------------------------
# Bad input: a precise error, nothing changes, the connection stays usable
# --------------------------------------------------------------------------


def cost_frame(dispatch_id: Any = "ID", **fields: Any) -> str:
    message: dict[str, Any] = {"type": "cost", "dispatch_id": dispatch_id, "usd": "0.01"}
    message.update(fields)
    return json.dumps({k: v for k, v in message.items() if v is not DROP})


def raw_usd(text: str, dispatch_id: str = "ID") -> str:
    """A cost whose ``usd`` is the JSON text given, verbatim."""
    return f'{{"type": "cost", "dispatch_id": "{dispatch_id}", "usd": {text}}}'


DROP = object()
NEST = 5000

# (case, frame, code (a|b: either), text the detail must contain, dispatch id that must
# stay uncounted)
BAD_FRAMES: list[tuple[str, str, str, str, str | None]] = [
    ("not json", "this is not json", "invalid_message", "JSON", None),
    ("truncated json", '{"type": "cost", "dispatch_id": ', "invalid_message", "JSON", None),
    ("empty frame", "", "invalid_message", "JSON", None),
    ("array", "[1, 2]", "invalid_message", "object", None),
    ("string", '"cost"', "invalid_message", "object", None),
    ("number", "42", "invalid_message", "object", None),
    ("null", "null", "invalid_message", "object", None),
    ("unknown type", '{"type": "nope"}', "invalid_message", "type", None),
    ("a service type", '{"type": "ack", "dispatch_id": "x"}', "invalid_message", "type", None),
    ("type not a string", '{"type": 5}', "invalid_message", "type", None),
    ("missing type", '{"dispatch_id": "ID", "usd": "1"}', "invalid_message", "type", "ID"),
    ("missing dispatch_id", cost_frame(dispatch_id=DROP), "invalid_message", "dispatch_id", None),
    ("missing usd", cost_frame(usd=DROP), "invalid_message", "usd", "ID"),
    ("unknown field", cost_frame(extra=1), "invalid_message", "extra", "ID"),
    (
        "unknown field on subscribe",
        '{"type": "subscribe", "sneaky": 1}',
        "invalid_message",
        "sneaky",
        None,
    ),
    ("input_tokens string", cost_frame(input_tokens="12"), "invalid_message", "input_tokens", "ID"),
    (
        "output_tokens string",
        cost_frame(output_tokens="7"),
        "invalid_message",
        "output_tokens",
        "ID",
    ),
    (
        "input_tokens fraction",
        cost_frame(input_tokens=1.5),
        "invalid_message",
        "input_tokens",
        "ID",
    ),
    ("input_tokens negative", cost_frame(input_tokens=-1), "invalid_message", "input_tokens", "ID"),
    (
        "output_tokens negative",
        cost_frame(output_tokens=-5),
        "invalid_message",
        "output_tokens",
        "ID",
    ),
    ("dispatch_id number", cost_frame(dispatch_id=12345), "invalid_message", "dispatch_id", None),
    ("model number", cost_frame(model=4), "invalid_message", "model", "ID"),
    ("agent object", cost_frame(agent={"a": 1}), "invalid_message", "agent", "ID"),
    ("health id number", '{"type": "health", "id": 7}', "invalid_message", "id", None),
    ("usd NaN", cost_frame(usd="NaN"), "invalid_cost", "usd", "ID"),
    ("usd Infinity", cost_frame(usd="Infinity"), "invalid_cost", "usd", "ID"),
    ("usd -Infinity", cost_frame(usd="-Infinity"), "invalid_cost", "usd", "ID"),
    ("usd -0.01 string", cost_frame(usd="-0.01"), "invalid_cost", "usd", "ID"),
    ("usd -0.01 number", raw_usd("-0.01"), "invalid_cost", "usd", "ID"),
    ("usd 1e400", raw_usd("1e400"), "invalid_cost", "usd", "ID"),
    ("usd 1e400 string", cost_frame(usd="1e400"), "invalid_cost", "usd", "ID"),
    ("usd 10,000 digits", raw_usd("9" * 10_000), "invalid_cost", "usd", "ID"),
    ("usd 10,000 decimals", raw_usd("0." + "1" * 10_000), "invalid_cost", "usd", "ID"),
    ("usd not numeric", cost_frame(usd="ten dollars"), "invalid_cost", "usd", "ID"),
    ("usd empty string", cost_frame(usd=""), "invalid_cost", "usd", "ID"),
    ("usd above max-cost", cost_frame(usd="1000.01"), "invalid_cost", "usd", "ID"),
    ("usd true", cost_frame(usd=True), "invalid_cost", "usd", "ID"),
    ("usd null", cost_frame(usd=None), "invalid_cost", "usd", "ID"),
    ("usd NaN literal", raw_usd("NaN"), "invalid_message", "JSON", "ID"),
    ("usd Infinity literal", raw_usd("Infinity"), "invalid_message", "JSON", "ID"),
    ("dispatch_id empty", cost_frame(dispatch_id=""), "invalid_cost", "dispatch_id", None),
    (
        "dispatch_id 10 KB",
        cost_frame(dispatch_id="k" * 10_240),
        "invalid_message",
        "dispatch_id",
        None,
    ),
    ("dispatch_id BEL", cost_frame(dispatch_id="a\u0007b"), "invalid_cost", "dispatch_id", None),
    ("dispatch_id newline", cost_frame(dispatch_id="a\nb"), "invalid_cost", "dispatch_id", None),
    (
        "dispatch_id ANSI escape",
        cost_frame(dispatch_id="\u001b[31mred"),
        "invalid_cost",
        "dispatch_id",
        None,
    ),
    ("dispatch_id NUL", cost_frame(dispatch_id="a\u0000b"), "invalid_cost", "dispatch_id", None),
    ("dispatch_id DEL", cost_frame(dispatch_id="a\u007fb"), "invalid_cost", "dispatch_id", None),
    (
        "dispatch_id C1 CSI",
        cost_frame(dispatch_id="a\u009b31mb"),
        "invalid_cost",
        "dispatch_id",
        None,
    ),
    ("model control char", cost_frame(model="gpt\u001b[2J"), "invalid_cost", "model", "ID"),
    # Issue 13: repeated keys, and texts that are blank or hide characters.
    (
        "usd repeated",
        '{"type": "cost", "dispatch_id": "ID", "usd": "0.01", "usd": "999"}',
        "invalid_message",
        "usd",
        "ID",
    ),
    ("dispatch_id RLO", cost_frame(dispatch_id="a\u202eb"), "invalid_cost", "dispatch_id", None),
    ("dispatch_id ZWSP", cost_frame(dispatch_id="a\u200bb"), "invalid_cost", "dispatch_id", None),
    ("dispatch_id LSEP", cost_frame(dispatch_id="a\u2028b"), "invalid_cost", "dispatch_id", None),
    ("dispatch_id space", cost_frame(dispatch_id=" "), "invalid_cost", "dispatch_id", None),
    ("agent blank", cost_frame(agent="  "), "invalid_cost", "agent", "ID"),
    (
        "admit estimate zero",
        '{"type": "admit", "dispatch_id": "ID", "estimate_usd": "0"}',
        "invalid_cost",
        "estimate_usd",
        "ID",
    ),
    (
        "deeply nested",
        '{"type": ' + '{"a": ' * NEST + "1" + "}" * (NEST + 1),
        "invalid_message",
        "",
        None,
    ),
    ("deeply nested array", "[" * NEST + "]" * NEST, "invalid_message", "", None),
    (
        "deeply nested model",
        cost_frame()[:-1] + ', "model": ' + "[" * NEST + "]" * NEST + "}",
        "invalid_message",
        "model",
        "ID",
    ),
    (
        "deeply nested usd",
        raw_usd("[" * NEST + "]" * NEST),
        "invalid_cost|invalid_message",
        "usd",
        "ID",
    ),
]


@pytest.mark.parametrize(
    ("frame_text", "code", "names", "uncounted"),
    [pytest.param(f, c, n, u, id=case) for case, f, c, n, u in BAD_FRAMES],
)
async def test_a_bad_message_gets_a_precise_error_and_changes_nothing(
    guarded: Service,
    request: pytest.FixtureRequest,
    frame_text: str,
    code: str,
    names: str,
    uncounted: str | None,
) -> None:
    # Each case has its own dispatch id, so "not counted" can be checked by
    # counting it afterwards.
    dispatch_id = f"bad-{request.node.callspec.id}"
    frame_text = frame_text.replace('"ID"', json.dumps(dispatch_id))
    assert len(frame_text.encode()) <= FRAME_LIMIT, "the case must fit in a frame"
    before = await state(guarded)
    spend_before = await spend_and_dispatches(guarded)
    async with as_dispatcher(guarded) as conn:
        await conn.send(frame_text)
        error = await conn.recv_type("error", "ack", "health", "spend")
        assert error["type"] == "error", error
        assert set(error) == {"type", "code", "detail"}, error
        assert error["code"] in code.split("|"), error
        assert isinstance(error["detail"], str) and error["detail"], error
        named = re.search(rf"\b{re.escape(names)}\b", error["detail"])
        assert named, f"detail does not name {names!r}: {error}"
        # Still usable, and nothing else came back for that frame.
        assert (await conn.health("after"))["id"] == "after"
        assert not [m for m in conn.log if m["type"] == "ack"], conn.log
    assert counters(await state(guarded)) == counters(before)
    assert await spend_and_dispatches(guarded) == spend_before
    if uncounted is not None:
        async with as_dispatcher(guarded) as conn:
            assert (await conn.cost(dispatch_id, "0"))["duplicate"] is False


async def test_binary_frames_are_refused_and_not_counted(guarded: Service) -> None:
    before = await spend_and_dispatches(guarded)
    cost = json.dumps({"type": "cost", "dispatch_id": "as-binary", "usd": "1"}).encode()
    async with as_dispatcher(guarded) as conn:
        for payload in (cost, b"\x00\xff\x10", b""):
            await conn.ws.send_message(payload)
            error = await conn.recv_type("error", "ack")
            assert error["type"] == "error" and error["code"] == "invalid_message", error
            assert "binary" in error["detail"], error
        assert (await conn.health("ok"))["id"] == "ok"
    assert await spend_and_dispatches(guarded) == before
    async with as_dispatcher(guarded) as conn:
        assert (await conn.cost("as-binary", "0"))["duplicate"] is False


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "health", "id": "\xff\xfe"}',
        b'{"type": "cost", "dispatch_id": "utf8-\xc3", "usd": "1"}',
        b'{"type": "cost", "dispatch_id": "surrogate-\xed\xa0\x80", "usd": "1"}',
        b'{"type": "cost", "dispatch_id": "overlong-\xc0\xaf", "usd": "1"}',
    ],
    ids=["ff-fe", "truncated", "encoded surrogate", "overlong"],
)
async def test_invalid_utf8_in_a_text_frame_changes_nothing(
    guarded: Service, payload: bytes
) -> None:
    before = await spend_and_dispatches(guarded)
    async with as_dispatcher(guarded) as bystander:
        raw = await RawWS.open(guarded.host, guarded.port)
        try:
            await raw.send_frame(payload)
            # Either an error (the connection stays open) or the connection
            # is failed (RFC 6455 8.1): a close with 1007, or, as 7.1.7 allows,
            # no close frame at all. Never an ack.
            try:
                reply = await raw.recv()
            except Closed as closed:
                assert closed.code in (1007, None), closed.code
            else:
                assert reply["type"] == "error", reply
                assert reply["code"] == "invalid_message", reply
                await raw.send_json({"type": "health", "id": "still"})
                assert (await raw.recv())["id"] == "still"
        finally:
            await raw.aclose()
        assert (await bystander.health("bystander"))["id"] == "bystander"
    assert await spend_and_dispatches(guarded) == before
    await assert_up(guarded)


# --------------------------------------------------------------------------
# Frame size
# --------------------------------------------------------------------------


async def test_a_frame_over_64_kib_closes_with_1009_and_is_not_counted(guarded: Service) -> None:
    before = await spend_and_dispatches(guarded)
    async with as_dispatcher(guarded) as conn:
        pad = " " * (FRAME_LIMIT + 1 - len(cost_frame("too-big")))
        big = cost_frame("too-big")[:-1] + pad + "}"
        assert len(big.encode()) == FRAME_LIMIT + 1
        await conn.send(big)
        with pytest.raises(ConnectionClosed) as closed:
            await conn.recv()
        assert closed.value.reason is not None and closed.value.reason.code == 1009
    assert await spend_and_dispatches(guarded) == before
    async with as_dispatcher(guarded) as conn:
        assert (await conn.cost("too-big", "0"))["duplicate"] is False
    await assert_up(guarded)


async def test_a_frame_of_exactly_64_kib_is_read(guarded: Service) -> None:
    async with as_dispatcher(guarded) as conn:
        text = cost_frame("just-fits")
        text = text[:-1] + " " * (FRAME_LIMIT - len(text)) + "}"
        assert len(text.encode()) == FRAME_LIMIT
        ack = await conn.request(text, "ack")
        assert ack["dispatch_id"] == "just-fits"


@pytest.mark.parametrize("shape", ["lying header", "fragments", "binary"])
async def test_oversized_messages_close_with_1009_whatever_their_shape(
    guarded: Service, shape: str
) -> None:
    before = await spend_and_dispatches(guarded)
    raw = await RawWS.open(guarded.host, guarded.port)
    try:
        chunk = b" " * 40_000
        if shape == "lying header":
            # Claims a terabyte; the service must not wait for (or buffer) it.
            await raw.send(frame(chunk + chunk, length=1 << 40))
        elif shape == "fragments":
            await raw.send_frame(b'{"type": "health", "id": "x"' + chunk, fin=False)
            await raw.send_frame(chunk + b"}", 0x0)
        else:
            await raw.send_frame(chunk + chunk, 0x2)
        assert await raw.close_code() == 1009
    finally:
        await raw.aclose()
    assert await spend_and_dispatches(guarded) == before
    await assert_up(guarded)


# --------------------------------------------------------------------------
# Limits that need their own service
# --------------------------------------------------------------------------


async def test_beyond_max_connections_the_handshake_gets_503(launcher: Launcher) -> None:
    service = await launcher.start(
        None, "--max-connections", "3", "--dispatcher-slots", "1", env=TOKENS
    )
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(as_dispatcher(service)) for _ in range(3)]
        request = upgrade_request(
            service.host, service.port, headers=[("Authorization", f"Bearer {DISPATCHER}")]
        )
        reply = await raw_http(service.host, service.port, request)
        assert status_of(reply) == 503, reply[:200]
        with pytest.raises(ConnectionRejected) as refused:
            async with as_observer(service):
                pass
        assert refused.value.status_code == 503
        # Plain HTTP is not a WebSocket connection and still answers.
        assert (await http_get(service.http_base + "/health")).status == 200
        for conn in conns:
            await conn.health()
    # The slots are given back.
    with trio.fail_after(5):
        while True:
            try:
                async with AsyncExitStack() as stack:
                    for _ in range(3):
                        await stack.enter_async_context(as_dispatcher(service))
                break
            except ConnectionRejected:
                await trio.sleep(0.05)
    await assert_up(service)


async def test_a_flood_gets_overloaded_then_1008_and_others_are_unaffected(
    launcher: Launcher,
) -> None:
    service = await launcher.start(None, "--rate-limit", "50", env=TOKENS)
    before = await spend_and_dispatches(service)
    sent = 400
    got: list[dict[str, Any]] = []
    close_code: int | None = None
    bystander_replies = 0

    async def bystander(done: trio.Event) -> None:
        nonlocal bystander_replies
        async with as_observer(service) as conn:
            while not done.is_set():
                assert (await conn.health("b"))["type"] == "health"
                bystander_replies += 1
                await trio.sleep(0.02)

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bystander, done)
        async with as_dispatcher(service) as flood:
            # Read while sending: trio-websocket's get_message() raises as soon
            # as the close frame is in, even with messages still queued, so a
            # client that only reads afterwards may never see the errors.
            async def read() -> None:
                nonlocal close_code
                try:
                    while True:
                        got.append(await flood.recv())
                except ConnectionClosed as closed:
                    close_code = closed.reason.code if closed.reason else None

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                try:
                    for i in range(sent):
                        await flood.send({"type": "cost", "dispatch_id": f"f{i}", "usd": "0.01"})
                except ConnectionClosed:
                    pass
        await trio.sleep(0.2)
        done.set()
    overloaded = [m for m in got if m["type"] == "error"]
    acks = [m for m in got if m["type"] == "ack"]
    assert overloaded, "no `overloaded` error before the close"
    assert {m["code"] for m in overloaded} == {"overloaded"}, overloaded
    assert close_code == 1008
    assert bystander_replies > 0
    # Only accepted costs count: acked ones, plus perhaps a few accepted just
    # before the close whose ack was not sent; never an overloaded one.
    spend, dispatches = await spend_and_dispatches(service)
    counted = dispatches - before[1]
    assert len(acks) <= counted <= sent - len(overloaded)
    assert spend - before[0] == Decimal("0.01") * counted
    await assert_up(service)


async def test_a_silent_or_slow_handshake_is_dropped(launcher: Launcher) -> None:
    service = await launcher.start(None, "--handshake-timeout", "1", env=TOKENS)
    elapsed: dict[str, float] = {}

    async def silent() -> None:
        start = trio.current_time()
        stream = await trio.open_tcp_stream(service.host, service.port)
        async with stream:
            assert await read_until_eof(stream, 5) == b""
        elapsed["silent"] = trio.current_time() - start

    async def slowloris() -> None:
        start = trio.current_time()
        stream = await trio.open_tcp_stream(service.host, service.port)
        async with stream:
            await stream.send_all(b"GET /ws HTTP/1.1\r\n")
            try:
                with trio.fail_after(5):
                    for i in range(100):
                        await stream.send_all(f"X-Slow-{i}: y\r\n".encode())
                        with trio.move_on_after(0.2):
                            if not await stream.receive_some(1024):
                                break
            except trio.BrokenResourceError:
                pass
        elapsed["slowloris"] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent)
        nursery.start_soon(slowloris)
        nursery.start_soon(assert_up, service)
    assert elapsed["silent"] < 8, elapsed  # closed by the service, not by our 5 s read limit
    assert elapsed["slowloris"] < 8, elapsed
    await assert_up(service)


async def test_a_peer_that_stops_answering_pings_is_dropped(launcher: Launcher) -> None:
    service = await launcher.start(None, "--ping-interval", "1", env=TOKENS)
    dropped_after: list[float] = []

    async def dead_peer() -> None:
        raw = await RawWS.open(service.host, service.port, OBSERVER, answer_pings=False)
        start = trio.current_time()
        try:
            await raw.close_code(timeout=10)
        finally:
            await raw.aclose()
        dropped_after.append(trio.current_time() - start)
        assert raw.pings >= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dead_peer)
        # A live peer (the library answers pings) stays connected meanwhile.
        async with as_observer(service) as live:
            await trio.sleep(3.5)
            assert (await live.health("alive"))["id"] == "alive"
    assert dropped_after and 1.0 <= dropped_after[0] < 8.0, dropped_after
    await assert_up(service)


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_tls_serves_wss_with_the_certificate(launcher: Launcher, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    service = launcher.spawn(
        None,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--handshake-timeout",
        "1",
        env=TOKENS,
    )
    stdout = service.proc.stdout
    assert stdout is not None
    with trio.fail_after(20):
        line = await trio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
    assert "wss://127.0.0.1:" in line, (line, service.stderr_text())
    port = int(line.split("wss://127.0.0.1:", 1)[1].split("/", 1)[0])
    url = f"wss://localhost:{port}/ws"
    trusted = ssl.create_default_context(cafile=str(cert))

    async with connect(url, ssl_context=trusted, extra_headers=bearer(DISPATCHER)) as conn:
        assert (await conn.cost("over-tls", "0.75"))["duplicate"] is False
        assert Decimal((await conn.health())["daily_spend"]) == Decimal("0.75")
    async with connect(f"wss://127.0.0.1:{port}/ws?token={OBSERVER}", ssl_context=trusted) as conn:
        assert (await conn.subscribe())["daily_spend"] == "0.75"

    # Tokens still apply over TLS.
    with pytest.raises(ConnectionRejected) as refused:
        async with connect(url, ssl_context=trusted, extra_headers=bearer(WRONG)):
            pass
    assert refused.value.status_code == 401

    # A client that does not trust the certificate refuses it.
    untrusted = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port),
        ssl.create_default_context(),
        server_hostname="localhost",
    )
    with pytest.raises(trio.BrokenResourceError) as broken:
        await untrusted.do_handshake()
    assert isinstance(broken.value.__cause__, ssl.SSLCertVerificationError), broken.value
    await trio.aclose_forcefully(untrusted)

    # Plain ws:// to the TLS port gets no WebSocket.
    request = upgrade_request(
        "127.0.0.1", port, headers=[("Authorization", f"Bearer {DISPATCHER}")]
    )
    reply = await raw_http("127.0.0.1", port, request)
    assert status_of(reply) != 101, reply[:200]
    assert b"HTTP/1.1 101" not in reply

    # A TCP client that never starts the TLS handshake is dropped too.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await read_until_eof(stream, 4)

    def https_health() -> int:
        with urllib.request.urlopen(
            f"https://localhost:{port}/health", context=trusted, timeout=5
        ) as reply:
            status: int = reply.status
            return status

    assert await trio.to_thread.run_sync(https_health) == 200
    done = await run_cli(
        "status", "--url", url, "--token", OBSERVER, "--cafile", str(cert), "--json"
    )
    assert done.code == 0, done
    assert json.loads(done.stdout)["daily_spend"] == "0.75"
    assert service.proc.poll() is None, service.stderr_text()
    assert await service.stop() == 0


async def test_a_peer_that_vanishes_mid_conversation_is_not_reported_as_a_failure(
    launcher: Launcher,
) -> None:
    """A peer going away is normal life, not a handler failure: no ERROR and
    no traceback per vanished client (else any client can flood the log)."""
    service = await launcher.start(None, env=TOKENS)
    for round_no in range(3):
        raw = await RawWS.open(service.host, service.port)
        costs = [
            frame(
                json.dumps(
                    {"type": "cost", "dispatch_id": f"v{round_no}-{i}", "usd": "0.01"}
                ).encode()
            )
            for i in range(200)
        ]
        await raw.send(b"".join(costs))
        await trio.sleep(0.01)
        await raw.aclose()
        raw = await RawWS.open(service.host, service.port)
        await raw.send_json({"type": "subscribe"})
        await raw.send(frame(b'{"type": "health"}') * 300)
        await raw.aclose()
    await trio.sleep(0.3)
    await assert_up(service)
    assert await service.stop() == 0
    log = service.stderr_text()
    reported = [line for line in log.splitlines() if "failed; closing it" in line]
    assert not reported, f"{len(reported)} vanished peers logged as failures:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------
# Containment (in process: a fault cannot be injected from outside)
# --------------------------------------------------------------------------


async def test_an_exception_in_one_handler_closes_only_that_connection(
    sqlite_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.ERROR, logger="budget_actor.server")
    async with open_budget(make_config(), database=sqlite_url) as budget:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(serve, options=ServerOptions()), budget, "127.0.0.1", 0
            )
            url = f"ws://127.0.0.1:{port}/ws"
            real_health = budget.health
            armed = [False]

            async def faulty_health() -> Any:
                if armed[0]:
                    armed[0] = False
                    raise RuntimeError("injected fault")
                return await real_health()

            monkeypatch.setattr(budget, "health", faulty_health)
            async with connect(url) as bystander, connect(url) as victim:
                await bystander.subscribe()
                victim_port = victim.ws.local.port  # type: ignore[union-attr]
                armed[0] = True
                await victim.send({"type": "health"})
                with pytest.raises(ConnectionClosed):
                    await victim.recv()
                ack = await bystander.cost("after-fault", "0.5")
                assert (await bystander.spend_at(ack["seq"]))["daily_spend"] == "0.5"
                assert (await bystander.health("alive"))["id"] == "alive"
            async with connect(url) as fresh:
                assert (await fresh.health("fresh"))["id"] == "fresh"
            nursery.cancel_scope.cancel()
    failures = [r for r in caplog.records if r.name == "budget_actor.server"]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    record = failures[0]
    assert record.levelno == logging.ERROR
    assert f"127.0.0.1:{victim_port}" in record.getMessage(), record.getMessage()
    assert record.exc_info is not None
    assert "injected fault" in caplog.text
