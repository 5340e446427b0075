"""``python -m rollout.controller``: the rollout controller process (the chart's controller container)."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from rollout.backends.local.inbox import Heartbeat, write_heartbeat
from rollout.controller.local import build_local, controller_state_dir
from rollout.settings import RolloutSettings, get_rollout_settings
from service.common.clock import utc_now
from service.common.logging import configure_logging, get_logger, log_event

logger = get_logger("controller")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rollout.controller",
        description="The fraudwatch rollout controller (settings from FW_ROLLOUT_… and FW_…).",
    )
    parser.add_argument(
        "--stop-workloads-on-exit",
        action="store_true",
        help="stop the model servers when the controller exits (default: leave them serving; a restart adopts them)",
    )
    return parser.parse_args(argv)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (the loop then finishes its reconcile and stops)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log_event(logger, "controller stopping", event="controller_stopping", signal=signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def main(argv: Sequence[str] | None = None) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    args = _parse_args(argv)
    settings = get_rollout_settings()
    configure_logging(settings.log_level)
    cs = settings.controller
    registry = CollectorRegistry()
    http_server, _thread = start_http_server(cs.metrics_port, addr=cs.host, registry=registry)
    metrics_url = f"http://{cs.host}:{http_server.server_port}/metrics"
    if cs.backend == "kube":
        return _main_kube(settings, registry, http_server)
    runtime = build_local(settings, stop_workloads_on_exit=args.stop_workloads_on_exit, registry_metrics=registry)
    stop = stop_on_signals()
    started_at = utc_now()
    state_dir = controller_state_dir(settings)

    def heartbeat() -> None:
        write_heartbeat(
            state_dir,
            Heartbeat(pid=os.getpid(), name=cs.name, backend=cs.backend, started_at=started_at, heartbeat_at=utc_now(),
                      metrics_url=metrics_url),
        )  # fmt: skip

    log_event(logger, "controller started", event="controller_started", name=cs.name, state_dir=str(state_dir),
              metrics_url=metrics_url, prometheus=cs.prometheus_url, routers=list(cs.local.router_urls))  # fmt: skip
    try:
        runtime.controller.run(stop, heartbeat)
    finally:
        runtime.close()
        http_server.shutdown()
        log_event(logger, "controller stopped", event="controller_stopped")
    return 0


def _main_kube(settings: RolloutSettings, registry: Any, http_server: Any) -> int:
    """The Kubernetes backend (rollout.controller.kube): the ModelRollout ``controller.name`` in
    ``controller.kube.namespace``; exit code ``controller.kube.lost_leadership_exit_code`` when the Lease was lost."""
    from rollout.backends.kube.api import KubeUnavailableError
    from rollout.controller.kube import run_controller

    stop = stop_on_signals()
    try:
        return run_controller(settings, registry, stop)
    except KubeUnavailableError as exc:
        log_event(logger, "no Kubernetes configuration", event="controller_backend_unavailable", error=str(exc))
        return 2
    finally:
        http_server.shutdown()
        log_event(logger, "controller stopped", event="controller_stopped")


if __name__ == "__main__":
    raise SystemExit(main())
