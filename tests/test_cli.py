"""Command-line behaviour not covered by the contract suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ._service import ServeProcess


async def test_a_second_serve_on_the_same_sqlite_file_exits_2(
    sqlite_url: str, tmp_path: Path
) -> None:
    first = await ServeProcess("--database", sqlite_url, log=tmp_path / "first.log").start()
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "budget_actor",
                "serve",
                "--port",
                "0",
                "--database",
                sqlite_url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another budget-actor" in lines[0], lines
    finally:
        assert await first.stop() == 0


def test_demo_runs_by_itself() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "budget_actor", "demo"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "ALERT for AG Lu: 80%" in out
    assert out.count("ALERT for AG Lu") == 1  # and none after the restart
    assert "quilt_patches type=budget" in out and '"cycle_count": 10' in out
    assert "new alerts after restart: 0" in out
