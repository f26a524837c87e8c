"""The spill file: where acknowledged costs wait while the store is unreachable.

An append-only file of JSON lines, one :class:`~budget_actor._records.JournalEntry`
each. The persister appends a whole batch with one write and one ``fsync``
(group commit), and only then acknowledges the batch. When the store is back,
the persister writes the file's entries to the store in one transaction and
then empties the file. Because journal inserts ignore rows that already exist,
a crash between the two steps only makes the next drain re-write harmlessly.

A crash in the middle of an append can leave a torn last line. Its entries
were never acknowledged (the ``fsync`` had not returned), so :meth:`SpillFile.open`
cuts the file back to its last complete line.

Every method blocks: call them from the persister's worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from ._records import JournalEntry

log = logging.getLogger("budget_actor.spill")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JournalEntry)


class SpillFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: Entries in the file (waiting for the store).
        self.count = 0

    def open(self) -> None:
        """Create the file if needed, drop a torn tail, count the entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
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
                entries.append(_decoder.decode(line))
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


def _fsync(fd: int) -> None:
    os.fsync(fd)
