"""The ``budget-actor`` command line: ``serve``, ``demo``, ``verify``, ``status``,
``watch`` and ``report``.

Exit codes: 0 success; 1 the service failed while running (a child escalated)
or ``status`` found it degraded; 2 a bad option, an unreachable database or an
unreachable service, always with a one-line message on standard error.

The commands that only some runs need (the client library, the demo, watch,
report) are imported inside them: ``serve`` is ready sooner without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import msgspec
import trio

from ..core.access import (
    DEFAULT_DISPATCHER_SLOTS,
    DEFAULT_MAX_PER_ADDRESS,
    Access,
    TokenError,
    canonical_origin,
    check_tokens,
    is_loopback,
)
from ..core.config import DEFAULT_SYNC_INTERVAL_S, BudgetConfig, ConfigError, make_config
from ..core.dedupe import DEFAULT_DEDUPE_CACHE
from ..core.webhook import parse_webhook_url
from ..core.wire import encode
from ..net.server import ServerOptions, serve
from ..runtime.service import open_budget
from ..runtime.supervisor import Escalation
from ..stores.open import BadDatabaseURL, check_database_url
from ..stores.spill import UnsafeFile
from ..stores.store import StoreError

log = logging.getLogger("budget_actor")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_URL = "ws://127.0.0.1:8765/ws"
# `status` waits this long for the connection and the answer.
STATUS_TIMEOUT_S = 10.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # The contract asks for a one-line error; argparse's default prints
        # the usage block first.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _parser() -> _Parser:
    parser = _Parser(prog="budget-actor", description="Exact daily LLM spend tracker.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the service until SIGINT/SIGTERM")
    serve.add_argument("--host", default=_env("BUDGET_HOST", "127.0.0.1"))
    # A string default goes through `type` too, and only when `serve` runs, so
    # a bad BUDGET_PORT is an error of `serve` alone, naming the option.
    serve.add_argument("--port", type=int, default=_env("BUDGET_PORT", "8765"))
    serve.add_argument("--database", default=_env("BUDGET_DATABASE_URL", "sqlite:///budget.db"))
    serve.add_argument(
        "--spill",
        default=_env("BUDGET_SPILL_PATH", ""),
        help="spill file for costs acknowledged while the database is down"
        " (default: beside the SQLite file, or budget-HASH.spill for PostgreSQL)",
    )
    serve.add_argument(
        "--instance-id",
        default=_env("BUDGET_INSTANCE_ID", ""),
        help="this instance's name among those sharing a PostgreSQL budget (default: HOST-PID)",
    )
    _add_budget_options(serve)
    serve.add_argument(
        "--alert-webhook",
        action="append",
        default=None,
        metavar="URL",
        help="POST every alert to this URL (repeatable; env BUDGET_ALERT_WEBHOOK, comma-separated)",
    )
    serve.add_argument(
        "--sync-interval",
        default=_env("BUDGET_SYNC_INTERVAL", "0.2"),
        help="seconds between reads of the other instances' spend (PostgreSQL)",
    )
    serve.add_argument(
        "--dedupe-cache",
        default=_env("BUDGET_DEDUPE_CACHE", str(DEFAULT_DEDUPE_CACHE)),
        metavar="IDS",
        help="recent dispatch ids kept in memory (about 130 bytes each); older"
        " resends are refused by the database's unique keys",
    )
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=_env("BUDGET_LOG_LEVEL", "INFO").upper(),
    )
    serve.add_argument(
        "--log-format",
        type=str.lower,
        choices=["text", "json"],
        default=_env("BUDGET_LOG_FORMAT", "text"),
        help="json: one JSON object per line on standard error",
    )
    _add_access_options(serve)
    serve.set_defaults(run=_cmd_serve)

    demo = commands.add_parser("demo", help="a self-contained run on a temporary database")
    demo.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the service up this long at the end, for a browser or `watch`",
    )
    demo.set_defaults(run=_cmd_demo)

    verify = commands.add_parser("verify", help="audit a day: journal against budget patch")
    verify.add_argument("--database", default=_env("BUDGET_DATABASE_URL", "sqlite:///budget.db"))
    verify.add_argument("--day", help="YYYY-MM-DD (default: today in --timezone)")
    verify.add_argument("--timezone", default=_env("BUDGET_TIMEZONE", "UTC"))
    verify.set_defaults(run=_cmd_verify)

    status = commands.add_parser("status", help="print a running service's health")
    status.add_argument("--url", default=_env("BUDGET_URL", DEFAULT_URL))
    status.add_argument("--json", action="store_true", help="print the health JSON")
    status.add_argument("--token", default=_env("BUDGET_TOKEN", ""), help="observer token")
    status.add_argument("--cafile", default=None, help="CA bundle to trust for wss://")
    status.set_defaults(run=_cmd_status)

    watch = commands.add_parser("watch", help="a live view of a running service's spend")
    watch.add_argument("--url", default=_env("BUDGET_URL", DEFAULT_URL))
    watch.add_argument("--token", default=_env("BUDGET_TOKEN", ""), help="observer token")
    watch.add_argument("--cafile", default=None, help="CA bundle to trust for wss://")
    watch.add_argument("--once", action="store_true", help="print one frame and exit")
    watch.add_argument(
        "--interval", type=float, default=2.0, help="seconds between health questions"
    )
    watch.set_defaults(run=_cmd_watch)

    report = commands.add_parser("report", help="spend per day against the cap, from the store")
    report.add_argument("--database", default=_env("BUDGET_DATABASE_URL", "sqlite:///budget.db"))
    report.add_argument("--days", type=int, default=7, help="days ending today (default 7)")
    report.add_argument("--by", choices=["model", "agent"], help="break the spend down")
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.add_argument(
        "--daily-cap",
        default=_env("BUDGET_DAILY_CAP", "10.00"),
        help="the cap of days without a budget patch",
    )
    report.add_argument("--timezone", default=_env("BUDGET_TIMEZONE", "UTC"))
    report.set_defaults(run=_cmd_report)
    return parser


def _add_budget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--daily-cap", default=_env("BUDGET_DAILY_CAP", "10.00"))
    parser.add_argument("--alert-at", default=_env("BUDGET_ALERT_AT", "0.8"))
    parser.add_argument("--alert-to", default=_env("BUDGET_ALERT_TO", "AG Lu"))
    parser.add_argument("--persist-every", default=_env("BUDGET_PERSIST_EVERY", "10"))
    parser.add_argument("--timezone", default=_env("BUDGET_TIMEZONE", "UTC"))
    parser.add_argument("--max-cost", default=_env("BUDGET_MAX_COST", "1000"))
    parser.add_argument(
        "--forecast-alert",
        action="store_true",
        default=_env("BUDGET_FORECAST_ALERT", "").strip().lower()
        not in ("", "0", "false", "no", "off"),
        help="also nudge AG Lu when the projected end-of-day spend crosses the cap",
    )
    parser.add_argument(
        "--reservation-ttl",
        default=_env("BUDGET_RESERVATION_TTL", "600"),
        help="seconds an `admit` reservation holds if no cost settles it",
    )


def _add_access_options(parser: argparse.ArgumentParser) -> None:
    # Tokens are best given in the environment: a command line is visible to
    # every user of the machine in `ps`.
    parser.add_argument("--dispatcher-token", default=_env("BUDGET_DISPATCHER_TOKEN", ""))
    parser.add_argument("--observer-token", default=_env("BUDGET_OBSERVER_TOKEN", ""))
    parser.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="another origin (scheme://host[:port]) whose web pages may open the WebSocket;"
        " repeatable (env BUDGET_ALLOW_ORIGIN, comma-separated)",
    )
    parser.add_argument("--tls-cert", default=_env("BUDGET_TLS_CERT", ""))
    parser.add_argument("--tls-key", default=_env("BUDGET_TLS_KEY", ""))
    parser.add_argument(
        "--max-connections", type=int, default=_env("BUDGET_MAX_CONNECTIONS", "1000")
    )
    parser.add_argument(
        "--dispatcher-slots",
        type=int,
        default=_env("BUDGET_DISPATCHER_SLOTS", str(DEFAULT_DISPATCHER_SLOTS)),
        help="connections (of --max-connections, and of each address's) kept for dispatchers",
    )
    parser.add_argument(
        "--max-per-address",
        type=int,
        default=_env("BUDGET_MAX_PER_ADDRESS", str(DEFAULT_MAX_PER_ADDRESS)),
        help="WebSocket connections from one client address (IPv6: one /64)",
    )
    parser.add_argument(
        "--max-frame-bytes", type=int, default=_env("BUDGET_MAX_FRAME_BYTES", "65536")
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=_env("BUDGET_RATE_LIMIT", "20000"),
        help="messages per second and connection (bursts up to twice that)",
    )
    parser.add_argument(
        "--handshake-timeout", type=float, default=_env("BUDGET_HANDSHAKE_TIMEOUT", "10")
    )
    parser.add_argument("--ping-interval", type=float, default=_env("BUDGET_PING_INTERVAL", "20"))


def _server_options(args: argparse.Namespace) -> ServerOptions:
    """Validate the access and limit options; raises ConfigError naming the option."""
    for name in (
        "max_connections",
        "max_per_address",
        "max_frame_bytes",
        "rate_limit",
        "handshake_timeout",
    ):
        if getattr(args, name) <= 0:
            raise ConfigError(f"`{name.replace('_', '-')}` must be greater than 0")
    if args.dispatcher_slots < 0:
        raise ConfigError("`dispatcher-slots` must not be negative")
    if args.dispatcher_slots >= min(args.max_connections, args.max_per_address):
        raise ConfigError(
            f"`dispatcher-slots` ({args.dispatcher_slots}) must be less than `max-connections`"
            f" ({args.max_connections}) and `max-per-address` ({args.max_per_address}),"
            " or observers could never connect"
        )
    if args.ping_interval <= 0:
        raise ConfigError("`ping-interval` must be greater than 0")
    try:
        check_tokens(args.dispatcher_token, args.observer_token)
    except TokenError as exc:
        raise ConfigError(str(exc)) from None
    access = Access(
        dispatcher_token=args.dispatcher_token or None,
        observer_token=args.observer_token or None,
        allowed_origins=_allowed_origins(args.allow_origin),
    )
    if access.open and not is_loopback(args.host):
        raise ConfigError(
            f"refusing to listen on {args.host} with no tokens: anyone who can reach it could"
            " spend; set BUDGET_DISPATCHER_TOKEN (and BUDGET_OBSERVER_TOKEN) or use 127.0.0.1"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("`tls-cert` and `tls-key` go together")
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load `tls-cert`/`tls-key`: {exc}") from None
    return ServerOptions(
        access=access,
        max_connections=args.max_connections,
        dispatcher_slots=args.dispatcher_slots,
        max_per_address=args.max_per_address,
        max_frame_bytes=args.max_frame_bytes,
        rate_per_s=args.rate_limit,
        burst=max(1, int(args.rate_limit * 2)),
        handshake_timeout_s=args.handshake_timeout,
        ping_interval_s=args.ping_interval,
        ping_timeout_s=args.ping_interval,
        ssl_context=context,
    )


def _allowed_origins(given: list[str] | None) -> frozenset[str]:
    """``--allow-origin`` values (else ``BUDGET_ALLOW_ORIGIN``), canonical."""
    raw = given if given is not None else _env("BUDGET_ALLOW_ORIGIN", "").split(",")
    allowed = set()
    for value in raw:
        if not value.strip():
            continue
        origin = canonical_origin(value)
        if origin is None:
            raise ConfigError(
                "`allow-origin` must be an origin such as https://dashboard.example:8443"
                f" (scheme http or https, no path), got {value.strip()[:100]!r}"
            )
        allowed.add(origin)
    return frozenset(allowed)


# Instance ids go into logs, health and SQL parameters: keep them printable
# and short.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def _instance_id(value: str) -> str | None:
    if not value:
        return None
    if not _INSTANCE_ID.fullmatch(value):
        raise ConfigError(
            f"`instance-id` must be 1 to 64 letters, digits or any of . _ : @ -, got {value!r}"
        )
    return value


def _webhooks(given: list[str] | None) -> list[str]:
    """The alert webhooks: every --alert-webhook, or else BUDGET_ALERT_WEBHOOK
    split at commas. Raises ConfigError for one that is not an http(s) URL
    (naming its scheme or host at most: the rest may be a secret)."""
    urls = given if given is not None else _env("BUDGET_ALERT_WEBHOOK", "").split(",")
    checked = []
    for url in urls:
        if not url.strip():
            if given is not None:
                raise ConfigError("`alert-webhook` must not be empty")
            continue
        try:
            checked.append(parse_webhook_url(url).url)
        except ValueError as exc:
            raise ConfigError(f"`alert-webhook` {exc}") from None
    return checked


def _config(args: argparse.Namespace) -> BudgetConfig:
    return make_config(
        # Only `serve` has it: the other commands never sync.
        sync_interval_s=getattr(args, "sync_interval", DEFAULT_SYNC_INTERVAL_S),
        dedupe_cache=getattr(args, "dedupe_cache", DEFAULT_DEDUPE_CACHE),
        daily_cap=args.daily_cap,
        alert_at=args.alert_at,
        alert_to=args.alert_to,
        persist_every=args.persist_every,
        timezone=args.timezone,
        max_cost=args.max_cost,
        forecast_alert=args.forecast_alert,
        reservation_ttl_s=args.reservation_ttl,
    )


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"budget-actor: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except ValueError as exc:  # e.g. BUDGET_PORT=abc
        return _fail(str(exc))
    code: int = args.run(args)
    return code


def _cmd_serve(args: argparse.Namespace) -> int:
    from .logs import LOG_FORMATS, configure

    # Defaults from the environment are not checked against `choices`.
    if args.log_format not in LOG_FORMATS:
        return _fail(f"`log-format` must be text or json, got {args.log_format!r}")
    if args.log_level not in LOG_LEVELS:
        return _fail(f"`log-level` must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    configure(args.log_level, args.log_format)
    # Every file the service creates (database, lock, spill and quarantine
    # files) holds the journal in clear: readable by this user only.
    os.umask(0o077)
    try:
        config = _config(args)
        options = _server_options(args)
        instance = _instance_id(args.instance_id)
        webhooks = _webhooks(args.alert_webhook)
        check_database_url(args.database)
    except (ConfigError, BadDatabaseURL) as exc:
        return _fail(str(exc))
    if not 0 <= args.port <= 65535:
        return _fail(f"`port` must be in 0..65535, got {args.port}")
    try:
        code: int = trio.run(
            partial(_serve, webhooks=webhooks),
            config,
            options,
            args.database,
            args.host,
            args.port,
            args.spill,
            instance,
        )
        return code
    except BaseException as exc:
        cause = _find(exc, (StoreError, Escalation, OSError))
        if isinstance(cause, UnsafeFile):
            return _fail(f"unsafe spill file: {cause}")
        if isinstance(cause, StoreError):
            return _fail(f"cannot open the store: {cause}")
        if isinstance(cause, Escalation):
            return _fail(f"service stopped: {cause}", EXIT_FAILED)
        if isinstance(cause, OSError):
            where = getattr(cause, "filename", None)
            if where:
                return _fail(f"cannot use {where}: {cause.strerror or cause}")
            return _fail(f"cannot listen on {args.host}:{args.port}: {cause}")
        raise


def _find(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``, looking inside exception groups."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kinds)
            if found is not None:
                return found
    return None


async def _serve(
    config: BudgetConfig,
    options: ServerOptions,
    database: str,
    host: str,
    port: int,
    spill: str,
    instance: str | None,
    *,
    webhooks: Sequence[str] = (),
) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_budget(
            config, database=database, spill=spill or True, instance=instance, webhooks=webhooks
        ) as budget:
            async with trio.open_nursery() as nursery:
                real_port = await nursery.start(partial(serve, options=options), budget, host, port)
                shown = f"[{host}]" if ":" in host else host
                tls = "s" if options.ssl_context is not None else ""
                access = "open" if options.access.open else "tokens"
                print(
                    f"budget-actor serving ws{tls}://{shown}:{real_port}/ws"
                    f" (health: http{tls}://{shown}:{real_port}/health,"
                    f" store: {budget.store_kind}, access: {access})",
                    flush=True,
                )
                async for signum in signals:
                    log.info("%s received; persisting and stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    log.info("stopped cleanly")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not 0 <= args.linger <= 86400:
        return _fail(f"`linger` must be in 0..86400 seconds, got {args.linger}")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    return trio.run(run_demo, args.linger)


def _store_zone(args: argparse.Namespace) -> ZoneInfo | str:
    """The time zone of a command that reads the store (verify, report), or
    the one-line complaint about its ``--database`` or ``--timezone``."""
    try:
        check_database_url(args.database)
    except BadDatabaseURL as exc:
        return str(exc)
    try:
        return ZoneInfo(args.timezone)
    except Exception:
        return f"`timezone` is not a known time zone: {args.timezone!r}"


def _cmd_verify(args: argparse.Namespace) -> int:
    from datetime import UTC, date, datetime

    from ..core.audit import audit
    from ..core.records import Snapshot
    from ..stores.open import open_store

    zone = _store_zone(args)
    if isinstance(zone, str):
        return _fail(zone)
    day = args.day or datetime.now(UTC).astimezone(zone).date().isoformat()
    try:
        date.fromisoformat(day)
    except ValueError:
        return _fail(f"`day` must be YYYY-MM-DD, got {day!r}")
    import time

    # A large journal takes a while: say what is happening, on a terminal only.
    progress = sys.stderr.isatty()
    started = time.monotonic()
    try:
        store = open_store(args.database)
        store.open(create=False)
        try:
            body = store.get_patch("budget", f"budget_{day}")
            if progress:
                print(f"reading the journal of {day}…", end="", file=sys.stderr, flush=True)
            entries = store.journal(day)
            patch = Snapshot.from_body(body) if body is not None else None
            shares = store.share_checks(day, patch)
        finally:
            store.close()
    except StoreError as exc:
        if progress:
            print(file=sys.stderr)
        return _fail(f"database unreachable: {exc}")
    if progress:
        elapsed = time.monotonic() - started
        print(f"\r\x1b[Kread {len(entries)} costs in {elapsed:.1f}s", file=sys.stderr, flush=True)
    result = audit(day, patch, entries, shares)
    print(f"day                 {day}")
    print(f"journal             {result.journal_dispatches} costs, ${result.journal_spend}")
    for share in result.shares or ():
        mismatch = ""
        if not share.agrees:
            mismatch = (
                f"  MISMATCH: journal ${share.journal_spend},"
                f" patch ${share.patch_spend} vs journal ${share.at_patch_spend} at its seq"
            )
        print(
            f"share {share.instance:<13} {share.share_dispatches} costs, ${share.share_spend}"
            + mismatch
        )
    if result.patch_spend is None:
        print("budget patch        none yet (written every --persist-every cycles)")
    else:
        print(
            f"budget patch        {result.patch_dispatches} costs, ${result.patch_spend}"
            + ("" if result.shares is not None else f" (through seq {result.patch_seq})")
        )
        print(f"journal at patch    {result.at_patch_dispatches} costs, ${result.at_patch_spend}")
        print(f"difference          ${result.difference}")
        print(
            f"after the patch     {result.after_patch_dispatches} costs,"
            f" ${result.after_patch_spend} (the next patch will hold them)"
        )
    if result.duplicate_ids:
        print(f"DUPLICATE ids       {', '.join(result.duplicate_ids[:10])}")
    print("result              " + ("OK: they agree" if result.agrees else "MISMATCH"))
    return EXIT_OK if result.agrees else EXIT_FAILED


def _cmd_status(args: argparse.Namespace) -> int:
    from ..client import ClientError, ServiceUnavailable

    try:
        health = trio.run(_fetch_health, args.url, args.token, args.cafile)
    except ServiceUnavailable as exc:
        return _fail(str(exc))
    except (ClientError, ValueError, OSError) as exc:
        return _fail(f"cannot reach {args.url}: {exc}")
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        width = max(len(k) for k in health)
        for key, value in health.items():
            if key != "type":
                shown = value if isinstance(value, str) else json.dumps(value)
                print(f"{key:<{width}}  {shown}")
    return EXIT_OK if health.get("status") == "ok" else EXIT_FAILED


def _cmd_watch(args: argparse.Namespace) -> int:
    from ..client import ClientError, ServiceUnavailable
    from . import watch as _watch

    if not args.url.startswith(("ws://", "wss://")):
        return _fail(f"`url` must start with ws:// or wss://, got {args.url!r}")
    if not 0 < args.interval <= 3600:
        return _fail(f"`interval` must be in (0, 3600] seconds, got {args.interval}")
    try:
        if args.once:
            state = trio.run(_watch.once, args.url, args.token, args.cafile)
            width = os.get_terminal_size().columns if sys.stdout.isatty() else 80
            print("\n".join(_watch.render(state, width, live=False)), flush=True)
            return EXIT_OK
        return trio.run(
            partial(
                _watch.run,
                args.url,
                args.token,
                args.cafile,
                out=sys.stdout,
                tty=sys.stdout.isatty(),
                interval=args.interval,
            )
        )
    except _watch.Refused as exc:
        return _fail(str(exc))
    except ServiceUnavailable as exc:
        return _fail(str(exc))
    except (OSError, ClientError, ValueError) as exc:
        if isinstance(exc, BrokenPipeError):  # e.g. `watch | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        return _fail(f"cannot reach {args.url}: {exc}")
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
        return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from ..core.money import InvalidAmount, parse_usd
    from ..stores.open import open_store
    from . import report as _report

    zone = _store_zone(args)
    if isinstance(zone, str):
        return _fail(zone)
    if not 1 <= args.days <= _report.MAX_DAYS:
        return _fail(f"`days` must be in 1..{_report.MAX_DAYS}, got {args.days}")
    try:
        cap = parse_usd(args.daily_cap, field="daily-cap")
    except InvalidAmount as exc:
        return _fail(str(exc))
    if cap <= 0:
        return _fail("`daily-cap` must be greater than 0")
    today = datetime.now(UTC).astimezone(zone).date()
    try:
        store = open_store(args.database)
        store.open(create=False)
        try:
            report = _report.read_days(store, _report.last_days(today, args.days), cap, args.by)
        finally:
            store.close()
    except StoreError as exc:
        return _fail(f"database unreachable: {exc}")
    sys.stdout.write(_report.render(report, args.format))
    return EXIT_OK


async def _fetch_health(url: str, token: str, cafile: str | None) -> dict[str, Any]:
    """The service's health as its JSON object (the wire form), through the
    client library; one attempt, no retries. Raises a ClientError."""
    from ..client import BudgetClient

    context = ssl.create_default_context(cafile=cafile) if url.startswith("wss:") else None
    client = BudgetClient(
        url, token or None, ssl_context=context, timeout=STATUS_TIMEOUT_S, reconnect=False
    )
    async with client:
        health = await client.health()
    shown: dict[str, Any] = json.loads(encode(msgspec.structs.replace(health, id=None)))
    return shown


if __name__ == "__main__":
    sys.exit(main())
