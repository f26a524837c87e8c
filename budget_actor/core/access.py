"""Who may connect and what they may do, and how much (pure, no I/O).

Two roles (the contract's "Access"): a *dispatcher* may send ``cost`` and
``cycle`` (and do everything an observer does); an *observer* may
``subscribe`` and ask ``health``. A token is presented as
``Authorization: Bearer TOKEN`` or, for browsers, ``?token=TOKEN``. With no
tokens configured the service is open and every client is a dispatcher; the
command line then refuses to listen beyond loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import msgspec

Role = Literal["dispatcher", "observer"]


class Access(msgspec.Struct, frozen=True, kw_only=True):
    dispatcher_token: str | None = None
    observer_token: str | None = None

    @property
    def open(self) -> bool:
        return not self.dispatcher_token and not self.observer_token

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


def may(role: Role, request_type: str) -> bool:
    """Whether ``role`` may send a message of ``request_type``."""
    if request_type in ("cost", "cycle", "admit"):
        return role == "dispatcher"
    return True


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
