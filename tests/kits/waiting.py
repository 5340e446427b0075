"""The one polling loop of the test suite: wait for a probe's value, or for how long a condition took to hold."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def is_value(value: object) -> bool:
    """A probe's answer that ends the wait by default: anything but None and False (so 0 and 0.0 count)."""
    return value is not None and value is not False


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    timeout_s: float,
    interval_s: float = 0.1,
    *,
    ready: Callable[[object], bool] = is_value,
) -> T:
    """Poll ``probe()`` until ``ready`` accepts its value and return that value; after ``timeout_s`` raise an
    AssertionError naming ``what``. The probe runs at least once, also with a zero timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if ready(value):
            return value  # type: ignore[return-value]  # ready() rejected None
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def seconds_until(
    condition: Callable[[], object], timeout_s: float, interval_s: float = 0.02, what: str = "the condition"
) -> float:
    """Seconds until ``condition()`` is truthy (polled every ``interval_s``); AssertionError after ``timeout_s``."""
    started = time.monotonic()
    wait_for(condition, what, timeout_s, interval_s, ready=bool)
    return time.monotonic() - started
