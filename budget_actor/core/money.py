"""Money: exact decimal amounts, parsed and checked in one place.

Every amount in budget_actor is a :class:`decimal.Decimal`. Amounts arrive as
JSON strings or JSON numbers (msgspec reads a number exactly from its text) or
as Python values from the in-process API; all of them pass through
:func:`parse_usd` before the actor sees them.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

import msgspec

# A dedicated context for sums. Inexact is trapped: a sum that cannot be held
# exactly raises instead of being rounded, so the money is exact or it is an
# error, never a guess. 200 digits hold any sum of amounts of at most
# MAX_AMOUNT_CHARS characters, many times over.
MONEY_CONTEXT = decimal.Context(
    prec=200,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.Overflow, decimal.DivisionByZero, decimal.Inexact],
)
# For ratios (utilization), which are floats anyway.
RATIO_CONTEXT = decimal.Context(prec=28)

# Longest amount text we agree to look at. A 10,000-digit number is not a cost;
# refusing it by length keeps Decimal from doing quadratic work on hostile input.
MAX_AMOUNT_CHARS = 64

DEFAULT_MAX_COST = Decimal("1000")

# The only amount text we read: a JSON number's shape, optionally signed (so
# that "-1" gets "must not be negative" rather than "not a number"). Python's
# Decimal() would also take " 1 ", "1_0" or ".5"; an amount is money, and money
# is not guessed.
_AMOUNT_TEXT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NOT_FINITE = re.compile(r"[+-]?(s?nan|inf|infinity)", re.IGNORECASE)


class InvalidAmount(ValueError):
    """An amount was not a finite, non-negative, in-range decimal."""


def parse_usd(value: object, *, field: str = "usd", maximum: Decimal | None = None) -> Decimal:
    """Return ``value`` as an exact, validated :class:`Decimal`.

    Accepts a ``Decimal``, an ``int``, a decimal string, or the raw JSON text
    of an amount (``msgspec.Raw``: a JSON string or number, read exactly from
    its text). Floats are refused: a binary float has already lost the exact
    amount.

    Raises :class:`InvalidAmount`, whose message names ``field``, when the value
    is not a number, NaN, infinite, negative, too precise, too long, or above
    ``maximum``.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidAmount(
            f"`{field}` must be a decimal string or number, got {type(value).__name__}"
        )
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        amount = parse_text(value, field=field)
    elif isinstance(value, msgspec.Raw):
        amount = _parse_json(bytes(value), field)
    else:
        raise InvalidAmount(
            f"`{field}` must be a decimal string or number, got {type(value).__name__}"
        )
    return check_usd(amount, field=field, maximum=maximum)


def parse_text(text: str, *, field: str = "usd") -> Decimal:
    """The exact Decimal of an amount's text (a JSON number or string).

    Raises :class:`InvalidAmount` for anything but a plain decimal number.
    """
    if len(text) > MAX_AMOUNT_CHARS:
        raise InvalidAmount(f"`{field}` is too long ({len(text)} characters)")
    if _NOT_FINITE.fullmatch(text):
        raise InvalidAmount(f"`{field}` must be finite, got {text}")
    if not _AMOUNT_TEXT.fullmatch(text):
        raise InvalidAmount(f"`{field}` is not a decimal number: {text[:32]!r}")
    return Decimal(text)


_json_string = msgspec.json.Decoder(str)


def _parse_json(text: bytes, field: str) -> Decimal:
    """The amount of a JSON value's text: a string holding a decimal, or a number."""
    if text.startswith(b'"'):
        try:
            return parse_text(_json_string.decode(text), field=field)
        except msgspec.DecodeError:
            raise InvalidAmount(f"`{field}` is not a decimal number") from None
    if text[:1].isdigit() or text.startswith(b"-"):
        return parse_text(text.decode(), field=field)
    raise InvalidAmount(f"`{field}` must be a decimal string or number")


def check_usd(amount: Decimal, *, field: str = "usd", maximum: Decimal | None = None) -> Decimal:
    """Validate an already-parsed Decimal; see :func:`parse_usd`."""
    if not amount.is_finite():
        raise InvalidAmount(f"`{field}` must be finite, got {amount}")
    if amount.is_signed() and amount != 0:
        raise InvalidAmount(f"`{field}` must not be negative, got {amount}")
    if maximum is not None and amount > maximum:
        raise InvalidAmount(f"`{field}` {amount} is above the per-dispatch maximum {maximum}")
    _sign, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    # The plain-notation text must stay short too: 1e-400 is one character of
    # exponent but 400 digits once written out in the journal and on the wire.
    if len(digits) > MAX_AMOUNT_CHARS or abs(exponent) > MAX_AMOUNT_CHARS:
        raise InvalidAmount(f"`{field}` has too many digits (at most {MAX_AMOUNT_CHARS})")
    # -0 and 0E+3 become a plain 0; the sign of zero is not money.
    return amount.copy_abs() if amount == 0 else amount


def add(a: Decimal, b: Decimal) -> Decimal:
    """Exact sum under :data:`MONEY_CONTEXT`."""
    return MONEY_CONTEXT.add(a, b)


def sub(a: Decimal, b: Decimal) -> Decimal:
    """Exact difference under :data:`MONEY_CONTEXT`."""
    return MONEY_CONTEXT.subtract(a, b)


def to_wire(amount: Decimal) -> str:
    """The JSON-string form of an amount: plain notation, never an exponent."""
    return format(amount, "f")
