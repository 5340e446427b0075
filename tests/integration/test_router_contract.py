"""The router's client-facing contract, against a real router process in front of a real ``bentoml serve``:

1. ``GET /openapi.json`` is a valid OpenAPI 3.1 document (openapi-spec-validator) of the public port only: the
   scoring endpoint and the probes, none of the control listener's routes.
2. ``bentoml.SyncHTTPClient(router_url)`` — BentoML's own client, which reads ``/schema.json`` — scores a request
   through the router exactly as it does against the model service.
3. schemathesis (a property-based API fuzzer) exercises every documented operation from that document, positive and
   negative cases: no 5xx, every answer conforms to the document, and every 4xx names the bad field.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import Case, GenerationMode
from schemathesis.core.transport import Response as FuzzResponse

from rollout.router.process import RouterProcess
from service.api.schema import REASONS_HEADER, REASONS_OFF, ErrorResponse
from service.data.features import FEATURE_NAMES
from service.serving.process import BentoServer
from tests.kits.serving import one_version_behind_a_router

pytestmark = pytest.mark.integration

PREDICT = "/api/v1/refund-predict"
SEED = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
HTTP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
CONTROL_PATHS = ("/metrics", "/admin/routing", "/api/v1/feedback", "/api/v1/feedback/batch")
#: Cases per operation and generation mode: enough to reach every field's bounds and types, cheap on 2 cores.
FUZZ_EXAMPLES = 60


@pytest.fixture(scope="module")
def contract_processes(
    bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BentoServer, RouterProcess]]:
    """One model service and a router in production mode (the contract only), both logging each decision."""
    home = tmp_path_factory.mktemp("router-contract")
    server_env = {"FW_SERVE__WORKERS": "1", "FW_LOG_LEVEL": "INFO"}
    with one_version_behind_a_router(
        home, bundle_dir, server_env, {"FW_ROLLOUT_ROUTER__LOG_DECISIONS": "true"}
    ) as pair:
        yield pair


@pytest.fixture(scope="module")
def contract_stack(contract_processes: tuple[BentoServer, RouterProcess]) -> tuple[BentoServer, str]:
    server, router = contract_processes
    return server, router.url


def get_json(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=HTTP_TIMEOUT_S, trust_env=False)
    assert response.status_code == httpx.codes.OK, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


def test_the_openapi_document_is_valid_and_describes_the_public_port_only(
    contract_stack: tuple[BentoServer, str],
) -> None:
    _, url = contract_stack
    document = get_json(url + "/openapi.json")
    validate(document)  # raises on an invalid OpenAPI 3.1 document
    assert set(document["paths"]) == {PREDICT, "/livez", "/readyz"}
    assert document["paths"][PREDICT]["post"]["operationId"] == "refund_predict"
    for path in CONTROL_PATHS:  # the control listener's routes are neither documented nor served here
        assert httpx.get(url + path, timeout=HTTP_TIMEOUT_S, trust_env=False).status_code == httpx.codes.NOT_FOUND


def test_bentomls_own_client_scores_through_the_router(contract_stack: tuple[BentoServer, str]) -> None:
    """BentoML's SyncHTTPClient builds its methods from ``/schema.json``: the same call against the model service and
    against the router, the router adding its ``prediction_id`` and keeping score and threshold inside."""
    server, url = contract_stack
    with bentoml.SyncHTTPClient(server.url, timeout=HTTP_TIMEOUT_S) as direct:
        from_model = direct.refund_predict(SEED)
    with bentoml.SyncHTTPClient(url, timeout=HTTP_TIMEOUT_S) as client:
        assert set(client.endpoints) == {"refund_predict"}
        routed = client.refund_predict(SEED)
    assert routed["prediction"] == from_model["prediction"]
    assert routed["decision"] == from_model["decision"]
    assert routed["confidence"] == pytest.approx(from_model["confidence"])
    assert routed["prediction_id"]
    assert "score" not in routed
    assert "threshold" not in routed


@schemathesis.check
def names_the_field(ctx: schemathesis.CheckContext, response: FuzzResponse, case: Case[Any]) -> bool | None:
    """Every 4xx of the scoring endpoint is an ErrorResponse with at least one detail naming a field."""
    if case.path != PREDICT or not 400 <= response.status_code < 500:
        return None
    error = ErrorResponse.model_validate_json(response.content)
    assert error.details, f"{response.status_code} without a detail naming the field: {response.content!r}"
    assert all(detail.field for detail in error.details), response.content
    return True


@pytest.mark.parametrize(
    ("path", "mode"),
    [(PREDICT, GenerationMode.POSITIVE), (PREDICT, GenerationMode.NEGATIVE), ("/livez", GenerationMode.POSITIVE),
     ("/readyz", GenerationMode.POSITIVE)],
)  # fmt: skip
def test_the_fuzzer_finds_no_5xx_and_every_4xx_names_the_field(
    contract_stack: tuple[BentoServer, str], path: str, mode: GenerationMode
) -> None:
    """schemathesis' default checks (no 5xx; status, content type, headers and body as documented; invalid data
    refused, valid data accepted) plus :func:`names_the_field`, on cases generated from the router's own document."""
    _, url = contract_stack
    schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=HTTP_TIMEOUT_S)
    operation = schema[path]["POST" if path == PREDICT else "GET"]
    calls: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def exercise(case: Case[Any]) -> None:
        response = case.call_and_validate(base_url=url, timeout=HTTP_TIMEOUT_S, additional_checks=[names_the_field])
        calls.append(response.status_code)

    exercise()
    statuses = collections.Counter(calls)
    assert calls, "the fuzzer sent nothing"
    if mode is GenerationMode.NEGATIVE:  # every invalid body refused, none answered
        assert all(400 <= status < 500 for status in calls), statuses
    else:  # every valid body answered (here: 60 of 60 scored, 2026-12-06)
        assert set(statuses) == {httpx.codes.OK}, statuses


# ------------------------------------------------------------------ W3C trace context across the processes

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def decision_lines(path: Path, correlation_id: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``path`` that record a decision for ``correlation_id``."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if correlation_id in line and line.startswith("{"):
            record = json.loads(line)
            if record.get("correlation_id") == correlation_id:
                lines.append(record)
    return lines


def one_decision(path: Path, correlation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (found := decision_lines(path, correlation_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == 1, f"{len(found)} decision lines for {correlation_id} in {path}"
    return found[0]


def score_traced(url: str, headers: dict[str, str]) -> httpx.Response:
    response = httpx.post(url + PREDICT, json=SEED, headers=headers, timeout=HTTP_TIMEOUT_S, trust_env=False)
    assert response.status_code == httpx.codes.OK, response.text
    return response


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [
        (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", True),  # the client's trace goes on through the router
        (None, False),  # no trace: the router starts one
        (f"00-{'0' * 32}-{CLIENT_SPAN}-01", False),  # invalid (all-zero trace ID): the router starts one
    ],
)
def test_the_trace_goes_on_from_the_client_through_the_router_to_the_model_service(
    contract_processes: tuple[BentoServer, RouterProcess], traceparent: str | None, continued: bool
) -> None:
    """The model service logs the trace and its caller's span with its decision: the client's trace ID, under the
    router's own span (the router's decision line names it), the correlation ID kept end to end."""
    server, router = contract_processes
    correlation_id = f"trace-{uuid.uuid4().hex}"
    headers = {"X-Correlation-ID": correlation_id}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    assert score_traced(router.url, headers).headers["x-correlation-id"] == correlation_id
    routed = one_decision(router.log_path, correlation_id)
    served = one_decision(server.log_path, correlation_id)
    assert served["trace_id"] == routed["trace_id"]
    assert served["parent_span_id"] == routed["span_id"]
    assert len(routed["trace_id"]) == 32 and len(routed["span_id"]) == 16
    assert (routed["trace_id"] == CLIENT_TRACE) is continued
    assert routed["span_id"] != CLIENT_SPAN


# ------------------------------------------------------------------ reasons with review decisions


def test_review_decisions_reach_the_client_with_their_reasons(contract_stack: tuple[BentoServer, str]) -> None:
    """Through the router in production mode: a review carries its top features, an approval none unless the request
    asks (``explain``), and the features are the model's."""
    _, url = contract_stack
    bodies = [
        {"yearsActive": years, "amount": amount, "ipAccounts": ips, "itemDescription": item}
        for years in (0.01, 0.1, 2.0, 8.0)
        for amount, ips, item in ((500.0, 60, "Gift card"), (45.0, 2, "Pad Thai"), (1899.99, 1, "Laptop"))
    ]
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
        plain = [client.post(PREDICT, json=body).json() for body in bodies]
        explained = [client.post(PREDICT, json={**body, "explain": True}).json() for body in bodies]
    assert {a["decision"] for a in plain} == {"approve", "review"}, "the bodies must cover both decisions"
    for answer in plain:
        if answer["decision"] == "review":
            assert answer["reasons"], answer
            assert all(r["feature"] in FEATURE_NAMES and r["contribution"] > 0 for r in answer["reasons"])
        else:
            assert "reasons" not in answer
    assert all("reasons" in answer for answer in explained)


def test_a_call_with_reasons_off_gets_none(contract_stack: tuple[BentoServer, str]) -> None:
    """The router's shadow calls send ``REASONS_HEADER: off`` (their answers are discarded): the model service then
    computes no reasons, neither for a review nor for ``explain``, on the single and the batch route; the same
    requests without the header get them."""
    server, _ = contract_stack
    review = {"yearsActive": 0.01, "amount": 500.0, "ipAccounts": 60, "itemDescription": "Gift card", "explain": True}
    off = {REASONS_HEADER: REASONS_OFF}
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
        single_on = client.post(PREDICT, json=review).json()
        single_off = client.post(PREDICT, json=review, headers=off).json()
        batch = {"requests": [review, SEED | {"explain": True}]}
        batch_on = client.post(PREDICT + "-batch", json=batch).json()["results"]
        batch_off = client.post(PREDICT + "-batch", json=batch, headers=off).json()["results"]
    assert single_on["decision"] == single_off["decision"] == "review"
    assert single_on["reasons"] and all("reasons" in answer for answer in batch_on)
    assert "reasons" not in single_off and all("reasons" not in answer for answer in batch_off)
