"""The outbox: a local SQLite file of costs not yet acknowledged by the service.

A cost written here (committed with ``synchronous=FULL``, so fsync'd) is safe
from a crash of this process: the next client opened on the same file sends
it. A row is deleted once the service has acknowledged its cost. Costs that
the service refused for good move to the ``refused`` table, for a person to
look at; nothing is ever deleted unacknowledged.

Every method is synchronous and blocking: the client calls them from one
worker thread at a time. The file is checked before it is used: a file that
is not SQLite, not an outbox (another program's database), written by a newer
version or damaged is refused with :class:`OutboxError` and left untouched,
since it may hold costs that a caller was told were safe. One process at a
time may hold an outbox (an exclusive ``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from .errors import OutboxError

# Marks the file as ours in the SQLite header (PRAGMA application_id): "BAOX".
APPLICATION_ID = 0x42414F58
# The schema version this code writes; a newer one is refused, not guessed at.
SCHEMA_VERSION = 1
# How long a write waits for SQLite's own lock (only this process uses the
# file, so this is never met in practice).
BUSY_TIMEOUT_MS = 5000

_SCHEMA = (
    "CREATE TABLE costs (n INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE refused (n INTEGER PRIMARY KEY, body TEXT NOT NULL,"
    " code TEXT NOT NULL, detail TEXT NOT NULL, refused_at TEXT NOT NULL)",
)


class Outbox:
    """An open outbox file; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def open(self) -> list[tuple[int, bytes]]:
        """Check and open the file (creating it if missing); return every
        waiting cost as ``(row number, item JSON)``, oldest first.

        Raises :class:`OutboxError` (the file untouched) if it is in use by
        another process, is not an outbox, or is damaged.
        """
        # In WAL mode a young database may live wholly in its -wal file.
        existed = _nonempty(self.path) or _nonempty(Path(f"{self.path}-wal"))
        self._lock()
        try:
            db = self._connect()
            try:
                if existed:
                    self._check(db)
                self._prepare(db)
                rows = db.execute("SELECT n, body FROM costs ORDER BY n").fetchall()
            except BaseException:
                db.close()
                raise
        except BaseException:
            self._unlock()
            raise
        self._db = db
        if not existed:
            _sync_directory(self.path.parent)
        return [(n, body.encode()) for n, body in rows]

    def write(
        self,
        add: Sequence[bytes],
        remove: Sequence[int] = (),
        refuse: Sequence[tuple[int, bytes, str, str]] = (),
    ) -> list[int]:
        """In one fsync'd transaction: append ``add`` (item JSON, in order),
        delete the acknowledged rows ``remove``, and move the rows ``refuse``
        (row, body, code, detail) to the refused table. Returns the new rows'
        numbers, in order. Raises :class:`OutboxError` if the write fails
        (then nothing of it happened)."""
        db = self._require()
        try:
            with _transaction(db):
                numbers = []
                for body in add:
                    cursor = db.execute("INSERT INTO costs (body) VALUES (?)", (body.decode(),))
                    assert cursor.lastrowid is not None
                    numbers.append(cursor.lastrowid)
                if remove:
                    db.executemany("DELETE FROM costs WHERE n = ?", [(n,) for n in remove])
                if refuse:
                    now = datetime.now(UTC).isoformat()
                    db.executemany(
                        "INSERT OR REPLACE INTO refused (n, body, code, detail, refused_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        [(n, body.decode(), code, detail, now) for n, body, code, detail in refuse],
                    )
                    db.executemany("DELETE FROM costs WHERE n = ?", [(r[0],) for r in refuse])
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot write the outbox {self.path}: {exc}") from exc
        return numbers

    def count(self) -> int:
        """Costs waiting in the file."""
        row = self._require().execute("SELECT count(*) FROM costs").fetchone()
        return int(row[0])

    def refused(self) -> list[tuple[bytes, str, str]]:
        """Every cost the service refused: ``(item JSON, code, detail)``."""
        rows = self._require().execute("SELECT body, code, detail FROM refused ORDER BY n")
        return [(body.encode(), code, detail) for body, code, detail in rows.fetchall()]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._unlock()

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"the outbox {self.path} is not open")
        return self._db

    def _lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxError(
                f"the outbox {self.path} is in use by another process;"
                " two clients must not share one outbox"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc
        return db  # autocommit; _transaction() makes the transactions

    def _check(self, db: sqlite3.Connection) -> None:
        """Refuse, untouched, anything but an intact outbox of ours."""
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                name
                for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                ).fetchall()
            }
        except sqlite3.DatabaseError as exc:
            raise OutboxError(
                f"{self.path} is not a budget_actor outbox (not an SQLite database: {exc});"
                " refusing to use it, and leaving it as it is"
            ) from None
        if app == 0 and not tables and version == 0:
            return  # an empty database (a first open that died early): adopt it
        if app != APPLICATION_ID:
            raise OutboxError(
                f"{self.path} is an SQLite database of another program, not a budget_actor"
                " outbox; refusing to use it, and leaving it as it is"
            )
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"the outbox {self.path} was written by a newer budget_actor"
                f" (schema {version}); upgrade this one"
            )
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems != ["ok"] or not {"costs", "refused"} <= tables:
            shown = "; ".join(problems[:3]) if problems != ["ok"] else "tables missing"
            raise OutboxError(
                f"the outbox {self.path} is damaged ({shown}); it may hold costs that were"
                " never acknowledged, so it is left as it is: move it aside to start afresh"
            )

    def _prepare(self, db: sqlite3.Connection) -> None:
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            # FULL: every commit is fsync'd before it returns (WAL mode's
            # default, NORMAL, may lose the last commits on power loss).
            db.execute("PRAGMA synchronous = FULL")
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                with _transaction(db):
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot prepare the outbox {self.path}: {exc}") from exc


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT (fsync'd), or ROLLBACK on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    try:
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _sync_directory(directory: Path) -> None:
    # A new file's directory entry must be durable too, or a crash can lose
    # the whole file with the costs in it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
