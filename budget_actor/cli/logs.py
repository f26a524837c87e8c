"""Log output of ``serve``: plain text lines, or JSON lines (``--log-format json``).

A JSON line is one object per record, for log shippers that would otherwise
have to guess where a multi-line traceback ends::

    {"ts": "2026-12-01T12:00:00.123Z", "level": "INFO", "logger": "budget_actor",
     "message": "SIGTERM received; persisting and stopping"}

``exc`` (the formatted traceback) and ``stack`` are added only when present.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "ts": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached on the record, as logging.Formatter does, so that several
            # handlers format a traceback only once.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send the root logger's records to ``stream`` (standard error) as ``fmt``."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        # Warnings (e.g. from libraries) become records too, so that every
        # line on standard error is JSON.
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
