"""Who may connect and what they may do, and how much (pure, no I/O).

Two roles (the contract's "Access"): a *dispatcher* may send ``cost`` and
``cycle`` (and do everything an observer does); an *observer* may
``subscribe`` and ask ``health``. A token is presented as
``Authorization: Bearer TOKEN`` or, for browsers, ``?token=TOKEN``. With no
tokens configured the service is open and every client is a dispatcher; the
command line then refuses to listen beyond loopback.

Browsers do not apply CORS to WebSockets: any page may open one to any
address, and a browser sends no token unless the page puts one in the URL.
So a handshake that carries ``Origin`` (browsers always send it, programs
usually do not) must come from the service's own origin or one the operator
allowed (:meth:`Access.origin_allowed`).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import msgspec

Role = Literal["dispatcher", "observer"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A token is the only thing between the network and the power to spend.
# 16 characters of a random URL-safe string carry 96 bits, beyond guessing at
# any rate the service answers; anything shorter is a word someone chose.
MIN_TOKEN_CHARS = 16
# A token travels in a request head of at most 16 KiB; a longer one could
# never be presented.
MAX_TOKEN_CHARS = 1024


class Access(msgspec.Struct, frozen=True, kw_only=True):
    dispatcher_token: str | None = None
    observer_token: str | None = None
    # Other origins whose pages may open the WebSocket (``--allow-origin``),
    # each in the canonical form of :func:`canonical_origin`.
    allowed_origins: frozenset[str] = frozenset()

    @property
    def open(self) -> bool:
        return not self.dispatcher_token and not self.observer_token

    def origin_allowed(self, origin: str, host: str | None, *, secure: bool) -> bool:
        """Whether a handshake whose ``Origin`` header is ``origin`` may proceed.

        Allowed: an origin listed in :attr:`allowed_origins`, or the service's
        own origin, i.e. the scheme (``https`` when the service speaks TLS),
        host and port the client used to reach it, from the ``Host`` header.
        Anything unparsable (``null``, a list, a path) is refused.

        An open service (no tokens) listens on loopback only, so its own
        origin must also name a loopback host: a page on ``evil.example``
        whose name was re-pointed at 127.0.0.1 (DNS rebinding) would
        otherwise be "same origin".
        """
        presented = canonical_origin(origin)
        if presented is None:
            return False
        if presented in self.allowed_origins:
            return True
        if host is None:
            return False
        own = canonical_origin(f"{'https' if secure else 'http'}://{host}")
        if own is None or own != presented:
            return False
        hostname = urlsplit(own).hostname or ""
        return not self.open or is_loopback(hostname) or hostname.endswith(".localhost")

    def role(self, headers: list[tuple[bytes, bytes]], target: bytes) -> Role | None:
        """The role a request's token grants, or None (refuse with 401).

        Tokens are compared in constant time, against every configured token
        whatever the first comparison gave, so timing reveals nothing.
        """
        if self.open:
            return "dispatcher"
        presented = presented_token(headers, target)
        if presented is None:
            return None
        as_dispatcher = _same(presented, self.dispatcher_token)
        as_observer = _same(presented, self.observer_token)
        if as_dispatcher:
            return "dispatcher"
        if as_observer:
            return "observer"
        return None


class TokenError(ValueError):
    """A configured token is unusable; the message names the option, never the value."""


def check_tokens(dispatcher: str | None, observer: str | None) -> None:
    """Refuse tokens that would be weak or ambiguous (:class:`TokenError`).

    Each given token (None or "" is "not set") must be 16 to 1024 visible
    ASCII characters: no spaces, which a blank token is made of, and nothing
    a request head cannot carry. The two must differ, or every observer
    would be a dispatcher.
    """
    for option, token in (("dispatcher-token", dispatcher), ("observer-token", observer)):
        if not token:
            continue
        if not token.strip():
            raise TokenError(f"`{option}` is blank")
        if not all("!" <= c <= "~" for c in token):
            raise TokenError(
                f"`{option}` may hold only visible ASCII characters (no spaces or"
                " control characters); generate one with"
                ' python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise TokenError(
                f"`{option}` must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters, got"
                f" {len(token)}; generate one with"
                ' python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
    if dispatcher and observer and hmac.compare_digest(dispatcher, observer):
        raise TokenError(
            "`dispatcher-token` and `observer-token` are the same: every observer would be"
            " a dispatcher; give them different values"
        )


def canonical_origin(text: str) -> str | None:
    """``scheme://host:port`` with a lower-case scheme and host and an explicit
    port, or None if ``text`` is not a single http(s) origin (RFC 6454
    serialization: no path, query, fragment or user)."""
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or parts.path not in ("", "/") or parts.username:
        return None
    if parts.query or parts.fragment or "@" in parts.netloc or not parts.hostname:
        return None
    host = parts.hostname.lower()
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port if port is not None else _DEFAULT_PORTS[scheme]}"


def presented_token(headers: list[tuple[bytes, bytes]], target: bytes) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    query = urlsplit(target.decode("latin-1")).query
    tokens = parse_qs(query).get("token")
    return tokens[0] if tokens else None


def _same(presented: str, expected: str | None) -> bool:
    if not expected:
        # Still do the work of a comparison, so a missing role costs the same.
        hmac.compare_digest(presented.encode(), presented.encode())
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


# What only a dispatcher may send (the contract's "who" column).
DISPATCHER_ONLY = frozenset({"cost", "costs", "cycle", "admit"})


def may(role: Role, request_type: str) -> bool:
    """Whether ``role`` may send a message of ``request_type``."""
    return role == "dispatcher" or request_type not in DISPATCHER_ONLY


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenBucket:
    """A per-connection message budget: ``rate`` per second, bursts up to ``burst``."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means over the limit."""
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


# Connections kept for dispatchers (the contract's default): enough for a
# handful of dispatchers, each reconnecting while its old connection has not
# yet timed out, and a few operator tools run with the dispatcher token.
DEFAULT_DISPATCHER_SLOTS = 16
# Connections from one client address (the contract's default). A proxy in
# front of the service is one address for all its clients, so this is far
# above a deployment's dashboards, yet keeps one host from taking all 1,000.
DEFAULT_MAX_PER_ADDRESS = 256


class Slots:
    """Who may hold a WebSocket connection (pure bookkeeping, no I/O).

    ``max_connections`` caps every connection together and ``max_per_address``
    those of one client address. Of each, ``dispatcher_slots`` are kept for
    dispatchers: an observer is refused once observers hold all the others,
    so observers can never lock a dispatcher out, whether they come from
    many addresses or through the dispatcher's own proxy. Requires
    ``dispatcher_slots < min(max_connections, max_per_address)``.
    """

    __slots__ = (
        "_by_address",
        "dispatcher_slots",
        "max_connections",
        "max_per_address",
        "observers",
        "total",
    )

    def __init__(self, max_connections: int, dispatcher_slots: int, max_per_address: int) -> None:
        if not 0 <= dispatcher_slots < min(max_connections, max_per_address):
            raise ValueError("dispatcher_slots must be below max_connections and max_per_address")
        self.max_connections = max_connections
        self.dispatcher_slots = dispatcher_slots
        self.max_per_address = max_per_address
        self.total = 0
        self.observers = 0
        # address -> [connections, of which observers]
        self._by_address: dict[str, list[int]] = {}

    def take(self, role: Role, address: str) -> str | None:
        """Take a slot for a ``role`` connection from ``address``; None if
        taken, else why not (for the 503's body)."""
        held = self._by_address.get(address, [0, 0])
        if self.total >= self.max_connections:
            return "every connection slot is in use"
        if held[0] >= self.max_per_address:
            return "too many connections from your address"
        if role == "observer" and (
            self.observers >= self.max_connections - self.dispatcher_slots
            or held[1] >= self.max_per_address - self.dispatcher_slots
        ):
            return "the remaining connection slots are kept for dispatchers"
        observer = role == "observer"
        self.total += 1
        self.observers += observer
        self._by_address[address] = [held[0] + 1, held[1] + observer]
        return None

    def give_back(self, role: Role, address: str) -> None:
        """Return a slot taken by :meth:`take`."""
        observer = role == "observer"
        self.total -= 1
        self.observers -= observer
        held = self._by_address[address]
        held[0] -= 1
        held[1] -= observer
        if held[0] == 0:
            del self._by_address[address]


def address_key(host: str) -> str:
    """The address a client is counted under: IPv4 as is, IPv6 by its /64
    (one host is usually given a whole /64, so counting single IPv6
    addresses would not limit it at all)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
