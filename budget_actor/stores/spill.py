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

The file is trusted with acknowledged money, so it is opened with care
(:func:`open_private`): never through a symbolic link, and only if it is a
regular file of this user with mode 0600 and one link; anything else raises
:class:`UnsafeFile` and the service does not start. Every I/O goes through
the descriptor opened (and locked) then, never through the path again. Each
line read is checked like wire input (:func:`budget_actor.core.cost.make_cost`
and the entry's own fields); a line that fails is not counted but set aside,
as it was, in the quarantine file beside it (``PATH.quarantine``) when the
spill file is emptied, and only its line number and the field at fault are
logged, never its content.

Every method blocks: call them from the persister's worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path

import msgspec

from ..core.cost import InvalidCost, validate
from ..core.money import DEFAULT_MAX_COST
from ..core.records import JournalEntry
from .store import StoreError

log = logging.getLogger("budget_actor.spill")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JournalEntry)
# A journal entry's fields besides its cost.
_OWN_FIELDS = tuple(f.name for f in msgspec.structs.fields(JournalEntry) if f.name != "cost")
# The only permissions a spill or quarantine file may have: it holds the
# journal in clear, and what it holds is counted as money at the next start.
PRIVATE_MODE = 0o600
# Bytes read per call when loading a file (a spill file holds at most an
# outage's worth of costs, a few hundred bytes each).
_READ_CHUNK = 1 << 20


class UnsafeFile(StoreError):
    """A spill or quarantine file that is a symbolic link, not a regular file,
    not this user's, not mode 0600, or hard-linked elsewhere: refused, and the
    service does not start (``serve`` exits 2 with this message)."""


def open_private(path: Path, *, create: bool) -> int:
    """A read-write descriptor on ``path``, created 0600 if ``create``.

    Never follows a symbolic link (``O_NOFOLLOW``); raises :class:`UnsafeFile`
    for anything but a regular file owned by this user with mode 0600 and a
    single link, ``FileNotFoundError`` if it is missing and not ``create``,
    and ``OSError`` for other failures.
    """
    # O_NONBLOCK: a FIFO planted at the path must not hang the open; it is
    # refused below like any other non-regular file.
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | (os.O_CREAT if create else 0), PRIVATE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    try:
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        elif info.st_uid != os.geteuid():
            problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
        elif stat.S_IMODE(info.st_mode) != PRIVATE_MODE:
            problem = (
                f"has mode {stat.S_IMODE(info.st_mode):04o}, not 0600"
                " (if it is really this service's, chmod 600 it)"
            )
        elif info.st_nlink != 1:
            problem = f"has {info.st_nlink} hard links"
        if problem is not None:
            raise UnsafeFile(f"{path} {problem}; refusing to use it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


# The largest amount a spilled cost may hold. No single LLM dispatch costs a
# trillion dollars, so a line above it was never acknowledged by any
# configuration; below it, the line passed some --max-cost when it was acked.
DRAIN_CEILING = Decimal(10) ** 12


def _check(entry: JournalEntry, max_cost: Decimal) -> JournalEntry:
    """The entry if it could have come from this service; raises ValueError
    naming the field at fault (never its value)."""
    cost = entry.cost
    try:
        checked = validate(cost, max_cost=max_cost)
    except InvalidCost as exc:
        raise ValueError(exc.detail.split(":", 1)[0].split(" ", 1)[0]) from None
    if entry.seq < 1:
        raise ValueError("`seq`")
    try:
        if len(entry.day) != 10 or date.fromisoformat(entry.day).isoformat() != entry.day:
            raise ValueError
    except ValueError:
        raise ValueError("`day`") from None
    if entry.at.tzinfo is None:
        raise ValueError("`at`")
    return entry if checked == cost else msgspec.structs.replace(entry, cost=checked)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Quarantine:
    """Where lines of a spill file that are not valid entries are set aside,
    byte for byte, for an operator to look at: ``SPILL.quarantine``, created
    0600 when first needed. ``count`` is the lines it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def check(self) -> None:
        """Refuse an unsafe existing file (:class:`UnsafeFile`); count its lines."""
        try:
            fd = open_private(self.path, create=False)
        except FileNotFoundError:
            self.count = 0
            return
        try:
            self.count = _read_all(fd).count(b"\n")
        finally:
            os.close(fd)

    def add(self, lines: Sequence[bytes]) -> None:
        """Append ``lines`` durably (one write, one fsync)."""
        if not lines:
            return
        fd = open_private(self.path, create=True)
        try:
            os.lseek(fd, 0, os.SEEK_END)
            _write_all(fd, b"".join(line + b"\n" for line in lines))
            _fsync(fd)
        finally:
            os.close(fd)
        self.count += len(lines)


class SpillFile:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_cost: Decimal = DEFAULT_MAX_COST,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.path = Path(path)
        #: Entries in the file (waiting for the store).
        self.count = 0
        #: Where invalid lines go; shared with the orphans this one drains.
        self.quarantine = quarantine or Quarantine(
            self.path.with_name(self.path.name + ".quarantine")
        )
        # A spilled cost was acknowledged under the --max-cost in force then,
        # which may have been higher than today's: judged by today's, an
        # acknowledged cost would be set aside and lost from the spend.
        self._max_cost = max(max_cost, DRAIN_CEILING)
        self._fd: int | None = None
        self._locked = False
        # Invalid lines seen by the last read(), set aside by clear().
        self._invalid: list[bytes] = []
        # The file's size after the last complete append (None: not known
        # yet). Anything beyond it is the tail of an append that failed and
        # could not be cut off then; the next append cuts it first.
        self._size: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = open_private(self.path, create=True)
        return self._fd

    def lock(self) -> bool:
        """Take the file for this process; False if a live process holds it.

        Raises :class:`UnsafeFile` if it (or its quarantine file) is not
        safe to use (see :func:`open_private`).
        """
        if self._locked:
            return True
        fd = self._descriptor()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            return False
        self._locked = True
        try:
            self.quarantine.check()
        except BaseException:
            self.release()
            raise
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._locked = False

    def open(self) -> None:
        """Create the file if needed, drop a torn tail, count the entries."""
        fd = self._descriptor()
        if not self._locked:
            self.quarantine.check()
        data = _read_all(fd)
        good = data.rfind(b"\n") + 1
        if good != len(data):
            os.ftruncate(fd, good)
            _fsync(fd)
        self._size = good
        # A file just created (here or by lock()) needs its directory entry
        # synced too; one fsync at startup is cheap enough to always do it.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            _fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.count = len(self.read())

    def append(self, entries: Sequence[JournalEntry]) -> None:
        """Append ``entries`` durably (one write, one fsync).

        Raises ``OSError`` (a full disk, an I/O error) with the file as it
        was: a partial write is cut off again, so that no torn line is ever
        buried under a later append. If even that cut fails, the next append
        makes it first, and fails if it cannot.
        """
        if not entries:
            return
        payload = b"".join(_encoder.encode(e) + b"\n" for e in entries)
        fd = self._descriptor()
        size = os.lseek(fd, 0, os.SEEK_END)
        if self._size is not None and size != self._size:
            os.ftruncate(fd, self._size)
            size = os.lseek(fd, self._size, os.SEEK_SET)
        try:
            _write_all(fd, payload)
            _fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
        self._size = size + len(payload)
        self.count += len(entries)

    def read(self) -> list[JournalEntry]:
        """The valid entries, in order. Invalid lines are remembered (and
        logged by number and field only) until :meth:`clear` sets them aside.
        Raises ``OSError`` if the file cannot be read."""
        data = _read_all(self._descriptor())
        if self._size is not None:
            data = data[: self._size]  # not the tail of an append that failed
        entries = []
        invalid: list[tuple[int, str, bytes]] = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(_check(_decode(line), self._max_cost))
            except (msgspec.DecodeError, RecursionError):
                invalid.append((number, "not a journal entry", line))
            except ValueError as exc:
                invalid.append((number, f"{exc} is not valid", line))
        if invalid and [line for *_, line in invalid] != self._invalid:
            where = ", ".join(f"line {n}: {why}" for n, why, _ in invalid[:10])
            log.error(
                "spill file %s: %d lines are not valid costs and are not counted (%s%s);"
                " they will be set aside in %s",
                self.path,
                len(invalid),
                where,
                ", ..." if len(invalid) > 10 else "",
                self.quarantine.path,
            )
        self._invalid = [line for *_, line in invalid]
        return entries

    def clear(self) -> None:
        """Empty the file, durably; call only once the entries that
        :meth:`read` returned are in the store. Lines it found invalid are
        first appended to the quarantine file."""
        self.quarantine.add(self._invalid)
        self._invalid = []
        fd = self._descriptor()
        os.ftruncate(fd, 0)
        _fsync(fd)
        self._size = 0
        self.count = 0


# Instances sharing one working directory and database; more than this many
# at once is a deployment that should give each its own --spill path.
MAX_SLOTS = 64


def slot(base: Path, n: int) -> Path:
    """The ``n``-th spill file of a base path (1 is the base itself)."""
    return base if n == 1 else base.with_name(f"{base.stem}-{n}{base.suffix}")


def claim(base: Path, *, max_cost: Decimal = DEFAULT_MAX_COST) -> tuple[SpillFile, list[SpillFile]]:
    """This process's spill file: the first slot of ``base`` that no live
    process holds, locked; and every other existing slot that no live process
    holds (left by processes that died), locked too, to be drained and
    released; their invalid lines go to this process's quarantine file.
    Raises ``OSError`` when every slot is taken, :class:`UnsafeFile` for a
    slot that is not safe to use."""
    mine: SpillFile | None = None
    orphans: list[SpillFile] = []
    for n in range(1, MAX_SLOTS + 1):
        path = slot(base, n)
        if mine is not None and not path.exists():
            continue
        shared = mine.quarantine if mine is not None else None
        candidate = SpillFile(path, max_cost=max_cost, quarantine=shared)
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
