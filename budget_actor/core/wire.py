"""The WebSocket wire protocol, sans I/O: decode client frames, encode replies.

Decoding is strict (unknown fields and unknown types are errors) and total: for
any input, :func:`decode` returns either a validated request or a
:class:`WireError` carrying the contract's error ``code`` and a ``detail`` that
names the field. Nothing unvalidated gets past this module.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from .money import InvalidAmount, check_usd, parse_text, parse_usd, to_wire
from .views import Admission, AlertNotice, Health, Spend

# Bounds on free-text fields: long enough for any real id or model name,
# short enough that a hostile client cannot make the dedupe set or the journal
# hold megabytes per cost.
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
# Control characters (C0, DEL and C1, such as the terminal escape CSI) in ids
# break logs and terminals; refuse them.
_PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"

DispatchId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=_PRINTABLE)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=_PRINTABLE)]
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**53)]

ErrorCode = Literal[
    "invalid_message", "invalid_cost", "forbidden", "unauthorized", "too_large", "overloaded"
]


class _Request(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    pass


class SubscribeRequest(_Request, tag="subscribe"):
    pass


class _CostFrame(_Request, tag="cost"):
    dispatch_id: DispatchId
    # Raw: the amount's JSON text, parsed by _money.parse_text. msgspec's own
    # Decimal decoding would accept strings such as " 1 " or "1_0".
    usd: msgspec.Raw
    model: Name | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    agent: Name | None = None


class CycleRequest(_Request, tag="cycle"):
    pass


class HealthRequest(_Request, tag="health"):
    id: Name | None = None


class _AdmitFrame(_Request, tag="admit"):
    dispatch_id: DispatchId
    estimate_usd: msgspec.Raw


class CostRequest(msgspec.Struct, frozen=True):
    """A validated ``cost``: ``usd`` is exact, finite, ≥ 0 and ≤ the maximum."""

    dispatch_id: str
    usd: Decimal
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    agent: str | None = None


def cost_request(
    dispatch_id: object,
    usd: object,
    *,
    max_cost: Decimal,
    model: object = None,
    input_tokens: object = None,
    output_tokens: object = None,
    agent: object = None,
) -> CostRequest:
    """Validate a cost given as Python values, with the same rules as :func:`decode`.

    ``usd`` is a Decimal, an int or a decimal string (never a float). Raises
    :class:`WireError` naming the field. Written out by hand rather than with
    ``msgspec.convert``: this runs once per in-process cost, and the checks are
    few.
    """
    try:
        value = parse_usd(usd, maximum=max_cost)
    except InvalidAmount as exc:
        raise WireError("invalid_cost", str(exc)) from None
    checked_id = _text(dispatch_id, "dispatch_id", MAX_ID_CHARS, required=True)
    assert checked_id is not None  # required=True
    return CostRequest(
        checked_id,
        value,
        _text(model, "model", MAX_NAME_CHARS),
        _count(input_tokens, "input_tokens"),
        _count(output_tokens, "output_tokens"),
        _text(agent, "agent", MAX_NAME_CHARS),
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(value: object, field: str, max_chars: int, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if type(value) is not str:
        raise WireError(
            "invalid_message", f"`{field}`: Expected `str`, got `{type(value).__name__}`"
        )
    if required and not value:
        raise WireError("invalid_message", f"`{field}`: Expected `str` of length >= 1")
    if len(value) > max_chars:
        raise WireError("invalid_message", f"`{field}`: Expected `str` of length <= {max_chars}")
    if _CONTROL.search(value):
        raise WireError("invalid_message", f"`{field}`: control characters are not allowed")
    return value


def _count(value: object, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise WireError(
            "invalid_message", f"`{field}`: Expected `int`, got `{type(value).__name__}`"
        )
    if not 0 <= value <= 2**53:
        raise WireError("invalid_message", f"`{field}`: Expected `int` >= 0 and <= 2**53")
    return value


class AdmitRequest(msgspec.Struct, frozen=True):
    dispatch_id: str
    estimate_usd: Decimal


Request = SubscribeRequest | CostRequest | CycleRequest | HealthRequest | AdmitRequest
_Frame = SubscribeRequest | _CostFrame | CycleRequest | HealthRequest | _AdmitFrame


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type"):
    dispatch_id: str
    duplicate: bool
    seq: int


class Error(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    code: ErrorCode
    detail: str


class WireError(Exception):
    """A frame that cannot be accepted; ``code`` and ``detail`` go to the client."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code: ErrorCode = code
        self.detail = detail

    def frame(self) -> bytes:
        return encode(Error(self.code, self.detail))


_decoder = msgspec.json.Decoder(_Frame)
_text_decoder = msgspec.json.Decoder(str)
_encoder = msgspec.json.Encoder()
_AT_PATH = re.compile(r" - at `\$\.([A-Za-z_]+)[^`]*`")
_AMOUNT_FIELDS = {"usd", "estimate_usd"}
# Optional fields that are left out rather than sent as null.
_OMIT_IF_NONE = frozenset({"id", "kind", "projected_spend", "reason"})


def decode(frame: str | bytes, *, max_cost: Decimal) -> Request:
    """Decode and validate one client frame.

    Raises :class:`WireError` with ``invalid_message`` for anything that is not
    a well-formed request of the contract, and ``invalid_cost`` for an amount
    that is not a finite, non-negative decimal at most ``max_cost``.
    """
    if isinstance(frame, bytes):
        raise WireError("invalid_message", "binary frames are not accepted; send JSON text")
    try:
        request = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_PATH.search(text)
        field = match.group(1) if match else None
        if field in _AMOUNT_FIELDS:
            raise WireError("invalid_cost", f"`{field}`: {_plain(text)}") from None
        if field is None and "type" in text and "Object missing required field" in text:
            raise WireError("invalid_message", "missing field `type`") from None
        raise WireError("invalid_message", _describe(text, field)) from None
    except msgspec.DecodeError as exc:
        raise WireError("invalid_message", f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        field = _deep_field(frame)
        where = f"`{field}`: " if field else ""
        code: ErrorCode = "invalid_cost" if field in _AMOUNT_FIELDS else "invalid_message"
        raise WireError(code, f"{where}JSON is nested too deeply") from None
    if isinstance(request, _CostFrame):
        return CostRequest(
            request.dispatch_id,
            amount(request.usd, "usd", max_cost),
            request.model,
            request.input_tokens,
            request.output_tokens,
            request.agent,
        )
    if isinstance(request, _AdmitFrame):
        estimate = amount(request.estimate_usd, "estimate_usd", max_cost)
        return AdmitRequest(request.dispatch_id, estimate)
    return request


def amount(raw: msgspec.Raw | bytes, field: str, max_cost: Decimal) -> Decimal:
    """The validated amount of a field's raw JSON (a string or a number).

    Raises :class:`WireError` ``invalid_cost`` naming ``field``.
    """
    text = bytes(raw)
    try:
        if text.startswith(b'"'):
            value = parse_text(_text_decoder.decode(text), field=field)
        elif text[:1].isdigit() or text.startswith(b"-"):
            value = parse_text(text.decode(), field=field)
        else:
            raise InvalidAmount(f"`{field}` must be a decimal string or number")
        return check_usd(value, field=field, maximum=max_cost)
    except InvalidAmount as exc:
        raise WireError("invalid_cost", str(exc)) from None


# Nesting deeper than this is what made msgspec give up; any real message of
# the contract nests at most 1 level.
_DEEP = 64


def _deep_field(frame: str) -> str | None:
    """The top-level key whose value nests too deeply, to name it in the error.

    A small scanner over the text (strings skipped), since the decoder gave up
    before it could say where.
    """
    depth = 0
    key: str | None = None
    i, n = 0, len(frame)
    while i < n:
        c = frame[i]
        if c == '"':
            j = i + 1
            while j < n and frame[j] != '"':
                j += 2 if frame[j] == "\\" else 1
            if depth == 1:
                rest = frame[j + 1 : j + 32].lstrip()
                if rest.startswith(":"):
                    key = frame[i + 1 : j]
            i = j + 1
            continue
        if c in "[{":
            depth += 1
            if depth > _DEEP:
                return key
        elif c in "]}":
            depth -= 1
        i += 1
    return None


def _plain(text: str) -> str:
    return _AT_PATH.sub("", text).rstrip()


def _describe(text: str, field: str | None) -> str:
    if text.startswith("Invalid value") and field == "type":
        return f"unknown message `type`: {text.split(' - ')[0].removeprefix('Invalid value ')}"
    if field is not None:
        return f"`{field}`: {_plain(text)}"
    return _plain(text)


def encode(message: Spend | AlertNotice | Health | Admission | Ack | Error) -> bytes:
    """JSON text of a service message.

    Amounts are JSON strings in plain notation (``"0.0000001"``, never
    ``"1E-7"``, which msgspec's own Decimal encoding would give): a reader
    that parses them as text must not meet an exponent.
    """
    if isinstance(message, Ack | Error):
        return _encoder.encode(message)
    fields: dict[str, object] = {"type": message.__struct_config__.tag}
    for name, value in msgspec.structs.asdict(message).items():
        if isinstance(value, Decimal):
            fields[name] = to_wire(value)
        elif value is not None or name not in _OMIT_IF_NONE:
            fields[name] = value
    return _encoder.encode(fields)
