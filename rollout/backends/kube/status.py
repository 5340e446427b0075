"""The ModelRollout's status as the controller's store and routing channel.

* :class:`StatusStateStore` — the controller's state in ``status.state``, written through the ``status`` subresource
  with the object's ``resourceVersion`` (409 Conflict → re-read, recompose, retry); the whole status is composed by
  :func:`~rollout.backends.kube.resource.compose_status` (summary fields, gates, conditions, history) on every write;
* :class:`StatusRoutingPublisher` — the routing table in ``status.routing`` (+ ``routingGeneration``): the routers
  watch the object and apply it (:mod:`rollout.router.table_sources`); :class:`RouterReplicas` reads back what each
  router replica holds (the control Service's EndpointSlices), so a version is scaled down only once none holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import httpx

from rollout.backends.base import (
    PublishedTable,
    PublishResult,
    RoutingError,
    RoutingSpec,
)
from rollout.backends.kube.api import (
    Json,
    KubeApi,
    KubeError,
    label_selector,
    rollout_path,
)
from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.resource import (
    SERVICE_NAME_LABEL,
    RolloutObject,
    RouterEndpoint,
    StatusInputs,
    compose_status,
    router_endpoints,
    state_of,
)
from rollout.backends.tables import held_table, published_table, same_routing, table_of
from rollout.core.policy import RolloutPolicy
from rollout.core.routing import RoutingTable
from rollout.core.state import ControllerState
from rollout.settings import KubeBackendSettings
from service.common.clock import Clock, utc_now
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

PUBLISHER: Final[str] = "status.routing"


class StatusWriteError(OSError):
    """The ModelRollout's status could not be written (the controller treats it as a failed persist)."""


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
