"""The router's contract documents (rollout/router/contract.py) against the router's own routes and answers."""

from __future__ import annotations

from starlette.routing import Route

from rollout.router.app import Router, public_body
from rollout.router.contract import BENTOML_SCHEMA_PATH, OPENAPI_PATH, bentoml_schema, openapi_document
from rollout.router.upstream import Answer
from rollout.settings import RouterSettings
from service.api.schema import RefundRequest, RoutedResponse

SETTINGS = RouterSettings(predict_path="/v2/score")


def test_the_document_names_every_public_route_and_no_other() -> None:
    routes = {r.path for r in Router(SETTINGS, process_metrics=False).public_routes() if isinstance(r, Route)}
    documented = set(openapi_document(SETTINGS)["paths"])
    assert documented == routes - {OPENAPI_PATH, BENTOML_SCHEMA_PATH}
    assert "/v2/score" in documented


def test_the_public_body_is_the_documented_response() -> None:
    reasons = [{"feature": "ip_accounts", "contribution": 1.25}]
    answer = Answer(body=b"{}", reported_version="v1", score=0.9, prediction=1, threshold=0.5, reasons=reasons)
    parsed = RoutedResponse.model_validate_json(public_body(answer, "pid-1", "cid-1"))
    assert parsed.decision == "review"
    assert parsed.confidence == 0.9
    assert parsed.reasons is not None and parsed.reasons[0].feature == "ip_accounts"
    approved = Answer(body=b"{}", reported_version="v1", score=0.1, prediction=0, threshold=0.5)
    assert b"reasons" not in public_body(approved, "pid-2", "cid-2")
    assert set(openapi_document(SETTINGS)["components"]["schemas"]["RoutedResponse"]["required"]) == set(
        RoutedResponse.model_fields
    ) - {"reasons"}


def test_bentomls_schema_takes_the_request_body_itself() -> None:
    (route,) = bentoml_schema(SETTINGS)["routes"]
    assert route["route"] == "/v2/score"
    assert route["input"]["root_input"] is True
    assert set(route["input"]["properties"]) == set(RefundRequest.model_fields)
    assert "$ref" not in str(route)  # BentoML's client resolves no references
