"""Which store a database URL names.

The only module that knows the concrete stores: the layers above ask a
:class:`~.store.Store` what it can do, never which class it is.
"""

from __future__ import annotations

from .sqlite import SqliteStore
from .store import Store, StoreError


class BadDatabaseURL(StoreError):
    """A database URL that names no usable database; the message is one line
    and never repeats the URL (it may hold a password)."""


def check_database_url(url: str) -> None:
    """Refuse, before anything is opened, a URL that cannot work.

    ``sqlite:///PATH`` needs a file path (an empty one or ``:memory:`` would
    keep the journal in memory, to be lost at exit). ``postgresql://…`` must
    parse, and each port must be a number from 1 to 65535. Raises
    :class:`BadDatabaseURL`.
    """
    if url.startswith(("postgresql://", "postgres://")):
        # psycopg only for a PostgreSQL URL (see open_store).
        from psycopg import conninfo

        try:
            params = conninfo.conninfo_to_dict(url)
        except Exception:  # psycopg.ProgrammingError; its text repeats the URL
            raise BadDatabaseURL(
                "`database` is not a valid PostgreSQL URL"
                " (postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE)"
            ) from None
        for port in str(params.get("port") or "").split(","):
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise BadDatabaseURL(
                    f"`database`: the port must be a number from 1 to 65535, got {port[:20]!r}"
                )
    elif url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path.strip() or path == ":memory:" or path.startswith("file:"):
            raise BadDatabaseURL(
                "`database`: sqlite:/// needs a file path, e.g. sqlite:///budget.db"
                " (an in-memory database would lose every cost at exit)"
            )
    else:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        named = f"scheme {scheme[:20]!r}" if scheme.isalnum() else "URL"
        raise BadDatabaseURL(f"unsupported database {named}: use sqlite:///PATH or postgresql://…")


def open_store(url: str, instance: str | None = None) -> Store:
    """A store for ``url`` (``sqlite:///PATH`` or ``postgresql://…``), not yet opened.

    ``instance`` names this service among those sharing a PostgreSQL budget
    (default: a random id); SQLite ignores it.

    Raises :class:`BadDatabaseURL` (a :class:`StoreError`) for a URL that
    :func:`check_database_url` refuses.
    """
    check_database_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        # Imported only when needed: psycopg is a large part of the start-up
        # time (about 0.15 s of the ready line), which a SQLite service spares.
        from .postgres import PostgresStore

        return PostgresStore(url, instance)
    if url.startswith("sqlite:///"):
        return SqliteStore(url.removeprefix("sqlite:///"))
    raise AssertionError("unreachable: check_database_url accepts no other URL")
