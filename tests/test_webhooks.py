"""Alert webhooks: stored with the nudge, delivered at least once with
``Idempotency-Key``, retried with backoff through a receiver that fails, hangs
and recovers, never in the way of the budget actor, and resumed by a restarted
service (a real process)."""

from __future__ import annotations

import json
import signal
import sqlite3
import ssl
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from budget_actor import make_config, open_budget, open_store
from budget_actor.core.cost import Cost
from budget_actor.core.records import Alert, JournalEntry
from budget_actor.core.webhook import (
    WebhookUrl,
    body,
    parse_webhook_url,
    redacted,
    retry_delay,
    target_of,
    text,
)
from budget_actor.runtime.stats import WebhookStats
from budget_actor.runtime.webhooks import WebhookPolicy, WebhookSender, post
from budget_actor.stores.store import Store

from ._client import Launcher, connect, http_get, run_cli
from ._helpers import eventually, rows
from ._proxy import CuttableProxy
from ._proxy import target_of as target_of_url
from ._receiver import Receiver
from .test_hostile import self_signed

T0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
DAY = "2026-12-01"
# Fast enough for a test: a hang is an attempt that fails after half a second.
FAST = WebhookPolicy(attempt_timeout_s=0.5, retry_initial_s=0.05, retry_max_s=0.2, poll_s=0.05)


def _alert(threshold: str = "0.8", spend: str = "8.5") -> Alert:
    return Alert(
        to="AG Lu",
        day=DAY,
        threshold=Decimal(threshold),
        daily_spend=Decimal(spend),
        daily_cap=Decimal("10.00"),
        created_at=T0,
    )


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


# -- pure ------------------------------------------------------------------------


def test_the_body_is_the_alert_message_plus_a_sentence() -> None:
    alert = _alert()
    assert json.loads(body(alert)) == {
        "type": "alert",
        "to": "AG Lu",
        "day": DAY,
        "threshold": 0.8,
        "daily_spend": "8.5",
        "daily_cap": "10.00",
        "text": "budget_actor: 80% of the daily cap reached on 2026-12-01: $8.5 of $10.00"
        " (alert to AG Lu)",
    }
    forecast = Alert(
        to="AG Lu",
        day=DAY,
        threshold=Decimal(1),
        daily_spend=Decimal("2"),
        daily_cap=Decimal("10.00"),
        created_at=T0,
        kind="forecast",
        projected_spend=Decimal("12.5"),
    )
    sent = json.loads(body(forecast))
    assert (sent["kind"], sent["projected_spend"]) == ("forecast", "12.5")
    assert sent["text"] == text(forecast) and "projected to reach $12.5" in sent["text"]


def test_webhook_urls_are_checked_and_never_shown_whole() -> None:
    hook = parse_webhook_url("https://hooks.example.com/services/T0/B0/SECRET")
    assert (hook.tls, hook.host, hook.port, hook.target) == (
        True,
        "hooks.example.com",
        443,
        "/services/T0/B0/SECRET",
    )
    assert redacted(hook) == "https://hooks.example.com/…"
    assert "SECRET" not in target_of(hook.url)
    plain = parse_webhook_url("http://[::1]:8080/h?k=v")
    assert (plain.authority, plain.target) == ("[::1]:8080", "/h?k=v")
    for bad in ("ftp://x/y", "hooks.example.com/x", "http:///x", "http://x/a b", "http://x:99999/"):
        with pytest.raises(ValueError) as refused:
            parse_webhook_url(bad)
        assert "/x" not in str(refused.value) and "a b" not in str(refused.value)


def test_retries_back_off_to_a_ceiling() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(30) == 300.0


async def test_https_webhooks_verify_the_receivers_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    receiver = Receiver(mode="ok")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run, server)
        hook = parse_webhook_url(f"https://127.0.0.1:{receiver.port}/tls?k=v")
        trusting = ssl.create_default_context(cafile=str(cert))
        with trio.fail_after(10):
            status = await post(hook, b'{"text":"hi"}', [("Idempotency-Key", "k-1")], trusting)
        assert status == 200
        assert receiver.requests[0].target == "/tls?k=v"
        assert receiver.requests[0].headers["host"] == f"127.0.0.1:{receiver.port}"
        # The system's CAs do not know this certificate: refused, not sent.
        with pytest.raises(trio.BrokenResourceError) as refused, trio.fail_after(10):
            await post(hook, b"{}", [])
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
        assert len(receiver.requests) == 1
        nursery.cancel_scope.cancel()


# -- the store ---------------------------------------------------------------------


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = open_store(database_url)
    s.webhook_targets = ("t-one", "t-two")
    s.open()
    yield s
    s.close()


def _crossed(store: Store) -> None:
    """A cost and the 80% alert it crossed (on PostgreSQL the nudge row needs
    the shared spend in the store to have reached the threshold)."""
    entry = JournalEntry(seq=1, day=DAY, at=T0, cost=Cost("a", Decimal("8.5")))
    store.write([entry], [], [_alert()], T0)


def test_deliveries_are_written_with_the_nudge_once(database_url: str, store: Store) -> None:
    _crossed(store)
    store.write([], [], [_alert()], T0)  # the nudge exists: no new deliveries
    found = rows(database_url, "SELECT target, name, body, attempts FROM budget_webhooks")
    assert sorted((t, n, a) for t, n, _, a in found) == [
        ("t-one", f"budget_alert_{DAY}_80", 0),
        ("t-two", f"budget_alert_{DAY}_80", 0),
    ]
    assert all(json.loads(b) == json.loads(body(_alert())) for _, _, b, _ in found)


def test_a_due_delivery_is_claimed_once_and_retried_when_it_fails(
    database_url: str, store: Store
) -> None:
    _crossed(store)
    other = store.companion()
    try:
        first = store.webhooks_due(["t-one"], T0, "me", 60, 10)
        assert [(d.target, d.attempts) for d in first.claimed] == [("t-one", 1)]
        assert first.pending == 1
        # Leased: neither another process nor this one gets it again.
        assert other.webhooks_due(["t-one"], T0, "you", 60, 10).claimed == []
        later = store.webhooks_due(["t-one"], T0 + timedelta(seconds=30), "me", 60, 10)
        assert later.claimed == [] and later.next_due_s == pytest.approx(30)
        # Failed: due again at the retry time, for anyone.
        store.webhook_failed("t-one", first.claimed[0].name, "me", T0 + timedelta(seconds=2), "500")
        assert other.webhooks_due(["t-one"], T0 + timedelta(seconds=1), "you", 60, 10).claimed == []
        again = other.webhooks_due(["t-one"], T0 + timedelta(seconds=2), "you", 60, 10)
        assert [d.attempts for d in again.claimed] == [2]
        # A late failure report of the old claimer changes nothing now.
        store.webhook_failed("t-one", first.claimed[0].name, "me", T0, "late")
        assert store.webhooks_due(["t-one"], T0 + timedelta(seconds=3), "me", 60, 10).claimed == []
        store.webhook_delivered("t-one", again.claimed[0].name, T0 + timedelta(seconds=3))
        done = store.webhooks_due(["t-one"], T0 + timedelta(hours=1), "me", 60, 10)
        assert (done.claimed, done.pending) == ([], 0)
        # The other target's delivery is still pending, untouched.
        assert store.webhooks_due(["t-two"], T0, "me", 60, 0).pending == 1
    finally:
        other.close()


def test_a_dead_claimers_deliveries_are_released_to_its_successor(store: Store) -> None:
    _crossed(store)
    assert len(store.webhooks_due(["t-one", "t-two"], T0, "me", 60, 10).claimed) == 2
    assert store.webhooks_release("me", T0 + timedelta(seconds=1)) == 2
    again = store.webhooks_due(["t-one", "t-two"], T0 + timedelta(seconds=1), "me", 60, 10)
    assert sorted(d.attempts for d in again.claimed) == [2, 2]


class _Interleaving:
    """A SQLite connection whose cursor lets ``between`` run right after the
    claim's SELECT of the deliveries, before its UPDATE (as the persister's
    commit does, under load, at any moment)."""

    def __init__(self, conn: Any, between: Callable[[], None]) -> None:
        self.conn, self.between = conn, between

    def cursor(self) -> Any:
        return _InterleavingCursor(self.conn.cursor(), self.between)

    def close(self) -> None:
        self.conn.close()


class _InterleavingCursor:
    def __init__(self, cur: Any, between: Callable[[], None]) -> None:
        self.cur, self.between = cur, between

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.cur.execute(sql, params)
        if sql.startswith("SELECT target, name, body"):
            self.between()
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cur, name)


def test_a_sqlite_claim_is_not_refused_by_a_commit_between_its_read_and_write(
    sqlite_url: str,
) -> None:
    # In WAL mode a transaction that read and then wants to write fails at
    # once ("database is locked", no busy wait) if another connection
    # committed in between; the claim must take the write lock first.
    path = sqlite_url.removeprefix("sqlite:///")
    main = open_store(sqlite_url)
    main.webhook_targets = ("t-one",)
    main.open()
    outcomes: list[str] = []

    def persister_commits() -> None:
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute(
                "INSERT INTO quilt_patches VALUES ('budget', ?, '{}', 'x', 'x')",
                (str(len(outcomes)),),
            )
            outcomes.append("committed")
        except sqlite3.OperationalError:
            outcomes.append("waits for the claim")  # (the real one waits up to 5 s)
        finally:
            other.close()

    try:
        _crossed(main)
        claimer = main.companion()
        connect = claimer._connect
        claimer._connect = lambda: _Interleaving(connect(), persister_commits)  # type: ignore[method-assign]
        try:
            due = claimer.webhooks_due(["t-one"], T0, "me", 60, 10)
        finally:
            claimer.close()
    finally:
        main.close()
    assert [d.name for d in due.claimed] == [f"budget_alert_{DAY}_80"]
    assert outcomes == ["waits for the claim"]


# -- the service, in process ---------------------------------------------------------


async def test_a_receiver_that_fails_hangs_and_recovers_gets_the_alert_once_answered(
    database_url: str,
) -> None:
    receiver = Receiver(mode="fail")
    config = make_config(daily_cap="1.00", alert_at="0.5")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        async with open_budget(
            config,
            database=database_url,
            spill=False,
            webhooks=[receiver.url()],
            webhook_policy=FAST,
        ) as budget:
            assert (await budget.health()).webhooks_pending == 0
            await budget.record("w-1", "0.6")  # crosses 50%
            name = f"budget_alert_{_today()}_50"
            await receiver.wait_for(lambda: len(receiver.requests) >= 2, what="a retry")
            health = await budget.health()
            assert health.webhooks_pending == 1 and health.status == "ok"

            # A receiver that holds the request: the actor is not held with it.
            receiver.mode = "hang"
            await receiver.wait_for(lambda: receiver.hanging >= 1, what="a hanging request")
            await budget.record("w-2", "0.1")
            await budget.cycle()
            assert (await budget.health()).dispatches == 2
            assert receiver.hanging >= 1  # ...all while the delivery hung

            # It recovers: the next retry is delivered, and that is the end.
            receiver.mode = "ok"
            await receiver.wait_for(lambda: receiver.answered(200), what="a 200")

            async def delivered() -> bool:
                return (await budget.health()).webhooks_pending == 0

            await eventually(delivered)
            seen = len(receiver.requests)
            await trio.sleep(0.5)  # ten polls: nothing more is sent
            assert len(receiver.requests) == seen
            stats = budget.stats.webhooks
            assert stats is not None and stats.delivered == 1
            assert stats.failures >= 2  # the 500s and the attempt that timed out
        nursery.cancel_scope.cancel()

    statuses = [r.status for r in receiver.requests]
    assert 500 in statuses and None in statuses and statuses[-1] == 200, statuses
    first = receiver.requests[0]
    for request in receiver.requests:
        assert request.method == "POST"
        assert request.target == "/hooks/T000/B000/secret-token?channel=budget"
        assert request.headers["idempotency-key"] == name
        assert request.headers["content-type"] == "application/json"
        assert request.body == first.body
    sent = first.json()
    assert sent["type"] == "alert" and sent["threshold"] == 0.5
    assert (sent["daily_spend"], sent["daily_cap"], sent["to"]) == ("0.6", "1.00", "AG Lu")
    assert sent["text"].startswith("budget_actor: 50% of the daily cap reached")
    found = rows(database_url, "SELECT delivered_at, attempts FROM budget_webhooks")
    assert len(found) == 1 and found[0][0] is not None
    assert found[0][1] == len(receiver.requests)


async def test_a_dead_webhook_does_not_hold_back_another(sqlite_url: str) -> None:
    alive, stuck = Receiver(mode="ok"), Receiver(mode="hang")
    config = make_config(daily_cap="1.00", alert_at="0.5")
    slow = WebhookPolicy(attempt_timeout_s=60, poll_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(alive.run)
        await nursery.start(stuck.run)
        async with open_budget(
            config,
            database=sqlite_url,
            webhooks=[stuck.url("/stuck"), alive.url("/alive")],
            webhook_policy=slow,
        ) as budget:
            await budget.record("d-1", "0.9")
            await stuck.wait_for(lambda: stuck.hanging == 1, what="the stuck one holding")
            await alive.wait_for(lambda: alive.answered(200), what="the live one answered")
            assert stuck.hanging == 1

            async def one_left() -> bool:
                return (await budget.health()).webhooks_pending == 1

            await eventually(one_left)
        nursery.cancel_scope.cancel()


async def test_instances_sharing_a_budget_deliver_each_alert_once(pg_url: str) -> None:
    receiver = Receiver(mode="ok")
    config = make_config(daily_cap="1.00", alert_at="0.5")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        hooks = [receiver.url()]
        async with (
            open_budget(
                config,
                database=pg_url,
                instance="one",
                spill=False,
                webhooks=hooks,
                webhook_policy=FAST,
            ) as one,
            open_budget(
                config,
                database=pg_url,
                instance="two",
                spill=False,
                webhooks=hooks,
                webhook_policy=FAST,
            ) as two,
        ):
            await one.record("s-1", "0.3")
            await two.record("s-2", "0.3")  # 0.6 together: 50% crossed once, globally
            await receiver.wait_for(lambda: receiver.answered(200), what="the delivery")

            async def both_done() -> bool:
                pending = [(await b.health()).webhooks_pending for b in (one, two)]
                return pending == [0, 0]

            await eventually(both_done)
            await trio.sleep(0.5)  # ten polls of each: no second delivery
        nursery.cancel_scope.cancel()
    assert len(receiver.requests) == 1, receiver.requests


async def test_deliveries_wait_out_a_database_outage(pg_url: str, tmp_path: Path) -> None:
    receiver = Receiver(mode="fail")
    proxy = CuttableProxy(*target_of_url(pg_url))
    config = make_config(daily_cap="1.00", alert_at="0.5")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        await nursery.start(proxy.run)
        async with open_budget(
            config,
            database=proxy.url_for(pg_url),
            spill=tmp_path / "o.spill",
            webhooks=[receiver.url()],
            webhook_policy=FAST,
        ) as budget:
            await budget.record("o-1", "0.6")
            await receiver.wait_for(lambda: receiver.answered(500), what="a failed attempt")
            proxy.cut()
            receiver.mode = "ok"
            await budget.record("o-2", "0.1")  # acknowledged from the spill file
            tried = len(receiver.requests)
            await trio.sleep(0.5)  # ten polls: no claim without the store, no send
            assert len(receiver.requests) <= tried + 1  # (one claimed before the cut)
            assert (await budget.health()).webhooks_pending == 1
            proxy.restore()
            await receiver.wait_for(lambda: receiver.answered(200), what="the delivery")

            async def delivered() -> bool:
                return (await budget.health()).webhooks_pending == 0

            await eventually(delivered)
        nursery.cancel_scope.cancel()
    assert rows(pg_url, "SELECT count(*) FROM budget_webhooks WHERE delivered_at IS NULL") == [(0,)]


async def test_no_webhooks_no_field_and_no_rows(sqlite_url: str) -> None:
    async with open_budget(make_config(daily_cap="1", alert_at="0.5"), database=sqlite_url) as b:
        await b.record("n-1", "0.9")
        assert (await b.health()).webhooks_pending is None
    assert rows(sqlite_url, "SELECT count(*) FROM budget_webhooks") == [(0,)]


# -- the service, as a real process ---------------------------------------------------


async def test_delivery_resumes_across_a_restart(database_url: str, launcher: Launcher) -> None:
    receiver = Receiver(mode="fail")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        args = ["--daily-cap", "1.00", "--alert-at", "0.5", "--instance-id", "hooks-1"]
        env = {"BUDGET_ALERT_WEBHOOK": receiver.url()}
        service = await launcher.start(database_url, *args, env=env)
        async with connect(service.ws_url) as conn:
            await conn.cost("r-1", "0.75")
        await receiver.wait_for(lambda: receiver.answered(500), what="a first attempt")
        health = (await http_get(service.http_base + "/health")).json()
        assert health["webhooks_pending"] == 1
        # Killed in the middle of the retry: the receiver holds it unanswered.
        receiver.mode = "hang"
        await receiver.wait_for(lambda: receiver.hanging == 1, what="a retry in flight")
        service.signal(signal.SIGKILL)
        await service.wait_exit()
        tried = len(receiver.requests)
        assert receiver.answered(200) == []

        receiver.mode = "ok"
        again = await launcher.start(database_url, *args, env=env)
        await receiver.wait_for(lambda: receiver.answered(200), what="the delivery after restart")

        async def drained() -> bool:
            health = (await http_get(again.http_base + "/health")).json()
            return bool(health["webhooks_pending"] == 0)

        await eventually(drained, timeout=15)
        metrics = (await http_get(again.http_base + "/metrics")).body.decode()
        assert "\nbudget_webhooks_pending 0.0\n" in metrics
        assert "\nbudget_webhook_deliveries_total 1.0\n" in metrics
        assert await again.stop() == 0
        nursery.cancel_scope.cancel()

    name = f"budget_alert_{_today()}_50"
    assert len(receiver.requests) > tried
    assert {r.headers["idempotency-key"] for r in receiver.requests} == {name}
    assert len({r.body for r in receiver.requests}) == 1
    assert rows(database_url, "SELECT count(*) FROM quilt_patches WHERE name = %s", (name,)) == [
        (1,)
    ]
    # The secret part of the URL is neither stored nor logged.
    stored = rows(database_url, "SELECT target, last_error FROM budget_webhooks")
    assert "secret-token" not in repr(stored)
    assert "resuming 1 interrupted alert webhook deliveries" in again.stderr_text()
    logs = service.stderr_text() + again.stderr_text()
    assert "alert webhook http://127.0.0.1:" in logs and "secret-token" not in logs


async def test_the_webhook_option_is_checked(sqlite_url: str) -> None:
    bad = await run_cli("serve", "--database", sqlite_url, "--alert-webhook", "ftp://x/secret")
    assert bad.code == 2
    assert bad.stderr_lines == [
        "budget-actor: error: `alert-webhook` must be an http:// or https:// URL, got scheme 'ftp'"
    ]
    empty = await run_cli("serve", "--database", sqlite_url, "--alert-webhook", "")
    assert empty.code == 2 and "`alert-webhook` must not be empty" in empty.stderr
    env = await run_cli(
        "serve", "--database", sqlite_url, env={"BUDGET_ALERT_WEBHOOK": "http://ok/a, nope"}
    )
    assert env.code == 2 and "`alert-webhook`" in env.stderr and "nope" not in env.stderr


async def test_a_url_that_h11_cannot_send_as_given_is_delivered_not_a_crash(
    sqlite_url: str,
) -> None:
    # A non-ASCII path (and host) is legal in a URL as people write it; h11
    # and the resolver take ASCII only. It is sent percent-encoded (the
    # host in IDNA), never left to crash the webhook child until the
    # service escalates.
    assert parse_webhook_url("http://Bücher.example/hook").host == "xn--bcher-kva.example"
    receiver = Receiver(mode="ok")
    config = make_config(daily_cap="1.00", alert_at="0.5")
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run)
        async with open_budget(
            config, database=sqlite_url, webhooks=[receiver.url("/hook/ü?q=é")], webhook_policy=FAST
        ) as budget:
            await budget.record("u-1", "0.9")
            await receiver.wait_for(lambda: receiver.answered(200), what="the delivery")

            async def delivered() -> bool:
                return (await budget.health()).webhooks_pending == 0

            await eventually(delivered)
            assert budget.stats.webhooks is not None and budget.stats.webhooks.failures == 0
        nursery.cancel_scope.cancel()
    assert [r.target for r in receiver.requests] == ["/hook/%C3%BC?q=%C3%A9"]


def test_a_host_that_is_no_domain_name_is_refused_at_once() -> None:
    # The resolver would raise UnicodeError for it at the first alert.
    for bad in ("http://a..b/x", f"https://{'x' * 64}.example/x"):
        with pytest.raises(ValueError, match="host"):
            parse_webhook_url(bad)


async def test_an_attempt_that_raises_is_a_failed_attempt_not_a_crash(sqlite_url: str) -> None:
    # Whatever an attempt raises (here the resolver's UnicodeError for a URL
    # that was never checked) is retried like a refused connection; the
    # webhook child does not fail, so the service never escalates for it.
    hook = WebhookUrl(url="http://a..b/x", tls=False, host="a..b", port=80, target="/x")
    store = open_store(sqlite_url)
    store.webhook_targets = (target_of(hook.url),)
    store.open()
    try:
        _crossed(store)
    finally:
        store.close()
    companion = open_store(sqlite_url)
    stats = WebhookStats()
    sender = WebhookSender(
        companion, [hook], owner="me", clock=lambda: datetime.now(UTC), stats=stats, policy=FAST
    )
    try:
        with trio.move_on_after(1):
            await sender.run()
    finally:
        companion.close()
    assert stats.failures >= 2 and stats.delivered == 0
    found = rows(sqlite_url, "SELECT last_error, delivered_at FROM budget_webhooks")
    assert found[0][0].startswith("UnicodeError") and found[0][1] is None
