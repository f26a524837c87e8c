"""Smaller defences of issue 13 (findings 7 and 8): weak tokens, the
overload counter, CSV cells, database URLs, file permissions and the default
instance id. Each test fails without its defence.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import socket
import stat
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from budget_actor import make_config, open_budget
from budget_actor.cli.report import build, summarize_day, to_csv
from budget_actor.core.cost import Cost
from budget_actor.core.records import JournalEntry
from budget_actor.net.server import ServerOptions, serve

from ._client import Launcher, connect, http_get, run_cli

pytestmark = pytest.mark.slow

LONG = secrets.token_urlsafe(24)


async def serve_refused(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``serve`` must exit 2 with one line and no ready line; that line."""
    database = f"sqlite:///{tmp_path / 'h.db'}"
    done = await run_cli("serve", "--port", "0", "--database", database, *args, env=env)
    assert done.code == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "ws://" not in done.stdout
    return lines[0]


# --------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"BUDGET_DISPATCHER_TOKEN": "x"}, (), "dispatcher-token"),
        ({"BUDGET_DISPATCHER_TOKEN": "   "}, (), "dispatcher-token"),
        # A blank token used to lift the loopback-only rule.
        ({"BUDGET_DISPATCHER_TOKEN": " \t "}, ("--host", "0.0.0.0"), "dispatcher-token"),
        ({"BUDGET_DISPATCHER_TOKEN": "a" * 15}, (), "dispatcher-token"),
        ({"BUDGET_OBSERVER_TOKEN": "short"}, (), "observer-token"),
        ({"BUDGET_DISPATCHER_TOKEN": LONG, "BUDGET_OBSERVER_TOKEN": "short"}, (), "observer"),
        ({"BUDGET_DISPATCHER_TOKEN": "with a space " + LONG}, (), "dispatcher-token"),
        ({"BUDGET_DISPATCHER_TOKEN": LONG + "é"}, (), "dispatcher-token"),
        ({}, ("--dispatcher-token=" + "x" * 2000,), "dispatcher-token"),
        # Equal tokens made every observer a dispatcher.
        ({"BUDGET_DISPATCHER_TOKEN": LONG, "BUDGET_OBSERVER_TOKEN": LONG}, (), "same"),
        ({"BUDGET_OBSERVER_TOKEN": LONG}, (f"--dispatcher-token={LONG}",), "same"),
    ],
)
async def test_weak_or_equal_tokens_exit_2(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], named: str
) -> None:
    line = await serve_refused(tmp_path, *args, env=env)
    assert named in line, line
    given = [*env.values(), *(a.split("=", 1)[1] for a in args if a.startswith("--dispatcher"))]
    for value in given:
        if len(value.strip()) > 1:
            assert value.strip() not in line, "the error repeats a token"


async def test_a_sixteen_character_token_is_enough(launcher: Launcher) -> None:
    token = "0123456789abcdef"
    service = await launcher.start(None, env={"BUDGET_DISPATCHER_TOKEN": token})
    assert "access: tokens" in service.ready_line
    async with connect(
        service.ws_url, extra_headers=[(b"authorization", f"Bearer {token}".encode())]
    ) as conn:
        await conn.cost("sixteen", "0.1")


# --------------------------------------------------------------------------
# The overload counter counts per time window
# --------------------------------------------------------------------------


async def _bursts(url: str, rounds: int, size: int, pause: float) -> tuple[int, int | None]:
    """Send ``rounds`` bursts of ``size`` health questions, ``pause`` apart;
    the `overloaded` errors seen and the close code (None: still open)."""
    overloaded = 0
    async with connect(url) as conn:
        try:
            for _ in range(rounds):
                for _ in range(size):
                    await conn.send({"type": "health"})
                for _ in range(size):
                    reply = await conn.recv()
                    overloaded += reply["type"] == "error" and reply["code"] == "overloaded"
                await trio.sleep(pause)
        except ConnectionClosed as closed:
            return overloaded, closed.reason.code if closed.reason else None
        return overloaded, None


async def test_going_a_little_over_the_rate_now_and_then_never_closes(sqlite_url: str) -> None:
    """The issue's case: the counter never reset, so a client staying mostly
    under the rate limit was closed after a while."""
    options = ServerOptions(rate_per_s=10, burst=10, max_overloads=5, overload_window_s=0.5)
    async with open_budget(make_config(), database=sqlite_url) as budget:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, options=options), budget, "127.0.0.1", 0)
            url = f"ws://127.0.0.1:{port}/ws"
            # Each burst goes over by 4 or so; the bucket refills and the
            # window passes between bursts.
            overloaded, code = await _bursts(url, rounds=4, size=14, pause=1.1)
            assert code is None, "closed although each window stayed under the limit"
            assert overloaded > options.max_overloads  # in total, more than the limit
            # Flooding within one window still closes with 1008.
            overloaded, code = await _bursts(url, rounds=1, size=30, pause=0)
            assert code == 1008
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# CSV cells that a spreadsheet would run
# --------------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR"]


def test_csv_cells_that_start_a_formula_are_escaped() -> None:
    at = datetime(2026, 12, 1, 12, tzinfo=UTC)
    entries = [
        JournalEntry(seq=i, day="2026-12-01", at=at, cost=Cost(f"d{i}", Decimal("1"), model=m))
        for i, m in enumerate([*FORMULAS, "plain", "a=b"], start=1)
    ]
    day = summarize_day("2026-12-01", entries, None, Decimal("100"), "model")
    rows = list(csv.reader(io.StringIO(to_csv(build([day], "model")))))
    models = {row[1] for row in rows[1:]}
    assert models == {"'" + m for m in FORMULAS} | {"plain", "a=b"}
    assert all(row[2] == "1" for row in rows[1:])  # amounts untouched


async def test_report_csv_escapes_what_a_client_sent(launcher: Launcher) -> None:
    database = f"sqlite:///{launcher.workdir / 'budget.db'}"
    service = await launcher.start(database)
    async with connect(service.ws_url) as conn:
        for i, model in enumerate(FORMULAS[:4]):
            await conn.cost(f"f{i}", "0.5", model=model, agent="=cmd|' /C calc'!A0")
    assert await service.stop() == 0
    for by in ("model", "agent"):
        done = await run_cli("report", "--database", database, "--by", by, "--format", "csv")
        assert done.code == 0, done
        cells = [row[1] for row in csv.reader(io.StringIO(done.stdout))][1:]
        assert cells and all(cell.startswith("'") for cell in cells), cells


# --------------------------------------------------------------------------
# Database URLs are checked before anything is opened
# --------------------------------------------------------------------------

BAD_URLS = [
    ("postgresql://budget:SECRET-PW@127.0.0.1:abc/db", "port"),
    ("postgresql://budget:SECRET-PW@127.0.0.1:99999/db", "port"),
    ("postgresql://budget:SECRET-PW@h1:5432,h2:x/db", "port"),
    ("postgresql://budget:SECRET-PW@[::1/db", "PostgreSQL URL"),
    ("sqlite:///", "file path"),
    ("sqlite:///:memory:", "file path"),
    ("mysql://budget:SECRET-PW@db/x", "unsupported"),
    ("budget:SECRET-PW@db", "unsupported"),
]


@pytest.mark.parametrize(("url", "said"), BAD_URLS)
@pytest.mark.parametrize("command", ["serve", "verify", "report"])
async def test_a_bad_database_url_exits_2_with_one_line(
    tmp_path: Path, url: str, said: str, command: str
) -> None:
    args = ["--port", "0"] if command == "serve" else []
    done = await run_cli(command, *args, "--database", url, cwd=tmp_path)
    assert done.code == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert said in lines[0], lines[0]
    assert "SECRET-PW" not in done.stderr


# --------------------------------------------------------------------------
# Files are private
# --------------------------------------------------------------------------


def _modes(directory: Path) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir() if p.is_file()}


async def test_serve_creates_its_files_readable_by_its_user_only(launcher: Launcher) -> None:
    """The issue's case: the database files were created 0644."""
    data = launcher.workdir / "data"
    database = f"sqlite:///{data / 'budget.db'}"
    service = await launcher.start(database)
    async with connect(service.ws_url) as conn:
        await conn.cost("private", "0.1")
    modes = _modes(data)
    expected = {"budget.db", "budget.db-wal", "budget.db-shm", "budget.db.lock", "budget.db.spill"}
    assert expected <= set(modes), modes
    assert set(modes.values()) == {"0o600"}, modes
    assert await service.stop() == 0


async def test_the_library_creates_a_private_database_too(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        async with open_budget(make_config(), database=f"sqlite:///{tmp_path / 'lib.db'}") as b:
            await b.record("lib", "0.1")
        modes = _modes(tmp_path)
    finally:
        os.umask(old)
    for name in ("lib.db", "lib.db.lock", "lib.db.spill"):
        assert modes[name] == "0o600", modes


# --------------------------------------------------------------------------
# The default instance id tells nothing about the host
# --------------------------------------------------------------------------


async def test_the_default_instance_id_is_random(launcher: Launcher, pg_url: str) -> None:
    ids = []
    for _ in range(2):
        service = await launcher.start(pg_url)
        health = (await http_get(service.http_base + "/health")).json()
        metrics = (await http_get(service.http_base + "/metrics")).body.decode()
        assert await service.stop() == 0
        instance = health["instance"]
        assert re.fullmatch(r"auto-[0-9a-f]{16}", instance), instance
        assert socket.gethostname() not in json.dumps(health) + metrics
        ids.append(instance)
    assert ids[0] != ids[1]
