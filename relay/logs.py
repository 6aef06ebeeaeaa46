"""Structured logs: one JSON object a line on stderr. Known secrets are scrubbed from every line as a last line of
defence; the code itself never logs keys, upstream secrets or prompts."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, overload

# Each secret as a log line holds it: written in JSON, as a string's characters are (a quote or a backslash in it
# is escaped, so the secret as configured is not in the line at all). Longest first: a secret that another holds,
# scrubbed first, would leave the rest of that one in the line.
_secrets: list[str] = []


def redact(secrets: Iterable[str]) -> None:
    """Add values that must never appear in a log line (shorter than 6 characters would scrub too much)."""
    for secret in secrets:
        written = json.dumps(secret, ensure_ascii=False)[1:-1] if secret else ""
        if len(secret) >= 6 and written not in _secrets:
            _secrets.append(written)
            _secrets.sort(key=len, reverse=True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False, default=str)
        for secret in _secrets:
            line = line.replace(secret, "***")
        return line


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


# The most of a text from elsewhere (an upstream's words, a request's path) that a log line holds: an upstream's
# answer may be megabytes long, a path as long as the request line, and a line that long is cut or dropped by
# whatever ships the logs.
MAX_QUOTED = 300


@overload
def quoted(text: str) -> str: ...


@overload
def quoted(text: None) -> None: ...


def quoted(text: str | None) -> str | None:
    """`text` as a log line holds it: its first `MAX_QUOTED` characters."""
    if text is None or len(text) <= MAX_QUOTED:
        return text
    return text[: MAX_QUOTED - 1] + "…"


def event(logger: logging.Logger, message: str, **fields: Any) -> None:
    logger.info(message, extra={"fields": fields})
