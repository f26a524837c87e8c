"""A throwaway PostgreSQL cluster of a test's own: its own data directory, port
and socket directory, so that a test may stop, crash or restart it without
touching the machine's shared server.

Built with the binaries in ``/usr/lib/postgresql/*/bin`` and run as the
``postgres`` user (``runuser``), since PostgreSQL refuses to run as root.
:func:`available` says why a cluster cannot be made here (not root, no
binaries), for a skip message.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

# Generous: the machine is small and shared, and a crash restart replays WAL.
START_TIMEOUT_S = 60


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def available() -> str | None:
    """None if a throwaway cluster can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "a throwaway PostgreSQL cluster needs root (to run it as user postgres)"
    if _bindir() is None:
        return "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` user to run a throwaway cluster as"
    if shutil.which("runuser") is None:
        return "no `runuser` to run a throwaway cluster as user postgres"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Cluster:
    """``initdb`` in a fresh temporary directory; :meth:`start`, :meth:`stop`,
    :meth:`restart`; :meth:`destroy` stops it and removes everything."""

    def __init__(self) -> None:
        bindir = _bindir()
        assert bindir is not None, available()
        self.bin = bindir
        # Not pytest's tmp_path: that is root's, and closed to postgres.
        self.root = Path(tempfile.mkdtemp(prefix="budget-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        account = pwd.getpwnam("postgres")
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        # fsync off: a crash here is a killed process, not a power cut, and
        # the shared machine's disk is slow enough already.
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.root} -c fsync=off"
        )
        self._ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-o", options, "-l", str(self.log))

    def stop(self, mode: str = "fast") -> None:
        """``mode``: ``fast`` (roll back open transactions, shut down cleanly)
        or ``immediate`` (kill every server process, as a crash would)."""
        self._ctl("stop", "-w", "-t", str(START_TIMEOUT_S), "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        try:
            self._ctl("stop", "-w", "-m", "immediate", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _ctl(self, *args: str, check: bool = True) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args, check=check)

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / program), *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
            cwd=self.root,
        )
        if check and done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(
                f"{program} {' '.join(args)} failed ({done.returncode}):"
                f" {done.stdout}{done.stderr}\n{log}"
            )
