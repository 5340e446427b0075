"""Calls from the router to model services: one pooled keep-alive ``httpx.AsyncClient`` per upstream URL.

A call returns an :class:`Answer` (a 2xx whose JSON body carries ``score``, ``prediction``, ``threshold`` and
``model_version``) or a :class:`Failure` with a reason; it never raises for an upstream's fault. Every call is
counted and timed in :class:`~rollout.metrics.RouterMetrics` under the endpoint's table version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import httpx

from rollout.metrics import Outcome, RouterMetrics
from rollout.routing import Role, VersionEndpoint
from rollout.settings import RouterSettings
from service.logging import get_logger, log_event

logger = get_logger("router.upstream")

FailureReason = Literal["timeout", "connect", "transport", "status_4xx", "status_5xx", "invalid_response"]
_OUTCOME_OF: Final[dict[FailureReason, Outcome]] = {
    "timeout": "timeout",
    "connect": "error",
    "transport": "error",
    "status_4xx": "4xx",
    "status_5xx": "5xx",
    "invalid_response": "error",
}
_CLIENT_ERROR: Final[int] = 400
_SERVER_ERROR: Final[int] = 500
_SUCCESS: Final[int] = 200
_OBJECT_START: Final[bytes] = b"{"
_OBJECT_END: Final[bytes] = b"}"


@dataclass(frozen=True, slots=True)
class Answer:
    """A model service's successful answer; ``body`` is its JSON object exactly as received (stripped)."""

    body: bytes
    reported_version: str
    score: float
    prediction: int
    threshold: float


@dataclass(frozen=True, slots=True)
class Failure:
    reason: FailureReason
    status: int | None = None
    body: bytes = b""
    detail: str = ""


def parse_answer(body: bytes) -> Answer | None:
    """The answer in a scoring response body, or None when it is not a complete RefundResponse-like object."""
    stripped = body.strip()
    if not (stripped.startswith(_OBJECT_START) and stripped.endswith(_OBJECT_END)):
        return None
    try:
        data = json.loads(stripped)
        score = float(data["score"])
        prediction = int(data["prediction"])
        threshold = float(data["threshold"])
        version = str(data["model_version"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (math.isfinite(score) and math.isfinite(threshold)) or prediction not in (0, 1):
        return None
    return Answer(body=stripped, reported_version=version, score=score, prediction=prediction, threshold=threshold)


class Upstreams:
    """The clients of the upstream URLs in the routing table; a URL that leaves the table is closed after a grace."""

    def __init__(self, settings: RouterSettings) -> None:
        self._settings = settings
        self._limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
            keepalive_expiry=settings.keepalive_expiry_s,
        )
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def client(self, url: str) -> httpx.AsyncClient:
        client = self._clients.get(url)
        if client is None:
            client = self._new_client(url)
            self._clients[url] = client
        return client

    def _new_client(self, url: str) -> httpx.AsyncClient:
        # trust_env=False: no proxy from the environment may sit between the router and a loopback service.
        return httpx.AsyncClient(
            base_url=url,
            limits=self._limits,
            http1=True,
            http2=False,
            trust_env=False,
            follow_redirects=False,
        )

    def keep_only(self, urls: Iterable[str]) -> None:
        """Ensure a client per URL in ``urls``; retire the others (closed after ``retired_client_grace_s``)."""
        wanted = set(urls)
        for url in wanted:
            self.client(url)
        for url in [u for u in self._clients if u not in wanted]:
            client = self._clients.pop(url)
            task = asyncio.get_running_loop().create_task(self._close_later(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_later(self, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(self._settings.retired_client_grace_s)
        await client.aclose()

    async def aclose(self) -> None:
        for task in list(self._closing):
            task.cancel()
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


class Caller:
    """Makes one scoring call and accounts for it (counter, latency, error reason)."""

    def __init__(self, settings: RouterSettings, upstreams: Upstreams, metrics: RouterMetrics) -> None:
        self._path = settings.predict_path
        self._upstreams = upstreams
        self._metrics = metrics
        self._connect_timeout_s = settings.connect_timeout_s

    def timeout_for(self, budget_s: float) -> httpx.Timeout:
        return httpx.Timeout(budget_s, connect=min(self._connect_timeout_s, budget_s))

    async def call(
        self,
        endpoint: VersionEndpoint,
        role: Role,
        stage: str,
        body: bytes,
        headers: Mapping[str, str],
        budget_s: float,
        timeout: httpx.Timeout,
    ) -> Answer | Failure:
        client = self._upstreams.client(endpoint.url)
        started = time.perf_counter()
        result = await post_json(client, self._path, body, headers, budget_s, timeout)
        elapsed = time.perf_counter() - started
        if isinstance(result, Answer):
            self._metrics.observe_call(endpoint.version, role, stage, "2xx", elapsed)
        else:
            self._metrics.observe_call(endpoint.version, role, stage, _OUTCOME_OF[result.reason], elapsed)
            self._metrics.upstream_errors(endpoint.version, role, result.reason).inc()
            log_event(
                logger,
                "upstream call failed",
                logging.DEBUG,
                event="upstream_failure",
                model_version=endpoint.version,
                role=role,
                reason=result.reason,
                status=result.status,
                detail=result.detail,
            )
        return result


async def post_json(
    client: httpx.AsyncClient,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    budget_s: float,
    timeout: httpx.Timeout,
) -> Answer | Failure:
    """POST ``body`` within ``budget_s`` overall; classify what came back."""
    try:
        async with asyncio.timeout(budget_s):
            response = await client.post(path, content=body, headers=headers, timeout=timeout)
    except (TimeoutError, httpx.TimeoutException) as exc:
        return Failure("timeout", detail=type(exc).__name__)
    except httpx.ConnectError as exc:
        return Failure("connect", detail=str(exc))
    except httpx.HTTPError as exc:
        return Failure("transport", detail=f"{type(exc).__name__}: {exc}")
    status = response.status_code
    if status >= _SERVER_ERROR:
        return Failure("status_5xx", status=status, body=response.content)
    if status >= _CLIENT_ERROR:
        return Failure("status_4xx", status=status, body=response.content)
    if status != _SUCCESS:
        return Failure("invalid_response", status=status, body=response.content, detail="unexpected status")
    answer = parse_answer(response.content)
    if answer is None:
        return Failure("invalid_response", status=status, body=response.content, detail="not a scoring answer")
    return answer
