"""The Grafana dashboard built from the panels (``deploy/grafana/fraudwatch-dashboard.json``, which the Helm chart
ships as a ConfigMap for Grafana's sidecar): one row per section, the Prometheus datasource as the template variable
``datasource``. Regenerate it with ``fraudwatch-dashboard --write-grafana PATH``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from rollout.dashboard.panels import ROC_AUC_NOTE, SECTIONS, Panel, Section
from rollout.dashboard.settings import DEFAULT_TITLE

DATASOURCE_VAR: Final[str] = "datasource"


GRAFANA_UID: Final[str] = "fraudwatch-rollout"


GRAFANA_SCHEMA_VERSION: Final[int] = 39


GRAFANA_TIME_FROM: Final[str] = "now-6h"


GRAFANA_REFRESH: Final[str] = "30s"


GRID_WIDTH: Final[int] = 24


PANEL_HEIGHT: Final[int] = 8


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
