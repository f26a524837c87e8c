"""The fan-out: latest-value states paced by load, alerts never skipped.

The pacing tests run on trio's autojump clock: they check the release rule
(spacing by the charged push work, the newest state released once the spend
settles) in virtual time, not how fast this machine is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from decimal import Decimal

import pytest
import trio
import trio.testing

from budget_actor import AlertNotice, Spend, make_config, open_budget
from budget_actor.runtime.fanout import (
    BUSY_SHARE,
    MAX_GAP_S,
    MAX_PENDING_ALERTS,
    MIN_GAP_S,
    POLL_S,
    QUIET_S,
    WALL_SHARE,
    Fanout,
    Published,
    Subscription,
)


def _state(seq: int) -> Published:
    spend = Decimal(seq) / 100
    return Published(
        Spend(
            day="2026-12-01",
            daily_spend=spend,
            daily_cap=Decimal(10),
            remaining=Decimal(10) - spend,
            utilization=float(spend / 10),
            dispatches=seq,
            seq=seq,
        )
    )


def _alert(n: int) -> AlertNotice:
    return AlertNotice(
        to="AG Lu",
        day="2026-12-01",
        threshold=n / 1000,
        daily_spend=Decimal(n),
        daily_cap=Decimal(10),
    )


class Observer:
    """Stands in for the WebSocket server: takes every released state and
    charges ``cost`` seconds of push work for each."""

    def __init__(self, fanout: Fanout, cost: float) -> None:
        self.fanout = fanout
        self.cost = cost
        self.released: list[tuple[float, Published]] = []

    async def run(self) -> None:
        number = 0
        while True:
            published = await self.fanout.released_after(number)
            number = published.number
            self.released.append((trio.current_time(), published))
            self.fanout.charge(self.cost)


async def _publish_every(fanout: Fanout, interval: float, count: int) -> list[Published]:
    states = []
    for seq in range(1, count + 1):
        state = _state(seq)
        fanout.publish(state)
        states.append(state)
        await trio.sleep(interval)
    return states


def _busy_loop() -> float:
    """A CPU clock for an event loop that is busy all the time."""
    return trio.current_time()


def _idle_loop() -> float:
    """A CPU clock for an event loop that does nothing else."""
    return 0.0


@pytest.mark.parametrize("cost", [0.0, 0.002, 0.02])
async def test_while_the_loop_is_busy_pushes_get_a_bounded_share_of_it(
    autojump_clock: trio.testing.MockClock, cost: float
) -> None:
    """A state every millisecond for 2 s, the event loop busy with other work
    all along: releases are spaced so that the push work charged for each is
    at most BUSY_SHARE of the other work in between; each is the newest state
    of its moment, and the last state is released."""
    fanout = Fanout(cpu_clock=_busy_loop)
    observer = Observer(fanout, cost)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        nursery.start_soon(observer.run)
        states = await _publish_every(fanout, 0.001, 2000)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    times = [at for at, _ in observer.released]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    spacing = max(MIN_GAP_S, cost + cost / BUSY_SHARE)
    # All but the last release happen while states keep coming.
    assert min(gaps[:-1]) >= spacing - 1e-9, (min(gaps[:-1]), spacing)
    assert max(gaps[:-1]) <= max(spacing, MIN_GAP_S) + POLL_S + 1e-9
    # Latest-value: numbers only grow, and the last released is the last published.
    numbers = [p.number for _, p in observer.released]
    assert numbers == sorted(set(numbers))
    assert observer.released[-1][1] is states[-1]


@pytest.mark.parametrize("cost", [0.002, 0.02])
async def test_while_the_spend_changes_a_state_goes_out_at_least_every_max_gap(
    autojump_clock: trio.testing.MockClock, cost: float
) -> None:
    """The same stream of states with an otherwise idle loop: the busy rule
    alone would hold states back; the staleness bound releases one at least
    every MAX_GAP_S."""
    fanout = Fanout(cpu_clock=_idle_loop)
    observer = Observer(fanout, cost)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        nursery.start_soon(observer.run)
        await _publish_every(fanout, 0.001, 3000)
        nursery.cancel_scope.cancel()
    times = [at for at, _ in observer.released]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 3 / (MAX_GAP_S + POLL_S)
    assert all(MAX_GAP_S - 1e-9 <= gap <= MAX_GAP_S + POLL_S + 1e-9 for gap in gaps), gaps


@pytest.mark.parametrize("cpu_clock", [_busy_loop, _idle_loop])
@pytest.mark.parametrize("cost", [0.0, 0.002, 0.02])
async def test_once_the_spend_settles_the_newest_state_goes_out(
    autojump_clock: trio.testing.MockClock, cost: float, cpu_clock: Callable[[], float]
) -> None:
    """After a burst, the last state is released within QUIET_S (plus one
    look) of the last change, not a whole busy spacing later."""
    fanout = Fanout(cpu_clock=cpu_clock)
    observer = Observer(fanout, cost)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        nursery.start_soon(observer.run)
        for burst in range(5):
            states = await _publish_every(fanout, 0.001, 300)
            last_at = trio.current_time() - 0.001
            while fanout.released is not states[-1]:
                await trio.sleep(0.0005)
            delay = trio.current_time() - last_at
            bound = max(QUIET_S + POLL_S, cost / WALL_SHARE) + 0.001
            assert delay <= bound, (burst, delay, bound)
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


async def test_a_single_change_after_a_pause_goes_out_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fanout = Fanout()
    observer = Observer(fanout, 0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        nursery.start_soon(observer.run)
        await trio.sleep(1)
        fanout.publish(_state(1))
        published_at = trio.current_time()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    [(released_at, state)] = observer.released
    assert state.spend.seq == 1
    assert released_at == published_at


async def test_each_state_is_encoded_once_by_the_fanout_not_the_publisher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fanout = Fanout()
    state = _state(7)
    fanout.publish(state)
    assert state._json is None  # the actor's publish does no encoding
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        released = await fanout.released_after(0)
        nursery.cancel_scope.cancel()
    assert released is state
    assert state._json is not None
    assert state.json() is state.json()


async def test_paced_subscription_gets_alerts_in_order_and_ends_on_the_newest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Alerts are never skipped (in order, before states); states are
    latest-value: a subscriber that reads late gets the newest only."""
    fanout = Fanout()
    subscription = Subscription(fanout)
    fanout.subscribe(subscription, _state(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.run)
        for seq in range(1, 101):
            fanout.publish(_state(seq))
            if seq % 10 == 0:
                fanout.alert(_alert(seq))
            await trio.sleep(0.001)
        await trio.sleep(1)
        items = []
        with trio.move_on_after(1):
            while True:
                items.append(await subscription.next())
        nursery.cancel_scope.cancel()
    alerts = [i for i in items if isinstance(i, AlertNotice)]
    states = [i for i in items if isinstance(i, Published)]
    assert [a.daily_spend for a in alerts] == [Decimal(n) for n in range(10, 101, 10)]
    assert items[: len(alerts)] == alerts
    assert [s.spend.seq for s in states] == [100]


async def test_a_subscriber_that_never_takes_its_alerts_is_closed_after_the_bound() -> None:
    fanout = Fanout()
    stuck = Subscription(fanout, paced=False)
    reader = Subscription(fanout, paced=False)
    fanout.subscribe(stuck, _state(0))
    fanout.subscribe(reader, _state(0))
    for n in range(MAX_PENDING_ALERTS):
        fanout.alert(_alert(n))
        assert reader.take_alert() == _alert(n)
    assert not stuck.closed and len(fanout) == 2
    fanout.alert(_alert(MAX_PENDING_ALERTS))
    assert stuck.closed and stuck.overflowed
    assert not reader.closed and reader.take_alert() == _alert(MAX_PENDING_ALERTS)
    assert len(fanout) == 1
    # What it had queued is still there, in order, for its owner to give up on.
    assert [stuck.take_alert() for _ in range(3)] == [_alert(0), _alert(1), _alert(2)]


async def test_in_process_subscribers_end_on_the_newest_state(sqlite_url: str) -> None:
    """A burst of costs: each of several subscribers gets a few states, seqs
    only grow, and every one ends on the last cost's seq."""
    config = make_config(daily_cap="1000.00")
    async with open_budget(config, database=sqlite_url) as budget:
        seen: list[list[int]] = [[] for _ in range(5)]

        async def watch(log: list[int]) -> None:
            async with budget.subscribe() as updates:
                async for update in updates:
                    if isinstance(update, Spend):
                        log.append(update.seq)
                        if update.seq == 3000:
                            return

        async with trio.open_nursery() as nursery:
            for log in seen:
                nursery.start_soon(watch, log)
            await trio.sleep(0.05)
            for i in range(3000):
                await budget.send_cost(f"c{i}", "0.01")
            with trio.fail_after(20):
                while not all(log and log[-1] == 3000 for log in seen):
                    await trio.sleep(0.01)
    for log in seen:
        assert log == sorted(set(log))
        assert log[-1] == 3000
        assert len(log) < 3000  # latest-value: states were coalesced
