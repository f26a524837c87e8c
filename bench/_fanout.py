"""``fanout``: 1,000 WebSocket subscribers in their own process, a paced
dispatcher in the bench process, the service in a third; how long after a
cost's ``ack`` its ``spend`` push reaches each subscriber, and the service's RSS."""

from __future__ import annotations

import gc
import math
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio
from trio_websocket import wrap_client_stream

from ._support import Child, cpu_seconds, proc_status_kib, script_command, serve_command
from .rows import Row, median, quantile

SUBSCRIBERS = 1_000
RATE = 2_000.0  # costs/s sent by the dispatcher
SECONDS = 10.0
COSTS = int(RATE * SECONDS)
# After the sending stops, acks still outstanding get this long to arrive.
DRAIN_S = 10.0
# After the last ack, subscribers get this long to receive the last push.
SETTLE_S = 2.0
# Delays are computed for every k-th acked cost (by seq) against every
# subscriber, k chosen so that there are at most MAX_PAIRS pairs (20,000 costs x
# 1,000 subscribers would be 20,000,000): the percentiles then take ~2 s of pure
# Python instead of 20.
MAX_PAIRS = 2_000_000
RSS_EVERY_S = 0.25
P99_TARGET_MS = 250.0
RSS_TARGET_MB = 150.0
USD = "0.000001"


class _Ack(msgspec.Struct):
    type: str
    dispatch_id: str = ""
    seq: int = 0


_decode_ack = msgspec.json.Decoder(_Ack).decode


@dataclass
class Dispatch:
    """Per cost i (dispatch id ``fan-i``): send and ack times, and the ack's seq.

    Only the first ``sent`` costs were sent; an ack time of 0 means no ack came.
    """

    sent_at: list[float] = field(default_factory=lambda: [0.0] * COSTS)
    acked_at: list[float] = field(default_factory=lambda: [0.0] * COSTS)
    seqs: list[int] = field(default_factory=lambda: [0] * COSTS)
    rss_kib: list[int] = field(default_factory=list)
    sent: int = 0
    acked: int = 0
    # From the first send to the last send, and to the last ack.
    send_s: float = 0.0
    ack_s: float = 0.0


async def _dispatch(port: int, service_pid: int) -> Dispatch:
    """Send costs paced at RATE (cost i at start + i/RATE) on one connection
    for SECONDS, timing every send and ack with ``time.time()``; then wait up to
    DRAIN_S for the outstanding acks. Meanwhile sample the service's VmRSS.

    Bounded in time whatever the service does: a service that falls behind
    applies TCP backpressure, so fewer than COSTS costs may be sent, and acks
    still missing after DRAIN_S are left out (and counted).
    """
    out = Dispatch()
    # Not open_websocket_url: its closing handshake can take a minute (or fail
    # on a ping that crosses it) when the service is far behind. The stream is
    # closed abruptly instead, once the figures are in.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as connection:
        ws = await wrap_client_stream(connection, stream, "127.0.0.1", "/ws")
        all_acked = trio.Event()
        sending = True
        began = time.perf_counter()

        async def reader() -> None:
            while True:
                frame = await ws.get_message()
                at = time.time()
                ack = _decode_ack(frame)
                if ack.type != "ack":
                    raise RuntimeError(f"dispatcher expected an ack, got {frame!r}")
                index = int(ack.dispatch_id.rpartition("-")[2])
                out.acked_at[index] = at
                out.seqs[index] = ack.seq
                out.acked += 1
                out.ack_s = time.perf_counter() - began
                if not sending and out.acked == out.sent:
                    all_acked.set()

        async def sample_rss() -> None:
            while True:
                out.rss_kib.append(proc_status_kib(service_pid, "VmRSS"))
                await trio.sleep(RSS_EVERY_S)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(sample_rss)
            start = trio.current_time()
            began = time.perf_counter()
            with trio.move_on_at(start + SECONDS):
                for i in range(COSTS):
                    await trio.sleep_until(start + i / RATE)
                    out.sent_at[i] = time.time()
                    await ws.send_message(
                        f'{{"type":"cost","dispatch_id":"fan-{i:07d}","usd":"{USD}"}}'
                    )
                    out.sent = i + 1
            out.send_s = time.perf_counter() - began
            sending = False
            if out.acked == out.sent:
                all_acked.set()
            with trio.move_on_after(DRAIN_S):
                await all_acked.wait()
            nursery.cancel_scope.cancel()
        connection.cancel_scope.cancel()
    return out


def _read_pushes(path: Path, count: int) -> list[tuple[array[int], array[float]]]:
    pushes: list[tuple[array[int], array[float]]] = []
    with open(path, "rb") as file:
        for _ in range(count):
            header = array("q")
            header.fromfile(file, 1)
            seqs = array("q")
            seqs.fromfile(file, header[0])
            times = array("d")
            times.fromfile(file, header[0])
            pushes.append((seqs, times))
    return pushes


@dataclass
class Delays:
    """Delays in ms over (subscriber, sampled acked cost) pairs, sorted."""

    after_ack: list[float]
    after_send: list[float]
    per_subscriber_p99: list[float]
    missing: int
    every: int

    @property
    def pairs(self) -> int:
        return len(self.after_ack)


def _delays(
    dispatch: Dispatch, pushes: list[tuple[array[int], array[float]]], stopped_at: float
) -> Delays:
    """For every subscriber and every ``every``-th acked cost (by seq), the
    time from the ack (and from the send) to the first push with that seq or later."""
    costs = sorted(
        (seq, acked_at, sent_at)
        for seq, acked_at, sent_at in zip(
            dispatch.seqs, dispatch.acked_at, dispatch.sent_at, strict=True
        )
        if acked_at > 0
    )
    every = max(1, -(-len(costs) * len(pushes) // MAX_PAIRS))
    sample = costs[::every]
    after_ack: list[float] = []
    after_send: list[float] = []
    per_subscriber: list[float] = []
    missing = 0
    for seqs, times in pushes:
        n = len(seqs)
        k = 0
        mine: list[float] = []
        for seq, acked_at, sent_at in sample:
            while k < n and seqs[k] < seq:
                k += 1
            # No push with this seq or later before the subscribers stopped:
            # counted as pushed at the stop, a lower bound on the real delay.
            pushed_at = times[k] if k < n else stopped_at
            if k == n:
                missing += 1
            mine.append((pushed_at - acked_at) * 1000)
            after_send.append((pushed_at - sent_at) * 1000)
        after_ack.extend(mine)
        if mine:
            mine.sort()
            per_subscriber.append(quantile(mine, 0.99))
    after_ack.sort()
    after_send.sort()
    per_subscriber.sort()
    return Delays(after_ack, after_send, per_subscriber, missing, every)


def _q(ordered: list[float], q: float) -> float:
    """``quantile``, or infinity when no cost was acknowledged at all."""
    return quantile(ordered, q) if ordered else math.inf


def _mb(kib: float) -> float:
    return kib * 1024 / 1e6


def fanout() -> list[Row]:
    """Push delay after ack and service RSS with 1,000 subscribers in another process."""
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        db = Path(tmp, "fanout.db")
        out = Path(tmp, "pushes.bin")
        # Every subscriber comes from 127.0.0.1: lift the per-address cap too.
        serve = serve_command(
            f"sqlite:///{db}",
            "--max-connections",
            str(SUBSCRIBERS + 100),
            "--max-per-address",
            str(SUBSCRIBERS + 100),
        )
        with Child(serve, Path(tmp, "serve.log")) as service:
            rss_idle = proc_status_kib(service.pid, "VmRSS")
            connect_start = time.perf_counter()
            argv = script_command("fanout_subscribers.py", service.url, str(SUBSCRIBERS), str(out))
            with Child(argv, Path(tmp, "subscribers.log"), ready_timeout=120, stdin=True) as subs:
                connect_s = time.perf_counter() - connect_start
                rss_subscribed = proc_status_kib(service.pid, "VmRSS")
                cpu_before = cpu_seconds(service.pid), cpu_seconds(subs.pid)
                gc.collect()
                dispatch = trio.run(_dispatch, service.port, service.pid)
                cpu_service = cpu_seconds(service.pid) - cpu_before[0]
                cpu_subs = cpu_seconds(subs.pid) - cpu_before[1]
                time.sleep(SETTLE_S)
                stopped_at = time.time()
                subs.send_line("stop")
                done = subs.read_line(60).decode()
                if not done.startswith("done"):
                    raise RuntimeError(f"subscriber process said {done!r}")
            rss_peak = proc_status_kib(service.pid, "VmHWM")
        pushes = _read_pushes(out, SUBSCRIBERS)
    print("  fanout: computing delays...", file=sys.stderr, flush=True)
    delays = _delays(dispatch, pushes, stopped_at)

    acked_at = [t for t in dispatch.acked_at if t > 0]
    ack_rate = dispatch.acked / dispatch.ack_s if dispatch.acked else 0.0
    push_counts = sorted(len(seqs) for seqs, _ in pushes)
    push_span = max(t for _, times in pushes for t in times[-1:]) - min(
        t for _, times in pushes for t in times[:1]
    )
    negative = sum(1 for d in delays.after_ack if d < 0) / max(1, delays.pairs)
    busy = dispatch.ack_s or dispatch.send_s
    unacked = dispatch.sent - dispatch.acked

    run = (
        f"one run: `budget_actor serve` (SQLite temporary file, --max-connections and "
        f"--max-per-address {SUBSCRIBERS + 100}) in its own process; {SUBSCRIBERS:,} "
        f"trio-websocket subscribers in a second (bench/fanout_subscribers.py; all connected and "
        f"subscribed in {connect_s:.1f} s); the dispatcher, one connection in the bench "
        f"process, paces costs at {RATE:,.0f}/s for {SECONDS:.0f} s"
    )
    pairs = (
        f"over all (subscriber, acked cost) pairs for every {delays.every}th acked cost by seq "
        f"({delays.pairs:,} pairs)"
        if delays.every > 1
        else f"over all (subscriber, acked cost) pairs ({delays.pairs:,} pairs)"
    )
    missing = (
        f"{delays.missing:,} pairs had no push with that seq or later {SETTLE_S:.0f} s after "
        "the dispatch ended (counted at that time, a lower bound)"
    )
    subscriber_p99 = delays.per_subscriber_p99 or [math.inf]
    return [
        Row(
            scenario="fanout",
            figure=f"dispatcher: acked costs/s, paced at {RATE:,.0f}/s",
            value=ack_rate,
            unit="costs/s",
            at_least=RATE * 0.95,
            note=(
                f"{run}. The premise of the delay figures: that the service keeps up "
                f"(target: 95% of the pace). Sent {dispatch.sent:,} of {COSTS:,} in "
                f"{dispatch.send_s:.1f} s (a send blocks when the service stops reading: TCP "
                f"backpressure); {dispatch.acked:,} acked by {dispatch.ack_s:.1f} s after the "
                f"first send; {unacked:,} still unacked {DRAIN_S:.0f} s after the sending "
                "stopped. Acked costs/s = acked / (first send to last ack)."
            ),
            extra={"sent": dispatch.sent, "acked": dispatch.acked, "unacked": unacked},
        ),
        Row(
            scenario="fanout",
            figure="spend push after ack, p50 (acked costs)",
            value=_q(delays.after_ack, 0.5),
            unit="ms",
            note=(
                "delay = time.time() at which a subscriber received the first spend push "
                "with seq >= the cost's seq, minus time.time() at which the dispatcher "
                f"received that cost's ack (same machine, same clock); {pairs}; costs never "
                "acked are not in it. Negative when the push arrived before the ack (the "
                "actor publishes when it counts a cost, the ack waits for the commit): "
                f"{negative:.0%} of pairs. {missing}."
            ),
        ),
        Row(
            scenario="fanout",
            figure="spend push after ack, p99 (acked costs)",
            value=_q(delays.after_ack, 0.99),
            unit="ms",
            at_most=P99_TARGET_MS,
            note=(
                f"same pairs; max {_q(delays.after_ack, 1):,.0f} ms. Per-subscriber p99s "
                f"range from {subscriber_p99[0]:,.0f} to {subscriber_p99[-1]:,.0f} ms "
                f"(median {_q(subscriber_p99, 0.5):,.0f})."
            ),
            extra={"per_subscriber_p99_ms": [round(x, 1) for x in delays.per_subscriber_p99]},
        ),
        Row(
            scenario="fanout",
            figure="spend push after send, p99 (acked costs)",
            value=_q(delays.after_send, 0.99),
            unit="ms",
            note=(
                "same pairs, from the dispatcher's send of the cost instead of its ack: how "
                f"far a dashboard lags behind spending. p50 {_q(delays.after_send, 0.5):,.0f} ms."
            ),
        ),
        Row(
            scenario="fanout",
            figure="spend pushes received per subscriber",
            value=median(push_counts) / push_span if push_span > 0 else 0.0,
            unit="/s",
            note=(
                f"median subscriber's pushes over the {push_span:.1f} s from the first to the "
                f"last push received (min {push_counts[0]:,}, median "
                f"{median(push_counts):,.0f}, max {push_counts[-1]:,} per subscriber; "
                "latest-value, so a busy service skips states). CPU from the first send to "
                f"the end of the drain ({busy:.1f} s): service {cpu_service / busy:.0%}, "
                f"subscriber process {cpu_subs / busy:.0%} of one core (2 cores, 3 processes)."
            ),
        ),
        Row(
            scenario="fanout",
            figure=f"service RSS peak, {SUBSCRIBERS:,} subscribers",
            value=_mb(rss_peak),
            unit="MB",
            at_most=RSS_TARGET_MB,
            note=(
                "VmHWM of the service process at the end (peak resident set since start; "
                f"MB = 10^6 bytes). VmRSS: {_mb(rss_idle):.0f} MB when ready, "
                f"{_mb(rss_subscribed):.0f} MB with all subscribers connected, max "
                f"{_mb(max(dispatch.rss_kib)):.0f} MB sampled every {RSS_EVERY_S} s "
                f"during the dispatch; {len(acked_at):,} costs in the journal."
            ),
        ),
    ]
