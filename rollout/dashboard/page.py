"""The embedded mode's page: the panels queried server-side and rendered as one HTML page."""

from __future__ import annotations

import asyncio
import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from rollout.backends.prometheus import PrometheusClient, PrometheusError, RangeSeries
from rollout.core import drift
from rollout.dashboard.panels import Panel, Query, Section, Unit, legend
from rollout.dashboard.settings import DashboardSettings
from rollout.router.outcomes.prediction_log import LABEL_NAMES

Point = tuple[float, float]


SPARK_WIDTH: Final[int] = 160


SPARK_HEIGHT: Final[int] = 28


MS_PER_S: Final[int] = 1000


_FRAUD: Final[str] = LABEL_NAMES[1]


_LEGIT: Final[str] = LABEL_NAMES[0]


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


class PageQueries:
    """The page's queries on the one Prometheus client (:class:`~rollout.backends.prometheus.PrometheusClient`), each
    in a worker thread, at most ``max_concurrency`` at once."""

    def __init__(self, client: PrometheusClient, max_concurrency: int) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(max_concurrency)

    async def online(self) -> bool:
        async with self._slots:
            return await asyncio.to_thread(self._client.is_online)

    async def instant(self, expr: str) -> list[RangeSeries]:
        async with self._slots:
            samples = await asyncio.to_thread(self._client.query_vector, expr)
        now = time.time()
        return [(labels, [(now, value)]) for labels, value in samples]

    async def range(self, expr: str, start_ms: int, end_ms: int, step_ms: int) -> list[RangeSeries]:
        async with self._slots:
            return await asyncio.to_thread(
                self._client.query_range, expr, start_ms / MS_PER_S, end_ms / MS_PER_S, step_ms / MS_PER_S
            )


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


async def panel_data(reader: PageQueries, panel: Panel, settings: DashboardSettings, now: float) -> PanelData:
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
    except PrometheusError as exc:
        return PanelData(panel, error=str(exc))
    return PanelData(panel, tuple(series[: settings.max_series_per_panel]))


async def collect(reader: PageQueries, settings: DashboardSettings, sections: Sequence[Section]) -> PageData:
    now = time.time()
    online = await reader.online()
    rendered = []
    for section in sections:
        panels = await asyncio.gather(*(panel_data(reader, p, settings, now) for p in section.panels))
        rendered.append((section, tuple(panels)))
    errors = sum(1 for _, panels in rendered for p in panels if p.error is not None)
    return PageData(tuple(rendered), datetime.fromtimestamp(now, UTC), settings.prometheus_url, online, errors)


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
