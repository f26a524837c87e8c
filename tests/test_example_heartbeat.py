"""``examples/heartbeat.py``: the asyncio heartbeat, run as its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from ._client import Launcher, child_env, free_closed_port, http_get

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "heartbeat.py"
SECTION = {
    "available",
    "daily_spend",
    "daily_cap",
    "utilization_percent",
    "alert_sent",
    "remaining",
    "cycles_until_persist",
}


def cost(n: int) -> Decimal:
    return Decimal("0.0125") * (n % 3 + 1)  # as the example simulates


async def heartbeat(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(EXAMPLE), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
        )

    done = await trio.to_thread.run_sync(run)
    beats = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, beats, done.stdout + done.stderr


async def test_each_beat_sends_a_cycle_and_reports_the_budget_section(
    launcher: Launcher, sqlite_url: str
) -> None:
    svc = await launcher.start(sqlite_url, "--daily-cap", "0.25", "--persist-every", "3")
    code, beats, output = await heartbeat(
        svc.ws_url, "--interval", "0.05", "--beats", "4", "--simulate", "2"
    )
    assert code == 0, output
    assert [b["beat"] for b in beats] == [1, 2, 3, 4]
    spent = Decimal(0)
    for number, beat in enumerate(beats, start=1):
        section = beat["budget"]
        assert set(section) == SECTION, section
        # Without an outbox, enqueue returned only once acknowledged: each
        # beat's figures include its own dispatches exactly.
        spent += cost(2 * number - 1) + cost(2 * number)
        assert Decimal(section["daily_spend"]) == spent
        assert Decimal(section["daily_cap"]) == Decimal("0.25")
        assert Decimal(section["remaining"]) == max(Decimal(0), Decimal("0.25") - spent)
        assert section["utilization_percent"] == round(float(spent / Decimal("0.25")) * 100, 1)
        assert section["alert_sent"] is (spent >= Decimal("0.2"))
    # One cycle per beat: the patch is written every third.
    assert [b["budget"]["cycles_until_persist"] for b in beats] == [2, 1, 3, 2]


async def test_the_heartbeat_keeps_beating_and_queueing_while_the_service_is_down(
    launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    port = free_closed_port()
    url = f"ws://127.0.0.1:{port}/ws"
    outbox = str(tmp_path / "heartbeat.outbox")
    code, beats, output = await heartbeat(
        url, "--outbox", outbox, "--interval", "0.05", "--beats", "2", "--simulate", "3"
    )
    assert code == 0, output
    assert [b["budget"]["available"] for b in beats] == [False, False]
    assert [b["budget"]["pending"] for b in beats] == [3, 6]
    assert "6 costs wait in the outbox" in output
    # The service comes up: the next start sends what the outbox holds.
    svc = await launcher.start(sqlite_url, "--port", str(port))
    code, beats, output = await heartbeat(
        url, "--outbox", outbox, "--beats", "1", "--interval", "0"
    )
    assert code == 0, output
    body = (await http_get(f"{svc.http_base}/health")).json()
    assert Decimal(body["daily_spend"]) == sum(cost(n) for n in range(1, 7)), output
    assert body["dispatches"] == 6
