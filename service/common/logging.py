"""Structured JSON logs with correlation IDs: one JSON object per line.

Usage::

    from service.common.logging import get_logger, log_event, correlation_scope

    logger = get_logger("bento")
    with correlation_scope(correlation_id_from_header(headers.get("x-correlation-id"))):
        log_event(logger, "decision", score=0.12, decision="approve")

Every line carries ``ts``, ``level``, ``logger``, ``pid``, ``message``, the current ``correlation_id`` (from a context
variable, so it follows a request through ``await`` and into ``asyncio.to_thread``) and the event's fields; a field
named like one of those keys is written as ``field_<name>`` (the child's ``pid`` never hides the logging process').
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, TextIO

#: The namespace of every fraudwatch logger; its handler is installed once by :func:`configure_logging`.
ROOT_LOGGER: Final[str] = "fraudwatch"
#: The HTTP header carrying the correlation ID in and out.
CORRELATION_HEADER: Final[str] = "X-Correlation-ID"
#: Accepted client-supplied correlation IDs: short, printable, no separators that could forge log fields.
SAFE_ID_PATTERN: Final[str] = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
_SAFE_ID: Final = re.compile(SAFE_ID_PATTERN)
_FIELDS_ATTR: Final[str] = "fw_fields"

CORRELATION_ID: ContextVar[str | None] = ContextVar("fraudwatch_correlation_id", default=None)


def new_correlation_id() -> str:
    return str(uuid.uuid4())


def correlation_id_from_header(value: str | None) -> str:
    """The client's correlation ID when it is safe to log and echo, else a new UUID4."""
    if value is not None and _SAFE_ID.match(value):
        return value
    return new_correlation_id()


def current_correlation_id() -> str | None:
    return CORRELATION_ID.get()


@contextmanager
def correlation_scope(correlation_id: str) -> Iterator[str]:
    """Bind ``correlation_id`` to every log line emitted inside the block (and in tasks/threads it starts)."""
    token = CORRELATION_ID.set(correlation_id)
    try:
        yield correlation_id
    finally:
        CORRELATION_ID.reset(token)


#: A field that collides with a reserved key is written under this prefix (``pid`` → ``field_pid``).
COLLISION_PREFIX: Final[str] = "field_"


def merge_fields(payload: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Add ``fields`` to ``payload`` without overwriting what the formatter wrote: a field named like a key already
    in ``payload`` (the process' ``pid``, the request's ``correlation_id``, …) is written as ``field_<name>`` unless
    it carries the same value."""
    for key, value in fields.items():
        if key not in payload:
            payload[key] = value
        elif payload[key] != value:
            payload[COLLISION_PREFIX + key] = value


class JsonFormatter(logging.Formatter):
    """Formats a record as one compact JSON object; structured fields come from :func:`log_event` and never
    overwrite the formatter's own keys (``ts``, ``level``, ``logger``, ``pid``, ``message``, ``correlation_id``,
    ``exc_info``: a colliding field is renamed, see :func:`merge_fields`)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        correlation_id = CORRELATION_ID.get()
        if correlation_id is not None:
            payload["correlation_id"] = correlation_id
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        fields = getattr(record, _FIELDS_ATTR, None)
        if isinstance(fields, Mapping):
            merge_fields(payload, fields)
        return json.dumps(payload, default=str, separators=(",", ":"), allow_nan=False)


def _iso_utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> logging.Logger:
    """Install the JSON handler on the ``fraudwatch`` logger (idempotent; later calls only change the level)."""
    root = logging.getLogger(ROOT_LOGGER)
    root.setLevel(level)
    if not any(getattr(handler, "fw_json", False) for handler in root.handlers):
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.fw_json = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``fraudwatch`` namespace; JSON output once :func:`configure_logging` has run."""
    qualified = name if name == ROOT_LOGGER or name.startswith(f"{ROOT_LOGGER}.") else f"{ROOT_LOGGER}.{name}"
    return logging.getLogger(qualified)


def log_event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (only when the level is enabled, so disabled logs cost ~nothing)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={_FIELDS_ATTR: fields})
