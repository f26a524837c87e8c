"""Fault injection: the machine fails under the service.

A full disk, no file descriptors left, a database that accepts connections and
never answers, a database restarted in the middle of a transaction, a clock
that jumps back across midnight. Each case ends the same way: every cost that
was acknowledged is in the journal exactly once, nothing is counted twice
(the live spend equals the journal's sum), every sender got an answer, and
the service is healthy again by itself.

The full disk is a real tmpfs that the test mounts, which needs root; the
restarted database is a throwaway cluster of the test's own, which needs root
too (to run it as user postgres). Where that is not allowed they are skipped
with the reason, except with ``BUDGET_REQUIRE_ROOT=1`` (as in CI), where they
fail. Faster, in-process variants with injected write failures run anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from budget_actor import Budget, CostUnavailable, StoreError, make_config, open_budget
from budget_actor.core.cost import Cost, make_cost
from budget_actor.core.records import JournalEntry
from budget_actor.runtime.storecall import call_store
from budget_actor.stores.open import open_store
from budget_actor.stores.spill import SpillFile
from budget_actor.stores.sqlite import SqliteStore

from . import _pgcluster
from ._client import Conn, Launcher, connect, http_get
from ._helpers import WallClock, eventually, rows
from ._proxy import CuttableProxy, target_of

REQUIRE_ROOT = os.environ.get("BUDGET_REQUIRE_ROOT") == "1"
# Every wait below is for behaviour, bounded only so that a hang fails the
# test instead of stalling CI; the machine is small and shared, so be generous.
PATIENCE_S = 60.0


def _needs_root(reason: str | None) -> None:
    if reason is None:
        return
    if REQUIRE_ROOT:
        pytest.fail(f"BUDGET_REQUIRE_ROOT=1, but {reason}")
    pytest.skip(reason)


# --------------------------------------------------------------------------
# What every case checks at the end
# --------------------------------------------------------------------------


def _journal(url: str) -> dict[str, Decimal]:
    """dispatch_id -> usd of every journal row; fails on an id seen twice."""
    found = rows(url, "SELECT dispatch_id, usd FROM budget_journal")
    journal: dict[str, Decimal] = {}
    for dispatch_id, usd in found:
        assert dispatch_id not in journal, f"{dispatch_id} is in the journal twice"
        journal[str(dispatch_id)] = Decimal(str(usd))
    return journal


def _check_exactly_once(url: str, acked: dict[str, Decimal]) -> dict[str, Decimal]:
    """Every acknowledged cost is in the journal once, with its amount; the
    journal holds nothing that was not acknowledged. Returns the journal."""
    journal = _journal(url)
    assert journal == acked
    return journal


async def _healthy(budget: Budget) -> None:
    async def check() -> bool:
        h = await budget.health()
        return h.status == "ok" and h.store_ok and h.pending == 0

    await eventually(check, timeout=PATIENCE_S)


# --------------------------------------------------------------------------
# Injected write failures, in process (no root needed)
# --------------------------------------------------------------------------


class FullDiskSpill(SpillFile):
    """A real spill file whose appends fail with ENOSPC while ``full``, or
    the next ``failures`` times."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full = False
        self.failures = 0

    def append(self, entries: Sequence[JournalEntry]) -> None:
        if entries and (self.full or self.failures > 0):
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        super().append(entries)


class FullDiskStore(SqliteStore):
    """A real SQLite store whose writes fail as on a full disk while ``full``,
    or the next ``failures`` times; its spill file is ``spill``."""

    def __init__(self, path: str, spill: FullDiskSpill) -> None:
        super().__init__(path)
        self.spill = spill
        self.full = False
        self.failures = 0
        # While set, writes wait for `gate` (and say so in `entered`).
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def write(self, *args: Any, **kwargs: Any) -> Any:
        gate = self.gate
        if gate is not None:
            self.entered.set()
            gate.wait()
        if self.full or self.failures > 0:
            self.failures -= 1
            raise StoreError("sqlite: database or disk is full")
        return super().write(*args, **kwargs)


@contextlib.asynccontextmanager
async def _full_disk_budget(tmp_path: Path, clock: WallClock | None = None, **config: Any) -> Any:
    spill = FullDiskSpill(tmp_path / "budget.db.spill")
    store = FullDiskStore(str(tmp_path / "budget.db"), spill)

    def fill(full: bool) -> None:
        store.full = spill.full = full

    async with open_budget(
        make_config(**config), database=store, spill=spill, clock=clock or _utc_now
    ) as budget:
        yield budget, fill, store


async def test_a_cost_that_cannot_be_made_durable_is_refused_and_counts_once_when_resent(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'budget.db'}"

    def patch() -> str:
        found = rows(url, "SELECT body FROM quilt_patches WHERE type = 'budget'")
        return str(found[0][0])

    async with _full_disk_budget(tmp_path, daily_cap="100", persist_every=1) as (budget, fill, _):
        await budget.record("before", "1.00")
        await budget.cycle()
        fill(True)
        receipt = await budget.submit(_cost("lost", "2.00"))
        # Handled with the cost, before its write fails: this patch counts it.
        await budget.cycle()
        with trio.fail_after(PATIENCE_S):
            await receipt.durable.wait()
        assert receipt.unavailable
        with trio.fail_after(PATIENCE_S), pytest.raises(CostUnavailable, match="resend"):
            await budget.record("lost-too", "4.00")
        health = await budget.health()
        # Not counted: the resend must count them once.
        assert (health.status, health.store_ok) == ("degraded", False)
        assert (health.daily_spend, health.dispatches, health.pending) == (Decimal("1.00"), 1, 0)
        fill(False)
        await _healthy(budget)  # by itself: nothing was sent meanwhile
        # The patches written once the store was back never count a refused
        # cost: a restore would count it, and its resend once more.
        assert '"daily_spend":"1.00"' in patch() and '"dispatches":1' in patch()
        resent = await budget.record("lost", "2.00")
        assert not resent.duplicate
        assert (await budget.record("lost", "2.00")).duplicate
        health = await budget.health()
        assert (health.daily_spend, health.dispatches) == (Decimal("3.00"), 2)
    _check_exactly_once(url, {"before": Decimal("1.00"), "lost": Decimal("2.00")})
    assert '"daily_spend":"3.00"' in patch() and '"dispatches":2' in patch()


async def test_a_patch_of_the_day_before_never_counts_a_refused_cost(tmp_path: Path) -> None:
    """The cost was counted just before midnight, its write failed just after:
    the rollover patch of its day, taken meanwhile, must not count it (a
    restore of that day would, and the resend would count it again)."""
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    clock = WallClock(datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC))
    async with _full_disk_budget(tmp_path, clock, store_timeout_s=60) as (budget, fill, store):
        await budget.record("before", "1.00")
        fill(True)
        store.gate = gate = threading.Event()
        receipt = await budget.submit(_cost("lost", "2.00"))
        with trio.fail_after(PATIENCE_S):
            await trio.to_thread.run_sync(store.entered.wait)  # its write has begun
        clock.advance(2)
        await budget.cycle()  # the day rolls over: the 1st's final patch counts "lost"
        await budget.health()
        store.gate = None
        gate.set()
        with trio.fail_after(PATIENCE_S):
            await receipt.durable.wait()
        assert receipt.unavailable
        fill(False)
        await _healthy(budget)
        (first,) = rows(url, "SELECT body FROM quilt_patches WHERE name = 'budget_2026-12-01'")
        assert '"daily_spend":"1.00"' in first[0] and '"dispatches":1' in first[0]
        assert not (await budget.record("lost", "2.00")).duplicate  # now on the 2nd
    _check_exactly_once(url, {"before": Decimal("1.00"), "lost": Decimal("2.00")})


async def test_a_duplicate_of_a_refused_cost_is_refused_too(tmp_path: Path) -> None:
    """The original's write failed while its resends waited behind it (a
    duplicate, and a batch holding one): the store takes the next write, but
    their acks would vouch for a cost that is in no journal."""
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    async with _full_disk_budget(tmp_path, store_timeout_s=60) as (budget, _, store):
        await budget.record("before", "1")
        # This one write fails, and so does its spill; the next ones work.
        store.failures = store.spill.failures = 1
        store.gate = gate = threading.Event()
        first = await budget.submit(_cost("twice", "0.5"))
        with trio.fail_after(PATIENCE_S):
            await trio.to_thread.run_sync(store.entered.wait)  # its write has begun
        # Counted as duplicates of a cost that is not durable yet: their
        # acks wait behind it...
        second = await budget.submit(_cost("twice", "0.5"))
        batch = await budget.submit_many([_cost("twice", "0.5"), _cost("other", "0.25")])
        await budget.health()
        store.gate = None
        gate.set()  # ...and its write fails
        with trio.fail_after(PATIENCE_S):
            for receipt in (first, second, batch):
                await receipt.durable.wait()
        assert first.unavailable and second.unavailable and batch.unavailable
        assert batch.duplicates[0]  # counted as a duplicate of the refused one
        await _healthy(budget)
        assert not (await budget.record("twice", "0.5")).duplicate
        # The batch's other cost was written once the disk had room again:
        # its resend is a duplicate or counts now, never both.
        await budget.record("other", "0.25")
        assert (await budget.health()).daily_spend == Decimal("1.75")
    _check_exactly_once(
        url, {"before": Decimal(1), "twice": Decimal("0.5"), "other": Decimal("0.25")}
    )


async def test_unavailable_on_the_wire_keeps_the_connection_and_health_is_503(
    tmp_path: Path,
) -> None:
    from budget_actor.net.server import serve

    async with (
        _full_disk_budget(tmp_path) as (budget, fill, _),
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(serve, budget, "127.0.0.1", 0)
        async with connect(f"ws://127.0.0.1:{port}/ws") as conn:
            await conn.cost("before", "1")
            fill(True)
            await conn.send({"type": "cost", "dispatch_id": "w-1", "usd": "0.25"})
            error = await conn.recv_type("ack", "error", timeout=PATIENCE_S)
            assert (error["type"], error["code"], error["dispatch_id"]) == (
                "error",
                "unavailable",
                "w-1",
            )
            assert (await http_get(f"http://127.0.0.1:{port}/health")).status == 503
            assert (await conn.health())["status"] == "degraded"  # still open
            batch = [
                {"dispatch_id": "b-1", "usd": "0.5"},
                {"dispatch_id": "b-2", "usd": "0.25"},
            ]
            await conn.send({"type": "costs", "costs": batch})
            error = await conn.recv_type("acks", "error", timeout=PATIENCE_S)
            assert (error["type"], error["code"], error["dispatch_id"]) == (
                "error",
                "unavailable",
                "b-1",
            )
            fill(False)

            async def ok() -> bool:
                return (await http_get(f"http://127.0.0.1:{port}/health")).status == 200

            await eventually(ok, timeout=PATIENCE_S)
            ack = await conn.cost("w-1", "0.25")
            assert not ack["duplicate"]
            await conn.send({"type": "costs", "costs": batch})
            acks = await conn.recv_type("acks", "error", timeout=PATIENCE_S)
            assert [a["duplicate"] for a in acks["acks"]] == [False, False]
            health = await conn.health()
            assert (health["daily_spend"], health["dispatches"]) == ("2.00", 4)
        nursery.cancel_scope.cancel()


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _cost(dispatch_id: str, usd: str) -> Cost:
    return make_cost(dispatch_id, usd, max_cost=Decimal(1000))


# --------------------------------------------------------------------------
# A real full disk: SQLite and its spill file on a 1 MiB tmpfs
# --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test (root only), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs here: {done.stderr.strip()}"
    _needs_root(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        probe = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(probe, b"\0")
        finally:
            os.close(probe)


async def _send_until_unavailable(
    conn: Conn, prefix: str, acked: dict[str, Decimal], limit: int = 2000
) -> list[str]:
    """Send costs one by one until one is answered `unavailable`; each must
    be answered (ack or error). The refused ids."""
    for i in range(limit):
        dispatch_id, usd = f"{prefix}-{i}", Decimal(1 + i) / 10000
        await conn.send({"type": "cost", "dispatch_id": dispatch_id, "usd": str(usd)})
        reply = await conn.recv_type("ack", "error", timeout=PATIENCE_S)
        assert reply["dispatch_id"] == dispatch_id, reply
        if reply["type"] == "ack":
            acked[dispatch_id] = usd
            continue
        assert reply["code"] == "unavailable", reply
        return [dispatch_id]
    raise AssertionError(f"{limit} costs on a full disk and not one refused")


async def test_a_full_disk_answers_unavailable_then_recovers_by_itself(
    small_disk: Path, launcher: Launcher
) -> None:
    db = small_disk / "budget.db"
    url = f"sqlite:///{db}"
    service = await launcher.start(url, "--daily-cap", "1000", "--log-level", "WARNING")
    acked: dict[str, Decimal] = {}
    async with connect(service.ws_url) as conn:
        for i in range(20):
            acked[f"warm-{i}"] = Decimal("0.01")
            await conn.cost(f"warm-{i}", "0.01")
        _fill(small_disk / "filler")

        refused = await _send_until_unavailable(conn, "full", acked)
        reply = await http_get(f"{service.http_base}/health")
        assert reply.status == 503 and reply.json()["status"] == "degraded"
        # Still full: what is sent now is answered too, never left waiting.
        for i in range(3):
            dispatch_id = f"more-{i}"
            await conn.send({"type": "cost", "dispatch_id": dispatch_id, "usd": "0.5"})
            answer = await conn.recv_type("ack", "error", timeout=PATIENCE_S)
            assert answer["dispatch_id"] == dispatch_id
            if answer["type"] == "ack":
                acked[dispatch_id] = Decimal("0.5")
            else:
                assert answer["code"] == "unavailable"
                refused.append(dispatch_id)
        assert (await conn.health())["status"] == "degraded"

        (small_disk / "filler").unlink()

        async def ok() -> bool:
            return (await http_get(f"{service.http_base}/health")).status == 200

        await eventually(ok, timeout=PATIENCE_S)
        # The same connection: the refused costs count now, once.
        for dispatch_id in refused:
            usd = Decimal("0.5") if dispatch_id.startswith("more") else _usd_of(dispatch_id)
            ack = await conn.cost(dispatch_id, str(usd))
            assert not ack["duplicate"]
            acked[dispatch_id] = usd
        first = await conn.cost("warm-0", "0.01")
        assert first["duplicate"]
        health = await conn.health()
        assert health["status"] == "ok"
        assert Decimal(health["daily_spend"]) == sum(acked.values())
        assert health["dispatches"] == len(acked)
    assert await service.stop() == 0
    _check_exactly_once(url, acked)
    assert (small_disk / "budget.db.spill").read_bytes() == b""
    patch = rows(url, "SELECT body FROM quilt_patches WHERE type = 'budget'")
    assert f'"daily_spend":"{sum(acked.values())}"' in patch[0][0]


def _usd_of(dispatch_id: str) -> Decimal:
    return Decimal(1 + int(dispatch_id.rsplit("-", 1)[1])) / 10000


# --------------------------------------------------------------------------
# Out of file descriptors
# --------------------------------------------------------------------------


def _limit_for(pid: int, spare: int) -> int:
    """The RLIMIT_NOFILE that leaves ``pid`` exactly ``spare`` free descriptors
    (a new descriptor takes the lowest free number below the limit)."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit, free = 0, 0
    while free < spare or limit in used:
        if limit not in used:
            free += 1
        limit += 1
    return limit


async def test_out_of_file_descriptors_the_dispatcher_is_served_and_it_recovers(
    launcher: Launcher, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'fd.db'}"
    service = await launcher.start(url, "--daily-cap", "1000", "--log-level", "WARNING")
    pid = service.proc.pid
    acked: dict[str, Decimal] = {}
    async with connect(service.ws_url) as dispatcher:
        await dispatcher.cost("before", "1")
        acked["before"] = Decimal(1)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_limit_for(pid, 4), hard))
        # More connections than descriptors left: the kernel completes them,
        # and the service's accept() fails for want of a descriptor.
        crowd: list[trio.socket.SocketType] = []
        try:
            for _ in range(12):
                sock = trio.socket.socket()
                crowd.append(sock)
                await sock.connect((service.host, service.port))

            async def starved() -> bool:
                return "accept returned EMFILE" in service.stderr_text()

            await eventually(starved, timeout=PATIENCE_S)
            # The dispatcher already connected keeps counting, durably.
            for i in range(20):
                await dispatcher.cost(f"starved-{i}", "0.5")
                acked[f"starved-{i}"] = Decimal("0.5")
            health = await dispatcher.health()
            assert health["status"] == "ok" and health["pending"] == 0
        finally:
            for sock in crowd:
                sock.close()
        # The crowd is gone: descriptors are free again, under the same limit.

        async def ok() -> bool:
            with contextlib.suppress(OSError):
                return (await http_get(f"{service.http_base}/health", timeout=2)).status == 200
            return False

        await eventually(ok, timeout=PATIENCE_S)
        async with connect(service.ws_url) as late:
            await late.cost("after", "2")
            acked["after"] = Decimal(2)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        health = await dispatcher.health()
        assert Decimal(health["daily_spend"]) == sum(acked.values())
    assert await service.stop() == 0
    _check_exactly_once(url, acked)
    # Failed accepts are reported, not a traceback ten times a second.
    log = service.stderr_text()
    assert 1 <= log.count("accept returned EMFILE") <= 5, log[-3000:]
    assert "Traceback" not in log


# --------------------------------------------------------------------------
# A PostgreSQL that accepts connections and never answers
# --------------------------------------------------------------------------


async def test_a_database_that_accepts_but_never_answers_costs_spill_and_drain(
    pg_url: str, tmp_path: Path
) -> None:
    config = make_config(daily_cap="1000", store_timeout_s=1, sync_interval_s=0.05)
    spill = tmp_path / "stall.spill"
    proxy = CuttableProxy(*target_of(pg_url))
    acked: dict[str, Decimal] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with open_budget(config, database=proxy.url_for(pg_url), spill=spill) as budget:
            await budget.record("before", "1")
            acked["before"] = Decimal(1)
            proxy.stall()  # the open connection goes silent mid-conversation
            with trio.fail_after(PATIENCE_S):
                receipts = []
                for i in range(5):
                    receipts.append(await budget.record(f"stalled-{i}", "0.25"))
                    acked[f"stalled-{i}"] = Decimal("0.25")
                # Acknowledged while the database still says nothing.
                assert [r.duplicate for r in receipts] == [False] * 5
                health = await budget.health()
                assert (health.status, health.store_ok) == ("degraded", False)
                assert health.pending == 5
                # Asked while stalled, answered while stalled.
                assert not (await budget.admit("stalled-admit", "1")).allowed
            assert len(spill.read_bytes().splitlines()) == 5
            proxy.resume()
            await _healthy(budget)
            assert spill.read_bytes() == b""
            again = await budget.record("stalled-0", "0.25")
            assert again.duplicate and again.seq == receipts[0].seq
            assert (await budget.health()).daily_spend == sum(acked.values())
        nursery.cancel_scope.cancel()
    _check_exactly_once(pg_url, acked)
    share = rows(pg_url, "SELECT sum(spend) FROM budget_shares")
    assert share == [(sum(acked.values()),)]


async def test_history_and_the_childrens_store_calls_give_up_on_a_silent_database(
    pg_url: str, tmp_path: Path
) -> None:
    """The children with connections of their own (history, alert webhooks)
    call the store through ``call_store``, with the configured deadline: a
    silent database fails their call within ``store_timeout_s`` instead of
    holding it (and a /history request, or the webhook sender) for good, and
    the next call after it answers again works."""
    config = make_config(daily_cap="1000", store_timeout_s=1)
    proxy = CuttableProxy(*target_of(pg_url))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        url = proxy.url_for(pg_url)
        webhook_store = open_store(url).companion()
        limiter = trio.CapacityLimiter(1)
        day = datetime.now(UTC).date().isoformat()
        async with open_budget(config, database=url, spill=tmp_path / "h.spill") as budget:
            await budget.record("h-1", "1")
            await call_store(webhook_store, webhook_store.others, day, limiter=limiter, timeout_s=1)
            assert (await budget.history(3)).days[-1].daily_spend == Decimal(1)
            proxy.stall()
            with trio.fail_after(PATIENCE_S):
                with pytest.raises(StoreError, match="no answer within 1s"):
                    await budget.history(3)
                with pytest.raises(StoreError, match="no answer within 1s"):
                    await call_store(
                        webhook_store, webhook_store.others, day, limiter=limiter, timeout_s=1
                    )
            proxy.resume()

            async def readable() -> bool:
                try:
                    history = await budget.history(3)
                    await call_store(
                        webhook_store, webhook_store.others, day, limiter=limiter, timeout_s=5
                    )
                except StoreError:
                    return False
                return history.days[-1].daily_spend == Decimal(1)

            await eventually(readable, timeout=PATIENCE_S)
        webhook_store.close()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# PostgreSQL restarted in the middle of a transaction
# --------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[_pgcluster.Cluster]:
    _needs_root(_pgcluster.available())
    made = _pgcluster.Cluster()
    try:
        made.start()
        yield made
    finally:
        made.destroy()


async def test_postgres_restarted_in_the_middle_of_a_transaction(
    cluster: _pgcluster.Cluster, tmp_path: Path
) -> None:
    # The transaction must still be waiting when the server goes: no timeout
    # of ours may end it first.
    config = make_config(daily_cap="1000", store_timeout_s=60)
    url = cluster.url
    acked: dict[str, Decimal] = {}
    async with open_budget(config, database=url, spill=tmp_path / "pg.spill") as budget:
        await budget.record("before", "1")
        acked["before"] = Decimal(1)
        blocker = await trio.to_thread.run_sync(psycopg.connect, url)
        try:
            # Another session holds the journal: the service's next write
            # stops inside its transaction, after BEGIN, before COMMIT.
            blocker.execute("LOCK TABLE budget_journal IN ACCESS EXCLUSIVE MODE")
            async with trio.open_nursery() as senders:

                async def send(dispatch_id: str, usd: str) -> None:
                    receipt = await budget.record(dispatch_id, usd)
                    assert not receipt.duplicate
                    acked[dispatch_id] = Decimal(usd)

                senders.start_soon(send, "mid", "0.40")

                async def waiting() -> bool:
                    # Its own connection: in the blocker's transaction the
                    # statistics views would stay a snapshot of its first read.
                    found = await trio.to_thread.run_sync(
                        rows,
                        url,
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%%budget_journal%%'",
                    )
                    return found[0][0] > 0

                await eventually(waiting, timeout=PATIENCE_S)
                await trio.to_thread.run_sync(cluster.restart, "immediate")
                for i in range(3):
                    senders.start_soon(send, f"after-{i}", "0.10")
            assert set(acked) == {"before", "mid", "after-0", "after-1", "after-2"}
        finally:
            with contextlib.suppress(psycopg.Error):
                blocker.close()
        await _healthy(budget)
        assert (await budget.record("mid", "0.40")).duplicate
        health = await budget.health()
        assert (health.daily_spend, health.dispatches) == (sum(acked.values()), len(acked))
    _check_exactly_once(url, acked)
    assert rows(url, "SELECT sum(spend), sum(dispatches) FROM budget_shares") == [
        (sum(acked.values()), len(acked))
    ]


# --------------------------------------------------------------------------
# The clock jumps back across midnight
# --------------------------------------------------------------------------


async def test_the_clock_jumping_back_across_midnight_reopens_no_day(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'clock.db'}"
    clock = WallClock(datetime(2026, 12, 1, 23, 59, 58, tzinfo=UTC))
    config = make_config(daily_cap="10.00", persist_every=1)
    async with open_budget(config, database=url, clock=clock) as budget:
        await budget.record("a", "1.00")
        clock.advance(4)  # 00:00:02 on the 2nd: the day rolls over
        await budget.record("b", "2.00")
        # An NTP step back across midnight.
        clock.now = datetime(2026, 12, 1, 23, 59, 57, tzinfo=UTC)
        await budget.record("c", "0.50")
        await budget.cycle()
        health = await budget.health()
        assert (health.day, health.daily_spend, health.dispatches) == (
            "2026-12-02",
            Decimal("2.50"),
            2,
        )
        assert (await budget.record("b", "2.00")).duplicate
        assert (await budget.record("a", "1.00")).duplicate  # counted on the 1st
        await _healthy(budget)
    # A restart while the clock is still behind: the 2nd stays open.
    async with open_budget(config, database=url, clock=clock) as budget:
        health = await budget.health()
        assert (health.day, health.daily_spend) == ("2026-12-02", Decimal("2.50"))
        assert (await budget.record("c", "0.50")).duplicate
        assert (await budget.record("a", "1.00")).duplicate
        clock.now = datetime(2026, 12, 2, 0, 0, 30, tzinfo=UTC)  # the clock catches up
        await budget.record("d", "0.25")
        await budget.cycle()
        health = await budget.health()
        assert (health.day, health.daily_spend, health.dispatches) == (
            "2026-12-02",
            Decimal("2.75"),
            3,
        )
        await _healthy(budget)
    days = rows(url, "SELECT day, dispatch_id FROM budget_journal ORDER BY seq")
    assert days == [
        ("2026-12-01", "a"),
        ("2026-12-02", "b"),
        ("2026-12-02", "c"),
        ("2026-12-02", "d"),
    ]
    patches = dict(rows(url, "SELECT name, body FROM quilt_patches WHERE type = 'budget'"))
    assert '"daily_spend":"1.00"' in patches["budget_2026-12-01"]
    assert '"daily_spend":"2.75"' in patches["budget_2026-12-02"]
