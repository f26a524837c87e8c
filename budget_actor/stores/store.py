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
* ``budget_journal``: one row per accepted cost, with ``(day, dispatch_id)``
  unique, so that a replayed write can never count twice, and the dedupe
  window across midnight as two more unique keys (:data:`PAIR_KEYS`).
* ``budget_shares``: per day and instance, the exact sum of that instance's
  journal rows, updated in the same transaction as the rows. Restore reads
  it instead of the day's journal, and every patch is the sum of the shares.
  SQLite has one instance, ``''``.
* ``budget_webhooks``: the alert webhook deliveries (see "alert webhooks" below).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ..core.audit import ShareCheck
from ..core.cost import Cost
from ..core.dedupe import neighbours
from ..core.history import Curve, DayTotal
from ..core.money import MONEY_CONTEXT, add
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

# The dedupe window across midnight, as two unique keys of the journal
# (index name suffix, expression of the day's number): the day number halved,
# and the day number plus one halved. Two adjacent days share exactly one of
# the two pairs, so the same dispatch_id on today and yesterday collides in
# one key (in the database, under its locks: instances racing at midnight
# wait for each other), while two days apart share neither. See
# budget_actor.core.dedupe.day_number; ``{n}`` is the dialect's day number.
PAIR_KEYS = (("pair_even", "({n}) / 2"), ("pair_odd", "({n} + 1) / 2"))

# A row found holding a refused row's dispatch id: (instance, seq, day).
Holder = tuple[str, int, str]


class SharedBudget(Protocol):
    """What the coordinator needs of a store whose budget several instances
    share (see :meth:`Store.shared_budget`). Blocking, like every store call;
    each raises :class:`StoreError`."""

    instance: str | None
    #: The store's name in messages ("postgresql").
    kind: str

    def others(self, day: str) -> Others:
        """The other instances' durable totals of ``day``."""
        ...

    def admit(
        self, day: str, dispatch_id: str, estimate: Decimal, cap: Decimal, ttl_s: float
    ) -> tuple[Admission, Others]:
        """Reserve ``estimate`` against the global cap if it fits, with the
        others' fresh totals."""
        ...

    def interrupt(self) -> None:
        """Make a call that hangs in another thread fail soon."""
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

    @abstractmethod
    def interrupt(self) -> None:
        """Make a call that hangs in another thread fail soon (it then raises
        :class:`StoreError` and drops its connection).

        Called from the event loop's thread when a call has run past its
        deadline; safe to call at any time, and a no-op when nothing runs.
        """

    def _drop(self) -> None:
        """Drop the connection; the next call reconnects."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def latest_day(self) -> str | None:
        """The latest day that has a journal row, or None for an empty journal.
        Raises :class:`StoreError`."""
        row = self._run(lambda cur: cur.execute("SELECT MAX(day) FROM budget_journal").fetchone())
        return None if row is None or row[0] is None else str(row[0])

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

    def find(self, day: str, dispatch_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """The ids among ``dispatch_ids`` that the journal holds in the dedupe
        window of ``day`` (that day or a day next to it), each with the
        original's (seq, day). Raises :class:`StoreError`."""
        found: dict[str, tuple[int, str]] = self._run(
            lambda cur: self._find(cur, day, dispatch_ids)
        )
        return found

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
        """Rewrite ``day``'s budget patch as the sum of its shares (exact: each
        is kept in the same transaction as its journal rows), for a day
        whose costs reached the store late (spilled across midnight).

        The cap is kept from the existing patch. Raises :class:`StoreError`.
        """
        body = self.get_patch(PATCH_TYPE, f"budget_{day}")
        cap = Snapshot.from_body(body).daily_cap if body is not None else daily_cap
        seed = Snapshot(
            day=day,
            daily_spend=Decimal(0),
            daily_cap=cap,
            cycle_count=0,
            dispatches=0,
            alerts_sent=(),
            seq=0,
        )
        self.write([], [seed], [], now)
        body = self.get_patch(PATCH_TYPE, f"budget_{day}")
        assert body is not None
        return Snapshot.from_body(body)

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

    def _run(self, work: Any, *, begin: str | None = None, framed: bool = True) -> Any:
        """Run ``work(cursor)`` in one transaction (started with ``begin``,
        by default :attr:`_BEGIN`). A transaction the database aborted to
        break a lock cycle (see :meth:`_conflict`) is run again, up to
        :data:`CONFLICT_RETRIES` times; any other failure drops the
        connection and raises :class:`StoreError`. ``framed=False``: ``work``
        begins and commits the transaction itself (to send it in one go);
        a failure still rolls it back."""
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                return self._transaction(work, begin or self._BEGIN, framed)
            except StoreError as exc:
                if not (exc.conflict and attempt < CONFLICT_RETRIES):
                    raise
        raise AssertionError("unreachable")

    def _transaction(self, work: Any, begin: str, framed: bool = True) -> Any:
        try:
            if self._conn is None:
                self._conn = self._connect()
            cur = self._conn.cursor()
            try:
                if framed:
                    cur.execute(begin)
                result = work(cur)
                if framed:
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

    # -- journal indexes -----------------------------------------------------

    #: The dialect's day number of the ``day`` column: consecutive integers
    #: for consecutive days, and allowed in an index (immutable).
    _DAY_NUMBER: str

    def _indexes(self) -> list[tuple[str, str, bool]]:
        """Indexes of ``budget_journal`` beyond its table constraints:
        (name, columns or expressions, unique)."""
        return [
            (f"budget_journal_{suffix}", f"({key.format(n=self._DAY_NUMBER)}), dispatch_id", True)
            for suffix, key in PAIR_KEYS
        ]

    def _create_indexes(self, cur: Any) -> None:
        """Create the journal's missing indexes (at the first start of a
        version that adds one; that needs the table's owner, once).

        A journal written before the dedupe window crossed midnight may
        already hold one id on two adjacent days (counted twice then): a
        pair key cannot be built over those rows, so it is built over the
        days from the last journaled day on, which are free of them, and the
        window holds from that day.
        """
        for name, columns, unique in self._indexes():
            if self._index_exists(cur, name):
                continue
            kind = "UNIQUE INDEX" if unique else "INDEX"
            create = f"CREATE {kind} {name} ON budget_journal ({columns})"
            cur.execute("SAVEPOINT budget_index")
            try:
                cur.execute(create)
            except Exception as exc:
                if not (unique and self._unique_violation(exc)):
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT budget_index")
                cur.execute("SELECT MAX(day) FROM budget_journal")
                # A day read back from our own column, checked before it is
                # written into the statement (DDL takes no parameters).
                since = date.fromisoformat(str(cur.fetchone()[0])).isoformat()
                cur.execute(f"{create} WHERE day >= '{since}'")
            cur.execute("RELEASE SAVEPOINT budget_index")

    @abstractmethod
    def _index_exists(self, cur: Any, name: str) -> bool: ...

    @abstractmethod
    def _unique_violation(self, exc: Exception) -> bool: ...

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
        stamp = self._time_param(now)
        if batch.count:
            # One statement for the whole batch, its rows as one JSON array
            # encoded by msgspec in C: the worker thread then does almost no
            # Python work per cost, and holds the GIL (which the event loop
            # needs) for microseconds instead of once per row.
            self._insert_journal(cur, batch, result, stamp)
        latest: dict[str, Snapshot] = {}
        for snap in patches:
            latest[snap.day] = snap
        for snap in latest.values():
            self._upsert_patch(cur, snap, stamp)
        for alert in nudges:
            outcome = self._insert_nudge(cur, alert, stamp)
            result.nudges[alert.nudge_name] = outcome
            if outcome == "inserted" and self.webhook_targets:
                self._insert_webhooks(cur, alert, stamp)
        return result

    @abstractmethod
    def _insert_journal(
        self, cur: Any, batch: JournalBatch, result: WriteResult, stamp: Any
    ) -> None:
        """Insert the batch's rows, add the ones actually inserted to this
        instance's share of their day, and report in ``result.duplicates``
        each row refused because its dispatch_id is held by another row in
        its dedupe window (a row refused because it is there already, from
        a retried batch, is no duplicate)."""

    def _duplicates(
        self,
        refused: Sequence[JournalEntry],
        holders: dict[tuple[str, str], list[Holder]],
        result: WriteResult,
    ) -> None:
        """Fill ``result.duplicates`` from the refused entries and the rows
        found holding their ids, ``holders[(day, dispatch_id)]``."""
        me = self._me
        for entry in refused:
            found = holders.get((entry.day, entry.cost.dispatch_id), [])
            if any(h == (me, entry.seq, entry.day) for h in found):
                continue  # its own row, written by an earlier attempt
            if found:
                # Two holders can exist (the days before and after, which
                # are two days apart): the earlier one is the original.
                _, seq, day = min(found, key=lambda h: h[2])
                result.duplicates[entry.seq] = (seq, day)

    @property
    def _me(self) -> str:
        """This service's instance id in the shares and the journal."""
        return self.instance if self.shared and self.instance is not None else ""

    def _find(self, cur: Any, day: str, dispatch_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        p = self._P
        before, after = neighbours(day)
        found: dict[str, tuple[int, str]] = {}
        for dispatch_id in dispatch_ids:
            cur.execute(
                f"SELECT seq, day FROM budget_journal WHERE dispatch_id = {p}"
                f" AND day IN ({p}, {p}, {p}) ORDER BY day LIMIT 1",
                (dispatch_id, before, day, after),
            )
            row = cur.fetchone()
            if row is not None:
                found[dispatch_id] = (int(row[0]), str(row[1]))
        return found

    def _upsert_patch(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
        """The patch of ``snap.day`` as the sum of every share of that day.

        ``snap`` contributes this instance's cycle count (to its share), the
        cap and the alerts it has sent; spend, dispatches and seq come from
        the shares, exact, so a patch never counts a cost that the store
        refused as a duplicate, nor one it has not made durable.
        """
        self._share_cycles(cur, snap, stamp)
        self._lock_patch(cur, snap.day)
        shares: dict[str, tuple[Decimal, int, int]] = {}
        spend, dispatches, cycles = Decimal(0), 0, 0
        for name, share_spend, share_dispatches, share_cycles, share_seq in self._shares(
            cur, snap.day
        ):
            shares[name] = (share_spend, share_dispatches, share_seq)
            spend = add(spend, share_spend)
            dispatches += share_dispatches
            cycles += share_cycles
        sent = set(snap.alerts_sent) | self._sent(cur, snap.day)[0]
        total = Snapshot(
            day=snap.day,
            daily_spend=spend,
            daily_cap=snap.daily_cap,
            cycle_count=cycles,
            dispatches=dispatches,
            alerts_sent=tuple(sorted(sent)),
            seq=max((seq for _, _, seq in shares.values()), default=0),
            # Which instance's share is what, for `verify` (shared only).
            shares=shares if self.shared else None,
        )
        self._put_patch(cur, total, stamp)

    @abstractmethod
    def _share_cycles(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
        """Raise this instance's share's cycle count of ``snap.day`` to the
        snapshot's (creating the share row if needed)."""

    def _lock_patch(self, cur: Any, day: str) -> None:  # noqa: B027 - a hook, empty by default
        """Serialise patch writes of ``day`` (several writers only)."""

    def _shares(self, cur: Any, day: str) -> list[tuple[str, Decimal, int, int, int]]:
        """Every share of ``day``: (instance, spend, dispatches, cycles, seq)."""
        p = self._P
        cur.execute(
            f"SELECT instance, spend, dispatches, cycles, seq FROM budget_shares WHERE day = {p}",
            (day,),
        )
        return [
            (str(r[0]), Decimal(str(r[1])), int(r[2]), int(r[3]), int(r[4])) for r in cur.fetchall()
        ]

    def _put_patch(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
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
        return self._rows(cur)

    def _rows(self, cur: Any) -> list[JournalEntry]:
        """The journal entries of a query of :data:`JOURNAL_COLUMNS`."""
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
        """This service's share of ``day`` (its totals, exact), the journal
        tail after it (rows without their share: none, normally), sent
        alerts, the highest seq and, when shared, the others' totals: a few
        indexed reads, whatever the day's volume."""
        p = self._P
        cur.execute(
            "SELECT spend, dispatches, cycles, seq FROM budget_shares"
            f" WHERE day = {p} AND instance = {p}",
            (day, self._me),
        )
        row = cur.fetchone()
        own = None
        if row is not None:
            own = Snapshot(
                day=day,
                daily_spend=Decimal(str(row[0])),
                daily_cap=Decimal(0),  # not used: the cap comes from the configuration
                cycle_count=int(row[2]),
                dispatches=int(row[1]),
                alerts_sent=(),
                seq=int(row[3]),
            )
        entries = self._tail(cur, day, own.seq if own else -1)
        if entries and not self._read_only:
            # Rows written without their share (by hand, or by a version that
            # kept none): counted into it now, so that the share is the exact
            # sum of the rows again, for the patches and the nudge guard.
            stamp = self._time_param(datetime.now(UTC))
            self._add_to_share(cur, JournalBatch.sums(entries), stamp)
        sent, forecast_sent = self._sent(cur, day)
        max_seq = self._max_seq(cur)
        if own is not None:
            max_seq = max(max_seq, own.seq)
        return Restored(
            day=day,
            patch=own,
            entries=tuple(entries),
            alerts_sent=frozenset(sent),
            forecast_sent=forecast_sent,
            max_seq=max_seq,
            instance=self.instance if self.shared else None,
            others=self._others(cur, day) if self.shared else None,
        )

    @abstractmethod
    def _add_to_share(
        self, cur: Any, sums: dict[str, tuple[Decimal, int, int]], stamp: Any
    ) -> None:
        """Add ``sums`` (day -> spend, count, highest seq: see
        :meth:`JournalBatch.sums`) to this service's shares."""

    def _tail(self, cur: Any, day: str, after_seq: int) -> list[JournalEntry]:
        """This service's journal entries of ``day`` after ``after_seq``."""
        return self._entries(cur, day, after_seq)

    def _others(self, cur: Any, day: str) -> Others:
        """The other instances' totals (shared stores only)."""
        raise StoreError(f"{self.kind}: this store is not shared")

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

    __slots__ = ("count", "entries", "json")

    def __init__(self, json: str, entries: Sequence[JournalEntry]) -> None:
        self.json = json
        self.entries = entries
        self.count = len(entries)

    @classmethod
    def of(cls, entries: Sequence[JournalEntry]) -> JournalBatch:
        return cls(_journal_encoder.encode(entries).decode() if entries else "[]", entries)

    @staticmethod
    def sums(entries: Sequence[JournalEntry]) -> dict[str, tuple[Decimal, int, int]]:
        """Per day of ``entries``: exact spend, count and highest seq."""
        days: dict[str, list[JournalEntry]] = {}
        for entry in entries:
            days.setdefault(entry.day, []).append(entry)
        totals = {}
        # sum() in MONEY_CONTEXT: exact (Inexact traps), and a C loop.
        with localcontext(MONEY_CONTEXT):
            for day, group in days.items():
                spend = sum((e.cost.usd for e in group), Decimal(0))
                totals[day] = (spend, len(group), max(e.seq for e in group))
        return totals


def dumps(body: dict[str, Any]) -> str:
    """Compact JSON text of a row body."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True)
