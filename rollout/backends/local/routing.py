"""The local backend's :class:`~rollout.backends.base.RoutingPublisher`: each router's admin endpoint.

Publishes the table with ``PUT /admin/routing`` (bearer token) to every router and reads it back with ``GET``.
Chosen over the file source because the router applies a PUT before it answers (a change is in force within
one round trip, a few milliseconds, instead of up to one poll interval) and the answer confirms it. The
generation is one above the highest the routers hold (a restarted controller continues the sequence; a router
refuses an older one). A table the routers already hold is not sent again; it is read back every
``routing_resync_interval_s`` so a restarted router gets it again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import httpx

from rollout.backends.base import PublishedTable, PublishOutcome, PublishResult, RoutingError, RoutingSpec
from rollout.backends.tables import ADMIN_PATH, held_table, published_table, same_routing, table_of
from rollout.core.routing import RoutingTable
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

_CONFLICT: Final[int] = 409


@dataclass
class AdminRoutingPublisher:
    """:class:`~rollout.backends.base.RoutingPublisher` through each router's ``/admin/routing``."""

    router_urls: Sequence[str]
    token: str | None
    timeout_s: float
    resync_interval_s: float
    _http: httpx.Client = field(init=False, repr=False)
    _generation: int = field(default=0, init=False)
    _held: RoutingTable | None = field(default=None, init=False)
    _verified_at: float = field(default=-1e18, init=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(timeout=self.timeout_s, headers=headers, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def publish(self, spec: RoutingSpec, urls: Mapping[str, str]) -> PublishResult:
        desired = table_of(spec, urls, self._generation)
        fresh = time.monotonic() - self._verified_at < self.resync_interval_s
        if fresh and self._held is not None and same_routing(self._held, desired):
            return PublishResult("unchanged", self._generation)
        outcomes = {router: self._publish_to(router, desired) for router in self.router_urls}
        self._held = desired
        self._verified_at = time.monotonic()
        outcome: PublishOutcome = "applied" if "applied" in outcomes.values() else "unchanged"
        return PublishResult(outcome, self._generation, outcomes)

    def _publish_to(self, router: str, desired: RoutingTable, retried: bool = False) -> PublishOutcome:
        current = self._get(router)
        if current is not None:
            self._generation = max(self._generation, current.generation)
            if same_routing(current, desired):
                return "unchanged"
        self._generation += 1
        table = desired.model_copy(update={"generation": self._generation})
        try:
            response = self._http.put(router + ADMIN_PATH, content=table.model_dump_json())
        except httpx.HTTPError as exc:
            raise RoutingError(f"router {router} unreachable: {exc}") from exc
        if response.status_code == _CONFLICT and not retried:
            return self._publish_to(router, desired, retried=True)
        if response.status_code != httpx.codes.OK:
            raise RoutingError(f"router {router} refused the table ({response.status_code}): {response.text[:300]}")
        log_event(logger, "routing table published", event="routing_published", router=router,
                  generation=self._generation, stage=table.stage, stable=table.stable.version,
                  candidate=table.candidate.version if table.candidate else None,
                  candidate_weight=table.candidate_weight, shadow=[e.version for e in table.shadow])  # fmt: skip
        return "applied"

    def _get(self, router: str) -> RoutingTable | None:
        return held_table(self._http, router)

    def read(self) -> list[PublishedTable]:
        return [published_table(router, self._get(router)) for router in self.router_urls]
