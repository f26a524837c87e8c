"""The live page at ``GET /``: one self-contained HTML file (``page.html``).

Inline CSS and JavaScript, no build step, nothing fetched from anywhere but
the service itself: ``GET /history`` (today's curve from midnight and the
last 30 days, refreshed every minute) and its WebSocket
(``ws(s)://HOST/ws``, for the live updates), both with the page's own
``?token=`` passed on, so an observer token in the page's address works.
The page itself needs no token; its WebSocket and ``/history`` do when
tokens are set.
"""

from __future__ import annotations

from importlib.resources import files

PAGE: bytes = files(__package__).joinpath("page.html").read_bytes()

# The content security policy says what the page already does: its own inline
# script and style, and a WebSocket to the same host; nothing else.
_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
    " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)

HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-security-policy", _POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    # The page's address may hold an observer token.
    (b"referrer-policy", b"no-referrer"),
]
