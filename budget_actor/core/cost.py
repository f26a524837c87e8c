"""The cost of one dispatch: the one value a cost is, and the one place its rules live.

A :class:`Cost` is built exactly once, by :func:`make_cost`: from a ``cost``
frame (:func:`budget_actor.core.wire.decode` hands it the frame's fields, the
amount as its raw JSON text) or from the in-process API's arguments
(:meth:`budget_actor.runtime.service.Budget.record`). From then on the same
object travels unchanged: in the actor's mailbox (``RecordCost``), through the
ledger, inside the journal entry, to the store and the spill file.

Every rule a cost must pass is in :func:`make_cost` (and the two checks it is
made of, :func:`check_dispatch_id` and :func:`check_amount`, which ``admit``
shares). A client that wants to refuse bad input before sending uses the same
function, so the service and its clients can never disagree.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

import msgspec

from .money import InvalidAmount, parse_usd

# Bounds on free-text fields: long enough for any real id or model name,
# short enough that a hostile client cannot make the dedupe set or the journal
# hold megabytes per cost.
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
# Token counts are JSON integers that every reader can hold exactly (a double
# holds integers up to 2**53).
MAX_TOKENS = 2**53
# Control characters (C0, DEL and C1, such as the terminal escape CSI) in ids
# break logs and terminals; refuse them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# What a refusal says to a client: the amount is wrong (``invalid_cost``) or
# the message is (``invalid_message``): the contract's error codes.
CostErrorCode = Literal["invalid_cost", "invalid_message"]

# How msgspec names JSON types in its errors. A frame's fields are decoded
# with the types declared on Cost (msgspec checks those, fast, in C); the same
# type errors for Python values read the same, so a client sees one message
# whichever way its cost came in.
_JSON_TYPE = {"NoneType": "null", "dict": "object", "list": "array", "float": "float"}


class Cost(msgspec.Struct, frozen=True):
    """One dispatch's cost, validated: ``usd`` is exact, finite, ≥ 0 and at
    most the configured maximum; the texts are short and printable.

    Build it with :func:`make_cost`, never directly from untrusted values.
    """

    dispatch_id: str
    usd: Decimal
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    agent: str | None = None


class InvalidCost(ValueError):
    """A cost was refused; nothing changed. The message names the field.

    ``code`` is the contract's error code for it (``invalid_cost`` for a bad
    amount, ``invalid_message`` for any other field).
    """

    def __init__(self, detail: str, code: CostErrorCode = "invalid_cost") -> None:
        super().__init__(detail)
        self.detail = detail
        self.code: CostErrorCode = code


def make_cost(
    dispatch_id: object,
    usd: object,
    model: object = None,
    input_tokens: object = None,
    output_tokens: object = None,
    agent: object = None,
    *,
    max_cost: Decimal,
) -> Cost:
    """The validated :class:`Cost` of these fields, or :class:`InvalidCost`.

    ``usd`` is a ``Decimal``, an ``int``, a decimal string, or the raw JSON
    text of a frame's amount (``msgspec.Raw``: a JSON string or number, read
    exactly from its text); never a float. Pure: raises and changes nothing.
    """
    return Cost(
        check_dispatch_id(dispatch_id),
        check_amount(usd, "usd", max_cost),
        _text(model, "model"),
        _count(input_tokens, "input_tokens"),
        _count(output_tokens, "output_tokens"),
        _text(agent, "agent"),
    )


def validate(cost: Cost, *, max_cost: Decimal) -> Cost:
    """A :class:`Cost` read back from somewhere it could have been altered (a
    spill file), judged by the same rules as :func:`make_cost`."""
    return make_cost(*msgspec.structs.astuple(cost), max_cost=max_cost)


def check_dispatch_id(value: object) -> str:
    """A dispatch id: a non-empty, printable string of at most
    :data:`MAX_ID_CHARS`. Raises :class:`InvalidCost` (``invalid_message``)."""
    if type(value) is not str:
        raise _refused("dispatch_id", f"Expected `str`, got `{_json_type(value)}`")
    if not value:
        raise _refused("dispatch_id", "Expected `str` of length >= 1")
    return _printable(value, "dispatch_id", MAX_ID_CHARS)


def check_amount(value: object, field: str, max_cost: Decimal) -> Decimal:
    """An amount (see :func:`make_cost` for the forms it may take), exact and
    in range. Raises :class:`InvalidCost` (``invalid_cost``) naming ``field``."""
    try:
        return parse_usd(value, field=field, maximum=max_cost)
    except InvalidAmount as exc:
        raise InvalidCost(str(exc), "invalid_cost") from None


def _text(value: object, field: str) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise _refused(field, f"Expected `str | null`, got `{_json_type(value)}`")
    return _printable(value, field, MAX_NAME_CHARS)


def _printable(value: str, field: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise _refused(field, f"Expected `str` of length <= {max_chars}")
    if _CONTROL.search(value):
        raise _refused(field, "control characters are not allowed")
    return value


def _count(value: object, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise _refused(field, f"Expected `int | null`, got `{_json_type(value)}`")
    if not 0 <= value <= MAX_TOKENS:
        raise _refused(field, "Expected `int` >= 0 and <= 2**53")
    return value


def _json_type(value: object) -> str:
    name = type(value).__name__
    return _JSON_TYPE.get(name, name)


def _refused(field: str, why: str) -> InvalidCost:
    return InvalidCost(f"`{field}`: {why}", "invalid_message")
