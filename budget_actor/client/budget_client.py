"""``BudgetClient``: the dispatcher's half of the zero-loss promise.

The service acknowledges a cost only once it is durable. This client keeps
every cost until that acknowledgement arrives: in memory, and, with an
``outbox`` file, on disk first. In the background it sends costs in ``costs``
batches (a window of unacknowledged costs in flight), reconnects with
jittered backoff when the connection breaks, and then resends, in order,
everything not yet acknowledged; the service counts each ``dispatch_id``
once. It runs on asyncio and on trio (AnyIO), over :mod:`.websocket`.

How answers are matched: ``acks`` come in the order the batches were sent;
``health`` by its ``id``; ``admission`` by ``dispatch_id``. An ``error`` names
no frame, but the service answers frames in the order it reads them, so an
error belongs to the oldest frame still waiting for an immediate answer. When
that cannot be told apart (several batches in flight), the client reconnects
and resends carefully, one batch at a time followed by a ``health`` probe,
halving a refused batch until the refused cost is found. A cost the service
refuses for good is reported (:class:`CostRefused`), never silently dropped.
Nothing of this happens in normal operation: costs are checked here with the
service's own code before they are queued.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import os
import random
import ssl
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Literal

import anyio
import anyio.abc
import msgspec

from ..core.cost import Cost, check_dispatch_id, check_estimate, make_cost
from ..core.cost import InvalidCost as _Refused
from ..core.money import DEFAULT_MAX_COST, to_wire
from ..core.views import Admission, AlertNotice, Health, Receipt, Spend
from ..core.wire import (
    Ack,
    Acks,
    ServiceError,
    ServiceMessage,
    WireError,
    costs_frame,
    decode_cost_item,
    decode_service_message,
    encode_cost_item,
)
from .errors import (
    ClientClosed,
    ClientError,
    CostRefused,
    Forbidden,
    HandshakeRefused,
    InvalidCost,
    OutboxError,
    RequestRefused,
    ServiceUnavailable,
    Unauthorized,
)
from .outbox import Outbox
from .subscription import Subscription
from .websocket import ConnectionClosed, HandshakeRejected, WebSocket, connect

log = logging.getLogger("budget_actor.client")

# Costs enqueued and not yet acknowledged (in memory and in the outbox). At
# this bound `enqueue` waits for acknowledgements: backpressure, so that a
# long outage fills a bounded file instead of the disk.
DEFAULT_MAX_PENDING = 100_000
# Costs sent on one connection and not yet acknowledged. The service acks a
# batch once it is durable (a group commit), so a few batches in flight keep
# its writer busy while the next ones travel.
DEFAULT_WINDOW = 4_000
# The contract's bound on items per `costs` frame.
MAX_BATCH = 1_000
# The service's default frame limit (--max-frame-bytes); a batch stays under it.
MAX_FRAME_BYTES = 64 * 1024
_FRAME_OVERHEAD = len(costs_frame([]))
# health(), admit() and cycle() give up (ServiceUnavailable) after this long
# without a connection and an answer; enqueue and flush never time out.
DEFAULT_TIMEOUT_S = 10.0
# Reconnect backoff: doubles from the minimum to the maximum, each wait
# jittered down to half so that many clients do not return in lockstep
# after a restart; starts over after a connection that worked.
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
# Handshake statuses that a later attempt may get past (the service is
# starting, stopping or full); any other refusal stops the client.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A connection with no traffic this long gets a ping; with none for three
# times as long it is taken for dead (a half-open TCP connection is silent).
KEEPALIVE_S = 10.0
# Amount bound when re-reading the outbox: the rows were checked when they
# were written; the service applies its own maximum when they arrive.
_NO_MAXIMUM = Decimal("Infinity")

# Frames that always get an immediate answer; and those answered by `health`.
_ALWAYS_ANSWERED = frozenset({"health", "admit", "probe"})
_ASKS_HEALTH = frozenset({"health", "probe"})


@dataclass(frozen=True)
class ConnectionStatus:
    """What the client's connection is doing, for ``on_connection``.

    ``state`` is ``connecting``, ``connected`` or ``disconnected``; ``detail``
    says why it was lost; ``retry_in`` is the wait before the next attempt;
    ``attempt`` counts attempts since the last connection that worked.
    """

    state: Literal["connecting", "connected", "disconnected"]
    detail: str = ""
    retry_in: float | None = None
    attempt: int = 0


class _Item:
    """One cost on its way: from enqueue to its receipt (or refusal)."""

    __slots__ = ("body", "dispatch_id", "done", "order", "receipt", "refused", "row", "waiting")

    def __init__(self, order: int, dispatch_id: str, body: bytes, row: int | None = None) -> None:
        self.order = order
        self.dispatch_id = dispatch_id
        self.body = body
        self.row = row
        self.done: anyio.Event | None = None
        self.waiting = False
        self.receipt: Receipt | None = None
        self.refused: tuple[str, str] | None = None


class _Batch:
    __slots__ = ("expect", "items")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.expect: _Expect | None = None


class _Expect:
    """A frame that may get an immediate answer (``health``, ``admission`` or
    ``error``), in the order sent on one connection."""

    __slots__ = ("answer", "batch", "done", "error", "key", "kind", "lost", "n")

    def __init__(self, n: int, kind: str, key: str = "", batch: _Batch | None = None) -> None:
        self.n = n
        self.kind = kind
        self.key = key
        self.batch = batch
        self.done: anyio.Event | None = None
        self.answer: Health | Admission | None = None
        self.error: ServiceError | None = None
        self.lost = False

    def settle(self) -> None:
        if self.done is not None:
            self.done.set()


class _WriteGroup:
    """Costs waiting to be written to the outbox in one transaction."""

    __slots__ = ("done", "error", "items", "written")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.done = anyio.Event()
        self.error: OutboxError | None = None
        self.written = False


class _Session:
    """One live connection and what is in flight on it."""

    def __init__(self, ws: WebSocket, scope: anyio.CancelScope) -> None:
        self.ws = ws
        self.scope = scope
        self.lock = anyio.Lock()
        self.frames = itertools.count()
        self.inflight: collections.deque[_Batch] = collections.deque()
        self.inflight_items = 0
        self.expect: collections.deque[_Expect] = collections.deque()
        self.subscribed = False
        # Careful mode: the one batch sent and not yet known to be accepted.
        self.probing: _Batch | None = None
        self.reason = "connection closed"
        self.worked = False

    def end(self, reason: str) -> None:
        self.reason = reason
        self.scope.cancel()


class BudgetClient:
    """A connection to a budget service for dispatchers and subscribers.

    ::

        async with BudgetClient("ws://127.0.0.1:8765/ws", outbox="costs.outbox") as client:
            await client.enqueue("dispatch-1", "0.045864", model="claude-haiku")

    ``url`` is the service's ``ws://`` or ``wss://`` URL; ``token`` is sent as
    ``Authorization: Bearer TOKEN``; ``ssl_context`` is used for ``wss://``
    (default: the system's trust store). ``outbox`` is a file path: costs are
    fsync'd there before :meth:`enqueue` returns, survive a crash of this
    process, and are sent by the next client opened on the same file.

    ``max_cost`` must match the service's ``--max-cost``: costs are checked
    here, before they are queued, with the service's own rules.
    ``max_pending`` bounds the costs not yet acknowledged (memory and outbox):
    at the bound :meth:`enqueue` waits. ``window`` bounds the costs in flight
    on the connection. ``timeout`` bounds :meth:`health`, :meth:`admit` and
    :meth:`cycle`. ``on_connection`` is called (synchronously) with a
    :class:`ConnectionStatus` whenever the connection changes.
    ``reconnect=False`` is for one-shot tools: the first failed or lost
    connection stops the client, and every call raises
    :class:`ServiceUnavailable` with the reason.

    The client connects in the background when the block is entered; the
    service need not be up. Leaving the block stops it: costs not yet
    acknowledged stay in the outbox (without one, every :meth:`enqueue` has
    already returned only after its acknowledgement). Call :meth:`flush`
    first to wait for them.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        outbox: str | os.PathLike[str] | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_cost: Decimal | int | str = DEFAULT_MAX_COST,
        max_pending: int = DEFAULT_MAX_PENDING,
        window: int = DEFAULT_WINDOW,
        batch_size: int = MAX_BATCH,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: Sequence[tuple[str, str]] = (),
        on_connection: Callable[[ConnectionStatus], None] | None = None,
        reconnect: bool = True,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}, got {batch_size}")
        if max_pending < 1 or window < 1:
            raise ValueError("max_pending and window must be at least 1")
        self.url = url
        self.max_cost = Decimal(max_cost)
        self.max_pending = max_pending
        self.window = window
        self.batch_size = batch_size
        self.timeout = timeout
        self._token = token
        self._ssl_context = ssl_context
        self._headers = tuple(headers)
        self._max_frame_bytes = max_frame_bytes
        self._on_connection = on_connection
        self._reconnect = reconnect
        self._outbox = Outbox(outbox) if outbox is not None else None
        self._orders = itertools.count(1)
        self._ids = itertools.count(1)
        self._unsent: collections.deque[_Item] = collections.deque()
        # Every cost not yet acknowledged or refused, by order (oldest first).
        self._unresolved: dict[int, _Item] = {}
        self._to_delete: list[int] = []
        self._to_refuse: list[tuple[int, bytes, str, str]] = []
        self._writes_asked = 0
        self._writes_done = 0
        self._refused_unreported: list[tuple[str, str, str]] = []
        self._careful_until = 0
        self._probe_size = batch_size
        self._session: _Session | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._last_spend: Spend | None = None
        self._fatal: ClientError | None = None
        self._forbidden: Forbidden | None = None
        self._closed = False
        self._started = False
        self._tasks: anyio.abc.TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> BudgetClient:
        if self._started:
            raise RuntimeError("a BudgetClient can be entered once")
        self._started = True
        self._changed = anyio.Event()
        self._sender_wake = anyio.Event()
        self._writer_wake = anyio.Event()
        self._connected = anyio.Event()
        self._group = _WriteGroup()
        self._limiter = anyio.CapacityLimiter(1)
        if self._outbox is not None:
            rows = await anyio.to_thread.run_sync(self._outbox.open, limiter=self._limiter)
            try:
                for row, body in rows:
                    item = self._reload(row, body)
                    self._unresolved[item.order] = item
                    self._unsent.append(item)
            except BaseException:
                await anyio.to_thread.run_sync(self._outbox.close, limiter=self._limiter)
                raise
            if rows:
                log.info("outbox %s: %d costs to send", self._outbox.path, len(rows))
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        tasks.start_soon(self._run)
        if self._outbox is not None:
            tasks.start_soon(self._writer)
        self._tasks = tasks
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop: close the connection and the outbox. Costs not acknowledged
        stay in the outbox (see :meth:`flush`). An exception from the block
        propagates as it is (not wrapped in an exception group)."""
        self._closed = True
        tasks, self._tasks = self._tasks, None
        try:
            if tasks is not None:
                tasks.cancel_scope.cancel()
                # The block's own exception is not the background tasks'
                # business: keeping it out of the group keeps it unwrapped.
                await tasks.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                if self._outbox is not None:
                    await anyio.to_thread.run_sync(self._outbox.close, limiter=self._limiter)
                self._wake_everyone()

    # -- the API ---------------------------------------------------------------

    async def enqueue(
        self,
        dispatch_id: str,
        usd: Decimal | str | int,
        *,
        model: str | None = None,
        agent: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """Queue one dispatch's cost; return once it is safe.

        Safe means: fsync'd to the outbox (with an outbox; this works while
        the service is down), or else acknowledged by the service. The client
        sends it in the background and resends it until it is acknowledged;
        the service counts a ``dispatch_id`` once, so enqueueing the same one
        again is harmless.

        Raises :class:`InvalidCost` before anything is queued if the amount
        or a field breaks the service's rules. Waits while ``max_pending``
        costs are unacknowledged (backpressure). Raises :class:`OutboxError`
        if the outbox write fails (the cost is then not queued),
        :class:`Forbidden` if the token may not send costs,
        :class:`CostRefused` (without an outbox) if the service refuses the
        cost. Cancelled before it returns, the cost may still be sent and
        counted: enqueue it again with the same ``dispatch_id`` if unsure.
        """
        item = self._new_item(dispatch_id, usd, model, agent, input_tokens, output_tokens)
        await self._queue(item)
        if self._outbox is None:
            await self._receipt(item)

    async def record(
        self,
        dispatch_id: str,
        usd: Decimal | str | int,
        *,
        model: str | None = None,
        agent: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> Receipt:
        """Like :meth:`enqueue`, but return only once the service has
        acknowledged the cost: its :class:`Receipt` (``seq``, ``duplicate``).
        Waits through outages (use a timeout of your own to bound it); raises
        as :meth:`enqueue`, and :class:`CostRefused` if the service refuses it.
        """
        item = self._new_item(dispatch_id, usd, model, agent, input_tokens, output_tokens)
        await self._queue(item)
        return await self._receipt(item)

    async def flush(self) -> None:
        """Return once every cost enqueued before this call is acknowledged
        (and, with an outbox, deleted from it).

        Waits through outages; bound it with a timeout of your own. Raises
        :class:`CostRefused`, once everything is settled, for the costs the
        service refused since the last report, :class:`Forbidden` if the
        token may not send costs, or the error that stopped the client.
        """
        self._check_open()
        target = next(self._orders)
        while True:
            self._raise_stops()
            oldest = next(iter(self._unresolved), None)
            if oldest is None or oldest > target:
                break
            self._check_dispatcher()  # an observer's costs would never go
            await self._wait_changed()
        if self._refused_unreported:
            refused, self._refused_unreported = self._refused_unreported, []
            raise CostRefused(refused)
        if self._outbox is not None:
            asked = self._writes_asked = self._writes_asked + 1
            self._writer_wake.set()
            while self._writes_done < asked:
                self._raise_stops()
                await self._wait_changed()

    async def cycle(self) -> None:
        """One heartbeat cycle of the dispatcher (every ``persist_every``-th
        writes the budget patch). Not acknowledged by the service: sent once
        on the connection. Raises :class:`ServiceUnavailable` if there is no
        connection within ``timeout``, :class:`Forbidden` for an observer."""
        self._check_open()
        self._check_dispatcher()
        with _unavailable_after(self.timeout, "no connection to send the cycle on"):
            while True:
                session = await self._wait_session()
                try:
                    # Not registered as expecting an answer: a cycle can only be
                    # refused as forbidden (handled for the whole client) or
                    # overloaded (which only makes the client reconnect).
                    await session.ws.send('{"type":"cycle"}')
                    return
                except ConnectionClosed:
                    await self._wait_session_gone(session)

    async def health(self) -> Health:
        """Every health figure of the service (amounts as ``Decimal``).

        Raises :class:`ServiceUnavailable` without an answer within
        ``timeout`` (reconnects in between are retried)."""
        self._check_open()
        key = f"h{next(self._ids)}"
        answer = await self._ask("health", key, f'{{"type":"health","id":"{key}"}}')
        assert isinstance(answer, Health)
        return answer

    async def admit(self, dispatch_id: str, estimate_usd: Decimal | str | int) -> Admission:
        """Ask whether ``estimate_usd`` still fits under the cap, and if so
        reserve it until the cost with this ``dispatch_id`` settles it.

        Raises :class:`InvalidCost` before sending for a bad estimate or id,
        :class:`Forbidden` for an observer, :class:`ServiceUnavailable`
        without an answer within ``timeout``. Asking again after a reconnect
        is safe: a new ``admit`` for the same id renews the reservation
        (at most three times; see ``docs/protocol.md``).
        """
        self._check_open()
        self._check_dispatcher()
        try:
            # The service's own checks of an admit (core.cost), here first.
            checked_id = check_dispatch_id(dispatch_id)
            estimate = check_estimate(estimate_usd, self.max_cost)
        except _Refused as exc:
            raise InvalidCost(exc.detail, exc.code) from None
        frame = msgspec.json.encode(
            {"type": "admit", "dispatch_id": checked_id, "estimate_usd": to_wire(estimate)}
        )
        answer = await self._ask("admit", checked_id, frame.decode())
        assert isinstance(answer, Admission)
        return answer

    def subscribe(self) -> Subscription:
        """Spend and alert updates: ``async for update in client.subscribe()``.

        The first update is the current :class:`Spend`; then every change
        (latest value: a slow reader skips intermediate states) and every
        :class:`AlertNotice`. Survives reconnects by itself, starting again
        with the current spend. See :class:`Subscription`.
        """
        self._check_open()
        return Subscription(self._add_subscription)

    @property
    def pending(self) -> int:
        """Costs enqueued and not yet acknowledged (or refused)."""
        return len(self._unresolved)

    @property
    def connected(self) -> bool:
        return self._session is not None

    # -- queueing --------------------------------------------------------------

    def _new_item(
        self,
        dispatch_id: str,
        usd: object,
        model: str | None,
        agent: str | None,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> _Item:
        try:
            # The service's own rules (core.cost.make_cost), before anything
            # is queued.
            cost: Cost = make_cost(
                dispatch_id,
                usd,
                model,
                input_tokens,
                output_tokens,
                agent,
                max_cost=self.max_cost,
            )
        except _Refused as exc:
            raise InvalidCost(exc.detail, exc.code) from None
        return _Item(0, cost.dispatch_id, encode_cost_item(cost))

    def _reload(self, row: int, body: bytes) -> _Item:
        assert self._outbox is not None
        try:
            cost = decode_cost_item(body, max_cost=_NO_MAXIMUM)
        except WireError as exc:
            raise OutboxError(
                f"the outbox {self._outbox.path} is damaged: row {row} is not a cost"
                f" ({exc.detail}); it is left as it is"
            ) from None
        return _Item(next(self._orders), cost.dispatch_id, body, row)

    async def _queue(self, item: _Item) -> None:
        self._check_open()
        self._raise_stops()
        self._check_dispatcher()
        while len(self._unresolved) >= self.max_pending:
            await self._wait_changed()  # backpressure
            self._raise_stops()
            self._check_dispatcher()
        item.order = next(self._orders)
        self._unresolved[item.order] = item
        if self._outbox is None:
            self._unsent.append(item)
            self._sender_wake.set()
            return
        group = self._group
        group.items.append(item)
        self._writer_wake.set()
        await group.done.wait()
        if group.error is not None:
            raise group.error
        if not group.written:
            self._raise_stops()
            raise ClientClosed("the client stopped before the cost was written")

    async def _receipt(self, item: _Item) -> Receipt:
        if item.done is None:
            item.done = anyio.Event()
        item.waiting = True
        try:
            while item.receipt is None:
                if item.refused is not None:
                    code, detail = item.refused
                    raise CostRefused([(item.dispatch_id, code, detail)])
                self._raise_stops()
                self._check_dispatcher()
                await item.done.wait()
                item.done = anyio.Event()
            return item.receipt
        finally:
            item.waiting = False

    # -- background: the connection ------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        attempt = 0
        while True:
            attempt += 1
            self._status(ConnectionStatus("connecting", attempt=attempt))
            delay_floor = 0.0
            try:
                ws = await connect(
                    self.url,
                    token=self._token,
                    ssl_context=self._ssl_context,
                    headers=self._headers,
                    connect_timeout=self.timeout,
                )
            except HandshakeRejected as exc:
                if exc.status not in _RETRY_STATUSES:
                    self._stop(_refusal(exc))
                    return
                reason = f"refused with HTTP {exc.status}"
                delay_floor = _retry_after(exc)
            except (OSError, TimeoutError, ConnectionClosed, ssl.SSLError) as exc:
                reason = _describe(exc)
            else:
                session = await self._serve(ws)
                reason = session.reason
                if session.worked:
                    backoff, attempt = BACKOFF_MIN_S, 0
            if not self._reconnect:
                self._status(ConnectionStatus("disconnected", reason, None, attempt))
                self._stop(ServiceUnavailable(f"cannot reach {self.url}: {reason}"))
                return
            delay = max(delay_floor, backoff * random.uniform(0.5, 1.0))
            self._status(ConnectionStatus("disconnected", reason, delay, attempt))
            log.info("connection to %s lost (%s); retrying in %.2fs", self.url, reason, delay)
            await anyio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _serve(self, ws: WebSocket) -> _Session:
        with anyio.CancelScope() as scope:
            session = _Session(ws, scope)
            self._session = session
            self._connected.set()
            self._status(ConnectionStatus("connected"))
            try:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._guard, session, self._receiver)
                    tasks.start_soon(self._guard, session, self._sender)
                    tasks.start_soon(self._guard, session, self._keepalive)
            finally:
                self._end_session(session)
                with anyio.CancelScope(shield=True):
                    await ws.aclose()
        return session

    async def _guard(
        self, session: _Session, task: Callable[[_Session], collections.abc.Awaitable[None]]
    ) -> None:
        try:
            await task(session)
        except ConnectionClosed as exc:
            closed = f"closed by the service ({exc.code}{' ' + exc.reason if exc.reason else ''})"
            session.end("connection broke" if exc.code == 1006 else closed)

    def _end_session(self, session: _Session) -> None:
        self._session = None
        self._connected = anyio.Event()
        # The next connection's subscribe brings the current spend; a
        # subscriber added meanwhile must not start on this one's last.
        self._last_spend = None
        # Everything in flight goes back to the front of the queue, in order:
        # it is resent on the next connection (the service dedupes).
        items = [item for batch in session.inflight for item in batch.items]
        self._unsent.extendleft(reversed(items))
        session.inflight.clear()
        for entry in session.expect:
            if entry.kind in _ALWAYS_ANSWERED:
                entry.lost = True
                entry.settle()
        session.expect.clear()
        self._signal()

    async def _receiver(self, session: _Session) -> None:
        while True:
            text = await session.ws.receive()
            try:
                message = decode_service_message(text)
            except WireError as exc:
                log.warning("%s; reconnecting", exc.detail)
                session.end("the service sent a message this client cannot read")
                return
            if message is not None:
                session.worked = True
                self._on_message(session, message)

    async def _sender(self, session: _Session) -> None:
        if self._live_subscriptions():
            await self._send_subscribe(session)
        while True:
            # Made before looking, so that a wake-up while sending is not lost.
            wake = self._sender_wake = anyio.Event()
            # The batch is taken from the queue only once the lock is held,
            # and is in flight before the next checkpoint: taking the lock
            # can be cancelled (the session ending), and costs taken before
            # it would then be in neither the queue nor in flight, so never
            # resent (and flush() would wait for them for good).
            async with session.lock:
                batch = self._next_batch(session)
                if batch is not None:
                    frame = costs_frame([item.body for item in batch.items]).decode()
                    batch.expect = _Expect(next(session.frames), "costs", batch=batch)
                    session.expect.append(batch.expect)
                    session.inflight.append(batch)
                    session.inflight_items += len(batch.items)
                    await session.ws.send(frame)
                    if session.probing is batch:
                        key = f"p{next(self._ids)}"
                        session.expect.append(_Expect(next(session.frames), "probe", key))
                        await session.ws.send(f'{{"type":"health","id":"{key}"}}')
                    continue
            if session.subscribed or not self._live_subscriptions():
                await wake.wait()
            else:
                await self._send_subscribe(session)

    def _next_batch(self, session: _Session) -> _Batch | None:
        if not self._unsent or self._forbidden is not None:
            return None
        careful = self._careful()
        if careful and session.probing is not None:
            return None
        room = self.window - session.inflight_items
        if room <= 0:
            return None
        limit = min(room, self._probe_size if careful else self.batch_size)
        budget = self._max_frame_bytes - _FRAME_OVERHEAD
        items: list[_Item] = []
        while self._unsent and len(items) < limit:
            size = len(self._unsent[0].body) + 1  # and its comma
            if items and size > budget:
                break
            budget -= size
            items.append(self._unsent.popleft())
        batch = _Batch(items)
        if careful:
            session.probing = batch
        return batch

    async def _send_subscribe(self, session: _Session) -> None:
        session.subscribed = True
        await session.ws.send('{"type":"subscribe"}')

    async def _keepalive(self, session: _Session) -> None:
        while True:
            await anyio.sleep(KEEPALIVE_S)
            quiet = anyio.current_time() - session.ws.last_activity
            if quiet > 3 * KEEPALIVE_S:
                session.end("the service stopped answering")
                return
            if quiet > KEEPALIVE_S:
                await session.ws.ping()

    # -- answers ------------------------------------------------------------------

    def _on_message(self, session: _Session, message: ServiceMessage) -> None:
        if isinstance(message, Acks):
            self._on_acks(session, message.acks)
        elif isinstance(message, Spend):
            self._last_spend = message
            for subscription in list(self._subscriptions):
                subscription.offer(message)
        elif isinstance(message, AlertNotice):
            for subscription in list(self._subscriptions):
                subscription.offer(message)
        elif isinstance(message, Health):
            key = message.id or ""
            self._answered(session, lambda e: e.kind in _ASKS_HEALTH and e.key == key, message)
        elif isinstance(message, Admission):
            dispatch_id = message.dispatch_id
            self._answered(session, lambda e: e.kind == "admit" and e.key == dispatch_id, message)
        elif isinstance(message, ServiceError):
            self._on_error(session, message)
        elif isinstance(message, Ack):
            pass  # this client sends batches only

    def _on_acks(self, session: _Session, acks: list[Receipt]) -> None:
        batch = session.inflight[0] if session.inflight else None
        if batch is None or [a.dispatch_id for a in acks] != [i.dispatch_id for i in batch.items]:
            log.warning("acks that match no batch in flight; reconnecting")
            session.end("the service acknowledged costs this client did not send")
            return
        session.inflight.popleft()
        session.inflight_items -= len(batch.items)
        assert batch.expect is not None
        self._passed(session, batch.expect.n + 1)
        with contextlib.suppress(ValueError):
            session.expect.remove(batch.expect)
        if session.probing is batch:
            self._probe_passed(session)
        for item, receipt in zip(batch.items, acks, strict=True):
            self._resolve(item, receipt)
        self._sender_wake.set()
        if self._outbox is not None:
            self._writer_wake.set()
        self._signal()

    def _answered(
        self, session: _Session, match: Callable[[_Expect], bool], answer: Health | Admission
    ) -> None:
        entry = next((e for e in session.expect if match(e)), None)
        if entry is None:
            return  # an answer to a frame of an earlier connection, or not ours
        self._passed(session, entry.n)
        session.expect.remove(entry)
        if entry.kind == "probe":
            self._probe_passed(session)
        entry.answer = answer
        entry.settle()

    def _passed(self, session: _Session, before: int) -> None:
        """Frames before ``before`` were read by the service without error."""
        while session.expect and session.expect[0].n < before:
            entry = session.expect[0]
            if entry.kind in _ALWAYS_ANSWERED:
                break  # still owes its answer (answers come in order; keep it)
            session.expect.popleft()
            if entry.batch is not None and entry.batch is session.probing:
                self._probe_passed(session)

    def _probe_passed(self, session: _Session) -> None:
        if session.probing is not None:
            session.probing = None
            self._probe_size = min(self._probe_size * 2, self.batch_size)
            self._sender_wake.set()

    def _on_error(self, session: _Session, error: ServiceError) -> None:
        if error.code == "forbidden":
            self._forbid(session, error)
            return
        head = session.expect[0] if session.expect else None
        if head is None:
            log.warning("an error answering nothing in flight: %s: %s", error.code, error.detail)
            return
        if head.kind in _ALWAYS_ANSWERED:
            session.expect.popleft()
            if head.kind == "probe":
                session.end(f"the service refused a probe ({error.code})")
                return
            head.error = error
            head.settle()
            return
        alone = len(session.expect) == 1 or session.expect[1].kind == "probe"
        if not alone:
            self._be_careful()
            session.end(f"an error the client cannot place ({error.code}); resending carefully")
            return
        session.expect.popleft()
        batch = head.batch
        assert batch is not None
        if error.code not in ("invalid_cost", "invalid_message"):
            # Not about the costs (overloaded, unavailable): resend them later.
            session.end(f"the service answered {error.code}: {error.detail}")
            return
        session.inflight.remove(batch)
        session.inflight_items -= len(batch.items)
        if session.probing is batch:
            session.probing = None
        if len(batch.items) == 1:
            self._refuse(batch.items[0], error.code, error.detail)
        else:
            # All or nothing: none of it counted. Halve it until the refused
            # cost is found; the others go through in smaller batches.
            self._unsent.extendleft(reversed(batch.items))
            self._be_careful()
            self._probe_size = max(1, len(batch.items) // 2)
        self._sender_wake.set()
        self._signal()

    def _be_careful(self) -> None:
        newest = next(reversed(self._unresolved), 0)
        self._careful_until = max(self._careful_until, newest)
        self._probe_size = self.batch_size

    def _careful(self) -> bool:
        oldest = next(iter(self._unresolved), None)
        return oldest is not None and oldest <= self._careful_until

    def _forbid(self, session: _Session, error: ServiceError) -> None:
        if self._forbidden is None:
            log.warning("the service refused this client's costs: %s", error.detail)
            self._forbidden = Forbidden(
                f"the service refused: {error.detail} (a dispatcher's token is needed"
                " for costs, cycle and admit); costs stay queued"
            )
        for entry in session.expect:
            if entry.kind == "admit":
                entry.error = error
                entry.settle()
        self._wake_items()
        self._signal()
        session.end("the token may not send costs")

    def _resolve(self, item: _Item, receipt: Receipt) -> None:
        if self._unresolved.pop(item.order, None) is None:
            return
        item.receipt = receipt
        if item.row is not None:
            self._to_delete.append(item.row)
        if item.done is not None:
            item.done.set()

    def _refuse(self, item: _Item, code: str, detail: str) -> None:
        if self._unresolved.pop(item.order, None) is None:
            return
        log.warning("the service refused cost %r for good: %s: %s", item.dispatch_id, code, detail)
        item.refused = (code, detail)
        if item.row is not None:
            self._to_refuse.append((item.row, item.body, code, detail))
            self._writer_wake.set()
        if item.waiting and item.done is not None:
            item.done.set()
        else:
            self._refused_unreported.append((item.dispatch_id, code, detail))

    # -- background: the outbox ------------------------------------------------------

    async def _writer(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        while True:
            group = self._group
            if not (group.items or self._to_delete or self._to_refuse):
                if self._writes_done < self._writes_asked:
                    self._writes_done = self._writes_asked
                    self._signal()
                wake = self._writer_wake = anyio.Event()
                await wake.wait()
                continue
            self._group = _WriteGroup()
            asked = self._writes_asked
            delete, self._to_delete = self._to_delete, []
            refuse, self._to_refuse = self._to_refuse, []
            bodies = [item.body for item in group.items]
            try:
                rows = await anyio.to_thread.run_sync(
                    outbox.write, bodies, delete, refuse, limiter=self._limiter
                )
            except OutboxError as exc:
                log.error("%s", exc)
                group.error = exc
                for item in group.items:
                    self._unresolved.pop(item.order, None)
                # Acknowledged rows are deleted later; a row left behind is
                # only resent and acknowledged as a duplicate.
                self._to_delete[:0] = delete
                self._to_refuse[:0] = refuse
                group.done.set()
                self._signal()
                await anyio.sleep(BACKOFF_MAX_S if not group.items else 0)
                continue
            for item, row in zip(group.items, rows, strict=True):
                item.row = row
                if item.order in self._unresolved:
                    self._unsent.append(item)
            self._writes_done = asked
            group.written = True
            group.done.set()
            self._sender_wake.set()
            self._signal()

    # -- requests and waiting --------------------------------------------------------

    async def _ask(self, kind: str, key: str, frame: str) -> Health | Admission:
        with _unavailable_after(self.timeout, f"no answer to {kind} from the service"):
            while True:
                self._raise_stops()
                session = await self._wait_session()
                entry = _Expect(0, kind, key)
                entry.done = anyio.Event()
                try:
                    async with session.lock:
                        entry.n = next(session.frames)
                        session.expect.append(entry)
                        await session.ws.send(frame)
                except ConnectionClosed:
                    await self._wait_session_gone(session)
                    continue
                await entry.done.wait()
                if entry.lost:
                    continue  # the connection broke first: ask again on the next one
                if entry.error is not None:
                    code, detail = entry.error.code, entry.error.detail
                    if code == "forbidden":
                        raise Forbidden(detail)
                    if code == "invalid_cost":
                        raise InvalidCost(detail, "invalid_cost")
                    if code == "invalid_message":
                        raise InvalidCost(detail, "invalid_message")
                    raise RequestRefused(code, detail)
                if entry.answer is None:  # woken by the client stopping
                    self._raise_stops()
                    raise ClientClosed("the client stopped")
                return entry.answer

    async def _wait_session(self) -> _Session:
        while self._session is None:
            self._raise_stops()
            await self._connected.wait()
        return self._session

    async def _wait_session_gone(self, session: _Session) -> None:
        while self._session is session:
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _signal(self) -> None:
        """Wake everyone waiting for a change of state (they check again)."""
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _wake_items(self) -> None:
        for item in self._unresolved.values():
            if item.done is not None:
                item.done.set()

    def _wake_everyone(self) -> None:
        """The client stops (an error no retry can change, or closing):
        every waiter wakes and raises."""
        if not self._started:
            return
        self._signal()
        self._connected.set()
        self._group.done.set()
        self._wake_items()
        session = self._session
        if session is not None:
            for entry in session.expect:
                entry.settle()
        for subscription in list(self._subscriptions):
            subscription.end(self._fatal)

    def _stop(self, error: ClientError) -> None:
        """A refusal no retry can change: every call raises ``error`` now."""
        log.info("client stops: %s", error)
        self._fatal = error
        self._wake_everyone()

    def _raise_stops(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientClosed("the client is closed")

    def _check_open(self) -> None:
        if not self._started or self._tasks is None:
            if self._closed:
                raise ClientClosed("the client is closed")
            raise ClientClosed("use the client inside `async with BudgetClient(...)`")

    def _check_dispatcher(self) -> None:
        if self._forbidden is not None:
            raise self._forbidden

    # -- subscriptions -------------------------------------------------------------

    def _add_subscription(self, subscription: Subscription) -> None:
        if self._fatal is not None:
            subscription.end(self._fatal)
            return
        self._subscriptions.add(subscription)
        session = self._session
        if session is not None and session.subscribed and self._last_spend is not None:
            subscription.offer(self._last_spend)
        self._sender_wake.set()

    def _live_subscriptions(self) -> bool:
        return any(not s.closed for s in self._subscriptions)

    def _status(self, status: ConnectionStatus) -> None:
        if self._on_connection is not None:
            self._on_connection(status)


def _refusal(exc: HandshakeRejected) -> ClientError:
    if exc.status == 401:
        return Unauthorized(
            "the service refused the token (HTTP 401): give a valid token"
            " (sent as 'Authorization: Bearer TOKEN')"
        )
    if exc.status == 403:
        return Forbidden(f"the service refused the connection (HTTP 403): {exc}")
    return HandshakeRefused(exc.status, f"the service refused the connection: {exc}")


def _retry_after(exc: HandshakeRejected) -> float:
    value = exc.header(b"retry-after")
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return min(seconds, BACKOFF_MAX_S) if math.isfinite(seconds) and seconds > 0 else 0.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, ConnectionClosed):
        return exc.reason or "connection closed"
    if isinstance(exc, OSError):
        cause = exc.__cause__ or exc.__context__
        if not exc.strerror and isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _unavailable_after(seconds: float, what: str) -> collections.abc.Iterator[None]:
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise ServiceUnavailable(f"{what} within {seconds:g}s") from None
