"""Which store a database URL names.

The only module that knows the concrete stores: the layers above ask a
:class:`~.store.Store` what it can do, never which class it is.
"""

from __future__ import annotations

from .postgres import PostgresStore
from .sqlite import SqliteStore
from .store import Store, StoreError


def open_store(url: str, instance: str | None = None) -> Store:
    """A store for ``url`` (``sqlite:///PATH`` or ``postgresql://…``), not yet opened.

    ``instance`` names this service among those sharing a PostgreSQL budget
    (default: host name and process id); SQLite ignores it.

    Raises :class:`StoreError` for a URL of an unknown kind.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, instance)
    if url.startswith("sqlite:///"):
        return SqliteStore(url.removeprefix("sqlite:///"))
    raise StoreError(
        f"unsupported database URL {url.split('://')[0]!r}: use sqlite:///PATH or postgresql://…"
    )
