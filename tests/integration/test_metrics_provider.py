"""The controller's metrics provider against a real Prometheus behind a real reverse proxy that demands a tenant
header and credentials — as Grafana Mimir, Cortex or a Thanos/Prometheus behind an auth proxy do.

A prometheus_client exporter publishes the router's request and error counters for two versions; Debian's
Prometheus scrapes it; an aiohttp reverse proxy on loopback forwards to Prometheus only the requests that carry
``X-Scope-OrgID: tenant-a`` and the right ``Authorization`` (bearer, or basic), and answers every other request 401
with the headers it received in its body (a careless proxy: the client must not repeat a credential) — or, for
Amazon Managed Prometheus' SigV4, only the requests whose signature botocore recomputes identically. The
controller's client is built as the controllers build it (``provider_client`` from ``ControllerSettings``, the
credentials read from files like a mounted Secret), and the gates are measured as the controller loop measures them
(``is_online`` then ``analyse``) with a policy whose gate is built from a reusable metric template beside an inline
one.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from prometheus_client import CollectorRegistry, Counter, start_http_server
from yarl import URL

from rollout.backends.local.prometheus import PrometheusServer, ScrapeTarget
from rollout.backends.prometheus import PrometheusClient, ProviderAuth, provider_client
from rollout.core.analysis import AnalysisReport, GateStatus, analyse
from rollout.core.policy import RolloutPolicy, policy_from_mapping
from rollout.settings import ControllerSettings, PrometheusSettings
from service.common.processes import free_port

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
TENANT = "tenant-a"
TOKEN = "s3cr3t-bearer-token-0123456789"
USER, PASSWORD = "fraudwatch", "s3cr3t-basic-password-9876"
#: Amazon Managed Prometheus' region and a temporary AWS key (an STS session's three parts).
REGION = "eu-west-1"
KEY_ID, SECRET_KEY = "ASIAFRAUDWATCHTEST01", "s3cr3t/aws+secret-access-key-0123456789ab"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLE//////////s3cr3t-session-token=="
WAIT_S = 60.0

REQUESTS = 'sum(fraudwatch_router_requests_total{model_version="{{version}}"})'
ERROR_COUNTER = "fraudwatch_router_errors_total"
ERRORS = f'sum({ERROR_COUNTER}{{model_version="{{{{version}}}}"}})'
#: Every stage watched by a gate from the reusable template and by an inline one (the same PromQL, kept apart).
POLICY: dict[str, Any] = {
    "stages": {stage: {"min_requests": 10} for stage in ("shadow", "canary", "ab", "full")},
    "samples": {"requests": REQUESTS, "labels": REQUESTS},
    "metric_templates": {
        "error-rate": {  # Argo AnalysisTemplate args: the counter named by the gate, the bound defaulted
            "args": [{"name": "errors"}, {"name": "max-rate", "value": 0.05}],
            "layer": "health",
            "stages": ["shadow", "canary", "ab", "full"],
            "query": 'sum({{args.errors}}{model_version="{{version}}"}) / ' + REQUESTS,
            "condition": "value <= {{args.max-rate}}",
        }
    },
    "gates": [
        {"name": "error-rate", "template": "error-rate", "args": [{"name": "errors", "value": ERROR_COUNTER}]},
        {
            "name": "error-rate-inline",
            "layer": "health",
            "stages": ["shadow", "canary", "ab", "full"],
            "query": f"{ERRORS} / {REQUESTS}",
            "condition": "candidate - stable <= 0.05",
        },
    ],
}


@dataclass
class AuthProxy:
    """A reverse proxy to ``upstream`` that admits a request only with the tenant header and one of ``accepted``
    ``Authorization`` values — or, with ``verify``, a request it verifies; otherwise 401 echoing what it got."""

    upstream: str
    accepted: set[str]
    verify: Callable[[web.Request, bytes], bool] | None = None
    port: int = field(default_factory=lambda: free_port(HOST))
    refused: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        tenant = request.headers.get("X-Scope-OrgID")
        authorization = request.headers.get("Authorization")
        admitted = self.verify(request, await request.read()) if self.verify else authorization in self.accepted
        if tenant != TENANT or not admitted:
            self.refused += 1
            echo = f"refused: X-Scope-OrgID={tenant!r} Authorization={authorization!r}"
            return web.json_response({"status": "error", "error": echo}, status=401)
        async with (
            aiohttp.ClientSession() as session,
            session.get(URL(self.upstream + request.raw_path, encoded=True)) as answer,
        ):
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type=answer.content_type)

    def __enter__(self) -> AuthProxy:
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("GET", "/{tail:.*}", self.handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, HOST, self.port).start()
            ready.set()

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop)
        assert ready.wait(10.0), "the proxy did not start"
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._loop is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class SigV4Verifier:
    """Verifies a SigV4 request as AWS does, by recomputing its signature — with botocore's ``SigV4Auth``, not the
    controller's signer: the key id names the secret (and the session token it was issued with), the credential's
    scope must be the day of ``X-Amz-Date``, ``region`` and ``aps``, that date within 5 minutes of now, and host,
    date, token and the tenant header among the signed headers."""

    keys: dict[str, tuple[str, str | None]]
    region: str = REGION
    verified: int = 0

    def __call__(self, request: web.Request, body: bytes) -> bool:
        algorithm, _, rest = request.headers.get("Authorization", "").partition(" ")
        parts = dict(part.strip().split("=", 1) for part in rest.split(",") if "=" in part)
        if algorithm != "AWS4-HMAC-SHA256" or set(parts) != {"Credential", "SignedHeaders", "Signature"}:
            return False
        key_id, day, region, service, terminal = [*parts["Credential"].split("/"), "", "", "", ""][:5]
        if key_id not in self.keys or (region, service, terminal) != (self.region, "aps", "aws4_request"):
            return False
        secret, token = self.keys[key_id]
        amz_date = request.headers.get("X-Amz-Date", "")
        try:
            at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return False
        signed = parts["SignedHeaders"].split(";")
        needed = {"host", "x-amz-date", "x-scope-orgid"} | ({"x-amz-security-token"} if token else set())
        if abs((datetime.now(UTC) - at).total_seconds()) > 300 or day != amz_date[:8] or not needed <= set(signed):
            return False
        if any(name not in request.headers for name in signed) or request.headers.get("X-Amz-Security-Token") != token:
            return False
        boto = AWSRequest(
            method=request.method,
            url=f"http://{request.host}{request.raw_path}",
            headers={name: request.headers[name] for name in signed},
            data=body,
        )
        boto.context["timestamp"] = amz_date
        signer = SigV4Auth(BotoCredentials(key_id, secret, token), service, region)
        expected = signer.signature(signer.string_to_sign(boto, signer.canonical_request(boto)), boto)
        self.verified += 1
        return hmac.compare_digest(expected, parts["Signature"])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping a real exporter: v1 and v2 each with 1,000 requests, 10 errors (1 %)."""
    registry = CollectorRegistry()
    requests = Counter("fraudwatch_router_requests", "calls", ["model_version"], registry=registry)
    errors = Counter("fraudwatch_router_errors", "errors", ["model_version"], registry=registry)
    for version in ("v1", "v2"):
        requests.labels(version).inc(1000)
        errors.labels(version).inc(10)
    port = free_port(HOST)
    server, thread = start_http_server(port, addr=HOST, registry=registry)
    settings = PrometheusSettings(scrape_interval_s=1.0, evaluation_interval_s=1.0, ready_timeout_s=WAIT_S)
    workdir = tmp_path_factory.mktemp("provider-prom")
    try:
        with PrometheusServer(workdir, [ScrapeTarget(f"{HOST}:{port}")], settings=settings) as prom:
            with PrometheusClient(prom.url, trust_env=False) as direct:
                deadline = time.monotonic() + WAIT_S
                while direct.query('sum(fraudwatch_router_requests_total{model_version="v2"})') is None:
                    assert time.monotonic() < deadline, "no scrape of the exporter"
                    time.sleep(0.25)
            yield prom.url
    finally:
        server.shutdown()
        thread.join(5.0)


def controller_settings(proxy: AuthProxy, provider: dict[str, Any]) -> ControllerSettings:
    return ControllerSettings.model_validate({"prometheus_url": proxy.url, "provider": provider})


def measure(settings: ControllerSettings, policy: RolloutPolicy) -> tuple[bool, AnalysisReport]:
    """One analysis round as the controller loop runs it: ``is_online``, then every gate of the canary stage."""
    with provider_client(settings) as client:
        online = client.is_online()
        return online, analyse(policy, "canary", client, "v1", "v2", datetime.now(UTC))


def statuses(report: AnalysisReport) -> dict[str, GateStatus]:
    return {r.name: r.status for r in report.results}


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_gates_decide_only_with_the_tenant_header_and_credentials(prometheus: str, tmp_path: Path, auth: str) -> None:
    policy = policy_from_mapping(POLICY)
    assert policy.gates[0].template == "error-rate"
    assert policy.gates[0].query == policy.gates[1].query  # type: ignore[union-attr]  # the args rendered
    secret = tmp_path / "secret"  # a mounted Secret's key, read at each request
    secret.write_text((TOKEN if auth == "bearer" else PASSWORD) + "\n", encoding="utf-8")
    if auth == "bearer":
        good = {"bearer_token_file": str(secret)}
        authorization = f"Bearer {TOKEN}"
    else:
        good = {"basic_auth_username": USER, "basic_auth_password_file": str(secret)}
        authorization = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"headers": {"X-Scope-OrgID": TENANT}}
    with AuthProxy(prometheus, {authorization}) as proxy:
        # with the header and the credentials: every gate decided from Prometheus' data
        online, report = measure(controller_settings(proxy, {**headers, **good}), policy)
        assert online
        decided = dict.fromkeys(["min-requests", "error-rate", "error-rate-inline"], GateStatus.SUCCESSFUL)
        assert statuses(report) == decided
        assert {r.name: r.candidate_value for r in report.results}["error-rate"] == pytest.approx(0.01)
        # without them, with the header only, with the credentials only, with a wrong secret: no gate decided, each
        # an Error naming the refusal (the loop aborts after consecutive_error_limit), no secret in any message
        for provider, content in (({}, None), (headers, None), (good, None), ({**headers, **good}, "wrong-secret")):
            if content is not None:
                secret.write_text(content, encoding="utf-8")  # a rotated Secret is read at the next request
            refused_before = proxy.refused
            online, report = measure(controller_settings(proxy, provider), policy)
            assert online, "a store that refuses the credentials is there: the gates say why"
            assert set(statuses(report).values()) == {GateStatus.ERROR}, (provider, report)
            assert proxy.refused > refused_before
            for result in report.results:
                assert "refused the request (401)" in result.message, result.message
                assert "wrong-secret" not in result.message and TOKEN not in result.message
                assert PASSWORD not in result.message and authorization not in result.message
        # the Secret rotated back: decided again, without a restart of anything
        secret.write_text((TOKEN if auth == "bearer" else PASSWORD) + "\n", encoding="utf-8")
        online, report = measure(controller_settings(proxy, {**headers, **good}), policy)
        assert set(statuses(report).values()) == {GateStatus.SUCCESSFUL}


def test_an_unreadable_secret_is_an_error_naming_the_file(prometheus: str, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    with AuthProxy(prometheus, {f"Bearer {TOKEN}"}) as proxy:
        settings = controller_settings(proxy, {"headers": {"X-Scope-OrgID": TENANT}, "bearer_token_file": str(missing)})
        online, report = measure(settings, policy_from_mapping(POLICY))
    assert online
    assert set(statuses(report).values()) == {GateStatus.ERROR}
    assert all(f"bearer_token_file {missing} cannot be read" in r.message for r in report.results)
    assert proxy.refused == 0  # nothing was sent without its credentials


def test_gates_decide_only_with_a_valid_sigv4_signature(prometheus: str, tmp_path: Path) -> None:
    """Amazon Managed Prometheus' way: every query signed with SigV4 (temporary credentials from a mounted Secret's
    three keys); the proxy admits it only when botocore computes the same signature."""
    policy = policy_from_mapping(POLICY)
    contents = {"access_key_id_file": KEY_ID, "secret_access_key_file": SECRET_KEY, "session_token_file": SESSION_TOKEN}
    for name, content in contents.items():
        (tmp_path / name).write_text(content + "\n", encoding="utf-8")
    sigv4 = {"region": REGION, **{name: str(tmp_path / name) for name in contents}}
    headers = {"headers": {"X-Scope-OrgID": TENANT}}
    good = {**headers, "sigv4": sigv4}
    verifier = SigV4Verifier({KEY_ID: (SECRET_KEY, SESSION_TOKEN)})
    with AuthProxy(prometheus, set(), verify=verifier) as proxy:
        online, report = measure(controller_settings(proxy, good), policy)
        assert online
        decided = dict.fromkeys(["min-requests", "error-rate", "error-rate-inline"], GateStatus.SUCCESSFUL)
        assert statuses(report) == decided
        assert {r.name: r.candidate_value for r in report.results}["error-rate"] == pytest.approx(0.01)
        assert verifier.verified >= 5  # is_online and each gate's queries, every one checked by botocore
        # unsigned, signed for another region or service, with a wrong secret, with another session token: refused
        for provider, rotated in (
            (headers, None),
            ({**headers, "sigv4": {**sigv4, "region": "us-east-1"}}, None),
            ({**headers, "sigv4": {**sigv4, "service": "execute-api"}}, None),
            (good, ("secret_access_key_file", "wrong/secret-access-key")),
            (good, ("session_token_file", "another-session-token")),
        ):
            if rotated is not None:
                (tmp_path / rotated[0]).write_text(rotated[1], encoding="utf-8")
            refused_before = proxy.refused
            online, report = measure(controller_settings(proxy, provider), policy)
            assert online and set(statuses(report).values()) == {GateStatus.ERROR}, (provider, report)
            assert proxy.refused > refused_before
            for result in report.results:
                assert "refused the request (401)" in result.message, result.message
                assert all(secret not in result.message for secret in (SECRET_KEY, SESSION_TOKEN, "wrong/secret"))
            for name, content in contents.items():  # the Secret rotated back
                (tmp_path / name).write_text(content, encoding="utf-8")
        # the proxy checks what was signed: the same signed request with another query is refused
        settings = controller_settings(proxy, good)
        with httpx.Client(base_url=proxy.url, headers=settings.provider.headers, trust_env=False) as http:
            query = {"query": REQUESTS.replace("{{version}}", "v1")}
            request = http.build_request("GET", "/api/v1/query", params=query)
            signed = next(ProviderAuth(settings.provider).auth_flow(request))
            assert http.send(signed).status_code == httpx.codes.OK
            signed.url = signed.url.copy_with(query=b"query=vector%281%29")
            assert http.send(signed).status_code == httpx.codes.UNAUTHORIZED
        online, report = measure(controller_settings(proxy, good), policy)
        assert set(statuses(report).values()) == {GateStatus.SUCCESSFUL}
