"""The controller on Kubernetes: one ModelRollout, the reconcile loop of :mod:`rollout.controller.loop` unchanged,
its ports from :mod:`rollout.backends.kube`.

:class:`KubeRuntime` runs it: informers keep a local copy of the ModelRollout, its Deployments and Services and the
templates ConfigMap, so a reconcile reads memory and writes only what changed; a change wakes the loop at once (a
``revert`` is applied within one tick of its watch event). Only the holder of the Lease acts
(:mod:`rollout.backends.kube.lease`). A finalizer deletes the workloads before the object goes. One
:class:`Session` (a :class:`~rollout.controller.loop.Controller` with its status store, spec commands, Kubernetes
Events, workloads, routing publisher and model source) per object uid. A controller killed at any point resumes from
the status: the state is saved before acting, and acting again is harmless (server-side apply of an unchanged
manifest, a table already published, an Event that exists).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge

from rollout.backends.base import (
    Backend,
    ModelSource,
    QualityCheck,
    require_registry_stack,
)
from rollout.backends.kube.api import (
    Json,
    KubeApi,
    KubeError,
    rollout_path,
)
from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.commands import SpecCommandSource
from rollout.backends.kube.events import KubeEventSink
from rollout.backends.kube.lease import LeaseElector
from rollout.backends.kube.resource import (
    FINALIZER,
    RolloutObject,
    effective_policy,
    routing_of,
)
from rollout.backends.kube.status import RouterReplicas, StatusRoutingPublisher, StatusStateStore, StatusWriter
from rollout.backends.kube.versions import KubeModelSource, NoQuality
from rollout.backends.kube.workloads import KubeWorkloads
from rollout.backends.prometheus import PrometheusClient
from rollout.controller.loop import ActOutcome, Controller
from rollout.controller.metrics import ControllerMetrics
from rollout.controller.runners import ThreadRunner
from rollout.core.policy import RolloutPolicy, load_policy
from rollout.core.state import ControllerState
from rollout.settings import RolloutSettings
from service.common.clock import Clock, utc_now
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Session:
    """One leader's controller for one ModelRollout object (uid); rebuilt when the object is re-created."""

    uid: str
    controller: Controller
    stop: threading.Event
    closers: list[Callable[[], None]]

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()


@dataclass
class KubeObserver:
    """The controller's reconcile hooks on Kubernetes: the policy follows ``spec.policy``; after acting, the
    status summary follows the world (workload readiness, problems, observedGeneration)."""

    cache: RolloutCache
    writer: StatusWriter
    base_policy: RolloutPolicy
    _policy_generation: int = field(default=-1, init=False)

    def before_reconcile(self, controller: Controller) -> None:
        obj = self.cache.object()
        if obj is None or obj.generation == self._policy_generation:
            return
        self._policy_generation = obj.generation
        try:
            controller.policy = effective_policy(self.base_policy, obj.policy)
        except ValueError as exc:
            log_event(logger, "spec.policy invalid, keeping the previous policy", event="policy_invalid",
                      generation=obj.generation, error=str(exc)[:500])  # fmt: skip

    def after_reconcile(self, controller: Controller, outcome: ActOutcome) -> None:
        self.writer.problems = tuple(outcome.problems)
        self.writer.available = outcome.routed and outcome.converged
        self.writer.write()


class KubeRuntime:
    """The controller process on Kubernetes: caches, leader election, one :class:`Session` at a time."""

    def __init__(
        self,
        settings: RolloutSettings,
        api: KubeApi,
        registry: CollectorRegistry,
        *,
        clock: Clock = utc_now,
        model_registry: ModelSource | None = None,
        quality: QualityCheck | None = None,
    ) -> None:
        self.settings = settings
        self.cs = settings.controller
        self.ks = self.cs.kube
        self.api = api
        self.clock = clock
        self.identity = self.ks.identity or default_identity()
        self.cache = RolloutCache(api, self.cs)
        self.cache.on_rollout_change = self._rollout_changed
        self.metrics = ControllerMetrics(registry, self.cs.name, self.cs.reconcile_duration_buckets_s)
        self.leader = Gauge(
            "fraudwatch_rollout_controller_leader",
            "1 while this controller replica leads (holds the Lease) and reconciles.",
            ["rollout", "identity"],
            registry=registry,
        ).labels(self.cs.name, self.identity)
        self.base_policy = load_policy(self.cs.policy_file)
        self.model_registry = model_registry
        self.quality = quality
        self.halt = threading.Event()
        self.session: Session | None = None
        self.elector: LeaseElector | None = None
        if self.ks.leader_election:
            self.elector = LeaseElector(
                api, self.ks.namespace, self.ks.lease_name, self.identity, self.ks.lease_duration_s,
                self.ks.renew_deadline_s, self.ks.retry_period_s, on_stopped=self._lost,
            )  # fmt: skip
        self._waiting_logged = False

    # ---- lifecycle

    def stop(self) -> None:
        self.halt.set()
        self._interrupt()

    def _lost(self) -> None:
        self.leader.set(0)
        self.stop()

    def _interrupt(self) -> None:
        session = self.session
        if session is not None:
            session.stop.set()

    def _rollout_changed(self, kind: str, raw: Json) -> None:
        session = self.session
        if session is None:
            return
        obj = RolloutObject(raw)
        if kind == "DELETED" or obj.deleting or obj.uid != session.uid:
            session.stop.set()

    def run(self) -> int:
        """Reconcile until stopped; the exit code (``lost_leadership_exit_code`` when the Lease was lost)."""
        self.cache.start()
        try:
            if self.elector is not None:
                self.elector.start()
                log_event(logger, "standing by for the lease", event="leader_waiting", lease=self.ks.lease_name,
                          identity=self.identity)  # fmt: skip
                while not self.halt.is_set() and not self.elector.leading.wait(self.cs.tick_interval_s):
                    pass
                if self.halt.is_set():
                    return self._exit_code()
            self.leader.set(1)
            self.cache.wait_synced(self.ks.request_timeout_s)
            while not self.halt.is_set():
                self._step()
            return self._exit_code()
        finally:
            self.leader.set(0)
            if self.session is not None:
                self.session.close()
                self.session = None
            self.cache.stop()
            if self.elector is not None:
                self.elector.stop(release=not self.elector.lost.is_set())

    def _exit_code(self) -> int:
        lost = self.elector is not None and self.elector.lost.is_set()
        return self.ks.lost_leadership_exit_code if lost else 0

    def _step(self) -> None:
        """Bring the object into a state a session can run on (exists, has the finalizer, not deleting), run the
        session until something changes the object's identity or the loop stops."""
        obj = self.cache.object()
        if obj is None:
            if not self._waiting_logged:
                self._waiting_logged = True
                log_event(logger, "waiting for the ModelRollout", event="rollout_missing", name=self.cs.name,
                          namespace=self.ks.namespace)  # fmt: skip
            self.halt.wait(self.cs.tick_interval_s)
            return
        self._waiting_logged = False
        try:
            if obj.deleting:
                self.finalize(obj)
            elif FINALIZER not in obj.finalizers:
                self._patch_finalizers(obj, (*obj.finalizers, FINALIZER))
            else:
                self._run_session(obj)
                return
        except KubeError as exc:
            log_event(logger, "reconcile failed", event="reconcile_failed", error=str(exc))
        self.halt.wait(self.cs.tick_interval_s)

    def _patch_finalizers(self, obj: RolloutObject, finalizers: Sequence[str]) -> None:
        patch = {"metadata": {"finalizers": list(finalizers), "resourceVersion": obj.resource_version}}
        try:
            self.cache.rollout.put(self.api.merge_patch(rollout_path(obj.namespace, obj.name), patch))
        except KubeError as exc:
            if not exc.conflict:
                raise  # a conflict: the next step sees the newer object

    def finalize(self, obj: RolloutObject) -> None:
        """The object is being deleted: delete its workloads, then let it go (remove the finalizer)."""
        if FINALIZER not in obj.finalizers:
            return
        workloads = KubeWorkloads(self.api, self.cache, self.ks)
        deleted = workloads.delete_all()
        log_event(logger, "ModelRollout deleted: workloads removed", event="rollout_finalized", name=obj.name,
                  deleted=deleted)  # fmt: skip
        self._patch_finalizers(obj, [f for f in obj.finalizers if f != FINALIZER])

    # ---- sessions

    def _run_session(self, obj: RolloutObject) -> None:
        session = self.session
        if session is None or session.uid != obj.uid:
            if session is not None:
                session.close()
            session = self.session = self.build_session(obj)
        session.stop.clear()
        current = self.cache.object()
        if self.halt.is_set() or current is None or current.deleting or current.uid != session.uid:
            return  # changed between the check and the clear: the next step sees it
        session.controller.run(session.stop)
        current = self.cache.object()
        if current is None or current.uid != session.uid:
            session.close()
            self.session = None

    def build_session(self, obj: RolloutObject) -> Session:
        try:
            initial = effective_policy(self.base_policy, obj.policy)
        except ValueError:
            initial = self.base_policy  # KubeObserver reports the invalid policy at the first reconcile
        built: list[Controller] = []  # the parts below read the controller's state and policy once it exists

        def policy() -> RolloutPolicy:
            return built[0].policy if built else initial

        def state() -> ControllerState | None:
            return built[0].state if built else None

        writer = StatusWriter(self.api, self.cache, self.ks, policy, self.clock)
        writer.routing = routing_of(obj.status)
        prometheus = PrometheusClient(self.cs.prometheus_url)
        replicas = (
            RouterReplicas(self.api, self.ks, self.settings.router.admin_secret()) if self.ks.router_service else None
        )
        backend = Backend(
            workloads=KubeWorkloads(self.api, self.cache, self.ks),
            publisher=StatusRoutingPublisher(writer, replicas),
            metrics=prometheus,
            source=KubeModelSource(self.cache, state, lambda: policy().promotion.alias, self.model_registry),
            quality=self.quality if self.quality is not None else NoQuality(),
        )
        runner = ThreadRunner()
        background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        controller = Controller(
            settings=self.cs,
            policy=initial,
            backend=backend,
            metrics=self.metrics,
            store=StatusStateStore(writer),
            commands=SpecCommandSource(self.cache, lambda: built[0].state, self.clock),
            events=KubeEventSink(self.api, self.cache, self.ks, self.identity, self.clock),
            clock=self.clock,
            runner=runner,
            background=background,
            observer=KubeObserver(self.cache, writer, self.base_policy),
        )
        built.append(controller)
        closers: list[Callable[[], None]] = [runner.close, lambda: background.shutdown(wait=True), prometheus.close]
        if replicas is not None:
            closers.append(replicas.close)
        log_event(logger, "reconciling", event="session_started", name=obj.name, uid=obj.uid, identity=self.identity,
                  rollout_id=controller.state.rollout.rollout_id if controller.state.rollout else None)  # fmt: skip
        return Session(obj.uid, controller, threading.Event(), closers)


def model_registry_of(settings: RolloutSettings) -> tuple[ModelSource | None, QualityCheck | None]:
    """The MLflow registry as model source and the regression-set check, when ``controller.kube.use_registry``."""
    cs = settings.controller
    if not cs.kube.use_registry:
        return None, None
    require_registry_stack()
    from rollout.backends.registry import RegistryModelSource, RegressionSetQuality
    from service.settings import get_settings

    source = RegistryModelSource(get_settings())
    models_dir = cs.resolved_state_dir(settings.home) / "models"
    return source, RegressionSetQuality(source, cs.quality_set, models_dir)


def run_controller(settings: RolloutSettings, registry: CollectorRegistry, stop: threading.Event) -> int:
    """``python -m rollout.controller`` with ``backend: kube``: run until ``stop`` is set (or the Lease is lost)."""
    ks = settings.controller.kube
    api = KubeApi.connect(ks.kubeconfig, ks.context, ks.request_timeout_s)
    source, quality = model_registry_of(settings)
    runtime = KubeRuntime(settings, api, registry, model_registry=source, quality=quality)

    def relay() -> None:
        stop.wait()
        runtime.stop()

    watcher = threading.Thread(target=relay, name="stop-watch", daemon=True)
    watcher.start()
    log_event(logger, "controller started", event="controller_started", backend="kube", name=settings.controller.name,
              namespace=ks.namespace, identity=runtime.identity, leader_election=ks.leader_election,
              prometheus=settings.controller.prometheus_url)  # fmt: skip
    try:
        return runtime.run()
    finally:
        api.close()
