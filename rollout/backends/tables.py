"""The routing table as the publishers exchange it with the routers: a :class:`~rollout.backends.base.RoutingSpec` and
its URLs as a table and back, and the table a router holds (``GET /admin/routing`` on its control port)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import httpx

from rollout.backends.base import PublishedTable, RoutingError, RoutingSpec
from rollout.core.routing import RoutingTable, VersionEndpoint

ADMIN_PATH: Final[str] = "/admin/routing"


_HTTP_OK: Final[int] = 200


_NOT_FOUND: Final[int] = 404


def table_of(spec: RoutingSpec, urls: Mapping[str, str], generation: int) -> RoutingTable:
    """The routing table of ``spec`` with its endpoints' URLs (``KeyError`` when a version has no URL)."""

    def endpoint(version: str) -> VersionEndpoint:
        return VersionEndpoint(version=version, url=urls[version])

    return RoutingTable(
        generation=generation,
        stage=spec.stage,
        stable=endpoint(spec.stable),
        candidate=endpoint(spec.candidate) if spec.candidate is not None else None,
        candidate_weight=float(spec.candidate_weight),
        shadow=tuple(endpoint(v) for v in spec.shadow),
    )


def spec_of(table: RoutingTable) -> RoutingSpec:
    return RoutingSpec(
        stage=table.stage,
        stable=table.stable.version,
        candidate=table.candidate.version if table.candidate is not None else None,
        candidate_weight=round(table.candidate_weight),
        shadow=tuple(e.version for e in table.shadow),
    )


def same_routing(a: RoutingTable, b: RoutingTable) -> bool:
    """True when two tables route identically (everything but the generation is equal)."""
    return a.model_dump(exclude={"generation"}) == b.model_dump(exclude={"generation"})


def held_table(client: httpx.Client, router: str) -> RoutingTable | None:
    """The table a router holds (``GET /admin/routing`` with the client's bearer token), None when it holds none;
    :class:`RoutingError` when it cannot be read."""
    try:
        response = client.get(router + ADMIN_PATH)
    except httpx.HTTPError as exc:
        raise RoutingError(f"router {router} unreachable: {exc}") from exc
    if response.status_code == _NOT_FOUND:
        return None
    if response.status_code != _HTTP_OK:
        raise RoutingError(f"router {router} answered {response.status_code}: {response.text[:300]}")
    try:
        body: dict[str, Any] = response.json()
        return RoutingTable.model_validate(body["table"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RoutingError(f"router {router} answered an unreadable table: {exc}") from exc


def published_table(router: str, table: RoutingTable | None) -> PublishedTable:
    """A held table as the controller compares it (None: the router holds no table)."""
    if table is None:
        return PublishedTable(router, None, 0)
    return PublishedTable(router, spec_of(table), table.generation, {e.version: e.url for e in table.endpoints()})
