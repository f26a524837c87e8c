"""What several scenarios share: child processes, PostgreSQL schemas, RSS, clocks."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psycopg
import trio
from psycopg import sql

from .rows import Row

BENCH_DIR = Path(__file__).resolve().parent
PG_ENV = "BUDGET_BENCH_DATABASE_URL"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
READY = re.compile(rb"ws://(?P<host>[^\s:/]+):(?P<port>\d+)/ws")


def child_env() -> dict[str, str]:
    """The environment of a child process: no BUDGET_* settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def serve_command(database: str, *extra: str) -> list[str]:
    """``python -m budget_actor serve`` on a free loopback port."""
    return [
        sys.executable,
        "-m",
        "budget_actor",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--database",
        database,
        *extra,
    ]


def script_command(name: str, *args: str) -> list[str]:
    """A helper script of ``bench/`` run by path (it imports nothing from bench)."""
    return [sys.executable, str(BENCH_DIR / name), *args]


class Child:
    """A child process that prints a line containing ``ws://HOST:PORT/ws`` when ready.

    Standard error goes to ``log``; standard output is read line by line with
    a timeout. ``ready_s`` is the time from spawn to the ready line. Used as a
    context manager it is always stopped (SIGTERM, then SIGKILL) on exit.
    """

    def __init__(
        self, argv: Sequence[str], log: Path, *, ready_timeout: float = 30.0, stdin: bool = False
    ) -> None:
        self.log = log
        with open(log, "ab") as errors:  # the child keeps its own descriptor
            start = time.perf_counter()
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                env=child_env(),
                bufsize=0,
            )
        self._buffer = b""
        try:
            self.ready_line = self.read_line(ready_timeout)
        except BaseException:
            self.kill()
            raise
        self.ready_s = time.perf_counter() - start
        match = READY.search(self.ready_line)
        if match is None:
            self.kill()
            raise RuntimeError(f"{argv[1:4]}: no ready line, got {self.ready_line!r}{self._tail()}")
        self.port = int(match.group("port"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def read_line(self, timeout: float) -> bytes:
        """The next line of standard output (without the newline)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from pid {self.pid} in {timeout:.0f} s{self._tail()}")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait(5)
                    raise RuntimeError(f"pid {self.pid} exited with {code}{self._tail()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"; stderr: {text[-1500:]}" if text else ""

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` figure of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``…)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3 of the man page, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- PostgreSQL -----------------------------------------------------------------


def pg_base_url() -> str:
    return os.environ.get(PG_ENV, PG_DEFAULT)


def with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh, randomly named schema; yields the URL whose search_path is it.

    The schema is dropped (CASCADE) on exit. Raises ``psycopg.OperationalError``
    if the server cannot be reached.
    """
    base = pg_base_url()
    name = f"budget_bench_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield with_search_path(base, name)
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def pg_skipped(scenario: str, exc: BaseException) -> Row:
    """The row shown instead of PostgreSQL figures when the server is unreachable."""
    reason = " ".join(str(exc).split())[:200]
    print(f"  {scenario}: PostgreSQL skipped: {reason}", file=sys.stderr, flush=True)
    return Row(
        scenario=scenario,
        figure="postgresql: not measured",
        value=0.0,
        unit="",
        note=f"PostgreSQL at ${PG_ENV} (default {PG_DEFAULT}) unreachable: {reason}",
    )


# -- closed-loop senders ----------------------------------------------------------


@dataclass
class Load:
    """What a closed-loop round did: calls completed, seconds, per-call latency."""

    calls: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


async def closed_loop(
    call: Callable[[str], Awaitable[object]], senders: int, seconds: float, prefix: str
) -> Load:
    """``senders`` tasks, each calling ``call(unique_id)`` back to back until
    ``seconds`` have passed since the start; every call is timed.

    The clock runs from the start until the last call in flight completes, so
    ``rate`` counts only completed calls over the whole time they took.
    """
    latencies: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    finished = start

    async def sender(task: int) -> None:
        nonlocal finished
        i = 0
        while clock() < deadline:
            began = clock()
            await call(f"{prefix}-{task:03d}-{i:06d}")
            ended = clock()
            latencies.append(ended - began)
            finished = max(finished, ended)
            i += 1

    with trio.fail_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for task in range(senders):
                nursery.start_soon(sender, task)
    return Load(len(latencies), finished - start, latencies)
