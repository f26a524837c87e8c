"""Small helpers shared by the trio tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
import trio


class WallClock:
    """An injectable wall clock that moves only when the test says so.

    (trio's autojump clock would also jump while worker threads run the store,
    so the wall clock is kept independent of it.)
    """

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true (polling); fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.01)


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Query a test database directly (sqlite:///PATH or postgresql://…)."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql.replace("%s", "?"), params).fetchall()
    with psycopg.connect(url) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []
