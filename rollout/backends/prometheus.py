"""The one Prometheus HTTP client of delivery: the controller's gates, the dashboard's page and the demo's timeline
all query through it.

:class:`PrometheusClient` is the ``MetricsProvider``: ``query(promql) -> float | None`` (``None`` when there is
no evidence — an empty result, NaN or ±Inf, e.g. a ratio over zero requests), ``query_vector(promql) ->
[(labels, value)]``, ``query_range(promql, start, end, step) -> [(labels, [(time, value)])]`` and ``is_online()``;
:meth:`PrometheusClient.at` pins every query of one analysis round to one evaluation instant (``time=`` of
``/api/v1/query``), so a ratio's numerator and denominator, or a candidate and its stable, are read from the same
data. Failures are typed: :class:`PrometheusUnavailableError` (cannot reach it, it timed out or answered 5xx),
:class:`PrometheusAuthError` (it refused the headers or credentials, 401/403, or they cannot be read) and
:class:`PrometheusQueryError` (it rejected the query, or a scalar was asked of a multi-series result).

The store may be any Prometheus-compatible query API behind headers and authentication
(:class:`~rollout.settings.MetricsProviderSettings`: ``X-Scope-OrgID``, a bearer token, basic auth or an AWS key for
SigV4 (rollout/backends/sigv4.py) from a mounted Secret, read at each request); no error text carries a credential.
"""

from __future__ import annotations

import base64
import math
import os
import ssl
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import httpx
from pydantic import SecretStr

from rollout.backends.sigv4 import Credentials
from rollout.backends.sigv4 import sign as sigv4_sign
from rollout.settings import (
    ControllerSettings,
    MetricsProviderSettings,
    PrometheusSettings,
    SigV4Settings,
    get_prometheus_settings,
    read_secret,
)

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


class PrometheusAuthError(PrometheusUnavailableError):
    """The store refused the provider's headers or credentials (401/403), or the credentials cannot be read: no
    evidence until an operator fixes them (a gate's Error, never a pass)."""


_REFUSED: Final[frozenset[int]] = frozenset({httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN})
_REDACTED: Final[str] = "<redacted>"


class ProviderAuth(httpx.Auth):
    """The provider's ``Authorization`` header (bearer, basic or SigV4), its secret read from the settings at each
    request: a rotated Secret is used at once. Remembers the values it sent, so error texts can be scrubbed of
    them."""

    requires_request_body = True  # SigV4 signs the payload's hash

    def __init__(self, provider: MetricsProviderSettings) -> None:
        self._provider = provider
        self.sent: tuple[str, ...] = ()

    def authorization(self) -> str:
        p = self._provider
        if p.basic_auth_username is not None:
            password = _secret(p.basic_auth_password, p.basic_auth_password_file, "basic_auth_password")
            encoded = base64.b64encode(f"{p.basic_auth_username}:{password}".encode()).decode("ascii")
            self.sent = (password, encoded)
            return f"Basic {encoded}"
        token = _secret(p.bearer_token, p.bearer_token_file, "bearer_token")
        self.sent = (token,)
        return f"Bearer {token}"

    def sign(self, request: httpx.Request, sigv4: SigV4Settings) -> None:
        """Sign ``request`` with SigV4: its host, the provider's headers, ``X-Amz-Date`` (and the session token)
        and its body; its query is rewritten in the canonical form that was signed (the store recomputes it)."""
        path, _, query = request.url.raw_path.decode("ascii").partition("?")
        covered = [(name, request.headers[name]) for name in self._provider.headers]
        credentials = aws_credentials(sigv4)
        signed = sigv4_sign(
            credentials,
            region=sigv4.region,
            service=sigv4.service,
            method=request.method,
            host=request.headers["Host"],
            path=path,
            query=query,
            headers=covered,
            body=request.content,
        )
        request.url = request.url.copy_with(query=signed.query.encode("ascii") or None)
        request.headers.update(signed.headers)
        self.sent = (signed.signature,) + ((credentials.session_token,) if credentials.session_token else ())

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._provider.sigv4 is not None:
            self.sign(request, self._provider.sigv4)
        else:
            request.headers["Authorization"] = self.authorization()
        yield request


def aws_credentials(sigv4: SigV4Settings) -> Credentials:
    """The access key SigV4 signs with: from the settings' files (read now), else the standard ``AWS_*``
    variables; :class:`PrometheusAuthError` naming what is missing (never a value)."""
    if sigv4.access_key_id_file is not None and sigv4.secret_access_key_file is not None:
        token_file = sigv4.session_token_file
        return Credentials(
            _secret(None, sigv4.access_key_id_file, "sigv4.access_key_id"),
            _secret(None, sigv4.secret_access_key_file, "sigv4.secret_access_key"),
            _secret(None, token_file, "sigv4.session_token") if token_file is not None else None,
        )
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        raise PrometheusAuthError(
            "the provider's sigv4 has no credentials: set sigv4.access_key_id_file and sigv4.secret_access_key_file "
            "(a mounted Secret), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    return Credentials(key_id, secret, os.environ.get("AWS_SESSION_TOKEN") or None)


def _secret(value: SecretStr | None, path: Path | None, field: str) -> str:
    """The provider's secret ``field`` (inline, else its file); :class:`PrometheusAuthError` naming the field and
    the file — never the content — when it is missing or empty."""
    try:
        secret = read_secret(value, path)
    except OSError as exc:
        raise PrometheusAuthError(f"the provider's {field}_file {path} cannot be read: {exc.strerror}") from None
    if not secret:
        raise PrometheusAuthError(f"the provider's {field} is empty ({field}_file {path})")
    return secret


def describe(provider: MetricsProviderSettings) -> str:
    """What the client sends besides the query, by name only (for error texts): headers and the kind of auth."""
    sent = [f"header {name}" for name in sorted(provider.headers)]
    if provider.basic_auth_username is not None:
        sent.append("basic auth")
    elif provider.sigv4 is not None:
        sent.append(f"a SigV4 signature ({provider.sigv4.service}, {provider.sigv4.region})")
    elif provider.authenticated:
        sent.append("a bearer token")
    return ", ".join(sent) if sent else "no headers and no credentials"


class PrometheusClient:
    """Instant and range queries against Prometheus' HTTP API (``/api/v1/query``, ``/api/v1/query_range``); safe to
    share between threads.

    ``timeout_s`` overrides the settings' ``query_timeout_s``; ``trust_env=False`` ignores proxy variables (a
    Prometheus on loopback); ``provider`` adds the store's headers, credentials, CA and readiness path."""

    def __init__(
        self,
        base_url: str,
        *,
        settings: PrometheusSettings | None = None,
        timeout_s: float | None = None,
        trust_env: bool = True,
        provider: MetricsProviderSettings | None = None,
    ) -> None:
        self._settings = settings or get_prometheus_settings()
        self._provider = provider or MetricsProviderSettings()
        self._auth = ProviderAuth(self._provider) if self._provider.authenticated else None
        timeout = timeout_s if timeout_s is not None else self._settings.query_timeout_s
        ca_file = self._provider.ca_file
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            trust_env=trust_env,
            headers=self._provider.headers,
            auth=self._auth,
            verify=ssl.create_default_context(cafile=ca_file) if ca_file is not None else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def is_online(self) -> bool:
        """True when the store answers its readiness path (``/-/ready``) with 200 — or refuses the provider's
        headers or credentials (401/403, or they cannot be read): it is there, and every query then fails with
        :class:`PrometheusAuthError` naming the cause, instead of reading as an outage."""
        try:
            status = self._http.get(self._provider.ready_path).status_code
        except PrometheusAuthError:
            return True
        except httpx.HTTPError:
            return False
        return status == httpx.codes.OK or status in _REFUSED

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
        if response.status_code in _REFUSED:
            raise PrometheusAuthError(
                f"Prometheus at {self._http.base_url} refused the request ({response.status_code}) with "
                f"{describe(self._provider)} sent: {self._error_of(response)}"
            )
        if response.status_code >= httpx.codes.INTERNAL_SERVER_ERROR:
            raise PrometheusUnavailableError(f"Prometheus answered {response.status_code}: {self._error_of(response)}")
        if response.status_code != httpx.codes.OK:
            raise PrometheusQueryError(
                f"Prometheus rejected {promql!r} ({response.status_code}): {self._error_of(response)}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusQueryError(f"Prometheus answered {response.status_code} without JSON") from exc
        if body.get("status") != "success":
            raise PrometheusQueryError(f"Prometheus rejected {promql!r}: {body.get('error', body)}")
        data = body["data"]
        return str(data["resultType"]), data["result"]

    def _error_of(self, response: httpx.Response) -> str:
        """The store's error text, scrubbed of the credentials this client sent (a proxy may echo them)."""
        text = _error_of(response)
        for secret in self._auth.sent if self._auth is not None else ():
            text = text.replace(secret, _REDACTED)
        return text


def provider_client(controller: ControllerSettings) -> PrometheusClient:
    """The controller's client of its metrics store: ``prometheus_url`` with the ``provider``'s headers,
    credentials, CA and readiness path (the gates of every backend query through it)."""
    return PrometheusClient(controller.prometheus_url, provider=controller.provider)


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
