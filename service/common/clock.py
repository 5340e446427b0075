"""The wall clock every component reads: timezone-aware UTC, injectable where a test needs its own time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

#: A source of "now" (aware, UTC); the components take one so a test can drive time.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one is taken as UTC (SQLite hands back naive datetimes; ISO input may omit it)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
