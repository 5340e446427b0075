"""OpenTelemetry spans across the real processes: a client's trace through a real router process to a real
``bentoml serve``, both exporting over OTLP/HTTP to a collector inside this test process (a small OTLP receiver
decoding the exporters' protobuf), so the test reads the spans as a tracing backend would.

The trace must be one tree: the client's span → the router's SERVER span (parent: the client's span ID) → the model
service's span (parent: the router's span), every span with the client's trace ID.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rollout.router.otel import SERVICE_NAME as ROUTER_SERVICE
from rollout.router.process import RouterProcess
from service.common.processes import free_port
from tests.kits.serving import one_version_behind_a_router

pytestmark = pytest.mark.integration

PREDICT = "/api/v1/refund-predict"
SEED = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
HTTP_TIMEOUT_S = 30.0
#: The exporters send in batches every few seconds (the SDK's BatchSpanProcessor: 5 s by default).
EXPORT_TIMEOUT_S = 60.0
LOOPBACK = "127.0.0.1"
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver on loopback, in this process."""

    port: int = field(default_factory=lambda: free_port(LOOPBACK))
    spans: list[CollectedSpan] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{TRACES_PATH}"

    async def receive(self, request: Request) -> Response:
        export = ExportTraceServiceRequest.FromString(await request.body())
        received = [
            CollectedSpan(
                service=next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                ),
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                kind=span.kind,
            )
            for resource in export.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        with self._lock:
            self.spans.extend(received)
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    def of_trace(self, trace_id: str) -> list[CollectedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    app = Starlette(routes=[Route(TRACES_PATH, receiver.receive, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=receiver.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline, "the OTLP receiver did not start"
        time.sleep(0.05)
    try:
        yield receiver
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)


@pytest.fixture(scope="module")
def traced_router(
    bundle_dir: Path, collector: Collector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    home = tmp_path_factory.mktemp("traced")
    server_env = {
        "FW_SERVE__WORKERS": "1",
        "FW_LOG_LEVEL": "WARNING",
        "FW_SERVE__TRACE_SCORING_ROUTES": "true",
        "FW_SERVE__OTLP_ENDPOINT": collector.endpoint,
    }
    router_env = {"FW_ROLLOUT_ROUTER__OTLP_ENDPOINT": collector.endpoint}
    with one_version_behind_a_router(home, bundle_dir, server_env, router_env) as (_server, router):
        yield router


def test_one_trace_from_the_client_through_the_router_to_the_model_service(
    traced_router: RouterProcess, collector: Collector
) -> None:
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01", "X-Correlation-ID": f"spans-{trace_id[:8]}"}
    with httpx.Client(base_url=traced_router.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
        answer = client.post(PREDICT, json=SEED, headers=headers)
    assert answer.status_code == httpx.codes.OK, answer.text
    assert answer.headers["x-correlation-id"] == headers["X-Correlation-ID"]

    def tree() -> tuple[CollectedSpan | None, list[CollectedSpan]]:
        spans = collector.of_trace(trace_id)
        routed = next((s for s in spans if s.service == ROUTER_SERVICE and s.parent_span_id == client_span), None)
        served = [s for s in spans if routed is not None and s.parent_span_id == routed.span_id]
        return routed, served

    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while not tree()[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    routed, served = tree()
    assert routed is not None, f"no router span under the client's: {collector.of_trace(trace_id)}"
    assert routed.name == f"POST {PREDICT}"
    assert served, f"no model-service span under the router's: {collector.of_trace(trace_id)}"
    assert all(span.service != ROUTER_SERVICE for span in served)
