"""The one Prometheus HTTP client of delivery: the controller's gates, the dashboard's page and the demo's timeline
all query through it.

:class:`PrometheusClient` is the ``MetricsProvider``: ``query(promql) -> float | None`` (``None`` when there is
no evidence — an empty result, NaN or ±Inf, e.g. a ratio over zero requests), ``query_vector(promql) ->
[(labels, value)]``, ``query_range(promql, start, end, step) -> [(labels, [(time, value)])]`` and ``is_online()``;
:meth:`PrometheusClient.at` pins every query of one analysis round to one evaluation instant (``time=`` of
``/api/v1/query``), so a ratio's numerator and denominator, or a candidate and its stable, are read from the same
data. Failures are typed: :class:`PrometheusUnavailableError` (cannot reach it, it timed out or answered 5xx) and
:class:`PrometheusQueryError` (it rejected the query, or a scalar was asked of a multi-series result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final

import httpx

from rollout.settings import PrometheusSettings, get_prometheus_settings

_ERROR_TEXT_CHARS: Final[int] = 3000

Sample = tuple[dict[str, str], float]
#: One series of a range query: its labels and its ``(UNIX time, value)`` points.
RangeSeries = tuple[dict[str, str], list[tuple[float, float]]]


class PrometheusError(RuntimeError):
    """Base of every failure to measure through Prometheus."""


class PrometheusUnavailableError(PrometheusError):
    """Prometheus could not be reached, timed out, answered 5xx, or its process failed to start."""


class PrometheusQueryError(PrometheusError):
    """Prometheus rejected the query, or its result does not have the asked-for shape."""


class PrometheusClient:
    """Instant and range queries against Prometheus' HTTP API (``/api/v1/query``, ``/api/v1/query_range``); safe to
    share between threads.

    ``timeout_s`` overrides the settings' ``query_timeout_s``; ``trust_env=False`` ignores proxy variables (a
    Prometheus on loopback)."""

    def __init__(
        self,
        base_url: str,
        *,
        settings: PrometheusSettings | None = None,
        timeout_s: float | None = None,
        trust_env: bool = True,
    ) -> None:
        self._settings = settings or get_prometheus_settings()
        timeout = timeout_s if timeout_s is not None else self._settings.query_timeout_s
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, trust_env=trust_env)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def is_online(self) -> bool:
        """True when Prometheus answers ``/-/ready`` with 200."""
        try:
            return self._http.get("/-/ready").status_code == httpx.codes.OK
        except httpx.HTTPError:
            return False

    def at(self, instant: datetime) -> PinnedPrometheus:
        """This client with every query evaluated at ``instant`` (an aware datetime)."""
        if instant.tzinfo is None:
            raise ValueError("the evaluation instant must be timezone-aware")
        return PinnedPrometheus(self, instant)

    def query(self, promql: str, at: datetime | None = None) -> float | None:
        """One number: a scalar, or the single sample of a vector. ``None`` for an empty vector, NaN or ±Inf.

        ``at`` evaluates the query at that instant (Prometheus' own "now" when not given). Raises
        :class:`PrometheusQueryError` when the vector has several series (aggregate it first).
        """
        result_type, result = self._instant(promql, at)
        if result_type == "scalar":
            return _finite(float(result[1]))
        if result_type != "vector":
            raise PrometheusQueryError(f"{promql!r} returned a {result_type}, not a scalar or an instant vector")
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusQueryError(f"{promql!r} returned {len(result)} series; aggregate it to one")
        return _finite(float(result[0]["value"][1]))

    def query_vector(self, promql: str, at: datetime | None = None) -> list[Sample]:
        """Every sample of an instant vector as ``(labels, value)``, NaN values included."""
        result_type, result = self._instant(promql, at)
        if result_type == "scalar":
            return [({}, float(result[1]))]
        if result_type != "vector":
            raise PrometheusQueryError(f"{promql!r} returned a {result_type}, not an instant vector")
        return [(dict(sample["metric"]), float(sample["value"][1])) for sample in result]

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[RangeSeries]:
        """Every series of a range query from ``start`` to ``end`` (UNIX seconds, millisecond resolution) every
        ``step_s``, NaN values included."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:.3f}"}
        result_type, result = self._get("/api/v1/query_range", promql, params)
        if result_type != "matrix":
            raise PrometheusQueryError(f"{promql!r} returned a {result_type}, not a range vector")
        return [
            (dict(series["metric"]), [(float(at), float(value)) for at, value in series["values"]]) for series in result
        ]

    def _instant(self, promql: str, at: datetime | None) -> tuple[str, Any]:
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at.timestamp():.3f}"}
        return self._get("/api/v1/query", promql, params)

    def _get(self, path: str, promql: str, params: dict[str, str]) -> tuple[str, Any]:
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise PrometheusUnavailableError(f"Prometheus at {self._http.base_url} unreachable: {exc}") from exc
        if response.status_code >= httpx.codes.INTERNAL_SERVER_ERROR:
            raise PrometheusUnavailableError(f"Prometheus answered {response.status_code}: {_error_of(response)}")
        if response.status_code != httpx.codes.OK:
            raise PrometheusQueryError(
                f"Prometheus rejected {promql!r} ({response.status_code}): {_error_of(response)}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusQueryError(f"Prometheus answered {response.status_code} without JSON") from exc
        if body.get("status") != "success":
            raise PrometheusQueryError(f"Prometheus rejected {promql!r}: {body.get('error', body)}")
        data = body["data"]
        return str(data["resultType"]), data["result"]


@dataclass(frozen=True, slots=True)
class PinnedPrometheus:
    """A :class:`PrometheusClient` whose queries are all evaluated at one instant (one analysis round)."""

    client: PrometheusClient
    instant: datetime

    def query(self, promql: str) -> float | None:
        return self.client.query(promql, self.instant)

    def query_vector(self, promql: str) -> list[Sample]:
        return self.client.query_vector(promql, self.instant)

    def is_online(self) -> bool:
        return self.client.is_online()


def _error_of(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:_ERROR_TEXT_CHARS]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
