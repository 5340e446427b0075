"""``spec.policy`` in Kubernetes API conventions: camelCase field names and durations as strings (``10m``, ``30s``,
``1h30m``, ``500ms``), turned into the policy's own field names (rollout/core/policy.py: snake_case, seconds in
``*_s``). Pure.

``minDuration: 10m`` → ``min_duration_s: 600``; ``minRequests: 500`` → ``min_requests: 500``. The snake_case form
(``min_duration_s: 600``) stays accepted for one release; :func:`from_api_conventions` names every such field so the
controller can warn (a log line and a Kubernetes Event). A field given in both forms is refused (``ValueError`` naming
both). The keys of free maps (a quality gate's ``floors`` and ``ceilings``: metric names) and of named maps
(``metricTemplates``: template names) are left as they are; a named map's values are converted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from rollout.core.durations import parse_duration

#: Maps whose keys are data (metric names), not field names.
FREE_MAPS: Final[frozenset[str]] = frozenset({"floors", "ceilings"})
#: Maps whose keys are names (kept as written) and whose values are field mappings (converted): metric templates.
NAMED_MAPS: Final[frozenset[str]] = frozenset({"metric_templates"})
#: Policy fields in seconds (``<name>_s``): their camelCase form is ``<name>`` in camelCase, a duration string.
DURATION_SUFFIX: Final[str] = "_s"
_CAMEL_BOUNDARY: Final[re.Pattern[str]] = re.compile(r"(?<=[a-z0-9])([A-Z])")
_SNAKE: Final[re.Pattern[str]] = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")
#: Snake_case field names whose values are seconds (every ``*_s`` field of rollout/core/policy.py's models).
DURATION_FIELDS: Final[frozenset[str]] = frozenset(
    {"min_duration_s", "interval_s", "window_s", "inconclusive_timeout_s", "labels_timeout_s", "not_ready_timeout_s",
     "warm_window_s", "scale_down_delay_s"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConvertedPolicy:
    """The policy mapping in the policy's own field names, and the paths of fields written in the deprecated
    snake_case form (e.g. ``stages.canary.min_duration_s``)."""

    mapping: dict[str, Any]
    deprecated: tuple[str, ...]


def snake_case(name: str) -> str:
    """``minDuration`` → ``min_duration``; a name without capitals is returned unchanged."""
    return _CAMEL_BOUNDARY.sub(lambda m: "_" + m.group(1).lower(), name)


def camel_case(name: str) -> str:
    """``min_duration_s`` → ``minDuration`` (the ``_s`` of a duration dropped), ``min_requests`` → ``minRequests``."""
    if name in DURATION_FIELDS:
        name = name.removesuffix(DURATION_SUFFIX)
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def from_api_conventions(data: Mapping[str, Any]) -> ConvertedPolicy:
    """``data`` (a ``spec.policy``) with camelCase fields and duration strings in the policy's own names; the
    deprecated snake_case fields it used. ``ValueError`` naming the field for a bad duration or a field given twice."""
    deprecated: list[str] = []
    mapping = _convert_mapping(data, "", deprecated)
    return ConvertedPolicy(mapping=mapping, deprecated=tuple(deprecated))


def _convert(value: Any, path: str, deprecated: list[str]) -> Any:
    if isinstance(value, Mapping):
        return _convert_mapping(value, path, deprecated)
    if isinstance(value, list):
        return [_convert(item, f"{path}[{i}]", deprecated) for i, item in enumerate(value)]
    return value


def _convert_mapping(data: Mapping[str, Any], path: str, deprecated: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    written: dict[str, str] = {}  # policy name → the key it came from
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        name, converted = _field(str(key), value, where, deprecated)
        if name in written:
            raise ValueError(f"spec.policy: {where} and {_join(path, written[name])} are the same field; give one")
        written[name] = str(key)
        out[name] = dict(converted) if key in FREE_MAPS and isinstance(converted, Mapping) else converted
    return out


def _field(key: str, value: Any, where: str, deprecated: list[str]) -> tuple[str, Any]:
    if key in FREE_MAPS:
        return key, value
    if snake_case(key) in NAMED_MAPS and isinstance(value, Mapping):
        if key != camel_case(key):
            deprecated.append(where)
        return snake_case(key), {str(k): _convert(v, f"{where}.{k}", deprecated) for k, v in value.items()}
    if _SNAKE.fullmatch(key):
        deprecated.append(where)
        return key, _convert(value, where, deprecated)
    name = snake_case(key)
    seconds_name = name + DURATION_SUFFIX
    if seconds_name in DURATION_FIELDS:
        if not isinstance(value, str) or _is_number(value):
            raise ValueError(f"spec.policy: {where} must be a duration string such as 30s, 10m or 1h30m, got {value!r}")
        try:
            return seconds_name, parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"spec.policy: {where}: {exc}") from exc
    return name, _convert(value, where, deprecated)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
