"""Who may connect, by web origin (PROTOCOL.md, "Additions of 2026-12-02",
"Who may connect"; issue 13, finding 2).

Browsers do not apply CORS to WebSockets, so without a check any web page
could spend through a service that has no tokens. A handshake that carries
``Origin`` is accepted only from the service's own origin (the scheme, host
and port the client used) or one given with ``--allow-origin``; any other
gets HTTP 403, with or without tokens. A handshake without ``Origin`` (a
program) is not affected.

The raw tests speak HTTP on a bare socket, so they can send any header; the
browser test shows the same from a real page in headless chromium.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from ._browser import browser
from ._client import Launcher, Service, connect, frame, run_cli

pytestmark = pytest.mark.slow

DISPATCHER = "disp-" + secrets.token_urlsafe(24)
OBSERVER = "obs-" + secrets.token_urlsafe(24)
TOKENS = {"BUDGET_DISPATCHER_TOKEN": DISPATCHER, "BUDGET_OBSERVER_TOKEN": OBSERVER}


async def handshake(
    service: Service, headers: list[tuple[str, str]], *, then: bytes = b""
) -> tuple[int, bytes]:
    """A WebSocket upgrade with exactly ``headers`` (Host included), and
    ``then`` pipelined behind it; the status and whatever came back."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    stream = await trio.open_tcp_stream(service.host, service.port)
    reply = bytearray()
    async with stream:
        await stream.send_all(request + then)
        with trio.fail_after(5):
            while b"\r\n\r\n" not in reply:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                reply += chunk
    status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.1 ") else b"0"
    return int(status), bytes(reply)


def own(service: Service, host: str | None = None) -> list[tuple[str, str]]:
    """Host and Origin of a page served by ``service`` itself."""
    where = f"{host or service.host}:{service.port}"
    return [("Host", where), ("Origin", f"http://{where}")]


def host(service: Service) -> tuple[str, str]:
    return ("Host", f"{service.host}:{service.port}")


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


async def spend(service: Service, token: str | None = None) -> Decimal:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    async with connect(service.ws_url, extra_headers=headers) as conn:
        return Decimal((await conn.health())["daily_spend"])


def sneaky_cost(dispatch_id: str) -> bytes:
    return frame(json.dumps({"type": "cost", "dispatch_id": dispatch_id, "usd": "5.00"}).encode())


# --------------------------------------------------------------------------
# Raw handshakes
# --------------------------------------------------------------------------


async def test_an_open_service_refuses_other_origins_with_403(launcher: Launcher) -> None:
    service = await launcher.start(None)
    refused = [
        [host(service), ("Origin", "https://evil.example")],
        [host(service), ("Origin", "null")],
        # Same host, another port or scheme: another origin.
        [host(service), ("Origin", f"http://{service.host}:{service.port + 1}")],
        [host(service), ("Origin", f"https://{service.host}:{service.port}")],
        # Same port, another name for the machine: still another origin.
        [host(service), ("Origin", f"http://localhost:{service.port}")],
        # Two origins, or a path: not an origin.
        [host(service), ("Origin", f"http://{service.host}:{service.port}"), ("Origin", "x")],
        [host(service), ("Origin", f"http://{service.host}:{service.port}/ws")],
        # DNS rebinding: evil.example re-pointed at 127.0.0.1 is "same origin"
        # by Host, but an open service answers only to loopback names.
        own(service, "evil.example"),
    ]
    for n, headers in enumerate(refused):
        status, reply = await handshake(service, headers, then=sneaky_cost(f"evil-{n}"))
        assert status == 403, (headers, reply[:300])
        assert b"allow-origin" in reply, reply
    assert await spend(service) == 0


async def test_own_origin_and_no_origin_are_accepted(launcher: Launcher) -> None:
    service = await launcher.start(None)
    for headers in (
        own(service),
        own(service, "localhost"),
        [host(service)],
        [("Host", f"LocalHost:{service.port}"), ("Origin", f"HTTP://localhost:{service.port}")],
    ):
        status, reply = await handshake(service, headers)
        assert status == 101, (headers, reply[:300])


async def test_with_tokens_another_origin_gets_403_even_with_the_dispatcher_token(
    launcher: Launcher,
) -> None:
    service = await launcher.start(None, env=TOKENS)
    evil = ("Origin", "https://evil.example")
    for headers in (
        [host(service), evil, bearer(DISPATCHER)],
        [host(service), evil, bearer(OBSERVER)],
        [host(service), evil],  # 403, not 401: the origin is checked first
    ):
        status, reply = await handshake(service, headers, then=sneaky_cost("evil"))
        assert status == 403, (headers, reply[:300])
    # The own origin still needs its token.
    assert (await handshake(service, own(service)))[0] == 401
    assert (await handshake(service, [*own(service), bearer(OBSERVER)]))[0] == 101
    # With tokens the service may be reached by any name of the machine.
    status, _ = await handshake(service, [*own(service, "budget.internal"), bearer(OBSERVER)])
    assert status == 101
    assert await spend(service, OBSERVER) == 0


async def test_allow_origin_admits_the_origins_listed(launcher: Launcher) -> None:
    service = await launcher.start(
        None,
        "--allow-origin",
        "https://Dash.Example",
        "--allow-origin",
        "http://127.0.0.1:9/",
    )
    for origin in ("https://dash.example", "https://dash.example:443", "http://127.0.0.1:9"):
        status, reply = await handshake(service, [host(service), ("Origin", origin)])
        assert status == 101, (origin, reply[:300])
    for origin in ("http://dash.example", "https://dash.example:8443", "https://evil.example"):
        status, _ = await handshake(service, [host(service), ("Origin", origin)])
        assert status == 403, origin
    assert (await handshake(service, own(service)))[0] == 101


async def test_allow_origin_from_the_environment(launcher: Launcher) -> None:
    service = await launcher.start(
        None, env={"BUDGET_ALLOW_ORIGIN": "https://a.example, http://b.example:8080"}
    )
    for origin, expected in (
        ("https://a.example", 101),
        ("http://b.example:8080", 101),
        ("http://b.example", 403),
    ):
        status, _ = await handshake(service, [host(service), ("Origin", origin)])
        assert status == expected, origin


@pytest.mark.parametrize(
    "value", ["null", "*", "evil.example", "https://evil.example/path", "ftp://x.example"]
)
async def test_a_bad_allow_origin_exits_2(tmp_path: Path, value: str) -> None:
    database = f"sqlite:///{tmp_path / 'b.db'}"
    args = ("serve", "--port", "0", "--database", database)
    done = await run_cli(*args, "--allow-origin", value)
    assert done.code == 2, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "allow-origin" in done.stderr


# --------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------

# The attacker's page: tries each WebSocket URL in ``window.targets``, sends
# a cost as soon as one opens, and records what happened.
EVIL_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>evil</title></head>
<body><script>
window.results = null;
function attempt(url) {
  return new Promise((resolve) => {
    let opened = false;
    const ws = new WebSocket(url);
    ws.onopen = () => {
      opened = true;
      ws.send(JSON.stringify({type: "cost", dispatch_id: "evil-" + Math.random(), usd: "5.00"}));
      ws.send(JSON.stringify({type: "health", id: "evil"}));
    };
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "health") { ws.close(); }
    };
    ws.onclose = (event) => resolve({url, opened, code: event.code});
  });
}
const targets = JSON.parse(decodeURIComponent(location.hash.slice(1)));
Promise.all(targets.map(attempt)).then((r) => { window.results = r; });
</script></body></html>"""


async def serve_page(page: bytes, task_status: trio.TaskStatus[int]) -> None:
    """A web server on another local port that answers every request with ``page``."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            head = (
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                f"content-length: {len(page)}\r\nconnection: close\r\n\r\n"
            ).encode()
            await stream.send_all(head + page)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


_LIVE = """!window.budgetState ? null : document.getElementById("conn").textContent"""


async def _wait_value(tools: Any, expression: str, timeout: float) -> Any:
    with trio.fail_after(timeout):
        while True:
            value = await tools.evaluate(expression)
            if value is not None:
                return value
            await trio.sleep(0.1)


async def test_a_page_from_another_origin_cannot_connect_but_the_live_page_can(
    launcher: Launcher, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        evil_port = await nursery.start(serve_page, EVIL_PAGE)
        evil_origin = f"http://127.0.0.1:{evil_port}"
        # The case: a service with no tokens. And one that allows the
        # attacker's origin explicitly, to show the page would work if allowed.
        open_service = await launcher.start(None)
        allowing = await launcher.start(
            f"sqlite:///{tmp_path / 'allowing.db'}", "--allow-origin", evil_origin, env=TOKENS
        )
        targets = [
            open_service.ws_url,
            f"{allowing.ws_url}?token={OBSERVER}",
            f"{allowing.ws_url}?token={DISPATCHER}",
        ]
        async with browser(tmp_path) as tools:
            hash_ = json.dumps(targets).replace(" ", "")
            await tools.send("Page.navigate", url=f"{evil_origin}/#{hash_}")
            results = await _wait_value(tools, "window.results", 15)
            by_url = {r["url"]: r for r in results}
            refused = by_url[open_service.ws_url]
            assert refused["opened"] is False and refused["code"] == 1006, refused
            assert by_url[targets[1]]["opened"] is True, results
            assert by_url[targets[2]]["opened"] is True, results
            # The browser saw the 403 itself.
            logged = [
                e["params"]["entry"]["text"]
                for e in tools.events
                if e["method"] == "Log.entryAdded"
            ]
            assert any("403" in text for text in logged), (logged, tools.events)

            # The live page of the open service, on its own origin, still works.
            await tools.send("Page.navigate", url=f"{open_service.http_base}/")
            assert await _wait_value(tools, f'({_LIVE}) === "live" ? true : null', 10), (
                "the live page did not connect"
            )
        nursery.cancel_scope.cancel()
    assert await spend(open_service) == 0
    # The allowed page's dispatcher connection could spend, as allowed.
    assert await spend(allowing, OBSERVER) == Decimal("5.00")
