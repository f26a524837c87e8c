"""The webhook child: POSTs every alert to the configured webhooks, at least once.

The deliveries are rows in the store (``budget_webhooks``), written in the
transaction that writes the alert's nudge row (see
:meth:`~budget_actor.stores.store.Store.webhooks_due`). This child only reads
and updates them, on a connection and a worker thread of its own, so a slow
database or a dead receiver never makes the budget actor, the persister or a
dispatcher wait: the actor does not even know this child exists.

Each round it claims the deliveries that are due (a lease keeps other
processes off them), starts one task per delivery (a few at a time), and
records each outcome: a 2xx marks the row delivered; anything else (another
status, a refused connection, no answer within the attempt timeout, a TLS
error) schedules a retry with exponential backoff. Because the rows outlive
the process, a restart resumes what a crash or a shutdown interrupted; that
is also why a receiver can see a delivery twice, and why each request carries
``Idempotency-Key`` (the nudge's name).

The HTTP client is a minimal one on h11 over trio streams (TLS for
``https://``): one request per connection, only the status line is read.
Cancellation (shutdown) abandons attempts in progress; their rows stay
claimed by this process's owner id, and the next start with that id takes
them up at once (another owner after the lease).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

import h11
import msgspec
import trio

from ..core.webhook import (
    RETRY_INITIAL_S,
    RETRY_MAX_S,
    Delivery,
    WebhookUrl,
    redacted,
    retry_delay,
    target_of,
)
from ..stores.store import Store, StoreError
from .stats import WebhookStats
from .storecall import call_store

log = logging.getLogger("budget_actor.webhooks")

T = TypeVar("T")

USER_AGENT = "budget_actor"


class WebhookPolicy(msgspec.Struct, frozen=True, kw_only=True):
    # A receiver that has not answered (connect, TLS, request, status line)
    # within this time has failed this attempt; Slack answers in well under
    # a second.
    attempt_timeout_s: float = 10.0
    # A claimed delivery is left alone by other processes this long: longer
    # than an attempt plus recording it, so a live claimer never loses it.
    lease_s: float = 60.0
    retry_initial_s: float = RETRY_INITIAL_S
    retry_max_s: float = RETRY_MAX_S
    # How often the store is looked at for due deliveries (new alerts, other
    # instances' leases that ran out, retries that fell due).
    poll_s: float = 1.0
    # Attempts in progress at once, so a flood of alerts to a dead receiver
    # cannot open connections without bound.
    max_in_flight: int = 8


class WebhookError(Exception):
    """An attempt failed before a status line arrived."""


class _Outcome(msgspec.Struct, frozen=True):
    delivery: Delivery
    # None: delivered (2xx). Otherwise what went wrong, and when to retry.
    error: str | None = None
    retry_at: datetime | None = None


async def post(
    webhook: WebhookUrl,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """POST ``body`` (JSON) to ``webhook``; the response's status code.

    Raises ``OSError`` (connect), :class:`WebhookError` (the peer closed or
    spoke something that is not HTTP/1.1) or ``trio.BrokenResourceError`` /
    ``ssl.SSLError``; bound it with a deadline: a receiver that never
    answers makes it wait forever.
    """
    stream: trio.abc.Stream
    if webhook.tls:
        context = ssl_context or ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(
            webhook.host, webhook.port, ssl_context=context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(webhook.host, webhook.port)
    try:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="POST",
            target=webhook.target,
            headers=[
                ("Host", webhook.authority),
                ("User-Agent", USER_AGENT),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *headers,
            ],
        )
        data = conn.send(request) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise WebhookError(f"not an HTTP response ({exc})") from None
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(16384)))
            elif isinstance(event, h11.Response):
                return event.status_code
            elif isinstance(event, h11.ConnectionClosed):
                raise WebhookError("the receiver closed the connection without answering")
            # (an InformationalResponse, "100 Continue": keep reading)
    finally:
        await trio.aclose_forcefully(stream)


def _describe(exc: BaseException) -> str:
    """One line about a failed attempt (never the URL: errors name hosts)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WebhookSender:
    """Delivers the stored alert webhooks to ``webhooks``; run it supervised.

    ``store`` must be a connection of its own (:meth:`Store.companion`);
    ``owner`` names this process in the rows it claims (the instance id:
    one live process per id, so a new process with the id may take over
    what the last one had claimed). Progress is visible in ``stats``.
    """

    def __init__(
        self,
        store: Store,
        webhooks: Sequence[WebhookUrl],
        *,
        owner: str,
        clock: Callable[[], datetime],
        stats: WebhookStats,
        policy: WebhookPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
        store_timeout_s: float = 5.0,
    ) -> None:
        self.store = store
        # A store call that has not answered within this time fails (see
        # storecall), so a database that never answers stalls deliveries
        # for one poll, not for good.
        self.store_timeout_s = store_timeout_s
        self.owner = owner
        self.stats = stats
        self.policy = policy or WebhookPolicy()
        self._clock = clock
        self._by_target = {target_of(w.url): w for w in webhooks}
        self._targets = tuple(self._by_target)
        self._ssl = ssl_context
        # Its own limiter: the store calls of this child queue behind each
        # other, never behind the persister's.
        self._limiter = trio.CapacityLimiter(1)
        self._in_flight = 0
        # Outcomes not yet recorded in the store (it may be down).
        self._outcomes: list[_Outcome] = []
        self._wake = trio.Event()
        self._store_down = False

    async def run(self) -> None:
        """Deliver until cancelled. A store that fails is retried every poll
        (and logged once per outage); only a bug raises, for the supervisor."""
        policy = self.policy
        # Attempts of an earlier run of this child (or of a process that
        # had this owner id) were abandoned: take them up now.
        self._in_flight = 0
        released = False
        async with trio.open_nursery() as nursery:
            while True:
                wait = policy.poll_s
                try:
                    if not released:
                        count = await self._db(
                            self.store.webhooks_release, self.owner, self._clock()
                        )
                        released = True
                        if count:
                            log.info("resuming %d interrupted alert webhook deliveries", count)
                    wait = await self._round(nursery)
                    if self._store_down:
                        self._store_down = False
                        log.info("alert webhooks: the store is reachable again")
                except StoreError as exc:
                    if not self._store_down:
                        self._store_down = True
                        log.warning("alert webhooks: store unreachable (%s); retrying", exc)
                with trio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _round(self, nursery: trio.Nursery) -> float:
        """Record finished attempts, claim and start due ones; the seconds
        until the next look."""
        policy = self.policy
        while self._outcomes:
            await self._record(self._outcomes[0])
            self._outcomes.pop(0)
        free = max(policy.max_in_flight - self._in_flight, 0)
        due = await self._db(
            self.store.webhooks_due,
            self._targets,
            self._clock(),
            self.owner,
            policy.lease_s,
            free,
        )
        self.stats.pending = due.pending
        for delivery in due.claimed:
            self._in_flight += 1
            nursery.start_soon(self._deliver, delivery)
        if due.next_due_s is None:
            return policy.poll_s
        return min(policy.poll_s, due.next_due_s)

    async def _deliver(self, delivery: Delivery) -> None:
        """One attempt; its outcome goes to the main loop, which records it."""
        webhook = self._by_target[delivery.target]
        where = redacted(webhook)
        if webhook.tls and self._ssl is None:
            # Once: loading the system's CA certificates takes a moment.
            self._ssl = ssl.create_default_context()
        policy = self.policy
        error: str | None = None
        try:
            with trio.fail_after(policy.attempt_timeout_s):
                status = await post(
                    webhook, delivery.body, [("Idempotency-Key", delivery.name)], self._ssl
                )
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except trio.TooSlowError:
            error = f"no answer within {policy.attempt_timeout_s:g}s"
        except Exception as exc:
            # Whatever an attempt raises is this attempt's failure, retried
            # like a refused connection (OSError, TLS, h11's errors, and also
            # the resolver's UnicodeError for a name it cannot encode): a
            # delivery must never fail this child, whose restarts would
            # escalate and stop the whole budget service.
            # trio reports a TLS failure (a certificate that does not verify)
            # as BrokenResourceError caused by the ssl.SSLError: name the cause.
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
            error = _describe(cause or exc)
        finally:
            self._in_flight -= 1
        if error is None:
            self.stats.delivered += 1
            log.info(
                "alert webhook %s delivered %s (attempt %d)",
                where,
                delivery.name,
                delivery.attempts,
            )
            outcome = _Outcome(delivery)
        else:
            self.stats.failures += 1
            delay = retry_delay(delivery.attempts, policy.retry_initial_s, policy.retry_max_s)
            log.warning(
                "alert webhook %s failed for %s (%s), attempt %d; retrying in %gs",
                where,
                delivery.name,
                error,
                delivery.attempts,
                delay,
            )
            outcome = _Outcome(delivery, error, self._clock() + timedelta(seconds=delay))
        self._outcomes.append(outcome)
        self._wake.set()

    async def _record(self, outcome: _Outcome) -> None:
        delivery = outcome.delivery
        if outcome.error is None:
            await self._db(
                self.store.webhook_delivered, delivery.target, delivery.name, self._clock()
            )
        else:
            assert outcome.retry_at is not None
            await self._db(
                self.store.webhook_failed,
                delivery.target,
                delivery.name,
                self.owner,
                outcome.retry_at,
                outcome.error,
            )

    async def _db(self, call: Callable[..., T], *args: object) -> T:
        return await call_store(
            self.store, call, *args, limiter=self._limiter, timeout_s=self.store_timeout_s
        )
