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

from ._money import InvalidAmount, check_usd
from ._views import AlertNotice, Health, Spend

# Bounds on free-text fields: long enough for any real id or model name,
# short enough that a hostile client cannot make the dedupe set or the journal
# hold megabytes per cost.
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
# Control characters in ids break logs and terminals; refuse them.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"

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


class CostRequest(_Request, tag="cost"):
    dispatch_id: DispatchId
    usd: Decimal
    model: Name | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    agent: Name | None = None


class CycleRequest(_Request, tag="cycle"):
    pass


class HealthRequest(_Request, tag="health"):
    id: Name | None = None


class AdmitRequest(_Request, tag="admit"):
    dispatch_id: DispatchId
    estimate_usd: Decimal


Request = SubscribeRequest | CostRequest | CycleRequest | HealthRequest | AdmitRequest


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


_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()
_AT_PATH = re.compile(r" - at `\$\.([A-Za-z_]+)[^`]*`")
_AMOUNT_FIELDS = {"usd", "estimate_usd"}


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
        raise WireError("invalid_message", "JSON is nested too deeply") from None
    if isinstance(request, CostRequest):
        _check_amount(request.usd, "usd", max_cost)
    elif isinstance(request, AdmitRequest):
        _check_amount(request.estimate_usd, "estimate_usd", max_cost)
    return request


def _check_amount(amount: Decimal, field: str, max_cost: Decimal) -> None:
    try:
        check_usd(amount, field=field, maximum=max_cost)
    except InvalidAmount as exc:
        raise WireError("invalid_cost", str(exc)) from None


def _plain(text: str) -> str:
    return _AT_PATH.sub("", text).rstrip()


def _describe(text: str, field: str | None) -> str:
    if text.startswith("Invalid value") and field == "type":
        return f"unknown message `type`: {text.split(' - ')[0].removeprefix('Invalid value ')}"
    if field is not None:
        return f"`{field}`: {_plain(text)}"
    return _plain(text)


def encode(message: Spend | AlertNotice | Health | Ack | Error) -> bytes:
    """JSON text of a service message (amounts as strings)."""
    return _encoder.encode(message)
