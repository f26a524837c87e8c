"""``ws-ingest``: acked costs/s over one pipelining WebSocket connection, against
the real service and against a bare trio-websocket echo server."""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio
from trio_websocket import open_websocket_url

from ._support import Child, cpu_seconds, script_command, serve_command
from .rows import Row, median

WS_ROUNDS = 3
# The service acks ~1,500-2,000 costs/s here, so a round is ~5,000 costs; the
# scenario (2 processes, warm-ups, 6 rounds) takes ~20 s.
WS_ROUND_S = 2.5
WS_WARMUP_S = 0.5
# Costs in flight before the client waits for an ack: the server's own window
# (budget_actor.net.server.ACK_WINDOW), so the server, not the client, limits.
WS_WINDOW = 1024
WS_TARGET = 5_000.0
WS_TARGET_RATIO = 0.7
USD = "0.000001"


class _Reply(msgspec.Struct):
    """An ``ack`` (one cost) or an ``acks`` (one per item of a batch)."""

    type: str
    acks: list[msgspec.Raw] = []


_decode_reply = msgspec.json.Decoder(_Reply).decode


async def pipelined(
    url: str, seconds: float, frame: Callable[[int], str], window: int
) -> tuple[int, float]:
    """Send ``frame(0)``, ``frame(1)``, ... for ``seconds`` with at most
    ``window`` frames unanswered, and read every answer (``ack``: one cost,
    ``acks``: one per item); return (costs acknowledged, seconds from the
    first send to the last answer)."""
    async with open_websocket_url(url) as ws:
        done = trio.Event()
        # Set by the reader when the window has room again; the sender only
        # waits on it when the window is full (no checkpoint per frame).
        room = trio.Event()
        sent = answered = costs = 0
        all_sent = False
        start = last = time.perf_counter()

        async def reader() -> None:
            nonlocal answered, costs, last
            while True:
                text = await ws.get_message()
                reply = _decode_reply(text)
                if reply.type == "ack":
                    costs += 1
                elif reply.type == "acks":
                    costs += len(reply.acks)
                else:
                    raise RuntimeError(f"expected an ack or acks, got {text!r}")
                answered += 1
                last = time.perf_counter()
                if sent - answered < window:
                    room.set()
                if all_sent and answered == sent:
                    done.set()

        with trio.fail_after(seconds + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                start = time.perf_counter()
                deadline = start + seconds
                while time.perf_counter() < deadline:
                    if sent - answered >= window:
                        room = trio.Event()
                        await room.wait()
                    await ws.send_message(frame(sent))
                    sent += 1
                all_sent = True
                if answered == sent:
                    done.set()
                await done.wait()
                nursery.cancel_scope.cancel()
    return costs, last - start


async def _pipeline(url: str, seconds: float, prefix: str) -> tuple[int, float]:
    """``cost`` frames, at most WS_WINDOW unacknowledged: (acks, seconds)."""

    def cost(n: int) -> str:
        return f'{{"type":"cost","dispatch_id":"{prefix}-{n:07d}","usd":"{USD}"}}'

    return await pipelined(url, seconds, cost, WS_WINDOW)


def ws_ingest() -> list[Row]:
    """Acked costs/s over one pipelining WebSocket connection: service vs. bare echo server."""
    rates: dict[str, list[float]] = {"service": [], "echo": []}
    counts: dict[str, list[int]] = {"service": [], "echo": []}
    cpu: dict[str, list[float]] = {"service": [], "echo": []}
    with tempfile.TemporaryDirectory(prefix="budget-bench-") as tmp:
        db = Path(tmp, "ws.db")
        with (
            Child(serve_command(f"sqlite:///{db}"), Path(tmp, "serve.log")) as service,
            Child(script_command("ws_echo.py"), Path(tmp, "echo.log")) as echo,
        ):
            servers = {"service": service, "echo": echo}

            def one_round(side: str, seconds: float, prefix: str) -> None:
                gc.collect()
                child = servers[side]
                cpu_before = cpu_seconds(child.pid)
                acks, elapsed = trio.run(_pipeline, child.url, seconds, prefix)
                if seconds == WS_WARMUP_S:
                    return
                rates[side].append(acks / elapsed)
                counts[side].append(acks)
                cpu[side].append((cpu_seconds(child.pid) - cpu_before) / elapsed)

            one_round("service", WS_WARMUP_S, "warm")
            one_round("echo", WS_WARMUP_S, "warm")
            for round_no in range(WS_ROUNDS):
                sides = ("service", "echo") if round_no % 2 == 0 else ("echo", "service")
                for side in sides:
                    one_round(side, WS_ROUND_S, f"r{round_no}")
    service_rate = median(rates["service"])
    echo_rate = median(rates["echo"])

    def detail(side: str) -> str:
        return (
            f"per round {', '.join(f'{n:,}' for n in counts[side])} acks; server process "
            f"CPU {', '.join(f'{c:.0%}' for c in cpu[side])} of one core"
        )

    rounds = (
        f"median of {WS_ROUNDS} rounds of {WS_ROUND_S} s (after a {WS_WARMUP_S} s warm-up), "
        "alternating with the other server"
    )
    client = (
        "one trio-websocket client connection in the bench process, a sender task "
        f'writing {{"type":"cost",...}} frames with at most {WS_WINDOW} unacked and a '
        "reader task decoding every reply; the clock runs from the first send to the last ack"
    )
    return [
        Row(
            scenario="ws-ingest",
            figure="service: 1 connection, pipelined cost -> ack",
            value=service_rate,
            unit="acks/s",
            at_least=WS_TARGET,
            samples=tuple(rates["service"]),
            note=(
                f"{rounds}. `python -m budget_actor serve` in its own process on a "
                "temporary SQLite file (WAL, synchronous=FULL); every ack is sent only "
                f"once its cost is durable. {client}. {detail('service')}."
            ),
        ),
        Row(
            scenario="ws-ingest",
            figure="bare trio-websocket echo server, same client",
            value=echo_rate,
            unit="acks/s",
            samples=tuple(rates["echo"]),
            note=(
                f"{rounds}. bench/ws_echo.py in its own process: trio_websocket."
                "serve_websocket, msgspec-decodes each frame's dispatch_id and sends an "
                f"ack-shaped reply at once. Same client. {detail('echo')}."
            ),
        ),
        Row(
            scenario="ws-ingest",
            figure="ratio service/echo",
            value=service_rate / echo_rate,
            unit="",
            at_least=WS_TARGET_RATIO,
            samples=tuple(s / e for s, e in zip(rates["service"], rates["echo"], strict=True)),
            note="ratio of the two medians; samples are per-round ratios.",
        ),
    ]
