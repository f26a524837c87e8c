"""The pure accounting: no trio, no I/O, just events in and effects out."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget_actor.core.config import make_config
from budget_actor.core.cost import Cost
from budget_actor.core.dedupe import RecentIds, day_number
from budget_actor.core.ledger import AlertDue, Effect, Ledger, PatchDue, day_of
from budget_actor.core.records import JournalEntry, Others, Restored, Snapshot

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CONFIG = make_config(daily_cap="10.00", alert_at="0.5,0.8", persist_every=3)


def test_costs_accumulate_exactly() -> None:
    ledger = Ledger(CONFIG, T0)
    for i, usd in enumerate(["0.1", "0.2", "0.000001"]):
        ledger.record(T0, Cost(f"d{i}", Decimal(usd)))
    assert ledger.daily_spend == Decimal("0.300001")
    health = ledger.health(T0, store="sqlite", subscribers=0, uptime_s=0)
    assert health.dispatches == 3
    assert health.remaining == Decimal("9.699999")
    assert health.utilization == pytest.approx(0.0300001)


def test_duplicate_id_counts_once_and_returns_original_seq() -> None:
    ledger = Ledger(CONFIG, T0)
    first = ledger.record(T0, Cost("same", Decimal("1"))).value
    again = ledger.record(T0, Cost("same", Decimal("5"))).value
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.seq == first.seq and again.entry is None
    assert ledger.daily_spend == Decimal("1")


def test_seq_grows_with_every_accepted_cost_only() -> None:
    ledger = Ledger(CONFIG, T0, seq=41)
    seqs = [ledger.record(T0, Cost(d, Decimal("0.01"))).value.seq for d in ["a", "b", "a", "c"]]
    assert seqs == [42, 43, 42, 44]


def test_each_threshold_fires_once_per_day_in_order() -> None:
    ledger = Ledger(CONFIG, T0)
    assert ledger.record(T0, Cost("a", Decimal("4.99"))).effects == ()
    crossed = ledger.record(T0, Cost("b", Decimal("3.01"))).effects  # 8.00: both at once
    assert [e.alert.threshold for e in crossed if isinstance(e, AlertDue)] == [
        Decimal("0.5"),
        Decimal("0.8"),
    ]
    assert all(e.alert.to == "AG Lu" for e in crossed if isinstance(e, AlertDue))
    assert ledger.record(T0, Cost("c", Decimal("5"))).effects == ()


def test_threshold_is_reached_at_exactly_the_boundary() -> None:
    ledger = Ledger(CONFIG, T0)
    effects = ledger.record(T0, Cost("a", Decimal("5.00"))).effects
    assert [e.alert.percent for e in effects if isinstance(e, AlertDue)] == ["50"]


def test_every_nth_cycle_asks_for_a_patch() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.record(T0, Cost("a", Decimal("1.5")))
    due = [ledger.cycle(T0).effects for _ in range(6)]
    assert [len(d) for d in due] == [0, 0, 1, 0, 0, 1]
    patch = due[2][0]
    assert isinstance(patch, PatchDue) and patch.reason == "cycle"
    assert patch.snapshot.cycle_count == 3 and patch.snapshot.daily_spend == Decimal("1.5")
    health = ledger.health(T0, store="sqlite", subscribers=0, uptime_s=0)
    assert (health.cycle_count, health.cycles_until_persist) == (6, 3)


def test_rollover_persists_old_day_and_rearms_alerts() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.record(T0, Cost("a", Decimal("9")))
    ledger.cycle(T0)
    tomorrow = T0 + timedelta(days=1)
    recorded = ledger.record(tomorrow, Cost("b", Decimal("6")))
    rolled = recorded.effects[0]
    assert isinstance(rolled, PatchDue) and rolled.reason == "rollover"
    assert rolled.snapshot.day == "2026-12-01" and rolled.snapshot.daily_spend == Decimal("9")
    assert rolled.snapshot.alerts_sent == (Decimal("0.5"), Decimal("0.8"))
    assert not recorded.value.duplicate
    assert [e.alert.day for e in recorded.effects if isinstance(e, AlertDue)] == ["2026-12-02"]
    health = ledger.health(T0, store="sqlite", subscribers=0, uptime_s=0)
    assert (health.day, health.daily_spend, health.cycle_count) == ("2026-12-02", Decimal("6"), 0)


def test_a_resend_after_midnight_is_a_duplicate_and_stays_in_its_day() -> None:
    before = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)
    ledger = Ledger(CONFIG, before)
    first = ledger.record(before, Cost("late", Decimal("2"))).value
    after = datetime(2026, 12, 2, 0, 0, 1, tzinfo=UTC)
    again = ledger.record(after, Cost("late", Decimal("2")))
    assert (again.value.duplicate, again.value.seq, again.value.entry) == (True, first.seq, None)
    rolled = [e for e in again.effects if isinstance(e, PatchDue)]
    assert rolled and rolled[0].snapshot.daily_spend == Decimal("2")  # in its first day
    assert (ledger.day, ledger.daily_spend) == ("2026-12-02", 0)
    # All of the next day too, then no more: the window is a day and the one before.
    last_minute = datetime(2026, 12, 2, 23, 59, tzinfo=UTC)
    assert ledger.record(last_minute, Cost("late", Decimal("2"))).value.duplicate
    later = ledger.record(datetime(2026, 12, 3, 0, 0, 1, tzinfo=UTC), Cost("late", Decimal("2")))
    assert not later.value.duplicate and later.value.seq == first.seq + 1


def test_a_jump_of_two_days_forgets_the_ids() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.record(T0, Cost("a", Decimal("1")))
    assert not ledger.record(T0 + timedelta(days=2), Cost("a", Decimal("1"))).value.duplicate


def test_admit_refuses_an_id_counted_yesterday() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.record(T0, Cost("a", Decimal("1")))
    tomorrow = T0 + timedelta(days=1)
    admission = ledger.admit(tomorrow, "a", Decimal("1")).value
    assert not admission.allowed
    assert admission.reason == "this dispatch_id was already counted on 2026-12-01"
    ledger.learn("old", 3, "2026-12-01")  # what the store said of an id not in the cache
    assert ledger.knows("old") and not ledger.admit(tomorrow, "old", Decimal(1)).value.allowed
    # What the store found, even with no room left in the cache:
    alone = Ledger(make_config(dedupe_cache=0), T0)
    found = alone.admit(T0, "b", Decimal("1"), counted_on="2026-11-30").value
    assert found.reason == "this dispatch_id was already counted on 2026-11-30"


def test_the_cache_of_recent_ids_is_bounded_and_the_store_decides_the_rest() -> None:
    ledger = Ledger(make_config(daily_cap="10", dedupe_cache=2), T0)
    first = ledger.record(T0, Cost("a", Decimal("1"))).value
    ledger.record(T0, Cost("b", Decimal("1")))
    ledger.record(T0, Cost("c", Decimal("1")))  # "a" leaves the cache
    again = ledger.record(T0, Cost("a", Decimal("1"))).value
    assert not again.duplicate and again.entry is not None  # counted until the store says
    assert ledger.daily_spend == Decimal("4")
    ledger.uncount(again.entry, first.seq, "2026-12-01")
    ledger.uncount(again.entry, first.seq, "2026-12-01")  # a repeated report
    assert ledger.daily_spend == Decimal("3") and ledger.duplicates == 2
    assert ledger.record(T0, Cost("a", Decimal("1"))).value.seq == first.seq  # known again


def test_recent_ids_forget_the_oldest_first_and_yesterdays_before_todays() -> None:
    recent = RecentIds(3)
    for n, dispatch_id in enumerate("abc", start=1):
        recent.add(dispatch_id, n)
    recent.next_day()
    recent.add("d", 4)
    assert [recent.get(i) for i in "abcd"] == [None, 2, 3, 4]
    recent.add("e", 5)
    recent.add("f", 6)
    assert [recent.get(i) for i in "bcdef"] == [None, None, 4, 5, 6] and len(recent) == 3
    recent.next_day(adjacent=False)
    assert len(recent) == 0 and RecentIds(0).get("x") is None


def test_day_follows_the_configured_time_zone() -> None:
    tokyo = make_config(timezone="Asia/Tokyo")
    late_utc = datetime(2026, 12, 1, 15, 30, tzinfo=UTC)  # 00:30 on the 2nd in Tokyo
    assert day_of(late_utc, tokyo) == "2026-12-02"
    assert day_of(late_utc, CONFIG) == "2026-12-01"
    ledger = Ledger(tokyo, datetime(2026, 12, 1, 14, 59, tzinfo=UTC))
    assert ledger.tick(datetime(2026, 12, 1, 14, 59, 59, tzinfo=UTC)).effects == ()
    assert len(ledger.tick(datetime(2026, 12, 1, 15, 0, tzinfo=UTC)).effects) == 1
    assert ledger.day == "2026-12-02"


def test_clock_going_backwards_never_reopens_a_day() -> None:
    ledger = Ledger(CONFIG, T0 + timedelta(days=1))
    assert ledger.tick(T0).effects == ()
    ledger.record(T0, Cost("a", Decimal("1")))
    assert ledger.day == "2026-12-02" and ledger.daily_spend == Decimal("1")


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError):
        Ledger(CONFIG, datetime(2026, 12, 1))


def test_unvalidated_amount_is_refused_without_change() -> None:
    ledger = Ledger(CONFIG, T0)
    for bad in [Decimal("NaN"), Decimal("-1"), Decimal("Infinity")]:
        with pytest.raises(ValueError):
            ledger.record(T0, Cost("x", bad))
    assert ledger.seq == 0 and ledger.daily_spend == 0


def test_store_failure_degrades_until_caught_up() -> None:
    ledger = Ledger(CONFIG, T0)
    ledger.record(T0, Cost("a", Decimal("1")))
    ledger.record(T0, Cost("b", Decimal("1")))

    def health() -> tuple[str, bool, int]:
        h = ledger.health(T0, store="sqlite", subscribers=0, uptime_s=0)
        return h.status, h.store_ok, h.pending

    assert health() == ("ok", True, 2)
    ledger.store_failed()
    assert health() == ("degraded", False, 2)
    ledger.persisted(1, T0, patch_written=False)
    assert health() == ("degraded", True, 1)  # reachable again, still behind
    ledger.persisted(2, T0, patch_written=True)
    assert health() == ("ok", True, 0)
    assert ledger.health(T0, store="x", subscribers=0, uptime_s=0).last_persist_at == T0


def _restored(**kw: object) -> Restored:
    base: dict[str, object] = {
        "day": "2026-12-01",
        "patch": None,
        "entries": (),
        "alerts_sent": frozenset(),
        "max_seq": 0,
    }
    base.update(kw)
    return Restored(**base)  # type: ignore[arg-type]


def test_restore_is_patch_plus_later_journal() -> None:
    patch = Snapshot(
        day="2026-12-01",
        daily_spend=Decimal("3.00"),
        daily_cap=Decimal("10.00"),
        cycle_count=20,
        dispatches=7,
        alerts_sent=(),
        seq=7,
    )
    entry = JournalEntry(seq=8, day="2026-12-01", at=T0, cost=Cost("late", Decimal("0.25")))
    restoring = Ledger.restore(
        CONFIG,
        T0,
        _restored(patch=patch, entries=(entry,), max_seq=8),
    )
    ledger, effects = restoring.value, list(restoring.effects)
    assert effects == []
    assert ledger.daily_spend == Decimal("3.25")
    assert ledger.seq == 8
    h = ledger.health(T0, store="sqlite", subscribers=0, uptime_s=0)
    assert (h.dispatches, h.cycle_count) == (8, 20)
    late = ledger.record(T0, Cost("late", Decimal("1"))).value
    assert late.duplicate and late.seq == 8  # a replayed entry is known at once
    # An id from before the patch is not loaded: counted here, the store
    # refuses its row, and the persister's report takes it back out.
    again = ledger.record(T0, Cost("x", Decimal("1"))).value
    assert not again.duplicate and again.entry is not None
    ledger.uncount(again.entry, 3, "2026-12-01")
    assert ledger.daily_spend == Decimal("3.25")
    assert ledger.record(T0, Cost("x", Decimal("1"))).value.seq == 3  # the original's now


def test_restore_trusts_nudge_rows_not_the_patch_for_sent_alerts() -> None:
    patch = Snapshot(
        day="2026-12-01",
        daily_spend=Decimal("9"),
        daily_cap=Decimal("10.00"),
        cycle_count=10,
        dispatches=1,
        alerts_sent=(Decimal("0.5"), Decimal("0.8")),  # written before the rows
        seq=1,
    )
    restoring = Ledger.restore(
        CONFIG, T0, _restored(patch=patch, alerts_sent=frozenset({Decimal("0.5")}), max_seq=1)
    )
    effects = list(restoring.effects)
    assert [e.alert.threshold for e in effects if isinstance(e, AlertDue)] == [Decimal("0.8")]


def test_restore_sends_a_missing_alert_but_never_a_sent_one() -> None:
    entry = JournalEntry(seq=1, day="2026-12-01", at=T0, cost=Cost("a", Decimal("9")))
    restoring = Ledger.restore(
        CONFIG,
        T0,
        _restored(entries=(entry,), alerts_sent=frozenset({Decimal("0.5")}), max_seq=1),
    )
    effects = list(restoring.effects)
    assert [e.alert.threshold for e in effects if isinstance(e, AlertDue)] == [Decimal("0.8")]


def test_restore_from_an_earlier_day_starts_at_zero() -> None:
    restoring = Ledger.restore(
        CONFIG, T0 + timedelta(days=1), _restored(day="2026-12-01", max_seq=50)
    )
    ledger, effects = restoring.value, list(restoring.effects)
    assert (ledger.day, ledger.daily_spend, ledger.seq, effects) == ("2026-12-02", 0, 50, [])


# -- properties ----------------------------------------------------------------

amounts = st.decimals(
    min_value=Decimal(0), max_value=Decimal(1000), places=6, allow_nan=False, allow_infinity=False
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("cost"), st.integers(0, 30), amounts),
        st.tuples(st.just("cycle"), st.just(0), st.just(Decimal(0))),
        st.tuples(st.just("hours"), st.integers(1, 30), st.just(Decimal(0))),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([0, 2, 100_000]))
def test_daily_spend_is_the_exact_sum_of_accepted_costs(
    script: list[tuple[str, int, Decimal]], cache: int
) -> None:
    """Against a model of the store's journal with its dedupe window (an id
    counts once on its day and the days next to it), whatever the size of
    the ledger's cache of recent ids: when the ledger counts an id that the
    journal holds, the store refuses it and the ledger is told (uncount);
    an alert the store's exact figure has not reached is withdrawn."""
    config = make_config(daily_cap="100", alert_at="0.5,0.8,1", persist_every=3, dedupe_cache=cache)
    ledger = Ledger(config, T0)
    now = T0
    expected: dict[str, Decimal] = {}
    journal: dict[str, list[tuple[str, int]]] = {}  # id -> [(day, seq)]
    alerts: dict[str, list[Decimal]] = {}
    last_seq = 0

    def deliver(effects: Sequence[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, AlertDue):
                alert = effect.alert
                if expected.get(alert.day, Decimal(0)) >= alert.threshold * 100:
                    alerts.setdefault(alert.day, []).append(alert.threshold)
                else:  # the store refuses the nudge as premature
                    deliver(ledger.withdraw(now, alert).effects)

    for kind, n, usd in script:
        if kind == "hours":
            now += timedelta(hours=n)
            ledger.tick(now)
            continue
        if kind == "cycle":
            ledger.cycle(now)
            continue
        day = day_of(now, config)
        dispatch_id = f"id{n}"
        outcome = ledger.record(now, Cost(dispatch_id, usd))
        recorded = outcome.value
        held = [
            (d, seq)
            for d, seq in journal.get(dispatch_id, [])
            if abs(day_number(d) - day_number(day)) <= 1
        ]
        assert len(held) <= 1  # the journal never holds an id twice in a window
        if recorded.duplicate:
            assert held and recorded.seq == held[0][1], "a duplicate has the original's seq"
        else:
            assert recorded.entry is not None and recorded.seq == last_seq + 1
            last_seq = recorded.seq
            if held:
                ledger.uncount(recorded.entry, held[0][1], held[0][0])
            else:
                journal.setdefault(dispatch_id, []).append((day, recorded.seq))
                expected[day] = expected.get(day, Decimal(0)) + usd
        deliver(outcome.effects)
        assert ledger.daily_spend == expected.get(ledger.day, Decimal(0))
    # Each threshold fires at most once a day, and exactly when reached.
    for day, fired in alerts.items():
        assert len(fired) == len(set(fired))
        assert all(expected[day] >= t * 100 for t in fired)
    today = ledger.day
    reached = {t for t in config.alert_at if expected.get(today, Decimal(0)) >= t * 100}
    assert set(alerts.get(today, [])) == reached


# -- a shared budget (several instances, see _shared.py) -----------------------


def _others(spend: str, dispatches: int = 1, day: str = "2026-12-01") -> Others:
    return Others(day=day, spend=Decimal(spend), dispatches=dispatches, cycles=4, instances=2)


def _shared_ledger() -> Ledger:
    return Ledger(CONFIG, T0, instance="b")


def test_shared_views_are_global_with_the_own_share_beside_them() -> None:
    ledger = _shared_ledger()
    ledger.record(T0, Cost("mine", Decimal("1.25")))
    ledger.synced(T0, _others("2.5", dispatches=3))
    spend = ledger.spend()
    assert (spend.daily_spend, spend.dispatches) == (Decimal("3.75"), 4)
    assert (spend.instance, spend.instance_spend, spend.instance_dispatches) == (
        "b",
        Decimal("1.25"),
        1,
    )
    health = ledger.health(T0, store="postgresql", subscribers=0, uptime_s=0, sync_age_s=0.1)
    assert (health.daily_spend, health.remaining, health.instances) == (
        Decimal("3.75"),
        Decimal("6.25"),
        3,
    )
    assert health.cycle_count == 4 and health.instance_spend == Decimal("1.25")
    # Own costs keep adding to the global figure between syncs.
    ledger.record(T0, Cost("more", Decimal("0.25")))
    assert ledger.spend().daily_spend == Decimal("4.00")


def test_alone_the_instance_fields_are_omitted() -> None:
    spend = Ledger(CONFIG, T0).spend()
    assert spend.instance is None and spend.instance_spend is None


def test_a_sync_that_crosses_a_threshold_makes_the_alert_due() -> None:
    ledger = _shared_ledger()
    ledger.record(T0, Cost("mine", Decimal("1")))
    effects = ledger.synced(T0, _others("7")).effects
    alerts = [e.alert for e in effects if isinstance(e, AlertDue)]
    assert [a.threshold for a in alerts] == [Decimal("0.5"), Decimal("0.8")]
    assert alerts[0].daily_spend == Decimal("8")
    assert ledger.synced(T0, _others("7.5")).effects == ()  # once


def test_a_sync_of_another_day_is_ignored() -> None:
    ledger = _shared_ledger()
    before = ledger.version
    assert ledger.synced(T0, _others("9", day="2026-11-30")).effects == ()
    assert ledger.spend().daily_spend == 0 and ledger.version == before


def test_uncount_takes_a_cross_instance_duplicate_back_out() -> None:
    ledger = _shared_ledger()
    first = ledger.record(T0, Cost("x", Decimal("2"))).value
    ledger.synced(T0, _others("1"))
    before = ledger.version
    assert first.entry is not None
    ledger.uncount(first.entry, 7, "2026-12-01")
    assert (ledger.spend().daily_spend, ledger.spend().instance_dispatches) == (Decimal("1"), 0)
    assert ledger.version > before and ledger.duplicates == 1
    again = ledger.record(T0, Cost("x", Decimal("2"))).value
    assert (again.duplicate, again.seq) == (True, 7) and first.seq != 7


def test_a_withdrawn_alert_is_armed_again_and_rechecked() -> None:
    ledger = _shared_ledger()
    recorded = ledger.record(T0, Cost("x", Decimal("8")))
    (alert,) = [
        e.alert
        for e in recorded.effects
        if isinstance(e, AlertDue) and e.alert.threshold == Decimal("0.8")
    ]
    assert recorded.value.entry is not None
    ledger.uncount(recorded.value.entry, 3, "2026-12-01")
    assert ledger.withdraw(T0, alert).effects == ()  # 0 now: armed, not due
    assert ledger.health(T0, store="p", subscribers=0, uptime_s=0).alerts_sent == (0.5,)
    again = ledger.record(T0, Cost("y", Decimal("8.5"))).effects
    assert [e.alert.threshold for e in again if isinstance(e, AlertDue)] == [Decimal("0.8")]


def test_restore_of_a_shared_instance_keeps_the_others_apart() -> None:
    own = Snapshot(
        day="2026-12-01",
        daily_spend=Decimal("1.5"),
        daily_cap=Decimal(0),
        cycle_count=2,
        dispatches=3,
        alerts_sent=(),
        seq=9,
    )
    restored = Restored(
        day="2026-12-01",
        patch=own,
        entries=(),
        alerts_sent=frozenset(),
        max_seq=20,
        instance="b",
        others=_others("6.5", dispatches=5),
    )
    restoring = Ledger.restore(CONFIG, T0, restored)
    ledger, effects = restoring.value, list(restoring.effects)
    spend = ledger.spend()
    assert (spend.daily_spend, spend.instance_spend, spend.dispatches) == (Decimal("8"), 1.5, 8)
    # 8.00 of 10 crossed 0.5 and 0.8 with no nudge rows: both are due now.
    assert [e.alert.threshold for e in effects if isinstance(e, AlertDue)] == [
        Decimal("0.5"),
        Decimal("0.8"),
    ]


def test_uncount_of_an_entry_this_ledger_did_not_count_changes_nothing() -> None:
    """A restarted actor restored its share without the cost; a late report
    from its predecessor's final flush must not subtract it again."""
    ledger = _shared_ledger()
    ledger.record(T0, Cost("mine", Decimal("1.5")))
    ledger.record(T0, Cost("x", Decimal("2")))
    stale = JournalEntry(seq=99, day="2026-12-01", at=T0, cost=Cost("x", Decimal("2")))
    ledger.uncount(stale, 4, "2026-12-01")
    assert ledger.spend().instance_spend == Decimal("3.5")


def test_a_stale_view_of_the_other_instances_is_degraded() -> None:
    ledger = _shared_ledger()  # sync every 0.2 s: stale after 1 s
    fresh = ledger.health(T0, store="postgresql", subscribers=0, uptime_s=0, sync_age_s=0.4)
    stale = ledger.health(T0, store="postgresql", subscribers=0, uptime_s=0, sync_age_s=1.5)
    assert (fresh.status, stale.status) == ("ok", "degraded")


def test_an_id_the_store_found_counted_yesterday_answers_with_that_seq() -> None:
    """Counted again today after it left the cache; the store says it was
    counted yesterday: from then on the original's seq, not today's."""
    ledger = Ledger(make_config(daily_cap="10", dedupe_cache=2), T0)
    first = ledger.record(T0, Cost("a", Decimal("1"))).value
    ledger.record(T0, Cost("b", Decimal("1")))
    ledger.record(T0, Cost("c", Decimal("1")))  # "a" leaves the cache
    tomorrow = T0 + timedelta(hours=12)
    again = ledger.record(tomorrow, Cost("a", Decimal("1"))).value
    assert again.entry is not None and not again.duplicate
    ledger.uncount(again.entry, first.seq, "2026-12-01")
    later = ledger.record(tomorrow, Cost("a", Decimal("1"))).value
    assert (later.duplicate, later.seq) == (True, first.seq)
    assert ledger.daily_spend == 0
