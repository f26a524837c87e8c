"""Black-box acceptance tests for budget_actor, written from PROTOCOL.md alone.

The service runs as a real process (``python -m budget_actor serve``); the tests
talk to it only over its WebSocket, its HTTP endpoints, its command line and its
database rows. (The "Access" section and the ``admit`` message are not covered.)
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio
from trio_websocket import ConnectionClosed

from ._client import (
    Launcher,
    Service,
    StuckClient,
    connect,
    fetch_all,
    fetch_row,
    free_closed_port,
    http_get,
    run_cli,
    sql_setup,
    wait_row,
)

pytestmark = pytest.mark.slow

SPEND_FIELDS = {"day", "daily_spend", "daily_cap", "remaining", "utilization", "dispatches", "seq"}
ALERT_FIELDS = {"to", "day", "threshold", "daily_spend", "daily_cap"}
HEALTH_FIELDS = {
    "status",
    "day",
    "daily_spend",
    "daily_cap",
    "remaining",
    "utilization",
    "alert_thresholds",
    "alerts_sent",
    "cycle_count",
    "cycles_until_persist",
    "last_persist_at",
    "store",
    "store_ok",
    "subscribers",
    "uptime_s",
}
PATCH_FIELDS = {"date", "daily_spend", "daily_cap", "cycle_count", "dispatches", "alerts_sent"}
NUDGE_FIELDS = {"to", "from", "day", "threshold", "daily_spend", "daily_cap", "created_at"}


# --------------------------------------------------------------------------
# Fixtures and small checks
# --------------------------------------------------------------------------


def store_kind(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "postgresql"


def money(value: Any) -> Decimal:
    """An amount: a JSON string holding a finite decimal."""
    assert isinstance(value, str), f"amount must be a JSON string, got {value!r}"
    amount = Decimal(value)
    assert amount.is_finite(), value
    return amount


def number(value: Any) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), (
        f"expected a JSON number, got {value!r}"
    )
    return float(value)


def integer(value: Any) -> int:
    assert isinstance(value, int) and not isinstance(value, bool), (
        f"expected a JSON integer, got {value!r}"
    )
    return value


def fraction(value: Any) -> Decimal:
    """A threshold as the service shows it (number, or string), as an exact decimal."""
    assert isinstance(value, int | float | str) and not isinstance(value, bool), value
    return Decimal(str(value))


def plausible_days(tz: str = "UTC") -> set[str]:
    """Today in ``tz``, allowing for a midnight crossed during the test."""
    now = datetime.now(ZoneInfo(tz))
    return {(now - timedelta(seconds=s)).date().isoformat() for s in (0, 60)}


def utc_iso(value: Any) -> datetime:
    if isinstance(value, datetime):
        stamp = value
    else:
        assert isinstance(value, str), value
        stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is not None:
        assert stamp.utcoffset() == timedelta(0), f"not UTC: {value!r}"
    return stamp


def check_spend(
    message: dict[str, Any],
    *,
    spend: str,
    cap: str,
    dispatches: int,
    tz: str = "UTC",
) -> None:
    assert message["type"] == "spend", message
    missing = SPEND_FIELDS - message.keys()
    assert not missing, f"spend lacks {missing}: {message}"
    assert message["day"] in plausible_days(tz), message
    assert money(message["daily_spend"]) == Decimal(spend), message
    assert money(message["daily_cap"]) == Decimal(cap), message
    assert money(message["remaining"]) == Decimal(cap) - Decimal(spend), message
    assert math.isclose(
        number(message["utilization"]), float(Decimal(spend) / Decimal(cap)), abs_tol=1e-9
    ), message
    assert integer(message["dispatches"]) == dispatches, message
    integer(message["seq"])


def check_health_shape(health: dict[str, Any]) -> None:
    missing = HEALTH_FIELDS - health.keys()
    assert not missing, f"health lacks {missing}: {health}"
    assert health["status"] in ("ok", "degraded"), health
    assert isinstance(health["day"], str), health
    for key in ("daily_spend", "daily_cap", "remaining"):
        money(health[key])
    number(health["utilization"])
    assert isinstance(health["alert_thresholds"], list), health
    assert isinstance(health["alerts_sent"], list), health
    integer(health["cycle_count"])
    integer(health["cycles_until_persist"])
    assert health["last_persist_at"] is None or isinstance(health["last_persist_at"], str)
    assert health["store"] in ("sqlite", "postgresql"), health
    assert isinstance(health["store_ok"], bool), health
    integer(health["subscribers"])
    assert number(health["uptime_s"]) >= 0, health


def alerts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "alert"]


def check_alert(
    message: dict[str, Any], *, threshold: str, spend: str, cap: str, to: str = "AG Lu"
) -> None:
    missing = ALERT_FIELDS - message.keys()
    assert not missing, f"alert lacks {missing}: {message}"
    assert message["to"] == to, message
    assert message["day"] in plausible_days(), message
    assert fraction(number(message["threshold"])) == Decimal(threshold), message
    assert money(message["daily_spend"]) == Decimal(spend), message
    assert money(message["daily_cap"]) == Decimal(cap), message


async def snapshot(url: str) -> dict[str, Any]:
    """A fresh subscriber's first spend message."""
    async with connect(url) as c:
        return await c.subscribe()


# --------------------------------------------------------------------------
# 1. subscribe
# --------------------------------------------------------------------------


async def test_ready_line_and_subscribe_snapshot(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    assert f"ws://{svc.host}:{svc.port}/ws" in svc.ready_line
    async with connect(svc.ws_url) as c:
        first = await c.subscribe()
        check_spend(first, spend="0", cap="10.00", dispatches=0)
        # Nothing else is owed: no alert, no second spend while nothing changes.
        assert await c.drain(0.25) == []
    assert await svc.stop() == 0


# --------------------------------------------------------------------------
# 2. cost, ack, pushes, exact amounts
# --------------------------------------------------------------------------


async def test_cost_ack_pushes_and_exact_amounts(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        first = await sub.subscribe()
        seq0 = first["seq"]

        steps = [
            # (dispatch_id, usd as sent, expected daily spend afterwards)
            ("d-1", "0.1", "0.1"),  # JSON string
            ("d-2", "#0.2", "0.3"),  # JSON number 0.2 -> 0.1 + 0.2 is exactly 0.3
            ("d-3", "#0.045864", "0.345864"),  # a number is read exactly from its text
            ("d-4", "#1e-7", "0.3458641"),  # exponent notation
            ("d-5", "#2.50", "2.8458641"),
        ]
        last_seq = seq0
        for n, (dispatch_id, usd, expected) in enumerate(steps, start=1):
            ack = await d.cost(dispatch_id, usd)
            assert set(ack) >= {"type", "dispatch_id", "duplicate", "seq"}, ack
            assert ack["duplicate"] is False, ack
            assert integer(ack["seq"]) > last_seq, (ack, last_seq)
            last_seq = ack["seq"]
            push = await sub.spend_at(ack["seq"])
            assert push["seq"] == ack["seq"], (push, ack)
            check_spend(push, spend=expected, cap="10.00", dispatches=n)
            # The string on the wire is the exact sum, not a float rendering.
            assert Decimal(push["daily_spend"]) == Decimal(expected), push

        again = await snapshot(svc.ws_url)
        check_spend(again, spend="2.8458641", cap="10.00", dispatches=5)
        assert again["seq"] == last_seq


async def test_cost_with_optional_fields(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        ack = await d.cost(
            "opt-1",
            "0.25",
            model="claude-x",
            input_tokens=1200,
            output_tokens=345,
            agent="AG Sun",
        )
        assert ack["duplicate"] is False
    check_spend(await snapshot(svc.ws_url), spend="0.25", cap="10.00", dispatches=1)


async def test_concurrent_dispatchers_exact_total(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    acks: list[dict[str, Any]] = []
    shared: list[dict[str, Any]] = []

    async def dispatcher(k: int) -> None:
        async with connect(svc.ws_url) as d:
            for i in range(50):
                acks.append(await d.cost(f"w{k}-{i}", "0.01"))
            shared.append(await d.cost("shared", "0.5"))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(dispatcher, k)

    assert all(a["duplicate"] is False for a in acks)
    assert sorted(a["duplicate"] for a in shared) == [False, True, True, True], shared
    counted = [a["seq"] for a in acks] + [a["seq"] for a in shared if not a["duplicate"]]
    assert len(set(counted)) == len(counted) == 201, "every accepted cost has its own seq"
    final = await snapshot(svc.ws_url)
    check_spend(final, spend="2.50", cap="10.00", dispatches=201)
    assert final["seq"] == max(counted)


# --------------------------------------------------------------------------
# 3. duplicates
# --------------------------------------------------------------------------


async def test_duplicate_dispatch_id(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        await sub.subscribe()
        first = await d.cost("dup-1", "0.40")
        assert first["duplicate"] is False
        await sub.spend_at(first["seq"])
        before = await snapshot(svc.ws_url)
        check_spend(before, spend="0.40", cap="10.00", dispatches=1)

        again = await d.cost("dup-1", "0.40")
        assert again["duplicate"] is True, again
        integer(again["seq"])
        other_amount = await d.cost("dup-1", "5.00")
        assert other_amount["duplicate"] is True, other_amount

        after = await snapshot(svc.ws_url)
        check_spend(after, spend="0.40", cap="10.00", dispatches=1)
        assert after["seq"] == before["seq"], "a duplicate is not an accepted cost"
        # No push shows a changed spend.
        for push in await sub.drain(0.25):
            if push["type"] == "spend":
                assert Decimal(push["daily_spend"]) == Decimal("0.40"), push
        health = await d.health()
        assert money(health["daily_spend"]) == Decimal("0.40"), health

        # A new id is still counted.
        fresh = await d.cost("dup-2", "0.10")
        assert fresh["duplicate"] is False
        check_spend(await sub.spend_at(fresh["seq"]), spend="0.50", cap="10.00", dispatches=2)


# --------------------------------------------------------------------------
# 4. the 80% alert
# --------------------------------------------------------------------------


async def test_alert_once_when_crossing_80_percent(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url, "--daily-cap", "1.00")
    async with (
        connect(svc.ws_url) as sub1,
        connect(svc.ws_url) as sub2,
        connect(svc.ws_url) as d,
    ):
        await sub1.subscribe()
        await sub2.subscribe()

        for dispatch_id, usd in [("a-1", "0.50"), ("a-2", "0.29")]:  # 79%: no alert yet
            ack = await d.cost(dispatch_id, usd)
            await sub1.spend_at(ack["seq"])
        await sub1.drain(0.25)
        assert alerts(sub1.log) == [], sub1.log

        ack = await d.cost("a-3", "0.02")  # 81%
        with trio.fail_after(5):
            alert = await sub1.recv_type("alert")
        check_alert(alert, threshold="0.8", spend="0.81", cap="1.00")
        check_alert(await sub2.recv_type("alert"), threshold="0.8", spend="0.81", cap="1.00")

        for i in range(5):  # further costs, past the cap too: no second alert
            ack = await d.cost(f"a-more-{i}", "0.10")
        await sub1.spend_at(ack["seq"])
        await sub2.spend_at(ack["seq"])
        await sub1.drain(0.25)
        await sub2.drain(0.1)
        assert len(alerts(sub1.log)) == 1, alerts(sub1.log)
        assert len(alerts(sub2.log)) == 1, alerts(sub2.log)

        health = await d.health()
        assert [fraction(t) for t in health["alerts_sent"]] == [Decimal("0.8")], health


async def test_several_thresholds_and_alert_to(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(
        sqlite_url, "--daily-cap", "2.00", "--alert-at", "0.5,0.8", "--alert-to", "Ops Desk"
    )
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        await sub.subscribe()
        ack = await d.cost("t-1", "1.70")  # 85%: crosses 50% and 80% at once
        await sub.spend_at(ack["seq"])
        await sub.drain(0.25)
        got = alerts(sub.log)
        assert sorted(fraction(a["threshold"]) for a in got) == [Decimal("0.5"), Decimal("0.8")]
        for a in got:
            check_alert(
                a, threshold=str(fraction(a["threshold"])), spend="1.70", cap="2.00", to="Ops Desk"
            )
        health = await d.health()
        assert sorted(fraction(t) for t in health["alert_thresholds"]) == [
            Decimal("0.5"),
            Decimal("0.8"),
        ], health
        assert sorted(fraction(t) for t in health["alerts_sent"]) == [
            Decimal("0.5"),
            Decimal("0.8"),
        ], health
        day = got[0]["day"]
    for percent in ("50", "80"):
        row = await wait_row(sqlite_url, "sibling_nudge", f"budget_alert_{day}_{percent}")
        assert row.body["to"] == "Ops Desk", row


# --------------------------------------------------------------------------
# 5. health and metrics
# --------------------------------------------------------------------------


async def test_health_message(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        await sub.subscribe()
        await d.cost("h-1", "0.3")

        with_id = await d.health(id="probe-7")
        assert with_id["type"] == "health"
        assert with_id["id"] == "probe-7", with_id
        check_health_shape(with_id)

        without_id = await d.health()
        assert "id" not in without_id, without_id
        check_health_shape(without_id)

        h = without_id
        assert h["status"] == "ok", h
        assert h["day"] in plausible_days(), h
        assert money(h["daily_spend"]) == Decimal("0.3"), h
        assert money(h["daily_cap"]) == Decimal("10.00"), h
        assert money(h["remaining"]) == Decimal("9.70"), h
        assert math.isclose(number(h["utilization"]), 0.03, abs_tol=1e-9), h
        assert [fraction(t) for t in h["alert_thresholds"]] == [Decimal("0.8")], h
        assert h["alerts_sent"] == [], h
        assert h["cycle_count"] == 0, h
        assert h["cycles_until_persist"] == 10, h
        assert h["store"] == store_kind(database_url), h
        assert h["store_ok"] is True, h
        assert h["subscribers"] == 1, h

        for _ in range(3):
            await d.send({"type": "cycle"})
        with trio.fail_after(5):
            while (h := await d.health())["cycle_count"] < 3:
                await trio.sleep(0.02)
        assert h["cycle_count"] == 3, h
        assert h["cycles_until_persist"] == 7, h
        # cycle has no answer
        assert [m for m in await d.drain(0.25) if m["type"] != "health"] == []


async def test_http_health_and_metrics(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as d:
        await d.cost("m-1", "0.1")
        await d.cost("m-2", "#0.2")
        ws_health = await d.health()

    reply = await http_get(f"{svc.http_base}/health")
    assert reply.status == 200, reply
    assert "application/json" in reply.headers.get("content-type", ""), reply.headers
    h = reply.json()
    check_health_shape(h)
    assert h["status"] == "ok"
    assert money(h["daily_spend"]) == Decimal("0.3"), h
    assert money(h["daily_cap"]) == Decimal("10.00"), h
    assert money(h["remaining"]) == Decimal("9.70"), h
    assert h["store"] == store_kind(database_url)
    assert h["store_ok"] is True
    for key in HEALTH_FIELDS - {"uptime_s", "subscribers", "last_persist_at"}:
        assert h[key] == ws_health[key], (key, h[key], ws_health[key])

    metrics = await http_get(f"{svc.http_base}/metrics")
    assert metrics.status == 200, metrics
    assert metrics.headers.get("content-type", "").startswith("text/plain"), metrics.headers
    text = metrics.body.decode()
    samples: dict[str, float] = {}
    sample_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)(\s+-?\d+)?$")
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = sample_re.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match[1] + (match[2] or "")] = float(match[3])
    spend = {k: v for k, v in samples.items() if "spend" in k and "cap" not in k}
    assert any(math.isclose(v, 0.3, abs_tol=1e-12) for v in spend.values()), (
        f"no spend sample equal to 0.3 in:\n{text}"
    )
    cap = {k: v for k, v in samples.items() if "cap" in k}
    assert any(v == 10.0 for v in cap.values()), f"no daily cap sample of 10 in:\n{text}"


# --------------------------------------------------------------------------
# 6. bad messages
# --------------------------------------------------------------------------

BOTH = {"invalid_message", "invalid_cost"}
MSG = {"invalid_message"}
COST = {"invalid_cost"}

# (name, frame text, acceptable codes, the field the detail must name or None)
BAD_MESSAGES: list[tuple[str, str, set[str], str | None]] = [
    ("negative string", '{"type":"cost","dispatch_id":"b1","usd":"-0.01"}', COST, "usd"),
    ("negative number", '{"type":"cost","dispatch_id":"b2","usd":-1}', COST, "usd"),
    ("NaN string", '{"type":"cost","dispatch_id":"b3","usd":"NaN"}', COST, "usd"),
    ("NaN token", '{"type":"cost","dispatch_id":"b4","usd":NaN}', BOTH, None),
    ("Infinity string", '{"type":"cost","dispatch_id":"b5","usd":"Infinity"}', COST, "usd"),
    ("abc", '{"type":"cost","dispatch_id":"b6","usd":"abc"}', BOTH, "usd"),
    ("above max-cost", '{"type":"cost","dispatch_id":"b7","usd":"5.01"}', COST, "usd"),
    ("above max-cost number", '{"type":"cost","dispatch_id":"b8","usd":5.000001}', COST, "usd"),
    ("huge number", '{"type":"cost","dispatch_id":"b9","usd":1e400}', COST, "usd"),
    ("usd missing", '{"type":"cost","dispatch_id":"b10"}', BOTH, "usd"),
    ("usd bool", '{"type":"cost","dispatch_id":"b11","usd":true}', BOTH, "usd"),
    ("dispatch_id missing", '{"type":"cost","usd":"0.5"}', BOTH, "dispatch_id"),
    ("dispatch_id int", '{"type":"cost","dispatch_id":12,"usd":"0.5"}', BOTH, "dispatch_id"),
    (
        "input_tokens not int",
        '{"type":"cost","dispatch_id":"b12","usd":"0.5","input_tokens":"many"}',
        BOTH,
        "input_tokens",
    ),
    ("unknown type", '{"type":"bogus","dispatch_id":"b13","usd":"0.5"}', MSG, None),
    ("type missing", '{"dispatch_id":"b14","usd":"0.5"}', MSG, None),
    ("not JSON", "this is not json {", MSG, None),
    ("JSON array", '[{"type":"cost","dispatch_id":"b15","usd":"0.5"}]', MSG, None),
    ("JSON string", '"cost"', MSG, None),
    ("health id not str", '{"type":"health","id":5}', MSG, "id"),
]


async def test_bad_messages_refused_and_change_nothing(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url, "--max-cost", "5")
    problems: list[str] = []
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        before = await sub.subscribe()
        check_spend(before, spend="0", cap="10.00", dispatches=0)

        for name, text, codes, field in BAD_MESSAGES:
            await d.send(text)
            try:
                reply = await d.recv(timeout=5)
            except trio.TooSlowError:
                problems.append(f"{name}: no reply within 5 s")
                continue
            except ConnectionClosed as exc:
                problems.append(f"{name}: connection closed ({exc.reason})")
                break
            if reply["type"] != "error":
                problems.append(f"{name}: expected error, got {reply}")
                continue
            if reply.get("code") not in codes:
                problems.append(f"{name}: expected code in {sorted(codes)}, got {reply}")
            detail = reply.get("detail")
            if not isinstance(detail, str) or not detail:
                problems.append(f"{name}: no human-readable detail: {reply}")
            elif field is not None and field not in detail:
                problems.append(f"{name}: detail does not name {field!r}: {reply}")

        extra = await d.drain(0.25)
        if extra:
            problems.append(f"unexpected extra replies: {extra}")
        pushes = await sub.drain(0.1)
        if pushes:
            problems.append(f"bad messages caused pushes: {pushes}")
        assert not problems, "\n".join(problems)

        # Nothing changed ...
        after = await snapshot(svc.ws_url)
        check_spend(after, spend="0", cap="10.00", dispatches=0)
        assert after["seq"] == before["seq"], (before, after)
        # ... none of those dispatch ids was counted ...
        for i in (1, 2, 3, 7, 8, 9):
            ack = await d.cost(f"b{i}", "0.01")
            assert ack["duplicate"] is False, f"refused cost b{i} was recorded: {ack}"
        # ... exactly max-cost is allowed, and the connection still works.
        ack = await d.cost("at-max", "5")
        assert ack["duplicate"] is False
        check_spend(await snapshot(svc.ws_url), spend="5.06", cap="10.00", dispatches=7)


# --------------------------------------------------------------------------
# 7. frame size limit
# --------------------------------------------------------------------------


async def test_oversized_frame_closes_with_1009(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as bystander:
        await bystander.subscribe()

        # Just under the limit does not close the connection (whatever the
        # service thinks of the padding, it answers and stays open).
        async with connect(svc.ws_url) as c:
            await c.send({"type": "health", "id": "big", "pad": "y" * 60_000})
            answer = await c.recv()
            assert answer["type"] in ("health", "error"), answer
            assert (await c.health(id="small"))["id"] == "small"

        # Over 64 KiB closes that connection with 1009.
        code: int | None = None
        seen: list[dict[str, Any]] = []
        async with connect(svc.ws_url) as c:
            try:
                await c.send({"type": "health", "id": "x" * (70 * 1024)})
                with trio.fail_after(5):
                    while True:
                        seen.append(await c.recv(timeout=5))
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
        assert code == 1009, f"close code {code}, messages before close: {seen}"
        for m in seen:
            assert m["type"] == "error" and m["code"] == "too_large", m

        # The service keeps serving: the old connection and new ones.
        async with connect(svc.ws_url) as d:
            ack = await d.cost("after-big", "0.5")
        push = await bystander.spend_at(ack["seq"])
        check_spend(push, spend="0.5", cap="10.00", dispatches=1)
        check_spend(await snapshot(svc.ws_url), spend="0.5", cap="10.00", dispatches=1)


# --------------------------------------------------------------------------
# 8. database rows
# --------------------------------------------------------------------------


async def test_budget_patch_after_ten_cycles(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as d:
        day = (await d.subscribe())["day"]
        await d.cost("p-1", "0.1")
        await d.cost("p-2", "#0.2")
        await d.cost("p-3", "#0.045864")
        for _ in range(10):
            await d.send({"type": "cycle"})
        row = await wait_row(
            database_url,
            "budget",
            f"budget_{day}",
            until=lambda r: r.body.get("cycle_count") == 10,
        )
        missing = PATCH_FIELDS - row.body.keys()
        assert not missing, f"budget patch lacks {missing}: {row.body}"
        assert row.body["date"] == day, row.body
        assert money(row.body["daily_spend"]) == Decimal("0.345864"), row.body
        assert money(row.body["daily_cap"]) == Decimal("10.00"), row.body
        assert integer(row.body["cycle_count"]) == 10
        assert integer(row.body["dispatches"]) == 3, row.body
        assert row.body["alerts_sent"] == [], row.body
        utc_iso(row.created_at)
        utc_iso(row.updated_at)

        h = await d.health()
        assert h["cycle_count"] == 10, h
        assert h["cycles_until_persist"] == 10, h
        assert isinstance(h["last_persist_at"], str), h
        utc_iso(h["last_persist_at"])


async def test_persist_every_option(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url, "--persist-every", "3")
    async with connect(svc.ws_url) as d:
        day = (await d.subscribe())["day"]
        await d.cost("pe-1", "1.25")
        h = await d.health()
        assert h["cycles_until_persist"] == 3, h
        for _ in range(3):
            await d.send({"type": "cycle"})
        row = await wait_row(
            sqlite_url, "budget", f"budget_{day}", until=lambda r: r.body.get("cycle_count") == 3
        )
        assert money(row.body["daily_spend"]) == Decimal("1.25"), row.body
        assert row.body["dispatches"] == 1, row.body


async def test_alert_nudge_row(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url, "--daily-cap", "1.00")
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        day = (await sub.subscribe())["day"]
        await d.cost("n-1", "0.85")
        check_alert(await sub.recv_type("alert"), threshold="0.8", spend="0.85", cap="1.00")
    row = await wait_row(database_url, "sibling_nudge", f"budget_alert_{day}_80")
    missing = NUDGE_FIELDS - row.body.keys()
    assert not missing, f"nudge lacks {missing}: {row.body}"
    assert row.body["to"] == "AG Lu", row.body
    assert isinstance(row.body["from"], str) and row.body["from"], row.body
    assert row.body["day"] == day, row.body
    assert fraction(row.body["threshold"]) == Decimal("0.8"), row.body
    assert money(row.body["daily_spend"]) == Decimal("0.85"), row.body
    assert money(row.body["daily_cap"]) == Decimal("1.00"), row.body
    utc_iso(row.body["created_at"])
    nudges = [r for r in await fetch_all(database_url) if r.type == "sibling_nudge"]
    assert [r.name for r in nudges] == [f"budget_alert_{day}_80"], nudges


async def test_rows_it_does_not_own_are_untouched(database_url: str, launcher: Launcher) -> None:
    if database_url.startswith("sqlite:"):
        create = (
            "CREATE TABLE quilt_patches (type TEXT NOT NULL, name TEXT NOT NULL, body TEXT,"
            " created_at TEXT, updated_at TEXT, PRIMARY KEY (type, name))"
        )
        body = json.dumps({"note": "mine", "n": 1})
        stamp = "2020-01-01T00:00:00+00:00"
    else:
        create = (
            "CREATE TABLE quilt_patches (type text NOT NULL, name text NOT NULL, body jsonb,"
            " created_at timestamptz, updated_at timestamptz, PRIMARY KEY (type, name))"
        )
        body = json.dumps({"note": "mine", "n": 1})
        stamp = "2020-01-01T00:00:00+00:00"
    insert = (
        "INSERT INTO quilt_patches (type, name, body, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, %s)"
    )
    await trio.to_thread.run_sync(
        sql_setup,
        database_url,
        [
            (create, ()),
            (insert, ("agent_note", "note_1", body, stamp, stamp)),
            (insert, ("sibling_nudge", "hello_from_ag_sun", body, stamp, stamp)),
        ],
    )
    before = {(r.type, r.name): r for r in await fetch_all(database_url)}

    svc = await launcher.start(database_url, "--daily-cap", "1.00", "--persist-every", "2")
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        day = (await sub.subscribe())["day"]
        await d.cost("o-1", "0.9")
        await sub.recv_type("alert")
        for _ in range(2):
            await d.send({"type": "cycle"})
        await wait_row(database_url, "budget", f"budget_{day}")
    assert await svc.stop() == 0

    after = {(r.type, r.name): r for r in await fetch_all(database_url)}
    for key, row in before.items():
        assert key in after, f"row {key} was dropped"
        assert after[key].body == row.body, (row, after[key])
        assert after[key].created_at == row.created_at
        assert after[key].updated_at == row.updated_at
    assert ("budget", f"budget_{day}") in after
    assert ("sibling_nudge", f"budget_alert_{day}_80") in after


# --------------------------------------------------------------------------
# 9. restart
# --------------------------------------------------------------------------


async def test_restart_restores_spend_and_sends_no_second_alert(
    database_url: str, launcher: Launcher
) -> None:
    svc = await launcher.start(database_url, "--daily-cap", "1.00")
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        await sub.subscribe()
        await d.cost("r-1", "0.5")
        await d.cost("r-2", "#0.35")
        check_alert(await sub.recv_type("alert"), threshold="0.8", spend="0.85", cap="1.00")
    assert await svc.stop() == 0

    svc2 = await launcher.start(database_url, "--daily-cap", "1.00")
    async with connect(svc2.ws_url) as sub, connect(svc2.ws_url) as d:
        first = await sub.subscribe()
        check_spend(first, spend="0.85", cap="1.00", dispatches=2)
        h = await d.health()
        assert [fraction(t) for t in h["alerts_sent"]] == [Decimal("0.8")], h
        ack = None
        for i in range(3):
            ack = await d.cost(f"r-more-{i}", "0.05")
        assert ack is not None
        check_spend(await sub.spend_at(ack["seq"]), spend="1.00", cap="1.00", dispatches=5)
        await sub.drain(0.25)
        assert alerts(sub.log) == [], alerts(sub.log)
    assert await svc2.stop() == 0


async def test_duplicate_detected_across_restart(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url)
    async with connect(svc.ws_url) as d:
        await d.cost("x-1", "0.7")
    assert await svc.stop() == 0
    svc2 = await launcher.start(database_url)
    async with connect(svc2.ws_url) as d:
        again = await d.cost("x-1", "0.7")
        assert again["duplicate"] is True, again
    check_spend(await snapshot(svc2.ws_url), spend="0.7", cap="10.00", dispatches=1)


async def test_no_second_alert_after_kill(database_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(database_url, "--daily-cap", "1.00")
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        day = (await sub.subscribe())["day"]
        await d.cost("k-1", "0.9")
        await sub.recv_type("alert")
    nudge = await wait_row(database_url, "sibling_nudge", f"budget_alert_{day}_80")
    svc.signal(signal.SIGKILL)
    await svc.wait_exit()

    svc2 = await launcher.start(database_url, "--daily-cap", "1.00")
    async with connect(svc2.ws_url) as sub, connect(svc2.ws_url) as d:
        await sub.subscribe()
        ack = await d.cost("k-2", "0.9")
        await sub.spend_at(ack["seq"])
        await sub.drain(0.25)
        assert alerts(sub.log) == [], "the 80% alert was sent twice in one day"
    again = await fetch_row(database_url, "sibling_nudge", f"budget_alert_{day}_80")
    assert again is not None and again.body == nudge.body


async def test_sigint_persists_and_exits_0(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        day = (await d.subscribe())["day"]
        await d.cost("s-1", "0.25")
        await d.send({"type": "cycle"})
    svc.signal(signal.SIGINT)
    assert await svc.wait_exit() == 0
    row = await fetch_row(sqlite_url, "budget", f"budget_{day}")
    assert row is not None, "no budget patch written at shutdown"
    assert money(row.body["daily_spend"]) == Decimal("0.25"), row.body
    assert row.body["dispatches"] == 1, row.body


async def test_default_database_is_budget_db_in_working_directory(launcher: Launcher) -> None:
    svc = await launcher.start(None)
    async with connect(svc.ws_url) as d:
        day = (await d.subscribe())["day"]
        await d.cost("def-1", "0.5")
    assert await svc.stop() == 0
    db = launcher.workdir / "budget.db"
    assert db.exists(), list(launcher.workdir.iterdir())
    row = await fetch_row(f"sqlite:///{db}", "budget", f"budget_{day}")
    assert row is not None
    assert money(row.body["daily_spend"]) == Decimal("0.5"), row.body


# --------------------------------------------------------------------------
# Options from the environment, time zone
# --------------------------------------------------------------------------


async def test_options_from_environment(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(
        None,
        env={
            "BUDGET_DATABASE_URL": sqlite_url,
            "BUDGET_DAILY_CAP": "2.50",
            "BUDGET_ALERT_AT": "0.5",
            "BUDGET_ALERT_TO": "Ops Desk",
            "BUDGET_PERSIST_EVERY": "4",
            "BUDGET_MAX_COST": "1",
        },
    )
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        check_spend(await sub.subscribe(), spend="0", cap="2.50", dispatches=0)
        h = await d.health()
        assert h["store"] == "sqlite", h
        assert h["cycles_until_persist"] == 4, h
        assert [fraction(t) for t in h["alert_thresholds"]] == [Decimal("0.5")], h
        refused = await d.request({"type": "cost", "dispatch_id": "e-0", "usd": "1.01"}, "error")
        assert refused["code"] == "invalid_cost", refused
        await d.cost("e-1", "1")
        await d.cost("e-2", "0.5")  # 60%
        check_alert(
            await sub.recv_type("alert"), threshold="0.5", spend="1.5", cap="2.50", to="Ops Desk"
        )
    assert not (launcher.workdir / "budget.db").exists()
    assert Path(sqlite_url.removeprefix("sqlite:///")).exists()


async def test_option_overrides_environment(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url, "--daily-cap", "3.00", env={"BUDGET_DAILY_CAP": "2.50"})
    check_spend(await snapshot(svc.ws_url), spend="0", cap="3.00", dispatches=0)


async def test_timezone_sets_the_day(sqlite_url: str, launcher: Launcher) -> None:
    # Of UTC+14 and UTC-11 (25 hours apart), one is always on another date
    # than UTC: pick that one, so a service that ignored --timezone fails.
    utc_day = datetime.now(UTC).date().isoformat()
    tz = next(
        z
        for z in ("Pacific/Kiritimati", "Pacific/Pago_Pago")
        if datetime.now(ZoneInfo(z)).date().isoformat() != utc_day
    )
    svc = await launcher.start(sqlite_url, "--timezone", tz)
    first = await snapshot(svc.ws_url)
    assert first["day"] in plausible_days(tz), (first, plausible_days(tz))
    assert first["day"] != utc_day or datetime.now(ZoneInfo(tz)).date().isoformat() == utc_day
    async with connect(svc.ws_url) as d:
        h = await d.health()
    assert h["day"] == first["day"]


# --------------------------------------------------------------------------
# 10. bad options, unreachable database
# --------------------------------------------------------------------------


async def usage_error_problem(args: list[str], env: dict[str, str] | None = None) -> str | None:
    """None if ``budget-actor ARGS`` exits 2 with one line on stderr; else what went wrong."""
    shown = " ".join(args) + (f" with {env}" if env else "")
    try:
        done = await run_cli(*args, env=env, timeout=15)
    except subprocess.TimeoutExpired:
        return f"{shown}: kept running instead of exiting 2"
    if done.code != 2:
        return f"{shown}: exit code {done.code}, expected 2; stderr: {done.stderr!r}"
    if len(done.stderr_lines) != 1 or not done.stderr_lines[0].strip():
        return f"{shown}: expected exactly one line on stderr, got {done.stderr!r}"
    if "ws://" in done.stdout:
        return f"{shown}: printed a ready line: {done.stdout!r}"
    return None


async def expect_usage_errors(cases: list[tuple[list[str], dict[str, str] | None]]) -> None:
    problems: list[str] = []
    limit = trio.CapacityLimiter(4)

    async def one(args: list[str], env: dict[str, str] | None) -> None:
        async with limit:
            problem = await usage_error_problem(args, env)
        if problem:
            problems.append(problem)

    async with trio.open_nursery() as nursery:
        for args, env in cases:
            nursery.start_soon(one, args, env)
    assert not problems, "\n".join(problems)


BAD_OPTIONS = [
    ["--daily-cap", "abc"],
    ["--daily-cap", "-1"],
    ["--persist-every", "0"],
    ["--alert-at", "abc"],
    ["--max-cost", "-5"],
    ["--timezone", "Mars/Olympus_Mons"],
    ["--port", "abc"],
    ["--no-such-option"],
    ["--instance-id", "has space"],
    ["--sync-interval", "0"],
    ["--dedupe-cache", "-1"],
    ["--dedupe-cache", "lots"],
]
BAD_ENVIRONMENTS = [
    {"BUDGET_DAILY_CAP": "abc"},
    {"BUDGET_PORT": "abc"},
    {"BUDGET_SYNC_INTERVAL": "soon"},
    {"BUDGET_DEDUPE_CACHE": "10000001"},
]


async def test_serve_bad_options_exit_2(sqlite_url: str) -> None:
    """Each bad option (or environment variable): exit code 2, exactly one line on
    stderr. The cases run side by side; every failing case is listed."""
    cases: list[tuple[list[str], dict[str, str] | None]] = []
    for bad in BAD_OPTIONS:
        port = [] if bad[0] == "--port" else ["--port", "0"]
        cases.append((["serve", *port, "--database", sqlite_url, *bad], None))
    for env in BAD_ENVIRONMENTS:
        # An option given on the command line wins over its variable, so the
        # variable under test is the only source of that setting.
        port = [] if "BUDGET_PORT" in env else ["--port", "0"]
        cases.append((["serve", *port, "--database", sqlite_url], env))
    await expect_usage_errors(cases)


async def test_serve_unreachable_database_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    urls = [
        f"postgresql://postgres@127.0.0.1:{free_closed_port()}/x",  # nothing listens
        f"sqlite:///{blocker}/budget.db",  # its directory is a regular file
        "mysql://127.0.0.1/x",  # no such store
    ]
    await expect_usage_errors([(["serve", "--port", "0", "--database", u], None) for u in urls])


# --------------------------------------------------------------------------
# 11. status
# --------------------------------------------------------------------------


async def test_status_command(sqlite_url: str, launcher: Launcher) -> None:
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        await d.cost("st-1", "1.2345")

    text = await run_cli("status", "--url", svc.ws_url)
    assert text.code == 0, text
    assert "1.2345" in text.stdout, text.stdout

    as_json = await run_cli("status", "--url", svc.ws_url, "--json")
    assert as_json.code == 0, as_json
    health = json.loads(as_json.stdout)
    check_health_shape(health)
    assert health["status"] == "ok"
    assert money(health["daily_spend"]) == Decimal("1.2345"), health
    assert health["store"] == "sqlite"


async def test_status_against_closed_port_exits_2() -> None:
    done = await run_cli("status", "--url", f"ws://127.0.0.1:{free_closed_port()}/ws")
    assert done.code == 2, done
    assert len(done.stderr_lines) == 1, done.stderr
    assert done.stdout == "", done.stdout


# --------------------------------------------------------------------------
# 12. slow subscribers
# --------------------------------------------------------------------------


async def _flood_and_check(svc: Service, n: int, usd: str, cap: str, alert_spend: str) -> None:
    """Another dispatcher sends ``n`` costs and gets every ack; a normal subscriber
    ends on the newest spend and gets the one alert."""
    async with connect(svc.ws_url) as sub, connect(svc.ws_url) as d:
        await sub.subscribe()
        last: dict[str, Any] = {}
        with trio.fail_after(20):
            for i in range(n):
                last = await d.cost(f"f-{i}", usd)
                assert last["duplicate"] is False
        with trio.fail_after(10):
            newest = await sub.spend_at(last["seq"])
        assert newest["seq"] == last["seq"], (newest, last)
        total = Decimal(usd) * n
        check_spend(newest, spend=str(total), cap=cap, dispatches=n)
        await sub.drain(0.25)
        spends = sub.of_type("spend")
        seqs = [m["seq"] for m in spends]
        assert seqs == sorted(seqs), "pushes went back in time"
        assert spends[-1]["seq"] == last["seq"], spends[-1]
        got = alerts(sub.log)
        assert len(got) == 1, got
        check_alert(got[0], threshold="0.8", spend=alert_spend, cap=cap)
        # A new client is served promptly too.
        with trio.fail_after(5):
            check_spend(await snapshot(svc.ws_url), spend=str(total), cap=cap, dispatches=n)


async def test_stuck_subscriber_does_not_slow_the_service(
    database_url: str, launcher: Launcher
) -> None:
    svc = await launcher.start(database_url, "--daily-cap", "4.00")
    stuck = StuckClient(svc.host, svc.port)
    try:
        await stuck.open()
        await stuck.send({"type": "subscribe"})
        await trio.sleep(0.1)
        # 300 x 0.013 = 3.9; 80% of 4.00 is crossed at the 247th cost (3.211).
        await _flood_and_check(svc, 300, "0.013", "4.00", "3.211")
    finally:
        stuck.close()


async def test_stuck_reader_with_unread_replies_does_not_slow_the_service(
    sqlite_url: str, launcher: Launcher
) -> None:
    svc = await launcher.start(sqlite_url, "--daily-cap", "4.00")
    stuck = StuckClient(svc.host, svc.port)
    try:
        await stuck.open()
        await stuck.send({"type": "subscribe"})

        async def pile_up() -> None:
            # Megabytes of health replies that are never read.
            for i in range(4000):
                await stuck.send({"type": "health", "id": f"{i}-" + "z" * 240})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pile_up)
            await trio.sleep(0.3)
            # 200 x 0.017 = 3.4; 80% of 4.00 is crossed at the 189th cost (3.213).
            await _flood_and_check(svc, 200, "0.017", "4.00", "3.213")
            nursery.cancel_scope.cancel()
    finally:
        stuck.close()


# --------------------------------------------------------------------------
# Last, so that a run with -x has covered everything else first.
# --------------------------------------------------------------------------


async def test_cost_number_with_many_digits_read_exactly(
    sqlite_url: str, launcher: Launcher
) -> None:
    """The contract refuses only NaN, infinite, negative and above-maximum amounts,
    and reads a JSON number exactly from its text: 0.30000000000000004 (the float
    sum 0.1 + 0.2) must be counted as written, not rounded and not refused."""
    svc = await launcher.start(sqlite_url)
    async with connect(svc.ws_url) as d:
        await d.cost("md-1", "#0.30000000000000004")
        await d.cost("md-2", "0.000000000000000001")
    check_spend(await snapshot(svc.ws_url), spend="0.300000000000000041", cap="10.00", dispatches=2)
