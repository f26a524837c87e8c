"""``python -m bench [NAME ...]``: run the scenarios, print one table, write JSON.

With no NAME every scenario runs, in registry order. The results (all rows,
per-round samples, notes, timings and the machine) go to ``bench/results.json``
(git-ignored), overwriting the previous run.

The exit status is 0 when every scenario ran, even if a figure missed its
target (the table says FAIL, and the JSON has ``"passed": false``): a missed
target is a finding, not a broken benchmark. It is 1 only when a scenario
crashed (its traceback is printed, the other scenarios still run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .rows import Row
from .scenarios import SCENARIOS

RESULTS = Path(__file__).with_name("results.json")
HEADERS = ("scenario", "figure", "target", "pass/fail")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def _commit() -> str | None:
    """The checked-out commit, with ``-dirty`` if the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if status else head


def format_table(rows: Sequence[Row]) -> str:
    cells = [(r.scenario, r.shown(), r.target, r.verdict) for r in rows]
    widths = [max(len(line[i]) for line in [HEADERS, *cells]) for i in range(len(HEADERS))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(HEADERS), rule, *(line(c) for c in cells)])


def format_notes(rows: Sequence[Row]) -> str:
    return "\n".join(f"* {r.scenario} / {r.figure}: {r.note}" for r in rows if r.note)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run budget_actor benchmarks."
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"scenarios to run (default: all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name}: {(scenario.__doc__ or '').strip().splitlines()[0]}")
        return 0
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    names = list(dict.fromkeys(args.names)) or list(SCENARIOS)

    rows: list[Row] = []
    timings: dict[str, float] = {}
    crashed: list[str] = []
    # The machine may be shared: the load says how much the figures can be trusted.
    load_start = os.getloadavg()
    suite_start = time.perf_counter()
    for name in names:
        print(f"running {name}...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            rows.extend(SCENARIOS[name]())
        except Exception:
            traceback.print_exc()
            crashed.append(name)
        timings[name] = round(time.perf_counter() - start, 2)
        outcome = "crashed after" if name in crashed else "took"
        print(f"  {name} {outcome} {timings[name]:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - suite_start
    load_end = os.getloadavg()

    print(format_table(rows))
    notes = format_notes(rows)
    if notes:
        print()
        print(notes)
    RESULTS.write_text(
        json.dumps(
            {
                "run_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": _commit(),
                "machine": _machine(),
                "scenarios": names,
                "crashed": crashed,
                "seconds": timings,
                "total_seconds": round(total, 2),
                "load_average": {"start": load_start, "end": load_end},
                "rows": [r.to_json() for r in rows],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")
    print(
        f"total {total:.1f} s; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end",
        file=sys.stderr,
    )
    failed = [r for r in rows if r.passed is False]
    if failed:
        print(f"{len(failed)} figure(s) missed the target (see FAIL above)", file=sys.stderr)
    if crashed:
        print(f"scenario(s) crashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
