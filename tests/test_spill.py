"""The spill file is not trusted (issue 13, finding 6).

It holds acknowledged costs while the database is down, and what it holds is
counted at the next start. So a planted file must not be able to do
anything: the service never follows a symbolic link to it, refuses anything
but a regular file of its own user with mode 0600 (``serve`` exits 2 with
one clear line), checks every line like wire input, and sets the lines that
fail aside in ``SPILL.quarantine`` without logging their content. Health
shows how many lines are set aside (``spill_quarantined``).

Every test here runs a real ``serve`` (or ``verify``) process.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from budget_actor.stores.spill import Quarantine, SpillFile, claim, slot

from ._client import Launcher, connect, http_get, run_cli

pytestmark = pytest.mark.slow

# Text that must never reach the log: it is in every planted line.
MARKER = "PLANTED-7f3e9c"


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def entry(seq: int, dispatch_id: str, usd: Any, **fields: Any) -> dict[str, Any]:
    cost = {"dispatch_id": dispatch_id, "usd": usd, "model": None, "input_tokens": None}
    cost |= {"output_tokens": None, "agent": None}
    line: dict[str, Any] = {
        "seq": seq,
        "day": today(),
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "cost": cost,
    }
    for name, value in fields.items():
        (cost if name in cost else line)[name] = value
    return line


def write_private(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    path.chmod(0o600)


async def serve_fails(tmp_path: Path, *args: str) -> str:
    """``serve`` with ``args`` must exit 2 with one line; that line."""
    database = f"sqlite:///{tmp_path / 'budget.db'}"
    done = await run_cli("serve", "--port", "0", "--database", database, *args, cwd=tmp_path)
    assert done.code == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "ws://" not in done.stdout
    return lines[0]


# --------------------------------------------------------------------------
# What the file is
# --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["--spill", "default"])
async def test_a_symlinked_spill_file_is_not_followed(tmp_path: Path, where: str) -> None:
    """The issue's case: the target was truncated at start-up and its lines
    written to the log."""
    target = tmp_path / "precious.txt"
    content = f"do not touch {MARKER}\nsecond line without newline {MARKER}"
    target.write_text(content)
    link = tmp_path / ("planted.spill" if where == "--spill" else "budget.db.spill")
    link.symlink_to(target)
    args = ("--spill", str(link)) if where == "--spill" else ()
    line = await serve_fails(tmp_path, *args)
    assert "symbolic link" in line and str(link) in line, line
    assert MARKER not in line
    assert target.read_text() == content
    assert link.is_symlink()


async def test_a_dangling_symlink_is_not_followed_either(tmp_path: Path) -> None:
    link = tmp_path / "planted.spill"
    link.symlink_to(tmp_path / "would-be-created")
    line = await serve_fails(tmp_path, "--spill", str(link))
    assert "symbolic link" in line, line
    assert not (tmp_path / "would-be-created").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660, 0o700, 0o400])
async def test_a_spill_file_with_another_mode_is_refused(tmp_path: Path, mode: int) -> None:
    spill = tmp_path / "loose.spill"
    spill.write_bytes(b"")
    spill.chmod(mode)
    line = await serve_fails(tmp_path, "--spill", str(spill))
    assert "0600" in line and str(spill) in line, line
    assert stat.S_IMODE(spill.stat().st_mode) == mode  # not "fixed" behind the operator's back


async def test_a_spill_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.spill"
    os.mkfifo(fifo, 0o600)
    line = await serve_fails(tmp_path, "--spill", str(fifo))
    assert "not a regular file" in line, line
    directory = tmp_path / "dir.spill"
    directory.mkdir()
    line = await serve_fails(tmp_path, "--spill", str(directory))
    assert str(directory) in line, line


async def test_a_hard_linked_spill_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.write_bytes(b"")
    other.chmod(0o600)
    spill = tmp_path / "linked.spill"
    os.link(other, spill)
    line = await serve_fails(tmp_path, "--spill", str(spill))
    assert "hard links" in line, line


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
async def test_a_spill_file_of_another_user_is_refused(tmp_path: Path) -> None:
    spill = tmp_path / "theirs.spill"
    spill.write_bytes(b"")
    spill.chmod(0o600)
    os.chown(spill, 65534, 65534)
    line = await serve_fails(tmp_path, "--spill", str(spill))
    assert "owned by uid 65534" in line, line


async def test_an_unsafe_quarantine_file_is_refused_too(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    (tmp_path / "budget.db.spill.quarantine").symlink_to(target)
    line = await serve_fails(tmp_path)
    assert "symbolic link" in line and "quarantine" in line, line
    assert target.read_text() == "keep"


# --------------------------------------------------------------------------
# What the file holds
# --------------------------------------------------------------------------

PLANTED: list[tuple[str, bytes]] = [
    ("negative amount", json.dumps(entry(2, f"neg-{MARKER}", "-5.00")).encode()),
    ("NaN", json.dumps(entry(3, f"nan-{MARKER}", "NaN")).encode()),
    ("above any max-cost", json.dumps(entry(4, f"big-{MARKER}", "5e12")).encode()),
    ("huge exponent", json.dumps(entry(5, f"exp-{MARKER}", "1e999")).encode()),
    ("control character in id", json.dumps(entry(6, f"\x1b[2J{MARKER}", "1")).encode()),
    ("empty id", json.dumps(entry(7, "", "1", model=MARKER)).encode()),
    ("seq 0", json.dumps(entry(0, f"seq-{MARKER}", "1")).encode()),
    ("bad day", json.dumps(entry(8, f"day-{MARKER}", "1", day="2026-13-45")).encode()),
    ("naive time", json.dumps(entry(9, f"at-{MARKER}", "1", at="2026-12-02T10:00:00")).encode()),
    ("not JSON", f"rm -rf / {MARKER}".encode()),
    ("nested", b"[" * 10_000 + MARKER.encode() + b"]" * 10_000),
    ("a number", b"42"),
    ("binary", b"\xff\xfe" + MARKER.encode() + b"\x00\x1b[31m"),
]


async def test_invalid_lines_are_set_aside_uncounted_and_unlogged(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The issue's case: a hand-written line with a negative amount was
    drained, health showed a negative spend, and `verify` said OK."""
    workdir = launcher.workdir
    database = f"sqlite:///{workdir / 'budget.db'}"
    spill = workdir / "budget.db.spill"
    good = [
        json.dumps(entry(1, "good-1", "0.25", model="m")).encode(),
        json.dumps(entry(11, "good-2", "1.5")).encode(),
    ]
    bad = [line for _, line in PLANTED]
    write_private(spill, [good[0], *bad, good[1]])

    service = await launcher.start(database)
    async with connect(service.ws_url) as conn:
        health = await conn.health()
    assert Decimal(health["daily_spend"]) == Decimal("1.75"), health
    assert health["dispatches"] == 2
    assert health["spill_quarantined"] == len(bad)
    assert (await http_get(service.http_base + "/health")).json()["spill_quarantined"] == len(bad)
    metrics = (await http_get(service.http_base + "/metrics")).body.decode()
    assert f"budget_spill_quarantined {float(len(bad))}" in metrics, metrics
    # The lines are set aside byte for byte, in a private file; the spill
    # file is empty.
    quarantine = workdir / "budget.db.spill.quarantine"
    assert quarantine.read_bytes() == b"".join(line + b"\n" for line in bad)
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600
    assert spill.read_bytes() == b""
    assert await service.stop() == 0
    log = service.stderr_text()
    assert MARKER not in log, log
    assert "\x1b" not in log
    assert "set aside" in log and "line 2" in log, log

    # The count survives a restart (the lines still wait for an operator).
    service = await launcher.start(database)
    async with connect(service.ws_url) as conn:
        health = await conn.health()
    assert health["spill_quarantined"] == len(bad)
    assert Decimal(health["daily_spend"]) == Decimal("1.75")
    assert await service.stop() == 0

    done = await run_cli("verify", "--database", database)
    assert done.code == 0, done
    assert "$1.75" in done.stdout, done.stdout


async def test_a_clean_start_shows_nothing_set_aside(launcher: Launcher) -> None:
    service = await launcher.start(f"sqlite:///{launcher.workdir / 'budget.db'}")
    reply = await http_get(service.http_base + "/health")
    assert reply.json()["spill_quarantined"] == 0
    assert not (launcher.workdir / "budget.db.spill.quarantine").exists()
    spill = launcher.workdir / "budget.db.spill"
    assert stat.S_IMODE(spill.stat().st_mode) == 0o600


def test_an_orphans_invalid_lines_go_to_the_claimers_quarantine(tmp_path: Path) -> None:
    """A dead instance's spill file is drained by whoever starts; what it
    holds is checked the same way."""
    base = tmp_path / "budget-x.spill"
    one, _ = claim(base)
    dead = SpillFile(slot(base, 2))
    dead.open()
    dead.release()
    with open(dead.path, "ab") as f:
        f.write(json.dumps(entry(1, "ok", "0.5")).encode() + b"\n")
        f.write(json.dumps(entry(2, "neg", "-1")).encode() + b"\n")
    one.release()
    mine, orphans = claim(base)
    try:
        assert [o.path for o in orphans] == [dead.path]
        orphan = orphans[0]
        orphan.open()
        assert [e.cost.dispatch_id for e in orphan.read()] == ["ok"]
        orphan.clear()
        assert mine.quarantine.count == 1
        assert mine.quarantine.path.read_bytes().count(b"neg") == 1
    finally:
        for held in [mine, *orphans]:
            held.release()


def test_quarantine_counts_what_it_holds(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    quarantine.check()
    assert quarantine.count == 0
    quarantine.add([b"a", b"b"])
    again = Quarantine(tmp_path / "q")
    again.check()
    assert again.count == 2


async def test_a_crash_torn_tail_is_dropped_not_set_aside(launcher: Launcher) -> None:
    """A torn last line is an append whose fsync never returned: never
    acknowledged, so it is cut off, as before."""
    spill = launcher.workdir / "budget.db.spill"
    whole = json.dumps(entry(1, "whole", "0.5")).encode()
    write_private(spill, [whole])
    with open(spill, "ab") as f:
        f.write(whole[:20])
    service = await launcher.start(f"sqlite:///{launcher.workdir / 'budget.db'}")
    async with connect(service.ws_url) as conn:
        health = await conn.health()
    assert Decimal(health["daily_spend"]) == Decimal("0.5")
    assert health["spill_quarantined"] == 0


async def test_a_cost_acked_under_a_higher_max_cost_still_drains(launcher: Launcher) -> None:
    """A cost acknowledged (and spilled) while --max-cost was 1000 is not lost
    when the service comes back with --max-cost 100: it was acknowledged."""
    workdir = launcher.workdir
    spill = workdir / "budget.db.spill"
    write_private(spill, [json.dumps(entry(1, "acked-under-1000", "500")).encode()])
    service = await launcher.start(f"sqlite:///{workdir / 'budget.db'}", "--max-cost", "100")
    async with connect(service.ws_url) as conn:
        health = await conn.health()
    assert Decimal(health["daily_spend"]) == Decimal("500"), health
    assert health["spill_quarantined"] == 0
