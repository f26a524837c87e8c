"""`admit`: reservations against the cap, settled by the cost or expired."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import trio
from trio_websocket import open_websocket_url

from budget_actor import make_config, open_budget
from budget_actor.core.cost import Cost
from budget_actor.core.ledger import Ledger
from budget_actor.net.server import serve

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
CONFIG = make_config(daily_cap="10.00", reservation_ttl_s=600)


def _h(ledger: Ledger, now: datetime = T0) -> tuple[Decimal, Decimal]:
    h = ledger.health(now, store="x", subscribers=0, uptime_s=0)
    return h.daily_spend, h.reserved


def test_reserve_settle_and_refuse() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.record(T0, Cost("earlier", Decimal("6")))
    first = ledger.admit(T0, "a", Decimal("3")).value
    assert (first.allowed, first.remaining) == (True, Decimal("1.00"))
    refused = ledger.admit(T0, "b", Decimal("1.01")).value
    assert (refused.allowed, refused.remaining) == (False, Decimal("1.00"))
    assert refused.reason is not None and "exceeds" in refused.reason
    assert _h(ledger) == (Decimal("6"), Decimal("3"))
    ledger.record(T0, Cost("a", Decimal("2.5")))  # settles at the real cost
    assert _h(ledger) == (Decimal("8.5"), Decimal("0"))
    again = ledger.admit(T0, "a", Decimal("0.1")).value
    assert not again.allowed and again.reason == "this dispatch_id was already counted today"
    fits = ledger.admit(T0, "b", Decimal("1.5")).value
    assert fits.allowed and fits.remaining == 0


def test_readmitting_replaces_and_reservations_expire() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.admit(T0, "a", Decimal("4"))
    ledger.admit(T0, "a", Decimal("5"))
    assert _h(ledger) == (Decimal(0), Decimal("5"))
    later = T0 + timedelta(minutes=5)
    ledger.admit(later, "b", Decimal("5"))
    assert not ledger.admit(later, "c", Decimal("0.01")).value.allowed
    assert _h(ledger, T0 + timedelta(minutes=10)) == (Decimal(0), Decimal("5"))  # "a" expired
    assert ledger.admit(T0 + timedelta(minutes=10), "c", Decimal("5")).value.allowed
    assert _h(ledger, T0 + timedelta(minutes=20)) == (Decimal(0), Decimal(0))


def test_a_refused_readmit_keeps_its_reservation_and_never_reports_a_negative_remaining() -> None:
    # The same rule as the shared store's (core/admission.py): what remains
    # is never below zero, even when the spend grew past the earlier estimate.
    ledger = Ledger(CONFIG, T0)
    assert ledger.admit(T0, "a", Decimal("1")).value.allowed
    ledger.record(T0, Cost("other", Decimal("9.5")))
    refused = ledger.admit(T0, "a", Decimal("2")).value
    assert (refused.allowed, refused.remaining) == (False, Decimal(0))
    assert _h(ledger) == (Decimal("9.5"), Decimal("1"))  # "a" still holds its 1


def test_concurrent_admitters_never_overrun_the_cap() -> None:
    ledger = Ledger(CONFIG, T0)
    allowed = [ledger.admit(T0, f"d{i}", Decimal("0.30")).value.allowed for i in range(50)]
    assert allowed.count(True) == 33  # 33 * 0.30 = 9.90; the 34th would pass 10.00
    for i, ok in enumerate(allowed):
        if ok:
            ledger.record(T0, Cost(f"d{i}", Decimal("0.30")))
    assert ledger.daily_spend == Decimal("9.90") <= CONFIG.daily_cap


async def test_admit_over_the_websocket(sqlite_url: str) -> None:
    async with open_budget(CONFIG, database=sqlite_url) as budget, trio.open_nursery() as nursery:
        port = await nursery.start(serve, budget, "127.0.0.1", 0)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:

            async def ask(message: dict[str, object]) -> dict[str, object]:
                await ws.send_message(json.dumps(message))
                reply: dict[str, object] = json.loads(await ws.get_message())
                return reply

            admitted = await ask({"type": "admit", "dispatch_id": "x", "estimate_usd": "9.5"})
            assert admitted == {
                "type": "admission",
                "dispatch_id": "x",
                "allowed": True,
                "remaining": "0.50",
            }
            refused = await ask({"type": "admit", "dispatch_id": "y", "estimate_usd": 1})
            assert refused["allowed"] is False and refused["remaining"] == "0.50"
            assert "exceeds" in str(refused["reason"])
            bad = await ask({"type": "admit", "dispatch_id": "z", "estimate_usd": "-1"})
            assert bad["type"] == "error" and bad["code"] == "invalid_cost"
            assert "estimate_usd" in str(bad["detail"])
            ack = await ask({"type": "cost", "dispatch_id": "x", "usd": "9"})
            assert ack["type"] == "ack"
            health = await ask({"type": "health"})
            assert (
                Decimal(str(health["daily_spend"])) == 9 and Decimal(str(health["reserved"])) == 0
            )
        nursery.cancel_scope.cancel()


async def test_metrics_count_costs_duplicates_and_errors(sqlite_url: str) -> None:
    async with open_budget(CONFIG, database=sqlite_url) as budget, trio.open_nursery() as nursery:
        port = await nursery.start(serve, budget, "127.0.0.1", 0)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            for frame in [
                {"type": "cost", "dispatch_id": "a", "usd": "1"},
                {"type": "cost", "dispatch_id": "a", "usd": "1"},
                {"type": "cost", "dispatch_id": "b", "usd": "-1"},
                {"type": "nope"},
            ]:
                await ws.send_message(json.dumps(frame))
                await ws.get_message()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            text = b""
            while chunk := await stream.receive_some(65536):
                text += chunk
        metrics = text.decode()
        for line in [
            "budget_costs_total 1.0",
            "budget_duplicates_total 1.0",
            'budget_errors_total{code="invalid_cost"} 1.0',
            'budget_errors_total{code="invalid_message"} 1.0',
            "budget_store_lag_seconds 0.0",
            # One cost was made durable: one ack latency, at least one commit.
            "budget_ack_latency_seconds_count 1.0",
        ]:
            assert f"\n{line}\n" in metrics, line
        assert "\nbudget_persist_latency_seconds 0.0\n" not in metrics
        assert "\nbudget_store_commit_duration_seconds_count 0.0\n" not in metrics
        nursery.cancel_scope.cancel()
