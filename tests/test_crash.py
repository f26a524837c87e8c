"""kill -9 under load, again and again: an acknowledged cost is never lost and
never counted twice, on both stores."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from ._service import ServeProcess

KILLS = 20


async def _health(ws: WebSocketConnection) -> dict[str, Any]:
    await ws.send_message(json.dumps({"type": "health", "id": "h"}))
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] == "health":
            return message


def _cost(dispatch_id: str, usd: Decimal) -> str:
    return json.dumps({"type": "cost", "dispatch_id": dispatch_id, "usd": str(usd)})


@pytest.mark.slow
async def test_kill_9_under_load_loses_nothing_and_counts_nothing_twice(
    database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(20261201)
    args = ("--database", database_url, "--spill", str(tmp_path / "crash.spill"))
    args += ("--log-level", "WARNING", "--daily-cap", "1000000")
    acked: dict[str, Decimal] = {}
    in_doubt: dict[str, Decimal] = {}  # sent, no ack seen before the kill
    counter = 0
    resent_duplicates = 0
    sent: dict[str, Decimal] = {}  # this round's costs
    for round_no in range(KILLS + 1):
        service = await ServeProcess(*args, log=tmp_path / "serve.log").start()
        try:
            # A round that hangs fails the test instead of stalling CI.
            with trio.fail_after(60):
                async with open_websocket_url(service.url) as ws:
                    # A sender that got no ack re-sends; the id makes it safe.
                    for dispatch_id, usd in in_doubt.items():
                        await ws.send_message(_cost(dispatch_id, usd))
                    for _ in range(len(in_doubt)):
                        ack = json.loads(await ws.get_message())
                        assert ack["type"] == "ack", ack
                        acked[ack["dispatch_id"]] = in_doubt[ack["dispatch_id"]]
                        resent_duplicates += ack["duplicate"]
                    in_doubt = {}
                    health = await _health(ws)
                    assert Decimal(health["daily_spend"]) == sum(acked.values(), Decimal(0)), (
                        f"round {round_no}: spend {health['daily_spend']} != acked"
                    )
                    assert health["dispatches"] == len(acked)
                    if round_no == KILLS:
                        break
                    sent.clear()

                    async def sender() -> None:
                        nonlocal counter
                        while True:
                            counter += 1
                            dispatch_id = f"c{counter}"
                            usd = Decimal(rng.randrange(1, 10**6)) / Decimal(10**6)
                            sent[dispatch_id] = usd
                            await ws.send_message(_cost(dispatch_id, usd))
                            if counter % 16 == 0:
                                await trio.lowlevel.checkpoint()

                    async def reader() -> None:
                        while True:
                            ack = json.loads(await ws.get_message())
                            assert ack["type"] == "ack" and not ack["duplicate"], ack
                            acked[ack["dispatch_id"]] = sent[ack["dispatch_id"]]

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(sender)
                        nursery.start_soon(reader)
                        await trio.sleep(rng.uniform(0.05, 0.4))
                        service.kill()  # SIGKILL at a random moment under load
                        with trio.move_on_after(2):
                            try:
                                await trio.sleep_forever()
                            except* (ConnectionClosed, trio.BrokenResourceError):
                                pass
                        nursery.cancel_scope.cancel()
        except* (ConnectionClosed, trio.BrokenResourceError):
            pass
        finally:
            service.kill()
        in_doubt = {d: u for d, u in sent.items() if d not in acked}
    assert len(acked) > KILLS * 10, "the load was too light to mean anything"
    print(f"{len(acked)} costs acked across {KILLS} kills; {resent_duplicates} resends deduped")


@pytest.mark.slow
async def test_database_outage_then_kill_9_then_recovery(pg_url: str, tmp_path: Path) -> None:
    from ._helpers import rows
    from ._proxy import CuttableProxy, target_of

    proxy = CuttableProxy(*target_of(pg_url))
    acked: dict[str, Decimal] = {}
    sent: dict[str, Decimal] = {}
    async with trio.open_nursery() as outer:
        await outer.start(proxy.run)
        args = ("--database", proxy.url_for(pg_url), "--spill", str(tmp_path / "o.spill"))
        args += ("--log-level", "WARNING")
        service = await ServeProcess(*args, log=tmp_path / "serve.log").start()
        try:
            # The acks of the last 50 costs are never read. With trio-websocket's
            # default queue of one message, its reader would block on the second
            # and never see the kill, and leaving this block would wait for it
            # for good (a hang seen about once in 40 runs): room for them all.
            with trio.fail_after(60):
                async with open_websocket_url(service.url, message_queue_size=1024) as ws:

                    async def burst(prefix: str, n: int) -> None:
                        for i in range(n):
                            sent[f"{prefix}{i}"] = Decimal("0.001") * (i % 7 + 1)
                            await ws.send_message(_cost(f"{prefix}{i}", sent[f"{prefix}{i}"]))
                        for _ in range(n):
                            ack = json.loads(await ws.get_message())
                            assert ack["type"] == "ack", ack
                            acked[ack["dispatch_id"]] = sent[ack["dispatch_id"]]

                    await burst("up", 300)
                    proxy.cut()  # the database goes away in the middle of the load
                    await burst("down", 300)  # still acknowledged: spilled to disk
                    health = await _health(ws)
                    assert health["status"] == "degraded" and health["store_ok"] is False
                    assert health["pending"] >= 300
                    for i in range(50):  # in flight when the process dies
                        sent[f"x{i}"] = Decimal("0.5")
                        await ws.send_message(_cost(f"x{i}", Decimal("0.5")))
                    service.kill()
        except* (ConnectionClosed, trio.BrokenResourceError):
            pass
        finally:
            service.kill()
        assert rows(pg_url, "SELECT count(*) FROM budget_journal")[0][0] <= 300 + 50
        proxy.restore()
        service = await ServeProcess(*args, log=tmp_path / "serve.log").start()
        try:
            async with open_websocket_url(service.url) as ws:
                in_doubt = {d: u for d, u in sent.items() if d not in acked}
                for dispatch_id, usd in in_doubt.items():
                    await ws.send_message(_cost(dispatch_id, usd))
                for _ in in_doubt:
                    ack = json.loads(await ws.get_message())
                    acked[ack["dispatch_id"]] = in_doubt[ack["dispatch_id"]]
                health = await _health(ws)
                assert health["status"] == "ok" and health["pending"] == 0
                assert Decimal(health["daily_spend"]) == sum(acked.values(), Decimal(0))
            assert await service.stop() == 0
        finally:
            service.kill()
        outer.cancel_scope.cancel()
    journal = rows(pg_url, "SELECT dispatch_id, usd FROM budget_journal")
    assert {d: Decimal(str(u)) for d, u in journal} == acked
    assert len(journal) == len(acked) == 650


@pytest.mark.slow
async def test_duplicate_ids_across_connections_and_restarts(
    database_url: str, tmp_path: Path
) -> None:
    args = ("--database", database_url, "--log-level", "WARNING")
    service = await ServeProcess(*args, log=tmp_path / "serve.log").start()
    try:
        async with open_websocket_url(service.url) as a, open_websocket_url(service.url) as b:
            for ws in (a, b):
                for i in range(100):
                    await ws.send_message(_cost(f"shared-{i}", Decimal("0.01")))
            acks = [json.loads(await ws.get_message()) for ws in (a, b) for _ in range(100)]
            firsts = [x for x in acks if not x["duplicate"]]
            assert len(firsts) == 100 and len({x["dispatch_id"] for x in firsts}) == 100
            by_id = {x["dispatch_id"]: x["seq"] for x in firsts}
            assert all(by_id[x["dispatch_id"]] == x["seq"] for x in acks)  # original seq
            assert Decimal((await _health(a))["daily_spend"]) == Decimal("1.00")
        assert await service.stop() == 0
        service = await ServeProcess(*args, log=tmp_path / "serve.log").start()
        async with open_websocket_url(service.url) as ws:
            await ws.send_message(_cost("shared-7", Decimal("0.01")))
            ack = json.loads(await ws.get_message())
            assert ack["duplicate"] is True and ack["seq"] == by_id["shared-7"]
            assert Decimal((await _health(ws))["daily_spend"]) == Decimal("1.00")
    finally:
        service.kill()


@pytest.mark.slow
async def test_sigterm_drains_everything_acknowledged(database_url: str, tmp_path: Path) -> None:
    from ._helpers import rows

    args = ("--database", database_url, "--log-level", "WARNING")
    service = await ServeProcess(*args, log=tmp_path / "serve.log").start()
    acked: set[str] = set()
    try:
        async with open_websocket_url(service.url) as ws:
            for i in range(2000):
                await ws.send_message(_cost(f"t{i}", Decimal("0.002")))
            for _ in range(500):
                acked.add(json.loads(await ws.get_message())["dispatch_id"])
            assert await service.stop() == 0  # SIGTERM with ~1,500 costs in flight
            with trio.move_on_after(5):
                try:
                    while True:
                        message = json.loads(await ws.get_message())
                        acked.add(message["dispatch_id"])
                except ConnectionClosed:
                    pass
    finally:
        service.kill()
    journal = {r[0] for r in rows(database_url, "SELECT dispatch_id FROM budget_journal")}
    assert acked <= journal
    patches = rows(database_url, "SELECT body FROM quilt_patches WHERE type = 'budget'")
    body = patches[0][0] if isinstance(patches[0][0], dict) else json.loads(patches[0][0])
    assert Decimal(body["daily_spend"]) == Decimal("0.002") * len(journal)
    assert body["dispatches"] == len(journal)
