"""The cost of one dispatch: the one value a cost is, and the one place its rules live.

A :class:`Cost` is built exactly once, by :func:`make_cost`: from a ``cost``
frame (:func:`budget_actor.core.wire.decode` hands it the frame's fields, the
amount as its raw JSON text) or from the in-process API's arguments
(:meth:`budget_actor.runtime.service.Budget.record`). From then on the same
object travels unchanged: in the actor's mailbox (``RecordCost``), through the
ledger, inside the journal entry, to the store and the spill file.

Every rule a cost must pass is in :func:`make_cost` (and the checks it is
made of, :func:`check_dispatch_id` and :func:`check_amount`, which ``admit``
shares through :func:`check_estimate`). A client that wants to refuse bad
input before sending uses the same functions, so the service and its clients
can never disagree.
"""

from __future__ import annotations

import re
import unicodedata
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
# Characters a text field may not hold (the contract's "Input rules"):
# control (Unicode category Cc: C0, DEL, C1 such as the terminal escape CSI)
# breaks logs and terminals; format (Cf: bidirectional overrides such as
# U+202E, zero-width characters such as U+200B) makes two different ids look
# alike or reorders what a report shows; line and paragraph separators (Zl,
# Zp) split a log line. This class is those categories as of Unicode 14; a
# text with any other non-printable character is checked character by
# character against the running Python's Unicode database (:func:`_refused_char`),
# so a newer Unicode's format characters are refused too.
_REFUSED_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd"
    "\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f]"
)
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})

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


def _refused_char(value: str) -> str | None:
    """The first character of ``value`` in :data:`REFUSED_CATEGORIES`, or None.

    Fast for what clients send: a printable text (``str.isprintable``, in C)
    holds none, and the known ones are found by one regular expression; only
    a text with other non-printable characters (no-break spaces, private
    use, unassigned) is looked at character by character, at most
    :data:`MAX_NAME_CHARS` of them.
    """
    if value.isprintable():
        return None
    found = _REFUSED_CHARS.search(value)
    if found is not None:
        return found.group()
    for char in value:
        if not char.isprintable() and unicodedata.category(char) in REFUSED_CATEGORIES:
            return char
    return None


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
    """A dispatch id: a string of at most :data:`MAX_ID_CHARS`, not blank, with
    no control, format or separator character. Raises :class:`InvalidCost`:
    ``invalid_message`` for a wrong type or length, ``invalid_cost`` for the
    text rules (the contract's "Input rules")."""
    if type(value) is not str:
        raise _refused("dispatch_id", f"Expected `str`, got `{_json_type(value)}`")
    return _printable(value, "dispatch_id", MAX_ID_CHARS)


def check_estimate(value: object, max_cost: Decimal) -> Decimal:
    """An ``admit`` estimate: an amount (:func:`check_amount`) greater than
    zero, since a reservation of nothing would always be allowed and only
    take memory. Raises :class:`InvalidCost` (``invalid_cost``)."""
    estimate = check_amount(value, "estimate_usd", max_cost)
    if estimate <= 0:
        raise InvalidCost("`estimate_usd` must be greater than 0", "invalid_cost")
    return estimate


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
    if not value.strip():
        raise InvalidCost(f"`{field}` must not be blank", "invalid_cost")
    char = _refused_char(value)
    if char is not None:
        raise InvalidCost(
            f"`{field}` must not contain control, format or line/paragraph separator"
            f" characters (found U+{ord(char):04X} at position {value.index(char)})",
            "invalid_cost",
        )
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
