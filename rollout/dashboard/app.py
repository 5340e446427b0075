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
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from rollout.backends.prometheus import PrometheusClient
from rollout.dashboard.grafana import grafana_dashboard, grafana_json
from rollout.dashboard.page import PageQueries, collect, render_page
from rollout.dashboard.panels import SECTIONS, Section
from rollout.dashboard.settings import DashboardSettings
from service.common.logging import configure_logging, get_logger, log_event

logger = get_logger("rollout.dashboard")


# --------------------------------------------------------------------------------------------------- panels


# --------------------------------------------------------------------------------------------------- Grafana


# --------------------------------------------------------------------------------------------------- querying


# --------------------------------------------------------------------------------------------------- rendering


# --------------------------------------------------------------------------------------------------- the app


@dataclass
class _State:
    settings: DashboardSettings
    client: PrometheusClient | None = None
    reader: PageQueries | None = field(default=None)


def create_app(settings: DashboardSettings | None = None, sections: Sequence[Section] = SECTIONS) -> Starlette:
    """The page at ``/`` (HTML), ``/livez``, and ``/api/grafana`` (the Grafana JSON of the same panels)."""
    state = _State(settings or DashboardSettings())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        cfg = state.settings
        state.client = PrometheusClient(cfg.prometheus_url, timeout_s=cfg.query_timeout_s, trust_env=False)
        state.reader = PageQueries(state.client, cfg.max_concurrency)
        log_event(logger, "dashboard started", event="dashboard_start", prometheus=cfg.prometheus_url)
        try:
            yield
        finally:
            state.client.close()

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
