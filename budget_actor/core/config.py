"""Configuration of one budget service, validated once at the edge."""

from __future__ import annotations

from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from .dedupe import DEFAULT_DEDUPE_CACHE
from .money import DEFAULT_MAX_COST, InvalidAmount, parse_usd

DEFAULT_ALERT_TO = "AG Lu"
DEFAULT_PERSIST_EVERY = 10
# The contract's default: a dispatch that has not reported its cost within
# ten minutes is presumed dead, and its reservation frees the budget.
DEFAULT_RESERVATION_TTL_S = 600.0
# How often an instance sharing a PostgreSQL budget reads the others' totals.
# Its view of the global spend is at most this old plus one query and the
# others' commit latency; 0.2 s keeps that well under the 1 s target for one
# cheap indexed query per instance five times a second.
DEFAULT_SYNC_INTERVAL_S = 0.2
# Ten million ids would take about 1.3 GB: far past what a cache in front of
# the store's unique keys is for.
MAX_DEDUPE_CACHE = 10_000_000
# The longest a store write (or a shared-budget query) may take before it
# counts as failed: costs then go to the spill file, or are answered
# `unavailable`, instead of waiting on a database that accepts connections
# but never answers. A healthy commit of a full batch takes milliseconds; 5 s
# leaves room for a loaded server while keeping the contract's "within seconds".
DEFAULT_STORE_TIMEOUT_S = 5.0


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the option."""


class BudgetConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the accounting needs to know. Build it with :func:`make_config`."""

    daily_cap: Decimal = Decimal("10.00")
    alert_at: tuple[Decimal, ...] = (Decimal("0.8"),)
    alert_to: str = DEFAULT_ALERT_TO
    persist_every: int = DEFAULT_PERSIST_EVERY
    timezone: str = "UTC"
    max_cost: Decimal = DEFAULT_MAX_COST
    # Nudge AG Lu once a day when the projected end-of-day spend crosses the cap.
    forecast_alert: bool = False
    # How long an `admit` reservation holds if no cost settles it.
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S
    # Shared budget (PostgreSQL): seconds between reads of the others' totals.
    sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S
    # Recent dispatch ids kept in memory to answer duplicates at once; older
    # ones are refused by the store's unique keys (see core/dedupe.py).
    dedupe_cache: int = DEFAULT_DEDUPE_CACHE
    # Seconds a store write or query may take before it counts as failed.
    store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def make_config(
    *,
    daily_cap: object = "10.00",
    alert_at: object = "0.8",
    alert_to: str = DEFAULT_ALERT_TO,
    persist_every: object = DEFAULT_PERSIST_EVERY,
    timezone: str = "UTC",
    max_cost: object = "1000",
    forecast_alert: bool = False,
    reservation_ttl_s: object = DEFAULT_RESERVATION_TTL_S,
    sync_interval_s: object = DEFAULT_SYNC_INTERVAL_S,
    dedupe_cache: object = DEFAULT_DEDUPE_CACHE,
    store_timeout_s: object = DEFAULT_STORE_TIMEOUT_S,
) -> BudgetConfig:
    """Validate raw option values (strings from the command line, or Python
    values) and return a :class:`BudgetConfig`.

    Raises :class:`ConfigError` naming the offending option.
    """
    cap = _positive_amount(daily_cap, "daily-cap")
    maximum = _positive_amount(max_cost, "max-cost")

    raw = alert_at if isinstance(alert_at, (list, tuple)) else str(alert_at).split(",")
    thresholds: set[Decimal] = set()
    for part in raw:
        try:
            t = parse_usd(_text(part), field="alert-at")
        except InvalidAmount as exc:
            raise ConfigError(str(exc)) from None
        if not (0 < t <= 1):
            raise ConfigError(f"`alert-at` fractions must be in (0, 1], got {t}")
        thresholds.add(t.normalize())

    try:
        every = int(str(persist_every))
    except ValueError:
        raise ConfigError(f"`persist-every` must be an integer, got {persist_every!r}") from None
    if every < 1:
        raise ConfigError("`persist-every` must be at least 1")

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"`timezone` is not a known time zone: {timezone!r}") from None
    try:
        ttl = float(str(reservation_ttl_s))
    except ValueError:
        raise ConfigError(
            f"`reservation-ttl` must be a number of seconds, got {reservation_ttl_s!r}"
        ) from None
    # At most a day: a reservation outliving its day would hold a cap that no
    # longer exists (and inf or nan are not durations).
    if not 0 < ttl <= 86_400:
        raise ConfigError("`reservation-ttl` must be between 0 and 86400 seconds")
    try:
        interval = float(str(sync_interval_s))
    except ValueError:
        raise ConfigError(
            f"`sync-interval` must be a number of seconds, got {sync_interval_s!r}"
        ) from None
    # Below 10 ms the queries would only load the database; above a minute
    # the "global" spend would not deserve the name.
    if not 0.01 <= interval <= 60:
        raise ConfigError("`sync-interval` must be between 0.01 and 60 seconds")
    try:
        store_timeout = float(str(store_timeout_s))
    except ValueError:
        raise ConfigError(
            f"`store-timeout` must be a number of seconds, got {store_timeout_s!r}"
        ) from None
    # Below 0.1 s a busy but healthy database would count as down; above a
    # minute a dispatcher would wait far past "within seconds" for an answer.
    if not 0.1 <= store_timeout <= 60:
        raise ConfigError("`store-timeout` must be between 0.1 and 60 seconds")
    if not alert_to.strip():
        raise ConfigError("`alert-to` must not be empty")
    return BudgetConfig(
        daily_cap=cap,
        alert_at=tuple(sorted(thresholds)),
        alert_to=alert_to,
        persist_every=every,
        timezone=timezone,
        max_cost=maximum,
        forecast_alert=forecast_alert,
        reservation_ttl_s=ttl,
        sync_interval_s=interval,
        dedupe_cache=_cache_size(dedupe_cache),
        store_timeout_s=store_timeout,
    )


def _cache_size(value: object) -> int:
    try:
        size = int(str(value))
    except ValueError:
        raise ConfigError(f"`dedupe-cache` must be a number of ids, got {value!r}") from None
    # 0 is allowed (every duplicate then goes to the store); the upper bound
    # keeps a typo from reserving gigabytes (~130 bytes per id).
    if not 0 <= size <= MAX_DEDUPE_CACHE:
        raise ConfigError(f"`dedupe-cache` must be between 0 and {MAX_DEDUPE_CACHE}")
    return size


def _positive_amount(value: object, option: str) -> Decimal:
    try:
        amount = parse_usd(_text(value), field=option)
    except InvalidAmount as exc:
        raise ConfigError(str(exc)) from None
    if amount <= 0:
        raise ConfigError(f"`{option}` must be greater than 0")
    return amount


def _text(value: object) -> object:
    # Floats are refused by parse_usd; config files and flags give text, and a
    # float literal in Python code is converted through its repr, which is the
    # shortest text that round-trips, e.g. 0.8 -> "0.8".
    return repr(value) if isinstance(value, float) else value
