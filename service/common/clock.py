"""The wall clock every component reads: timezone-aware UTC, injectable where a test needs its own time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

#: A source of "now" (aware, UTC); the components take one so a test can drive time.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(UTC)
