"""The store: where patches, nudges and the cost journal live.

One small, synchronous interface (:class:`Store`) with two implementations,
SQLite (the embedded default) and PostgreSQL (production). Every method blocks,
so the service calls them only from a worker thread via
``trio.to_thread.run_sync``, one call at a time per connection (each handle
has its ``CapacityLimiter``; see :mod:`budget_actor.runtime.persister`);
psycopg's async API is asyncio-only.

Only the persister writes the journal, patches and nudges. Children that
must not wait behind it use a handle of their own (:meth:`Store.companion`):
the webhook child (which updates only ``budget_webhooks``), the history
reader (reads only) and, on PostgreSQL, the coordinator (reservations). A
failed call raises :class:`StoreError` and drops the connection, so the
next call reconnects: that is how an outage ends.

Tables:

* ``quilt_patches`` exactly as the contract fixes it (the service creates it if
  missing and only ever upserts rows named ``budget_*`` / ``budget_alert_*``).
* ``budget_journal``: one row per accepted cost, keyed by ``seq``, with
  ``(day, dispatch_id)`` unique, so that a replayed write can never count twice.
* ``budget_webhooks``: the alert webhook deliveries (see "alert webhooks" below).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ..core.audit import ShareCheck
from ..core.cost import Cost
from ..core.history import Curve, DayTotal
from ..core.money import add
from ..core.records import (
    NUDGE_TYPE,
    PATCH_TYPE,
    Alert,
    JournalEntry,
    Others,
    Restored,
    Snapshot,
    WriteResult,
)
from ..core.views import Admission
from ..core.webhook import Delivery, DueDeliveries
from ..core.webhook import body as webhook_body

# The journal's columns in the order a JournalEntry is read from a row: its
# own fields, then its Cost's fields in their declared order.
JOURNAL_COLUMNS = (
    "seq, day, recorded_at, dispatch_id, usd, model, input_tokens, output_tokens, agent"
)


class StoreError(Exception):
    """The store could not be reached or refused an operation."""

    #: True when the database aborted the transaction to resolve a conflict
    #: with a concurrent one (a deadlock); running it again is the remedy.
    conflict = False


# A deadlock between two instances resolves on the first retry; a handful
# covers bad luck without hiding a real, persistent problem.
CONFLICT_RETRIES = 5


class SharedBudget(Protocol):
    """What the coordinator needs of a store whose budget several instances
    share (see :meth:`Store.shared_budget`). Blocking, like every store call;
    each raises :class:`StoreError`."""

    instance: str | None

    def others(self, day: str) -> Others:
        """The other instances' durable totals of ``day``."""
        ...

    def admit(
        self, day: str, dispatch_id: str, estimate: Decimal, cap: Decimal, ttl_s: float
    ) -> tuple[Admission, Others]:
        """Reserve ``estimate`` against the global cap if it fits, with the
        others' fresh totals."""
        ...

    def close(self) -> None: ...


class Store(ABC):
    """A DB-API store. Subclasses supply the connection and dialect details."""

    #: ``"sqlite"`` or ``"postgresql"``, as reported in health.
    kind: str
    #: The file path or URL this store was opened with.
    location: str
    #: Parameter marker of the driver.
    _P: str = "%s"
    #: True when several instances share this store's budget (PostgreSQL).
    shared: bool = False
    #: This service's instance id, when shared.
    instance: str | None = None
    #: How a transaction starts.
    _BEGIN = "BEGIN"
    #: How a transaction starts that reads and then writes while another
    #: connection may commit (the webhook claim beside the persister).
    _BEGIN_CLAIM: str | None = None

    def __init__(self) -> None:
        self._conn: Any = None
        self._read_only = False
        #: Digests of the alert webhooks (core.webhook.target_of): a nudge
        #: row that a write inserts gets one delivery row per target, in the
        #: same transaction.
        self.webhook_targets: tuple[str, ...] = ()

    # -- dialect hooks -------------------------------------------------------

    @abstractmethod
    def _connect(self) -> Any: ...

    @abstractmethod
    def _schema(self) -> Sequence[tuple[str, str]]:
        """(table name, CREATE TABLE IF NOT EXISTS statement) pairs."""

    def _json_param(self, body: dict[str, Any]) -> Any:
        return dumps(body)

    @abstractmethod
    def _time_param(self, moment: datetime) -> Any: ...

    @abstractmethod
    def _read_body(self, value: Any) -> dict[str, Any]: ...

    @abstractmethod
    def _read_time(self, value: Any) -> datetime: ...

    def _json_marker(self) -> str:
        return self._P

    @abstractmethod
    def _journal_insert(self) -> str:
        """INSERT of journal rows from one JSON array parameter of JournalEntry
        objects; rows that exist already (by seq, or by day and id) are skipped.
        PostgreSQL replaces the whole step (see ``_insert_journal``)."""

    # -- the interface -------------------------------------------------------

    def open(self, *, create: bool = True) -> None:
        """Connect and create the tables if missing. Raises :class:`StoreError`.

        With ``create=False`` (audits, reports) nothing is created: a missing
        database or table is an error.
        """
        self._read_only = not create
        self._run(self._create if create else lambda cur: None)

    def close(self) -> None:
        """Close the store for good (the service is stopping)."""
        self._drop()

    def _drop(self) -> None:
        """Drop the connection; the next call reconnects."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def load(self, day: str) -> Restored:
        """Everything restore needs for ``day``. Raises :class:`StoreError`."""
        result: Restored = self._run(lambda cur: self._load(cur, day))
        return result

    def write(
        self,
        entries: Sequence[JournalEntry] | JournalBatch,
        patches: Sequence[Snapshot],
        nudges: Sequence[Alert],
        now: datetime,
    ) -> WriteResult:
        """Write a batch in one transaction; all of it or none of it.

        ``entries`` may come pre-encoded as a :class:`JournalBatch` (the
        persister encodes on the event loop's thread, see there).

        Journal entries already present (same seq, or same day and dispatch
        id) are skipped, which makes a retried or re-drained batch harmless.
        For patches, the last snapshot of each day in ``patches`` wins.
        A nudge whose row already exists is not written again; the result
        says which were inserted (see :class:`WriteResult`).
        Raises :class:`StoreError`.
        """
        result: WriteResult = self._run(lambda cur: self._write(cur, entries, patches, nudges, now))
        return result

    # -- capabilities: what upper layers may ask instead of testing classes --

    @abstractmethod
    def spill_path(self) -> Path:
        """Where acknowledged costs wait while this store is unreachable,
        unless the service is told otherwise; distinct for distinct stores."""

    def shared_budget(self) -> SharedBudget | None:
        """A second handle on this store for the coordinator (its own
        connection), when several instances share this store's budget; None
        when the store serves one instance alone (then the ledger decides
        admissions itself and there is nobody to sync with)."""
        return None

    def share_checks(self, day: str, patch: Snapshot | None) -> list[ShareCheck] | None:
        """Each instance's share of ``day`` beside its journal rows, for
        ``verify``; None when there are no shares to check."""
        return None

    def get_patch(self, type_: str, name: str) -> dict[str, Any] | None:
        """The body of one ``quilt_patches`` row, or None."""
        p = self._P
        row = self._run(
            lambda cur: cur.execute(
                f"SELECT body FROM quilt_patches WHERE type = {p} AND name = {p}", (type_, name)
            ).fetchone()
        )
        return None if row is None else self._read_body(row[0])

    def rebuild_patch(self, day: str, daily_cap: Decimal, now: datetime) -> Snapshot:
        """Recompute ``day``'s budget patch from its journal and write it.

        Cycle count, cap and sent alerts are kept from the existing patch
        (the journal does not know them); spend, dispatches and seq come from
        the journal, summed exactly. Raises :class:`StoreError`.
        """
        entries = self.journal(day)
        body = self.get_patch(PATCH_TYPE, f"budget_{day}")
        old = Snapshot.from_body(body) if body is not None else None
        spend = Decimal(0)
        for entry in entries:
            spend = add(spend, entry.cost.usd)
        snapshot = Snapshot(
            day=day,
            daily_spend=spend,
            daily_cap=old.daily_cap if old else daily_cap,
            cycle_count=old.cycle_count if old else 0,
            dispatches=len(entries),
            alerts_sent=old.alerts_sent if old else (),
            seq=max((e.seq for e in entries), default=old.seq if old else 0),
        )
        self.write([], [snapshot], [], now)
        return snapshot

    def journal(self, day: str) -> list[JournalEntry]:
        """Every journal entry of ``day``, in seq order (for audits and reports)."""
        entries: list[JournalEntry] = self._run(lambda cur: self._entries(cur, day, -1))
        return entries

    # -- alert webhooks --------------------------------------------------------
    #
    # ``budget_webhooks`` holds one row per alert and webhook (target, the
    # digest of its URL; name, the nudge's name), written in the transaction
    # that inserts the nudge row, so an alert that happened has its deliveries,
    # whatever crashes next. A row is pending until a 2xx answered it
    # (delivered_at). ``next_at`` is when it may be tried next; claiming a row
    # moves ``next_at`` a lease ahead and names the claimer, so no other
    # process sends it meanwhile, and a claimer that dies only delays it by
    # the lease. Called from the webhook child's own connection
    # (:meth:`companion`), never the persister's.

    def companion(self) -> Store:
        """Another connection to the same store, for a child that must not
        wait behind the persister (no instance lock is taken)."""
        raise NotImplementedError(f"{self.kind}: no companion connection")

    def webhooks_due(
        self, targets: Sequence[str], now: datetime, owner: str, lease_s: float, limit: int
    ) -> DueDeliveries:
        """Claim up to ``limit`` deliveries to ``targets`` that are due at
        ``now``, for ``owner``, for ``lease_s`` seconds; count the pending
        ones. Raises :class:`StoreError`."""
        result: DueDeliveries = self._run(
            lambda cur: self._webhooks_due(cur, targets, now, owner, lease_s, limit),
            begin=self._BEGIN_CLAIM,
        )
        return result

    def webhook_delivered(self, target: str, name: str, now: datetime) -> None:
        """A 2xx answered this delivery. Raises :class:`StoreError`."""
        p = self._P
        self._run(
            lambda cur: cur.execute(
                f"UPDATE budget_webhooks SET delivered_at = {p}, claimed_by = NULL,"
                f" last_error = NULL WHERE target = {p} AND name = {p} AND delivered_at IS NULL",
                (self._time_param(now), target, name),
            )
        )

    def webhook_failed(
        self, target: str, name: str, owner: str, retry_at: datetime, error: str
    ) -> None:
        """An attempt failed: retry at ``retry_at`` (unless the lease was
        lost meanwhile). Raises :class:`StoreError`."""
        p = self._P
        self._run(
            lambda cur: cur.execute(
                f"UPDATE budget_webhooks SET next_at = {p}, claimed_by = NULL, last_error = {p}"
                f" WHERE target = {p} AND name = {p} AND claimed_by = {p}"
                " AND delivered_at IS NULL",
                (self._time_param(retry_at), error[:500], target, name, owner),
            )
        )

    def webhooks_release(self, owner: str, now: datetime) -> int:
        """Make the deliveries that ``owner`` had claimed due at ``now``: a
        predecessor with this owner id died while sending them (a live one
        cannot exist: the instance lock). Raises :class:`StoreError`."""
        p = self._P

        def release(cur: Any) -> int:
            cur.execute(
                f"UPDATE budget_webhooks SET claimed_by = NULL, next_at = {p}"
                f" WHERE claimed_by = {p} AND delivered_at IS NULL",
                (self._time_param(now), owner),
            )
            return int(cur.rowcount)

        released: int = self._run(release)
        return released

    def _insert_webhooks(self, cur: Any, alert: Alert, stamp: Any) -> None:
        p = self._P
        payload = webhook_body(alert).decode()
        for target in self.webhook_targets:
            cur.execute(
                "INSERT INTO budget_webhooks (target, name, body, created_at, next_at, attempts)"
                f" VALUES ({p}, {p}, {p}, {p}, {p}, 0) ON CONFLICT (target, name) DO NOTHING",
                (target, alert.nudge_name, payload, stamp, stamp),
            )

    def _webhooks_due(
        self,
        cur: Any,
        targets: Sequence[str],
        now: datetime,
        owner: str,
        lease_s: float,
        limit: int,
    ) -> DueDeliveries:
        if not targets:
            return DueDeliveries(claimed=[], pending=0, next_due_s=None)
        p = self._P
        marks = ", ".join([p] * len(targets))
        cur.execute(
            "SELECT target, name, body, attempts, next_at FROM budget_webhooks"
            f" WHERE delivered_at IS NULL AND target IN ({marks}) ORDER BY created_at, name",
            tuple(targets),
        )
        rows = cur.fetchall()
        lease = self._time_param(now + timedelta(seconds=lease_s))
        claimed: list[Delivery] = []
        next_due: datetime | None = None
        for target, name, body, attempts, next_at in rows:
            due_at = self._read_time(next_at)
            if due_at > now:
                next_due = due_at if next_due is None else min(next_due, due_at)
                continue
            if len(claimed) >= limit:
                continue
            # Compare and set on next_at: of two processes that saw the row
            # due, only the first to update it claims it.
            cur.execute(
                f"UPDATE budget_webhooks SET claimed_by = {p}, next_at = {p},"
                f" attempts = attempts + 1 WHERE target = {p} AND name = {p}"
                f" AND delivered_at IS NULL AND next_at = {p}",
                (owner, lease, target, name, next_at),
            )
            if cur.rowcount == 1:
                claimed.append(Delivery(str(target), str(name), str(body).encode(), attempts + 1))
        wait = None if next_due is None else max((next_due - now).total_seconds(), 0.0)
        return DueDeliveries(claimed=claimed, pending=len(rows), next_due_s=wait)

    # -- history (GET /history) ----------------------------------------------

    def day_totals(self, first: str, last: str) -> dict[str, DayTotal]:
        """Spend, dispatches and cap of each day from ``first`` to ``last``
        that has journal rows or a budget patch: spend and dispatches from
        the journal (the patch's for a day without rows), the cap from the
        patch (None without one). Raises :class:`StoreError`."""
        result: dict[str, DayTotal] = self._run(lambda cur: self._day_totals(cur, first, last))
        return result

    def fold_curve(self, curve: Curve) -> None:
        """Bring ``curve`` up to date with the journal of its day (only the
        rows after ``curve.through_seq``). Raises :class:`StoreError`."""
        self._run(lambda cur: self._fold_curve(cur, curve))

    def _day_totals(self, cur: Any, first: str, last: str) -> dict[str, DayTotal]:
        p = self._P
        cur.execute(
            f"SELECT name, body FROM quilt_patches WHERE type = {p} AND name >= {p}"
            f" AND name <= {p}",
            (PATCH_TYPE, f"budget_{first}", f"budget_{last}"),
        )
        patches: dict[str, Snapshot] = {}
        for name, body in cur.fetchall():
            try:
                snap = Snapshot.from_body(self._read_body(body))
            except (KeyError, TypeError, ValueError, ArithmeticError):
                continue  # not one of ours; never trust it
            if name == snap.patch_name:
                patches[snap.day] = snap
        sums = self._journal_sums(cur, first, last, patches)
        totals: dict[str, DayTotal] = {}
        for day in sorted(patches.keys() | sums.keys()):
            patch = patches.get(day)
            if day in sums:
                spend, dispatches = sums[day]
            else:
                # A patch but no journal rows (an older version, or a
                # pruned journal): the patch is all there is.
                assert patch is not None
                spend, dispatches = patch.daily_spend, patch.dispatches
            totals[day] = DayTotal(spend, dispatches, patch.daily_cap if patch else None)
        return totals

    def _journal_sums(
        self, cur: Any, first: str, last: str, patches: dict[str, Snapshot]
    ) -> dict[str, tuple[Decimal, int]]:
        """Exact spend and count per day of the journal. Amounts are text
        here (no exact SUM in SQL), so a day whose patch already holds every
        row (same count, no later seq) takes the patch's exact sum, and only
        the others are summed row by row."""
        p = self._P
        cur.execute(
            f"SELECT day, count(*), max(seq) FROM budget_journal WHERE day >= {p}"
            f" AND day <= {p} GROUP BY day",
            (first, last),
        )
        sums: dict[str, tuple[Decimal, int]] = {}
        for day, count, max_seq in cur.fetchall():
            patch = patches.get(day)
            if patch is not None and patch.dispatches == count and patch.seq >= max_seq:
                sums[day] = (patch.daily_spend, int(count))
                continue
            cur.execute(f"SELECT usd FROM budget_journal WHERE day = {p}", (day,))
            total = Decimal(0)
            for (usd,) in cur.fetchall():
                total = add(total, Decimal(str(usd)))
            sums[day] = (total, int(count))
        return sums

    def _fold_curve(self, cur: Any, curve: Curve) -> None:
        p = self._P
        cur.execute(
            f"SELECT seq, recorded_at, usd FROM budget_journal WHERE day = {p} AND seq > {p}"
            " ORDER BY seq",
            (curve.day, curve.through_seq),
        )
        rows = cur.fetchall()
        curve.add((self._read_time(at), Decimal(str(usd))) for _, at, usd in rows)
        if rows:
            curve.through_seq = int(rows[-1][0])

    # -- internals -----------------------------------------------------------

    def _run(self, work: Any, *, begin: str | None = None) -> Any:
        """Run ``work(cursor)`` in one transaction (started with ``begin``,
        by default :attr:`_BEGIN`). A transaction the database aborted to
        break a lock cycle (see :meth:`_conflict`) is run again, up to
        :data:`CONFLICT_RETRIES` times; any other failure drops the
        connection and raises :class:`StoreError`."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return self._transaction(work, begin or self._BEGIN)
            except StoreError as exc:
                if not (exc.conflict and attempt < CONFLICT_RETRIES):
                    raise
        raise AssertionError("unreachable")

    def _transaction(self, work: Any, begin: str) -> Any:
        try:
            if self._conn is None:
                self._conn = self._connect()
            cur = self._conn.cursor()
            try:
                cur.execute(begin)
                result = work(cur)
                cur.execute("COMMIT")
                return result
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except Exception:
                    self._drop()
                raise
            finally:
                try:
                    cur.close()
                except Exception:
                    pass
        except StoreError:
            raise
        except Exception as exc:
            conflict = self._conflict(exc)
            if not conflict:
                # Whatever went wrong, a fresh connection is the safe next step.
                self._drop()
            # One line: drivers' messages span several, and logs and the
            # command line's errors must not.
            error = StoreError(f"{self.kind}: {' '.join(str(exc).split())}")
            error.conflict = conflict
            raise error from exc

    def _conflict(self, exc: Exception) -> bool:
        """True for an error that only says "run the transaction again"."""
        return False

    def _create(self, cur: Any) -> None:
        for table, statement in self._schema():
            if not self._table_exists(cur, table):
                cur.execute(statement)

    def _table_exists(self, cur: Any, table: str) -> bool:
        # Checked first, not left to IF NOT EXISTS: PostgreSQL checks the
        # CREATE privilege before it checks existence, and a production user
        # may lack CREATE once the tables are there.
        return False

    def _write(
        self,
        cur: Any,
        entries: Sequence[JournalEntry] | JournalBatch,
        patches: Sequence[Snapshot],
        nudges: Sequence[Alert],
        now: datetime,
    ) -> WriteResult:
        result = WriteResult()
        batch = entries if isinstance(entries, JournalBatch) else JournalBatch.of(entries)
        if batch.count:
            # One statement for the whole batch, its rows as one JSON array
            # encoded by msgspec in C: the worker thread then does almost no
            # Python work per cost, and holds the GIL (which the event loop
            # needs) for microseconds instead of once per row.
            self._insert_journal(cur, batch, result)
        latest: dict[str, Snapshot] = {}
        for snap in patches:
            latest[snap.day] = snap
        stamp = self._time_param(now)
        for snap in latest.values():
            self._upsert_patch(cur, snap, stamp)
        for alert in nudges:
            outcome = self._insert_nudge(cur, alert, stamp)
            result.nudges[alert.nudge_name] = outcome
            if outcome == "inserted" and self.webhook_targets:
                self._insert_webhooks(cur, alert, stamp)
        return result

    def _insert_journal(self, cur: Any, batch: JournalBatch, result: WriteResult) -> None:
        cur.execute(self._journal_insert(), (batch.json,))

    def _upsert_patch(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
        p, j = self._P, self._json_marker()
        cur.execute(
            "INSERT INTO quilt_patches (type, name, body, created_at, updated_at)"
            f" VALUES ({p}, {p}, {j}, {p}, {p}) ON CONFLICT (type, name)"
            " DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            (PATCH_TYPE, snap.patch_name, self._json_param(snap.body()), stamp, stamp),
        )

    def _insert_nudge(self, cur: Any, alert: Alert, stamp: Any) -> str:
        p, j = self._P, self._json_marker()
        cur.execute(
            "INSERT INTO quilt_patches (type, name, body, created_at, updated_at)"
            f" VALUES ({p}, {p}, {j}, {p}, {p}) ON CONFLICT (type, name) DO NOTHING",
            (NUDGE_TYPE, alert.nudge_name, self._json_param(alert.body()), stamp, stamp),
        )
        return "inserted" if cur.rowcount == 1 else "exists"

    def _entries(
        self, cur: Any, day: str, after_seq: int, instance: str | None = None
    ) -> list[JournalEntry]:
        """The journal entries of ``day`` after ``after_seq``, in seq order;
        only ``instance``'s when given (a shared store)."""
        p = self._P
        mine = "" if instance is None else f" AND instance = {p}"
        cur.execute(
            f"SELECT {JOURNAL_COLUMNS} FROM budget_journal WHERE day = {p} AND seq > {p}{mine}"
            " ORDER BY seq",
            (day, after_seq) if instance is None else (day, after_seq, instance),
        )
        read_time = self._read_time
        return [
            JournalEntry(
                seq=int(r[0]),
                day=str(r[1]),
                at=read_time(r[2]),
                cost=Cost(str(r[3]), Decimal(str(r[4])), *r[5:]),
            )
            for r in cur.fetchall()
        ]

    def _load(self, cur: Any, day: str) -> Restored:
        p = self._P
        cur.execute(
            f"SELECT body FROM quilt_patches WHERE type = {p} AND name = {p}",
            (PATCH_TYPE, f"budget_{day}"),
        )
        row = cur.fetchone()
        patch = None if row is None else Snapshot.from_body(self._read_body(row[0]))
        entries = self._entries(cur, day, patch.seq if patch else -1)
        return self._restored(cur, day, patch, entries)

    def _restored(
        self,
        cur: Any,
        day: str,
        patch: Snapshot | None,
        entries: list[JournalEntry],
        others: Others | None = None,
    ) -> Restored:
        """The rest of a :class:`Restored`: dedupe ids, sent alerts, max seq."""
        p = self._P
        cur.execute(f"SELECT dispatch_id, seq FROM budget_journal WHERE day = {p}", (day,))
        ids = {str(r[0]): int(r[1]) for r in cur.fetchall()}
        sent, forecast_sent = self._sent(cur, day)
        max_seq = self._max_seq(cur)
        if patch is not None:
            max_seq = max(max_seq, patch.seq)
        return Restored(
            day=day,
            patch=patch,
            entries=tuple(entries),
            dispatch_ids=ids,
            alerts_sent=frozenset(sent),
            forecast_sent=forecast_sent,
            max_seq=max_seq,
            instance=self.instance if self.shared else None,
            others=others,
        )

    def _max_seq(self, cur: Any) -> int:
        """The highest seq in the journal (it is the key here: an index read)."""
        cur.execute("SELECT COALESCE(MAX(seq), 0) FROM budget_journal")
        return int(cur.fetchone()[0])

    def _sent(self, cur: Any, day: str) -> tuple[set[Decimal], bool]:
        """Thresholds of ``day`` whose nudge row exists, and whether the
        forecast nudge does."""
        p = self._P
        prefix = f"budget_alert_{day}_"
        cur.execute(
            f"SELECT name FROM quilt_patches WHERE type = {p} AND name LIKE {p}",
            (NUDGE_TYPE, prefix + "%"),
        )
        sent: set[Decimal] = set()
        for (name,) in cur.fetchall():
            try:
                sent.add((Decimal(str(name)[len(prefix) :]) / 100).normalize())
            except ArithmeticError:
                continue  # not one of ours; never touch it
        cur.execute(
            f"SELECT count(*) FROM quilt_patches WHERE type = {p} AND name = {p}",
            (NUDGE_TYPE, f"budget_forecast_{day}"),
        )
        return sent, int(cur.fetchone()[0]) > 0


_journal_encoder = msgspec.json.Encoder()


class JournalBatch:
    """Journal entries encoded as one JSON array, ready for the store's bulk insert.

    Encoding happens where :meth:`of` is called. The persister calls it on the
    event loop's thread: the encoding holds the GIL either way, and there it
    does not make the event loop wait for a worker thread to let go of it.
    """

    __slots__ = ("count", "json")

    def __init__(self, json: str, count: int) -> None:
        self.json = json
        self.count = count

    @classmethod
    def of(cls, entries: Sequence[JournalEntry]) -> JournalBatch:
        return cls(_journal_encoder.encode(entries).decode() if entries else "[]", len(entries))


def dumps(body: dict[str, Any]) -> str:
    """Compact JSON text of a row body."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True)
