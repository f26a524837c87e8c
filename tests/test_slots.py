"""Connection slots (PROTOCOL.md, "Who may connect", "Slots"; issue 13,
finding 4): observers can never take the dispatcher's place, one client
address cannot take every connection, and a refused handshake gets HTTP 503
with ``Retry-After``.

Each test runs a real ``serve`` and holds real WebSocket connections. Other
client addresses are real too: any 127.0.0.0/8 address reaches a service
on 127.0.0.1, so a client bound to 127.0.0.2 is another address.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected, wrap_client_stream

from ._client import Conn, Launcher, Service, connect, run_cli

pytestmark = pytest.mark.slow

DISPATCHER = "disp-" + secrets.token_urlsafe(24)
OBSERVER = "obs-" + secrets.token_urlsafe(24)
TOKENS = {"BUDGET_DISPATCHER_TOKEN": DISPATCHER, "BUDGET_OBSERVER_TOKEN": OBSERVER}


@asynccontextmanager
async def ws(
    service: Service, token: str | None, *, source: str | None = None
) -> AsyncIterator[Conn]:
    """A WebSocket to ``service`` with ``token``, from local address ``source``."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    if source is None:
        async with connect(service.ws_url, extra_headers=headers) as conn:
            yield conn
        return
    stream = await trio.open_tcp_stream(service.host, service.port, local_address=source)
    async with trio.open_nursery() as nursery:
        socket = await wrap_client_stream(
            nursery, stream, service.host, "/ws", extra_headers=headers
        )
        try:
            yield Conn(socket)
        finally:
            await socket.aclose()


async def hold(
    stack: AsyncExitStack, service: Service, token: str | None, count: int, **kw: str
) -> list[ConnectionRejected]:
    """Try ``count`` connections, keeping the accepted ones open in ``stack``;
    the refusals."""
    refused = []
    for _ in range(count):
        try:
            await stack.enter_async_context(ws(service, token, **kw))
        except ConnectionRejected as exc:
            refused.append(exc)
    return refused


def assert_503(refusals: list[ConnectionRejected]) -> None:
    for refusal in refusals:
        assert refusal.status_code == 503, refusal
        headers = dict(refusal.headers or [])
        assert headers.get(b"retry-after") == b"1", refusal.headers


async def test_observers_cannot_lock_the_dispatcher_out(launcher: Launcher) -> None:
    """The issue's case: with --max-connections 20, twenty observers made the
    dispatcher's handshake fail."""
    service = await launcher.start(None, "--max-connections", "20", env=TOKENS)
    async with AsyncExitStack() as stack:
        refused = await hold(stack, service, OBSERVER, 20)
        # 20 - 16 dispatcher slots (the default) are open to observers.
        assert len(refused) == 16
        assert_503(refused)
        body = refused[0].body or b""
        assert b"kept for dispatchers" in body, body
        async with ws(service, DISPATCHER) as dispatcher:
            ack = await dispatcher.cost("despite-observers", "0.5")
            assert ack["duplicate"] is False
        # Every kept slot is usable by dispatchers at once; then the cap holds.
        assert await hold(stack, service, DISPATCHER, 16) == []
        over = await hold(stack, service, DISPATCHER, 1)
        assert len(over) == 1
        assert_503(over)
    # Slots are given back when connections close.
    await trio.sleep(0.2)
    async with AsyncExitStack() as stack:
        assert await hold(stack, service, OBSERVER, 4) == []
        assert await hold(stack, service, DISPATCHER, 16) == []


async def test_dispatchers_may_take_the_observers_share(launcher: Launcher) -> None:
    service = await launcher.start(
        None, "--max-connections", "6", "--dispatcher-slots", "2", env=TOKENS
    )
    async with AsyncExitStack() as stack:
        assert await hold(stack, service, DISPATCHER, 6) == []
        assert_503(await hold(stack, service, OBSERVER, 1))
        assert_503(await hold(stack, service, DISPATCHER, 1))


async def test_one_address_cannot_take_every_connection(launcher: Launcher) -> None:
    service = await launcher.start(
        None, "--max-per-address", "5", "--dispatcher-slots", "2", env=TOKENS
    )
    async with AsyncExitStack() as stack:
        refused = await hold(stack, service, OBSERVER, 4)
        assert len(refused) == 1  # 5 - 2 kept for dispatchers
        assert_503(refused)
        # The dispatcher, even from the same address (say, through the same
        # proxy), still gets in; then the address is full for everyone.
        assert await hold(stack, service, DISPATCHER, 2) == []
        refused = await hold(stack, service, DISPATCHER, 1)
        assert len(refused) == 1
        assert_503(refused)
        assert b"your address" in (refused[0].body or b"")
        # Another address is not affected.
        assert await hold(stack, service, OBSERVER, 3, source="127.0.0.2") == []
        async with ws(service, DISPATCHER, source="127.0.0.3") as conn:
            await conn.cost("other-address", "0.25")
    # The server frees a slot when it sees the close, a moment after the
    # client's; a refusal meanwhile says "retry", as a client would.
    with trio.fail_after(10):
        while True:
            try:
                async with ws(service, OBSERVER) as observer:
                    spend = Decimal((await observer.health())["daily_spend"])
                break
            except ConnectionRejected as exc:
                assert_503([exc])
                await trio.sleep(0.1)
    assert spend == Decimal("0.25")


async def test_an_open_service_counts_everyone_as_a_dispatcher(launcher: Launcher) -> None:
    """Without tokens every client may spend, so every client is a dispatcher,
    and the kept slots cannot tell them apart (docs/security.md)."""
    service = await launcher.start(None, "--max-connections", "3", "--dispatcher-slots", "2")
    async with AsyncExitStack() as stack:
        assert await hold(stack, service, None, 3) == []
        assert_503(await hold(stack, service, None, 1))


async def test_the_environment_sets_the_slots(launcher: Launcher) -> None:
    service = await launcher.start(
        None,
        env={
            **TOKENS,
            "BUDGET_MAX_CONNECTIONS": "4",
            "BUDGET_DISPATCHER_SLOTS": "3",
            "BUDGET_MAX_PER_ADDRESS": "10",
        },
    )
    async with AsyncExitStack() as stack:
        assert await hold(stack, service, OBSERVER, 1) == []
        assert_503(await hold(stack, service, OBSERVER, 1))
        assert await hold(stack, service, DISPATCHER, 3) == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--max-connections", "10"), "dispatcher-slots"),  # 16 kept of 10
        (("--dispatcher-slots", "-1"), "dispatcher-slots"),
        (("--max-per-address", "0"), "max-per-address"),
        (("--max-per-address", "16"), "dispatcher-slots"),
        (("--dispatcher-slots", "many"), "dispatcher-slots"),
    ],
)
async def test_bad_slot_options_exit_2(tmp_path: Path, args: tuple[str, ...], named: str) -> None:
    database = f"sqlite:///{tmp_path / 'slots.db'}"
    done = await run_cli("serve", "--port", "0", "--database", database, *args)
    assert done.code == 2, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert named in done.stderr, done.stderr
