"""The live page at `GET /`: served without a token, self-contained, and working
in a real headless browser (Chromium, driven over the DevTools protocol).

The browser tests skip when Chromium is not installed, unless
``BUDGET_REQUIRE_BROWSER=1`` (as in CI), where they fail. They save
screenshots to ``test-artifacts/`` (``page-history.png`` is the README's
``docs/img/page.png``). A page opened after costs were recorded is checked in
the picture itself: the screenshot's pixels of the curve rise, in steps,
hours left of "now", and the last days' bars have the colours of their spend.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import trio

from budget_actor import open_store

from ._browser import DevTools, browser
from ._client import Launcher, dispatcher, http_get, sql_setup
from ._png import Image, read_png

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

        async with dispatcher(service.ws_url, DISPATCHER_TOKEN) as client:
            for n, usd in enumerate(["0.12", "0.2", "0.25", "0.1", "0.18"]):
                await client.record(f"page-{n}", usd, model="haiku")
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


# -- the day so far and the last days, in the picture --------------------------------

OK_GREEN = (0x2E, 0x9D, 0x5B)  # --ok: the curve's colour below the first threshold
WARN = (0xD9, 0x8E, 0x04)
OVER = (0xC8, 0x37, 0x2D)


def _zone_at_two_pm(now: datetime) -> tuple[str, int]:
    """A fixed-offset zone where it is about 14:00 now (so that "hours
    earlier today" exists whenever the test runs), and its offset."""
    offset = (14 - now.hour) % 24
    if offset > 14:
        offset -= 24
    name = "Etc/GMT" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"
    return name, offset


def _seed_journal(sqlite_url: str, zone: ZoneInfo, now: datetime) -> list[datetime]:
    """Costs at three moments hours before now, and on earlier days: one
    under, one over the first threshold, one over the cap. Returns today's
    cost times."""
    store = open_store(sqlite_url)
    store.open()
    store.close()
    today = now.astimezone(zone).date()
    moments = [now - timedelta(hours=h) for h in (6, 4, 2)]
    rows: list[tuple[str, tuple[Any, ...]]] = []
    insert = (
        "INSERT INTO budget_journal (seq, day, dispatch_id, usd, recorded_at)"
        " VALUES (%s, %s, %s, %s, %s)"
    )
    seq = 0
    for at, usd in zip(moments, ["0.1", "0.15", "0.2"], strict=True):
        seq += 1
        rows.append((insert, (seq, today.isoformat(), f"today-{seq}", usd, at.isoformat())))
    for back, usd in [(1, "0.6"), (2, "1.3"), (5, "0.3"), (9, "0.2"), (12, "0.75")]:
        seq += 1
        day = today - timedelta(days=back)
        at = datetime.combine(day, datetime.min.time(), tzinfo=zone) + timedelta(hours=12)
        rows.append((insert, (seq, day.isoformat(), f"past-{seq}", usd, at.isoformat())))
    sql_setup(sqlite_url, rows)
    return moments


def _near(pixel: tuple[int, int, int], colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


async def _shot_of(tools: DevTools, element: str) -> Image:
    box = json.loads(
        await tools.evaluate(
            f"JSON.stringify(document.getElementById({element!r}).getBoundingClientRect())"
        )
    )
    clip = {k: box[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
    shot = await tools.send("Page.captureScreenshot", format="png", clip=clip)
    return read_png(base64.b64decode(shot["data"]))


def _tall_runs(image: Image, colour: tuple[int, int, int], height: int) -> int:
    """Columns holding at least ``height`` pixels of ``colour`` one above the
    other (a bar, not a line)."""
    columns = 0
    for x in range(image.width):
        run = best = 0
        for y in range(image.height):
            run = run + 1 if _near(image.pixel(x, y), colour, 30) else 0
            best = max(best, run)
        columns += best >= height
    return columns


async def test_a_page_opened_late_draws_the_day_so_far_and_the_last_days(
    launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    zone_name, _ = _zone_at_two_pm(now)
    zone = ZoneInfo(zone_name)
    _seed_journal(sqlite_url, zone, now)
    service = await launcher.start(
        sqlite_url,
        "--daily-cap",
        "1.00",
        "--alert-at",
        "0.5,0.8",
        "--timezone",
        zone_name,
        env=TOKENS,
    )
    async with browser(tmp_path) as tools:
        await tools.send(
            "Emulation.setDeviceMetricsOverride",
            width=1100,
            height=1100,
            deviceScaleFactor=1,
            mobile=False,
        )
        await tools.send("Page.navigate", url=f"{service.http_base}/?token={OBSERVER_TOKEN}")
        read = """!window.budgetState ? "null" : JSON.stringify({
          conn: document.getElementById("conn").textContent,
          spend: document.getElementById("spend").textContent,
          history: window.budgetState.history,
          bars: document.querySelectorAll("#days rect").length,
        })"""
        shown: dict[str, Any] = {}
        with trio.move_on_after(15):
            while not (
                shown.get("conn") == "live"
                and shown.get("spend") == "$0.45"
                and shown.get("history") == "ok"
            ):
                shown = json.loads(await tools.evaluate(read)) or {}
                await trio.sleep(0.1)
        assert shown.get("history") == "ok" and shown.get("spend") == "$0.45", shown
        assert shown["bars"] == 30
        await trio.sleep(0.3)  # one more frame after the last state change

        # Today: the curve's pixels, column by column (its topmost pixel).
        chart = await _shot_of(tools, "chart")
        top: dict[int, int] = {}
        for x in range(chart.width):
            for y in range(chart.height):
                if _near(chart.pixel(x, y), OK_GREEN):
                    top[x] = y
                    break
        assert len(top) > chart.width // 4, f"no curve drawn ({len(top)} columns)"
        left, right = min(top), max(top)  # midnight ... now
        baseline = top[left]
        # It starts flat at $0 at the left edge of the day...
        assert left < chart.width * 0.1, (left, chart.width)
        # ...ends at "now", high above $0 (the spend, restored from the journal)...
        assert baseline - top[right - 2] > 40, (baseline, top[right - 2])
        # ...and rose before the page was opened: the first step is hours
        # (a good part of the day so far) left of "now", and there are three.
        rise = min(x for x, y in top.items() if y < baseline - 5)
        assert right - rise > 0.3 * (right - left), (left, rise, right)
        levels: list[int] = []
        for x in range(rise, right - 2):
            if x in top and (not levels or abs(top[x] - levels[-1]) > 4):
                levels.append(top[x])
        assert len(levels) >= 3 and levels == sorted(levels, reverse=True), levels

        # The last 30 days: bars under the cap, over the first threshold and
        # over the cap, each in its colour.
        days = await _shot_of(tools, "days")
        ARTIFACTS.mkdir(exist_ok=True)
        assert _tall_runs(days, OVER, 20) >= 5  # 1.3 of a 1.00 cap
        assert _tall_runs(days, WARN, 20) >= 5  # 0.6: over 50%
        assert _tall_runs(days, OK_GREEN, 5) >= 10  # 0.3, 0.2, and today's 0.45

        # Live costs continue the same curve and today's bar.
        async with dispatcher(service.ws_url, DISPATCHER_TOKEN) as client:
            for n, usd in enumerate(["0.12", "0.1"]):
                await client.record(f"live-{n}", usd, model="haiku")
                await trio.sleep(0.3)
        after = """JSON.stringify({
          spend: document.getElementById("spend").textContent,
          alerts: document.querySelectorAll("#alerts li.threshold").length,
          today: window.budgetState.days[window.budgetState.days.length - 1].daily_spend,
          points: window.budgetState.points.length,
        })"""
        with trio.move_on_after(10):
            while not (live := json.loads(await tools.evaluate(after)))["alerts"]:
                await trio.sleep(0.1)
        assert (live["spend"], live["today"], live["alerts"]) == ("$0.67", "0.67", 1), live
        assert live["points"] >= 6  # midnight, three from the journal, the live ones
        await trio.sleep(1.2)  # the burn rates arrive with the next health answer
        whole = await tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        (ARTIFACTS / "page-history.png").write_bytes(base64.b64decode(whole["data"]))
