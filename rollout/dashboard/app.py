"""The one-page fraudwatch dashboard: panel definitions, the Grafana JSON built from them, and a page served here.

One list of panels (:data:`SECTIONS`) feeds both views, so they cannot drift apart:

* :func:`grafana_dashboard` — the Grafana dashboard (``deploy/grafana/fraudwatch-dashboard.json``, which the Helm
  chart ships as a ConfigMap for Grafana's sidecar): one row per section, the Prometheus datasource as the template
  variable ``datasource``. Regenerate it with ``fraudwatch-dashboard --write-grafana PATH``.
* :func:`create_app` — the embedded mode's page (no Grafana needed): a Starlette app that queries Prometheus
  server-side on every request and renders one HTML page — the rollout's stage, the firing alerts, and the four
  monitoring layers (service health, input drift, output drift, outcomes) as tables with inline SVG sparklines. No
  JavaScript, no external assets; the page reloads itself every ``refresh_s``. ROC-AUC, which PromQL cannot compute,
  is computed here from the recorded labelled-score histograms (as the controller's ``roc-auc`` gate does).

Run: ``fraudwatch-dashboard --prometheus http://127.0.0.1:9090 --port 8090`` (or ``python -m rollout.dashboard``);
settings from ``FW_ROLLOUT_DASHBOARD__…``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import math
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from rollout.core import drift
from rollout.router.outcomes.prediction_log import LABEL_NAMES
from service.common.logging import configure_logging, get_logger, log_event

logger = get_logger("rollout.dashboard")

PanelKind = Literal["timeseries", "table", "stat", "auc"]
#: Grafana unit ids; the page formats values the same way.
Unit = Literal["s", "percentunit", "reqps", "short", "none"]
Labels = Mapping[str, str]
Point = tuple[float, float]

DATASOURCE_VAR: Final[str] = "datasource"
GRAFANA_UID: Final[str] = "fraudwatch-rollout"
GRAFANA_SCHEMA_VERSION: Final[int] = 39
GRAFANA_TIME_FROM: Final[str] = "now-6h"
GRAFANA_REFRESH: Final[str] = "30s"
GRID_WIDTH: Final[int] = 24
PANEL_HEIGHT: Final[int] = 8
SPARK_WIDTH: Final[int] = 160
SPARK_HEIGHT: Final[int] = 28
MS_PER_S: Final[int] = 1000
LEGEND_SEPARATOR: Final[str] = " · "
_LEGEND: Final = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
DEFAULT_TITLE: Final[str] = "fraudwatch — model rollout"
_FRAUD: Final[str] = LABEL_NAMES[1]
_LEGIT: Final[str] = LABEL_NAMES[0]


class DashboardSettings(BaseSettings):
    """The self-served page (``FW_ROLLOUT_DASHBOARD__…``)."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_DASHBOARD__", extra="ignore")

    prometheus_url: str = "http://127.0.0.1:9090"
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    title: str = DEFAULT_TITLE
    #: The page reloads itself this often.
    refresh_s: int = Field(15, ge=1)
    #: Sparklines cover this much history, in this many points.
    range_s: float = Field(3600.0, gt=0.0)
    points: int = Field(60, ge=2, le=11_000)
    query_timeout_s: float = Field(5.0, gt=0.0)
    #: Queries sent to Prometheus at once while rendering a page.
    max_concurrency: int = Field(8, ge=1)
    #: Rows shown per panel (the largest current values first for time series).
    max_series_per_panel: int = Field(12, ge=1)
    log_level: str = "INFO"


# --------------------------------------------------------------------------------------------------- panels


@dataclass(frozen=True)
class Query:
    """One PromQL expression and how each of its series is named (Grafana's ``legendFormat`` syntax)."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    kind: PanelKind
    unit: Unit
    queries: tuple[Query, ...] = ()
    description: str = ""
    #: ``stat`` panels: show the series' name (e.g. the stage) rather than its value.
    show_name: bool = False


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    panels: tuple[Panel, ...]


def _q(expr: str, legend: str) -> Query:
    return Query(" ".join(expr.split()), legend)


ROC_AUC_NOTE: Final[str] = (
    "ROC-AUC is not computed in PromQL (it pairs adjacent histogram buckets). The controller's roc-auc gate and this "
    "page compute it from model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1d with "
    "rollout.core.drift.roc_auc_from_prometheus_buckets; the gate's numbers are in the panel beside this one and in "
    "`rolloutctl status`."
)

ROLLOUT = Section(
    "rollout",
    "Rollout and alerts",
    (
        Panel(
            "stage",
            "Current stage",
            "stat",
            "none",
            (
                _q("max by (rollout, stage) (fraudwatch_rollout_stage == 1)", "controller: {{stage}}"),
                _q(
                    "max by (stage, stable, candidate) (fraudwatch_router_routing_info == 1)",
                    "router: {{stage}} · stable {{stable}} · candidate {{candidate}}",
                ),
            ),
            "The controller's stage of the current rollout, and the routing table the routers hold.",
            show_name=True,
        ),
        Panel(
            "weight",
            "Candidate weight (% of decisions)",
            "stat",
            "none",
            (
                _q("max by (rollout) (fraudwatch_rollout_candidate_weight)", "controller"),
                _q("max(fraudwatch_router_candidate_weight)", "routers"),
            ),
        ),
        Panel(
            "gates",
            "Gate results (current stage)",
            "table",
            "none",
            (_q("max by (gate, result) (fraudwatch_rollout_gate_result == 1)", "{{gate}}: {{result}}"),),
        ),
        Panel(
            "gate-evidence",
            "Gate evidence (current stage)",
            "table",
            "none",
            (
                _q(
                    "max by (gate, value) (fraudwatch_rollout_gate_value"
                    '{value=~"estimate|interval_low|interval_high|samples|samples_needed"})',
                    "{{gate}}: {{value}}",
                ),
            ),
            "Per gate: the estimate (candidate − stable for a relative gate), its interval at the gate's confidence, "
            "the samples it used (fraud labels for recall, flagged labels for precision, requests for health) and "
            "about how many more it needs before a decision (samples_needed; none once decided).",
        ),
        Panel(
            "alerts",
            "Alerts firing or pending",
            "table",
            "none",
            (
                _q(
                    "max by (alertname, alertstate, severity, layer, model_version) (ALERTS)",
                    "{{alertname}} · {{alertstate}} · {{severity}} · {{model_version}}",
                ),
            ),
            "Prometheus' ALERTS series; each alert's runbook is runbooks/<alertname>.md.",
        ),
        Panel(
            "model-age",
            "Model age (since training)",
            "table",
            "s",
            (
                _q(
                    "time() - max by (model_version) (fraudwatch_model_trained_timestamp_seconds)",
                    "{{model_version}}",
                ),
            ),
            "How long ago each version in service was trained; FraudwatchModelStale fires when the newest is older"
            " than 14 days (twice the weekly retraining cadence).",
        ),
        Panel(
            "recent-alerts",
            "Alerts fired in the last 6 hours",
            "table",
            "none",
            (
                _q(
                    'max by (alertname, severity) (max_over_time(ALERTS{alertstate="firing"}[6h]))',
                    "{{alertname}} · {{severity}}",
                ),
            ),
        ),
    ),
)

SERVICE_HEALTH = Section(
    "service-health",
    "Service health",
    (
        Panel(
            "latency",
            "Latency p50 / p95 / p99 per version (router, deciding calls)",
            "timeseries",
            "s",
            tuple(
                _q(
                    f"histogram_quantile({q}, sum by (model_version, le) "
                    '(rate(fraudwatch_router_request_duration_seconds_bucket{role="decider"}[5m])))',
                    f"p{round(q * 100)} {{{{model_version}}}}",
                )
                for q in (0.5, 0.95, 0.99)
            ),
        ),
        Panel(
            "errors",
            "Error rate per version",
            "timeseries",
            "percentunit",
            (
                _q("model_version_role:fraudwatch_router_error_ratio:ratio_rate5m", "{{model_version}} {{role}}"),
                _q(
                    'sum(rate(fraudwatch_router_responses_total{code="5xx"}[5m])) '
                    "/ (sum(rate(fraudwatch_router_responses_total[5m])) > 0)",
                    "clients (5xx)",
                ),
            ),
            "Failed calls (5xx, timeout, unreachable) per model version as the router saw them; clients' 5xx.",
        ),
        Panel(
            "throughput",
            "Throughput per version",
            "timeseries",
            "reqps",
            (_q("model_version_role:fraudwatch_router_requests:rate5m", "{{model_version}} {{role}}"),),
        ),
    ),
)

INPUT_DRIFT = Section(
    "input-drift",
    "Input drift",
    (
        Panel(
            "psi-1h",
            "PSI per feature (1 h)",
            "timeseries",
            "short",
            (_q('model_version_feature:fraudwatch_psi:1h{feature!="score"}', "{{model_version}} {{feature}}"),),
            "Population stability index against the training reference; > 0.1 moderate, > 0.25 major shift.",
        ),
        Panel(
            "psi-5m",
            "PSI per feature (5 min, the gates' window)",
            "timeseries",
            "short",
            (_q('model_version_feature:fraudwatch_psi:5m{feature!="score"}', "{{model_version}} {{feature}}"),),
        ),
        Panel(
            "store-fallbacks",
            "Feature-store fallbacks (defaults served)",
            "timeseries",
            "reqps",
            (
                _q(
                    "sum by (model_version, reason) (rate(fraudwatch_feature_store_fallback_total[5m]))",
                    "{{model_version}} {{reason}}",
                ),
            ),
        ),
    ),
)

OUTPUT_DRIFT = Section(
    "output-drift",
    "Output drift",
    (
        Panel(
            "score-quantiles",
            "Score distribution (p50 / p90 / p99 per version)",
            "timeseries",
            "short",
            tuple(
                _q(
                    f"histogram_quantile({q}, sum by (model_version, le) (rate(fraudwatch_score_bucket[5m])))",
                    f"p{round(q * 100)} {{{{model_version}}}}",
                )
                for q in (0.5, 0.9, 0.99)
            ),
        ),
        Panel(
            "score-psi",
            "Score PSI (1 h)",
            "timeseries",
            "short",
            (_q('model_version_feature:fraudwatch_psi:1h{feature="score"}', "{{model_version}}"),),
        ),
        Panel(
            "decision-rate",
            "Decision rate (share sent to review)",
            "timeseries",
            "percentunit",
            (_q("model_version:fraudwatch_review_decision_ratio:ratio_rate5m", "{{model_version}}"),),
        ),
        Panel(
            "shadow-agreement",
            "Shadow agreement (same decision as stable)",
            "timeseries",
            "percentunit",
            (_q("stable_candidate:fraudwatch_shadow_agreement:ratio5m", "{{stable}} vs {{candidate}}"),),
        ),
    ),
)

OUTCOMES = Section(
    "outcomes",
    "Outcomes",
    (
        Panel(
            "precision",
            "Precision per version (labels of the last day)",
            "timeseries",
            "percentunit",
            (_q("model_version_role:fraudwatch_outcome_precision:ratio1d", "{{model_version}} {{role}}"),),
        ),
        Panel(
            "recall",
            "Recall per version (labels of the last day)",
            "timeseries",
            "percentunit",
            (_q("model_version_role:fraudwatch_outcome_recall:ratio1d", "{{model_version}} {{role}}"),),
        ),
        Panel(
            "calibration",
            "Calibration error (ECE, labels of the last day)",
            "timeseries",
            "short",
            (_q("model_version_role:fraudwatch_calibration_error:ece1d", "{{model_version}} {{role}}"),),
        ),
        Panel(
            "labels",
            "Labels joined per version (last day)",
            "table",
            "short",
            (
                _q(
                    "sum by (model_version, role) (model_version_role_outcome:fraudwatch_outcome:increase1d)",
                    "{{model_version}} {{role}}",
                ),
            ),
        ),
        Panel(
            "paired-recall",
            "Paired recall difference, candidate − stable (labels of the last day, by prediction stage)",
            "table",
            "short",
            (
                _q(
                    "stable_candidate_stage:fraudwatch_outcome_paired_recall_difference:ratio1d",
                    "{{candidate}} − {{stable}} in {{stage}}",
                ),
                _q(
                    "stable_candidate_stage:fraudwatch_outcome_paired_fraud_labels:increase1d",
                    "fraud labels both scored, {{stage}}",
                ),
            ),
            "Labelled requests both versions scored (shadow; full with the old version in shadow): frauds only the "
            "candidate caught minus frauds only stable caught, over the paired frauds (the sample beside it).",
        ),
        Panel(
            "roc-auc",
            "ROC-AUC per version (labels of the last day)",
            "auc",
            "short",
            (
                _q(
                    "model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1d",
                    "{{model_version}} {{role}}",
                ),
            ),
            ROC_AUC_NOTE,
        ),
        Panel(
            "roc-auc-gate",
            "ROC-AUC gate (controller)",
            "table",
            "short",
            (_q('max by (value) (fraudwatch_rollout_gate_value{gate="roc-auc"})', "{{value}}"),),
        ),
    ),
)

#: The page, top to bottom: the rollout and alerts, then the four monitoring layers.
SECTIONS: Final[tuple[Section, ...]] = (ROLLOUT, SERVICE_HEALTH, INPUT_DRIFT, OUTPUT_DRIFT, OUTCOMES)
#: The four monitoring layers (each one row of the Grafana dashboard and one section of the page).
LAYER_SECTIONS: Final[tuple[Section, ...]] = (SERVICE_HEALTH, INPUT_DRIFT, OUTPUT_DRIFT, OUTCOMES)


def legend(template: str, labels: Labels) -> str:
    """Grafana's legend format: ``{{name}}`` → the label's value. A `` · ``-separated part whose placeholders are
    all absent or empty is left out (``{{alertname}} · {{model_version}}`` without a version → the alert's name)."""
    parts = []
    for part in template.split(LEGEND_SEPARATOR):
        names = _LEGEND.findall(part)
        if names and not any(labels.get(name) for name in names):
            continue
        parts.append(_LEGEND.sub(lambda m: labels.get(m.group(1), ""), part).strip())
    return LEGEND_SEPARATOR.join(p for p in parts if p)


# --------------------------------------------------------------------------------------------------- Grafana


def _datasource() -> dict[str, str]:
    return {"type": "prometheus", "uid": f"${{{DATASOURCE_VAR}}}"}


def _grafana_targets(panel: Panel) -> list[dict[str, Any]]:
    instant = panel.kind in ("table", "stat")
    return [
        {
            "refId": chr(ord("A") + i),
            "datasource": _datasource(),
            "expr": query.expr,
            "legendFormat": query.legend,
            "instant": instant,
            "range": not instant,
            **({"format": "table"} if panel.kind == "table" else {}),
        }
        for i, query in enumerate(panel.queries)
    ]


def _grafana_panel(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    base: dict[str, Any] = {"id": panel_id, "title": panel.title, "description": panel.description, "gridPos": grid}
    if panel.kind == "auc":
        return {**base, "type": "text", "options": {"mode": "markdown", "content": ROC_AUC_NOTE}}
    body: dict[str, Any] = {
        **base,
        "type": panel.kind,
        "datasource": _datasource(),
        "targets": _grafana_targets(panel),
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "stat":
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "name" if panel.show_name else "value_and_name",
            "colorMode": "none",
        }
    elif panel.kind == "table":
        body["transformations"] = [{"id": "labelsToFields", "options": {}}]
    elif panel.kind == "timeseries":
        body["options"] = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]}}
    return body


def grafana_dashboard(sections: Sequence[Section] = SECTIONS, title: str | None = None) -> dict[str, Any]:
    """The Grafana dashboard JSON model: a row per section, panels laid out left to right, 24 columns wide."""
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for section in sections:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": section.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id, y = next_id + 1, y + 1
        width = max(GRID_WIDTH // len(section.panels), GRID_WIDTH // 4)
        x = 0
        for panel in section.panels:
            if x + width > GRID_WIDTH:
                x, y = 0, y + PANEL_HEIGHT
            grid = {"h": PANEL_HEIGHT, "w": width, "x": x, "y": y}
            panels.append(_grafana_panel(panel, next_id, grid))
            next_id, x = next_id + 1, x + width
        y += PANEL_HEIGHT
    return {
        "uid": GRAFANA_UID,
        "title": title or DEFAULT_TITLE,
        "description": "fraudwatch: service health, input drift, output drift, outcomes, and the model rollout.",
        "tags": ["fraudwatch", "mlops"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": GRAFANA_SCHEMA_VERSION,
        "version": 1,
        "time": {"from": GRAFANA_TIME_FROM, "to": "now"},
        "refresh": GRAFANA_REFRESH,
        "timezone": "utc",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": DATASOURCE_VAR,
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                }
            ]
        },
        "panels": panels,
    }


def grafana_json(sections: Sequence[Section] = SECTIONS) -> str:
    """The dashboard as the committed file's text (sorted keys, two-space indent, trailing newline)."""
    return json.dumps(grafana_dashboard(sections), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------------------- querying


class QueryFailedError(RuntimeError):
    """Prometheus was unreachable, timed out, or rejected a query."""


@dataclass(frozen=True)
class Series:
    name: str
    labels: Mapping[str, str]
    points: tuple[Point, ...]

    @property
    def current(self) -> float | None:
        """The newest finite value (``None`` when there is none)."""
        for _, value in reversed(self.points):
            if math.isfinite(value):
                return value
        return None


@dataclass(frozen=True)
class PanelData:
    panel: Panel
    series: tuple[Series, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class PageData:
    sections: tuple[tuple[Section, tuple[PanelData, ...]], ...]
    generated_at: datetime
    prometheus_url: str
    online: bool
    errors: int = 0


class PrometheusReader:
    """Instant and range queries over Prometheus' HTTP API (async, bounded concurrency)."""

    def __init__(self, client: httpx.AsyncClient, max_concurrency: int) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(max_concurrency)

    async def online(self) -> bool:
        try:
            return (await self._client.get("/-/ready")).status_code == httpx.codes.OK
        except httpx.HTTPError:
            return False

    async def instant(self, expr: str) -> list[tuple[dict[str, str], list[Point]]]:
        data = await self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [({}, [_point(data["result"])])]
        return [(dict(item["metric"]), [_point(item["value"])]) for item in data["result"]]

    async def range(
        self, expr: str, start_ms: int, end_ms: int, step_ms: int
    ) -> list[tuple[dict[str, str], list[Point]]]:
        params = {"query": expr, "start": _seconds_text(start_ms), "end": _seconds_text(end_ms)}
        params["step"] = _seconds_text(step_ms)
        data = await self._get("/api/v1/query_range", params)
        return [(dict(item["metric"]), [_point(v) for v in item["values"]]) for item in data["result"]]

    async def _get(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        async with self._slots:
            try:
                response = await self._client.get(path, params=params)
            except httpx.HTTPError as exc:
                raise QueryFailedError(f"Prometheus unreachable: {type(exc).__name__}") from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise QueryFailedError(f"Prometheus answered {response.status_code} without JSON") from exc
        if response.status_code != httpx.codes.OK or body.get("status") != "success":
            raise QueryFailedError(f"Prometheus answered {response.status_code}: {body.get('error', '')}")
        data: dict[str, Any] = body["data"]
        return data


def _seconds_text(ms: int) -> str:
    """Whole milliseconds as exact decimal seconds (``1500`` → ``1.500``), no float rounding on the way."""
    return f"{ms // MS_PER_S}.{ms % MS_PER_S:03d}"


def _point(pair: Sequence[Any]) -> Point:
    return float(pair[0]), float(pair[1])


def _name_series(
    query: Query, results: Iterable[tuple[dict[str, str], list[Point]]], *, keep_nan: bool = False
) -> list[Series]:
    named = [Series(legend(query.legend, labels) or query.expr, labels, tuple(points)) for labels, points in results]
    return named if keep_nan else [s for s in named if s.current is not None]


def auc_series(query: Query, samples: Iterable[tuple[Mapping[str, str], float]]) -> list[Series]:
    """ROC-AUC per (model_version, role) from the recorded labelled-score histograms (``le`` → cumulative count)."""
    buckets: dict[tuple[str, str], dict[str, dict[float, float]]] = {}
    for labels, value in samples:
        key = (labels.get("model_version", ""), labels.get("role", ""))
        per_label = buckets.setdefault(key, {_FRAUD: {}, _LEGIT: {}})
        label = labels.get("label", "")
        if label in per_label and "le" in labels:
            per_label[label][drift.parse_le(labels["le"])] = value
    out: list[Series] = []
    for (version, role), per_label in sorted(buckets.items()):
        fraud, legit = per_label[_FRAUD], per_label[_LEGIT]
        if not fraud or set(fraud) != set(legit):
            continue
        auc = drift.roc_auc_from_prometheus_buckets(fraud, legit)
        if auc is not None:
            labels = {"model_version": version, "role": role}
            out.append(Series(legend(query.legend, labels), labels, ((time.time(), auc),)))
    return out


async def panel_data(reader: PrometheusReader, panel: Panel, settings: DashboardSettings, now: float) -> PanelData:
    """Every series of one panel; a failed query becomes the panel's error, never the page's."""
    # the last point must be `now` exactly (the current value): whole milliseconds (Prometheus' resolution), the
    # step first, then the start counted back from `now` in whole steps
    end_ms = round(now * MS_PER_S)
    step_ms = max(1, round(settings.range_s * MS_PER_S / (settings.points - 1)))
    start_ms = end_ms - step_ms * (settings.points - 1)
    try:
        if panel.kind == "timeseries":
            results = await asyncio.gather(*(reader.range(q.expr, start_ms, end_ms, step_ms) for q in panel.queries))
            series = [s for q, r in zip(panel.queries, results, strict=True) for s in _name_series(q, r)]
            # the largest current values are the ones worth a row when there are more series than rows
            series.sort(key=lambda s: (-(s.current or 0.0), s.name))
            series = sorted(series[: settings.max_series_per_panel], key=lambda s: s.name)
        elif panel.kind == "auc":
            (query,) = panel.queries
            samples = [(labels, points[0][1]) for labels, points in await reader.instant(query.expr)]
            series = auc_series(query, samples)
        else:
            results = await asyncio.gather(*(reader.instant(q.expr) for q in panel.queries))
            series = [s for q, r in zip(panel.queries, results, strict=True) for s in _name_series(q, r)]
            series.sort(key=lambda s: s.name)
    except QueryFailedError as exc:
        return PanelData(panel, error=str(exc))
    return PanelData(panel, tuple(series[: settings.max_series_per_panel]))


async def collect(reader: PrometheusReader, settings: DashboardSettings, sections: Sequence[Section]) -> PageData:
    now = time.time()
    online = await reader.online()
    rendered = []
    for section in sections:
        panels = await asyncio.gather(*(panel_data(reader, p, settings, now) for p in section.panels))
        rendered.append((section, tuple(panels)))
    errors = sum(1 for _, panels in rendered for p in panels if p.error is not None)
    return PageData(tuple(rendered), datetime.fromtimestamp(now, UTC), settings.prometheus_url, online, errors)


# --------------------------------------------------------------------------------------------------- rendering


def format_value(value: float | None, unit: Unit) -> str:
    """A value as people read it: ``12.3 ms``, ``4.56%``, ``7.8 req/s``, ``0.123``."""
    if value is None or not math.isfinite(value):
        return "–"
    if unit == "s":
        return _seconds(value)
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    if unit == "none" and value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def _seconds(value: float) -> str:
    # (from, unit size, unit): minutes from 2 min on, so that 90 s stays 90 s
    scales = ((172_800.0, 86_400.0, "d"), (7_200.0, 3_600.0, "h"), (120.0, 60.0, "min"), (1.0, 1.0, "s"),
              (1e-3, 1e-3, "ms"), (1e-6, 1e-6, "µs"))  # fmt: skip
    for start, size, suffix in scales:
        if abs(value) >= start:
            return f"{value / size:.3g} {suffix}"
    return f"{value:.3g} s"


def sparkline(points: Sequence[Point], width: int = SPARK_WIDTH, height: int = SPARK_HEIGHT) -> str:
    """An inline SVG polyline of the finite points (an empty SVG when fewer than two)."""
    finite = [(t, v) for t, v in points if math.isfinite(v)]
    head = f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
    if len(finite) < 2:  # a line needs two points
        return head + "</svg>"
    t0, t1 = finite[0][0], finite[-1][0]
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    span_t, span_v = (t1 - t0) or 1.0, (hi - lo) or 1.0
    pad = 2.0
    coords = " ".join(
        f"{(t - t0) / span_t * (width - 2 * pad) + pad:.1f},{height - pad - (v - lo) / span_v * (height - 2 * pad):.1f}"
        for t, v in finite
    )
    return head + f'<polyline fill="none" stroke="#2f6fdf" stroke-width="1.5" points="{coords}"/></svg>'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _num(value: float | None, unit: Unit) -> str:
    data = "" if value is None else f' data-value="{value!r}"'
    return f'<td class="num"{data}>{_e(format_value(value, unit))}</td>'


def render_panel(data: PanelData) -> str:
    panel = data.panel
    parts = [f'<div class="panel {panel.kind}" id="panel-{_e(panel.key)}">', f"<h3>{_e(panel.title)}</h3>"]
    if panel.description:
        parts.append(f'<p class="desc">{_e(panel.description)}</p>')
    if data.error is not None:
        parts.append(f'<p class="error">{_e(data.error)}</p>')
    elif not data.series:
        parts.append('<p class="nodata">no data</p>')
    elif panel.kind == "stat":
        for s in data.series:
            value = (
                ""
                if panel.show_name
                else f'<span class="big" data-value="{s.current!r}">'
                + _e(format_value(s.current, panel.unit))
                + "</span>"
            )
            parts.append(
                f'<div class="stat" data-series="{_e(s.name)}">{value}<span class="name">{_e(s.name)}</span></div>'
            )
    else:
        parts.append("<table>")
        for s in data.series:
            spark = f"<td>{sparkline(s.points)}</td>" if panel.kind == "timeseries" else ""
            parts.append(
                f'<tr data-series="{_e(s.name)}"><th>{_e(s.name)}</th>{spark}{_num(s.current, panel.unit)}</tr>'
            )
        parts.append("</table>")
    parts.append("</div>")
    return "".join(parts)


_CSS: Final[str] = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}header span{color:#b9c0cc;font-size:12px}
.banner{background:#c62828;color:#fff;padding:8px 18px}
section{padding:6px 18px 12px}section h2{font-size:16px;margin:10px 0 6px;border-bottom:2px solid #d0d4dc}
.panels{display:flex;flex-wrap:wrap;gap:10px}
.panel{background:#fff;border:1px solid #d0d4dc;border-radius:4px;padding:8px 10px;min-width:300px;flex:1 1 300px}
.panel h3{font-size:13px;margin:0 0 4px}.desc{color:#5b6372;font-size:11px;margin:0 0 4px}
table{border-collapse:collapse;width:100%}th{text-align:left;font-weight:normal;padding:1px 6px 1px 0;font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums;padding-left:8px;white-space:nowrap}
.nodata{color:#8a93a3;font-style:italic;margin:2px 0}.error{color:#c62828;margin:2px 0}
.stat{display:inline-block;margin:2px 14px 2px 0}.stat .big{font-size:22px;font-weight:600;margin-right:6px}
.stat .name{font-size:15px}#panel-alerts tr th{color:#c62828}
"""


def render_page(page: PageData, title: str, refresh_s: int) -> str:
    """The whole page: header, a banner when Prometheus is down, then one section per row of panels."""
    stamp = page.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{refresh_s}">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><span>Prometheus {_e(page.prometheus_url)}</span>",
        f'<span id="generated">generated {_e(stamp)} · reloads every {refresh_s} s</span></header>',
    ]
    if not page.online:
        parts.append(
            f'<div class="banner">Prometheus at {_e(page.prometheus_url)} is not reachable or not ready.</div>'
        )
    for section, panels in page.sections:
        parts.append(f'<section id="{_e(section.key)}"><h2>{_e(section.title)}</h2><div class="panels">')
        parts.extend(render_panel(p) for p in panels)
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------- the app


@dataclass
class _State:
    settings: DashboardSettings
    client: httpx.AsyncClient | None = None
    reader: PrometheusReader | None = field(default=None)


def create_app(settings: DashboardSettings | None = None, sections: Sequence[Section] = SECTIONS) -> Starlette:
    """The page at ``/`` (HTML), ``/livez``, and ``/api/grafana`` (the Grafana JSON of the same panels)."""
    state = _State(settings or DashboardSettings())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        cfg = state.settings
        state.client = httpx.AsyncClient(
            base_url=cfg.prometheus_url.rstrip("/"), timeout=cfg.query_timeout_s, trust_env=False
        )
        state.reader = PrometheusReader(state.client, cfg.max_concurrency)
        log_event(logger, "dashboard started", event="dashboard_start", prometheus=cfg.prometheus_url)
        try:
            yield
        finally:
            await state.client.aclose()

    async def page(_request: Request) -> Response:
        if state.reader is None:
            return JSONResponse({"error": "starting"}, status_code=503)
        started = time.monotonic()
        data = await collect(state.reader, state.settings, sections)
        log_event(
            logger,
            "dashboard rendered",
            event="dashboard_render",
            seconds=round(time.monotonic() - started, 4),
            panel_errors=data.errors,
            prometheus_online=data.online,
        )
        return HTMLResponse(render_page(data, state.settings.title, state.settings.refresh_s))

    async def livez(_request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def grafana(_request: Request) -> Response:
        return JSONResponse(grafana_dashboard(sections, state.settings.title))

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/api/grafana", grafana, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fraudwatch-dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", help="Prometheus base URL (default: FW_ROLLOUT_DASHBOARD__PROMETHEUS_URL)")
    parser.add_argument("--host", help="bind address (default: FW_ROLLOUT_DASHBOARD__HOST)")
    parser.add_argument("--port", type=int, help="port (default: FW_ROLLOUT_DASHBOARD__PORT)")
    parser.add_argument("--refresh-s", type=int, help="page reload interval (default: FW_ROLLOUT_DASHBOARD__REFRESH_S)")
    parser.add_argument("--write-grafana", type=Path, metavar="PATH", help="write the Grafana JSON to PATH and exit")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace, base: DashboardSettings | None = None) -> DashboardSettings:
    overrides = {
        name: value
        for name, value in {
            "prometheus_url": args.prometheus,
            "host": args.host,
            "port": args.port,
            "refresh_s": args.refresh_s,
        }.items()
        if value is not None
    }
    return DashboardSettings.model_validate({**(base or DashboardSettings()).model_dump(), **overrides})


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    if args.write_grafana is not None:
        args.write_grafana.parent.mkdir(parents=True, exist_ok=True)
        args.write_grafana.write_text(grafana_json(), encoding="utf-8")
        log_event(logger, "grafana dashboard written", event="dashboard_grafana_written", path=str(args.write_grafana))
        return
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False, log_config=None)


if __name__ == "__main__":
    main()
