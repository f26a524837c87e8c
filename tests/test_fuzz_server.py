"""Property tests of the real connection handler: Hypothesis generates frames
(valid ones, mutated ones, structured junk, arbitrary bytes, invalid UTF-8,
binary frames), they go over a real WebSocket to an in-process service, and for
every frame:

* either an ``error`` comes back, with a code from the contract (and, where the
  contract makes the frame invalid, it must), or the frame's effect happens
  (an ack with the right ``duplicate``, a health reply, a cycle counted);
* the spend changes by exactly the valid, first-seen costs: checked after every
  frame, and over the whole run;
* the service stays up: a fresh client is served at the end, and nothing was
  logged as a connection failure.

Whether a frame is valid is decided by :func:`classify`, an oracle written
from PROTOCOL.md and issue 5 with Python's ``json`` (not the service's decoder).
It says "must be refused", "must be accepted", or "may be refused" for limits
the contract leaves to the implementation (an id of 300 characters, an amount
of 70 digits, " 1" as an amount); an accepted frame must then have exactly the
effect its content asks for.

One service runs per test; Hypothesis runs in a worker thread and does each
example's I/O on the test's trio loop through ``trio.from_thread``.
``BUDGET_FUZZ_EXAMPLES`` sets the number of examples (``nox -s fuzz`` runs many).
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any, Literal

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budget_actor import make_config, open_budget
from budget_actor.core.access import Access
from budget_actor.net.server import ServerOptions, serve

from ._client import connect
from .test_hostile import (
    CONTRACT_CODES,
    DISPATCHER,
    OBSERVER,
    Closed,
    RawWS,
    bearer,
    read_until_eof,
    status_of,
    upgrade_request,
)

EXAMPLES = int(os.environ.get("BUDGET_FUZZ_EXAMPLES", "40"))
MAX_COST = Decimal("1000")
HOST = "127.0.0.1"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------

FIELDS: dict[str, frozenset[str]] = {
    "cost": frozenset(
        {"type", "dispatch_id", "usd", "model", "input_tokens", "output_tokens", "agent"}
    ),
    "cycle": frozenset({"type"}),
    "subscribe": frozenset({"type"}),
    "health": frozenset({"type", "id"}),
    "admit": frozenset({"type", "dispatch_id", "estimate_usd"}),
}
_AMOUNT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_C0 = re.compile(r"[\x00-\x1f\x7f]")
# The contract's text fields, refused (`invalid_cost`) if blank or holding a
# character of these categories (control, format, line/paragraph separator).
TEXT_FIELDS = frozenset({"dispatch_id", "model", "agent"})
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_ODD = re.compile(r"[\x80-\x9f\ud800-\udfff]")  # C1 controls, lone surrogates
_NAMEABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Longest names and amounts the oracle insists on; beyond, the implementation may refuse.
SAFE_NAME = 256
SAFE_AMOUNT_CHARS = 40


class Num(str):
    """A JSON number, as its text."""


class IntNum(Num):
    pass


class FracNum(Num):
    pass


class Obj(dict[str, Any]):
    duplicates: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> Obj:
    obj = Obj(pairs)
    names = [name for name, _ in pairs]
    obj.duplicates = frozenset(n for n in names if names.count(n) > 1)
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str) -> Any:
    """Strict JSON (RFC 8259) with numbers kept as text; ValueError if not JSON."""
    return json.loads(
        text,
        parse_int=IntNum,
        parse_float=FracNum,
        parse_constant=_no_constants,
        object_pairs_hook=_object,
    )


Effect = tuple[Any, ...]


@dataclass
class Expect:
    """What the service may do with one frame."""

    effect: Effect | None = None
    must: list[tuple[frozenset[str], str]] = field(default_factory=list)
    may: list[tuple[frozenset[str], str]] = field(default_factory=list)
    close_ok: bool = False

    @property
    def error(self) -> Literal["must", "may", "never"]:
        if self.must or self.effect is None:
            return "must"
        return "may" if self.may else "never"

    def refuse(self, codes: set[str] | str, name: str = "") -> None:
        self.must.append((frozenset([codes] if isinstance(codes, str) else codes), name))

    def allow_refusal(self, codes: set[str] | str = "", name: str = "") -> None:
        chosen = CONTRACT_CODES if not codes else [codes] if isinstance(codes, str) else codes
        self.may.append((frozenset(chosen), name))

    def codes(self) -> frozenset[str]:
        found = frozenset().union(*(codes for codes, _ in self.must + self.may))
        return found or frozenset(CONTRACT_CODES)

    def names(self) -> set[str] | None:
        """Field names an error's detail must mention one of (None: no check)."""
        names = {name for _, name in self.must + self.may}
        if not self.must or "" in names:
            return None
        return names


def _check_name(expect: Expect, message: Obj, name: str, *, required: bool) -> str | None:
    if name not in message:
        if required:
            expect.refuse("invalid_message", name)
        return None
    value = message[name]
    if value is None:
        if required:
            expect.refuse("invalid_message", name)
        else:
            expect.allow_refusal("invalid_message", name)
        return None
    if not isinstance(value, str) or isinstance(value, Num):
        expect.refuse("invalid_message", name)
        return None
    if name in TEXT_FIELDS and (
        not value.strip() or any(unicodedata.category(c) in REFUSED_CATEGORIES for c in value)
    ):
        # The contract's input rules; one too long may be refused for its length first.
        long = {"invalid_message"} if len(value) > SAFE_NAME else set()
        expect.refuse({"invalid_cost", *long}, name)
    elif name not in TEXT_FIELDS and (_C0.search(value) or _ODD.search(value)):
        expect.allow_refusal("invalid_message", name)
    elif _ODD.search(value) or len(value) > SAFE_NAME:
        expect.allow_refusal("invalid_message", name)
    return value


def _check_count(expect: Expect, message: Obj, name: str) -> None:
    if name not in message:
        return
    value = message[name]
    if value is None:
        expect.allow_refusal("invalid_message", name)
    elif not isinstance(value, IntNum):
        expect.refuse("invalid_message", name)
    elif value.startswith("-") and value != "-0":
        expect.refuse("invalid_message", name)
    elif len(value) > 15:  # past 2**53 the contract says nothing
        expect.allow_refusal("invalid_message", name)


def _check_amount(expect: Expect, message: Obj, name: str) -> Decimal | None:
    if name not in message:
        expect.refuse("invalid_message", name)
        return None
    value = message[name]
    if not isinstance(value, str):  # bool, null, array, object
        expect.refuse({"invalid_cost", "invalid_message"}, name)
        return None
    text = str(value)
    strict = isinstance(value, Num) or _AMOUNT.fullmatch(text) is not None
    try:
        amount = Decimal(text)
    except InvalidOperation:
        expect.refuse("invalid_cost", name)
        return None
    if not amount.is_finite() or (amount < 0) or amount > MAX_COST:
        expect.refuse("invalid_cost", name)
        return None
    digits = amount.as_tuple()
    exponent = digits.exponent if isinstance(digits.exponent, int) else 0
    if not strict or len(text) > SAFE_AMOUNT_CHARS or abs(exponent) > SAFE_AMOUNT_CHARS:
        expect.allow_refusal("invalid_cost", name)
    return abs(amount) if amount == 0 else amount


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return re.search(r"[\ud800-\udfff]", value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def classify(opcode: int, payload: bytes) -> Expect:
    expect = Expect()
    if opcode == 0x2:
        expect.refuse("invalid_message")
        return expect
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        # RFC 6455 8.1: the connection is failed (or the frame refused).
        expect.refuse("invalid_message")
        expect.close_ok = True
        return expect
    try:
        message = parse_json(text)
    except (ValueError, RecursionError):
        expect.refuse("invalid_message")
        return expect
    if not isinstance(message, Obj):
        expect.refuse("invalid_message")
        return expect
    if _has_surrogate(message):
        # "\\ud800" is JSON whose meaning RFC 8259 leaves open: may be refused as such.
        expect.allow_refusal("invalid_message")
    kind = message.get("type")
    if not isinstance(kind, str) or isinstance(kind, Num) or kind not in FIELDS:
        expect.refuse("invalid_message", "type")
        return expect
    for name in message.duplicates:
        # A frame whose object repeats a key is refused.
        expect.refuse("invalid_message", name if _NAMEABLE.fullmatch(name) else "")
    for name in message.keys() - FIELDS[kind]:
        expect.refuse("invalid_message", name if _NAMEABLE.fullmatch(name) else "")
    if kind == "cost":
        dispatch_id = _check_name(expect, message, "dispatch_id", required=True)
        usd = _check_amount(expect, message, "usd")
        for name in ("model", "agent"):
            _check_name(expect, message, name, required=False)
        for name in ("input_tokens", "output_tokens"):
            _check_count(expect, message, name)
        if dispatch_id is not None and usd is not None:
            expect.effect = ("cost", dispatch_id, usd)
    elif kind == "health":
        expect.effect = ("health", _check_name(expect, message, "id", required=False))
    elif kind == "admit":
        # The contract answers `admission`; an implementation without it refuses.
        _check_name(expect, message, "dispatch_id", required=True)
        estimate = _check_amount(expect, message, "estimate_usd")
        if estimate == 0:
            expect.refuse("invalid_cost", "estimate_usd")  # must be greater than zero
        expect.allow_refusal()
        expect.effect = ("admit",)
    else:
        expect.effect = (kind,)
    return expect


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

# "@" marks a dispatch id; each example replaces it with its own prefix, so
# examples are independent while ids still repeat within one.
IDS = st.text("ab-_0", min_size=1, max_size=4).map(lambda s: "@" + s)
AMOUNTS = st.one_of(
    [st.decimals(min_value=0, max_value=MAX_COST, places=places) for places in (0, 2, 6, 12)]
)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
NASTY: list[Any] = [
    None, True, False, 0, -1, -0.0, 1.5, 2**64, 1e300, "", " 1", "1_0", ".5", "0x10", "-0",
    "+1", "NaN", "-Infinity", "1e400", "-0.01", "1000.000001", "abc", "\u0007", "\u009b",
    "x" * 300, "9" * 80, [], {}, [1], {"usd": "1"},
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | NAMES
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)
JUNK_VALUES = st.sampled_from(NASTY) | JSON_VALUES
TYPES = st.sampled_from([*FIELDS, "nope", "", "COST", "spend", "ack"])
ALL_FIELDS = sorted(set().union(*FIELDS.values()) | {"x", "token", "Type"})


def _amount_text(amount: Decimal, form: int) -> str:
    if form == 0:
        return json.dumps(format(amount, "f"))
    if form == 1:
        return format(amount, "f")
    return str(amount.normalize())  # may be 1E+2: still a JSON number


@st.composite
def valid_costs(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "cost", "dispatch_id": draw(IDS)}
    optional = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "model": NAMES,
                "agent": NAMES,
                "input_tokens": st.integers(0, 10**9),
                "output_tokens": st.integers(0, 10**9),
            },
        )
    )
    message.update(optional)
    message["usd"] = Raw(_amount_text(draw(AMOUNTS), draw(st.integers(0, 2))))
    return message


class Raw(str):
    """JSON text to insert verbatim."""


def render(message: dict[str, Any]) -> str:
    parts = []
    for name, value in message.items():
        text = value if isinstance(value, Raw) else json.dumps(value)
        parts.append(f"{json.dumps(name)}: {text}")
    return "{" + ", ".join(parts) + "}"


@st.composite
def mutated_costs(draw: st.DrawFn) -> dict[str, Any]:
    message = draw(valid_costs())
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(ALL_FIELDS) | NAMES)
        if draw(st.booleans()) and name in message:
            del message[name]
        else:
            message[name] = draw(JUNK_VALUES)
    return message


# Amount texts: JSON numbers of any size and sign, near-numbers, and the usual suspects.
JSON_NUMBERS = st.from_regex(
    r"-?(0|[1-9][0-9]{0,70})(\.[0-9]{1,70})?([eE][-+]?[0-9]{1,4})?", fullmatch=True
)
NEAR_NUMBERS = st.from_regex(
    r"[-+ ]?[0-9]{0,4}[._,]?[0-9]{0,4}([eE][-+]?[0-9]{1,4})? ?", fullmatch=True
)
AMOUNT_TEXTS = st.one_of(
    JSON_NUMBERS,
    JSON_NUMBERS.map(json.dumps),
    NEAR_NUMBERS.map(json.dumps),
    AMOUNTS.map(lambda d: json.dumps(format(-d, "f"))),
    AMOUNTS.map(lambda d: format(d + MAX_COST, "f")),
    st.sampled_from(NASTY).map(json.dumps),
)


@st.composite
def amount_costs(draw: st.DrawFn) -> dict[str, Any]:
    message = draw(valid_costs())
    message["usd"] = Raw(draw(AMOUNT_TEXTS))
    return message


@st.composite
def shaped(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"type": draw(TYPES | JUNK_VALUES)}
    extra = draw(st.dictionaries(st.sampled_from(ALL_FIELDS), JUNK_VALUES | IDS, max_size=3))
    message.update(extra)
    return message


def _text(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[int, bytes]]:
    return strategy.map(lambda text: (0x1, text.encode()))


SIMPLE = st.sampled_from(
    [
        {"type": "cycle"},
        {"type": "subscribe"},
        {"type": "health"},
        {"type": "health", "id": "q"},
        {"type": "admit", "dispatch_id": "@adm", "estimate_usd": "1"},
    ]
)
VALID_TEXT = (valid_costs() | SIMPLE).map(render)
FRAMES = st.one_of(
    _text(VALID_TEXT),
    _text(mutated_costs().map(render)),
    _text(amount_costs().map(render)),
    _text(shaped().map(render)),
    _text(JSON_VALUES.map(json.dumps)),
    _text(st.builds(lambda t, n: t[:n], VALID_TEXT, st.integers(0, 80))),
    _text(st.text(max_size=60)),
    st.binary(max_size=40).map(lambda b: (0x2, b)),
    VALID_TEXT.map(lambda t: (0x2, t.encode())),
    st.builds(lambda a, b: (0x1, a + b"\xff" + b), st.binary(max_size=20), st.binary(max_size=8)),
)


# --------------------------------------------------------------------------
# The service and the driver
# --------------------------------------------------------------------------


@asynccontextmanager
async def in_process_service(database: str) -> AsyncIterator[int]:
    options = ServerOptions(access=Access(dispatcher_token=DISPATCHER, observer_token=OBSERVER))
    config = make_config(max_cost=str(MAX_COST))
    async with open_budget(config, database=database) as budget:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve, options=options), budget, HOST, 0)
            yield port
            nursery.cancel_scope.cancel()


async def hypothesis_in_a_thread(run: Callable[[], None]) -> None:
    """Run a @given test in a worker thread; its examples call back into this
    loop with ``trio.from_thread.run``."""
    await trio.to_thread.run_sync(run)


@dataclass
class Book:
    """The test's own account of what the service must hold."""

    examples: int = 0
    total: Decimal = Decimal(0)  # every cost counted, over the whole run


class Session:
    """One example's conversation, checked frame by frame."""

    def __init__(self, port: int, book: Book, prefix: str) -> None:
        self.port = port
        self.book = book
        self.prefix = prefix
        self.client: RawWS | None = None
        self.counted: dict[str, Decimal] = {}
        self.spend = Decimal(0)
        self.cycles = 0
        self.serial = 0
        self.acks: list[dict[str, Any]] = []
        self.subscribed = False
        self.spends_seen = 0

    async def connect(self) -> RawWS:
        self.client = await RawWS.open(HOST, self.port)
        self.subscribed = False
        self.spends_seen = 0
        return self.client

    async def sync(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Everything the service sent up to the reply to a health probe."""
        assert self.client is not None
        self.serial += 1
        probe = f"probe-{self.serial}"
        await self.client.send_json({"type": "health", "id": probe})
        window: list[dict[str, Any]] = []
        while True:
            message = await self.client.recv()
            kind = message.get("type")
            if kind == "health" and message.get("id") == probe:
                return window, message
            if kind == "ack":
                self.acks.append(message)
            elif kind == "spend":
                self.spends_seen += 1
            elif kind != "alert":
                window.append(message)

    async def next_ack(self) -> dict[str, Any]:
        assert self.client is not None
        with trio.fail_after(5):
            while not self.acks:
                message = await self.client.recv()
                if message.get("type") == "ack":
                    self.acks.append(message)
                elif message.get("type") == "spend":
                    self.spends_seen += 1
                else:
                    assert message.get("type") == "alert", f"unexpected {message}"
        return self.acks.pop(0)

    async def start(self) -> None:
        await self.connect()
        _, health = await self.sync()
        self.spend = Decimal(health["daily_spend"])
        self.cycles = health["cycle_count"]

    async def frame(self, opcode: int, payload: bytes) -> None:
        assert self.client is not None
        payload = payload.replace(b'"@', f'"{self.prefix}'.encode())
        expect = classify(opcode, payload)
        shown = f"frame {opcode:#x} {payload[:300]!r}"
        try:
            await self.client.send_frame(payload, opcode)
            window, probe = await self.sync()
        except (Closed, trio.BrokenResourceError) as exc:
            code = exc.code if isinstance(exc, Closed) else None
            assert expect.close_ok, f"{shown}: the service closed the connection ({code})"
            assert code in (1007, None), f"{shown}: closed with {code}"
            await self.client.aclose()
            await self.connect()
            _, probe = await self.sync()
            self.check_state(probe, shown)
            return
        errors = [m for m in window if m["type"] == "error"]
        assert len(errors) <= 1, f"{shown}: several errors {errors}"
        if errors:
            self.check_error(expect, errors[0], shown)
            assert window == errors, f"{shown}: an error and more: {window}"
        else:
            assert expect.error != "must", f"{shown}: accepted, but must be refused: {window}"
            assert expect.effect is not None
            await self.check_effect(expect.effect, window, shown)
        assert not self.acks, f"{shown}: an ack nobody asked for: {self.acks}"
        self.check_state(probe, shown)

    def check_error(self, expect: Expect, error: dict[str, Any], shown: str) -> None:
        assert expect.error != "never", f"{shown}: refused a valid frame: {error}"
        assert set(error) == {"type", "code", "detail"}, f"{shown}: {error}"
        assert error["code"] in expect.codes(), f"{shown}: code {error}, allowed {expect.codes()}"
        detail = error["detail"]
        assert isinstance(detail, str) and detail.strip(), f"{shown}: {error}"
        names = expect.names()
        if names:
            assert any(re.search(rf"\b{re.escape(n)}\b", detail) for n in names), (
                f"{shown}: detail names none of {names}: {error}"
            )

    async def check_effect(self, effect: Effect, window: list[dict[str, Any]], shown: str) -> None:
        kind = effect[0]
        if kind == "cost":
            _, dispatch_id, usd = effect
            assert not window, f"{shown}: {window}"
            ack = await self.next_ack()
            assert ack["dispatch_id"] == dispatch_id, f"{shown}: {ack}"
            duplicate = dispatch_id in self.counted
            assert ack["duplicate"] is duplicate, f"{shown}: {ack}, counted: {self.counted}"
            if not duplicate:
                self.counted[dispatch_id] = usd
                self.spend += usd
                self.book.total += usd
        elif kind == "health":
            assert len(window) == 1 and window[0]["type"] == "health", f"{shown}: {window}"
            if effect[1] is None:
                assert "id" not in window[0] or window[0]["id"] is None, f"{shown}: {window}"
            else:
                assert window[0]["id"] == effect[1], f"{shown}: {window}"
        elif kind == "cycle":
            assert not window, f"{shown}: {window}"
            self.cycles += 1
        elif kind == "subscribe":
            assert not window, f"{shown}: {window}"
            self.subscribed = True
        else:
            assert [m["type"] for m in window] == ["admission"], f"{shown}: {window}"

    def check_state(self, probe: dict[str, Any], shown: str) -> None:
        assert Decimal(probe["daily_spend"]) == self.spend, f"after {shown}: {probe}"
        assert probe["cycle_count"] == self.cycles, f"after {shown}: {probe}"

    async def finish(self) -> None:
        assert self.client is not None
        if self.subscribed:
            with trio.fail_after(5):
                while self.spends_seen == 0:
                    message = await self.client.recv()
                    self.spends_seen += message.get("type") == "spend"
        await self.client.aclose()


async def exercise(port: int, book: Book, frames: list[tuple[int, bytes]]) -> None:
    book.examples += 1
    session = Session(port, book, f"e{book.examples}-")
    with trio.fail_after(30):
        await session.start()
        try:
            for opcode, payload in frames:
                await session.frame(opcode, payload)
            await session.finish()
        finally:
            if session.client is not None:
                await session.client.aclose()


def no_failures_logged(caplog: pytest.LogCaptureFixture, since: int) -> None:
    failures = [
        r for r in caplog.records[since:] if r.levelno >= logging.ERROR or r.exc_info is not None
    ]
    assert not failures, [f"{r.name}: {r.getMessage()}" for r in failures]


async def assert_serves(port: int, book: Book | None = None) -> None:
    url = f"ws://{HOST}:{port}/ws"
    async with connect(url, extra_headers=bearer(OBSERVER)) as conn:
        health = await conn.health("final")
    if book is not None:
        assert Decimal(health["daily_spend"]) == book.total, (health, book)


# --------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------


async def test_every_frame_gets_an_error_or_its_effect_and_spend_is_exact(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    book = Book()
    async with in_process_service(sqlite_url) as port:

        @FUZZ
        @given(frames=st.lists(FRAMES, min_size=1, max_size=12))
        def frames_over_a_websocket(frames: list[tuple[int, bytes]]) -> None:
            since = len(caplog.records)
            trio.from_thread.run(exercise, port, book, frames)
            no_failures_logged(caplog, since)

        await hypothesis_in_a_thread(frames_over_a_websocket)
        await assert_serves(port, book)


def test_the_oracle_agrees_with_the_contract_on_known_frames() -> None:
    """The oracle itself, on frames whose verdict the contract fixes."""
    cost = '{"type": "cost", "dispatch_id": "d", "usd": %s}'
    assert classify(1, (cost % '"0.5"').encode()).effect == ("cost", "d", Decimal("0.5"))
    assert classify(1, (cost % "0.045864").encode()).error == "never"
    for bad in ('"NaN"', '"-0.01"', "-0.01", "1e400", '"1000.01"', '"abc"'):
        verdict = classify(1, (cost % bad).encode())
        assert verdict.error == "must" and verdict.codes() == {"invalid_cost"}, bad
    assert classify(1, b'{"type": "cycle", "x": 1}').error == "must"
    assert classify(2, b'{"type": "cycle"}').error == "must"
    assert classify(1, b'{"type": "cost", "dispatch_id": "", "usd": "1"}').error == "must"
    assert classify(1, b'{"type": "cost", "dispatch_id": "x", "usd": " 1"}').error == "may"
    assert classify(1, b"\xff").close_ok
    assert classify(1, b"[" * 3000 + b"]" * 3000).error == "must"


HEAD_PARTS = st.tuples(
    st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "BREW", "get", ""]) | st.text(max_size=6),
    st.sampled_from(["/ws", "/health", "/metrics", "/", "*", "/ws?token=x", "/ws?token="])
    | st.text(max_size=20),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/9.9", ""]),
    st.lists(
        st.sampled_from(
            [
                "Host: x",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Authorization: Bearer nope",
                "Authorization: Basic x",
                "Origin: https://evil.example",
                "Content-Length: 5",
                "Transfer-Encoding: chunked",
            ]
        )
        | st.text(max_size=30),
        max_size=7,
    ),
    st.sampled_from(["\r\n\r\n", "\r\n", "\n\n", ""]),
).map(lambda p: (f"{p[0]} {p[1]} {p[2]}\r\n" + "\r\n".join(p[3]) + p[4]).encode("utf-8"))


async def send_head(port: int, data: bytes) -> bytes:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            try:
                await stream.send_all(data)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass
            return await read_until_eof(stream, 5)


async def test_arbitrary_request_heads_never_open_a_websocket_without_a_token(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with in_process_service(sqlite_url) as port:

        @FUZZ
        @given(data=HEAD_PARTS | st.binary(max_size=300))
        def heads(data: bytes) -> None:
            since = len(caplog.records)
            reply = trio.from_thread.run(send_head, port, data)
            status = status_of(reply)
            # 403: another origin; 431 and 501: h11's verdict on a head it
            # will not take (too large; a Transfer-Encoding it does not do).
            allowed = {200, 400, 401, 403, 404, 405, 431, 501, 503}
            assert reply == b"" or status in allowed, reply[:300]
            assert status != 101, reply[:300]
            no_failures_logged(caplog, since)

        await hypothesis_in_a_thread(heads)
        reply = await send_head(port, upgrade_request(HOST, port))
        assert status_of(reply) == 401
        await assert_serves(port)


async def junk_after_handshake(port: int, junk: bytes) -> bytes:
    with trio.fail_after(10):
        raw = await RawWS.open(HOST, port)
        try:
            await raw.send(junk)
            await raw.stream.send_eof()
        except trio.BrokenResourceError:
            pass
        try:
            return bytes(raw.buffer) + await read_until_eof(raw.stream, 5)
        finally:
            await raw.aclose()


async def test_junk_on_an_open_websocket_is_contained(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with in_process_service(sqlite_url) as port:

        async def spend() -> Decimal:
            async with connect(f"ws://{HOST}:{port}/ws", extra_headers=bearer(OBSERVER)) as c:
                return Decimal((await c.health())["daily_spend"])

        before = await spend()

        @FUZZ
        @given(junk=st.binary(min_size=1, max_size=400))
        def junk_frames(junk: bytes) -> None:
            since = len(caplog.records)
            # The service closes the connection (the read ends) and logs no failure.
            trio.from_thread.run(junk_after_handshake, port, junk)
            no_failures_logged(caplog, since)

        await hypothesis_in_a_thread(junk_frames)
        assert await spend() == before
        await assert_serves(port)
