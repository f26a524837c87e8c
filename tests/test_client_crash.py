"""Zero loss end to end, with real processes on both event loops.

A dispatcher process (``tests/_dispatcher.py``) enqueues costs through
``BudgetClient`` with an outbox and logs every promise ``enqueue`` gave it; a
subscriber process (``tests/_subscriber.py``) prints every spend it sees.
The tests kill -9 the dispatcher and the service, stop the service for a
while, and check that the spend ends up exactly the sum of the costs
enqueued: none lost, none counted twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import trio

from ._client import Launcher, child_env, http_get
from ._dispatcher import amount

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
BACKENDS = ["asyncio", "trio"]
OTHER = {"asyncio": "trio", "trio": "asyncio"}
TOTAL = 1500
EXPECTED = sum((amount(i) for i in range(TOTAL)), Decimal(0))


class Script:
    """A helper script run as its own process, its stdout in a file."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        with self.out.open("a") as out, self.err.open("a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / f"_{name}.py"), *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                cwd=workdir,
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def wait(self, timeout: float = 60) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        return self.proc.returncode

    def text(self) -> str:
        return self.out.read_text()


async def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


def logged(log: Path) -> int:
    return log.read_text().count("\n") if log.exists() else 0


async def spend(base: str) -> tuple[Decimal, int]:
    body = (await http_get(f"{base}/health")).json()
    return Decimal(body["daily_spend"]), body["dispatches"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_dispatcher_killed_mid_stream_resumes_from_its_outbox(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    svc = await launcher.start(sqlite_url)
    args = (svc.ws_url, str(tmp_path / "d.outbox"), str(tmp_path / "d.log"), backend, str(TOTAL))
    log = tmp_path / "d.log"
    scripts = []
    try:
        for threshold in (300, 900):
            dispatcher = Script(tmp_path, "dispatcher", *args)
            scripts.append(dispatcher)
            await until(lambda t=threshold: logged(log) >= t, f"{threshold} costs promised")
            dispatcher.kill()
            assert logged(log) < TOTAL, "the dispatcher finished before it could be killed"
        last = Script(tmp_path, "dispatcher", *args)
        scripts.append(last)
        assert await last.wait() == 0, last.err.read_text()
        assert "done" in last.text()
    finally:
        for script in scripts:
            script.kill()
    assert await spend(svc.http_base) == (EXPECTED, TOTAL)
    assert logged(log) == TOTAL


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_service_killed_and_stopped_while_enqueue_goes_on(
    backend: str, launcher: Launcher, sqlite_url: str, tmp_path: Path
) -> None:
    """kill -9 of the service, then a stop of a while during which enqueue
    goes on into the outbox; a subscriber rides through both restarts and
    ends on the final spend."""
    svc = await launcher.start(sqlite_url)
    port = str(svc.port)
    log = tmp_path / "d.log"
    subscriber = Script(tmp_path, "subscriber", svc.ws_url, OTHER[backend])
    await until(lambda: subscriber.text().startswith("spend 0 0\n"), "the first spend")
    dispatcher = Script(
        tmp_path,
        "dispatcher",
        svc.ws_url,
        str(tmp_path / "d.outbox"),
        str(log),
        backend,
        str(TOTAL),
    )
    try:
        await until(lambda: logged(log) >= 300, "300 costs promised")
        svc.signal(signal.SIGKILL)
        await svc.wait_exit()
        assert logged(log) < TOTAL, "the dispatcher finished before the service was killed"
        svc = await launcher.start(sqlite_url, "--port", port)

        await until(lambda: logged(log) >= 700, "700 costs promised")
        # Hold the dispatcher while the service stops, so that the outage
        # surely has costs left to take.
        pause = tmp_path / "d.log.pause"
        pause.touch()
        assert await svc.stop() == 0
        down_at = logged(log)
        assert down_at < TOTAL - 200
        pause.unlink()
        # The service is down: enqueue goes on, into the outbox.
        await until(lambda: logged(log) >= down_at + 200, "promises while the service is down")
        assert dispatcher.proc.poll() is None
        svc = await launcher.start(sqlite_url, "--port", port)

        assert await dispatcher.wait() == 0, dispatcher.err.read_text()
        assert await spend(svc.http_base) == (EXPECTED, TOTAL)
        final = f" {EXPECTED}"
        await until(
            lambda: subscriber.text().rstrip().endswith(final), "the subscriber on the final spend"
        )
        assert subscriber.proc.poll() is None
    finally:
        dispatcher.kill()
        subscriber.kill()
