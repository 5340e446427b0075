"""The router's public contract as the documents clients' tools read, built from the pydantic models the router
validates with (:mod:`service.api.schema`), so the documents cannot drift from what the router enforces.

* :func:`openapi_document` — OpenAPI 3.1 (``GET /openapi.json`` on the public port): the scoring endpoint and the
  probes, nothing of the control listener (metrics, routing, labels).
* :func:`bentoml_schema` — BentoML's service schema (``GET /schema.json``), what ``bentoml.SyncHTTPClient`` /
  ``AsyncHTTPClient`` fetch to build their methods: one route, ``refund_predict``, whose input is the request body
  itself (``root_input``, as the model service's API method declares it), so
  ``client.refund_predict({"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2})`` works against the router.

Both are pure functions of the router's settings; the router serializes them once at start.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rollout.router.outcomes.prediction_log import PREDICTION_ID_HEADER
from rollout.settings import RouterSettings
from service.api.schema import ErrorResponse, RefundRequest, RoutedResponse
from service.common.logging import CORRELATION_HEADER

OPENAPI_PATH: Final[str] = "/openapi.json"
BENTOML_SCHEMA_PATH: Final[str] = "/schema.json"
#: The name of the scoring route in BentoML's schema: the model service's API method, so a client's call is the same
#: against the router and against a model service.
PREDICT_OPERATION: Final[str] = "refund_predict"
SERVICE_NAME: Final[str] = "refund_fraud"
TITLE: Final[str] = "fraudwatch refund-fraud scoring"
#: The version of the public contract (not of a model): bump it when the request or response models change.
CONTRACT_VERSION: Final[str] = "1.0.0"
_REF: Final[str] = "#/components/schemas/{model}"
_JSON: Final[str] = "application/json"
#: Every error the scoring endpoint answers, with what causes it; each body is an ErrorResponse naming the field.
_ERRORS: Final[dict[str, str]] = {
    "400": "The body is not JSON (`error`: `invalid_json`, `details[0].field`: `body`).",
    "413": "The body is larger than the router's limit (`payload_too_large`, field `body`).",
    "422": "A field is missing or invalid (`validation_error`): one detail per field, `field` naming it.",
    "503": "No routing table loaded yet, or the stable model version failed (`field` says which).",
}


def _schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """The JSON Schemas of ``models`` (and of what they reference), keyed by model name."""
    _refs, definitions = models_json_schema(
        [(model, "validation" if model is RefundRequest else "serialization") for model in models],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = definitions.get("$defs", {})
    return schemas


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {_JSON: {"schema": _ref(model)}}


def _id_header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _status_body(description: str, statuses: list[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {"status": {"type": "string", "enum": statuses}},
        "required": ["status"],
    }
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _predict_operation() -> dict[str, Any]:
    correlation = _id_header("The request's correlation ID (the client's, or a fresh UUID).")
    errors = {
        status: {
            "description": description,
            "headers": {CORRELATION_HEADER: correlation},
            "content": _json_content(ErrorResponse),
        }
        for status, description in _ERRORS.items()
    }
    return {
        "operationId": PREDICT_OPERATION,
        "summary": "Score one refund request",
        "description": "Decides whether a refund is approved or sent to review. Unknown body members are ignored.",
        "parameters": [
            {
                "name": CORRELATION_HEADER,
                "in": "header",
                "required": False,
                "description": "Traced with the request and echoed; a value that is not 1-128 characters of "
                "`[A-Za-z0-9._:-]` starting alphanumeric is replaced by a fresh UUID.",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {"required": True, "content": _json_content(RefundRequest)},
        "responses": {
            "200": {
                "description": "The decision.",
                "headers": {
                    CORRELATION_HEADER: correlation,
                    PREDICTION_ID_HEADER: _id_header("The prediction's ID, as in the body's `prediction_id`."),
                },
                "content": _json_content(RoutedResponse),
            },
            **errors,
        },
    }


def openapi_document(settings: RouterSettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the router's public port."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": CONTRACT_VERSION,
            "description": "The public scoring API of the fraudwatch router. Labels are posted elsewhere (the "
            "router's control listener, with a label source's token), never here.",
        },
        "paths": {
            settings.predict_path: {"post": _predict_operation()},
            "/livez": {
                "get": {
                    "operationId": "livez",
                    "summary": "Liveness",
                    "responses": {"200": _status_body("The router process serves.", ["alive"])},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness",
                    "responses": {
                        "200": _status_body("A routing table is loaded and its stable version answered.", ["ready"]),
                        "503": _status_body("Not ready yet.", ["not ready"]),
                    },
                }
            },
        },
        "components": {"schemas": _schemas([RefundRequest, RoutedResponse, ErrorResponse])},
    }


def _inline(model: type[BaseModel], mode: str) -> dict[str, Any]:
    """``model``'s JSON Schema with every reference resolved in place (BentoML's client reads no ``$ref``)."""
    schema = model.model_json_schema(mode="validation" if mode == "validation" else "serialization")
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return resolve(definitions[ref.rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def bentoml_schema(settings: RouterSettings) -> dict[str, Any]:
    """BentoML's ``/schema.json`` for the router: the model service's ``refund_predict`` route with the router's
    response (``RoutedResponse``)."""
    route = {
        "name": PREDICT_OPERATION,
        "route": settings.predict_path,
        "batchable": False,
        "input": {**_inline(RefundRequest, "validation"), "root_input": True},
        "output": _inline(RoutedResponse, "serialization"),
        "doc": "Score one refund request.",
        "is_task": False,
    }
    return {"name": SERVICE_NAME, "type": "service", "routes": [route], "description": TITLE}
