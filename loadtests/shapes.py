"""Traffic shapes for the locust run, chosen with FW_LOAD_SHAPE = steady | ramp | spike.

FW_LOAD_USERS (20) is the base user count and FW_LOAD_DURATION (60 s) the run length; the shape stops the run.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

BASE_USERS = int(os.environ.get("FW_LOAD_USERS", "20"))
DURATION = float(os.environ.get("FW_LOAD_DURATION", "60"))


def steady(t: float) -> int:
    return BASE_USERS


def ramp(t: float) -> int:
    """From 10 % to 100 % of the base over the first 80 % of the run, then hold."""
    progress = min(1.0, t / (0.8 * DURATION))
    return max(1, round(BASE_USERS * (0.1 + 0.9 * progress)))


def spike(t: float) -> int:
    """The base load with a 3x spike in the middle fifth of the run."""
    return BASE_USERS * 3 if 0.4 * DURATION <= t < 0.6 * DURATION else BASE_USERS


PROFILES = {"steady": steady, "ramp": ramp, "spike": spike}


class TrafficShape(LoadTestShape):
    profile = PROFILES[os.environ.get("FW_LOAD_SHAPE", "steady")]

    def tick(self) -> tuple[int, float] | None:
        t = float(self.get_run_time())  # type: ignore[no-untyped-call]
        if t >= DURATION:
            return None
        users = type(self).profile(t)
        return users, float(max(1, users))
