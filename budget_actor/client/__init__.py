"""budget_actor.client: the client library for dispatchers and subscribers.

For programs in other processes, on asyncio or trio (the same code, through
AnyIO). It imports nothing of the service but its pure core: importing it
loads neither trio nor the store drivers.

::

    from budget_actor.client import BudgetClient

    async with BudgetClient(url, token=None, outbox="costs.outbox") as client:
        await client.enqueue("dispatch-1", "0.045864", model="claude-haiku")
        receipt = await client.record("dispatch-2", "0.01")
        await client.flush()
        await client.cycle()
        health = await client.health()
        admission = await client.admit("dispatch-3", "0.10")
        async for update in client.subscribe():
            ...

Guarantees, the outbox, backpressure and failure modes: ``docs/client.md``.
"""

from ..core.views import Admission, AlertNotice, Health, Receipt, Spend, Update
from .budget_client import BudgetClient, ConnectionStatus
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
from .subscription import Subscription

__all__ = [
    "Admission",
    "AlertNotice",
    "BudgetClient",
    "ClientClosed",
    "ClientError",
    "ConnectionStatus",
    "CostRefused",
    "Forbidden",
    "HandshakeRefused",
    "Health",
    "InvalidCost",
    "OutboxError",
    "Receipt",
    "RequestRefused",
    "ServiceUnavailable",
    "Spend",
    "Subscription",
    "Unauthorized",
    "Update",
]
