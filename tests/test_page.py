"""The live page at `GET /`: served without a token, self-contained, and working
in a real headless browser (Chromium, driven over the DevTools protocol).

The browser test skips when Chromium is not installed, unless
``BUDGET_REQUIRE_BROWSER=1`` (as in CI), where it fails. It saves a screenshot
to ``test-artifacts/page.png``.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import trio

from ._browser import DevTools, browser
from ._client import Launcher, connect, http_get

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DISPATCHER_TOKEN = "dispatcher-secret-0123456789"
OBSERVER_TOKEN = "observer-secret-0123456789"
TOKENS = {
    "BUDGET_DISPATCHER_TOKEN": DISPATCHER_TOKEN,
    "BUDGET_OBSERVER_TOKEN": OBSERVER_TOKEN,
}


# -- over plain HTTP ---------------------------------------------------------------


async def test_the_page_is_served_without_a_token(launcher: Launcher, sqlite_url: str) -> None:
    service = await launcher.start(sqlite_url, env=TOKENS)
    page = await http_get(service.http_base + "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    html = page.body.decode()
    assert html.startswith("<!doctype html>") and "</html>" in html
    # A query string (the observer token for the page's WebSocket) is fine.
    again = await http_get(service.http_base + f"/?token={OBSERVER_TOKEN}")
    assert again.status == 200 and again.body == page.body
    # The WebSocket itself still wants the token.
    ws = await http_get(service.http_base + "/ws")
    assert ws.status in (401, 404)


async def test_head_of_the_page(launcher: Launcher, sqlite_url: str) -> None:
    service = await launcher.start(sqlite_url)
    stream = await trio.open_tcp_stream(service.host, service.port)
    async with stream:
        await stream.send_all(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/html; charset=utf-8" in head
    assert body == b""


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    from budget_actor.net.page import PAGE

    html = PAGE.decode()
    # Every src/href is inline data; the only absolute URL is the SVG namespace.
    for url in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html):
        assert url.startswith("data:"), url
    assert set(re.findall(r"https?://[^\s\"'`]+", html)) == {"http://www.w3.org/2000/svg"}
    assert "@import" not in html and "url(" not in html
    # The WebSocket goes to the page's own host, passing its own ?token= on.
    assert 'location.host + "/ws"' in html and 'get("token")' in html


# -- in a real browser -------------------------------------------------------------


# What the page shows, as the test reads it (null until the page is there:
# right after Page.navigate, the old document may still be showing).
_READ = """!window.budgetState ? "null" : JSON.stringify({
  conn: document.getElementById("conn").textContent,
  spend: document.getElementById("spend").textContent,
  cap: document.getElementById("cap").textContent,
  burn5: document.getElementById("burn5").textContent,
  projected: document.getElementById("projected").textContent,
  alerts: [...document.querySelectorAll("#alerts li")].map((li) => li.textContent),
  curve: document.querySelectorAll("#chart path").length,
  points: window.budgetState.points.length,
})"""


async def _until(tools: DevTools, check: Any, timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            seen = json.loads(await tools.evaluate(_READ)) or {}
            if seen and check(seen):
                return seen
            await trio.sleep(0.1)
    raise AssertionError(f"the page did not get there within {timeout}s; it shows {seen}")


async def test_the_page_in_a_headless_browser(
    launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    service = await launcher.start(
        sqlite_url, "--daily-cap", "1.00", "--alert-at", "0.5,0.8", env=TOKENS
    )
    page_url = f"{service.http_base}/?token={OBSERVER_TOKEN}"
    async with browser(tmp_path) as tools:
        await tools.send(
            "Emulation.setDeviceMetricsOverride",
            width=1100,
            height=940,
            deviceScaleFactor=1,
            mobile=False,
        )
        await tools.send("Page.navigate", url=page_url)
        await _until(tools, lambda s: s["conn"] == "live" and s["spend"] == "$0", 10)

        headers = [(b"authorization", f"Bearer {DISPATCHER_TOKEN}".encode())]
        async with connect(service.ws_url, extra_headers=headers) as conn:
            for n, usd in enumerate(["0.12", "0.2", "0.25", "0.1", "0.18"]):
                await conn.cost(f"page-{n}", usd, model="haiku")
                await trio.sleep(0.25)  # a curve with steps, not one jump
        shown = await _until(
            tools,
            lambda s: (
                s["spend"] == "$0.85"
                and any("80% of the cap reached" in a for a in s["alerts"])
                and s["burn5"].startswith("$")
                and s["burn5"] != "$0.00 / hour"
            ),
            8,
        )
        assert shown["cap"] == "$1.00"
        assert [a for a in shown["alerts"] if "50% of the cap reached" in a]
        assert shown["projected"].startswith("$")
        assert shown["curve"] == 2 and shown["points"] >= 6

        shot = await tools.send("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG")
        (ARTIFACTS / "page.png").write_bytes(png)

        # Nothing went wrong in the page, and nothing came from elsewhere.
        errors = [
            e
            for e in tools.events
            if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]
        assert errors == []
        requested = [
            e["params"]["request"]["url"]
            for e in tools.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        own = (service.http_base, service.ws_url.rsplit("/", 1)[0], "data:")
        assert requested and all(u.startswith(own) for u in requested), requested
