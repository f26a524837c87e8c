"""SQLite store: the embedded default, so ``serve`` and ``demo`` need nothing installed."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ..core.records import iso_utc
from .store import Store, StoreError

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
