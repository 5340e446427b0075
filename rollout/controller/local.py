"""The controller on the local backend (and podman's): bentoml serve children or model-server containers, routing
through the routers' admin endpoint, the MLflow registry, Prometheus; its state, commands and events in the state
directory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rollout.backends.base import (
    Backend,
)
from rollout.controller.loop import Controller
from rollout.controller.metrics import ControllerMetrics
from rollout.controller.runners import ThreadRunner
from rollout.core.policy import load_policy
from rollout.settings import RolloutSettings


def controller_state_dir(settings: RolloutSettings) -> Path:
    return settings.controller.resolved_state_dir(settings.home)


@dataclass
class LocalRuntime:
    """A controller on the local backend, with what must be closed after it."""

    controller: Controller
    closers: list[Callable[[], None]]

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()


def build_local(
    settings: RolloutSettings, *, stop_workloads_on_exit: bool, registry_metrics: object | None = None
) -> LocalRuntime:
    """The local backend's controller: bentoml serve children (the podman backend: model-server containers),
    admin-endpoint routing, MLflow, real Prometheus."""
    from prometheus_client import CollectorRegistry

    from rollout.backends.base import require_registry_stack
    from rollout.backends.local.routing import AdminRoutingPublisher
    from rollout.backends.local.workloads import LocalWorkloads

    require_registry_stack()
    from rollout.backends.prometheus import PrometheusClient
    from rollout.backends.registry import RegistryModelSource, RegressionSetQuality
    from service.settings import get_settings

    cs = settings.controller
    state_dir = controller_state_dir(settings)
    state_dir.mkdir(parents=True, exist_ok=True)
    serve = get_settings()
    source = RegistryModelSource(serve)
    models_dir = cs.local.models_dir if cs.local.models_dir is not None else state_dir / "models"
    workloads: LocalWorkloads
    if cs.backend == "podman":
        from rollout.backends.podman import PodmanWorkloads

        workloads = PodmanWorkloads(cs.local, cs.podman, serve, source, state_dir, cs.name)
    else:
        workloads = LocalWorkloads(cs.local, serve, source, state_dir)
    publisher = AdminRoutingPublisher(
        cs.local.router_urls,
        settings.router.admin_secret(),
        cs.local.admin_timeout_s,
        cs.local.routing_resync_interval_s,
    )
    prometheus = PrometheusClient(cs.prometheus_url)
    backend = Backend(
        workloads=workloads,
        publisher=publisher,
        metrics=prometheus,
        source=source,
        quality=RegressionSetQuality(source, cs.quality_set, models_dir),
    )
    registry = registry_metrics if isinstance(registry_metrics, CollectorRegistry) else CollectorRegistry()
    metrics = ControllerMetrics(registry, cs.name, cs.reconcile_duration_buckets_s)
    runner = ThreadRunner()
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
    controller = Controller(
        settings=cs,
        policy=load_policy(cs.policy_file),
        backend=backend,
        state_dir=state_dir,
        metrics=metrics,
        runner=runner,
        background=background,
    )
    closers: list[Callable[[], None]] = [
        lambda: workloads.close(stop_servers=stop_workloads_on_exit),
        publisher.close,
        prometheus.close,
        runner.close,
        lambda: background.shutdown(wait=True),
    ]
    return LocalRuntime(controller, closers)
