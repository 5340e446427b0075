"""The Kubernetes backend of the rollout controller: one ModelRollout is the desired state, its status the durable
state, and the model versions run as Deployments + Services the controller owns.

The reconcile loop is :class:`rollout.controller.loop.Controller`'s, unchanged; this module gives it

* :class:`StatusStateStore` — the controller's state in ``status.state``, written through the ``status`` subresource
  with the object's ``resourceVersion`` (409 Conflict → re-read, recompose, retry); the whole status is composed by
  :func:`~rollout.backends.kube.resource.compose_status` (summary fields, gates, conditions, history) on every write;
* :class:`SpecCommandSource` — ``spec.manualCommand`` (once per id), a new rollout when ``spec.candidate`` differs
  from the serving version, pause/resume following ``spec.paused``;
* :class:`KubeEventSink` — a Kubernetes Event per transition (deterministic names: recorded once, also across a
  restart) and per note;
* :class:`KubeWorkloads` — per version a Deployment and a Service from the chart's model-server templates, applied
  server-side, owned by the ModelRollout (garbage-collected with it); readiness from the Deployment's status;
* :class:`StatusRoutingPublisher` — the routing table in ``status.routing`` (+ ``routingGeneration``): the routers
  watch the object and apply it (rollout/router/table_sources.py);
* :class:`KubeModelSource` — version names from the object; aliases, bundles and the quality stage through the
  MLflow registry when ``use_registry``.

:class:`KubeRuntime` runs it: informers (watch + periodic re-list) keep a local copy of the ModelRollout, its
Deployments and Services and the templates ConfigMap, so a reconcile reads memory and writes only what changed; a
change wakes the loop at once (a ``revert`` is applied within one tick of its watch event). Only the holder of the
Lease acts (rollout/backends/kube/lease.py). A finalizer deletes the workloads before the object goes. A
controller killed at any point resumes from the status: the state is saved before acting, and acting again is
harmless (server-side apply of an unchanged manifest, a table already published, an Event that exists).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
from prometheus_client import CollectorRegistry, Gauge

from rollout.backends.base import (
    ModelSource,
    PublishedTable,
    PublishResult,
    QualityCheck,
    Readiness,
    RoutingError,
    RoutingSpec,
    VersionNotFoundError,
    WorkloadStatus,
    require_registry_stack,
)
from rollout.backends.kube.api import (
    Informer,
    Json,
    KubeApi,
    KubeError,
    core_path,
    deployments_path,
    label_selector,
    rollout_path,
)
from rollout.backends.kube.lease import LeaseElector
from rollout.backends.kube.resource import (
    COMPONENT_LABEL,
    FINALIZER,
    MODEL_SERVER,
    ROLLOUT_LABEL,
    SERVICE_NAME_LABEL,
    SPEC_HASH_ANNOTATION,
    VERSION_LABEL,
    ContractError,
    RolloutObject,
    RouterEndpoint,
    StatusInputs,
    Templates,
    annotation,
    build_workload,
    compose_status,
    deployment_readiness,
    effective_policy,
    event_name,
    event_reason,
    note_reason,
    pod_restarts,
    pod_trouble,
    router_endpoints,
    routing_of,
    service_port,
    serving_version,
    spec_commands,
    state_of,
    workload_name,
)
from rollout.backends.local.inbox import InboxCommand
from rollout.backends.local.workloads import held_table, published_table, same_routing, table_of
from rollout.backends.prometheus import PrometheusClient
from rollout.controller.loop import ActOutcome, Backend, Controller, ThreadRunner
from rollout.controller.metrics import ControllerMetrics
from rollout.core.events import transition_event
from rollout.core.machine import RolloutState, Transition
from rollout.core.policy import RolloutPolicy, load_policy
from rollout.core.routing import RoutingTable
from rollout.core.state import ControllerState
from rollout.settings import ControllerSettings, KubeBackendSettings, RolloutSettings
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

Clock = Callable[[], datetime]
MANUAL_HANDLE: Final[str] = "spec.manualCommand"
PUBLISHER: Final[str] = "status.routing"
_MAX_EVENT_MESSAGE: Final[int] = 1024


def utc_now() -> datetime:
    return datetime.now(UTC)


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Access:
    """One kind of API request a component makes: ``resource`` is ``group:plural[/subresource]`` (group empty for
    the core API); ``name`` says which object when the request names one (``rollout``, ``configmap``, ``lease``)."""

    verb: str
    resource: str
    name: str | None = None


#: Every request the controller's Kubernetes backend makes — what the chart's Role must grant (checked with
#: SubjectAccessReviews in tests/e2e/test_controller_kube.py; the controller runs there with that Role only).
REQUIRED_ACCESS: Final[tuple[Access, ...]] = (
    Access("get", "fraudwatch.io:modelrollouts", "rollout"),  # informer: the object …
    Access("watch", "fraudwatch.io:modelrollouts", "rollout"),  # … and its watch (fieldSelector metadata.name)
    Access("patch", "fraudwatch.io:modelrollouts", "rollout"),  # the finalizer
    Access("update", "fraudwatch.io:modelrollouts/status", "rollout"),  # the status, with resourceVersion
    # Not a request: the API server's check (OwnerReferencesPermissionEnforcement) of the owner references with
    # blockOwnerDeletion on every Deployment and Service the controller creates.
    Access("update", "fraudwatch.io:modelrollouts/finalizers", "rollout"),
    *(Access(v, "apps:deployments") for v in ("list", "watch", "create", "patch", "delete")),  # apply = patch
    *(Access(v, ":services") for v in ("list", "watch", "create", "patch", "delete")),
    *(Access(v, ":pods") for v in ("list", "watch")),  # read only: the model servers' restarts and crash loops
    Access("get", ":configmaps", "configmap"),  # the model-server templates
    Access("watch", ":configmaps", "configmap"),
    Access("create", ":events"),
    Access("list", "discovery.k8s.io:endpointslices"),  # the router replicas, whose tables confirm a scale-down
    Access("create", "coordination.k8s.io:leases"),
    Access("get", "coordination.k8s.io:leases", "lease"),
    Access("update", "coordination.k8s.io:leases", "lease"),
)
#: What the router's ModelRollout watch (rollout/router/table_sources.py) requests.
ROUTER_ACCESS: Final[tuple[Access, ...]] = (
    Access("get", "fraudwatch.io:modelrollouts", "rollout"),
    Access("watch", "fraudwatch.io:modelrollouts", "rollout"),
)


class StatusWriteError(OSError):
    """The ModelRollout's status could not be written (the controller treats it as a failed persist)."""


# --------------------------------------------------------------------------------------------------- the cache


class RolloutCache:
    """Informers of one rollout: the ModelRollout, its model-server Deployments and Services, the templates
    ConfigMap. ``changed`` is set on every change of any of them (the loop's wake-up)."""

    def __init__(self, api: KubeApi, settings: ControllerSettings) -> None:
        ks = settings.kube
        self.api = api
        self.name = settings.name
        self.namespace = ks.namespace
        self.changed = threading.Event()
        self.on_rollout_change: Callable[[str, Json], None] | None = None
        owned = (("labelSelector", label_selector({ROLLOUT_LABEL: self.name, COMPONENT_LABEL: MODEL_SERVER})),)
        common: dict[str, Any] = {
            "watch_timeout_s": ks.watch_timeout_s,
            "resync_interval_s": ks.resync_interval_s,
            "retry_backoff_s": ks.retry_backoff_s,
            "on_change": self._changed,
        }
        self.rollout = Informer(api, rollout_path(self.namespace), "modelrollout", name=self.name, **common)
        self.rollout.on_change = self._rollout_changed
        self.deployments = Informer(api, deployments_path(self.namespace), "deployments", query=owned, **common)
        self.services = Informer(api, core_path(self.namespace, "services"), "services", query=owned, **common)
        #: The model servers' pods (read only): container restarts and crash loops are the candidate's evidence.
        self.pods = Informer(api, core_path(self.namespace, "pods"), "pods", query=owned, **common)
        self.configmap = Informer(
            api, core_path(self.namespace, "configmaps"), "configmap", name=ks.model_server_configmap, **common
        )
        self._templates: tuple[str, Templates] | None = None

    @property
    def informers(self) -> tuple[Informer, ...]:
        return (self.rollout, self.deployments, self.services, self.pods, self.configmap)

    def start(self) -> None:
        for informer in self.informers:
            informer.start()

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()

    def wait_synced(self, timeout_s: float) -> bool:
        return all(i.wait_synced(timeout_s) for i in self.informers)

    def _changed(self, _kind: str, _obj: Json) -> None:
        self.changed.set()

    def _rollout_changed(self, kind: str, obj: Json) -> None:
        self.changed.set()
        if self.on_rollout_change is not None:
            self.on_rollout_change(kind, obj)

    def object(self) -> RolloutObject | None:
        raw = self.rollout.get(self.name)
        return RolloutObject(raw) if raw is not None else None

    def templates(self) -> Templates:
        """The parsed templates (parsed again only when the ConfigMap changes); :class:`ContractError` without."""
        configmap = self.configmap.get(self.configmap.name or "")
        if configmap is None:
            raise ContractError(f"ConfigMap {self.configmap.name} not found (the chart's model-server templates)")
        version = str(configmap["metadata"].get("resourceVersion", ""))
        if self._templates is None or self._templates[0] != version:
            self._templates = (version, Templates.from_configmap(configmap))
        return self._templates[1]


# --------------------------------------------------------------------------------------------------- the status


@dataclass
class StatusWriter:
    """Composes and writes the whole ``status`` (state, routing, summary) through the status subresource."""

    api: KubeApi
    cache: RolloutCache
    settings: KubeBackendSettings
    policy: Callable[[], RolloutPolicy]
    clock: Clock = utc_now
    state: ControllerState | None = None
    routing: RoutingTable | None = None
    problems: tuple[str, ...] = ()
    available: bool = False
    writes: int = field(default=0, init=False)
    conflicts: int = field(default=0, init=False)
    _sent: Json | None = field(default=None, init=False)
    _stored: Json | None = field(default=None, init=False)

    def compose(self, obj: RolloutObject) -> Json:
        inputs = StatusInputs(
            state=self.state,
            routing=self.routing,
            policy=self.policy(),
            now=self.clock(),
            kept_history=self.settings.kept_history,
            problems=self.problems,
            available=self.available,
        )
        return compose_status(obj, inputs)

    def write(self) -> bool:
        """Write the composed status when it differs from what was last written; True when it wrote. Conflicts
        (a newer ``resourceVersion``: someone edited the spec) are retried on the re-read object."""
        obj = self.cache.object()
        path = rollout_path(self.cache.namespace, self.cache.name, "status")
        for _ in range(self.settings.conflict_retries):
            if obj is None:
                raise StatusWriteError(f"ModelRollout {self.cache.name} not found")
            status = self.compose(obj)
            if status == self._sent and obj.status == self._stored:
                return False
            try:
                stored = self.api.replace(path, {**obj.raw, "status": status})
            except KubeError as exc:
                if not exc.conflict:
                    raise StatusWriteError(str(exc)) from exc
                self.conflicts += 1
                fresh = self._reread()
                obj = RolloutObject(fresh) if fresh is not None else None
                continue
            self.cache.rollout.put(stored)
            self._sent, self._stored = status, stored.get("status")
            self.writes += 1
            return True
        raise StatusWriteError(f"status of {self.cache.name}: {self.settings.conflict_retries} conflicts in a row")

    def _reread(self) -> Json | None:
        try:
            fresh = self.api.get(rollout_path(self.cache.namespace, self.cache.name))
        except KubeError as exc:
            raise StatusWriteError(str(exc)) from exc
        if fresh is not None:
            self.cache.rollout.put(fresh)
        return fresh


@dataclass
class StatusStateStore:
    """:class:`~rollout.controller.loop.StateStorage` in ``status.state``."""

    writer: StatusWriter

    def load(self) -> ControllerState | None:
        obj = self.writer.cache.object()
        state = state_of(obj.status) if obj is not None else None
        self.writer.state = state
        return state

    def save(self, state: ControllerState, /) -> None:
        previous, self.writer.state = self.writer.state, state
        try:
            self.writer.write()
        except OSError:
            self.writer.state = previous
            raise


@dataclass
class RouterReplicas:
    """The tables the router replicas hold, each read from the replica itself: the serving endpoints of the routers'
    control Service (its EndpointSlices, listed when asked) and ``GET /admin/routing`` on each one's control port
    with the admin token. A replica that cannot be read raises :class:`RoutingError` (what it holds is unknown)."""

    def __init__(self, api: KubeApi, settings: KubeBackendSettings, token: str | None) -> None:
        self.api = api
        self.settings = settings
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=settings.router_timeout_s, headers=headers, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def endpoints(self) -> list[RouterEndpoint]:
        ks = self.settings
        path = f"/apis/discovery.k8s.io/v1/namespaces/{ks.namespace}/endpointslices"
        query = (("labelSelector", label_selector({SERVICE_NAME_LABEL: ks.router_service})),)
        try:
            slices = self.api.list(path, query).get("items") or []
        except KubeError as exc:
            raise RoutingError(f"the router replicas of Service {ks.router_service} not listed: {exc}") from exc
        return router_endpoints(slices, ks.router_port_name)

    def read(self) -> list[PublishedTable]:
        tables = []
        for endpoint in self.endpoints():
            url = self.settings.router_urls.get(endpoint.name, endpoint.url)
            tables.append(published_table(f"router {endpoint.name}", held_table(self._http, url)))
        return tables


@dataclass
class StatusRoutingPublisher:
    """:class:`~rollout.backends.base.RoutingPublisher`: ``status.routing``, one generation more per change; read back
    with every router replica's own table (``replicas``: a version is scaled down only once they all dropped it)."""

    writer: StatusWriter
    replicas: RouterReplicas | None = None

    def publish(self, spec: RoutingSpec, urls: Mapping[str, str]) -> PublishResult:
        held = self.writer.routing
        obj = self.writer.cache.object()
        salt = obj.routing_salt if obj is not None else None
        try:
            desired = RoutingTable.model_validate({**table_of(spec, urls, 0).model_dump(), "salt": salt})
        except (KeyError, ValueError) as exc:
            raise RoutingError(f"routing table of {spec}: {exc}") from exc
        if held is not None and same_routing(held, desired):
            return PublishResult("unchanged", held.generation, {PUBLISHER: "unchanged"})
        # A new object's first table starts at the clock (milliseconds), not at 1: routers that held the table of a
        # deleted and re-created ModelRollout of the same name would refuse a lower generation as stale.
        generation = held.generation + 1 if held is not None else int(self.writer.clock().timestamp() * 1000)
        table = desired.model_copy(update={"generation": generation})
        self.writer.routing = table
        try:
            self.writer.write()
        except OSError as exc:
            self.writer.routing = held
            raise RoutingError(f"status.routing not written: {exc}") from exc
        log_event(logger, "routing table published", event="routing_published", router=PUBLISHER,
                  generation=generation, stage=table.stage, stable=table.stable.version,
                  candidate=table.candidate.version if table.candidate else None,
                  candidate_weight=table.candidate_weight, shadow=[e.version for e in table.shadow])  # fmt: skip
        return PublishResult("applied", generation, {PUBLISHER: "applied"})

    def read(self) -> Sequence[PublishedTable]:
        own = published_table(PUBLISHER, self.writer.routing)
        return [own, *(self.replicas.read() if self.replicas is not None else ())]


# --------------------------------------------------------------------------------------------------- commands


@dataclass
class SpecCommandSource:
    """:class:`~rollout.controller.loop.CommandSource`: what the ModelRollout's spec asks for."""

    cache: RolloutCache
    state: Callable[[], ControllerState]
    clock: Clock = utc_now
    _discarded: set[str] = field(default_factory=set, init=False)

    def pending(self) -> Sequence[tuple[Any, InboxCommand | str]]:
        self.cache.changed.clear()  # what changed until now is seen by this reconcile
        obj = self.cache.object()
        if obj is None or obj.deleting:
            return []
        found: list[tuple[Any, InboxCommand | str]] = []
        for command in spec_commands(obj, self.state(), self.clock()):
            if isinstance(command, InboxCommand):
                found.append((command.id, command))
                continue
            manual = obj.manual_command or {}
            handle = f"{MANUAL_HANDLE} {manual.get('id')!r}"
            if handle not in self._discarded:
                found.append((handle, command))
        return found

    def done(self, handle: Any, /) -> None:
        if str(handle).startswith(MANUAL_HANDLE):
            self._discarded.add(str(handle))  # an invalid command: reported once, not on every reconcile

    def has_pending(self) -> bool:
        return self.cache.changed.is_set()


# --------------------------------------------------------------------------------------------------- events


@dataclass
class KubeEventSink:
    """:class:`~rollout.controller.loop.EventSink`: Kubernetes Events on the ModelRollout (``kubectl describe mro``)."""

    api: KubeApi
    cache: RolloutCache
    settings: KubeBackendSettings
    identity: str
    clock: Clock = utc_now
    _recorded: dict[str, int] = field(default_factory=dict, init=False)
    created: int = field(default=0, init=False)

    def sync(self, rollout: RolloutState, /) -> list[Transition]:
        """Create the Events of the rollout's transitions this process has not recorded; return those it created
        (an Event that exists already — recorded before a restart — is not returned again)."""
        start = self._recorded.get(rollout.rollout_id, 0)
        new: list[Transition] = []
        for seq in range(start, len(rollout.history)):
            transition = rollout.history[seq]
            reason, kind = event_reason(transition)
            name = event_name(self.cache.name, rollout.rollout_id, str(seq))
            message = f"{transition.from_phase}/{transition.from_stage} → {transition.to_phase}/{transition.to_stage}: "
            message += transition.reason + _gate_summary(transition)
            created = self._create(name, reason, kind, message, transition.at)
            if created is None:
                break  # the API refused or failed: retried at the next sync
            self._recorded[rollout.rollout_id] = seq + 1
            if created:
                new.append(transition)
                _log_transition(rollout, seq, transition)
        return new

    def note(self, at: datetime, rollout_id: str | None, reason: str, **fields: object) -> None:
        name = event_name(self.cache.name, "note", uuid.uuid4().hex[:12])
        detail = ", ".join(f"{k}={v}" for k, v in fields.items())
        self._create(name, note_reason(reason), "Normal", reason + (f" ({detail})" if detail else ""), at)
        log_event(logger, reason, logging.INFO, event="rollout_note", rollout_id=rollout_id, **fields)

    def _create(self, name: str, reason: str, kind: str, message: str, at: datetime) -> bool | None:
        """True when created, False when it existed, None when it could not be created."""
        obj = self.cache.object()
        if obj is None:
            return None
        stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": obj.namespace},
            "involvedObject": obj.involved_object(),
            "reason": reason,
            "message": message[:_MAX_EVENT_MESSAGE],
            "type": kind,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.settings.event_component},
            "reportingComponent": self.settings.event_component,
            "reportingInstance": self.identity,
        }
        try:
            self.api.create(core_path(obj.namespace, "events"), body)
        except KubeError as exc:
            if exc.conflict:
                return False
            log_event(logger, "event not recorded", event="kube_event_failed", reason=reason, error=str(exc))
            return None
        self.created += 1
        return True


def _gate_summary(transition: Transition) -> str:
    parts = []
    for gate in transition.gates:
        value = gate.bound if gate.bound is not None else gate.candidate_value
        shown = f"={value:.4g}" if value is not None else ""
        parts.append(f"{gate.name}{shown} {gate.status.value}")
    return f" [{', '.join(parts)}]" if parts else ""


def _log_transition(rollout: RolloutState, seq: int, transition: Transition) -> None:
    event = transition_event(rollout, seq, transition)
    level = logging.WARNING if event["to_phase"] in ("RolledBack", "Aborted") else logging.INFO
    log_event(logger, f"rollout {event['to_phase']} at {event['to_stage']}: {event['reason']}", level,
              **{k: v for k, v in event.items() if k != "kind"}, event="rollout_transition")  # fmt: skip


# --------------------------------------------------------------------------------------------------- workloads


@dataclass
class KubeWorkloads:
    """:class:`~rollout.backends.base.Workloads`: a Deployment + Service per version, owned by the ModelRollout."""

    api: KubeApi
    cache: RolloutCache
    settings: KubeBackendSettings
    applied: int = field(default=0, init=False)
    #: Per version, the highest restart count seen of each of its pods (by uid): the count survives a pod being
    #: replaced (a deleted crash-looping pod's restarts still count) and a kubelet that reports less later.
    _restarts_seen: dict[str, dict[str, int]] = field(default_factory=dict, init=False)

    def ensure_running(self, version: str) -> WorkloadStatus:
        obj = self.cache.object()
        if obj is None:
            return WorkloadStatus(version, Readiness.FAILED, detail="the ModelRollout is gone")
        spec = obj.known_versions().get(version)
        if spec is None:
            return WorkloadStatus(version, Readiness.FAILED, detail=f"the ModelRollout names no version {version!r}")
        try:
            deployment, service = build_workload(self.cache.templates(), obj, spec)
        except ContractError as exc:
            return WorkloadStatus(version, Readiness.FAILED, detail=str(exc))
        self._apply(deployment, self.cache.deployments, deployments_path(obj.namespace))
        self._apply(service, self.cache.services, core_path(obj.namespace, "services"))
        return self.status(version)

    def _apply(self, manifest: Json, informer: Informer, collection: str) -> None:
        name = str(manifest["metadata"]["name"])
        held = informer.get(name)
        wanted = manifest["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if held is not None and annotation(held, SPEC_HASH_ANNOTATION) == wanted and not _deleting(held):
            return
        informer.put(self.api.apply(f"{collection}/{name}", manifest, self.settings.field_manager))
        self.applied += 1
        log_event(logger, "workload applied", event="workload_applied", kind=manifest["kind"], name=name,
                  version=manifest["metadata"]["labels"].get(VERSION_LABEL))  # fmt: skip

    def status(self, version: str) -> WorkloadStatus:
        name = workload_name(self.cache.name, version)
        deployment = self.cache.deployments.get(name)
        if deployment is None:
            self._restarts_seen.pop(version, None)
            return WorkloadStatus(version, Readiness.STOPPED)
        readiness, detail = deployment_readiness(deployment)
        pods = [p for p in self.cache.pods.items() if (p.get("metadata", {}).get("labels") or {}).get(VERSION_LABEL)
                == version]  # fmt: skip
        seen = self._restarts_seen.setdefault(version, {})
        for uid, count in pod_restarts(pods).items():
            seen[uid] = max(seen.get(uid, 0), count)
        trouble = pod_trouble(pods)
        detail = f"{detail}; {trouble}" if trouble else detail
        return WorkloadStatus(version, readiness, self.url(version), detail, restarts=sum(seen.values()))

    def url(self, version: str) -> str | None:
        override = self.settings.version_urls.get(version)
        if override is not None:
            return override
        service = self.cache.services.get(workload_name(self.cache.name, version))
        if service is None:
            return None
        return self.settings.service_url_template.format(
            service=service["metadata"]["name"], namespace=self.cache.namespace, port=service_port(service)
        )

    def scale_down(self, version: str) -> bool:
        name = workload_name(self.cache.name, version)
        removed = self.api.delete(deployments_path(self.cache.namespace, name))
        removed = self.api.delete(core_path(self.cache.namespace, "services", name)) or removed
        self.cache.deployments.forget(name)
        self.cache.services.forget(name)
        if removed:
            log_event(logger, "workload deleted", event="workload_scaled_down", version=version, name=name)
        return removed

    def running(self) -> tuple[str, ...]:
        versions = []
        for deployment in self.cache.deployments.items():
            labels = deployment["metadata"].get("labels", {})
            if labels.get(ROLLOUT_LABEL) == self.cache.name and not _deleting(deployment):
                versions.append(str(labels[VERSION_LABEL]))
        return tuple(sorted(versions))

    def delete_all(self) -> int:
        """Delete every workload of the rollout (the finalizer); the number of objects deleted."""
        deleted = 0
        for informer, path in (
            (self.cache.deployments, deployments_path(self.cache.namespace)),
            (self.cache.services, core_path(self.cache.namespace, "services")),
        ):
            for obj in informer.items():
                name = str(obj["metadata"]["name"])
                if self.api.delete(f"{path}/{name}"):
                    deleted += 1
                informer.forget(name)
        return deleted


def _deleting(obj: Json) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


# --------------------------------------------------------------------------------------------------- versions


@dataclass
class KubeModelSource:
    """:class:`~rollout.backends.base.ModelSource`: the versions the ModelRollout names; the serving alias is its
    serving version. Other aliases and bundles come from the model registry when one is configured."""

    cache: RolloutCache
    state: Callable[[], ControllerState | None]
    serving_alias: Callable[[], str]
    registry: ModelSource | None = None

    def _obj(self) -> RolloutObject:
        obj = self.cache.object()
        if obj is None:
            raise VersionNotFoundError(f"ModelRollout {self.cache.name} not found")
        return obj

    def resolve(self, ref: str) -> str:
        if ref in self._obj().known_versions():
            return ref
        if self.registry is not None:
            return self.registry.resolve(ref)
        raise VersionNotFoundError(f"the ModelRollout names no version {ref!r}")

    def alias_target(self, alias: str) -> str | None:
        if alias == self.serving_alias():
            obj = self._obj()
            return serving_version(self.state(), obj.seed_stable)
        return self.registry.alias_target(alias) if self.registry is not None else None

    def fetch(self, version: str, dest: Path) -> Path:
        if self.registry is None:
            raise VersionNotFoundError(
                f"no model registry configured to fetch {version} (controller.kube.use_registry)"
            )
        return self.registry.fetch(version, dest)

    def bundle_digest(self, version: str) -> str | None:
        return self.registry.bundle_digest(version) if self.registry is not None else None

    def ensure_alias(self, alias: str, version: str, reason: str) -> bool:
        return self.registry.ensure_alias(alias, version, reason) if self.registry is not None else False

    def clear_alias(self, alias: str, version: str, reason: str) -> bool:
        return self.registry.clear_alias(alias, version, reason) if self.registry is not None else False


class NoQuality:
    """The quality stage without a registry: every measurement is an error (the policy should not have the gate)."""

    def evaluate(self, version: str) -> Mapping[str, float]:
        raise RuntimeError(f"no regression set for {version}: set controller.kube.use_registry and quality_set")


# --------------------------------------------------------------------------------------------------- the runtime


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
