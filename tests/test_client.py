"""``budget_actor.client.BudgetClient`` against real services, on asyncio and trio.

Each test function is synchronous and runs the same coroutine under the
event loop it is given (``anyio.run``), so one body covers both loops. The
service is a real ``budget-actor serve`` process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import trio

from budget_actor.client import (
    Admission,
    AlertNotice,
    BudgetClient,
    ConnectionStatus,
    CostRefused,
    Forbidden,
    Health,
    InvalidCost,
    OutboxError,
    Receipt,
    ServiceUnavailable,
    Spend,
    Unauthorized,
)
from budget_actor.client.outbox import Outbox

from ._client import Launcher, Service, connect, free_closed_port
from .test_hostile import self_signed

pytestmark = pytest.mark.slow

BACKENDS = ["asyncio", "trio"]
T = TypeVar("T")

DISPATCHER = "disp-client-test-token"
OBSERVER = "obs-client-test-token"


def run(backend: str, main: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(main, *args, backend=backend)


def start(launcher: Launcher, database: str, *args: str) -> Service:
    service = launcher.spawn(database, *args)
    trio.run(service.wait_ready)
    return service


def restart(launcher: Launcher, service: Service, database: str, *args: str) -> Service:
    """Stop ``service`` (SIGTERM) and start a new one on the same port."""
    service.terminate_sync()
    return start(launcher, database, "--port", str(service.port), *args)


def fingerprint(path: Path) -> dict[str, str]:
    """The file and its SQLite companions (-wal, -shm), byte for byte."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.parent.glob(path.name + "*"))
    }


def outbox_rows(path: Path, table: str = "costs") -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY n").fetchall()


# -- importing -------------------------------------------------------------------


def test_importing_the_client_on_asyncio_does_not_load_trio() -> None:
    code = (
        "import asyncio, sys\n"
        "import budget_actor.client\n"
        "from budget_actor.client import BudgetClient\n"
        "bad = sorted(m for m in sys.modules if m == 'trio' or m.startswith('trio.')"
        " or m.startswith(('budget_actor.runtime', 'budget_actor.stores', 'budget_actor.net'))"
        " or m in ('psycopg', 'trio_websocket'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the API, on both loops -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_enqueue_record_flush_cycle_health_admit_subscribe(
    backend: str, launcher: Launcher, sqlite_url: str
) -> None:
    svc = start(launcher, sqlite_url, "--daily-cap", "1.00", "--persist-every", "3")

    async def main() -> None:
        async with BudgetClient(svc.ws_url) as client:
            updates = client.subscribe()
            first = await updates.__anext__()
            assert isinstance(first, Spend)
            assert (first.daily_spend, first.daily_cap) == (Decimal(0), Decimal("1.00"))
            assert first.seq == 0

            await client.enqueue("e-1", "0.10", model="m", agent="writer", input_tokens=5)
            await client.enqueue("e-2", Decimal("0.20"))
            receipt = await client.record("e-3", "0.30")
            assert isinstance(receipt, Receipt)
            assert (receipt.dispatch_id, receipt.duplicate) == ("e-3", False)
            again = await client.record("e-3", "0.30")
            assert (again.seq, again.duplicate) == (receipt.seq, True)
            await client.flush()
            assert client.pending == 0

            for _ in range(3):
                await client.cycle()
            health = await client.health()
            assert isinstance(health, Health)
            assert health.daily_spend == Decimal("0.60") and health.dispatches == 3
            assert health.cycle_count == 3 and health.cycles_until_persist == 3
            assert isinstance(health.remaining, Decimal) and health.remaining == Decimal("0.40")

            allowed = await client.admit("e-4", "0.15")
            assert isinstance(allowed, Admission)
            assert allowed.allowed and allowed.remaining == Decimal("0.25")
            refused = await client.admit("e-5", "0.50")
            assert not refused.allowed and refused.reason

            # Spend pushes are latest-value: read until the newest state.
            spend = first
            while spend.seq < receipt.seq:
                update = await updates.__anext__()
                if isinstance(update, Spend):
                    spend = update
            assert spend.daily_spend == Decimal("0.60")
            await client.enqueue("e-4", "0.25")  # crosses 80% of the cap
            alert = await updates.__anext__()
            while not isinstance(alert, AlertNotice):
                alert = await updates.__anext__()
            assert alert.threshold == 0.8 and alert.daily_spend == Decimal("0.85")

    run(backend, main)


BAD_COSTS = [
    ("d", "-0.01", {}),
    ("d", "NaN", {}),
    ("d", "1e-65", {}),
    ("d", "1000.01", {}),
    ("d", "1_0", {}),
    ("", "0.1", {}),
    ("x\x1b[2J", "0.1", {}),
    ("d", "0.1", {"model": "m" * 257}),
    ("d", "0.1", {"input_tokens": -1}),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_costs_raise_before_anything_is_queued(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    svc = start(launcher, sqlite_url)
    box = tmp_path / "bad.outbox"

    async def main() -> list[str]:
        codes = []
        async with BudgetClient(svc.ws_url, outbox=box) as client:
            for dispatch_id, usd, extra in BAD_COSTS:
                for call in (client.enqueue, client.record):
                    with pytest.raises(InvalidCost) as refused:
                        await call(dispatch_id, usd, **extra)  # type: ignore[arg-type]
                    assert client.pending == 0
                codes.append(refused.value.code)
            # A binary float has lost the exact amount already.
            with pytest.raises(InvalidCost):
                await client.enqueue("d", 0.1)  # type: ignore[arg-type]
            with pytest.raises(InvalidCost):
                await client.admit("a", "-1")
            health = await client.health()
            assert (health.daily_spend, health.dispatches) == (Decimal(0), 0)
        assert outbox_rows(box) == []
        return codes

    codes = run(backend, main)

    async def service_says() -> list[str]:
        # The service refuses the same values, with the same codes.
        said = []
        async with connect(svc.ws_url) as conn:
            for dispatch_id, usd, extra in BAD_COSTS:
                await conn.send({"type": "cost", "dispatch_id": dispatch_id, "usd": usd, **extra})
                answer = await conn.recv_type("ack", "error")
                assert answer["type"] == "error", answer
                said.append(answer["code"])
        return said

    assert trio.run(service_says) == codes


# -- the outbox -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_enqueue_works_while_the_service_is_down_and_the_outbox_sends_later(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    port = free_closed_port()
    url = f"ws://127.0.0.1:{port}/ws"
    box = tmp_path / "costs.outbox"
    amounts = {f"o-{i}": Decimal(i + 1) / 1000 for i in range(40)}

    async def offline_only() -> None:
        async with BudgetClient(url, outbox=box, timeout=0.3) as client:
            async with anyio.create_task_group() as tasks:
                for dispatch_id, usd in amounts.items():
                    tasks.start_soon(client.enqueue, dispatch_id, usd)
            assert client.pending == len(amounts)
            with pytest.raises(ServiceUnavailable):
                await client.health()

    run(backend, offline_only)
    # Every cost is in the file, in the order enqueue returned it safe.
    assert len(outbox_rows(box)) == len(amounts)

    svc = start(launcher, sqlite_url, "--port", str(port))

    async def online() -> Health:
        async with BudgetClient(svc.ws_url, outbox=box) as client:
            assert client.pending == len(amounts)
            await client.flush()
            return await client.health()

    health = run(backend, online)
    assert health.daily_spend == sum(amounts.values())
    assert health.dispatches == len(amounts)
    assert outbox_rows(box) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_outbox_makes_enqueue_wait(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    port = free_closed_port()
    url = f"ws://127.0.0.1:{port}/ws"
    box = tmp_path / "small.outbox"

    async def main() -> None:
        async with BudgetClient(url, outbox=box, max_pending=5) as client:
            for i in range(5):
                await client.enqueue(f"p-{i}", "0.01")
            # The sixth waits for room: it does not return while the
            # service is down.
            with anyio.move_on_after(0.5) as waited:
                await client.enqueue("p-5", "0.01")
            assert waited.cancelled_caught
            assert client.pending == 5 and len(outbox_rows(box)) == 5
            # The service comes up, acknowledges, and room appears.
            await anyio.to_thread.run_sync(start, launcher, sqlite_url, "--port", str(port))
            await client.enqueue("p-5", "0.01")
            await client.flush()
            assert (await client.health()).dispatches == 6

    run(backend, main)


def _foreign_sqlite(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('my data')")


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"these are someone's notes, not a database\n" * 100)


def _damaged(path: Path) -> None:
    box = Outbox(path)
    box.open()
    box.write([b'{"dispatch_id":"a","usd":"0.1"}'] * 50)
    box.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(3996)  # the header's tail and the schema page
    path.write_bytes(bytes(data))


def _newer(path: Path) -> None:
    box = Outbox(path)
    box.open()
    box.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")


def _tampered_row(path: Path) -> None:
    box = Outbox(path)
    box.open()
    box.write([b'{"dispatch_id":"a","usd":"-5"}'])
    box.close()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_foreign_sqlite, "another program"),
        (_not_sqlite, "not an SQLite database"),
        (_damaged, "damaged"),
        (_newer, "newer"),
        (_tampered_row, "row 1"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_foreign_or_damaged_outbox_is_refused_and_left_untouched(
    backend: str, tmp_path: Path, make: Callable[[Path], None], words: str
) -> None:
    path = tmp_path / "file.outbox"
    make(path)
    before = fingerprint(path)

    async def main() -> None:
        with pytest.raises(OutboxError, match=words):
            async with BudgetClient("ws://127.0.0.1:9/ws", outbox=path):
                pass

    run(backend, main)
    assert fingerprint(path) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_outbox_serves_one_client_at_a_time(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "shared.outbox"

    async def main() -> None:
        async with BudgetClient("ws://127.0.0.1:9/ws", outbox=path):
            with pytest.raises(OutboxError, match="in use"):
                async with BudgetClient("ws://127.0.0.1:9/ws", outbox=path):
                    pass
        async with BudgetClient("ws://127.0.0.1:9/ws", outbox=path):
            pass  # free again

    run(backend, main)


# -- refusals -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_unauthorized_and_forbidden(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    box = tmp_path / f"observer-{backend}.outbox"
    svc = start(
        launcher, sqlite_url, "--dispatcher-token", DISPATCHER, "--observer-token", OBSERVER
    )

    async def main() -> None:
        async with BudgetClient(svc.ws_url, token="wrong") as client:
            with pytest.raises(Unauthorized):
                await client.health()
            with pytest.raises(Unauthorized):
                await client.enqueue("u-1", "0.1")
        async with BudgetClient(svc.ws_url, token=OBSERVER) as observer:
            assert (await observer.health()).status == "ok"
            with pytest.raises(Forbidden):
                await observer.record("u-1", "0.1")
            with pytest.raises(Forbidden):
                await observer.enqueue("u-2", "0.1")
            with pytest.raises(Forbidden):
                await observer.admit("u-3", "0.1")
            update = await observer.subscribe().__anext__()
            assert isinstance(update, Spend) and update.dispatches == 0
        # With an outbox the cost is safe at once; the refusal comes with flush,
        # and the cost stays in the outbox for a dispatcher's token.
        async with BudgetClient(svc.ws_url, token=OBSERVER, outbox=box) as observer:
            await observer.enqueue("u-4", "0.1")
            with pytest.raises(Forbidden), anyio.fail_after(20):
                await observer.flush()
        assert len(outbox_rows(box)) == 1
        async with BudgetClient(svc.ws_url, token=DISPATCHER, outbox=box) as dispatcher:
            await dispatcher.flush()
        assert outbox_rows(box) == []
        async with BudgetClient(svc.ws_url, token=DISPATCHER) as dispatcher:
            assert (await dispatcher.record("u-1", "0.1")).duplicate is False

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_costs_the_service_refuses_are_found_and_reported_never_dropped(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    """The service's maximum is lower than the client's: the refused costs are
    found inside their batches; every other cost counts exactly once."""
    svc = start(launcher, sqlite_url, "--max-cost", "1")
    box = tmp_path / "refused.outbox"
    amounts = {f"r-{i}": Decimal("0.001") * (i % 7 + 1) for i in range(300)}
    poisoned = {"r-17": Decimal(5), "r-250": Decimal(2)}
    amounts.update(poisoned)

    async def main() -> Health:
        async with BudgetClient(svc.ws_url, outbox=box) as client:
            async with anyio.create_task_group() as tasks:
                for dispatch_id, usd in amounts.items():
                    tasks.start_soon(client.enqueue, dispatch_id, usd)
            with pytest.raises(CostRefused) as refused:
                await client.flush()
            assert {r[0] for r in refused.value.refused} == set(poisoned)
            assert {r[1] for r in refused.value.refused} == {"invalid_cost"}
            await client.flush()  # reported once; the rest are all acknowledged
            with pytest.raises(CostRefused):
                await client.record("r-big", "3")
            return await client.health()

    health = run(backend, main)
    counted = {k: v for k, v in amounts.items() if k not in poisoned}
    assert health.daily_spend == sum(counted.values())
    assert health.dispatches == len(counted)
    kept = [row[1] for row in outbox_rows(box, "refused")]
    assert len(kept) == 3 and all('"r-17"' in k or '"r-250"' in k or "r-big" in k for k in kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_costs_waiting_to_be_sent_when_a_connection_ends_are_sent_on_the_next(
    backend: str, launcher: Launcher, sqlite_url: str
) -> None:
    """A connection that ends while the sender waits for its lock (another
    frame going out) must not take the waiting costs with it: they go on the
    next connection and flush() returns. (The sender once took them off the
    queue before the lock, and lost them when the wait was cancelled.)"""
    svc = start(launcher, sqlite_url)

    async def main() -> Health:
        async with BudgetClient(svc.ws_url) as client:
            await client.record("w-0", "0.5")
            session = client._session
            assert session is not None
            # Lost costs would leave these enqueues waiting for their acks.
            with anyio.fail_after(20):
                async with session.lock:  # as a health frame being written would
                    async with anyio.create_task_group() as group:
                        for i in range(1, 4):
                            group.start_soon(client.enqueue, f"w-{i}", "0.25")
                        await anyio.sleep(0.2)  # the sender waits for the lock
                        assert client.pending == 3
                        session.end("ended by the test")
                await client.flush()
            return await client.health()

    health = run(backend, main)
    assert health.dispatches == 4 and health.daily_spend == Decimal("1.25")


# -- reconnects, subscriptions, TLS --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconnects_resubscribe_with_the_current_state(
    backend: str, launcher: Launcher, sqlite_url: str
) -> None:
    svc = start(launcher, sqlite_url)
    states: list[ConnectionStatus] = []

    async def main() -> None:
        async with BudgetClient(svc.ws_url, on_connection=states.append) as client:
            updates = client.subscribe()
            assert (await updates.__anext__()).seq == 0  # type: ignore[union-attr]
            await client.record("s-1", "0.5")
            new = await anyio.to_thread.run_sync(restart, launcher, svc, sqlite_url)
            # Another dispatcher counts a cost on the new service; whether it
            # lands before or after our reconnect, we end on the newest spend.
            async with BudgetClient(new.ws_url) as other:
                await other.record("s-2", "0.25")
            seen: list[Spend] = []
            with anyio.fail_after(20):
                async for update in updates:
                    if isinstance(update, Spend):
                        seen.append(update)
                        if update.daily_spend == Decimal("0.75"):
                            break
            assert seen[-1].dispatches == 2

    run(backend, main)
    kinds = [s.state for s in states]
    assert kinds[:2] == ["connecting", "connected"]
    assert "disconnected" in kinds and kinds.count("connected") >= 2
    lost = next(s for s in states if s.state == "disconnected")
    assert lost.detail and lost.retry_in is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_wss_with_a_trusted_certificate(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    svc = start(launcher, sqlite_url, "--tls-cert", str(cert), "--tls-key", str(key))
    url = f"wss://localhost:{svc.port}/ws"

    async def main() -> None:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with BudgetClient(url, ssl_context=trusted) as client:
            assert (await client.record("tls-1", "0.75")).duplicate is False
            assert (await client.health()).daily_spend == Decimal("0.75")
        # Not trusted: the client keeps trying and never talks to it.
        async with BudgetClient(url, timeout=1.0) as untrusting:
            with pytest.raises(ServiceUnavailable):
                await untrusting.health()

    run(backend, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_service_killed_mid_batch_loses_and_doubles_nothing(
    backend: str, launcher: Launcher, sqlite_url: str
) -> None:
    """In memory (no outbox): every enqueue that returned is counted once,
    across a kill -9 of the service while batches are in flight."""
    svc = start(launcher, sqlite_url)
    port = str(svc.port)
    returned: dict[str, Decimal] = {}

    async def main() -> Health:
        with anyio.fail_after(60):
            return await dispatch_through_a_kill()

    async def dispatch_through_a_kill() -> Health:
        async with BudgetClient(svc.ws_url) as client:

            async def dispatcher(k: int) -> None:
                for i in range(60):
                    dispatch_id, usd = f"k-{k}-{i}", Decimal(i % 5 + 1) / 100
                    await client.enqueue(dispatch_id, usd)
                    returned[dispatch_id] = usd

            async with anyio.create_task_group() as tasks:
                for k in range(20):
                    tasks.start_soon(dispatcher, k)
                while len(returned) < 300:
                    await anyio.sleep(0.01)
                svc.signal(signal.SIGKILL)
                await anyio.to_thread.run_sync(svc.proc.wait)
                await anyio.to_thread.run_sync(start, launcher, sqlite_url, "--port", port)
            await client.flush()
            return await client.health()

    health = run(backend, main)
    assert len(returned) == 1200
    assert health.daily_spend == sum(returned.values())
    assert health.dispatches == 1200
