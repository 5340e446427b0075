"""PromQL checks shared by the dashboard's and the runbooks' tests: the series the project exports or records, the
series an expression reads, and promtool's verdict on expressions."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from rollout.controller.metrics import ControllerMetrics
from rollout.router.metrics import RouterMetrics
from rollout.router.outcomes.feedback import _OutcomeMetrics
from rollout.router.outcomes.prediction_log import _LogMetrics
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.settings import PrometheusSettings
from service.retraining.webhook import WebhookMetrics
from service.serving.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
#: Series Prometheus itself provides.
BUILTIN_SERIES = frozenset({"ALERTS", "ALERTS_FOR_STATE", "up"})
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"})
_KEYWORDS |= {"and", "or", "unless", "inf", "nan", "Inf", "NaN"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def known_series() -> set[str]:
    """Every series name the project's metric classes export, every recorded rule, and Prometheus' own."""
    registry = CollectorRegistry()
    Metrics(registry)
    RouterMetrics(registry, latency_buckets_s=(0.1, 1.0), score_delta_buckets=(0.0, 1.0), process_metrics=False)
    _OutcomeMetrics(registry, OutcomeSettings())
    _LogMetrics(registry)
    ControllerMetrics(registry, "fraudwatch", (0.1, 1.0))
    WebhookMetrics(registry)
    names: set[str] = set(BUILTIN_SERIES)
    for family in registry.collect():
        suffixes = _SUFFIXES.get(family.type)
        names.update(family.name + s for s in suffixes) if suffixes else names.add(family.name)
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    names.update(r["record"] for group in rules["groups"] for r in group["rules"] if "record" in r)
    return names


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges and label lists removed first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text):
        name = match.group(0)
        if name in _KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue  # a keyword, or a function / aggregation called here
        names.add(name)
    return names


def promtool_check(exprs: Sequence[str], tmp_path: Path) -> None:
    """Fail unless promtool accepts every expression (as the expressions of throwaway recording rules)."""
    promtool = PrometheusSettings().promtool
    if not promtool.exists():
        pytest.fail(f"{promtool} is missing: install Debian's prometheus package")
    rules = [{"record": f"fw_check:expr_{i}:check", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
