"""The spill file: where acknowledged costs wait while the store is unreachable.

An append-only file of JSON lines, one :class:`~budget_actor.core.records.JournalEntry`
each (its :class:`~budget_actor.core.cost.Cost` nested as ``cost``; lines
written flat by earlier versions are read too). The persister appends a whole
batch with one write and one ``fsync`` (group commit), and only then
acknowledges the batch. When the store is back, the persister writes the
file's entries to the store in one transaction and then empties the file.
Because journal inserts ignore rows that already exist, a crash between the
two steps only makes the next drain re-write harmlessly.

A crash in the middle of an append can leave a torn last line. Its entries
were never acknowledged (the ``fsync`` had not returned), so :meth:`SpillFile.open`
cuts the file back to its last complete line.

A spill file belongs to one live process at a time: :meth:`SpillFile.lock`
takes an exclusive ``flock`` that the kernel releases however the process
dies. Instances sharing a PostgreSQL budget from one working directory each
claim a slot of their own (:func:`claim`), and a starting instance drains
every slot that no live process holds, so a crashed instance's acknowledged
costs reach the store even if it never comes back under the same name.

Every method blocks: call them from the persister's worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ..core.records import JournalEntry

log = logging.getLogger("budget_actor.spill")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JournalEntry)
# A journal entry's fields besides its cost.
_OWN_FIELDS = tuple(f.name for f in msgspec.structs.fields(JournalEntry) if f.name != "cost")


def _decode(line: bytes) -> JournalEntry:
    """One line; raises ``msgspec.DecodeError`` for a damaged one."""
    try:
        return _decoder.decode(line)
    except msgspec.ValidationError:
        # Versions before the Cost value wrote the entry flat: its own fields
        # beside the cost's. An upgrade must still drain what they spilled.
        fields = msgspec.json.decode(line)
        if not isinstance(fields, dict) or "cost" in fields:
            raise
        own = {name: fields.pop(name, None) for name in _OWN_FIELDS}
        return msgspec.convert({**own, "cost": fields}, JournalEntry)


class SpillFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: Entries in the file (waiting for the store).
        self.count = 0
        self._lock_fd: int | None = None

    def lock(self) -> bool:
        """Take the file for this process; False if a live process holds it."""
        if self._lock_fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def open(self) -> None:
        """Create the file if needed, drop a torn tail, count the entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A file just created (here or by lock()) needs its directory entry
        # synced too; one fsync at startup is cheap enough to always do it.
        existed = False
        with open(self.path, "a+b") as f:
            f.seek(0)
            data = f.read()
            good = data.rfind(b"\n") + 1
            if good != len(data):
                f.truncate(good)
                _fsync(f.fileno())
        if not existed:
            # The new file's name must survive a crash too.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                _fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.count = len(self.read())

    def append(self, entries: Sequence[JournalEntry]) -> None:
        """Append ``entries`` durably (one write, one fsync)."""
        if not entries:
            return
        payload = b"".join(_encoder.encode(e) + b"\n" for e in entries)
        with open(self.path, "ab") as f:
            size = f.tell()
            try:
                f.write(payload)
                f.flush()
                _fsync(f.fileno())
            except BaseException:
                # A partial write (a full disk) must not stay in the file: a
                # retry would append after it and bury a torn line mid-file.
                f.truncate(size)
                raise
        self.count += len(entries)

    def read(self) -> list[JournalEntry]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                entries.append(_decode(line))
            except msgspec.DecodeError:
                # Only an append whose fsync never returned can leave this,
                # and such an append was never acknowledged.
                log.error("spill file %s: skipping a damaged line: %r", self.path, line[:80])
        return entries

    def clear(self) -> None:
        """Empty the file, durably; call only once its entries are in the store."""
        with open(self.path, "r+b") as f:
            f.truncate(0)
            _fsync(f.fileno())
        self.count = 0


# Instances sharing one working directory and database; more than this many
# at once is a deployment that should give each its own --spill path.
MAX_SLOTS = 64


def slot(base: Path, n: int) -> Path:
    """The ``n``-th spill file of a base path (1 is the base itself)."""
    return base if n == 1 else base.with_name(f"{base.stem}-{n}{base.suffix}")


def claim(base: Path) -> tuple[SpillFile, list[SpillFile]]:
    """This process's spill file: the first slot of ``base`` that no live
    process holds, locked; and every other existing slot that no live process
    holds (left by processes that died), locked too, to be drained and
    released. Raises ``OSError`` when every slot is taken."""
    mine: SpillFile | None = None
    orphans: list[SpillFile] = []
    for n in range(1, MAX_SLOTS + 1):
        path = slot(base, n)
        if mine is not None and not path.exists():
            continue
        candidate = SpillFile(path)
        if not candidate.lock():
            continue
        if mine is None:
            mine = candidate
        else:
            orphans.append(candidate)
    if mine is None:
        raise OSError(
            errno.EBUSY, f"all {MAX_SLOTS} spill files are in use by live processes", str(base)
        )
    return mine, orphans


def _fsync(fd: int) -> None:
    os.fsync(fd)
