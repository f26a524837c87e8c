"""The accounting, as a pure state machine (no trio, no I/O).

Like h11 and wsproto, the ledger only computes: the caller feeds it events
(a cost, a cycle, the passage of time, a persistence outcome) together with the
current wall-clock time, and it answers every event in one shape, an
:class:`Outcome`: what it says (a :class:`Recorded`, an ``Admission``, or
nothing) and the *effects* the caller must carry out (:class:`PatchDue`,
:class:`AlertDue`). The budget actor is the only caller; it owns one ledger
and never shares it, so no locks are needed.

Time enters only as an argument. The budget day is the date of ``now`` in the
configured time zone; when it moves forward (checked in one place,
``Ledger._advance``, at the start of every event) the ledger rolls over: the
old day's final snapshot is emitted as a :class:`PatchDue`, the new day starts
at zero and every threshold is armed again. A clock that moves backwards never rolls a day
back (an NTP step must not reopen yesterday).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Generic, Literal, TypeVar

import msgspec

from .admission import decide
from .burn import BurnRate, project
from .config import BudgetConfig
from .cost import Cost
from .dedupe import RecentIds
from .money import MONEY_CONTEXT, RATIO_CONTEXT, add, sub
from .records import Alert, JournalEntry, Others, Restored, Snapshot
from .views import Admission, Health, Spend

# A shared budget's view of the other instances turns health "degraded" once
# it is this many sync intervals old (and at least SYNC_STALE_MIN_S): a few
# missed reads are a blip, more mean the "global" spend no longer is.
SYNC_STALE_INTERVALS = 5
SYNC_STALE_MIN_S = 1.0

# Why a patch is due; kept in the effect for logs and tests.
PatchReason = Literal["cycle", "rollover"]


class PatchDue(msgspec.Struct, frozen=True):
    """Write ``snapshot`` as the day's budget patch."""

    snapshot: Snapshot
    reason: PatchReason


class AlertDue(msgspec.Struct, frozen=True):
    """Deliver ``alert``: write its nudge row, then push it to subscribers."""

    alert: Alert


Effect = PatchDue | AlertDue


class Recorded(msgspec.Struct, frozen=True):
    """What :meth:`Ledger.record` says about a cost.

    ``entry`` is the journal entry to make durable, or ``None`` for a duplicate,
    in which case ``seq`` is the sequence number of the original cost.
    """

    seq: int
    duplicate: bool
    entry: JournalEntry | None


T = TypeVar("T")


class Outcome(msgspec.Struct, Generic[T], frozen=True):
    """The ledger's answer to every event: what it says (``value``: a
    :class:`Recorded`, an :class:`Admission`, the restored :class:`Ledger`,
    or None) and the effects the caller must carry out, in order."""

    value: T
    effects: tuple[Effect, ...] = ()


# The answer of an event that says nothing and causes nothing.
NOTHING: Outcome[None] = Outcome(None)


def day_of(now: datetime, config: BudgetConfig) -> str:
    """The budget day (``YYYY-MM-DD``) of an aware datetime in the configured zone."""
    return day_bounds(now, config)[0]


def day_bounds(now: datetime, config: BudgetConfig) -> tuple[str, datetime, datetime]:
    """The budget day of ``now`` with its start and end (next midnight), in UTC.

    Midnight is taken in the configured zone, so a day may last 23 or 25 hours
    around a DST change.
    """
    if now.tzinfo is None:
        raise ValueError("the clock must return timezone-aware datetimes")
    zone = config.zone
    local = now.astimezone(zone).date()
    start = datetime.combine(local, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(local + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    return local.isoformat(), start, end


def day_start(day: str, config: BudgetConfig) -> datetime:
    """When the budget day ``day`` (``YYYY-MM-DD``) begins, in UTC."""
    local = datetime.combine(date.fromisoformat(day), time(0), tzinfo=config.zone)
    return local.astimezone(UTC)


@dataclass
class _Day:
    day: str
    # The day before: its ids are still in the dedupe window.
    previous: str
    starts_at: datetime
    ends_at: datetime
    burn: BurnRate
    # This instance's own spend, dispatches and cycles...
    spend: Decimal = Decimal(0)
    dispatches: int = 0
    cycles: int = 0
    # ...and, when instances share the budget, the others' (as last synced),
    # with ``total`` = own + others: the figure thresholds and views use.
    others: Others | None = None
    total: Decimal = Decimal(0)
    alerts_sent: set[Decimal] = field(default_factory=set)
    forecast_sent: bool = False
    # Seqs of this day's costs that the store refused as duplicates and that
    # were taken back out (so that a repeated report cannot subtract twice).
    uncounted: set[int] = field(default_factory=set)
    # The spend at which the next threshold alert is due (None: all sent).
    next_alert_at: Decimal | None = None
    # Admitted estimates not yet settled: dispatch_id -> (amount, expires at,
    # times renewed). Insertion order is expiry order (one TTL for all, and a
    # renewal re-inserts), so expiring pops from the front.
    reservations: dict[str, tuple[Decimal, datetime, int]] = field(default_factory=dict)
    reserved: Decimal = Decimal(0)


def _new_day(now: datetime, config: BudgetConfig) -> _Day:
    day, start, end = day_bounds(now, config)
    previous = (datetime.fromisoformat(day) - timedelta(days=1)).date().isoformat()
    return _Day(day, previous, start, end, BurnRate(start, Decimal(0)))


class Ledger:
    """The day's spend, its recent dispatch ids, thresholds, cycles and store status.

    Dedupe: an id in the bounded cache of recent ids (today's and
    yesterday's, see :mod:`.dedupe`) is a duplicate at once. Any other id is
    counted; the store's unique keys are the authority, and when the store
    refuses the row the caller reports it with :meth:`uncount`. So
    ``daily_spend`` may briefly hold a resent cost that the next commit
    reveals as a duplicate; every figure the store writes (patches, shares)
    is exact.

    Every method is synchronous and side-effect free beyond the ledger itself.
    Inputs are assumed validated (see :mod:`budget_actor.core.cost`); the ledger
    re-checks only invariants whose violation would corrupt the totals, and
    raises ``ValueError`` for them without changing anything.
    """

    def __init__(
        self, config: BudgetConfig, now: datetime, *, seq: int = 0, instance: str | None = None
    ) -> None:
        self.config = config
        #: This instance's id when several share the budget; None when alone.
        self.instance = instance
        #: Grows whenever a figure that subscribers see changes.
        self.version = 0
        self._levels = [(t, MONEY_CONTEXT.multiply(t, config.daily_cap)) for t in config.alert_at]
        self._today = _new_day(now, config)
        self._arm()
        self._seq = seq
        self._durable_seq = seq
        # Seqs up to this one were given out before this ledger existed: it
        # never counted them, so it never takes them back out.
        self._restored_seq = seq
        self._recent = RecentIds(config.dedupe_cache)
        # Seqs above _durable_seq of costs that were refused (never durable,
        # taken back out): they will never be confirmed, so not pending.
        self._refused: set[int] = set()
        self._store_ok = True
        self._catching_up = False
        self._last_persist_at: datetime | None = None
        # Counters since start (for metrics): duplicates refused, restarts by
        # child, and the last store commit's duration and time.
        self.duplicates = 0
        self.restarts: dict[str, int] = {}
        self._persist_latency_s = 0.0
        self._last_write_at: datetime | None = None
        # The last heartbeat cycle this ledger counted (for "no cycle for N
        # minutes" alerting); not restored: a restart starts without one.
        self._last_cycle_at: datetime | None = None

    # -- restore -------------------------------------------------------------

    @classmethod
    def restore(cls, config: BudgetConfig, now: datetime, restored: Restored) -> Outcome[Ledger]:
        """Rebuild today from a store's :class:`Restored` view.

        Totals come from today's patch plus the journal entries after it. The
        effects are alerts that the journal shows as crossed but that
        have no nudge row yet (the process died between the two); sent alerts
        are never sent again.

        ``restored`` may be of a day later than ``now``'s (the clock was set
        back across midnight, see :meth:`tick`): the ledger then stays on that
        day, as a running one would, and never reopens an earlier one.
        """
        anchor = max(now, day_start(restored.day, config))
        ledger = cls(config, anchor, seq=restored.max_seq, instance=restored.instance)
        today = ledger._today
        if restored.day != today.day:
            # The store was read for another day (midnight passed while
            # starting): start empty; the seq still comes from the store.
            return Outcome(ledger)
        patch = restored.patch
        if patch is not None:
            today.spend = patch.daily_spend
            today.dispatches = patch.dispatches
            today.cycles = patch.cycle_count
        # Only nudge rows prove an alert was delivered. The patch's own
        # alerts_sent may have been written before the row (they travel
        # separately), so trusting it could swallow an alert for good.
        today.alerts_sent.update(restored.alerts_sent)
        today.forecast_sent = restored.forecast_sent
        # No dispatch ids are loaded: the store refuses the ones counted
        # before (see `uncount`), so restore costs the same at any volume.
        for entry in restored.entries:
            today.spend = add(today.spend, entry.cost.usd)
            today.dispatches += 1
            ledger._recent.add(entry.cost.dispatch_id, entry.seq)
        today.total = today.spend
        if restored.others is not None and restored.others.day == today.day:
            today.others = restored.others
            today.total = add(today.spend, restored.others.spend)
        # The burn rate's history starts now: what was spent before the
        # restart is not known by time, and must not read as a burst.
        today.burn = BurnRate(now, today.spend)
        ledger._arm()
        return Outcome(ledger, tuple(ledger._crossings(now)))

    # -- events --------------------------------------------------------------
    #
    # Each event takes the current time, starts with the one rollover check
    # (:meth:`_advance`), and answers with an :class:`Outcome`.

    def tick(self, now: datetime) -> Outcome[None]:
        """Let time pass: roll the day over once ``now`` reaches midnight, and
        check the end-of-day projection (when forecast alerts are on)."""
        effects = self._advance(now)
        if not effects and self.config.forecast_alert and not self._today.forecast_sent:
            effects = self._forecast(now)
        return Outcome(None, tuple(effects))

    def record(self, now: datetime, cost: Cost) -> Outcome[Recorded]:
        """Count one cost, unless its ``dispatch_id`` is known as counted
        today or yesterday (then ``duplicate``, with the original's seq).

        An id not in the cache of recent ids is counted; if the store finds
        it counted already, the caller reports that with :meth:`uncount`.
        ``cost`` is kept as it is, inside the journal entry of the answer.
        """
        usd = cost.usd
        if not usd.is_finite() or usd < 0:
            raise ValueError(f"unvalidated amount reached the ledger: {usd}")
        effects = self._advance(now)
        today = self._today
        dispatch_id = cost.dispatch_id
        original = self._recent.get(dispatch_id)
        if original is not None:
            self.duplicates += 1
            return Outcome(Recorded(original, True, None), tuple(effects))
        self._seq += 1
        self.version += 1
        today.spend = add(today.spend, usd)
        today.total = add(today.total, usd) if today.others is not None else today.spend
        today.dispatches += 1
        self._recent.add(dispatch_id, self._seq)
        if today.reservations:
            self._release(dispatch_id)
        today.burn.observe(now, today.spend)
        entry = JournalEntry(seq=self._seq, day=today.day, at=now, cost=cost)
        self._check_thresholds(now, effects)
        return Outcome(Recorded(self._seq, False, entry), tuple(effects))

    def cycle(self, now: datetime) -> Outcome[None]:
        """Count one heartbeat cycle; every ``persist_every``-th asks for a patch."""
        effects = self._advance(now)
        self._today.cycles += 1
        self._last_cycle_at = now
        if self._today.cycles % self.config.persist_every == 0:
            effects.append(PatchDue(self.snapshot(), "cycle"))
        return Outcome(None, tuple(effects))

    def admit(
        self, now: datetime, dispatch_id: str, estimate: Decimal, *, counted_on: str | None = None
    ) -> Outcome[Admission]:
        """Reserve ``estimate`` against the cap if it fits; see :class:`Admission`
        and :func:`~budget_actor.core.admission.decide` for the rule.

        A reservation holds until the cost with the same ``dispatch_id``
        settles it (at its real cost) or ``reservation_ttl_s`` passes. Admitting
        the same id again renews its reservation (a new estimate and TTL), at
        most :data:`~budget_actor.core.admission.MAX_RENEWALS` times; at most
        :data:`~budget_actor.core.admission.MAX_OPEN_RESERVATIONS` are open at
        once. An id counted in the dedupe window is refused: one known here
        (:meth:`knows`), or one the store found counted on the day
        ``counted_on`` (the caller asks the store about any id not known here
        first).
        """
        effects = self._advance(now)
        today = self._today
        self._expire(now)
        live = today.reservations.get(dispatch_id)
        held = live[0] if live is not None else Decimal(0)
        if counted_on is None and self.knows(dispatch_id):
            yesterday = self._recent.counted_yesterday(dispatch_id)
            counted_on = today.previous if yesterday else today.day
        admission = decide(
            dispatch_id,
            estimate,
            cap=self.config.daily_cap,
            spent=today.total,
            reserved=sub(today.reserved, held),
            held=held,
            counted=counted_on is not None,
            counted_on=None if counted_on == today.day else counted_on,
            renewals=live[2] if live is not None else None,
            others_open=len(today.reservations) - (live is not None),
        )
        if admission.allowed:
            self._release(dispatch_id)
            expires = now + timedelta(seconds=self.config.reservation_ttl_s)
            renewals = live[2] + 1 if live is not None else 0
            today.reservations[dispatch_id] = (estimate, expires, renewals)
            today.reserved = add(today.reserved, estimate)
        return Outcome(admission, tuple(effects))

    def synced(self, now: datetime, others: Others) -> Outcome[None]:
        """The other instances' durable totals, freshly read from the store.

        Ignored unless they are of today. The effects are the alerts that the
        new global spend makes due (the nudge row's key makes sure only one
        instance's nudge is written; each instance pushes to its own
        subscribers).
        """
        effects = self._advance(now)
        today = self._today
        if others.day == today.day:
            before = today.others
            today.others = others
            today.total = add(today.spend, others.spend)
            if before is None or (before.spend, before.dispatches) != (
                others.spend,
                others.dispatches,
            ):
                self.version += 1
            self._check_thresholds(now, effects)
        return Outcome(None, tuple(effects))

    def uncount(self, entry: JournalEntry, original_seq: int, original_day: str) -> Outcome[None]:
        """The store refused ``entry``: its dispatch id was counted before
        (by ``original_seq`` on ``original_day``, today or a day next to it;
        by another instance, or before a restart, or long enough ago to have
        left the cache). Take the cost back out, and remember the original.

        Only if this ledger counted that very entry today (its seq, given out
        by this ledger, and not taken out before): a ledger restored since
        never counted it, and a repeated report must not subtract twice. A
        cost of a day that has rolled over stays in that day's figures here;
        the store's own figures (patch, shares) never held it. Taking a cost
        back never makes anything due.
        """
        today = self._today
        usd = entry.cost.usd
        self.duplicates += 1
        self.learn(entry.cost.dispatch_id, original_seq, original_day)
        mine = self._restored_seq < entry.seq <= self._seq
        if entry.day != today.day or not mine or entry.seq in today.uncounted:
            return NOTHING  # not counted here (or that day is closed): nothing to undo
        today.uncounted.add(entry.seq)
        today.spend = sub(today.spend, usd)
        today.total = sub(today.total, usd)
        today.dispatches -= 1
        self.version += 1
        return NOTHING

    def knows(self, dispatch_id: str) -> bool:
        """True if ``dispatch_id`` is known as counted today or yesterday
        (then :meth:`admit` refuses it without asking the store)."""
        return self._recent.get(dispatch_id) is not None

    def learn(self, dispatch_id: str, seq: int, day: str) -> None:
        """The store says ``dispatch_id`` was counted by ``seq`` on ``day``:
        remember it while that day is in the window."""
        today = self._today
        if day in (today.day, today.previous):
            self._recent.add(dispatch_id, seq, yesterday=day != today.day)

    def refuse(self, now: datetime, entries: Sequence[JournalEntry]) -> Outcome[None]:
        """These costs could not be made durable (the store and the spill file
        both failed): they were never acknowledged, and their senders will
        send them again. Take each back out (spend, dispatches, the cache of
        recent ids) as if it had never come, so that the resend counts it once.

        Only an entry that this ledger counted today (its seq, not taken out
        before) changes the figures. Thresholds already crossed stay sent.
        Sequence numbers are not given out again; a refused one is simply
        never confirmed, and no longer counts as pending. Taking a cost back
        never makes anything due.
        """
        today = self._today
        for entry in entries:
            if entry.seq > self._durable_seq:
                self._refused.add(entry.seq)
            cost = entry.cost
            self._recent.forget(cost.dispatch_id, entry.seq)
            mine = self._restored_seq < entry.seq <= self._seq
            if entry.day != today.day or not mine or entry.seq in today.uncounted:
                continue
            today.uncounted.add(entry.seq)
            today.spend = sub(today.spend, cost.usd)
            today.total = sub(today.total, cost.usd)
            today.dispatches -= 1
            self.version += 1
        today.burn.observe(now, today.spend)
        return NOTHING

    def withdraw(self, now: datetime, alert: Alert) -> Outcome[None]:
        """The store refused ``alert``'s nudge as premature (the shared spend
        has not reached it): arm its threshold again, and re-check."""
        today = self._today
        if alert.day != today.day or alert.kind != "threshold":
            return NOTHING
        today.alerts_sent.discard(alert.threshold)
        self._arm()
        return Outcome(None, tuple(self._crossings(now)))

    def persisted(
        self, seq: int, at: datetime, *, patch_written: bool, latency_s: float = 0.0
    ) -> Outcome[None]:
        """The store confirmed everything up to ``seq`` as durable."""
        self._last_write_at = at
        if latency_s:
            self._persist_latency_s = latency_s
        self._durable_seq = max(self._durable_seq, seq)
        if self._refused:
            self._refused = {s for s in self._refused if s > self._durable_seq}
        self._store_ok = True
        if patch_written:
            self._last_persist_at = at
        if self._pending() == 0:
            self._catching_up = False
        return NOTHING

    def store_failed(self) -> Outcome[None]:
        """A store write failed; it will be retried. Health turns ``degraded``."""
        self._store_ok = False
        self._catching_up = True
        return NOTHING

    def restarted(self, child: str) -> Outcome[None]:
        """A supervised task failed and is being restarted (for metrics)."""
        self.restarts[child] = self.restarts.get(child, 0) + 1
        return NOTHING

    def _advance(self, now: datetime) -> list[Effect]:
        """The one rollover check, at the start of every timed event: only a
        comparison per event, since the day's end is worked out once a day.

        Once ``now`` reaches midnight, the old day's final snapshot is due as
        its patch, and the new day starts at zero with every threshold armed.
        """
        if now < self._today.ends_at:
            return []
        old = self.snapshot()
        self._today = _new_day(now, self.config)
        # Yesterday's ids stay duplicates for the whole of today.
        self._recent.next_day(adjacent=self._today.previous == old.day)
        self._arm()
        self.version += 1
        return [PatchDue(old, "rollover")]

    def _check_thresholds(self, now: datetime, effects: list[Effect]) -> None:
        today = self._today
        if today.next_alert_at is not None and today.total >= today.next_alert_at:
            effects.extend(self._crossings(now))

    def _release(self, dispatch_id: str) -> None:
        held = self._today.reservations.pop(dispatch_id, None)
        if held is not None:
            self._today.reserved = sub(self._today.reserved, held[0])

    def _expire(self, now: datetime) -> None:
        reservations = self._today.reservations
        while reservations:
            dispatch_id, (_amount, expires, _renewals) = next(iter(reservations.items()))
            if expires > now:
                return
            self._release(dispatch_id)

    # -- views ---------------------------------------------------------------

    @property
    def day(self) -> str:
        return self._today.day

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def daily_spend(self) -> Decimal:
        return self._today.spend

    def snapshot(self) -> Snapshot:
        today = self._today
        return Snapshot(
            day=today.day,
            daily_spend=today.spend,
            daily_cap=self.config.daily_cap,
            cycle_count=today.cycles,
            dispatches=today.dispatches,
            alerts_sent=tuple(sorted(today.alerts_sent)),
            seq=self._seq,
        )

    @property
    def store_behind(self) -> bool:
        """True while the store fails or still lacks costs accepted during a
        failure (they wait in the spill file)."""
        return not self._store_ok or self._catching_up

    def spend(self) -> Spend:
        today = self._today
        cap = self.config.daily_cap
        others = today.others
        shared = self.instance is not None
        return Spend(
            day=today.day,
            daily_spend=today.total,
            daily_cap=cap,
            remaining=_remaining(cap, today.total),
            utilization=_utilization(today.total, cap),
            dispatches=today.dispatches + (others.dispatches if others else 0),
            seq=self._seq,
            instance=self.instance,
            instance_spend=today.spend if shared else None,
            instance_dispatches=today.dispatches if shared else None,
        )

    def health(
        self,
        now: datetime,
        *,
        store: str,
        subscribers: int,
        uptime_s: float,
        sync_age_s: float | None = None,
        spill_quarantined: int = 0,
    ) -> Health:
        """All health figures; the caller supplies the ones that are not accounting."""
        self._expire(now)
        today = self._today
        others = today.others
        shared = self.instance is not None
        burn_60m = today.burn.rate(now, 3600)
        cap = self.config.daily_cap
        every = self.config.persist_every
        stale_after = max(SYNC_STALE_MIN_S, SYNC_STALE_INTERVALS * self.config.sync_interval_s)
        stale = sync_age_s is not None and sync_age_s > stale_after
        degraded = self.store_behind or stale
        return Health(
            status="degraded" if degraded else "ok",
            day=today.day,
            daily_spend=today.total,
            daily_cap=cap,
            remaining=_remaining(cap, today.total),
            utilization=_utilization(today.total, cap),
            alert_thresholds=tuple(float(t) for t in self.config.alert_at),
            alerts_sent=tuple(float(t) for t in sorted(today.alerts_sent)),
            cycle_count=today.cycles + (others.cycles if others else 0),
            cycles_until_persist=every - today.cycles % every,
            last_persist_at=self._last_persist_at,
            store=store,
            store_ok=self._store_ok,
            subscribers=subscribers,
            uptime_s=uptime_s,
            dispatches=today.dispatches + (others.dispatches if others else 0),
            seq=self._seq,
            pending=self._pending(),
            burn_rate_5m=today.burn.rate(now, 300),
            burn_rate_60m=burn_60m,
            projected_spend=project(today.total, burn_60m, now, today.ends_at),
            reserved=add(today.reserved, others.reserved) if others else today.reserved,
            duplicates=self.duplicates,
            restarts=dict(self.restarts),
            persist_latency_s=round(self._persist_latency_s, 6),
            store_lag_s=self._lag(now),
            spill_quarantined=spill_quarantined,
            instance=self.instance,
            instance_spend=today.spend if shared else None,
            instance_dispatches=today.dispatches if shared else None,
            instances=(others.instances if others else 0) + 1 if shared else None,
            sync_age_s=sync_age_s,
            last_cycle_at=self._last_cycle_at,
        )

    def _lag(self, now: datetime) -> float:
        """Seconds the store is behind: since its last confirmed write, while
        accepted costs wait for it; 0 when it has everything."""
        if self._pending() == 0 or self._last_write_at is None:
            return 0.0
        return round(max((now - self._last_write_at).total_seconds(), 0.0), 3)

    # -- internals -----------------------------------------------------------

    def _pending(self) -> int:
        """Counted costs that the store has not confirmed yet."""
        return self._seq - self._durable_seq - len(self._refused)

    def _arm(self) -> None:
        """Recompute the spend at which the next threshold alert falls due."""
        sent = self._today.alerts_sent
        due = [amount for t, amount in self._levels if t not in sent]
        self._today.next_alert_at = min(due) if due else None

    def _crossings(self, now: datetime) -> list[Effect]:
        today = self._today
        effects: list[Effect] = []
        for threshold, amount in self._levels:
            if threshold not in today.alerts_sent and today.total >= amount:
                today.alerts_sent.add(threshold)
                effects.append(AlertDue(self._alert(now, threshold)))
        self._arm()
        return effects

    def _forecast(self, now: datetime) -> list[Effect]:
        today = self._today
        cap = self.config.daily_cap
        if today.total >= cap:
            return []  # the real spend got there first; its alerts say so
        projected = project(today.total, today.burn.rate(now, 3600), now, today.ends_at)
        if projected <= cap:
            return []
        today.forecast_sent = True
        return [AlertDue(self._alert(now, Decimal(1), projected=projected))]

    def _alert(self, now: datetime, threshold: Decimal, projected: Decimal | None = None) -> Alert:
        today = self._today
        return Alert(
            to=self.config.alert_to,
            day=today.day,
            threshold=threshold,
            daily_spend=today.total,
            daily_cap=self.config.daily_cap,
            created_at=now,
            kind="threshold" if projected is None else "forecast",
            projected_spend=projected,
        )


def _remaining(cap: Decimal, spend: Decimal) -> Decimal:
    # Never negative: "remaining" answers "how much may still be spent"; the
    # overrun itself is visible as utilization above 1.
    return max(sub(cap, spend), Decimal(0))


def _utilization(spend: Decimal, cap: Decimal) -> float:
    return float(RATIO_CONTEXT.divide(spend, cap))
