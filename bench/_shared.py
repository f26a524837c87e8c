"""``shared``: several ``budget-actor serve`` instances on one PostgreSQL schema,
sharing one daily budget. Aggregate acked costs/s with 1, 2 and 3 instances,
and, with 3 under load, how old each instance's view of the global spend is.

The bench process starts the instances (one fresh schema for the whole
scenario, instances added one by one: 1, then 2, then 3 running) and, for each
count, runs a *driver* child process (``python -m bench._shared drive CONFIG``,
this very module) so that the load generator competes for the 2 cores like the
servers and PostgreSQL do, instead of hiding in the bench process.

The driver, one trio process with one clock (``time.perf_counter``), opens per
instance one pipelining dispatcher connection (as ``ws-ingest``) and
``SUBSCRIBERS`` subscriber connections. It records the time of every ``ack``
from any instance, in the order received, and every ``spend`` push (time,
global ``dispatches``, ``instance_dispatches``, ``daily_spend``). After a
warm-up it measures a window of fixed length, stops sending, waits for every
ack, then waits until every instance pushes the exact final global figures,
and asks each one's health.
It prints all that as one JSON object; the bench process does the arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import trio
from trio_websocket import open_websocket_url

from ._support import (
    BENCH_DIR,
    Child,
    child_env,
    cpu_seconds,
    pg_schema,
    pg_skipped,
    serve_command,
)
from .rows import Row, quantile

INSTANCES = (1, 2, 3)
# The service's default, passed explicitly so the figure is tied to it.
SYNC_INTERVAL_S = 0.2
# Per instance count: load for WARMUP_S, then a measured window of WINDOW_S
# (samples are its SLICE_S slices). The instances ack ~3,000-4,500 costs/s in
# all here, so a window holds ~15,000-22,000 costs; with start-ups, drains and
# the convergence waits the scenario takes ~25 s.
WARMUP_S = 1.0
WINDOW_S = 5.0
SLICE_S = 1.0
# After the last ack, each instance gets this long to push the exact final
# global figures (expected: one sync interval plus a query).
CONVERGE_S = 5.0
# Costs in flight per dispatcher connection before it waits for an ack: the
# server's own window (budget_actor.net.server.ACK_WINDOW), as in ws-ingest.
WS_WINDOW = 1024
# Subscriber connections per instance. The service pushes at most one `spend`
# per 0.1 s per subscriber (budget_actor.net.server.PUSH_INTERVAL_S), so one
# subscriber gives ~40 samples per window; several, each on its own phase, give
# enough for a p99.
SUBSCRIBERS = 8
STALENESS_P99_TARGET_S = 1.0
# Far below any threshold: 8.00 (80% of the default cap) needs 8,000,000 costs.
USD = "0.000001"
DRIVER_TIMEOUT_S = WARMUP_S + WINDOW_S + CONVERGE_S + 60.0
ROOT = BENCH_DIR.parent


# -- the driver (child process) -------------------------------------------------


class _Ack(msgspec.Struct):
    type: str
    duplicate: bool = False


class _Push(msgspec.Struct):
    type: str
    dispatches: int = -1
    instance_dispatches: int = -1
    daily_spend: str = ""


_decode_ack = msgspec.json.Decoder(_Ack).decode
_decode_push = msgspec.json.Decoder(_Push).decode


def _postgres_cpu() -> float:
    """CPU seconds of every ``postgres`` process on the machine (server and backends)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name, _, rest = text.partition("(")[2].rpartition(")")
        if name.startswith("postgres"):
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def _cpu_snapshot(pids: Sequence[int]) -> dict[str, Any]:
    busy, total = _machine_jiffies()
    return {
        "servers": [cpu_seconds(pid) for pid in pids],
        "postgres": _postgres_cpu(),
        "driver": time.process_time(),
        "machine_busy": busy,
        "machine_total": total,
    }


async def _drive(config: dict[str, Any]) -> dict[str, Any]:
    """Load every instance, watch every instance; see the module docstring."""
    urls: list[str] = config["urls"]
    pids: list[int] = config["pids"]
    base: int = config["base"]
    prefix: str = config["prefix"]
    n = len(urls)
    # Subscriber s watches instance s // SUBSCRIBERS.
    m = n * SUBSCRIBERS
    clock = time.perf_counter
    ack_t: list[float] = []  # every ack from any instance, in the order received
    ack_i: list[int] = []  # ...and which instance sent it
    sent = [0] * n
    acked = [0] * n
    pushes: list[list[tuple[float, int, int, str]]] = [[] for _ in range(m)]
    first_push = [trio.Event() for _ in range(m)]
    healths: list[dict[str, Any] | None] = [None] * n
    health_came = [trio.Event() for _ in range(n)]
    expected = -1  # the final global dispatches, once every ack is in
    converged_at: list[float | None] = [None] * m
    converged = [trio.Event() for _ in range(m)]
    stop = trio.Event()
    window: dict[str, Any] = {}

    async def subscriber(s: int, ws: Any) -> None:
        await ws.send_message('{"type":"subscribe"}')
        mine = pushes[s]
        while True:
            frame = await ws.get_message()
            at = clock()
            push = _decode_push(frame)
            if push.type == "spend":
                mine.append((at, push.dispatches, push.instance_dispatches, push.daily_spend))
                first_push[s].set()
                if push.dispatches == expected and converged_at[s] is None:
                    converged_at[s] = at
                    converged[s].set()
            elif push.type == "health":
                healths[s // SUBSCRIBERS] = json.loads(frame)
                health_came[s // SUBSCRIBERS].set()

    async def dispatcher(i: int, ws: Any) -> None:
        room = trio.Event()
        drained = trio.Event()

        async def reader() -> None:
            while True:
                frame = await ws.get_message()
                at = clock()
                ack = _decode_ack(frame)
                if ack.type != "ack" or ack.duplicate:
                    raise RuntimeError(f"instance {i}: expected a fresh ack, got {frame!r}")
                ack_t.append(at)
                ack_i.append(i)
                acked[i] += 1
                if sent[i] - acked[i] < WS_WINDOW:
                    room.set()
                if stop.is_set() and acked[i] == sent[i]:
                    drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            tag = f"{prefix}-{i}"
            while not stop.is_set():
                if sent[i] - acked[i] >= WS_WINDOW:
                    room = trio.Event()
                    await room.wait()
                    continue
                await ws.send_message(
                    f'{{"type":"cost","dispatch_id":"{tag}-{sent[i]:07d}","usd":"{USD}"}}'
                )
                sent[i] += 1
            if acked[i] == sent[i]:
                drained.set()
            await drained.wait()
            nursery.cancel_scope.cancel()

    async def timer() -> None:
        await trio.sleep(config["warmup_s"])
        window["start"] = clock()
        window["cpu_start"] = _cpu_snapshot(pids)
        await trio.sleep(config["window_s"])
        window["end"] = clock()
        window["cpu_end"] = _cpu_snapshot(pids)
        stop.set()

    with trio.fail_after(DRIVER_TIMEOUT_S - 10):
        async with contextlib.AsyncExitStack() as stack:
            subs = [
                await stack.enter_async_context(open_websocket_url(urls[s // SUBSCRIBERS]))
                for s in range(m)
            ]
            dispatchers = [await stack.enter_async_context(open_websocket_url(u)) for u in urls]
            async with trio.open_nursery() as watchers:
                for s, ws in enumerate(subs):
                    watchers.start_soon(subscriber, s, ws)
                for event in first_push:
                    await event.wait()
                began = clock()
                async with trio.open_nursery() as load:
                    load.start_soon(timer)
                    for i, ws in enumerate(dispatchers):
                        load.start_soon(dispatcher, i, ws)
                expected = base + len(ack_t)
                for s in range(m):  # a push may already have said so
                    at, dispatches, _, _ = pushes[s][-1]
                    if dispatches == expected and converged_at[s] is None:
                        converged_at[s] = at
                        converged[s].set()
                with trio.move_on_after(config["converge_s"]):
                    for event in converged:
                        await event.wait()
                for i in range(n):
                    await subs[i * SUBSCRIBERS].send_message(f'{{"type":"health","id":"end-{i}"}}')
                with trio.move_on_after(5):
                    for event in health_came:
                        await event.wait()
                watchers.cancel_scope.cancel()
    return {
        "began": began,
        "window": window,
        "ack_t": ack_t,
        "ack_i": ack_i,
        "sent": sent,
        "acked": acked,
        "pushes": pushes,
        "expected": expected,
        "converged_at": converged_at,
        "healths": healths,
    }


def _driver_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "drive":
        print("usage: python -m bench._shared drive CONFIG_JSON", file=sys.stderr)
        return 2
    result = trio.run(_drive, json.loads(argv[1]))
    sys.stdout.write(json.dumps(result))
    return 0


# -- the bench side --------------------------------------------------------------


def _run_driver(config: dict[str, Any]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench._shared", "drive", json.dumps(config)]
    done = subprocess.run(
        argv, cwd=ROOT, env=child_env(), capture_output=True, timeout=DRIVER_TIMEOUT_S
    )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"driver exited with {done.returncode}: {tail}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@dataclass
class Staleness:
    """Ages in seconds, sorted: of the global view (``ages``) and of its
    others' part (``other_ages``); per measure (global, others), how many
    samples were ahead of the acks (0 s) or older than the run."""

    ages: list[float]
    other_ages: list[float]
    ahead: list[int]
    older: list[int]


@dataclass
class Run:
    """One driver run against ``n`` instances, with what the bench derived from it."""

    n: int
    base: list[int]  # per instance: acked costs before this run
    data: dict[str, Any]

    @property
    def start(self) -> float:
        return float(self.data["window"]["start"])

    @property
    def end(self) -> float:
        return float(self.data["window"]["end"])

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def acks_in(self, start: float, end: float, instance: int | None = None) -> int:
        times: list[float] = self.data["ack_t"]
        if instance is None:
            return bisect_right(times, end) - bisect_left(times, start)
        return sum(
            1
            for t, i in zip(times, self.data["ack_i"], strict=True)
            if i == instance and start <= t <= end
        )

    @property
    def rate(self) -> float:
        return self.acks_in(self.start, self.end) / self.seconds

    def slice_rates(self) -> list[float]:
        slices = max(1, round(self.seconds / SLICE_S))
        width = self.seconds / slices
        return [
            self.acks_in(self.start + k * width, self.start + (k + 1) * width) / width
            for k in range(slices)
        ]

    def instance_rates(self) -> list[float]:
        return [self.acks_in(self.start, self.end, i) / self.seconds for i in range(self.n)]

    def cpu(self) -> str:
        """CPU use during the window, as shares of one core."""
        a, b = self.data["window"]["cpu_start"], self.data["window"]["cpu_end"]
        s = self.seconds
        servers = "+".join(
            f"{(y - x) / s:.0%}" for x, y in zip(a["servers"], b["servers"], strict=True)
        )
        machine = (b["machine_busy"] - a["machine_busy"]) / max(
            1, b["machine_total"] - a["machine_total"]
        )
        return (
            f"CPU in the window, in shares of one core: server(s) {servers}, all postgres "
            f"processes {(b['postgres'] - a['postgres']) / s:.0%}, driver "
            f"{(b['driver'] - a['driver']) / s:.0%}; the machine's 2 cores {machine:.0%} busy"
        )

    def staleness(self, instance: int | None = None) -> Staleness:
        """Per ``spend`` push received in the window (every subscriber of every
        instance, or of ``instance`` only), how old the view it shows is.

        Global: max(0, t - T(D)), T(D) the time the driver received the D-th
        ack of the run over all instances (D counted from the run's base).
        Others' part: the same for D - instance_dispatches (the other
        instances' figure as last synced) against the acks of the others only.
        A D whose ack had not been received by t (the instance's own live count
        runs ahead of its acks) gives 0 and counts as ahead; a D from before
        the run gives t - run start (a lower bound) and counts as older.
        """
        ack_t: list[float] = self.data["ack_t"]
        ack_i: list[int] = self.data["ack_i"]
        total_base = sum(self.base)
        began = float(self.data["began"])
        out = Staleness([], [], [0, 0], [0, 0])

        def age(t: float, k: int, times: list[float], which: int) -> float:
            if k <= 0:
                out.older[which] += 1
                return t - began
            if k > len(times) or times[k - 1] >= t:
                out.ahead[which] += 1
                return 0.0
            return t - times[k - 1]

        others_t = [[t for t, j in zip(ack_t, ack_i, strict=True) if j != i] for i in range(self.n)]
        for s, pushes in enumerate(self.data["pushes"]):
            i = s // SUBSCRIBERS
            if instance is not None and i != instance:
                continue
            for t, dispatches, own, _ in pushes:
                if not self.start <= t <= self.end:
                    continue
                out.ages.append(age(t, dispatches - total_base, ack_t, 0))
                others = dispatches - own - (total_base - self.base[i])
                out.other_ages.append(age(t, others, others_t[i], 1))
        out.ages.sort()
        out.other_ages.sort()
        return out


def _anomalies(run: Run) -> tuple[int, int]:
    """Over every push of the run: (global or own dispatches lower than in the
    subscriber's previous push, global dispatches above the run's final total).
    Costs are never repeated here, so both should be 0."""
    final = sum(run.base) + len(run.data["ack_t"])
    decreases = above = 0
    for pushes in run.data["pushes"]:
        previous = (-1, -1)
        for _, dispatches, own, _ in pushes:
            decreases += dispatches < previous[0] or own < previous[1]
            above += dispatches > final
            previous = (dispatches, own)
    return decreases, above


def _store_totals(url: str) -> tuple[int, Decimal, int]:
    """(sum of share dispatches, sum of share spend, journal rows) in the schema."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        dispatches, spend = conn.execute(
            "SELECT COALESCE(sum(dispatches), 0), COALESCE(sum(spend), 0) FROM budget_shares"
        ).fetchone() or (0, 0)
        journal = conn.execute("SELECT count(*) FROM budget_journal").fetchone() or (0,)
    return int(dispatches), Decimal(str(spend)), int(journal[0])


def _log_problems(logs: Sequence[Path]) -> list[str]:
    """WARNING/ERROR lines in the servers' logs (a healthy run has none)."""
    found: list[str] = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if "WARNING" in line or "ERROR" in line or "Traceback" in line:
                found.append(f"{log.stem}: {line.strip()[:200]}")
    return found


def _convergence(run: Run, truth: tuple[int, Decimal, int]) -> tuple[int, list[str]]:
    """How many instances ended on the exact final global figures (the last
    push to every one of its subscribers, and its health), and per instance
    what they showed."""
    final, spend, _ = truth
    exact = Decimal(USD) * final
    ok = 0
    detail: list[str] = []
    last_ack = run.data["ack_t"][-1] if run.data["ack_t"] else run.end
    for i in range(run.n):
        subs = range(i * SUBSCRIBERS, (i + 1) * SUBSCRIBERS)
        last = [run.data["pushes"][s][-1] for s in subs]
        health = run.data["healths"][i] or {}
        times = [run.data["converged_at"][s] for s in subs]
        good = (
            all(d == final and Decimal(shown) == exact for _, d, _, shown in last)
            and exact == spend
            and health.get("dispatches") == final
            and Decimal(str(health.get("daily_spend", "-1"))) == exact
        )
        ok += good
        when = (
            f"all {SUBSCRIBERS} by {max(0.0, max(times) - last_ack) * 1000:.0f} ms after the "
            "last ack"
            if all(t is not None for t in times)
            else f"{sum(t is None for t in times)} of {SUBSCRIBERS} subscribers never"
        )
        shown = sorted({(d, v) for _, d, _, v in last})
        detail.append(
            f"i{i}: last pushes {', '.join(f'{d:,} / ${v}' for d, v in shown)} ({when}), "
            f"health {health.get('dispatches')} / ${health.get('daily_spend')}, "
            f"sync_age_s {health.get('sync_age_s')}"
        )
    return ok, detail


def shared() -> list[Row]:
    """1-3 instances sharing one budget on PostgreSQL: costs/s, and the global view's staleness."""
    try:
        with pg_schema() as url, tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
            return _measure(url, Path(tmp))
    except psycopg.OperationalError as exc:
        return [pg_skipped("shared", exc)]


def _measure(url: str, tmp: Path) -> list[Row]:
    runs: list[Run] = []
    truths: list[tuple[int, Decimal, int]] = []
    base = [0] * max(INSTANCES)
    logs: list[Path] = []
    ready_s: list[float] = []
    with contextlib.ExitStack() as stack:
        servers: list[Child] = []
        for n in INSTANCES:
            while len(servers) < n:
                k = len(servers)
                logs.append(tmp / f"i{k}.log")
                argv = serve_command(
                    url,
                    "--instance-id",
                    f"i{k}",
                    "--sync-interval",
                    str(SYNC_INTERVAL_S),
                    "--spill",
                    str(tmp / f"i{k}.spill"),
                )
                servers.append(stack.enter_context(Child(argv, logs[-1])))
                ready_s.append(servers[-1].ready_s)
            time.sleep(2 * SYNC_INTERVAL_S)  # every instance has synced the others once
            config = {
                "urls": [s.url for s in servers],
                "pids": [s.pid for s in servers],
                "base": sum(base),
                "prefix": f"n{n}",
                "warmup_s": WARMUP_S,
                "window_s": WINDOW_S,
                "converge_s": CONVERGE_S,
            }
            data = _run_driver(config)
            runs.append(Run(n, base[:n], data))
            for i, count in enumerate(data["acked"]):
                base[i] += count
            truths.append(_store_totals(url))
        codes = []
        for server in servers:
            codes.append(server.stop())
    problems = _log_problems(logs)
    return _rows(runs, truths, codes, problems, ready_s)


def _rows(
    runs: list[Run],
    truths: list[tuple[int, Decimal, int]],
    codes: list[int],
    problems: list[str],
    ready_s: list[float],
) -> list[Row]:
    setup = (
        f"One fresh PostgreSQL schema; `budget-actor serve --instance-id iK --sync-interval "
        f"{SYNC_INTERVAL_S}` processes started one by one (ready in "
        f"{', '.join(f'{s:.1f}' for s in ready_s)} s), so that {', '.join(map(str, INSTANCES))} "
        "run for the respective figures. Per count, a driver child process (one trio "
        "process: per instance one pipelining dispatcher connection with at most "
        f"{WS_WINDOW} costs unacked, as ws-ingest, and {SUBSCRIBERS} subscriber connections) "
        "loads "
        f"every instance for {WARMUP_S:.0f} s of warm-up and a {WINDOW_S:.0f} s window; "
        "value = acks received in the window / its length (the mean, not a median); "
        f"samples = the {SLICE_S:.0f} s slices. Servers, driver and PostgreSQL "
        "(synchronous_commit=on) share the machine's 2 cores, so these are not "
        "per-machine scaling figures: more instances mostly split the same CPU."
    )
    stops = (
        "every server exited 0 on SIGTERM"
        if all(c == 0 for c in codes)
        else f"server exit codes {codes}"
    )
    health = (
        "no WARNING/ERROR lines in the servers' logs"
        if not problems
        else f"{len(problems)} WARNING/ERROR lines in the servers' logs, first: "
        + " | ".join(problems[:3])
    )
    rows: list[Row] = []
    for run in runs:
        per_instance = ", ".join(f"{r:,.0f}" for r in run.instance_rates())
        note = (
            f"{setup} This run: per instance {per_instance} costs/s; {run.cpu()}."
            if run.n == 1
            else f"as 1 instance. Per instance {per_instance} costs/s; {run.cpu()}."
        )
        if run.n == max(INSTANCES):
            note += f" Ratio to 1 instance: {run.rate / runs[0].rate:.2f}. {stops}; {health}."
        rows.append(
            Row(
                scenario="shared",
                figure=f"{run.n} instance{'s' if run.n > 1 else ''}: acked costs/s, all together",
                value=run.rate,
                unit="costs/s",
                samples=tuple(run.slice_rates()),
                note=note,
                extra={
                    "sent": run.data["sent"],
                    "acked": run.data["acked"],
                    "per_instance_rate": [round(r, 1) for r in run.instance_rates()],
                },
            )
        )

    loaded = runs[-1]
    n = loaded.n
    stale = loaded.staleness()
    ages, other_ages = stale.ages, stale.other_ages
    if not ages:
        raise RuntimeError("no spend push received in the measured window")
    instance_ages = [loaded.staleness(i).ages for i in range(n)]
    per_instance_p99 = [quantile(a, 0.99) if a else math.nan for a in instance_ages]
    two = next((r.staleness() for r in runs if r.n == 2), None)
    method = (
        f"{n} instances, in the window of the `{n} instances` figure (under that load). The "
        "driver records on one clock the time of every ack from any instance, in the order "
        f"received, and of every `spend` push to {SUBSCRIBERS} subscribers per instance "
        "(the service pushes at most every 0.1 s per subscriber) with its global "
        "`dispatches` D. Sample = max(0, t - T(D)), T(D) = when the D-th ack over all "
        f"instances (counted from the run's start) was received: {len(ages):,} pushes "
        f"({', '.join(f'{len(a):,}' for a in instance_ages)} per instance). A D whose ack "
        "had not arrived by t gives 0 (the instance counts its own costs before their "
        f"commit and acks after, so its live figure runs ahead): {stale.ahead[0]:,} "
        f"samples; D older than the run: {stale.older[0]}. Caveat: that own lead hides "
        "part of the others' lag in this measure; the `others' part` row does not. T(D) is "
        "when the driver received the ack, which trails the commit (acks queue behind up to "
        f"{WS_WINDOW} in flight per connection, on a saturated machine), so the ages are "
        "relative to what the dispatchers had seen acknowledged, which flatters the service "
        "by up to that ack delay. Acks "
        "and pushes are timed in one trio process, so its scheduling delays hit both alike; "
        "a push's age is sampled only when a push is sent."
    )
    rows += [
        Row(
            scenario="shared",
            figure=f"global view staleness, {n} instances, p50",
            value=quantile(ages, 0.5),
            unit="s",
            note=method,
        ),
        Row(
            scenario="shared",
            figure=f"global view staleness, {n} instances, p99",
            value=quantile(ages, 0.99),
            unit="s",
            at_most=STALENESS_P99_TARGET_S,
            note=(
                "same samples. Per-instance p99: "
                + ", ".join(f"i{i} {p:.3f} s" for i, p in enumerate(per_instance_p99))
                + f". Expected bound: sync interval {SYNC_INTERVAL_S} s + the sync query + "
                "the others' commit latency."
                + (
                    f" With 2 instances (their run): p50 {quantile(two.ages, 0.5):.3f} s, "
                    f"p99 {quantile(two.ages, 0.99):.3f} s over {len(two.ages):,} pushes."
                    if two and two.ages
                    else ""
                )
            ),
            extra={"per_instance_p99_s": per_instance_p99},
        ),
        Row(
            scenario="shared",
            figure=f"global view staleness, {n} instances, max",
            value=ages[-1],
            unit="s",
            note="same samples.",
        ),
        Row(
            scenario="shared",
            figure=f"others' part staleness, {n} instances, p99",
            value=quantile(other_ages, 0.99),
            unit="s",
            note=(
                "same pushes, stricter: D minus the push's own instance_dispatches (the other "
                "instances' figure as last read from PostgreSQL) against the acks of the other "
                f"instances only (0 when ahead of them: {stale.ahead[1]:,} samples; older than "
                f"the run: {stale.older[1]}). p50 {quantile(other_ages, 0.5):.3f} s, max "
                f"{other_ages[-1]:.3f} s."
            ),
        ),
    ]

    truth = truths[-1]
    ok, detail = _convergence(loaded, truth)
    decreases, above = (sum(x) for x in zip(*(_anomalies(r) for r in runs), strict=True))
    acked_total = sum(sum(run.data["acked"]) for run in runs)
    earlier = [
        f"{r.n}: {_convergence(r, t)[0]} of {r.n}" for r, t in zip(runs, truths, strict=True)
    ][:-1]
    rows.append(
        Row(
            scenario="shared",
            figure=f"instances on the exact final global figures, {n} instances",
            value=float(ok),
            unit=f"of {n}",
            at_least=float(n),
            note=(
                f"after the load stopped and every ack was in, each instance's last spend push "
                f"(waited for up to {CONVERGE_S:.0f} s) and its health must show the global "
                f"dispatches and daily_spend exactly as in PostgreSQL: {truth[0]:,} dispatches "
                f"and ${truth[1]} in budget_shares, {truth[2]:,} journal rows, {acked_total:,} "
                f"costs acknowledged over the scenario. {'; '.join(detail)}. Earlier runs "
                f"(instances: converged): {', '.join(earlier)}. Over every push of every run: "
                f"{decreases} with global or own dispatches lower than the subscriber's previous "
                f"push, {above} with global dispatches above the run's final total."
            ),
            extra={
                "store_dispatches": truth[0],
                "acked": acked_total,
                "journal": truth[2],
                "decreasing_pushes": decreases,
                "pushes_above_final": above,
            },
        )
    )
    return rows


if __name__ == "__main__":
    sys.exit(_driver_main(sys.argv[1:]))
