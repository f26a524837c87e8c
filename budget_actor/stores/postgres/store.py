"""The PostgreSQL store: one instance's handle on a budget that instances share.

This class is the :class:`~budget_actor.stores.store.Store` interface and
little else; the SQL lives beside it, by concern:

* :mod:`.connection`: the connection, the instance lock, schema and migration;
* :mod:`.journal`: the journal with each instance's share and its dedupe
  keys, the lock that orders patches, the guarded nudge;
* :mod:`.shares`: the other instances' totals;
* :mod:`.admission`: admissions against the global cap;
* :mod:`.audit`: the share checks of ``verify``;
* :mod:`.history`: day totals and today's minutes for ``GET /history``.

psycopg's synchronous API is used (from worker threads): its async API is
asyncio-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ...core.audit import ShareCheck
from ...core.history import Curve
from ...core.records import Alert, JournalEntry, Others, Snapshot, WriteResult
from ...core.views import Admission
from ..store import JournalBatch, Store
from . import admission, audit, connection, history, journal, shares

# COPY costs three round trips where the row-by-row statement costs one: it
# pays from batches of about this many rows (a 1-row write took 0.9 ms
# against 0.5, 20 rows 1.1 against 0.8, 256 rows 4.5 against 6.0, on
# loopback here).
COPY_MIN_ROWS = 64
# A COPY that meets a row already held (a resend that left the ledger's
# cache, an id another instance counted) is rolled back and redone row by
# row, paying twice. Where that happens it tends to go on (a dispatcher
# resending a backlog, instances seeing the same ids), so the next this many
# batches go row by row straight away.
COPY_PAUSE_BATCHES = 16


class PostgresStore(Store):
    """PostgreSQL, shared by every instance that uses the same schema.

    Each instance journals its own costs under its instance id, keeps its
    share of each day in ``budget_shares`` in the same transaction, and reads
    the others' shares to see the global spend (see ``docs/scaling.md``). The
    budget patch is always the sum of all shares; a nudge row is written only
    if the shared spend in the store has reached its threshold.
    """

    kind = "postgresql"
    shared = True
    # Admission, the patch sum and the nudge guard each read in a statement
    # after taking a lock, and must see what committed before they got it:
    # a fresh snapshot per statement. A server whose default is REPEATABLE
    # READ would take the snapshot before the lock wait and let two
    # admissions miss each other's reservations.
    _BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"

    def __init__(self, url: str, instance: str | None = None) -> None:
        super().__init__()
        self.url = url
        self.location = url
        self.instance = instance if instance is not None else default_instance_id()
        # A duplicate of the connection's socket, for interrupt(): ours, so it
        # can never name another file after psycopg closes its own.
        self._socket: socket.socket | None = None
        # interrupt() runs in the event loop's thread while the call it ends
        # may close that socket in a worker thread.
        self._socket_lock = threading.Lock()
        # Batches left to write row by row after a COPY met a held row.
        self._copy_paused = 0

    # -- capabilities ----------------------------------------------------------

    def shared_budget(self) -> PostgresStore:
        """The coordinator's own connection (:meth:`companion`): its sync
        queries and admissions never wait behind the persister's writes."""
        return self.companion()

    def companion(self) -> PostgresStore:
        """Another connection for this instance, for a child that must not
        wait behind the persister (the alert webhooks). It takes no instance
        lock (the service that made it holds that); it may write."""
        other = PostgresStore(self.url, self.instance)
        other._read_only = True  # here: "take no instance lock"
        return other

    def spill_path(self) -> Path:
        """``budget-<hash>.spill`` in the working directory, the hash of the
        host, port, database and schema, so that services on different
        databases never share one."""
        # Host, port and database only: rotating a password or changing a
        # connection option must not orphan a spill file of acknowledged costs.
        parts = urlsplit(self.url)
        try:
            host = f"{parts.hostname}:{parts.port}"
        except ValueError:
            # Several hosts ("h1:5432,h2:5432"), which urlsplit cannot
            # parse; single-host URLs keep the name earlier versions gave.
            host = parts.netloc.rpartition("@")[2].lower()
        where = f"{host}{parts.path}?{_search_path(parts.query)}"
        digest = hashlib.sha256(where.encode()).hexdigest()[:12]
        return Path(f"budget-{digest}.spill")

    def others(self, day: str) -> Others:
        """The other instances' durable totals of ``day``. Raises StoreError."""
        result: Others = self._run(lambda cur: shares.others(cur, day, self.instance))
        return result

    def admit(
        self, day: str, dispatch_id: str, estimate: Decimal, cap: Decimal, ttl_s: float
    ) -> tuple[Admission, Others]:
        """Reserve ``estimate`` against the global cap if it fits (the rule is
        :func:`budget_actor.core.admission.decide`, as for one instance
        alone), and return the answer with the others' fresh totals, read in
        the same transaction. Raises :class:`StoreError`."""

        def work(cur: Any) -> tuple[Admission, Others]:
            answer = admission.admit(cur, day, dispatch_id, estimate, cap, ttl_s, self.instance)
            return answer, shares.others(cur, day, self.instance)

        result: tuple[Admission, Others] = self._run(work)
        return result

    def share_checks(self, day: str, patch: Snapshot | None) -> list[ShareCheck] | None:
        result: list[ShareCheck] | None = self._run(lambda cur: audit.share_checks(cur, day, patch))
        return result

    # -- the Store's hooks -----------------------------------------------------

    def interrupt(self) -> None:
        """Shut the connection's socket down under the thread that waits on it.

        A server (or a network path) that accepts a connection and then never
        answers is not caught by TCP timeouts, since the kernel at the other
        end keeps acknowledging; libpq would wait forever. After shutdown()
        the waiting call fails at once, and the next call reconnects.
        """
        with self._socket_lock:
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)

    def _drop(self) -> None:
        try:
            super()._drop()
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        with self._socket_lock:
            sock, self._socket = self._socket, None
            if sock is not None:
                sock.close()

    def _connect(self) -> Any:
        conn = connection.connect(self.url, instance=self.instance, read_only=self._read_only)
        try:
            watch = socket.socket(fileno=os.dup(conn.pgconn.socket))
        except BaseException:
            conn.close()
            raise
        with self._socket_lock:
            self._socket = watch
        return conn

    def _schema(self) -> Sequence[tuple[str, str]]:
        return connection.SCHEMA

    def _conflict(self, exc: Exception) -> bool:
        return connection.is_conflict(exc)

    def _create(self, cur: Any) -> None:
        connection.lock_schema(cur)
        super()._create(cur)
        connection.migrate(cur)
        self._create_indexes(cur)

    _DAY_NUMBER = journal.DAY_NUMBER

    def _indexes(self) -> list[tuple[str, str, bool]]:
        # Restore reads this instance's rows after its share's seq (none,
        # normally), and verify sums each instance's rows up to a seq: both
        # a short range of this index, not a scan of the day.
        return [*super()._indexes(), ("budget_journal_tail", "day, instance, seq", False)]

    def _index_exists(self, cur: Any, name: str) -> bool:
        return connection.table_exists(cur, name)

    def _unique_violation(self, exc: Exception) -> bool:
        return connection.is_unique_violation(exc)

    def _table_exists(self, cur: Any, table: str) -> bool:
        return connection.table_exists(cur, table)

    def _json_marker(self) -> str:
        return "%s::jsonb"

    def write(
        self,
        entries: Sequence[JournalEntry] | JournalBatch,
        patches: Sequence[Snapshot],
        nudges: Sequence[Alert],
        now: datetime,
    ) -> WriteResult:
        """As :meth:`Store.write`. A batch of journal entries alone (the
        usual group commit) goes in a transaction of its own, through COPY
        when no row is refused (:func:`.journal.insert_copied`), otherwise
        in one round trip row by row (:func:`.journal.insert_alone`); the
        rows refused are looked up after the commit, when their holders are
        committed too."""
        if patches or nudges:
            return super().write(entries, patches, nudges, now)
        batch = entries if isinstance(entries, JournalBatch) else JournalBatch.of(entries)
        result = WriteResult()
        if not batch.count:
            return result
        missing: set[int] = self._run(lambda cur: self._insert_alone(cur, batch), framed=False)
        if missing:
            refused, holders = self._run(lambda cur: journal.holders(cur, batch, missing))
            self._duplicates(refused, holders, result)
        return result

    def _insert_alone(self, cur: Any, batch: JournalBatch) -> set[int]:
        """Write the batch in a transaction of its own: through COPY when it
        is large enough to gain from it (see :data:`COPY_MIN_ROWS`) and no
        row of a recent batch was refused, otherwise (and when COPY finds a
        row already held) row by row, in one round trip; the seqs of the rows
        refused."""
        if batch.count >= COPY_MIN_ROWS and self._copy_paused == 0 and self.instance is not None:
            if journal.insert_copied(cur, batch, self.instance, self._BEGIN):
                return set()
            self._copy_paused = COPY_PAUSE_BATCHES
        elif self._copy_paused:
            self._copy_paused -= 1
        return journal.insert_alone(cur, batch, self.instance, self._BEGIN)

    def _insert_journal(
        self, cur: Any, batch: JournalBatch, result: WriteResult, stamp: Any
    ) -> None:
        refused, holders = journal.insert(cur, batch, self.instance)
        if refused:
            self._duplicates(refused, holders, result)

    def _add_to_share(
        self, cur: Any, sums: dict[str, tuple[Decimal, int, int]], stamp: Any
    ) -> None:
        journal.add_to_share(cur, sums, self.instance)

    def _share_cycles(self, cur: Any, snap: Snapshot, stamp: Any) -> None:
        journal.share_cycles(cur, snap, self.instance)

    def _lock_patch(self, cur: Any, day: str) -> None:
        journal.lock_patch(cur, day)

    def _insert_nudge(self, cur: Any, alert: Alert, stamp: Any) -> str:
        return journal.insert_nudge(cur, alert, self._json_param(alert.body()), stamp)

    def _tail(self, cur: Any, day: str, after_seq: int) -> list[JournalEntry]:
        # Only this instance's rows (the others' are in their shares), by
        # the (day, instance, seq) index.
        return self._entries(cur, day, after_seq, self.instance)

    def _others(self, cur: Any, day: str) -> Others:
        return shares.others(cur, day, self.instance)

    def _max_seq(self, cur: Any) -> int:
        return journal.max_seq(cur)

    def _journal_sums(
        self, cur: Any, first: str, last: str, patches: dict[str, Snapshot]
    ) -> dict[str, tuple[Decimal, int]]:
        return history.journal_sums(cur, first, last)

    def _fold_curve(self, cur: Any, curve: Curve) -> None:
        history.fold_curve(cur, curve)

    def _time_param(self, moment: datetime) -> Any:
        return moment

    def _read_body(self, value: Any) -> dict[str, Any]:
        body: dict[str, Any] = value
        return body

    def _read_time(self, value: Any) -> datetime:
        moment: datetime = value
        return moment


def _search_path(query: str) -> str:
    # The schema is part of where the costs belong (one service per schema).
    options = parse_qs(query).get("options", [""])[0]
    return options if "search_path" in options else ""


def default_instance_id() -> str:
    """A random id (``auto-`` and 16 hex digits): unique among live processes
    (64 random bits), and a restarted process gets a new one (its
    predecessor's share stays, counted once). Random rather than host name
    and process id, because the id is shown to anyone who can read
    ``/health``, and a host name tells an attacker where the service runs."""
    return f"auto-{secrets.token_hex(8)}"
