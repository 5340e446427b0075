"""Durations as Kubernetes and Go write them (``90s``, ``10m``, ``1h30m``, ``500ms``), or plain seconds (``90``,
``1.5``): what ``rolloutctl … --timeout`` takes. Pure."""

from __future__ import annotations

import re
from typing import Final

_UNITS: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART: Final[re.Pattern[str]] = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds of ``text``: a number of seconds, or Go-style ``<number><unit>`` parts (units ms, s, m, h), e.g.
    ``1h30m``. ValueError naming the text otherwise (negative durations included)."""
    raw = text.strip()
    try:
        seconds = float(raw)
    except ValueError:
        seconds = _parts(raw)
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r} (e.g. 90, 90s, 10m, 1h30m)")
    return seconds


def _parts(raw: str) -> float:
    position, total = 0, 0.0
    for match in _PART.finditer(raw):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(raw):
        raise ValueError(f"not a duration: {raw!r} (e.g. 90, 90s, 10m, 1h30m)")
    return total
