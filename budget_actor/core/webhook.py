"""Alert webhooks, the pure part: URLs, the request body, retry timing.

An alert (a sibling nudge) is POSTed as JSON to every configured webhook: the
fields of the ``alert`` message plus ``text``, one human sentence, which
Slack-style incoming webhooks show as the message. The header
``Idempotency-Key`` is the nudge's name, so a receiver can drop the repeats
that at-least-once delivery implies.

A webhook URL often *is* a secret (a Slack webhook URL grants posting to a
channel), so it is never stored or logged: the store keeps a digest of it
(:func:`target_of`), and logs show :func:`redacted`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from urllib.parse import quote, urlsplit

import msgspec

from .money import to_wire
from .records import Alert

# Retries after a failed attempt: 1 s, doubling up to 5 minutes. A receiver
# that is down for a day costs about 300 attempts, and one that comes back
# is found within minutes.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 300.0

# Left as they are in a request target: printable ASCII. Anything else (a
# non-ASCII path, as people write URLs) is sent percent-encoded as UTF-8,
# as browsers do; h11 refuses to send it raw.
_TARGET_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


class WebhookUrl(msgspec.Struct, frozen=True):
    """A checked ``http://`` or ``https://`` URL, split for the HTTP client."""

    url: str
    tls: bool
    host: str
    port: int
    # Path and query, as sent in the request line.
    target: str

    @property
    def authority(self) -> str:
        """The ``Host`` header: the port only when it is not the default."""
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_webhook_url(url: str) -> WebhookUrl:
    """Check a webhook URL. Raises ``ValueError`` saying what is wrong (the
    message names no more of the URL than its scheme and host)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("has no host")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise ValueError("contains spaces or control characters")
    tls = parts.scheme == "https"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return WebhookUrl(
        url=text,
        tls=tls,
        host=_ascii_host(parts.hostname),
        port=port if port is not None else (443 if tls else 80),
        target=quote(target, safe=_TARGET_SAFE),
    )


def _ascii_host(host: str) -> str:
    """``host`` as the resolver and the ``Host`` header take it: an IP
    address as it is, a domain name in IDNA (``xn--…``). Raises
    ``ValueError`` for a name that is none (an empty or over-long label),
    which the resolver would otherwise refuse only at the first alert."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("has a host that is not a valid domain name") from None


def target_of(url: str) -> str:
    """The name under which a webhook's deliveries are stored: a digest of
    its URL, so the database never holds the secret itself."""
    return hashlib.sha256(url.strip().encode()).hexdigest()[:32]


def redacted(webhook: WebhookUrl) -> str:
    """A webhook for logs: scheme, host and port, never the path or query
    (which hold the secret of most webhook services)."""
    scheme = "https" if webhook.tls else "http"
    return f"{scheme}://{webhook.authority}/…"


def text(alert: Alert) -> str:
    """One human sentence about ``alert``."""
    to = f"(alert to {alert.to})"
    if alert.kind == "forecast" and alert.projected_spend is not None:
        return (
            f"budget_actor: the spend of {alert.day} is projected to reach"
            f" ${to_wire(alert.projected_spend)} by the end of the day, over the"
            f" ${to_wire(alert.daily_cap)} cap; ${to_wire(alert.daily_spend)} spent so far {to}"
        )
    return (
        f"budget_actor: {alert.percent}% of the daily cap reached on {alert.day}:"
        f" ${to_wire(alert.daily_spend)} of ${to_wire(alert.daily_cap)} {to}"
    )


def body(alert: Alert) -> bytes:
    """The request body: the ``alert`` message's fields (amounts as decimal
    strings, as on the WebSocket) and ``text``."""
    fields: dict[str, object] = {
        "type": "alert",
        "to": alert.to,
        "day": alert.day,
        "threshold": float(alert.threshold),
        "daily_spend": to_wire(alert.daily_spend),
        "daily_cap": to_wire(alert.daily_cap),
    }
    if alert.kind == "forecast" and alert.projected_spend is not None:
        fields["kind"] = alert.kind
        fields["projected_spend"] = to_wire(alert.projected_spend)
    fields["text"] = text(alert)
    return msgspec.json.encode(fields)


def retry_delay(
    attempts: int, initial_s: float = RETRY_INITIAL_S, max_s: float = RETRY_MAX_S
) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1, 2, …)."""
    return min(initial_s * 2.0 ** max(attempts - 1, 0), max_s)


class Delivery(msgspec.Struct, frozen=True):
    """One pending POST, as claimed from the store: ``attempts`` counts this
    one (1 for the first)."""

    target: str
    name: str
    body: bytes
    attempts: int


class DueDeliveries(msgspec.Struct, frozen=True):
    """What one look at the stored deliveries found."""

    #: Claimed for this process now (leased: no one else sends them meanwhile).
    claimed: list[Delivery]
    #: Every delivery to the configured webhooks that no 2xx has answered yet.
    pending: int
    #: Seconds until the next one falls due (None: none is waiting).
    next_due_s: float | None
