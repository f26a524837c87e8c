"""``fanout``: a pipelining dispatcher with and without 1,000 subscribers.

Four processes: two services (``budget_actor serve`` on temporary SQLite
files), 1,000 subscribers of one of them (``bench/fanout_subscribers.py``)
and the dispatcher (one connection in the bench process). The same
pipelined dispatch runs in rounds alternating between the service without
subscribers and the one with them (none, with, with, none, twice): the acked
rate with subscribers over the rate without, in the same run and
interleaved, so that the host's drift and the other jobs' load hit both
alike; how long after a round's last ack the newest state reached every
subscriber; and the RSS of the service with subscribers.
"""

from __future__ import annotations

import gc
import math
import selectors
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ._support import Child, cpu_seconds, proc_status_kib, script_command, serve_command
from .fanout_subscribers import handshake
from .rows import Row, median, quantile

SUBSCRIBERS = 1_000
# Each round pipelines costs for this long (the clock runs from the first
# send to the last ack).
ROUND_S = 2.5
# Rounds: 0 = the service without subscribers, 1 = the one with them.
ORDER = (0, 1, 1, 0, 0, 1, 1, 0)
# Before the first round: lets the service warm up (imports, the first
# commits, SQLite's WAL) so that the first "none" round is not penalised.
WARMUP_S = 0.5
# Costs in flight before the dispatcher waits for an ack: the server's own
# window (budget_actor.net.server.ACK_WINDOW), as in ws-ingest.
WINDOW = 1024
# Cost frames the dispatcher writes at once (one send call).
SEND_BATCH = 128
# After a round's last ack, before the next round: the newest state must
# reach the subscribers within this (far beyond the target).
SETTLE_S = 1.0
RATIO_TARGET = 0.8
P99_TARGET_MS = 250.0
RSS_TARGET_MB = 150.0
RSS_EVERY_S = 0.25
# Acks of the with-rounds whose push delay is sampled, at most, per round
# (x 1,000 subscribers): enough for percentiles, cheap in pure Python.
SAMPLED_ACKS = 300
USD = "0.000001"


class _Ack(msgspec.Struct):
    type: str
    seq: int = 0


_decode_ack = msgspec.json.Decoder(_Ack).decode


@dataclass
class Round:
    """One pipelined dispatch: acks, and the time (``time.time()``) and seq of each."""

    label: str
    with_subscribers: bool
    acks: int = 0
    seconds: float = 0.0
    cpu_service: float = 0.0
    cpu_subscribers: float = 0.0
    ack_times: array[float] = field(default_factory=lambda: array("d"))
    ack_seqs: array[int] = field(default_factory=lambda: array("q"))
    rss_kib: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.acks / self.seconds if self.seconds else 0.0

    @property
    def last_ack(self) -> tuple[float, int]:
        """(time, seq) of the round's last ack: the newest state it made."""
        return self.ack_times[-1], max(self.ack_seqs)


def _cost_frame(label: str, i: int) -> bytes:
    """A masked client text frame. The mask is all zeros: the payload goes
    as is (RFC 6455 wants unpredictable masks against proxy cache poisoning,
    which does not arise on loopback; the server unmasks whatever the key)."""
    payload = f'{{"type":"cost","dispatch_id":"{label}-{i:07d}","usd":"{USD}"}}'.encode()
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def _dispatch(host: str, port: int, label: str, seconds: float, service_pid: int) -> Round:
    """Send costs for ``seconds`` with at most WINDOW unacked; read every ack
    (timing each), sampling the service's RSS. Bounded: fails after
    ``seconds`` + 60 s whatever the service does.

    A lean client (one thread, one socket, frames built by hand, many per
    write) so that the service, not this Python client, is what limits the
    rate: a trio-websocket client tops out near the service's own rate on
    this machine, and then the figure measures the machine's CPU contention.
    """
    out = Round(label, with_subscribers=False)
    sock = handshake(host, port)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    buffer = bytearray()
    pending = b""
    sent = 0
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    give_up = deadline + 60
    next_rss = start
    try:
        while True:
            now = clock()
            if now >= next_rss:
                out.rss_kib.append(proc_status_kib(service_pid, "VmRSS"))
                next_rss = now + RSS_EVERY_S
            if now > give_up:
                raise TimeoutError(f"{sent - out.acks} costs unacknowledged after 60 s")
            sending = now < deadline
            if not sending and out.acks == sent and not pending:
                break
            if sending and not pending and sent - out.acks < WINDOW:
                batch = min(WINDOW - (sent - out.acks), SEND_BATCH)
                pending = b"".join(_cost_frame(label, sent + k) for k in range(batch))
                sent += batch
            if pending:
                try:
                    pending = pending[sock.send(pending) :]
                except BlockingIOError:
                    pass
            if not selector.select(timeout=0 if pending else 0.05):
                continue
            data = sock.recv(262144)
            if not data:
                raise ConnectionError("the service closed the dispatcher's connection")
            at = time.time()
            buffer += data
            while len(buffer) >= 2:
                opcode, n, head = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if n == 126:
                    if len(buffer) < 4:
                        break
                    n, head = int.from_bytes(buffer[2:4], "big"), 4
                if len(buffer) < head + n:
                    break
                payload = bytes(buffer[head : head + n])
                del buffer[: head + n]
                if opcode == 0x9:  # ping
                    sock.setblocking(True)
                    sock.sendall(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
                    sock.setblocking(False)
                    continue
                ack = _decode_ack(payload)
                if ack.type != "ack":
                    raise RuntimeError(f"dispatcher expected an ack, got {payload!r}")
                out.acks += 1
                out.ack_times.append(at)
                out.ack_seqs.append(ack.seq)
                out.seconds = clock() - start
    finally:
        selector.close()
        sock.close()
    return out


def _round(child: Child, label: str, seconds: float, subscribers: Child | None) -> Round:
    gc.collect()
    cpu = cpu_seconds(child.pid), cpu_seconds(subscribers.pid) if subscribers else 0.0
    result = _dispatch("127.0.0.1", child.port, label, seconds, child.pid)
    result.with_subscribers = subscribers is not None
    result.cpu_service = (cpu_seconds(child.pid) - cpu[0]) / result.seconds
    if subscribers is not None:
        result.cpu_subscribers = (cpu_seconds(subscribers.pid) - cpu[1]) / result.seconds
    return result


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


def _first_at_or_after(seqs: array[int], times: array[float], seq: int) -> float | None:
    """Time of the first push with ``seq`` or later (pushes come in seq order)."""
    low, high = 0, len(seqs)
    while low < high:
        middle = (low + high) // 2
        if seqs[middle] < seq:
            low = middle + 1
        else:
            high = middle
    return times[low] if low < len(seqs) else None


@dataclass
class Delays:
    """Delays in ms, sorted, and how many (subscriber, state) pairs never arrived."""

    newest: list[float]
    during: list[float]
    missing: int


def _delays(rounds: list[Round], pushes: list[tuple[array[int], array[float]]]) -> Delays:
    """For each round with subscribers: from its last ack to each subscriber's
    first push with that seq or later (``newest``); and for a sample of its
    acks, the same from each ack (``during``: how stale a dashboard is while
    costs flow)."""
    newest: list[float] = []
    during: list[float] = []
    missing = 0
    for one in rounds:
        last_at, last_seq = one.last_ack
        every = max(1, one.acks // SAMPLED_ACKS)
        sample = list(zip(one.ack_times[::every], one.ack_seqs[::every], strict=True))
        for seqs, times in pushes:
            pushed_at = _first_at_or_after(seqs, times, last_seq)
            if pushed_at is None:
                missing += 1
                newest.append(math.inf)
            else:
                newest.append((pushed_at - last_at) * 1000)
            for acked_at, seq in sample:
                at = _first_at_or_after(seqs, times, seq)
                if at is not None:
                    during.append((at - acked_at) * 1000)
    newest.sort()
    during.sort()
    return Delays(newest, during, missing)


def _mb(kib: float) -> float:
    return kib * 1024 / 1e6


def fanout() -> list[Row]:
    """A pipelining dispatcher with and without 1,000 subscribers: acked rate
    ratio, newest-state delay after the last ack, service RSS."""
    room = str(SUBSCRIBERS + 100)
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        out = Path(tmp, "pushes.bin")

        def serve(name: str) -> Child:
            database = f"sqlite:///{Path(tmp, name + '.db')}"
            argv = serve_command(database, "--max-connections", room, "--max-per-address", room)
            return Child(argv, Path(tmp, name + ".log"))

        with serve("alone") as alone, serve("watched") as watched:
            services = (alone, watched)
            rss_idle = proc_status_kib(watched.pid, "VmRSS")
            for service in services:
                _round(service, "warm", WARMUP_S, None)
            connect_start = time.perf_counter()
            argv = script_command("fanout_subscribers.py", watched.url, str(SUBSCRIBERS), str(out))
            with Child(argv, Path(tmp, "subscribers.log"), ready_timeout=120, stdin=True) as subs:
                connect_s = time.perf_counter() - connect_start
                rss_subscribed = proc_status_kib(watched.pid, "VmRSS")
                rounds = []
                for number, which in enumerate(ORDER):
                    label = f"{('none', 'with')[which]}{number}"
                    rounds.append(_round(services[which], label, ROUND_S, subs if which else None))
                    time.sleep(SETTLE_S if which else SETTLE_S / 4)
                subs.send_line("stop")
                done = subs.read_line(60).decode()
                if not done.startswith("done"):
                    raise RuntimeError(f"subscriber process said {done!r}")
            rss_peak = proc_status_kib(watched.pid, "VmHWM")
        pushes = _read_pushes(out, SUBSCRIBERS)
    print("  fanout: computing delays...", file=sys.stderr, flush=True)
    alone = [r for r in rounds if not r.with_subscribers]
    busy = [r for r in rounds if r.with_subscribers]
    delays = _delays(busy, pushes)
    ratio = sum(r.rate for r in busy) / sum(r.rate for r in alone)
    push_counts = sorted(len(seqs) for seqs, _ in pushes)
    busy_seconds = sum(r.seconds for r in busy)

    def rates(group: list[Round]) -> str:
        return ", ".join(
            f"{r.label} {r.rate:,.0f}/s ({r.acks:,} acks, service CPU {r.cpu_service:.0%}"
            + (f", subscribers' CPU {r.cpu_subscribers:.0%}" if r.with_subscribers else "")
            + ")"
            for r in group
        )

    run = (
        f"two `budget_actor serve` processes (SQLite temporary files, --max-connections "
        f"{room}, --max-per-address {room}), one with {SUBSCRIBERS:,} subscribers in another "
        f"process (bench/fanout_subscribers.py, all subscribed in {connect_s:.1f} s); the "
        f"dispatcher, one lean WebSocket connection in the bench process, pipelines costs "
        f"with at most {WINDOW} unacked for {ROUND_S} s per round, alternating between the "
        f"services as none, with, with, none, twice ({SETTLE_S} s pauses after rounds "
        "with subscribers)"
    )
    newest = delays.newest
    return [
        Row(
            scenario="fanout",
            figure=f"dispatcher: acked rate with {SUBSCRIBERS:,} subscribers / without",
            value=ratio,
            unit="",
            at_least=RATIO_TARGET,
            samples=tuple(r.rate for r in rounds),
            note=(
                f"{run}. Ratio of the summed acked rates (acks / first send to last ack) of "
                f"the rounds with subscribers over those without: {rates(rounds)}. "
                "CPU as a share of one core, over the round (2 cores; the bench, the service "
                "and the subscribers run at once)."
            ),
        ),
        Row(
            scenario="fanout",
            figure="dispatcher alone: acked costs/s",
            value=median([r.rate for r in alone]),
            unit="costs/s",
            samples=tuple(r.rate for r in alone),
            note="median of the rounds without subscribers.",
        ),
        Row(
            scenario="fanout",
            figure="newest spend after the last ack, p99",
            value=quantile(newest, 0.99),
            unit="ms",
            at_most=P99_TARGET_MS,
            samples=tuple(newest[:: max(1, len(newest) // 20)]),
            note=(
                "for each round with subscribers and each subscriber: time.time() when the "
                "subscriber's read returned the first spend push with seq >= the seq of the "
                "round's last ack, minus time.time() when the dispatcher read that ack (one "
                f"machine, one clock); p99 over {len(newest):,} (round, subscriber) pairs; "
                f"p50 {quantile(newest, 0.5):,.0f} ms, max {newest[-1]:,.0f} ms; "
                f"{delays.missing} pairs never got it (counted as infinite)."
            ),
        ),
        Row(
            scenario="fanout",
            figure="spend push after ack while costs flow, p99",
            value=quantile(delays.during, 0.99) if delays.during else math.inf,
            unit="ms",
            note=(
                f"informational: the same delay for every {SAMPLED_ACKS}th-part sample of the "
                f"acks of the rounds with subscribers ({len(delays.during):,} pairs), i.e. how "
                "stale a dashboard is while the dispatcher is busy; p50 "
                f"{quantile(delays.during, 0.5) if delays.during else math.inf:,.0f} ms. "
                "Negative when a push arrived before the ack (the actor publishes when it "
                "counts a cost; the ack waits for the commit)."
            ),
        ),
        Row(
            scenario="fanout",
            figure="spend pushes per subscriber per second, busy",
            value=median(push_counts) / busy_seconds if busy_seconds else 0.0,
            unit="/s",
            note=(
                "informational: the median subscriber's pushes over the seconds of the "
                "rounds with subscribers (including the pauses' few pushes); min "
                f"{push_counts[0]:,}, median {median(push_counts):,.0f}, max "
                f"{push_counts[-1]:,} pushes in all. Latest-value: a busy service sends fewer, "
                "newer states."
            ),
        ),
        Row(
            scenario="fanout",
            figure=f"service RSS peak, {SUBSCRIBERS:,} subscribers",
            value=_mb(rss_peak),
            unit="MB",
            at_most=RSS_TARGET_MB,
            note=(
                "VmHWM of the service with subscribers at the end (peak resident set since start; "
                f"MB = 10^6 bytes). VmRSS: {_mb(rss_idle):.0f} MB when ready, "
                f"{_mb(rss_subscribed):.0f} MB with all subscribers connected, max "
                f"{_mb(max(max(r.rss_kib) for r in busy)):.0f} MB sampled every "
                f"{RSS_EVERY_S} s during the rounds; "
                f"{sum(r.acks for r in busy):,} costs journaled."
            ),
        ),
    ]
