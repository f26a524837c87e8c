"""SQLite store: the embedded default, so ``serve`` and ``demo`` need nothing installed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from ..core.dedupe import neighbours
from ..core.money import MONEY_CONTEXT, add
from ..core.records import (
    NUDGE_TYPE,
    PATCH_TYPE,
    Alert,
    JournalEntry,
    Snapshot,
    WriteResult,
    iso_utc,
)
from .store import JOURNAL_COLUMNS, Holder, JournalBatch, Store, StoreError

_SCHEMA = (
    (
        "quilt_patches",
        "CREATE TABLE IF NOT EXISTS quilt_patches (type TEXT NOT NULL, name TEXT NOT NULL,"
        " body TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,"
        " PRIMARY KEY (type, name))",
    ),
    (
        "budget_journal",
        "CREATE TABLE IF NOT EXISTS budget_journal (seq INTEGER PRIMARY KEY, day TEXT NOT NULL,"
        " dispatch_id TEXT NOT NULL, usd TEXT NOT NULL, recorded_at TEXT NOT NULL, model TEXT,"
        " agent TEXT, input_tokens INTEGER, output_tokens INTEGER, UNIQUE (day, dispatch_id))",
    ),
    (
        # The day's totals, the exact sum of its journal rows, kept in the
        # same transaction (the one instance is ''): restore reads this row,
        # not the day's journal, and every patch is made from it. Amounts are
        # decimal text, summed in Python: SQLite's own sum() is a float.
        "budget_shares",
        "CREATE TABLE IF NOT EXISTS budget_shares (day TEXT NOT NULL, instance TEXT NOT NULL,"
        " spend TEXT NOT NULL DEFAULT '0', dispatches INTEGER NOT NULL DEFAULT 0,"
        " cycles INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0,"
        " updated_at TEXT, PRIMARY KEY (day, instance))",
    ),
    (
        # Alert webhook deliveries (see Store: alert webhooks).
        "budget_webhooks",
        "CREATE TABLE IF NOT EXISTS budget_webhooks (target TEXT NOT NULL, name TEXT NOT NULL,"
        " body TEXT NOT NULL, created_at TEXT NOT NULL, next_at TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, claimed_by TEXT, delivered_at TEXT,"
        " last_error TEXT, PRIMARY KEY (target, name))",
    ),
)


def _private(path: str, flags: int) -> int:
    """Open (creating it readable by this user only if missing): the
    journal is in clear in these files."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


class SqliteStore(Store):
    """A SQLite file in WAL mode with ``synchronous=FULL``.

    FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power
    loss, and a commit here is an acknowledgement to a dispatcher. Group commit
    in the persister pays for the extra fsync.
    """

    kind = "sqlite"
    _P = "?"
    # The webhook claim reads the deliveries, then updates them. In WAL mode
    # a transaction that has read cannot start writing once another
    # connection (the persister) has committed since: SQLite refuses at once,
    # without waiting. Taking the write lock first makes it wait its turn.
    _BEGIN_CLAIM = "BEGIN IMMEDIATE"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.location = path
        self._lock: IO[bytes] | None = None

    def open(self, *, create: bool = True) -> None:
        """Open for writing (``create=True``): also take the file's instance lock.

        SQLite serves one instance: two services appending to one journal
        with their own sequence numbers would corrupt each other's days. An
        exclusive ``flock`` on ``PATH.lock``, held until :meth:`close`, refuses
        the second with a clear :class:`StoreError`; the kernel drops it if
        the process dies, so a crash never leaves a stale lock. Read-only
        opens (audits, reports) do not lock.
        """
        if create and self._lock is None:
            lock_path = self.path + ".lock"
            try:
                handle = open(lock_path, "ab", opener=_private)
                # Created here, not by SQLite, so that it is private (0600)
                # whatever the process's umask; SQLite gives its -wal and
                # -shm files the database file's permissions.
                os.close(_private(self.path, os.O_WRONLY | os.O_APPEND))
            except OSError as exc:
                where = exc.filename or lock_path
                raise StoreError(f"sqlite: cannot create {where}: {exc.strerror}") from exc
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise StoreError(
                    f"sqlite: {self.path} is in use by another budget-actor ({lock_path} is"
                    " locked); one service per SQLite file"
                ) from None
            self._lock = handle
        try:
            super().open(create=create)
        except StoreError:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def spill_path(self) -> Path:
        """Beside the database file: ``budget.db`` -> ``budget.db.spill``."""
        return Path(self.path + ".spill")

    def companion(self) -> SqliteStore:
        """A second connection to the same file, for a child that must not
        wait behind the persister's writes (it takes no instance lock: the
        service that made it holds that)."""
        return SqliteStore(self.path)

    def interrupt(self) -> None:
        # sqlite3's interrupt() is safe from any thread; it ends a statement
        # at its next step (not a system call that hangs in the kernel).
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()

    def _connect(self) -> Any:
        # check_same_thread=False: trio may run successive calls on different
        # worker threads; the persister's CapacityLimiter(1) serialises them.
        target = f"file:{self.path}?mode=ro" if self._read_only else self.path
        conn = sqlite3.connect(
            target,
            uri=self._read_only,
            isolation_level=None,
            check_same_thread=False,
            timeout=5,
        )
        if self._read_only:
            return conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _schema(self) -> Sequence[tuple[str, str]]:
        return _SCHEMA

    def _create(self, cur: Any) -> None:
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'budget_shares'")
        had_shares = cur.fetchone() is not None
        super()._create(cur)
        if not had_shares:
            self._migrate(cur)
        self._create_indexes(cur)

    def _migrate(self, cur: Any) -> None:
        """A journal from before the shares: sum each day's rows into its
        share (once, at the first start of this version), with the cycle
        count of the day's patch."""
        totals: dict[str, tuple[Decimal, int, int]] = {}
        cur.execute("SELECT day, usd, seq FROM budget_journal ORDER BY day")
        while rows := cur.fetchmany(10_000):
            for day, usd, seq in rows:
                spend, count, top = totals.get(day, (Decimal(0), 0, 0))
                totals[day] = (add(spend, Decimal(usd)), count + 1, max(top, seq))
        for day, (spend, count, top) in totals.items():
            cur.execute(
                "SELECT body FROM quilt_patches WHERE type = ? AND name = ?",
                (PATCH_TYPE, f"budget_{day}"),
            )
            row = cur.fetchone()
            cycles = Snapshot.from_body(json.loads(row[0])).cycle_count if row else 0
            cur.execute(
                "INSERT INTO budget_shares (day, instance, spend, dispatches, cycles, seq)"
                " VALUES (?, '', ?, ?, ?, ?)",
                (day, str(spend), count, cycles, top),
            )

    # The day number (see budget_actor.core.dedupe.day_number): julianday()
    # of a date is N.5, the same N for every moment of it; deterministic, so
    # allowed in an index.
    _DAY_NUMBER = "CAST(julianday(day) AS INTEGER)"

    def _index_exists(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
        return cur.fetchone() is not None

    def _unique_violation(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _insert_journal(
        self, cur: Any, batch: JournalBatch, result: WriteResult, stamp: Any
    ) -> None:
        insert = self._journal_insert()
        # Almost always every row is new: one statement, and the share grows
        # by the batch's sums. Otherwise (a retried batch, or a duplicate the
        # unique keys refused) the statement runs again, telling which rows
        # it inserted, so that only those are added to the share.
        cur.execute("SAVEPOINT journal")
        cur.execute(insert, (batch.json,))
        if cur.rowcount == batch.count:
            inserted: Sequence[JournalEntry] = batch.entries
        else:
            cur.execute("ROLLBACK TO SAVEPOINT journal")
            cur.execute(insert + " RETURNING seq", (batch.json,))
            new = {int(r[0]) for r in cur.fetchall()}
            inserted = [e for e in batch.entries if e.seq in new]
            refused = [e for e in batch.entries if e.seq not in new]
            self._duplicates(refused, self._holders(cur, refused), result)
        cur.execute("RELEASE SAVEPOINT journal")
        self._add_to_share(cur, JournalBatch.sums(inserted), stamp)

    def _add_to_share(
        self, cur: Any, sums: dict[str, tuple[Decimal, int, int]], stamp: Any
    ) -> None:
        for day, (spend, count, top) in sums.items():
            cur.execute("SELECT spend FROM budget_shares WHERE day = ? AND instance = ''", (day,))
            row = cur.fetchone()
            total = add(Decimal(row[0]), spend) if row else spend
            cur.execute(
                "INSERT INTO budget_shares (day, instance, spend, dispatches, seq, updated_at)"
                " VALUES (?, '', ?, ?, ?, ?) ON CONFLICT (day, instance) DO UPDATE SET"
                " spend = excluded.spend, dispatches = dispatches + excluded.dispatches,"
                " seq = max(seq, excluded.seq), updated_at = excluded.updated_at",
                (day, str(total), count, top, stamp),
            )

    def _holders(
        self, cur: Any, refused: Sequence[JournalEntry]
    ) -> dict[tuple[str, str], list[Holder]]:
        holders: dict[tuple[str, str], list[Holder]] = {}
        for entry in refused:
            before, after = neighbours(entry.day)
            dispatch_id = entry.cost.dispatch_id
            cur.execute(
                "SELECT seq, day FROM budget_journal WHERE dispatch_id = ? AND day IN (?, ?, ?)",
                (dispatch_id, before, entry.day, after),
            )
            holders[(entry.day, dispatch_id)] = [
                ("", int(seq), str(day)) for seq, day in cur.fetchall()
            ]
        return holders

    def _share_cycles(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
        cur.execute(
            "INSERT INTO budget_shares (day, instance, cycles, updated_at) VALUES (?, '', ?, ?)"
            " ON CONFLICT (day, instance) DO UPDATE SET cycles = max(cycles, excluded.cycles)",
            (snap.day, snap.cycle_count, stamp),
        )

    def _insert_nudge(self, cur: Any, alert: Alert, stamp: Any) -> str:
        """Insert the nudge row, but a threshold's only if the day's spend in
        the store has reached it: the ledger's figure can run ahead by a
        resent cost that the store then refuses as a duplicate."""
        if alert.kind == "threshold":
            floor = MONEY_CONTEXT.multiply(alert.threshold, alert.daily_cap)
            spend = Decimal(0)
            for _, share_spend, _, _, _ in self._shares(cur, alert.day):
                spend = add(spend, share_spend)
            if spend < floor:
                cur.execute(
                    "SELECT 1 FROM quilt_patches WHERE type = ? AND name = ?",
                    (NUDGE_TYPE, alert.nudge_name),
                )
                return "exists" if cur.fetchone() is not None else "premature"
        return super()._insert_nudge(cur, alert, stamp)

    def _tail(self, cur: Any, day: str, after_seq: int) -> list[JournalEntry]:
        # By seq, the key ("+day" keeps SQLite off the (day, dispatch_id)
        # index, which would read the whole day): a short range at the end.
        cur.execute(
            f"SELECT {JOURNAL_COLUMNS} FROM budget_journal WHERE seq > ? AND +day = ? ORDER BY seq",
            (after_seq, day),
        )
        return self._rows(cur)

    def _journal_insert(self) -> str:
        # "WHERE true" keeps SQLite from reading ON CONFLICT as a join clause.
        return (
            "INSERT INTO budget_journal (seq, day, recorded_at, dispatch_id, usd, model,"
            " input_tokens, output_tokens, agent) SELECT json_extract(value, '$.seq'),"
            " json_extract(value, '$.day'), json_extract(value, '$.at'),"
            " json_extract(value, '$.cost.dispatch_id'), json_extract(value, '$.cost.usd'),"
            " json_extract(value, '$.cost.model'), json_extract(value, '$.cost.input_tokens'),"
            " json_extract(value, '$.cost.output_tokens'), json_extract(value, '$.cost.agent')"
            " FROM json_each(?) WHERE true ON CONFLICT DO NOTHING"
        )

    def _time_param(self, moment: datetime) -> Any:
        return iso_utc(moment)

    def _read_body(self, value: Any) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(value)
        return body

    def _read_time(self, value: Any) -> datetime:
        return datetime.fromisoformat(str(value))
