"""Several `budget-actor serve` processes on one PostgreSQL schema share ONE
daily budget: exact global figures everywhere, global dedupe, one nudge,
global admission, kill -9 safety, and how stale each instance's view is.

Black box, like the other process tests: real processes started with
``launcher``, driven over WebSocket and HTTP, checked against the rows in the
test's own PostgreSQL schema.
"""

from __future__ import annotations

import random
import re
import signal
from collections import defaultdict
from contextlib import AsyncExitStack
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from ._client import Conn, Launcher, Service, connect, http_get
from ._helpers import eventually, rows

NAMES = ("alpha", "bravo", "charlie")

# A peer going away under a client (kill -9), or not there yet.
_GONE = (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _spawn(launcher: Launcher, pg_url: str, name: str, *args: str) -> Service:
    return launcher.spawn(pg_url, "--instance-id", name, "--log-level", "WARNING", *args)


async def _start_all(launcher: Launcher, pg_url: str, *args: str) -> dict[str, Service]:
    """One process per name in NAMES, started together, all ready."""
    services = {name: _spawn(launcher, pg_url, name, *args) for name in NAMES}
    async with trio.open_nursery() as nursery:
        for service in services.values():
            nursery.start_soon(service.wait_ready)
    return services


async def _health(service: Service, *, ok: bool = True) -> dict[str, Any]:
    """GET /health (HTTP 200 unless ``ok`` is False: degraded gives 503)."""
    reply = await http_get(service.http_base + "/health")
    assert reply.status == 200 or not ok, (reply.status, reply.body)
    health: dict[str, Any] = reply.json()
    return health


async def _converged(
    services: dict[str, Service], total: Decimal, count: int, timeout: float = 20.0
) -> dict[str, dict[str, Any]]:
    """Wait until every instance reports exactly ``total`` and ``count`` as the
    global figures, healthy and with nothing pending; the last health of each."""
    seen: dict[str, dict[str, Any]] = {}

    async def check() -> bool:
        for name, service in services.items():
            seen[name] = await _health(service, ok=False)
        return all(
            Decimal(h["daily_spend"]) == total
            and h["dispatches"] == count
            and h["status"] == "ok"
            and h["pending"] == 0
            for h in seen.values()
        )

    try:
        await eventually(check, timeout=timeout)
    except trio.TooSlowError:
        figures = {n: (h["daily_spend"], h["dispatches"], h["status"]) for n, h in seen.items()}
        raise AssertionError(f"not converged to {total} / {count}: {figures}") from None
    return seen


def _journal(pg_url: str) -> list[tuple[str, int, str, Decimal]]:
    """(instance, seq, dispatch_id, usd) of every journal row."""
    found = rows(pg_url, "SELECT instance, seq, dispatch_id, usd FROM budget_journal")
    return [(str(i), int(s), str(d), Decimal(str(u))) for i, s, d, u in found]


def _shares(pg_url: str, day: str) -> dict[str, tuple[Decimal, int]]:
    found = rows(
        pg_url, "SELECT instance, spend, dispatches FROM budget_shares WHERE day = %s", (day,)
    )
    return {str(i): (Decimal(str(s)), int(n)) for i, s, n in found}


def _per_instance(journal: list[tuple[str, int, str, Decimal]]) -> dict[str, tuple[Decimal, int]]:
    sums: dict[str, tuple[Decimal, int]] = {}
    for instance, _, _, usd in journal:
        spend, n = sums.get(instance, (Decimal(0), 0))
        sums[instance] = (spend + usd, n + 1)
    return sums


def _patch(pg_url: str, day: str) -> dict[str, Any]:
    found = rows(
        pg_url,
        "SELECT body FROM quilt_patches WHERE type = 'budget' AND name = %s",
        (f"budget_{day}",),
    )
    assert len(found) == 1, found
    body: dict[str, Any] = found[0][0]
    return body


async def _stop_all(services: dict[str, Service]) -> None:
    """SIGTERM every instance at once; each must exit 0."""
    for service in services.values():
        service.signal(signal.SIGTERM)
    for name, service in services.items():
        assert await service.wait_exit() == 0, f"{name}:\n{service.stderr_text()}"


def _no_tracebacks(services: dict[str, Service]) -> None:
    for name, service in services.items():
        text = service.stderr_text()
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text}"


async def _reader(conn: Conn, times: list[float] | None = None) -> None:
    """Read a subscriber's pushes into ``conn.log`` (with receipt times) until cancelled."""
    while True:
        await conn.recv(timeout=120)
        if times is not None:
            times.append(trio.current_time())


def _metric(text: str, name: str, labels: str = "") -> Decimal:
    pattern = rf"^{re.escape(name)}(\{{[^}}]*{re.escape(labels)}[^}}]*\}})? (\S+)$"
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert len(found) == 1, f"{name} {labels}: {found}\n{text}"
    return Decimal(found[0][1])


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------
# 1. three instances, concurrent load, cross-instance duplicates
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_three_instances_share_one_budget_exactly(pg_url: str, launcher: Launcher) -> None:
    """Three instances under concurrent load, 60 ids sent to two of them at
    once: every instance ends on the exact global figures, the shares add up
    to them, each id is journaled once, one nudge for 80% and one `alert` per
    subscriber, and after SIGTERM the patch is the exact total."""
    rng = random.Random(20261201)
    cap, alert_at = Decimal("10.00"), Decimal("0.8")
    services = await _start_all(launcher, pg_url, "--daily-cap", "10.00", "--alert-at", "0.8")

    # 600 distinct ids, 60 of them sent to two different instances at once.
    amounts: dict[str, Decimal] = {}
    work: list[tuple[str, tuple[str, ...]]] = []
    for i in range(600):
        dispatch_id = f"d{i}"
        step = Decimal("0.001") if i % 2 else Decimal("0.000001")
        amounts[dispatch_id] = step * (
            rng.randrange(1, 30) if i % 2 else rng.randrange(1000, 29000)
        )
        targets = tuple(rng.sample(NAMES, 2)) if i % 10 == 3 else (rng.choice(NAMES),)
        work.append((dispatch_id, targets))
    total = sum(amounts.values(), Decimal(0))
    assert cap * alert_at < total < cap, total  # the load crosses 80% and stays under
    duplicated = {d for d, targets in work if len(targets) == 2}
    assert len(duplicated) == 60

    acks: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    async with AsyncExitStack() as stack:
        subscribers = {
            n: await stack.enter_async_context(connect(s.ws_url)) for n, s in services.items()
        }
        for conn in subscribers.values():
            first = await conn.subscribe()
            assert first["instance"] in NAMES and Decimal(first["daily_spend"]) == 0
        async with trio.open_nursery() as readers:
            for conn in subscribers.values():
                readers.start_soon(_reader, conn)

            send, receive = trio.open_memory_channel[tuple[str, tuple[str, ...]]](len(work))
            for item in work:
                send.send_nowait(item)
            send.close()

            async def worker() -> None:
                async with AsyncExitStack() as mine:
                    conns = {
                        n: await mine.enter_async_context(connect(s.ws_url))
                        for n, s in services.items()
                    }

                    async def one(dispatch_id: str, target: str) -> None:
                        ack = await conns[target].cost(dispatch_id, str(amounts[dispatch_id]))
                        acks[dispatch_id].append((target, ack))

                    async for dispatch_id, targets in receive:
                        async with trio.open_nursery() as both:  # duplicates race
                            for target in targets:
                                both.start_soon(one, dispatch_id, target)

            with trio.fail_after(60):
                async with trio.open_nursery() as workers:
                    for _ in range(12):
                        workers.start_soon(worker)

            healths = await _converged(services, total, len(amounts))

            async def alerted() -> bool:
                return all(conn.of_type("alert") for conn in subscribers.values())

            await eventually(alerted, timeout=10)

            async def latest_is_exact() -> bool:
                for conn in subscribers.values():
                    last = conn.of_type("spend")[-1]
                    if (Decimal(last["daily_spend"]), last["dispatches"]) != (total, 600):
                        return False
                return True

            await eventually(latest_is_exact, timeout=10)
            await trio.sleep(1.0)  # room for a second (wrong) alert to show up
            readers.cancel_scope.cancel()

    day = healths["alpha"]["day"]
    # Every instance: the exact global figures, its own share, and 3 instances.
    for name, health in healths.items():
        assert health["instance"] == name and health["instances"] == 3
        assert health["alerts_sent"] == [0.8], health
    assert sum(Decimal(h["instance_spend"]) for h in healths.values()) == total
    assert sum(h["instance_dispatches"] for h in healths.values()) == 600

    # The journal: each id exactly once, at its amount; the sum is the global figure.
    journal = _journal(pg_url)
    assert len(journal) == 600
    assert {d: usd for _, _, d, usd in journal} == amounts
    assert sum(usd for _, _, _, usd in journal) == total
    holder = {d: (instance, seq) for instance, seq, d, _ in journal}
    # Each instance's share (health and table) is the sum of its own rows.
    own = _per_instance(journal)
    assert _shares(pg_url, day) == own
    for name, health in healths.items():
        assert (Decimal(health["instance_spend"]), health["instance_dispatches"]) == own[name]

    # Acks: a single send is counted where it was sent; of two racing sends,
    # the one whose instance holds the row was acked as counted, the other as
    # a duplicate carrying the original's seq, never both as counted.
    both_counted = []
    for dispatch_id, targets in work:
        got = acks[dispatch_id]
        assert sorted(t for t, _ in got) == sorted(targets), (dispatch_id, got)
        where, seq = holder[dispatch_id]
        for target, ack in got:
            if target == where:
                assert ack["duplicate"] is False and ack["seq"] == seq, (dispatch_id, got)
            elif ack["duplicate"] is False:
                both_counted.append(dispatch_id)
            else:
                assert ack["seq"] == seq, (dispatch_id, got, holder[dispatch_id])
    print(
        f"\n3 instances: {len(amounts)} ids ({len(duplicated)} sent to two instances at once),"
        f" total {total}; shares {own}"
    )
    assert not both_counted, f"acked as counted by two instances: {both_counted[:5]}"

    # /metrics: global spend, own share, instance count.
    for name, service in services.items():
        text = (await http_get(service.http_base + "/metrics")).body.decode()
        assert _metric(text, "budget_daily_spend_usd", f'day="{day}"') == total
        assert _metric(text, "budget_instance_spend_usd", f'instance="{name}"') == own[name][0]
        assert _metric(text, "budget_instances") == 3

    # One nudge for 80%, ever, and one `alert` push per subscriber.
    nudges = rows(pg_url, "SELECT name, body FROM quilt_patches WHERE type = 'sibling_nudge'")
    assert [n for n, _ in nudges] == [f"budget_alert_{day}_80"], nudges
    body = nudges[0][1]
    assert body["to"] == "AG Lu" and Decimal(str(body["threshold"])) == alert_at
    assert Decimal(body["daily_spend"]) >= cap * alert_at
    for name, conn in subscribers.items():
        alerts = conn.of_type("alert")
        assert len(alerts) == 1, (name, alerts)
        assert alerts[0]["threshold"] == 0.8 and alerts[0]["day"] == day
        assert Decimal(alerts[0]["daily_spend"]) >= cap * alert_at

    # After SIGTERM of all three: the patch is the exact sum of all shares.
    await _stop_all(services)
    patch = _patch(pg_url, day)
    assert Decimal(patch["daily_spend"]) == total, patch
    assert patch["dispatches"] == 600, patch
    _no_tracebacks(services)


# --------------------------------------------------------------------------
# 2. kill -9 and restart (same instance id) under load
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_kill_9_and_restart_of_one_instance_under_load(
    pg_url: str, launcher: Launcher
) -> None:
    """kill -9 one of three instances twice under load and restart it under
    the same id; clients resend what was not acked to any live instance.
    Nothing acked is lost, nothing is doubled (the restarted instance's share
    is its own journal rows, once), and the global figure is exact everywhere."""
    rng = random.Random(42)
    services = await _start_all(launcher, pg_url, "--daily-cap", "1000000")
    live = dict.fromkeys(NAMES, True)
    acked: dict[str, Decimal] = {}
    sent: dict[str, Decimal] = {}
    counter = 0
    broken = 0  # connections that broke under a client
    resent_duplicates = 0
    stopping = trio.Event()
    victim = "bravo"

    def next_cost() -> tuple[str, Decimal]:
        nonlocal counter
        counter += 1
        dispatch_id = f"k{counter}"
        sent[dispatch_id] = Decimal(rng.randrange(1, 10**6)) / Decimal(10**6)
        return dispatch_id, sent[dispatch_id]

    async def worker(loyal: bool) -> None:
        """Sends costs one by one, switching instances now and then; a loyal
        worker goes back to the victim whenever it is up, so every kill cuts
        some clients off mid-cost."""
        nonlocal broken, resent_duplicates
        pending: tuple[str, Decimal] | None = None  # sent, not acked: resend it
        resent = False
        while not stopping.is_set() or pending is not None:
            up = [n for n in NAMES if live[n]]
            name = victim if loyal and live[victim] else rng.choice(up)
            gone = False
            try:
                async with connect(services[name].ws_url) as conn:
                    for _ in range(rng.randrange(5, 40)):
                        if pending is None:
                            if stopping.is_set():
                                break
                            pending, resent = next_cost(), False
                        dispatch_id, usd = pending
                        ack = await conn.cost(dispatch_id, str(usd))
                        if ack["duplicate"]:
                            # Only a resend may be a duplicate: its first send
                            # was durable though its ack never arrived.
                            assert resent, (dispatch_id, ack)
                            resent_duplicates += 1
                        acked[dispatch_id] = usd
                        pending = None
            except* _GONE:
                gone = True
            if gone:
                broken += 1
                resent = pending is not None
                await trio.sleep(0.02)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for w in range(8):
                nursery.start_soon(worker, w < 3)
            for _ in range(2):  # kill -9 the same instance twice, mid-load
                await trio.sleep(rng.uniform(0.6, 1.2))
                before = len(acked)
                live[victim] = False
                services[victim].kill()
                await trio.sleep(0.3)
                services[victim] = await launcher.start(
                    pg_url,
                    "--instance-id",
                    victim,
                    "--log-level",
                    "WARNING",
                    "--daily-cap",
                    "1000000",
                )
                live[victim] = True
                assert len(acked) > before, "the other instances stopped acking"
            await trio.sleep(1.0)
            stopping.set()

    assert broken >= 6, f"only {broken} clients were cut off: the kills missed the load"
    assert len(acked) >= 300, f"the load was too light to mean anything: {len(acked)}"
    assert set(acked) == set(sent)  # every send was eventually acked
    total = sum(acked.values(), Decimal(0))
    healths = await _converged(services, total, len(acked))

    # Nothing acked is lost and nothing is doubled.
    journal = _journal(pg_url)
    assert len(journal) == len(acked)
    assert {d: usd for _, _, d, usd in journal} == acked
    own = _per_instance(journal)
    day = healths["alpha"]["day"]
    assert _shares(pg_url, day) == own
    # The restarted instance's share is its own rows, once (not doubled by restore).
    for name, health in healths.items():
        assert health["instance"] == name
        assert (Decimal(health["instance_spend"]), health["instance_dispatches"]) == own[name]
    assert own[victim][1] > 0

    await _stop_all(services)
    patch = _patch(pg_url, day)
    assert (Decimal(patch["daily_spend"]), patch["dispatches"]) == (total, len(acked))
    _no_tracebacks(services)
    print(
        f"\nkill -9 x2 under load: {len(acked)} costs acked, {broken} broken connections,"
        f" {resent_duplicates} resends acked as duplicates; shares {own}"
    )


# --------------------------------------------------------------------------
# 3. 50 concurrent admitters race for the last dollars
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_fifty_admitters_across_instances_never_overrun_the_cap(
    pg_url: str, launcher: Launcher
) -> None:
    """50 tasks admit on one instance and spend exactly the estimate on
    another, until refused: the spend never passes the cap, and ends within
    the smallest estimate of it (per-instance admission would overrun it)."""
    rng = random.Random(7)
    cap = Decimal("5.00")
    services = await _start_all(launcher, pg_url, "--daily-cap", "5.00")
    estimates = [Decimal(rng.randrange(11, 97)) / Decimal(1000) for _ in range(50)]
    spent: dict[str, Decimal] = {}
    refusals: list[tuple[Decimal, dict[str, Any]]] = []
    overruns: list[str] = []
    done = trio.Event()

    async def admitter(i: int) -> None:
        estimate = estimates[i]
        admit_at = NAMES[i % 3]
        cost_at = NAMES[(i + rng.randrange(0, 3)) % 3]  # often another instance
        async with connect(services[admit_at].ws_url) as a, connect(services[cost_at].ws_url) as c:
            n = 0
            while True:
                n += 1
                dispatch_id = f"a{i}-{n}"
                admission = await a.request(
                    {"type": "admit", "dispatch_id": dispatch_id, "estimate_usd": str(estimate)},
                    "admission",
                    timeout=30,
                )
                assert admission["dispatch_id"] == dispatch_id
                if not admission["allowed"]:
                    refusals.append((estimate, admission))
                    return
                assert Decimal(admission["remaining"]) >= 0, admission
                ack = await c.cost(dispatch_id, str(estimate))  # the estimate was exact
                assert ack["duplicate"] is False
                spent[dispatch_id] = estimate

    async def monitor() -> None:
        """Sampled while the race runs: the settled spend, in the store and in
        every instance's view, never passes the cap."""
        while not done.is_set():
            settled = _per_instance(await trio.to_thread.run_sync(_journal, pg_url)).values()
            in_store = sum((s for s, _ in settled), Decimal(0))
            if in_store > cap:
                overruns.append(f"journal {in_store}")
            for name, service in services.items():
                view = Decimal((await _health(service))["daily_spend"])
                if view > cap:
                    overruns.append(f"{name} {view}")
            await trio.sleep(0.05)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor)
            async with trio.open_nursery() as racers:
                for i in range(50):
                    racers.start_soon(admitter, i)
            done.set()

    final = sum(spent.values(), Decimal(0))
    healths = await _converged(services, final, len(spent))
    assert not overruns, overruns
    assert final <= cap, final
    # Every admitter stopped on a refusal, because its estimate no longer fit.
    assert len(refusals) == 50
    for estimate, refusal in refusals:
        assert Decimal(refusal["remaining"]) < estimate, refusal
        assert isinstance(refusal.get("reason"), str) and refusal["reason"], refusal
    # So the cap was really reached: each refusal saw less than its estimate
    # left, and every reservation it saw was later spent at its estimate.
    assert cap - final < min(estimates), (final, min(estimates))
    journal = _journal(pg_url)
    assert {d: usd for _, _, d, usd in journal} == spent
    assert rows(pg_url, "SELECT count(*) FROM budget_reservations") == [(0,)]
    day = healths["alpha"]["day"]
    assert _shares(pg_url, day) == _per_instance(journal)
    print(
        f"\n50 admitters: {len(spent)} admitted and spent, final {final} of {cap}"
        f" (smallest estimate {min(estimates)}, largest {max(estimates)})"
    )
    await _stop_all(services)
    _no_tracebacks(services)


# --------------------------------------------------------------------------
# 4. how stale each instance's view of the global spend is
# --------------------------------------------------------------------------


@pytest.mark.slow
async def test_staleness_of_each_instances_global_view(pg_url: str, launcher: Launcher) -> None:
    """Measures (and prints) how stale each instance's pushed global spend is
    under load; asserts only behaviour: pushes never go backwards and every
    subscriber ends on the exact totals."""
    rng = random.Random(99)
    services = await _start_all(launcher, pg_url, "--daily-cap", "1000000")
    ack_times: list[float] = []  # monotonic time of the n-th ack seen, all instances
    amounts: dict[str, Decimal] = {}
    counter = 0
    stopping = trio.Event()

    async def worker(name: str) -> None:
        nonlocal counter
        async with connect(services[name].ws_url) as conn:
            while not stopping.is_set():
                counter += 1
                dispatch_id = f"s{counter}"
                amounts[dispatch_id] = Decimal(rng.randrange(1, 10**5)) / Decimal(10**6)
                ack = await conn.cost(dispatch_id, str(amounts[dispatch_id]))
                ack_times.append(trio.current_time())
                assert ack["duplicate"] is False

    # Pushes are at most one per 0.1 s per subscriber: four subscribers per
    # instance (each with its own phase) give four times the samples.
    watchers = [(name, k) for name in NAMES for k in range(4)]
    pushes: dict[tuple[str, int], list[float]] = {w: [] for w in watchers}
    async with AsyncExitStack() as stack:
        subscribers = {
            w: await stack.enter_async_context(connect(services[w[0]].ws_url)) for w in watchers
        }
        for conn in subscribers.values():
            await conn.subscribe()
            conn.log.clear()  # the snapshot at subscribe time is not a push
            await trio.sleep(0.025)
        async with trio.open_nursery() as readers:
            for w, conn in subscribers.items():
                readers.start_soon(_reader, conn, pushes[w])
            with trio.fail_after(60):
                async with trio.open_nursery() as load:
                    for i in range(9):
                        load.start_soon(worker, NAMES[i % 3])
                    await trio.sleep(3.0)
                    stopping.set()
            total = sum(amounts.values(), Decimal(0))
            healths = await _converged(services, total, len(amounts))

            async def pushed_final() -> bool:
                return all(
                    conn.log and conn.log[-1].get("dispatches") == len(amounts)
                    for conn in subscribers.values()
                )

            await eventually(pushed_final, timeout=10)
            readers.cancel_scope.cancel()

    assert len(ack_times) == len(amounts) >= 300, len(ack_times)
    lines = [
        f"\nstaleness of each instance's view of the global spend, under load on 3 instances"
        f" ({len(ack_times)} costs acked in 3 s by 9 senders; --sync-interval 0.2, pushes at"
        " most every 0.1 s per subscriber, 4 subscribers per instance):",
        "  A = t - T(D): push at t showing global dispatches D, T(D) = time of the D-th ack",
        "  B = t - T(D+1): age of the oldest ack the push does not reflect yet (0 if none)",
    ]
    for name in NAMES:
        a: list[float] = []
        b: list[float] = []
        for w in watchers:
            if w[0] != name:
                continue
            messages, times = subscribers[w].log, pushes[w]
            assert len(messages) == len(times)
            spends = [(t, m) for t, m in zip(times, messages, strict=True) if m["type"] == "spend"]
            assert len(spends) >= 10, f"{w}: only {len(spends)} pushes"
            counts = [m["dispatches"] for _, m in spends]
            assert counts == sorted(counts), f"{w}: the global count went backwards"
            last = spends[-1][1]
            assert (Decimal(last["daily_spend"]), last["dispatches"]) == (total, len(amounts))
            for t, m in spends:
                d = m["dispatches"]
                if d == 0:
                    continue
                a.append(max(0.0, t - ack_times[d - 1]) if d <= len(ack_times) else 0.0)
                b.append(max(0.0, t - ack_times[d]) if d < len(ack_times) else 0.0)
        lines.append(
            f"  {name:8} {len(a):4} samples  A p50 {_quantile(a, 0.5) * 1000:6.1f} ms"
            f"  p99 {_quantile(a, 0.99) * 1000:6.1f} ms  max {max(a) * 1000:6.1f} ms"
            f"  |  B p50 {_quantile(b, 0.5) * 1000:6.1f} ms  p99 {_quantile(b, 0.99) * 1000:6.1f}"
            f" ms  max {max(b) * 1000:6.1f} ms"
        )
    print("\n".join(lines))

    # The staleness figures are exposed too (values not asserted: they are times).
    for name, service in services.items():
        assert healths[name]["sync_age_s"] is not None
        text = (await http_get(service.http_base + "/metrics")).body.decode()
        assert _metric(text, "budget_sync_age_seconds") >= 0
    await _stop_all(services)
    _no_tracebacks(services)


# --------------------------------------------------------------------------
# 5. two instances write the same ids in opposite orders at the same moment
# --------------------------------------------------------------------------


async def _both_waiting(pg_url: str, pid: int) -> None:
    """Wait until both instances' writes wait on a lock: at least one on one
    that ``pid`` holds, and two in all."""

    def blocked() -> tuple[int, int]:
        sql = (
            "SELECT count(*) FILTER (WHERE %s = ANY(pg_blocking_pids(pid))),"
            " count(*) FILTER (WHERE cardinality(pg_blocking_pids(pid)) > 0)"
            " FROM pg_stat_activity"
        )
        found = rows(pg_url, sql, (pid,))[0]
        return int(found[0]), int(found[1])

    async def check() -> bool:
        by_middle, waiting = await trio.to_thread.run_sync(blocked)
        return by_middle >= 1 and waiting >= 2

    await eventually(check, timeout=20)


@pytest.mark.slow
async def test_crossing_duplicate_batches_are_acked_as_duplicates(
    pg_url: str, launcher: Launcher
) -> None:
    """alpha and bravo each get the same 200 ids, alpha in order and bravo in
    reverse, and each writes them in one batch. The test makes the two
    batches meet inside PostgreSQL: transaction `first` holds a journal row
    for each instance's first cost (so the 200 queue up behind it, into one
    batch), and transaction `middle` holds id x100 (so the batches stop
    there). Then it lets go. Every id must be counted exactly once, and of
    its two acks only the one from the instance that counted it may say
    `duplicate: false`. (Inserting in batch order, the two transactions
    deadlocked and one instance took that for an outage and acknowledged its
    costs from the spill file as counted; the store now inserts in id order
    and runs a transaction aborted as a deadlock again.)"""
    names = NAMES[:2]
    services = {name: _spawn(launcher, pg_url, name) for name in names}
    async with trio.open_nursery() as nursery:
        for service in services.values():
            nursery.start_soon(service.wait_ready)
    day = (await _health(services["alpha"]))["day"]
    ids = [f"x{i}" for i in range(200)]
    insert = (
        "INSERT INTO budget_journal (instance, seq, day, dispatch_id, usd, recorded_at)"
        " VALUES ('test-hold', %s, %s, %s, 0, now())"
    )
    first, middle = psycopg.connect(pg_url), psycopg.connect(pg_url)  # both left open
    try:
        first.execute(insert, (1, day, "first-alpha"))
        first.execute(insert, (2, day, "first-bravo"))
        middle.execute(insert, (3, day, "x100"))
        middle_pid = int(middle.execute("SELECT pg_backend_pid()").fetchall()[0][0])
        orders = {"alpha": ids, "bravo": ids[::-1]}
        acks: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in names}

        async def sender(name: str) -> None:
            async with connect(services[name].ws_url) as conn:
                await conn.send({"type": "cost", "dispatch_id": f"first-{name}", "usd": "0.01"})
                await trio.sleep(0.3)  # its write now waits on `first`
                for dispatch_id in orders[name]:
                    await conn.send({"type": "cost", "dispatch_id": dispatch_id, "usd": "0.01"})
                for _ in range(len(ids) + 1):
                    ack = await conn.recv_type("ack", "error", timeout=30)
                    assert ack["type"] == "ack", ack
                    acks[name][ack["dispatch_id"]] = ack

        async def queued() -> bool:
            healths = [await _health(s, ok=False) for s in services.values()]
            return all(h["pending"] == len(ids) + 1 for h in healths)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(sender, name)
                await eventually(queued, timeout=20)  # both held, the 200 behind
                first.rollback()  # both batches of 200 start...
                await _both_waiting(pg_url, middle_pid)  # ...and meet at x100
                middle.rollback()
    finally:
        first.close()
        middle.close()

    total = Decimal("0.01") * (len(ids) + 2)
    healths = await _converged(services, total, len(ids) + 2)
    journal = _journal(pg_url)
    assert sorted(d for _, _, d, _ in journal) == sorted([*ids, "first-alpha", "first-bravo"])
    assert sum(usd for _, _, _, usd in journal) == total
    own = _per_instance(journal)
    assert _shares(pg_url, day) == own
    for name, health in healths.items():
        assert (Decimal(health["instance_spend"]), health["instance_dispatches"]) == own[name]
    holder = {d: (instance, seq) for instance, seq, d, _ in journal}
    both_counted = []
    for dispatch_id in ids:
        where, seq = holder[dispatch_id]
        assert acks[where][dispatch_id] == {
            "type": "ack",
            "dispatch_id": dispatch_id,
            "duplicate": False,
            "seq": seq,
        }
        other = acks["bravo" if where == "alpha" else "alpha"][dispatch_id]
        if other["duplicate"]:
            assert other["seq"] == seq, other
        else:
            both_counted.append(dispatch_id)
    await _stop_all(services)
    patch = _patch(pg_url, day)
    assert (Decimal(patch["daily_spend"]), patch["dispatches"]) == (total, len(ids) + 2)
    assert not both_counted, f"{len(both_counted)} ids acked as counted by both instances"
    for service in services.values():
        assert "spilling" not in service.stderr_text()  # no write was taken for an outage
