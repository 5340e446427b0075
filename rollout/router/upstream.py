"""Calls from the router to model services: one pooled keep-alive client per upstream URL.

The client is ``aiohttp.ClientSession`` by default; ``FW_ROLLOUT_ROUTER__UPSTREAM_CLIENT=httpx`` selects
``httpx.AsyncClient`` instead (same pooling, budgets and failure classes; about twice the CPU per call — see the
router benchmark, which measures both in the same run).

A call returns an :class:`Answer` (a 2xx whose JSON body carries ``score``, ``prediction``, ``threshold`` and
``model_version``) or a :class:`Failure` with a reason; it never raises for an upstream's fault. Every call is
counted and timed in :class:`~rollout.router.metrics.RouterMetrics` under the endpoint's table version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import aiohttp
import httpx

from rollout.core.routing import Role, VersionEndpoint
from rollout.router.metrics import Outcome, RouterMetrics
from rollout.settings import RouterSettings
from service.common.logging import CORRELATION_HEADER, get_logger, log_event, new_correlation_id

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
#: A connection not established within ``connect_timeout_s``: a connect failure (the upstream's accept queue is full or
#: it is gone), not a slow answer — counted under reason="connect", never as a timeout.
CONNECT_TIMEOUT_DETAIL: Final[str] = "connect timeout"
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
    except ValueError:
        return None
    return answer_from(data, stripped)


def answer_from(data: object, body: bytes) -> Answer | None:
    """``data`` (a decoded RefundResponse-like object) as an :class:`Answer` carrying ``body``, or None."""
    if not isinstance(data, dict):
        return None
    try:
        score = float(data["score"])
        prediction = int(data["prediction"])
        threshold = float(data["threshold"])
        version = str(data["model_version"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (math.isfinite(score) and math.isfinite(threshold)) or prediction not in (0, 1):
        return None
    return Answer(body=body, reported_version=version, score=score, prediction=prediction, threshold=threshold)


class Transport(Protocol):
    """A pooled, keep-alive HTTP/1.1 client of one upstream base URL."""

    async def post(self, path: str, body: bytes, headers: Mapping[str, str], budget_s: float) -> Answer | Failure:
        """POST ``body`` within ``budget_s`` overall; classify what came back. Never raises for the upstream."""
        ...

    async def post_raw(
        self, path: str, body: bytes, headers: Mapping[str, str], budget_s: float
    ) -> tuple[int, bytes] | Failure:
        """POST ``body`` within ``budget_s`` overall: (status, content), or the transport failure."""
        ...

    async def status_of(self, path: str, budget_s: float) -> int | None:
        """The status of a GET (None when the upstream cannot be reached in time)."""
        ...

    async def aclose(self) -> None: ...


class HttpxTransport:
    """``httpx.AsyncClient`` (``upstream_client = "httpx"``): one per upstream, pooled, keep-alive, HTTP/1.1, no
    proxy from env."""

    def __init__(self, url: str, settings: RouterSettings, ssl_context: ssl.SSLContext) -> None:
        self._connect_timeout_s = settings.connect_timeout_s
        self._timeouts: dict[float, httpx.Timeout] = {}
        self._client = httpx.AsyncClient(
            base_url=url,
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_keepalive_connections,
                keepalive_expiry=settings.keepalive_expiry_s,
            ),
            http1=True,
            http2=False,
            trust_env=False,
            follow_redirects=False,
            verify=ssl_context,
        )

    def _timeout(self, budget_s: float) -> httpx.Timeout:
        timeout = self._timeouts.get(budget_s)
        if timeout is None:
            timeout = httpx.Timeout(budget_s, connect=min(self._connect_timeout_s, budget_s))
            self._timeouts[budget_s] = timeout
        return timeout

    async def post(self, path: str, body: bytes, headers: Mapping[str, str], budget_s: float) -> Answer | Failure:
        return classify_raw(await self.post_raw(path, body, headers, budget_s))

    async def post_raw(
        self, path: str, body: bytes, headers: Mapping[str, str], budget_s: float
    ) -> tuple[int, bytes] | Failure:
        try:
            async with asyncio.timeout(budget_s):
                response = await self._client.post(path, content=body, headers=headers, timeout=self._timeout(budget_s))
        except httpx.ConnectTimeout:
            return Failure("connect", detail=CONNECT_TIMEOUT_DETAIL)
        except (TimeoutError, httpx.TimeoutException) as exc:
            return Failure("timeout", detail=type(exc).__name__)
        except httpx.ConnectError as exc:
            return Failure("connect", detail=str(exc))
        except httpx.HTTPError as exc:
            return Failure("transport", detail=f"{type(exc).__name__}: {exc}")
        return response.status_code, response.content

    async def status_of(self, path: str, budget_s: float) -> int | None:
        try:
            async with asyncio.timeout(budget_s):
                response = await self._client.get(path, timeout=self._timeout(budget_s))
        except (TimeoutError, httpx.HTTPError):
            return None
        return response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpTransport:
    """``aiohttp.ClientSession`` (the default, ``upstream_client = "aiohttp"``): the same pooling and budgets, with
    C-accelerated HTTP parsing; measured side by side with httpx in benchmarks/router_benchmark.py."""

    def __init__(self, url: str, settings: RouterSettings, ssl_context: ssl.SSLContext) -> None:
        self._connect_timeout_s = settings.connect_timeout_s
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            limit_per_host=settings.max_connections,
            keepalive_timeout=settings.keepalive_expiry_s,
            ssl=ssl_context,
        )
        self._session = aiohttp.ClientSession(
            base_url=url, connector=connector, trust_env=False, auto_decompress=False, raise_for_status=False
        )

    def _timeout(self, budget_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=budget_s, sock_connect=min(self._connect_timeout_s, budget_s))

    async def post(self, path: str, body: bytes, headers: Mapping[str, str], budget_s: float) -> Answer | Failure:
        return classify_raw(await self.post_raw(path, body, headers, budget_s))

    async def post_raw(
        self, path: str, body: bytes, headers: Mapping[str, str], budget_s: float
    ) -> tuple[int, bytes] | Failure:
        try:
            async with asyncio.timeout(budget_s):
                async with self._session.post(
                    path, data=body, headers=headers, timeout=self._timeout(budget_s), allow_redirects=False
                ) as response:
                    content = await response.read()
                    status = response.status
        except aiohttp.ConnectionTimeoutError:
            return Failure("connect", detail=CONNECT_TIMEOUT_DETAIL)
        except TimeoutError as exc:
            return Failure("timeout", detail=type(exc).__name__)
        except aiohttp.ClientConnectorError as exc:
            return Failure("connect", detail=str(exc))
        except aiohttp.ClientError as exc:
            return Failure("transport", detail=f"{type(exc).__name__}: {exc}")
        return status, content

    async def status_of(self, path: str, budget_s: float) -> int | None:
        try:
            async with asyncio.timeout(budget_s), self._session.get(path, timeout=self._timeout(budget_s)) as response:
                await response.read()
                return response.status
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def aclose(self) -> None:
        await self._session.close()


def status_failure(status: int, content: bytes) -> Failure | None:
    """The failure a non-200 status means (None for 200)."""
    if status >= _SERVER_ERROR:
        return Failure("status_5xx", status=status, body=content)
    if status >= _CLIENT_ERROR:
        return Failure("status_4xx", status=status, body=content)
    if status != _SUCCESS:
        return Failure("invalid_response", status=status, body=content, detail="unexpected status")
    return None


def classify(status: int, content: bytes) -> Answer | Failure:
    """A response as the router sees it: a usable answer, or a failure with its reason."""
    failed = status_failure(status, content)
    if failed is not None:
        return failed
    answer = parse_answer(content)
    if answer is None:
        return Failure("invalid_response", status=status, body=content, detail="not a scoring answer")
    return answer


def classify_raw(raw: tuple[int, bytes] | Failure) -> Answer | Failure:
    return raw if isinstance(raw, Failure) else classify(*raw)


def classify_batch(raw: tuple[int, bytes] | Failure, count: int) -> list[Answer | Failure]:
    """A batch response as ``count`` per-request results: every item fails alike when the call failed, an item
    whose answer is unusable fails alone."""
    if isinstance(raw, Failure):
        return [raw] * count
    status, content = raw
    failed = status_failure(status, content)
    if failed is not None:
        return [failed] * count
    try:
        results = json.loads(content)["results"]
    except (ValueError, KeyError, TypeError):
        results = None
    if not isinstance(results, list) or len(results) != count:
        return [Failure("invalid_response", status=status, body=content, detail="not a batch answer")] * count
    unusable = Failure("invalid_response", status=status, detail="not a scoring answer")
    return [answer if (answer := answer_from(item, b"")) is not None else unusable for item in results]


def batch_body(bodies: Sequence[bytes], correlation_ids: Sequence[str]) -> bytes:
    """The batch endpoint's request for these (already validated) single-request JSON bodies."""
    return b"".join(
        (b'{"requests":[', b",".join(body.strip() for body in bodies), b'],"correlation_ids":',
         json.dumps(list(correlation_ids)).encode(), b"}")
    )  # fmt: skip


_TRANSPORTS: Final[dict[str, type[HttpxTransport] | type[AiohttpTransport]]] = {
    "httpx": HttpxTransport,
    "aiohttp": AiohttpTransport,
}


class Upstreams:
    """A transport per upstream URL in the routing table; a URL that leaves the table is closed after a grace.

    Transports are created inside the event loop (on the first table, or lazily on first use), never per request.
    """

    def __init__(self, settings: RouterSettings) -> None:
        self._settings = settings
        self._kind = _TRANSPORTS[settings.upstream_client]
        # One TLS context for every client: building one costs ~0.1 s, too long to do on the event loop per table.
        self._ssl_context = ssl.create_default_context()
        self._clients: dict[str, Transport] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def client(self, url: str) -> Transport:
        client = self._clients.get(url)
        if client is None:
            client = self._kind(url, self._settings, self._ssl_context)
            self._clients[url] = client
        return client

    def keep_only(self, urls: Iterable[str]) -> None:
        """Ensure a transport per URL in ``urls``; retire the others (closed after ``retired_client_grace_s``).
        Must run in the event loop."""
        loop = asyncio.get_running_loop()
        wanted = set(urls)
        for url in wanted:
            self.client(url)
        for url in [u for u in self._clients if u not in wanted]:
            client = self._clients.pop(url)
            task = loop.create_task(self._close_later(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_later(self, client: Transport) -> None:
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
        self._batch_path = settings.batch_path
        self._upstreams = upstreams
        self._metrics = metrics

    async def call(
        self,
        endpoint: VersionEndpoint,
        role: Role,
        stage: str,
        body: bytes,
        headers: Mapping[str, str],
        budget_s: float,
    ) -> Answer | Failure:
        client = self._upstreams.client(endpoint.url)
        started = time.perf_counter()
        result = await client.post(self._path, body, headers, budget_s)
        self._account(endpoint, role, stage, result, time.perf_counter() - started)
        return result

    async def call_batch(
        self,
        endpoint: VersionEndpoint,
        role: Role,
        stage: str,
        bodies: Sequence[bytes],
        correlation_ids: Sequence[str],
        budget_s: float,
    ) -> list[Answer | Failure]:
        """Score several requests in one call to the batch endpoint; each is accounted for as one call (counted
        with its outcome; its latency is the batch call's), so per-version rates keep their meaning."""
        client = self._upstreams.client(endpoint.url)
        headers = {"content-type": "application/json", CORRELATION_HEADER: new_correlation_id()}
        started = time.perf_counter()
        raw = await client.post_raw(self._batch_path, batch_body(bodies, correlation_ids), headers, budget_s)
        elapsed = time.perf_counter() - started
        results = classify_batch(raw, len(bodies))
        for result in results:
            self._account(endpoint, role, stage, result, elapsed)
        return results

    def _account(
        self, endpoint: VersionEndpoint, role: Role, stage: str, result: Answer | Failure, elapsed: float
    ) -> None:
        if isinstance(result, Answer):
            self._metrics.observe_call(endpoint.version, role, stage, "2xx", elapsed)
            return
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
