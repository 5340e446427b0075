"""Durations as rolloutctl's --timeout takes them: plain seconds or Go/Kubernetes style."""

from __future__ import annotations

import pytest

from rollout.core.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("1.5", 1.5), ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("2h", 7200.0),
     ("1m30.5s", 90.5), (" 5s ", 5.0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1", "-5s", "10x", "m", "1m5", "nan", "inf", "s10", "10 m", "1d"])
def test_not_durations_name_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
