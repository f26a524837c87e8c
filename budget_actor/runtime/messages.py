"""The actor's mailbox messages.

Every message is a msgspec Struct, cheap to build and typed. Requests that need
an answer carry a reply object that the actor fills in without ever waiting:
the requester is the one who waits.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Generic, TypeVar

import msgspec
import trio

from ..core.cost import Cost
from ..core.records import Alert, JournalEntry, Others
from ..core.views import Admission, Health
from .fanout import Subscription

T = TypeVar("T")


class ServiceStopped(RuntimeError):
    """The budget service has stopped; the call had no effect (or, for a cost,
    was not acknowledged: resend it with the same ``dispatch_id``)."""


class CostUnavailable(RuntimeError):
    """The cost could not be made durable now: the store and the spill file
    both failed (a full disk, an I/O error, a database that does not answer).
    It was **not** counted and not acknowledged; send it again later with the
    same ``dispatch_id`` (it then counts once). Health is ``degraded`` until
    writes succeed again, which the service notices by itself."""


class Reply(Generic[T]):
    """A one-shot answer: the actor calls :meth:`set` (or :meth:`fail`), the
    requester awaits :meth:`get`."""

    __slots__ = ("_done", "_failed", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._failed = False

    def set(self, value: T) -> None:
        self._value = value
        self._done.set()

    def fail(self) -> None:
        """The service ended before answering: :meth:`get` raises ServiceStopped."""
        if not self._done.is_set():
            self._failed = True
            self._done.set()

    async def get(self) -> T:
        await self._done.wait()
        if self._failed:
            raise ServiceStopped("the budget service stopped before answering")
        value = self._value
        assert value is not None
        return value


class CostReceipt:
    """The actor's answer to a cost, completed in two steps.

    The actor fills ``seq`` and ``duplicate`` at once; the persister sets
    ``durable`` once the cost (or, for a duplicate, the original) is in the
    store. An ``ack`` is sent only after ``durable``.
    """

    __slots__ = ("duplicate", "durable", "failed", "seq", "unavailable")

    def __init__(self) -> None:
        self.seq = 0
        self.duplicate = False
        self.failed = False
        #: With ``failed``: the service runs on, but could not make this cost
        #: durable (answer `unavailable`; the connection stays open).
        self.unavailable = False
        self.durable = trio.Event()

    def fail(self) -> None:
        """The service ended before the cost was durable: wake the waiter,
        which must not acknowledge it."""
        if not self.durable.is_set():
            self.failed = True
            self.durable.set()

    def refuse(self) -> None:
        """The cost (for a batch: one of its costs) could not be made durable
        and was taken back out of the spend: wake the waiter, which answers
        `unavailable` and acknowledges nothing."""
        if not self.durable.is_set():
            self.failed = True
            self.unavailable = True
            self.durable.set()


class BatchReceipt(CostReceipt):
    """The actor's answer to a ``costs`` batch: per item, in order, its ``seq``
    and whether it was a duplicate (``seqs``, ``duplicates``); ``durable`` is
    set once every item is durable (a barrier job after the batch's entries),
    so whoever acknowledges the batch waits once, not once per cost."""

    __slots__ = ("duplicates", "seqs")

    def __init__(self) -> None:
        super().__init__()
        self.seqs: list[int] = []
        self.duplicates: list[bool] = []


class RecordCost(msgspec.Struct):
    """Count ``cost``, and answer on ``receipt`` beside it (None for
    fire-and-forget sends)."""

    cost: Cost
    receipt: CostReceipt | None = None


class RecordCosts(msgspec.Struct):
    """Count a validated batch of costs, in order, as one message; answer on
    ``receipt``."""

    costs: list[Cost]
    receipt: BatchReceipt


class Admit(msgspec.Struct):
    """Reserve a validated estimate against the cap; the answer goes to ``reply``."""

    dispatch_id: str
    estimate: Decimal
    reply: Reply[Admission]
    # An id that the ledger does not know goes to the store first (it may
    # have been counted before a restart, or long enough ago to have left the
    # cache); the persister sends the message back with ``checked`` set, and
    # ``counted`` the original's (seq, day) if the store holds one.
    checked: bool = False
    counted: tuple[int, str] | None = None


class CountCycle(msgspec.Struct):
    pass


class QueryHealth(msgspec.Struct):
    reply: Reply[Health]


class Subscribe(msgspec.Struct):
    subscription: Subscription


class Unsubscribe(msgspec.Struct):
    subscription: Subscription


class Tick(msgspec.Struct):
    """Time passes: lets the day roll over at midnight even with no traffic."""


class StoreReport(msgspec.Struct):
    """From the persister: a write succeeded (through ``seq``) or failed."""

    ok: bool
    seq: int
    at: datetime
    patch_written: bool = False
    # How long the store took to commit this write.
    latency_s: float = 0.0


class ChildFailed(msgspec.Struct):
    """From a supervisor: ``child`` failed and is being restarted."""

    child: str


class AlertDelivered(msgspec.Struct):
    """From the alerter: the nudge row is written; push the alert to subscribers."""

    alert: Alert


class AlertWithdrawn(msgspec.Struct):
    """From the alerter: the store refused the nudge as premature (the shared
    spend has not reached its threshold); arm the threshold again."""

    alert: Alert


class Synced(msgspec.Struct):
    """From the coordinator: the other instances' durable totals, read from
    the store at trio time ``at``."""

    others: Others
    at: float


class Uncount(msgspec.Struct):
    """From the persister: the store refused these costs, their dispatch ids
    counted before in the dedupe window; each with the original's seq and day."""

    duplicates: list[tuple[JournalEntry, int, str]]


class Shutdown(msgspec.Struct):
    """Stop after everything sent before this message has been handled."""


def fail_waiters(message: object) -> None:
    """Wake whoever waits on ``message`` (a mailbox message or a persister
    job) with a failure: the service ends without answering it."""
    for name in ("receipt", "reply"):
        waiter = getattr(message, name, None)
        if isinstance(waiter, CostReceipt | Reply):
            waiter.fail()


Message = (
    RecordCost
    | RecordCosts
    | Admit
    | CountCycle
    | QueryHealth
    | Subscribe
    | Unsubscribe
    | Tick
    | StoreReport
    | AlertDelivered
    | AlertWithdrawn
    | Synced
    | Uncount
    | ChildFailed
    | Shutdown
)
