"""Run ``budget-actor serve`` as a real process, for crash and restart tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

READY = re.compile(r"ws://[^\s]+:(\d+)/ws")


class ServeProcess:
    def __init__(self, *args: str, log: Path) -> None:
        self.args = [sys.executable, "-m", "budget_actor", "serve", "--port", "0", *args]
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> ServeProcess:
        errors = open(self.log, "a")  # the child keeps its own descriptor
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        errors.close()
        stdout = self.proc.stdout
        assert stdout is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
        match = READY.search(line)
        if match is None:
            self.kill()
            raise AssertionError(f"no ready line: {line!r}; log: {self.log.read_text()[-2000:]}")
        self.port = int(match.group(1))
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        code: int = await trio.to_thread.run_sync(self.proc.wait, 30)
        return code
