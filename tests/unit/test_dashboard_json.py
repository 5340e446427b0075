"""deploy/grafana/fraudwatch-dashboard.json and the page renderer of rollout/dashboard/page.py.

The JSON is checked as a file (valid, one row per monitoring layer plus the rollout, the datasource as a template
variable, a sane grid), every panel's PromQL is parsed by the real promtool and may only read series that the
metrics code exports or rules.yml records. The page's pure parts (legends, number formats, sparklines, ROC-AUC from
recorded buckets, escaping) are checked here; tests/integration/test_dashboard_page.py renders it from a live stack.

``known_series``, ``series_names`` and ``promtool_check`` come from tests/kits/dashboard.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rollout.dashboard import grafana, page, panels
from rollout.router.outcomes.prediction_log import LABEL_NAMES
from rollout.router.outcomes.settings import OutcomeSettings
from service.data.features import DRIFT_FEATURES
from service.data.velocity import VELOCITY_FEATURES
from tests.kits.dashboard import known_series, promtool_check, series_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "fraudwatch-dashboard.json"
CHART_DASHBOARDS = ROOT / "deploy" / "helm" / "fraudwatch" / "files" / "dashboards"
LAYER_ROWS = ("Service health", "Input drift", "Output drift", "Outcomes")


# --------------------------------------------------------------------------------------------------- the JSON file


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(board) for t in p.get("targets", [])]


def _rows(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each row's title → the panels below it (until the next row)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            current.append(panel)
    return rows


def test_committed_json_is_the_one_built_from_the_panel_definitions() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == grafana.grafana_json(), (
        "regenerate: fraudwatch-dashboard --write-grafana deploy/grafana/fraudwatch-dashboard.json"
    )


def test_the_chart_ships_the_dashboard_where_its_configmap_template_looks() -> None:
    shipped = [p for p in CHART_DASHBOARDS.glob("*.json") if p.resolve() == DASHBOARD.resolve()]
    assert len(shipped) == 1
    assert json.loads(shipped[0].read_text(encoding="utf-8"))["uid"] == grafana.GRAFANA_UID


def test_datasource_is_a_template_variable_used_by_every_query(board: dict[str, Any]) -> None:
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    reference = f"${{{variable['name']}}}"
    queried = [p for p in _panels(board) if p.get("targets")]
    assert queried
    for panel in queried:
        assert panel["datasource"]["uid"] == reference, panel["title"]
        assert all(t["datasource"]["uid"] == reference for t in panel["targets"]), panel["title"]
    assert reference not in json.dumps([p for p in _panels(board) if not p.get("targets")])


def test_one_row_per_layer_plus_the_rollout_each_with_panels(board: dict[str, Any]) -> None:
    rows = _rows(board)
    assert set(LAYER_ROWS) <= set(rows)
    assert [t for t in rows if t in LAYER_ROWS] == list(LAYER_ROWS)
    assert all(rows[title] for title in rows), {t: len(p) for t, p in rows.items()}
    rollout_exprs = " ".join(t["expr"] for p in rows[panels.ROLLOUT.title] for t in p.get("targets", []))
    assert "fraudwatch_rollout_stage" in rollout_exprs
    assert "ALERTS" in rollout_exprs


@pytest.mark.parametrize(
    ("row", "needles"),
    [
        (
            "Service health",
            [
                "histogram_quantile(0.5,",
                "histogram_quantile(0.95,",
                "histogram_quantile(0.99,",
                "fraudwatch_router_error_ratio",
                "fraudwatch_router_requests:rate5m",
            ],
        ),
        (
            "Input drift",
            [
                'model_version_feature:fraudwatch_psi:1h{feature!~"score|acct_refunds_1h|',
                'fraudwatch_psi:1h{feature=~"acct_refunds_1h|',
                "fraudwatch_online_store_feature_age_seconds_bucket",
                "fraudwatch_online_store_update_lag_seconds_bucket",
                "fraudwatch_online_store_fallback_total",
            ],
        ),
        ("Output drift", ["fraudwatch_score_bucket", "review_decision_ratio", "shadow_agreement"]),
        ("Outcomes", ["outcome_precision", "outcome_recall", "calibration_error"]),
    ],
)
def test_each_layer_row_shows_what_the_layer_is_about(board: dict[str, Any], row: str, needles: list[str]) -> None:
    exprs = " ".join(t["expr"] for p in _rows(board)[row] for t in p.get("targets", []))
    missing = [n for n in needles if n not in exprs]
    assert not missing, missing


def test_the_velocity_psi_panel_names_every_velocity_feature_and_every_one_has_a_reference() -> None:
    assert panels.VELOCITY_FEATURES == VELOCITY_FEATURES
    assert set(VELOCITY_FEATURES) <= set(DRIFT_FEATURES)


def test_outcomes_row_explains_roc_auc(board: dict[str, Any]) -> None:
    texts = [p["options"]["content"] for p in _rows(board)["Outcomes"] if p["type"] == "text"]
    assert any("ROC-AUC" in t and "roc_auc_from_prometheus_buckets" in t for t in texts)


def test_grid_fits_24_columns_without_overlap_and_ids_are_unique(board: dict[str, Any]) -> None:
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= grafana.GRID_WIDTH, panel["title"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_panel_query_parses_with_promtool(board: dict[str, Any], tmp_path: Path) -> None:
    exprs = _exprs(board)
    assert len(exprs) >= 20
    promtool_check(exprs, tmp_path)


def test_every_panel_query_reads_series_that_exist(board: dict[str, Any]) -> None:
    known = known_series()
    used = {name for expr in _exprs(board) for name in series_names(expr)}
    assert "fraudwatch_router_request_duration_seconds_bucket" in used
    assert not used - known, sorted(used - known)


def test_the_pages_own_queries_parse_and_read_series_that_exist(tmp_path: Path) -> None:
    """The page also runs queries Grafana does not (the ROC-AUC buckets)."""
    exprs = [q.expr for section in panels.SECTIONS for panel in section.panels for q in panel.queries]
    promtool_check(exprs, tmp_path)
    used = {name for expr in exprs for name in series_names(expr)}
    assert "model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1d" in used
    assert not used - known_series(), sorted(used - known_series())


def test_legends_name_labels_the_query_keeps() -> None:
    """A legend placeholder must be a label of the query's result: in its ``by (...)`` list or its selector."""
    for section in panels.SECTIONS:
        for panel in section.panels:
            for query in panel.queries:
                placeholders = set(re.findall(r"\{\{(\w+)\}\}", query.legend))
                grouped = re.findall(r"\bby \(([^)]*)\)", query.expr)
                if not grouped:
                    continue  # a recorded series keeps all of its labels
                kept = {label.strip() for label in grouped[0].split(",")}
                assert placeholders <= kept, (panel.key, query.legend, kept)


# --------------------------------------------------------------------------------------------------- the page parts


def test_series_names_sees_through_functions_strings_and_label_lists() -> None:
    expr = (
        'sum by (model_version, le) (rate(a_bucket{x="y"}[5m])) / on (model_version) group_left () b offset 1d '
        '+ label_replace(c, "d", "$1", "e", "(.+)") and time() - vector(1e-4) > bool 0.5'
    )
    assert series_names(expr) == {"a_bucket", "b", "c"}


def test_legend_fills_labels_and_drops_missing_ones() -> None:
    assert panels.legend("{{model_version}} {{role}}", {"model_version": "v2", "role": "shadow"}) == "v2 shadow"
    assert panels.legend("p99 {{ model_version }}", {"model_version": "v1"}) == "p99 v1"
    template = "{{alertname}} · {{alertstate}} · version {{model_version}}"
    assert panels.legend(template, {"alertname": "A", "alertstate": "firing"}) == "A · firing"
    assert panels.legend(template, {"alertname": "A", "model_version": "v3"}) == "A · version v3"


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (0.0123, "s", "12.3 ms"),
        (2.5, "s", "2.5 s"),
        (90.0, "s", "90 s"),
        (600.0, "s", "10 min"),
        (7_200.0, "s", "2 h"),
        (1_209_600.0, "s", "14 d"),
        (0.00004, "s", "40 µs"),
        (0.95, "percentunit", "95%"),
        (0.04762, "percentunit", "4.76%"),
        (12.345, "reqps", "12.3 req/s"),
        (3.0, "none", "3"),
        (0.2468, "short", "0.247"),
        (None, "short", "–"),
        (float("nan"), "s", "–"),
    ],
)
def test_format_value(value: float | None, unit: panels.Unit, text: str) -> None:
    assert page.format_value(value, unit) == text


def test_sparkline_spans_the_box_and_skips_missing_points() -> None:
    points = [(0.0, 1.0), (10.0, float("nan")), (20.0, 3.0), (30.0, 2.0)]
    svg = page.sparkline(points, width=100, height=20)
    coords = [tuple(map(float, c.split(","))) for c in re.search(r'points="([^"]+)"', svg).group(1).split()]  # type: ignore[union-attr]
    assert len(coords) == 3
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    assert min(xs) == pytest.approx(2.0) and max(xs) == pytest.approx(98.0)
    assert ys[1] == pytest.approx(2.0) and ys[0] == pytest.approx(18.0)  # the highest value is drawn at the top
    assert "<polyline" not in page.sparkline([(0.0, 1.0)])


def _cumulative(scores: Iterable[float], edges: Sequence[float]) -> dict[str, float]:
    values = np.asarray(list(scores))
    counts = {repr(edge): float(np.sum(values <= edge)) for edge in edges}
    counts["+Inf"] = float(len(values))
    return counts


def test_auc_from_recorded_buckets_matches_the_exact_auc_within_bucket_resolution() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(3000) < 0.1
    scores = np.clip(np.where(labels, rng.beta(5, 2, 3000), rng.beta(1, 6, 3000)), 0.0, 1.0)
    edges = OutcomeSettings().score_buckets
    samples = []
    for label, name in ((True, LABEL_NAMES[1]), (False, LABEL_NAMES[0])):
        for le, count in _cumulative(scores[labels == label], edges).items():
            samples.append(({"model_version": "v1", "role": "decider", "label": name, "le": le}, count))
    samples.append(({"model_version": "v2", "role": "shadow", "label": LABEL_NAMES[0], "le": "+Inf"}, 5.0))

    (series,) = page.auc_series(panels.Query("x", "{{model_version}} {{role}}"), samples)

    assert series.name == "v1 decider"
    assert series.current == pytest.approx(roc_auc_score(labels, scores), abs=0.01)


def test_page_escapes_what_comes_from_prometheus_and_shows_errors_per_panel() -> None:
    panel = panels.Panel(
        "p", "Throughput <per version>", "timeseries", "reqps", (panels.Query("x", "{{model_version}}"),)
    )
    hostile = page.Series("<script>alert(1)</script>", {}, ((0.0, 1.0), (1.0, 2.0)))
    broken = panels.Panel("q", "Broken", "table", "short", (panels.Query("y", "y"),))
    section = panels.Section("s", "Service health", (panel, broken))
    data = page.PageData(
        ((section, (page.PanelData(panel, (hostile,)), page.PanelData(broken, error="Prometheus answered 400"))),),
        datetime(2025, 1, 1, tzinfo=UTC),
        "http://127.0.0.1:9090",
        online=False,
        errors=1,
    )

    text = page.render_page(data, "fraudwatch", refresh_s=7)

    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Throughput &lt;per version&gt;" in text
    assert 'content="7"' in text
    assert 'class="banner"' in text
    assert '<p class="error">Prometheus answered 400</p>' in text
    assert 'data-value="2.0"' in text and "2 req/s" in text
