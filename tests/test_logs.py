"""`serve --log-format json`: one JSON object per line on standard error; and
`verify`'s progress line on a terminal."""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

from budget_actor.cli.logs import JsonFormatter

from ._client import Launcher, child_env, command, dispatcher, run_cli


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "budget_actor.server", logging.WARNING, __file__, 1, message, args, exc_info
    )


def test_a_record_is_one_json_line() -> None:
    line = JsonFormatter().format(_record("peer %s said\n%r", "1.2.3.4", "ü"))
    assert "\n" not in line
    body = json.loads(line)
    assert body == {
        "ts": body["ts"],
        "level": "WARNING",
        "logger": "budget_actor.server",
        "message": "peer 1.2.3.4 said\n'ü'",
    }
    assert body["ts"].endswith("Z") and "T" in body["ts"]


def test_an_exception_goes_into_exc() -> None:
    line = JsonFormatter().format(_record("failed", exc=True))
    assert "\n" not in line
    body = json.loads(line)
    assert body["message"] == "failed"
    assert body["exc"].startswith("Traceback") and "ValueError: boom\nsecond line" in body["exc"]


async def test_serve_logs_json_lines(sqlite_url: str, tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    try:
        service = await launcher.start(
            sqlite_url, "--log-format", "json", "--log-level", "debug", "--persist-every", "1"
        )
        async with dispatcher(service.ws_url) as client:
            await client.record("j-1", "0.5")
            await client.cycle()
            await client.health()
        assert await service.stop() == 0
        lines = service.stderr_text().splitlines()
    finally:
        launcher.close()
    assert lines, "serve logged nothing"
    records = [json.loads(line) for line in lines]  # every line is JSON
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys()
    messages = [r["message"] for r in records]
    assert any("SIGTERM received" in m for m in messages), messages
    assert records[-1]["message"] == "stopped cleanly"


async def test_log_format_from_the_environment_is_checked() -> None:
    done = await run_cli("serve", "--port", "0", env={"BUDGET_LOG_FORMAT": "xml"})
    assert done.code == 2
    assert done.stderr == "budget-actor: error: `log-format` must be text or json, got 'xml'\n"


async def test_verify_shows_its_progress_on_a_terminal(sqlite_url: str, tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    try:
        service = await launcher.start(sqlite_url)
        async with dispatcher(service.ws_url) as client:
            await client.record("v-1", "0.5")
            await client.record("v-2", "0.25")
            day = (await client.health()).day
        assert await service.stop() == 0
    finally:
        launcher.close()
    argv = command("verify", "--database", sqlite_url, "--day", day)
    # Standard error on a terminal: the progress line.
    main, side = pty.openpty()
    try:
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=side, text=True, env=child_env(), timeout=30
        )
        os.close(side)
        side = -1
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main)
        if side != -1:
            os.close(side)
    assert done.returncode == 0, seen
    text = seen.decode()
    assert f"reading the journal of {day}…" in text and "read 2 costs in " in text
    assert "journal             2 costs, $0.75" in done.stdout
    # Not a terminal: nothing extra on standard error.
    quiet = await run_cli("verify", "--database", sqlite_url, "--day", day)
    assert quiet.code == 0 and quiet.stderr == ""
