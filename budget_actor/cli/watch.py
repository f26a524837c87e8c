"""``budget-actor watch``: a live terminal view of a running service.

One connection through the client library (:class:`BudgetClient`): its
subscription for the spend pushes and alerts, and a ``health`` question every
``interval`` seconds for the burn rate, the projection and the alert
thresholds. If the service goes away, the view says so; the client reconnects
with jittered backoff and subscribes again by itself.

Everything shown is a pure function of a :class:`State`:

* :func:`apply` folds one service message into the state;
* :func:`render` draws the full-screen frame (a terminal, redrawn in place);
* :func:`plain_lines` gives the lines to print for a change when standard
  output is not a terminal (one line per change, no escape sequences).

The I/O around them (:func:`run`, :func:`once`) only connects, feeds messages
in (the client's typed updates, as their JSON objects) and prints what those
functions return.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal, TextIO

import trio

from ..client import (
    AlertNotice,
    BudgetClient,
    ConnectionStatus,
    Forbidden,
    Health,
    ServiceUnavailable,
    Spend,
    Unauthorized,
)
from ..core.money import to_wire
from ..core.wire import encode

Connection = Literal["connecting", "connected", "disconnected"]

# Alerts kept on screen (the newest).
MAX_ALERTS = 8
# Redraw at most this often, however fast the spend pushes come.
PAINT_MIN_S = 0.1
# `--once` gives up after this long.
ONCE_TIMEOUT_S = 10.0

_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"
_HOME = "\x1b[H"
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


class Refused(Exception):
    """The service refused us for good (a wrong or missing token): retrying
    cannot help."""


@dataclass(frozen=True, kw_only=True)
class SeenAlert:
    """An alert as received, with the local time it arrived."""

    at: datetime
    day: str
    to: str
    threshold: float
    daily_spend: Decimal
    daily_cap: Decimal
    kind: str | None = None
    projected_spend: Decimal | None = None


@dataclass(frozen=True, kw_only=True)
class State:
    url: str
    # Local time of the latest change (a message, a connection change).
    now: datetime
    connection: Connection = "connecting"
    # Why the last connection ended (or the last attempt failed).
    detail: str = ""
    retry_in: float | None = None
    attempt: int = 0
    # From `spend` (and `health`, when it is newer).
    day: str | None = None
    daily_spend: Decimal | None = None
    daily_cap: Decimal | None = None
    remaining: Decimal | None = None
    utilization: float = 0.0
    dispatches: int = 0
    seq: int = -1
    # From `health`.
    status: str | None = None
    thresholds: tuple[float, ...] = ()
    alerts_sent: tuple[float, ...] = ()
    burn_rate_5m: Decimal | None = None
    burn_rate_60m: Decimal | None = None
    projected_spend: Decimal | None = None
    # Alerts received while watching, oldest first (the newest MAX_ALERTS),
    # and how many arrived in all.
    alerts: tuple[SeenAlert, ...] = field(default=())
    alerts_total: int = 0


# -- the pure part -----------------------------------------------------------


def _amount(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return amount if amount.is_finite() else None


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _fractions(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool))


def apply(state: State, message: dict[str, Any], now: datetime) -> State:
    """The state after one service message (unknown messages change nothing)."""
    kind = message.get("type")
    if kind == "spend" or (kind == "health" and _int(message.get("seq"), -1) >= state.seq):
        state = replace(
            state,
            now=now,
            day=_text(message.get("day"), state.day),
            daily_spend=_amount(message.get("daily_spend")),
            daily_cap=_amount(message.get("daily_cap")),
            remaining=_amount(message.get("remaining")),
            utilization=_float(message.get("utilization")),
            dispatches=_int(message.get("dispatches"), state.dispatches),
            seq=_int(message.get("seq"), state.seq),
        )
    if kind == "health":
        status = message.get("status")
        state = replace(
            state,
            now=now,
            status=status if isinstance(status, str) else None,
            thresholds=_fractions(message.get("alert_thresholds")),
            alerts_sent=_fractions(message.get("alerts_sent")),
            burn_rate_5m=_amount(message.get("burn_rate_5m")),
            burn_rate_60m=_amount(message.get("burn_rate_60m")),
            projected_spend=_amount(message.get("projected_spend")),
        )
    elif kind == "alert":
        kind_field = message.get("kind")
        seen = SeenAlert(
            at=now,
            day=str(message.get("day", "")),
            to=str(message.get("to", "")),
            threshold=_float(message.get("threshold")),
            daily_spend=_amount(message.get("daily_spend")) or Decimal(0),
            daily_cap=_amount(message.get("daily_cap")) or Decimal(0),
            kind=kind_field if isinstance(kind_field, str) else None,
            projected_spend=_amount(message.get("projected_spend")),
        )
        sent = state.alerts_sent
        if seen.kind != "forecast" and seen.threshold not in sent:
            sent = tuple(sorted((*sent, seen.threshold)))
        state = replace(
            state,
            now=now,
            alerts=(*state.alerts, seen)[-MAX_ALERTS:],
            alerts_total=state.alerts_total + 1,
            alerts_sent=sent,
        )
    return state


def _text(value: Any, default: str | None) -> str | None:
    return value if isinstance(value, str) else default


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def usd(amount: Decimal | None) -> str:
    """An amount for display: exact as the service sent it."""
    return "-" if amount is None else "$" + to_wire(amount)


def usd_rounded(amount: Decimal | None) -> str:
    """A rate or a projection for display: cents, or 4 places below a dollar."""
    if amount is None:
        return "-"
    places = Decimal("0.01") if abs(amount) >= 1 or amount == 0 else Decimal("0.0001")
    return "$" + to_wire(amount.quantize(places, rounding=ROUND_HALF_EVEN))


def _pct(fraction: float) -> str:
    return f"{round(fraction * 100, 4):g}%"


def bar(utilization: float, thresholds: Sequence[float], width: int) -> tuple[str, str]:
    """The spend bar and, under it, the threshold labels.

    ``[##########.....|....]`` : ``#`` is spent, ``|`` marks an alert
    threshold, and ``]>>`` says the spend is over the cap.
    """
    inner = max(4, width - 4)
    filled = max(0, min(inner, round(min(utilization, 1.0) * inner)))
    cells = ["#"] * filled + ["."] * (inner - filled)
    labels = [" "] * (inner + 2)
    for threshold in sorted(thresholds):
        if not 0 < threshold < 1:
            continue
        pos = min(inner - 1, int(threshold * inner))
        cells[pos] = "|"
        text = "^" + _pct(threshold)
        start = pos + 1  # "[" comes first
        if all(c == " " for c in labels[max(0, start - 1) : start + len(text)]):
            labels[start : start + len(text)] = list(text)
    over = ">>" if utilization > 1 else ""
    return "[" + "".join(cells) + "]" + over, "".join(labels).rstrip()


def connection_text(state: State) -> str:
    if state.connection == "connected":
        return "connected"
    if state.connection == "connecting":
        return "connecting" + (f" (attempt {state.attempt})" if state.attempt > 1 else "")
    text = "disconnected"
    if state.detail:
        text += f": {state.detail}"
    if state.retry_in is not None:
        text += f"; retrying in {state.retry_in:g}s"
    return text


def alert_text(alert: SeenAlert, *, day: bool = True) -> str:
    """One alert in words; ``day=False`` leaves out its day."""
    on = f" on {alert.day}" if day else ""
    if alert.kind == "forecast":
        return (
            f"forecast{on}: {usd_rounded(alert.projected_spend)} by the end of the day,"
            f" over the {usd(alert.daily_cap)} cap (to {alert.to})"
        )
    return (
        f"{_pct(alert.threshold)} of the cap reached{on}: {usd(alert.daily_spend)} of"
        f" {usd(alert.daily_cap)} (to {alert.to})"
    )


def spend_text(state: State) -> str:
    """One line with the figures (no time, no connection)."""
    if state.daily_spend is None:
        return "no figures yet"
    parts = [
        f"spend {usd(state.daily_spend)} of {usd(state.daily_cap)}"
        f" ({state.utilization:.1%}), {state.dispatches} dispatches on {state.day}"
    ]
    if state.burn_rate_5m is not None or state.burn_rate_60m is not None:
        parts.append(
            f"burn {usd_rounded(state.burn_rate_5m)}/h (5 min),"
            f" {usd_rounded(state.burn_rate_60m)}/h (60 min)"
        )
    if state.projected_spend is not None:
        parts.append(f"projected {usd_rounded(state.projected_spend)} by end of day")
    return "; ".join(parts)


def _clock(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")


def plain_lines(before: State | None, after: State) -> list[str]:
    """What to print for the change from ``before`` to ``after`` when output
    is not a terminal: a line for a connection change, one per new alert, and
    one when the figures changed. Each starts with the local time."""
    stamp = _clock(after.now)
    lines = []
    # A retry's "connecting" is not news: its outcome is.
    retrying = before is not None and after.connection == "connecting"
    if not retrying and (before is None or connection_text(before) != connection_text(after)):
        where = f" to {after.url}" if after.connection != "disconnected" else ""
        lines.append(f"{stamp} {connection_text(after)}{where}")
    new = after.alerts_total - (before.alerts_total if before is not None else 0)
    for alert in after.alerts[-new:] if new > 0 else ():
        lines.append(f"{_clock(alert.at)} ALERT {alert_text(alert)}")
    text = spend_text(after)
    if after.daily_spend is not None and (before is None or spend_text(before) != text):
        lines.append(f"{stamp} {text}")
    return lines


def render(state: State, width: int = 80, *, live: bool = True) -> list[str]:
    """The full frame, one string per line, each at most ``width`` characters."""
    width = max(20, width)
    head = f"budget-actor watch  {state.url}"
    conn = connection_text(state)
    gap = width - len(head) - len(conn)
    lines = [head + " " * gap + conn if gap >= 2 else head, *([] if gap >= 2 else [conn])]
    if state.daily_spend is None:
        lines += ["", "waiting for the service's figures..."]
    else:
        stale = "" if state.connection == "connected" else "  (last known)"
        status = f"   status {state.status}" if state.status else ""
        lines += [
            f"day {state.day}{status}   dispatches {state.dispatches}{stale}",
            "",
            f"spend      {usd(state.daily_spend)} of {usd(state.daily_cap)}"
            f"   {state.utilization:.1%}   remaining {usd(state.remaining)}",
        ]
        line, labels = bar(state.utilization, state.thresholds, min(width, 72))
        lines += [line, labels] if labels else [line]
        lines.append(
            f"burn rate  {usd_rounded(state.burn_rate_5m)}/h over 5 min"
            f"   {usd_rounded(state.burn_rate_60m)}/h over 60 min"
        )
        projected = f"projected  {usd_rounded(state.projected_spend)} by the end of the day"
        if (
            state.projected_spend is not None
            and state.daily_cap is not None
            and state.projected_spend > state.daily_cap
        ):
            projected += "  (over the cap)"
        lines.append(projected)
    lines += ["", f"alerts ({state.alerts_total} while watching)"]
    if state.alerts_sent:
        lines.append("  sent today: " + ", ".join(_pct(t) for t in state.alerts_sent))
    for alert in reversed(state.alerts):
        day = "" if alert.day == state.day else f"{alert.day} "
        lines.append(f"  {day}{_clock(alert.at)}  {alert_text(alert, day=False)}")
    if not state.alerts and not state.alerts_sent:
        lines.append("  none")
    if live:
        lines += ["", f"{_clock(state.now)}  Ctrl-C to quit"]
    return [line[:width] for line in lines]


# -- the I/O part ------------------------------------------------------------


def _now() -> datetime:
    return datetime.now().astimezone()


def _context(url: str, cafile: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None


def _message(update: Spend | AlertNotice | Health) -> dict[str, Any]:
    """A typed update from the client as the protocol's JSON object, the
    form :func:`apply` reads."""
    message: dict[str, Any] = json.loads(encode(update))
    return message


def _refused(exc: Unauthorized | Forbidden) -> Refused:
    return Refused(f"{exc}: give an observer token with --token or BUDGET_TOKEN")


async def once(url: str, token: str = "", cafile: str | None = None) -> State:
    """Connect, take one spend and one health reading, and return the state.

    Raises :class:`Refused` for a refused token, and
    :class:`~budget_actor.client.ServiceUnavailable` (saying why) if the
    service cannot be reached within ``ONCE_TIMEOUT_S``.
    """
    state = State(url=url, now=_now(), connection="connected")
    client = BudgetClient(
        url,
        token or None,
        ssl_context=_context(url, cafile),
        timeout=ONCE_TIMEOUT_S,
        reconnect=False,
    )
    try:
        with trio.fail_after(ONCE_TIMEOUT_S):
            async with client:
                first = await client.subscribe().__anext__()  # the current spend
                state = apply(state, _message(first), _now())
                state = apply(state, _message(await client.health()), _now())
    except (Unauthorized, Forbidden) as exc:
        raise _refused(exc) from None
    except trio.TooSlowError:
        raise ServiceUnavailable(f"cannot reach {url}: no answer") from None
    return state


class _View:
    """Holds the state and paints it: in place on a terminal, as lines otherwise."""

    def __init__(self, state: State, out: TextIO, tty: bool) -> None:
        self.state = state
        self.out = out
        self.tty = tty
        self.printed: State | None = None
        self.changed = trio.Event()

    def set(self, state: State) -> None:
        self.state = state
        self.changed.set()

    def update(self, **changes: Any) -> None:
        self.set(replace(self.state, now=_now(), **changes))

    async def painter(self) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            self.paint()
            await trio.sleep(PAINT_MIN_S)

    def paint(self) -> None:
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns
            frame = render(self.state, width)
            text = "".join(line + _CLEAR_LINE + "\n" for line in frame)
            self.out.write(_HOME + text + _CLEAR_BELOW)
        else:
            for line in plain_lines(self.printed, self.state):
                self.out.write(line + "\n")
        self.printed = self.state
        self.out.flush()

    def start(self) -> None:
        if self.tty:
            self.out.write(_HIDE_CURSOR + _HOME + _CLEAR_BELOW)
            self.out.flush()

    def stop(self) -> None:
        if self.state is not self.printed:
            self.paint()
        if self.tty:
            self.out.write(_SHOW_CURSOR)
            self.out.flush()


async def run(
    url: str,
    token: str = "",
    cafile: str | None = None,
    *,
    out: TextIO,
    tty: bool,
    interval: float = 2.0,
) -> int:
    """Watch until SIGINT or SIGTERM; 0. Raises :class:`Refused` when the
    service refuses the token."""
    view = _View(State(url=url, now=_now()), out, tty)
    view.start()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
                nursery.start_soon(view.painter)
                await _follow(url, token, cafile, view, interval)
    except BaseExceptionGroup as group:
        refused: BaseException | None = group.subgroup(Refused)
        if refused is None:
            raise
        while isinstance(refused, BaseExceptionGroup):
            refused = refused.exceptions[0]
        raise refused from None
    finally:
        view.stop()
    return 0


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


async def _follow(url: str, token: str, cafile: str | None, view: _View, interval: float) -> None:
    def connection(status: ConnectionStatus) -> None:
        if status.state == "connected":
            view.update(connection="connected", detail="", attempt=0, retry_in=None)
        elif status.state == "connecting":
            view.update(connection="connecting", attempt=status.attempt, retry_in=None)
        else:
            view.update(connection="disconnected", detail=status.detail, retry_in=status.retry_in)

    client = BudgetClient(
        url,
        token or None,
        ssl_context=_context(url, cafile),
        timeout=interval * 3 + 5,
        on_connection=connection,
    )
    try:
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(_ask_health, client, view, interval)
            # The client subscribes again after every reconnect, starting
            # with the current spend.
            async for update in client.subscribe():
                view.set(apply(view.state, _message(update), _now()))
    except* (Unauthorized, Forbidden) as group:
        first = group.exceptions[0]
        assert isinstance(first, Unauthorized | Forbidden)
        raise _refused(first) from None


async def _ask_health(client: BudgetClient, view: _View, interval: float) -> None:
    while True:
        try:
            health = await client.health()
        except ServiceUnavailable:
            continue  # disconnected: the view says so already; ask again
        view.set(apply(view.state, _message(health), _now()))
        await trio.sleep(interval)
