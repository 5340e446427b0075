"""A gate's evidence as people read it: the estimate, its interval, the samples used and needed, and how far the
evidence is from a decision ("needs about N more fraud labels").

Shared by ``rolloutctl status`` (rollout/cli/main.py), the dashboard (rollout/dashboard/app.py) and the timeline
(rollout/demo/timeline.py) so the three say the same thing. It reads the fields of
:class:`rollout.core.analysis.GateResult`
(``estimate, interval, samples, samples_needed, method``; absent on results saved by an older controller, then
shown as unknown) and never computes statistics itself. Pure functions; no imports beyond the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

#: What a gate's samples are when its result does not say (the gate's ``unit``; results saved by an older
#: controller): by a word of its name — recall counts fraud labels, precision the labels of flagged requests; other
#: outcome gates count labels, health and drift gates requests.
_UNIT_BY_WORD: Final[tuple[tuple[str, str], ...]] = (
    ("recall", "fraud labels"),
    ("precision", "flagged labels"),
)
EVIDENCE_KEYS: Final[tuple[str, ...]] = ("estimate", "interval", "samples", "samples_needed", "method")


def sample_unit(name: str, layer: str | None) -> str:
    """What the samples of the gate ``name`` count."""
    lowered = name.lower()
    for word, unit in _UNIT_BY_WORD:
        if word in lowered:
            return unit
    return "labels" if layer == "outcome" else "requests"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 2:  # a pair
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return (low, high)
    return None


def gate_evidence(result: Any) -> dict[str, Any]:
    """The evidence fields of a GateResult (or of its JSON form), with the unit of its samples and a sentence.

    Keys: ``estimate``, ``interval`` ([low, high] or None), ``samples``, ``samples_needed``, ``method``, ``unit``,
    ``relative`` (the estimate is a difference candidate − stable), ``evidence`` (the sentence)."""
    get = result.get if isinstance(result, Mapping) else (lambda key, default=None: getattr(result, key, default))
    name = str(get("name", "") or "")
    layer = get("layer")
    interval = _interval(get("interval"))
    method = get("method")
    view: dict[str, Any] = {
        "estimate": _number(get("estimate")),
        "interval": list(interval) if interval is not None else None,
        # before the controller reported ``samples``, the labels behind the candidate's estimate stood for them
        "samples": _number(get("samples")) if get("samples") is not None else _number(get("labels")),
        "samples_needed": _number(get("samples_needed")),
        "method": str(method) if method else None,
        "unit": str(get("unit") or sample_unit(name, str(layer) if layer is not None else None)),
        "relative": get("stable_value", get("stable")) is not None,
    }
    status = get("status", get("verdict"))
    view["evidence"] = evidence_text(view, str(getattr(status, "value", status) or ""))
    return view


def _signed(value: float, relative: bool) -> str:
    return f"{value:+.3f}" if relative else f"{value:.3f}"


def _count(value: float) -> str:
    return f"{math.ceil(value):,}"


def evidence_text(view: Mapping[str, Any], status: str = "") -> str:
    """One line: ``Δ −0.021 [−0.064, +0.019] · 412 fraud labels · needs about 180 more fraud labels · sprt-paired``.

    Empty when the result holds no evidence fields at all (an older controller, or a gate not measured)."""
    parts: list[str] = []
    relative = bool(view.get("relative"))
    estimate, interval = view.get("estimate"), view.get("interval")
    if estimate is not None:
        prefix = "Δ " if relative else ""
        parts.append(prefix + _signed(estimate, relative))
    if interval is not None:
        low, high = interval
        parts.append(f"[{_signed(low, relative)}, {_signed(high, relative)}]")
    unit = str(view.get("unit") or "samples")
    samples, needed = view.get("samples"), view.get("samples_needed")
    if samples is not None:
        parts.append(f"{_count(samples)} {unit}")
    if needed is not None and needed > 0:
        parts.append(f"needs about {_count(needed)} more {unit}")
    elif status in ("Successful", "Failed") and parts:
        parts.append("decided")
    if view.get("method"):
        parts.append(str(view["method"]))
    if not parts:
        return ""
    head = " ".join(parts[:2]) if estimate is not None and interval is not None else parts[0]
    rest = parts[2:] if estimate is not None and interval is not None else parts[1:]
    return " · ".join([head, *rest])
