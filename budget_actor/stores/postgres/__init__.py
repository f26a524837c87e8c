"""PostgreSQL: a budget shared by every instance on one schema (see :mod:`.store`)."""

from .store import PostgresStore, default_instance_id

__all__ = ["PostgresStore", "default_instance_id"]
