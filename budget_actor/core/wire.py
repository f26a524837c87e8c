"""The WebSocket wire protocol, sans I/O: decode client frames, encode replies.

Decoding is strict (unknown fields and unknown types are errors) and total: for
any input, :func:`decode` returns either a validated request or a
:class:`WireError` carrying the contract's error ``code`` and a ``detail`` that
names the field. Nothing unvalidated gets past this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from .cost import MAX_NAME_CHARS, Cost, InvalidCost, check_dispatch_id, check_estimate, make_cost
from .money import to_wire
from .views import Admission, AlertNotice, Health, Receipt, Spend

# A health request's id is echoed back: short and printable, as a cost's texts
# (control characters break logs and terminals).
_HealthId = Annotated[
    str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")
]

ErrorCode = Literal[
    "invalid_message",
    "invalid_cost",
    "forbidden",
    "unauthorized",
    "too_large",
    "overloaded",
    "unavailable",
]


class _Request(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    pass


class SubscribeRequest(_Request, tag="subscribe"):
    pass


def _as_sent(cost: type[Cost]) -> list[tuple[str, Any, Any]]:
    """A cost's fields as a frame carries them: the names, types and defaults
    of :class:`Cost` itself, but the amount as its raw JSON text. msgspec's own
    Decimal decoding would accept strings such as " 1 " or "1_0"; the text goes
    to :func:`make_cost`, which alone judges every field."""
    return [
        (field.name, msgspec.Raw if field.name == "usd" else field.type, field.default)
        for field in msgspec.structs.fields(cost)
    ]


# Derived from Cost, not written out again: a new field of a cost is a new
# field of the frame.
_CostFrame = msgspec.defstruct("_CostFrame", _as_sent(Cost), bases=(_Request,), tag="cost")


# One item of a `costs` frame: the same fields, untagged.
_CostItem = msgspec.defstruct("_CostItem", _as_sent(Cost), forbid_unknown_fields=True)

# The contract's bound on the items of one `costs` frame.
MAX_BATCH_ITEMS = 1000


# Its items are decoded in one go (msgspec, in C); an item that fails is
# found again by _refused_item, which decodes the items one by one to name it.
# (_CostItem is built at runtime, which mypy cannot follow into a type.)
_ITEMS: Any = Annotated[
    list[_CostItem],  # type: ignore[valid-type]
    msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS),
]
_CostsFrame: Any = msgspec.defstruct(
    "_CostsFrame", [("costs", _ITEMS)], bases=(_Request,), tag="costs"
)


class _RawCosts(msgspec.Struct):
    costs: list[msgspec.Raw]


class CostsRequest(msgspec.Struct, frozen=True):
    """A validated ``costs`` batch: every item valid, in the order given."""

    costs: list[Cost]


class CycleRequest(_Request, tag="cycle"):
    pass


class HealthRequest(_Request, tag="health"):
    id: _HealthId | None = None


class _AdmitFrame(_Request, tag="admit"):
    dispatch_id: str
    estimate_usd: msgspec.Raw


class AdmitRequest(msgspec.Struct, frozen=True):
    dispatch_id: str
    estimate_usd: Decimal


Request = SubscribeRequest | Cost | CostsRequest | CycleRequest | HealthRequest | AdmitRequest


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type"):
    dispatch_id: str
    duplicate: bool
    seq: int


class Error(msgspec.Struct, frozen=True, tag="error", tag_field="type", omit_defaults=True):
    code: ErrorCode
    detail: str
    # `unavailable` names the cost it refuses (the first, for a `costs` batch).
    dispatch_id: str | None = None


class WireError(Exception):
    """A frame that cannot be accepted; ``code`` and ``detail`` go to the client."""

    def __init__(self, code: ErrorCode, detail: str, dispatch_id: str | None = None) -> None:
        super().__init__(detail)
        self.code: ErrorCode = code
        self.detail = detail
        self.dispatch_id = dispatch_id

    def frame(self) -> bytes:
        return encode(Error(self.code, self.detail, self.dispatch_id))


_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    SubscribeRequest | _CostFrame | _CostsFrame | CycleRequest | HealthRequest | _AdmitFrame
)
_item_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_CostItem)
_raw_costs_decoder = msgspec.json.Decoder(_RawCosts)
_encoder = msgspec.json.Encoder()
_AT_PATH = re.compile(r" - at `\$\.([A-Za-z_]+)[^`]*`")
_AMOUNT_FIELDS = {"usd", "estimate_usd"}
# Optional fields that are left out rather than sent as null.
_OMIT_IF_NONE = frozenset({"id", "kind", "projected_spend", "reason"})


def decode(frame: str | bytes, *, max_cost: Decimal) -> Request:
    """Decode and validate one client frame.

    Raises :class:`WireError` with ``invalid_message`` for anything that is not
    a well-formed request of the contract (including an object that repeats
    a key), and ``invalid_cost`` for an amount that is not a finite,
    non-negative decimal at most ``max_cost`` or a text field that breaks the
    text rules (:mod:`budget_actor.core.cost`).

    Cost: one pass of msgspec's C parser, the field checks, and, only for a
    frame with more colons than keys, one regular-expression pass for
    repeated keys. A hostile frame (nested 5,000 deep, 64 KiB of keys) is
    refused at about the cost of parsing a normal one: nothing here walks
    the frame character by character in Python.
    """
    if isinstance(frame, bytes):
        raise WireError("invalid_message", "binary frames are not accepted; send JSON text")
    colons = frame.count(":")
    if colons > _MANY_COLONS:
        # Thousands of repeated keys would each cost msgspec an object before
        # it kept the last. With at most 7 known keys, a flood repeats one
        # within its first few tokens; the full check follows the parse.
        _refuse_repeated_keys(frame[:_PRESCAN_CHARS], limit=_PRESCAN_TOKENS)
    try:
        request = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "- at `$.costs[" in text:
            _refused_item(frame, max_cost)
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
        if field == "costs":
            _refused_item(frame, max_cost)
        where = f"`{field}`: " if field else ""
        code: ErrorCode = "invalid_cost" if field in _AMOUNT_FIELDS else "invalid_message"
        raise WireError(code, f"{where}JSON is nested too deeply") from None
    result: Request
    try:
        if isinstance(request, _CostFrame):
            result = make_cost(**msgspec.structs.asdict(request), max_cost=max_cost)
        elif isinstance(request, _CostsFrame):
            result = CostsRequest(_costs(request.costs, max_cost))
        elif isinstance(request, _AdmitFrame):
            result = AdmitRequest(
                check_dispatch_id(request.dispatch_id),
                check_estimate(request.estimate_usd, max_cost),
            )
        else:
            result = request
    except InvalidCost as exc:
        raise WireError(exc.code, exc.detail) from None
    # msgspec keeps the last of repeated keys without a word; so a frame with
    # `"usd":"0.01","usd":"999"` would count 999. Each key of the object has a
    # colon, so a frame with no more colons than the keys present cannot
    # repeat one; only others (a colon inside a text, an explicit null) are
    # scanned.
    # Parsed, so the frame is one object of at most 7 keys with scalar
    # values (a batch's items are checked on their own): the scan meets a
    # few dozen tokens at most.
    present = 1 + sum(value is not None for value in msgspec.structs.astuple(request))
    if isinstance(request, _CostsFrame):
        present = 2 + sum(_present(item) for item in request.costs)
        if colons > present:
            _refuse_repeated_keys_in_batch(frame, colons, request.costs)
    elif colons > present:
        _refuse_repeated_keys(frame)
    return result


def _present(item: Any) -> int:
    return sum(value is not None for value in msgspec.structs.astuple(item))


def _refuse_repeated_keys_in_batch(frame: str, colons: int, items: list[Any]) -> None:
    """A ``costs`` frame with more colons than keys: find the items that have
    more (each scanned on its own, so a batch of 1,000 costs is not walked
    whole) and the batch's own keys (``type``, ``costs``)."""
    raw = _raw_costs_decoder.decode(frame).costs
    inside = 0
    for index, (text, item) in enumerate(zip(raw, items, strict=True)):
        body = bytes(text)
        count = body.count(b":")
        inside += count
        if count > _present(item):
            repeated = repeated_key(body.decode())
            if repeated is not None:
                raise WireError(
                    "invalid_cost", f"costs[{index}]: key `{repeated[:64]}` appears more than once"
                )
    if colons - inside > 2:
        _refuse_repeated_keys(frame)


def _costs(items: list[Any], max_cost: Decimal) -> list[Cost]:
    """The decoded items of a ``costs`` frame, each through :func:`make_cost`."""
    costs = []
    for index, c in enumerate(items):
        try:
            costs.append(
                make_cost(
                    c.dispatch_id,
                    c.usd,
                    c.model,
                    c.input_tokens,
                    c.output_tokens,
                    c.agent,
                    max_cost=max_cost,
                )
            )
        except InvalidCost as exc:
            raise WireError("invalid_cost", f"costs[{index}]: {exc.detail}") from None
    return costs


def _refused_item(frame: str, max_cost: Decimal) -> None:
    """Raise the error of the first item of a ``costs`` frame that fails,
    decoding the items one by one; return if none does (the frame is wrong
    elsewhere)."""
    try:
        raw = _raw_costs_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return
    for index, item in enumerate(raw.costs):
        _item(item, index, max_cost)


def _item(raw: msgspec.Raw | bytes, index: int | None, max_cost: Decimal) -> Cost:
    """One item of a ``costs`` frame, by the rules of ``cost`` (:func:`make_cost`).

    Any problem is ``invalid_cost``, the contract's code for a refused batch,
    with a detail that names the item's index and the field.
    """
    where = f"costs[{index}]: " if index is not None else ""
    try:
        fields = _item_decoder.decode(raw)
        return make_cost(**msgspec.structs.asdict(fields), max_cost=max_cost)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_PATH.search(text)
        raise WireError("invalid_cost", where + _describe(text, match and match.group(1))) from None
    except msgspec.DecodeError as exc:
        raise WireError("invalid_cost", f"{where}not valid JSON: {exc}") from None
    except InvalidCost as exc:
        raise WireError("invalid_cost", where + exc.detail) from None
    except RecursionError:
        raise WireError("invalid_cost", f"{where}JSON is nested too deeply") from None


# More colons than this, and a frame is scanned for repeated keys before it
# is parsed: a message of the contract has at most 7 keys, so only a text
# full of colons, a flood of keys or deep nesting gets there. That scan
# looks at the first strings and characters only (a flood of the 7 keys,
# each with a text value, repeats one by its 15th string), so neither deep
# nesting nor a long text makes it cost more. A truncated text cannot make a
# key appear: inside a JSON string every quote is escaped.
_MANY_COLONS = 64
_PRESCAN_TOKENS = 16
_PRESCAN_CHARS = 1024


def _refuse_repeated_keys(frame: str, limit: int | None = None) -> None:
    repeated = repeated_key(frame, limit)
    if repeated is not None:
        raise WireError("invalid_message", f"key `{repeated[:64]}` appears more than once")


def peek_type(frame: str | bytes) -> str | None:
    """The ``type`` of a frame, read without validating anything else (one
    pass of msgspec's C parser), or None if there is none to read. For
    checking a role before paying for the rest of the checks."""
    try:
        kind = _kind_decoder.decode(frame).type
    except msgspec.DecodeError:
        return None
    except RecursionError:
        # Too deep to parse, even skipping: look for the key in the text.
        found = _TYPE_KEY.search(frame if isinstance(frame, str) else frame.decode("latin-1"))
        return found.group(1) if found else None
    return kind if isinstance(kind, str) else None


class _Kind(msgspec.Struct):
    type: object = None


_kind_decoder = msgspec.json.Decoder(_Kind)
_TYPE_KEY = re.compile(r'"type"\s*:\s*"([a-z_]{1,32})"')


def repeated_key(text: str, limit: int | None = None) -> str | None:
    """The first key that an object in ``text`` (valid JSON) repeats, or None;
    with ``limit``, among its first ``limit`` strings only.

    Keys are compared as JSON decodes them, so ``"usd"`` and ``"\\u0075sd"``
    are one key. Strings, whitespace and the gaps between strings are
    crossed with ``str.find`` and ``str.lstrip`` (C, memchr speed); Python
    steps once per string, brace and escaped quote. (Python's ``re`` reads
    about 10 ns a character, which 60 KiB of padding would turn into a
    millisecond.)
    """
    objects: list[set[str]] = []
    position, strings = 0, 0
    while True:
        opening = text.find('"', position)
        _braces(text, position, len(text) if opening < 0 else opening, objects)
        if opening < 0:
            return None
        closing = _string_end(text, opening)
        strings += 1
        if closing < 0 or (limit is not None and strings > limit):
            return None
        position = closing + 1
        after = text[position : position + 1]
        if after.isspace():
            after = text[position:].lstrip()[:1]
        if after == ":" and objects:
            key = text[opening + 1 : closing]
            if "\\" in key:
                key = _text_decoder.decode(f'"{key}"')
            seen = objects[-1]
            if key in seen:
                return key
            seen.add(key)


def _braces(text: str, start: int, stop: int, objects: list[set[str]]) -> None:
    """Open and close objects for the braces of ``text[start:stop]`` (no string
    in between), in order."""
    while True:
        opens = text.find("{", start, stop)
        closes = text.find("}", start, stop)
        if opens < 0 and closes < 0:
            return
        if closes < 0 or 0 <= opens < closes:
            objects.append(set())
            start = opens + 1
        else:
            if objects:
                objects.pop()
            start = closes + 1


def _string_end(text: str, opening: int) -> int:
    """The index of the quote that closes the string opened at ``opening``
    (one not escaped by an odd run of backslashes); -1 if none."""
    position = opening + 1
    while True:
        quote = text.find('"', position)
        if quote < 0:
            return -1
        backslash = quote
        while backslash > opening + 1 and text[backslash - 1] == "\\":
            backslash -= 1
        if (quote - backslash) % 2 == 0:
            return quote
        position = quote + 1


_text_decoder = msgspec.json.Decoder(str)

# The first key whose value opens an array or an object: where a frame that
# nests too deeply goes deep (the contract's messages nest no value). Found by
# one regular-expression search, never a walk over the frame in Python: a
# frame that is 60 KiB of spaces and then nests must cost no more to refuse
# than one that nests at once.
_NESTING_KEY = re.compile(r'"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:\s*[\[{]')


def _deep_field(frame: str) -> str | None:
    """The top-level key whose value nests too deeply, to name it in the
    error (the decoder gave up before it could say where); None if no key
    is found (a bare array, say)."""
    found = _NESTING_KEY.search(frame)
    return found.group(1) if found else None


def _plain(text: str) -> str:
    return _AT_PATH.sub("", text).rstrip()


def _describe(text: str, field: str | None) -> str:
    if text.startswith("Invalid value") and field == "type":
        return f"unknown message `type`: {text.split(' - ')[0].removeprefix('Invalid value ')}"
    if field is not None:
        return f"`{field}`: {_plain(text)}"
    return _plain(text)


def encode(message: Spend | AlertNotice | Health | Admission | Ack | Acks | Error) -> bytes:
    """JSON text of a service message.

    Amounts are JSON strings in plain notation (``"0.0000001"``, never
    ``"1E-7"``, which msgspec's own Decimal encoding would give): a reader
    that parses them as text must not meet an exponent.
    """
    if isinstance(message, Ack | Acks | Error):
        return _encoder.encode(message)
    fields: dict[str, object] = {"type": message.__struct_config__.tag}
    for name, value in msgspec.structs.asdict(message).items():
        if isinstance(value, Decimal):
            fields[name] = to_wire(value)
        elif value is not None or name not in _OMIT_IF_NONE:
            fields[name] = value
    return _encoder.encode(fields)


class Acks(msgspec.Struct, frozen=True, tag="acks", tag_field="type"):
    """The answer to a ``costs`` frame: one receipt per item, in the order given."""

    acks: list[Receipt]


# -- The client's side: cost items out, service messages in -------------------

# A cost as a `costs` item: the amount as a plain-notation string (msgspec
# would write a Decimal with an exponent), absent optional fields left out.
_CostOut = msgspec.defstruct(
    "_CostOut",
    [(f.name, str if f.name == "usd" else f.type, f.default) for f in msgspec.structs.fields(Cost)],
    omit_defaults=True,
)


def encode_cost_item(cost: Cost) -> bytes:
    """One item of a ``costs`` frame (no ``type``), from a validated cost."""
    fields = msgspec.structs.asdict(cost)
    fields["usd"] = to_wire(cost.usd)
    return _encoder.encode(_CostOut(**fields))


def costs_frame(items: Sequence[bytes]) -> bytes:
    """A ``costs`` frame from items encoded by :func:`encode_cost_item`."""
    return b'{"type":"costs","costs":[' + b",".join(items) + b"]}"


def decode_cost_item(item: bytes, *, max_cost: Decimal) -> Cost:
    """One item of a ``costs`` frame, checked as the service checks it.

    Raises :class:`WireError` (``invalid_cost``) naming the field.
    """
    return _item(item, None, max_cost)


class ServiceError(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    """An ``error`` as a client reads it: any ``code``, so that codes added in
    later versions still decode."""

    code: str
    detail: str = ""


ServiceMessage = Spend | AlertNotice | Health | Admission | Ack | Acks | ServiceError
_service_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(ServiceMessage)


def decode_service_message(frame: str | bytes) -> ServiceMessage | None:
    """Decode one message from the service, amounts as ``Decimal``.

    Unknown fields are ignored and a message of an unknown ``type`` gives
    None, as the protocol asks of clients. Raises :class:`WireError` for a
    frame that is not a valid message of a known type.
    """
    try:
        message: ServiceMessage = _service_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_PATH.search(text)
        if match is not None and match.group(1) == "type" and text.startswith("Invalid value"):
            return None
        raise WireError("invalid_message", f"bad message from the service: {text}") from None
    except msgspec.DecodeError as exc:
        raise WireError("invalid_message", f"the service sent invalid JSON: {exc}") from None
    return message
