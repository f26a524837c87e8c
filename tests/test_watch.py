"""`budget-actor watch`: the pure rendering, and the command against real services."""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import trio

from budget_actor.cli.watch import State, apply, bar, plain_lines, render

from ._client import (
    Launcher,
    Service,
    child_env,
    command,
    dispatcher,
    free_closed_port,
    run_cli,
)

T0 = datetime(2026, 12, 1, 12, 0, 0)
URL = "ws://127.0.0.1:8765/ws"


def _spend(spend: str, seq: int, util: float, cap: str = "1.00") -> dict[str, Any]:
    return {
        "type": "spend",
        "day": "2026-12-01",
        "daily_spend": spend,
        "daily_cap": cap,
        "remaining": str(max(Decimal(0), Decimal(cap) - Decimal(spend))),
        "utilization": util,
        "dispatches": seq,
        "seq": seq,
    }


def _health(seq: int = 0, **extra: Any) -> dict[str, Any]:
    body = {
        "type": "health",
        "status": "ok",
        "day": "2026-12-01",
        "daily_spend": "0",
        "daily_cap": "1.00",
        "remaining": "1.00",
        "utilization": 0.0,
        "alert_thresholds": [0.5, 0.8],
        "alerts_sent": [],
        "dispatches": 0,
        "seq": seq,
        "burn_rate_5m": "1.5",
        "burn_rate_60m": "0.25",
        "projected_spend": "3.456",
        "id": "watch",
    }
    body.update(extra)
    return body


def _alert(threshold: float, spend: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "alert",
        "to": "AG Lu",
        "day": "2026-12-01",
        "threshold": threshold,
        "daily_spend": spend,
        "daily_cap": "1.00",
        **extra,
    }


def _state(*messages: dict[str, Any]) -> State:
    state = State(url=URL, now=T0, connection="connected")
    for i, message in enumerate(messages):
        state = apply(state, message, T0 + timedelta(seconds=i + 1))
    return state


# -- pure: state ---------------------------------------------------------------


def test_spend_health_and_alerts_fold_into_the_state() -> None:
    state = _state(_health(), _spend("0.85", 3, 0.85), _alert(0.8, "0.85"))
    assert state.daily_spend == Decimal("0.85") and state.daily_cap == Decimal("1.00")
    assert state.dispatches == 3 and state.seq == 3
    assert state.thresholds == (0.5, 0.8)
    assert (state.burn_rate_5m, state.burn_rate_60m) == (Decimal("1.5"), Decimal("0.25"))
    assert state.projected_spend == Decimal("3.456")
    assert state.alerts_total == 1 and state.alerts[0].threshold == 0.8
    assert state.alerts_sent == (0.8,)  # an arriving alert counts as sent


def test_an_older_health_does_not_roll_the_spend_back() -> None:
    state = _state(_spend("0.85", 3, 0.85), _health(seq=2, daily_spend="0.5"))
    assert state.daily_spend == Decimal("0.85")  # health's seq 2 is behind spend's 3
    assert state.burn_rate_5m == Decimal("1.5")  # but its burn rate is taken


def test_unknown_messages_and_fields_change_nothing() -> None:
    before = _state(_spend("0.1", 1, 0.1))
    assert apply(before, {"type": "ack", "seq": 9}, T0) == before
    assert apply(before, {"type": "new-thing"}, T0) == before


def test_a_health_without_burn_fields_shows_dashes() -> None:
    old = {k: v for k, v in _health().items() if not k.startswith(("burn", "projected"))}
    frame = "\n".join(render(_state(old, _spend("0.1", 1, 0.1)), 80))
    assert "burn rate  -/h over 5 min" in frame and "projected  - by the end" in frame


# -- pure: rendering -------------------------------------------------------------


def test_bar_marks_spend_and_thresholds() -> None:
    line, labels = bar(0.5, [0.5, 0.8], 24)
    assert line == "[##########|.....|...]"  # 20 cells: width less brackets and ">>"
    assert "^50%" in labels and "^80%" in labels
    # The label's caret sits under its marker.
    assert labels.index("^50%") == line.index("|")
    over, _ = bar(1.3, [0.8], 24)
    assert over.endswith("]>>") and "." not in over


def test_bar_labels_never_overlap() -> None:
    _, labels = bar(0.0, [0.8, 0.81, 0.9], 60)
    assert labels.count("^") == 2  # 81% would collide with 80% and is left unlabelled


def test_render_shows_every_figure() -> None:
    state = _state(_health(alerts_sent=[0.5]), _spend("0.85", 3, 0.85), _alert(0.8, "0.85"))
    frame = render(state, 100)
    text = "\n".join(frame)
    assert frame[0].startswith(f"budget-actor watch  {URL}") and frame[0].endswith("connected")
    assert "spend      $0.85 of $1.00   85.0%   remaining $0.15" in text
    assert "burn rate  $1.50/h over 5 min   $0.2500/h over 60 min" in text
    assert "projected  $3.46 by the end of the day  (over the cap)" in text
    assert "sent today: 50%, 80%" in text
    assert "  12:00:03  80% of the cap reached: $0.85 of $1.00 (to AG Lu)" in text
    assert frame[-1].endswith("Ctrl-C to quit")
    assert all(len(line) <= 100 for line in frame)
    assert not any("\x1b" in line for line in frame)


def test_render_before_any_figures_and_when_disconnected() -> None:
    waiting = State(url=URL, now=T0)
    assert "waiting for the service's figures..." in render(waiting)
    assert render(waiting)[0].endswith("connecting")
    gone = replace(
        _state(_spend("0.2", 1, 0.2)),
        connection="disconnected",
        detail="connection refused",
        retry_in=4.0,
    )
    frame = render(gone, 120)
    assert frame[0].endswith("disconnected: connection refused; retrying in 4s")
    assert "(last known)" in frame[1]


def test_render_fits_a_narrow_terminal() -> None:
    frame = render(_state(_health(), _spend("0.85", 3, 0.85)), 40)
    assert all(len(line) <= 40 for line in frame)


def test_render_once_has_no_footer() -> None:
    frame = render(_state(_spend("0.2", 1, 0.2)), 80, live=False)
    assert "Ctrl-C" not in "\n".join(frame)


def test_a_forecast_alert_says_what_was_projected() -> None:
    forecast = _alert(1.0, "0.3", kind="forecast", projected_spend="2.5")
    text = "\n".join(render(_state(_spend("0.3", 1, 0.3), forecast)))
    assert "forecast: $2.50 by the end of the day, over the $1.00 cap (to AG Lu)" in text
    assert "sent today" not in text  # a forecast is not a threshold


# -- pure: plain lines -------------------------------------------------------------


def test_plain_lines_one_line_per_change() -> None:
    start = State(url=URL, now=T0)
    assert plain_lines(None, start) == ["12:00:00 connecting to " + URL]
    connected = replace(start, connection="connected", now=T0 + timedelta(seconds=1))
    assert plain_lines(start, connected) == ["12:00:01 connected to " + URL]
    spent = apply(connected, _spend("0.6", 2, 0.6), T0 + timedelta(seconds=2))
    (line,) = plain_lines(connected, spent)
    assert line == "12:00:02 spend $0.6 of $1.00 (60.0%), 2 dispatches on 2026-12-01"
    # The same figures again (e.g. a health answer with nothing new): no line.
    again = apply(spent, _spend("0.6", 2, 0.6), T0 + timedelta(seconds=3))
    assert plain_lines(spent, again) == []
    alerted = apply(again, _alert(0.5, "0.6"), T0 + timedelta(seconds=4))
    assert plain_lines(again, alerted) == [
        "12:00:04 ALERT 50% of the cap reached on 2026-12-01: $0.6 of $1.00 (to AG Lu)"
    ]


def test_plain_lines_report_a_lost_connection_but_not_each_retry() -> None:
    live = _state(_spend("0.2", 1, 0.2))
    lost = replace(live, connection="disconnected", detail="connection closed", retry_in=0.5)
    assert plain_lines(live, lost) == ["12:00:01 disconnected: connection closed; retrying in 0.5s"]
    retry = replace(lost, connection="connecting", attempt=2, retry_in=None)
    assert plain_lines(lost, retry) == []
    for line in plain_lines(None, live) + plain_lines(live, lost):
        assert "\x1b" not in line and "\n" not in line


# -- the command against real services ---------------------------------------------


class Watch:
    """`budget-actor watch` as a real process whose stdout is a pipe (not a tty)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            command("watch", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(env),
        )
        self.lines: list[str] = []

    async def expect(self, pattern: str, timeout: float = 15.0) -> str:
        """Read lines until one matches ``pattern``; that line."""
        stdout = self.proc.stdout
        assert stdout is not None
        regex = re.compile(pattern)
        try:
            with trio.fail_after(timeout):
                while True:
                    line = await trio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
                    if not line:
                        raise AssertionError(f"watch ended; output so far: {self.lines}")
                    self.lines.append(line.rstrip("\n"))
                    if regex.search(line):
                        return line
        except trio.TooSlowError:
            raise AssertionError(f"no line matching {pattern!r}; got {self.lines}") from None

    async def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code: int = await trio.to_thread.run_sync(lambda: self.proc.wait(10))
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


async def _serve(
    launcher: Launcher, url: str, *args: str, env: dict[str, str] | None = None
) -> Service:
    return await launcher.start(url, "--daily-cap", "1.00", "--alert-at", "0.5,0.8", *args, env=env)


async def test_watch_follows_spend_burn_and_alerts_as_plain_lines(
    launcher: Launcher, sqlite_url: str
) -> None:
    service = await _serve(launcher, sqlite_url)
    watch = Watch("--url", service.ws_url, "--interval", "0.3")
    try:
        await watch.expect(r"^\d\d:\d\d:\d\d connected to ws://")
        await watch.expect(r"spend \$0 of \$1\.00 \(0\.0%\), 0 dispatches")
        async with dispatcher(service.ws_url) as client:
            await client.record("w-1", "0.35", model="m")
            await client.record("w-2", "0.25", model="m")
        alert = await watch.expect(r"ALERT")
        assert "ALERT 50% of the cap reached on 20" in alert and "$0.60 of $1.00" in alert
        # Burn rate and projection arrive with the next health answer.
        line = await watch.expect(
            r"spend \$0\.60 of \$1\.00 \(60\.0%\), 2 dispatches.*burn \$[1-9]"
        )
        assert "/h (5 min)" in line and "/h (60 min)" in line and "projected $" in line
        assert await watch.interrupt() == 0
        assert watch.proc.stderr is not None and watch.proc.stderr.read() == ""
    finally:
        watch.close()
    assert all("\x1b" not in line for line in watch.lines)


async def test_watch_reports_a_lost_service_and_reconnects(
    launcher: Launcher, sqlite_url: str
) -> None:
    first = await _serve(launcher, sqlite_url)
    watch = Watch("--url", first.ws_url, "--interval", "0.3")
    try:
        await watch.expect(r"connected to ws://")
        assert await first.stop() == 0
        await watch.expect(r"disconnected: .*; retrying in")
        # Nothing listens now: the retries fail and say so.
        await watch.expect(r"disconnected: .*(refused|failed).*; retrying in")
        # Another service on the same port and database: watch finds it by itself.
        second = await _serve(launcher, sqlite_url, "--port", str(first.port))
        assert second.port == first.port
        await watch.expect(r"connected to ws://", timeout=25)
        async with dispatcher(second.ws_url) as client:
            await client.record("after", "0.1")
        await watch.expect(r"spend \$0\.1 of \$1\.00")
        assert await watch.interrupt() == 0
    finally:
        watch.close()


async def test_watch_once_prints_one_frame(launcher: Launcher, sqlite_url: str) -> None:
    service = await _serve(launcher, sqlite_url)
    async with dispatcher(service.ws_url) as client:
        await client.record("o-1", "0.9")
    done = await run_cli("watch", "--once", "--url", service.ws_url)
    assert done.code == 0, done.stderr
    assert done.stderr == ""
    assert "spend      $0.9 of $1.00   90.0%   remaining $0.10" in done.stdout
    assert "[" in done.stdout and "^50%" in done.stdout and "^80%" in done.stdout
    assert "sent today: 50%, 80%" in done.stdout
    assert "Ctrl-C" not in done.stdout and "\x1b" not in done.stdout


async def test_watch_with_an_observer_token(launcher: Launcher, sqlite_url: str) -> None:
    service = await _serve(
        launcher,
        sqlite_url,
        env={
            "BUDGET_DISPATCHER_TOKEN": "d-secret-0123456789",
            "BUDGET_OBSERVER_TOKEN": "o-secret-0123456789",
        },
    )
    ok = await run_cli(
        "watch", "--once", "--url", service.ws_url, env={"BUDGET_TOKEN": "o-secret-0123456789"}
    )
    assert ok.code == 0, ok.stderr
    refused = await run_cli("watch", "--once", "--url", service.ws_url)
    assert refused.code == 2
    assert refused.stderr.count("\n") == 1 and "HTTP 401" in refused.stderr
    # The live view gives up at once too: retrying cannot fix a token.
    live = await run_cli("watch", "--url", service.ws_url, "--token", "wrong", timeout=15)
    assert live.code == 2 and "HTTP 401" in live.stderr


async def test_watch_once_with_no_service_exits_2() -> None:
    url = f"ws://127.0.0.1:{free_closed_port()}/ws"
    done = await run_cli("watch", "--once", "--url", url)
    assert done.code == 2
    assert done.stderr.startswith(f"budget-actor: error: cannot reach {url}")
    assert done.stderr.count("\n") == 1


async def test_watch_refuses_bad_options() -> None:
    bad_url = await run_cli("watch", "--url", "http://127.0.0.1:1/ws")
    assert bad_url.code == 2 and "`url` must start with ws://" in bad_url.stderr
    bad_interval = await run_cli("watch", "--interval", "0")
    assert bad_interval.code == 2 and "`interval`" in bad_interval.stderr
