"""What the client raises. Every error derives from :class:`ClientError`.

Two kinds matter to a caller:

* **your input**: :class:`InvalidCost`, raised before anything is queued or
  sent (nothing happened; fix the value);
* **the service or the setup**: refused tokens or roles, a refused cost, an
  unusable outbox, a service that cannot be reached in time. Costs already
  enqueued are kept (in memory, or in the outbox file) in every case but
  :class:`CostRefused`, where the service said no to that one cost for good.
"""

from __future__ import annotations

from ..core.cost import InvalidCost as _CoreInvalidCost


class ClientError(Exception):
    """Base class of everything :mod:`budget_actor.client` raises on purpose."""


class InvalidCost(ClientError, _CoreInvalidCost):
    """A cost, estimate or id broke the service's input rules, checked here by
    the service's own code (:func:`budget_actor.core.cost.make_cost`). Nothing
    was queued or sent. Also a :class:`budget_actor.InvalidCost`.

    ``code`` is the contract's error code (``invalid_cost`` for an amount,
    ``invalid_message`` for an id or name), ``detail`` names the field.
    """


class Unauthorized(ClientError):
    """The service refused the token at the handshake (HTTP 401): no token,
    or a wrong one. Retrying cannot help, so the client stops."""


class Forbidden(ClientError):
    """The service refused what this client may do: its token is an observer's
    and it sent a cost, cycle or admit (``forbidden``), or the handshake was
    refused with HTTP 403. Costs stay queued (and in the outbox)."""


class HandshakeRefused(ClientError):
    """The service answered the WebSocket handshake with an HTTP status that
    retrying cannot change (for example 404: the URL does not end in ``/ws``).

    ``status`` is the HTTP status code.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class ServiceUnavailable(ClientError):
    """No connection to the service within the call's timeout, or the service
    refused the request as unavailable. Nothing enqueued is lost."""


class RequestRefused(ClientError):
    """The service answered a ``health`` or ``admit`` with an ``error``;
    ``code`` and ``detail`` are the service's."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class CostRefused(ClientError):
    """The service refused costs that this client had accepted, for good
    (for example, the service's ``--max-cost`` is lower than the client's).

    ``refused`` lists ``(dispatch_id, code, detail)`` for each. They were not
    counted and are no longer resent; with an outbox they stay in its
    ``refused`` table for inspection. Raised by the ``enqueue`` or ``record``
    that is still waiting for the cost, otherwise by the next :meth:`flush`.
    """

    def __init__(self, refused: list[tuple[str, str, str]]) -> None:
        first = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        super().__init__(f"the service refused cost {first[0]!r}: {first[1]}: {first[2]}{more}")
        self.refused = refused


class OutboxError(ClientError):
    """The outbox file cannot be used: it is not an outbox (another program's
    file, or not SQLite), it is damaged, or another process holds it. The file
    is left exactly as it was: it may hold costs that were promised safe."""


class ClientClosed(ClientError):
    """The client was used after its ``async with`` block ended, or its
    background task stopped (the error that stopped it is the cause)."""
