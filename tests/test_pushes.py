"""Pushes against a real ``serve`` under load: costs before pushes.

Black-box, like the contract tests: the service runs as its own process and
is driven over WebSocket only.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import trio

from ._client import Conn, Launcher, Service, StuckClient, connect

# Enough subscribers that writing every state to each of them, as fast as
# the spend changes, would take the whole event loop.
STORM_SUBSCRIBERS = 1000
# Costs of the storm, sent pipelined with at most WINDOW unacknowledged.
STORM_COSTS = 6000
WINDOW = 250
# Each window must be acknowledged within this (seconds): a generous bound
# on progress. When every subscriber's task pushed on its own (before the
# fan-out task), the first windows here took 20-35 s on the 2-core machine;
# now a window takes well under a second there, even loaded.
WINDOW_TIMEOUT = 10.0


def _options(subscribers: int) -> list[str]:
    room = str(subscribers + 100)
    return ["--max-connections", room, "--max-per-address", room]


async def _stuck_subscribers(
    svc: Service, count: int, receive_buffer: int | None
) -> list[StuckClient]:
    """``count`` raw connections that subscribe and then never read."""
    clients: list[StuckClient] = []
    limiter = trio.CapacityLimiter(50)

    async def one() -> None:
        async with limiter:
            client = StuckClient(svc.host, svc.port, receive_buffer=receive_buffer)
            clients.append(client)
            await client.open()
            await client.send({"type": "subscribe"})

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return clients


async def _pipeline(conn: Conn, prefix: str, count: int, usd: str) -> list[dict[str, Any]]:
    """Send ``count`` costs with at most WINDOW unacknowledged; every ack, in
    order. Fails if a window is not acknowledged within WINDOW_TIMEOUT."""
    acks: list[dict[str, Any]] = []
    for start in range(0, count, WINDOW):
        with trio.fail_after(WINDOW_TIMEOUT):
            for i in range(start, min(count, start + WINDOW)):
                await conn.send({"type": "cost", "dispatch_id": f"{prefix}-{i}", "usd": usd})
            while len(acks) < min(count, start + WINDOW):
                acks.append(await conn.recv_type("ack", "error", timeout=WINDOW_TIMEOUT))
    assert all(a["type"] == "ack" for a in acks), [a for a in acks if a["type"] != "ack"][:3]
    assert [a["dispatch_id"] for a in acks] == [f"{prefix}-{i}" for i in range(count)]
    return acks


async def _log_pushes(conn: Conn) -> None:
    """Read everything into ``conn.log`` until cancelled."""
    while True:
        await conn.recv(timeout=3600)


async def test_a_storm_of_pushes_does_not_stop_acks(sqlite_url: str, launcher: Launcher) -> None:
    """1,000 subscribers that never read (their buffers take pushes for a long
    while) and a dispatcher changing the spend as fast as it can: every
    window of its costs is acknowledged, and a reading subscriber still ends
    on the newest state."""
    svc = await launcher.start(sqlite_url, *_options(STORM_SUBSCRIBERS), "--daily-cap", "1000000")
    stuck = await _stuck_subscribers(svc, STORM_SUBSCRIBERS, receive_buffer=None)
    try:
        async with connect(svc.ws_url) as watcher, connect(svc.ws_url) as dispatcher:
            await watcher.subscribe()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_log_pushes, watcher)
                acks = await _pipeline(dispatcher, "storm", STORM_COSTS, "0.01")
                last = acks[-1]["seq"]
                with trio.fail_after(10):
                    while not any(m["type"] == "spend" and m["seq"] == last for m in watcher.log):
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        seqs = [m["seq"] for m in watcher.log if m["type"] == "spend"]
        assert seqs == sorted(seqs), "pushes went back in time"
        assert seqs[-1] == last == STORM_COSTS
        newest = [m for m in watcher.log if m["type"] == "spend"][-1]
        assert Decimal(newest["daily_spend"]) == Decimal("0.01") * STORM_COSTS
        # Latest-value: the watcher got far fewer states than there were costs.
        assert len(seqs) < STORM_COSTS / 4, len(seqs)
    finally:
        for client in stuck:
            client.close()


def _frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Complete server frames (opcode, payload) taken off the front of ``buffer``."""
    frames = []
    while len(buffer) >= 2:
        opcode, n, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
        assert buffer[0] & 0x80 and not buffer[1] & 0x80, bytes(buffer[:4])  # FIN, unmasked
        if n == 126:
            if len(buffer) < 4:
                break
            n, start = int.from_bytes(buffer[2:4], "big"), 4
        assert n < 65536
        if len(buffer) < start + n:
            break
        frames.append((opcode, bytes(buffer[start : start + n])))
        del buffer[: start + n]
    return frames


async def test_a_subscriber_that_falls_behind_gets_every_alert_and_ends_on_the_newest(
    sqlite_url: str, launcher: Launcher
) -> None:
    """One subscriber stops reading (a tiny receive buffer) while costs cross
    three thresholds in many small bursts; others keep reading. When it reads
    again it finds whole frames only, every alert in order, states that only
    go forward, and the newest state last; the others were not held up."""
    svc = await launcher.start(sqlite_url, "--daily-cap", "30.00", "--alert-at", "0.25,0.5,0.75")
    slow = StuckClient(svc.host, svc.port)
    await slow.open()
    await slow.send({"type": "subscribe"})
    try:
        async with connect(svc.ws_url) as dispatcher:
            readers: list[Conn] = []
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    conn = await nursery.start(_reader, svc.ws_url)
                    readers.append(conn)
                acks: list[dict[str, Any]] = []
                for burst in range(30):
                    acks += await _pipeline(dispatcher, f"b{burst}", 100, "0.0081")
                    await trio.sleep(0.02)  # let the spend settle: a push round each
                last = acks[-1]["seq"]
                with trio.fail_after(10):
                    for conn in readers:
                        while not any(m.get("seq") == last for m in conn.of_type("spend")):
                            await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            for conn in readers:
                assert [a["threshold"] for a in conn.of_type("alert")] == [0.25, 0.5, 0.75]
        buffer = bytearray()
        messages: list[dict[str, Any]] = []
        with trio.fail_after(20):
            while not any(m["type"] == "spend" and m["seq"] == last for m in messages):
                data = await slow.sock.recv(65536)
                assert data, "the service closed the slow subscriber"
                buffer += data
                for opcode, payload in _frames(buffer):
                    if opcode == 0x1:
                        messages.append(json.loads(payload))
        assert not buffer
    finally:
        slow.close()
    alerts = [m for m in messages if m["type"] == "alert"]
    assert [a["threshold"] for a in alerts] == [0.25, 0.5, 0.75]
    seqs = [m["seq"] for m in messages if m["type"] == "spend"]
    assert seqs == sorted(seqs) and seqs[0] == 0 and seqs[-1] == last == 3000
    assert messages[-1]["type"] == "spend"
    assert Decimal(messages[-1]["daily_spend"]) == Decimal("0.0081") * 3000


async def _reader(url: str, task_status: trio.TaskStatus[Conn]) -> None:
    async with connect(url) as conn:
        await conn.subscribe()
        task_status.started(conn)
        await _log_pushes(conn)
