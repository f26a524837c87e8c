"""``budget-actor demo``: the whole story in about ten seconds.

A real service (WebSocket server, actor, persister, alerter) runs on a
temporary SQLite database. A simulated dispatcher sends costs and heartbeat
cycles over the WebSocket, and a simulated AG Lu subscribes and prints what it
receives; both through the client library (:mod:`budget_actor.client`), as
programs in other processes would. The demo shows the spend climbing, the alert at 80%, the budget
patch in ``quilt_patches``, then restarts the service and shows the spend
restored, with no second alert.
"""

from __future__ import annotations

import json
import random
import signal
import tempfile
from decimal import Decimal
from pathlib import Path

import trio

from ..client import AlertNotice, BudgetClient, Receipt, Spend
from ..core.config import make_config
from ..core.money import to_wire
from ..net.server import serve
from ..runtime.service import open_budget
from ..stores.open import open_store

MODELS = {
    "claude-haiku": Decimal("0.0421"),
    "gpt-4o": Decimal("0.3150"),
    "llama-70b": Decimal("0.0988"),
}
# Time between simulated dispatches: slow enough to watch, fast enough that the
# demo finishes in about ten seconds.
PACE_S = 0.12
COSTS_PER_CYCLE = 3


def _say(who: str, text: str) -> None:
    print(f"[{who:<10}] {text}", flush=True)


async def run_demo(linger: float = 0) -> int:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="budget-demo-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'budget.db'}"
        config = make_config(daily_cap="5.00", alert_at="0.8", persist_every=10)
        _say("demo", f"daily cap ${config.daily_cap}, alert to AG Lu at 80%, database {url}")

        _say("demo", "starting the service")
        async with open_budget(config, database=url) as budget, trio.open_nursery() as nursery:
            port = await nursery.start(serve, budget, "127.0.0.1", 0)
            ws_url = f"ws://127.0.0.1:{port}/ws"
            _say("demo", f"service ready at {ws_url}")
            _say("demo", f"open http://127.0.0.1:{port}/ in a browser to watch it live")
            alerts: list[AlertNotice] = []
            nursery.start_soon(_ag_lu, ws_url, alerts)
            await trio.sleep(0.2)
            async with BudgetClient(ws_url) as client:
                sent = 0
                for cycle in range(1, 13):
                    for _ in range(COSTS_PER_CYCLE):
                        sent += 1
                        model = rng.choice(sorted(MODELS))
                        usd = (MODELS[model] * Decimal(rng.uniform(0.6, 1.4))).quantize(
                            Decimal("0.000001")
                        )
                        ack = await _cost(client, f"dispatch-{sent:03d}", usd, model)
                        _say(
                            "dispatcher",
                            f"cost {ack.dispatch_id} ${usd} ({model}) -> ack seq {ack.seq}",
                        )
                        await trio.sleep(PACE_S)
                    await client.cycle()
                    _say("dispatcher", f"heartbeat cycle {cycle}")
                ack = await _cost(client, "dispatch-001", Decimal("0.3150"), "gpt-4o")
                _say(
                    "dispatcher",
                    f"resent dispatch-001 -> ack duplicate={ack.duplicate} (not counted twice)",
                )
                await trio.sleep(0.3)
            health = await budget.health()
            await trio.to_thread.run_sync(_show_patch, url, health.day)
            _say(
                "demo", f"stopping the service at ${health.daily_spend} ({len(alerts)} alert sent)"
            )
            nursery.cancel_scope.cancel()

        _say("demo", "starting the service again on the same database")
        async with open_budget(config, database=url) as budget, trio.open_nursery() as nursery:
            try:  # the same port, so that an open page reconnects by itself
                port = await nursery.start(serve, budget, "127.0.0.1", port)
            except OSError:
                port = await nursery.start(serve, budget, "127.0.0.1", 0)
            ws_url = f"ws://127.0.0.1:{port}/ws"
            again: list[AlertNotice] = []
            nursery.start_soon(_ag_lu, ws_url, again)
            await trio.sleep(0.2)
            async with BudgetClient(ws_url) as client:
                ack = await _cost(
                    client, "dispatch-after-restart", Decimal("0.0500"), "claude-haiku"
                )
                _say("dispatcher", f"cost dispatch-after-restart $0.0500 -> ack seq {ack.seq}")
            await trio.sleep(0.3)
            health = await budget.health()
            _say(
                "demo",
                f"restored and running: ${health.daily_spend} of ${health.daily_cap},"
                f" alerts sent today {list(health.alerts_sent)},"
                f" new alerts after restart: {len(again)}",
            )
            if linger > 0:
                _say(
                    "demo",
                    f"the service stays up for {linger:g}s at http://127.0.0.1:{port}/"
                    " (Ctrl-C ends it sooner)",
                )
                with trio.open_signal_receiver(signal.SIGINT) as interrupts:
                    with trio.move_on_after(linger):
                        async for _ in interrupts:
                            break
            nursery.cancel_scope.cancel()
    _say("demo", "done")
    return 0


async def _cost(client: BudgetClient, dispatch_id: str, usd: Decimal, model: str) -> Receipt:
    # record: returns the ack, once the cost is durable.
    return await client.record(dispatch_id, usd, model=model)


async def _ag_lu(ws_url: str, alerts: list[AlertNotice]) -> None:
    async with BudgetClient(ws_url) as client:
        async for update in client.subscribe():
            if isinstance(update, Spend):
                bar = "#" * int(update.utilization * 40)
                _say(
                    "AG Lu",
                    f"spend ${to_wire(update.daily_spend):<10} of ${to_wire(update.daily_cap)}"
                    f" {update.utilization:6.1%} |{bar:<40}|",
                )
            else:
                alerts.append(update)
                _say(
                    "AG Lu",
                    f"*** ALERT for {update.to}: {update.threshold:.0%} of the daily cap"
                    f" reached: ${to_wire(update.daily_spend)} of ${to_wire(update.daily_cap)} ***",
                )


def _show_patch(url: str, day: str) -> None:
    store = open_store(url)
    store.open(create=False)  # read beside the running service
    try:
        name = f"budget_{day}"
        body = store.get_patch("budget", name)
        shown = json.dumps(body, sort_keys=True) if body else "(none yet)"
        _say("store", f"quilt_patches type=budget name={name}: {shown}")
    finally:
        store.close()
