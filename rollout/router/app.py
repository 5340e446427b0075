"""The traffic router: the public scoring API in front of the model services of a rollout (Starlette on uvicorn).

Per request: validate the body with :class:`service.api.schema.RefundRequest` (a 4xx naming the field, never a 5xx for
bad input) → issue the request's ``prediction_id`` (unguessable,
:func:`rollout.router.outcomes.prediction_log.new_prediction_id`: the one
key label feeds cite; the client's ``X-Correlation-ID`` is only traced) → pick the route from the routing table
(sticky on ``accountId``, else on the prediction ID) → forward the client's bytes to the deciding model service →
answer with the scoring contract plus ``prediction_id`` (headers ``X-Correlation-ID``, ``X-Prediction-ID``; with
``expose_decision_details`` the model's body plus ``stage``, ``role``, ``routed_to`` and ``X-Model-Version``) → hand
shadow calls to the :class:`~rollout.router.shadow.ShadowRunner` and the decider's prediction to the prediction log,
both
without waiting.

Stage → decider: ``stable`` and ``shadow`` → stable (the candidate shadows in ``shadow``); ``canary`` / ``ab`` → the
sticky split by ``candidate_weight``; ``full`` → the candidate. Whatever the candidate decides, stable scores in
shadow too (the control shadow: paired evidence on the candidate's own requests; in ``full`` the warm previous
version). A deciding candidate
that fails or exceeds ``candidate_timeout_s`` is answered for by stable (``fraudwatch_router_fallback_total``); when
stable fails the client gets a 503 naming the cause.

Public port: ``POST /api/v1/refund-predict``, ``GET /livez``, ``GET /readyz`` (a table is loaded and its stable
answered at least once), ``GET /openapi.json`` and BentoML's ``GET /schema.json`` (rollout/router/contract.py) — the
scoring contract, its documents and the probes, nothing else. A second listener of the same process
(``control_port``) serves ``GET /metrics`` (Prometheus), ``GET|PUT /admin/routing`` (bearer ``admin_token``) and
the outcome tracker's ``POST /api/v1/feedback`` and ``POST /api/v1/feedback/batch`` (a bearer token per label source:
``feedback_token`` as ``feedback_source``, and ``feedback_tokens_dir``; a label's source is the one its token names).

Run: ``python -m rollout.router`` or ``fraudwatch-router`` (settings from ``FW_ROLLOUT_ROUTER__…``, the prediction
log from ``FW_OUTCOMES__…``). Its routing table comes from ``PUT /admin/routing``, a file
(``FW_ROLLOUT_ROUTER__ROUTING_FILE``) or, on Kubernetes, the watched ModelRollout's ``status.routing``
(``FW_ROLLOUT_ROUTER__KUBE__ROLLOUT_NAME`` / ``__NAMESPACE``; rollout/router/table_sources.py).

SIGTERM: uvicorn stops accepting and finishes in-flight requests, then queued shadow work gets
``shadow_drain_timeout_s`` (the rest is dropped and counted), then the prediction log is flushed. A SIGKILL's loss
is counted by the next router on the same mark directory (rollout/router/outcomes/marks.py).

Exit codes: 2 a setting refused (no feedback token), 4 the prediction log's database unreachable at start (one JSON
line naming it, within ``FW_ROLLOUT_OUTCOMES__CONNECT_TIMEOUT_S`` for PostgreSQL), 3 another startup failure
(uvicorn's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rollout.core.routing import Arm, RoutePlan, RoutingTable, Stage, VersionEndpoint
from rollout.router.contract import BENTOML_SCHEMA_PATH, OPENAPI_PATH, bentoml_schema, openapi_document
from rollout.router.metrics import RouterMetrics
from rollout.router.otel import tracer_of
from rollout.router.outcomes.feedback import OutcomeTracker
from rollout.router.outcomes.online_labels import OnlineLabelSink, open_label_sink
from rollout.router.outcomes.prediction_log import (
    PREDICTION_ID_HEADER,
    PredictionLog,
    PredictionLogUnavailableError,
    PredictionRecord,
    new_prediction_id,
)
from rollout.router.outcomes.settings import get_outcome_settings
from rollout.router.shadow import PredictionSink, ShadowJob, ShadowRunner
from rollout.router.table_sources import FileTableSource, KubeRolloutTableSource, TableSource, TableStore
from rollout.router.upstream import Answer, Caller, Failure, Upstreams
from rollout.settings import FeedbackCredentialsError, RolloutSettings, RouterSettings, get_rollout_settings
from service.api.errors import error_response, validation_details
from service.api.schema import ErrorDetail, RefundRequest, confidence_of, decision_of
from service.common.http import bearer_matches, read_limited
from service.common.logging import (
    CORRELATION_HEADER,
    configure_logging,
    correlation_id_from_header,
    get_logger,
    log_event,
)
from service.common.tracing import (
    TRACEPARENT_HEADER,
    TRACESTATE_HEADER,
    TraceContext,
    passed_tracestate,
)

logger = get_logger("router")

ADMIN_PATH: Final[str] = "/admin/routing"
#: Exit codes of ``python -m rollout.router`` (besides uvicorn's own): a setting refused (no feedback token), and
#: the prediction log's database unreachable at start.
EXIT_REFUSED: Final[int] = 2
EXIT_DATABASE_UNREACHABLE: Final[int] = 4
MODEL_VERSION_HEADER: Final[str] = "X-Model-Version"
ADMIN_SOURCE: Final[str] = "admin"
_JSON: Final[str] = "application/json"
HTTP_OK: Final[int] = 200
_BAD_REQUEST: Final[int] = 400
_TOO_LARGE: Final[int] = 413
_INVALID: Final[int] = 422
_UNAVAILABLE: Final[int] = 503
_SERVER_ERROR: Final[int] = 500


@dataclass(frozen=True, slots=True)
class Decided:
    """The answer the client gets and who gave it."""

    answer: Answer
    endpoint: VersionEndpoint
    arm: Arm
    fallback_from: str | None


def response_fields(stage: Stage, arm: Arm, fallback_from: str | None) -> bytes:
    """The JSON members the router appends to the decider's body (leading comma, closing brace)."""
    members = f',"stage":{json.dumps(stage)},"role":"decider","routed_to":{json.dumps(arm)}'
    if fallback_from is not None:
        members += f',"fallback_from":{json.dumps(fallback_from)}'
    return (members + "}").encode("utf-8")


def sticky_key_of(settings: RouterSettings) -> bytes:
    """The configured sticky key, else a random one for this process (logged: stickiness across router replicas and
    restarts needs the shared key of the chart's Secret)."""
    configured = settings.sticky_secret()
    if configured is not None:
        return configured.encode("utf-8")
    log_event(logger, "no sticky key configured: a random key, sticky within this router process only",
              logging.WARNING, event="sticky_key_random")  # fmt: skip
    return secrets.token_bytes(32)


def public_body(answer: Answer, prediction_id: str, correlation_id: str) -> bytes:
    """The decider's answer cut to the scoring contract — what a client always gets (RouterSettings
    .expose_decision_details): score, threshold and versions stay inside. Built from
    the fields the router parsed already — the body is not parsed a second time on the response path."""
    kept: dict[str, object] = {
        "prediction": answer.prediction,
        "confidence": confidence_of(answer.score, answer.prediction),
        "decision": decision_of(answer.prediction),
        "prediction_id": prediction_id,
        "correlation_id": correlation_id,
    }
    if answer.reasons is not None:
        kept["reasons"] = answer.reasons
    return json.dumps(kept, separators=(",", ":")).encode("utf-8")


def upstream_headers(cid: str, span: TraceContext | None, tracestate: str | None) -> dict[str, str]:
    """The headers of a request's calls to model services: JSON, its correlation ID and, when it is traced, its span
    as the ``traceparent`` and the client's ``tracestate`` (passed on unchanged)."""
    headers = {"content-type": _JSON, CORRELATION_HEADER: cid}
    if span is not None:
        headers[TRACEPARENT_HEADER] = span.traceparent
        state = passed_tracestate(tracestate)
        if state is not None:
            headers[TRACESTATE_HEADER] = state
    return headers


def splice(body: bytes, fields: bytes) -> bytes:
    """``body`` (a non-empty JSON object, as received) with ``fields`` appended before its closing brace."""
    return body[:-1] + fields


def rejection_of(exc: ValidationError) -> tuple[int, str, list[ErrorDetail]]:
    """As the model service answers: 400 ``invalid_json`` for a body that is not JSON, else 422
    ``validation_error`` with one detail per invalid field."""
    details = validation_details(exc)
    if any(err["type"] == "json_invalid" for err in exc.errors(include_url=False)):
        return _BAD_REQUEST, "invalid_json", [d for d in details if d.field == "body"][:1]
    return _INVALID, "validation_error", details


class Router:
    """The router's state and handlers; :meth:`app` wraps them in a Starlette application."""

    def __init__(
        self,
        settings: RouterSettings,
        *,
        registry: CollectorRegistry | None = None,
        prediction_log: PredictionSink | None = None,
        extra_routes: Sequence[BaseRoute] = (),
        sources: Sequence[TableSource] = (),
        process_metrics: bool = True,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(
            self.registry, settings.latency_buckets_s, settings.score_delta_buckets, process_metrics=process_metrics
        )
        self.store = TableStore(sticky_key=sticky_key_of(settings))
        self.store.add_observer(self)
        self.upstreams = Upstreams(settings)
        self.caller = Caller(settings, self.upstreams, self.metrics)
        self.prediction_log = prediction_log
        self.shadow = ShadowRunner(settings, self.caller, self.metrics, prediction_log, lambda: self._deciding)
        self.sources = tuple(sources)
        self._extra_routes = tuple(extra_routes)
        self._admin_secret = settings.admin_secret()
        self._deciding = 0
        self._answered_urls: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._fields: dict[tuple[Stage, Arm, str | None], bytes] = {}
        self.tracer = tracer_of(settings)
        self._span_name = f"POST {settings.predict_path}"
        self._openapi = json.dumps(openapi_document(settings), separators=(",", ":")).encode("utf-8")
        self._bentoml_schema = json.dumps(bentoml_schema(settings), separators=(",", ":")).encode("utf-8")

    # ------------------------------------------------------------------ table store observer

    def table_applied(self, plan: RoutePlan, source: str) -> None:
        table = plan.table
        self.metrics.show_plan(plan)
        self.metrics.table_updates(source, "applied").inc()
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to retire yet
            self.upstreams.keep_only(e.url for e in table.endpoints())
        log_event(
            logger,
            "routing table applied",
            event="routing_table_applied",
            source=source,
            generation=table.generation,
            stage=table.stage,
            stable=table.stable.version,
            candidate=table.candidate.version if table.candidate else None,
            candidate_weight=table.candidate_weight,
            shadow=[e.version for e in table.shadow],
        )

    def table_refused(self, source: str, result: str, detail: str) -> None:
        self.metrics.table_updates(source, result).inc()
        log_event(
            logger, "routing table refused", logging.WARNING, event="routing_table_refused", source=source,
            result=result, detail=detail,
        )  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        for source in self.sources:
            table = source.load_now()
            if table is not None:
                self.store.offer(table, source.name)
        if self.prediction_log is not None:
            await self.prediction_log.start()
        self.shadow.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(s.run(self.store), name=f"source-{s.name}") for s in self.sources]
        self._tasks.append(loop.create_task(self._probe_stable(), name="stable-probe"))
        log_event(logger, "router started", event="router_started", sources=[s.name for s in self.sources])
        try:
            yield
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        queued = self.shadow.queued
        await self.shadow.drain(self.settings.shadow_drain_timeout_s)
        if self.prediction_log is not None:
            await self.prediction_log.close()
        await self.upstreams.aclose()
        self.tracer.shutdown()
        log_event(logger, "router stopped", event="router_stopped", shadow_queued_at_stop=queued)

    async def _probe_stable(self) -> None:
        """Until the current stable has answered once, ask its readiness endpoint every probe interval."""
        while True:
            plan = self.store.plan
            if plan is not None and plan.table.stable.url not in self._answered_urls:
                url = plan.table.stable.url
                status = await self.upstreams.client(url).status_of(
                    self.settings.upstream_ready_path, self.settings.stable_timeout_s
                )
                if status == HTTP_OK:
                    self._answered_urls.add(url)
            await asyncio.sleep(self.settings.ready_probe_interval_s)

    @property
    def ready(self) -> bool:
        plan = self.store.plan
        return plan is not None and plan.table.stable.url in self._answered_urls

    # ------------------------------------------------------------------ scoring

    async def predict(self, request: Request) -> Response:
        """The scoring endpoint, as one span of the request's trace (rollout/router/otel.py)."""
        span = self.tracer.start(request.headers.get(TRACEPARENT_HEADER), self._span_name)
        status = _SERVER_ERROR
        try:
            response = await self._predict(request, span.context)
            status = response.status_code
            return response
        finally:
            span.end(status)

    async def _predict(self, request: Request, span: TraceContext | None) -> Response:
        started = time.perf_counter()
        cid = correlation_id_from_header(request.headers.get(CORRELATION_HEADER))
        body = await read_limited(request, self.settings.max_body_bytes)
        if body is None:
            detail = ErrorDetail(field="body", message=f"request body larger than {self.settings.max_body_bytes} bytes")
            return self._respond_error(_TOO_LARGE, "payload_too_large", cid, started, [detail])
        try:
            parsed = RefundRequest.model_validate_json(body or b"{}")
        except ValidationError as exc:
            status, error, details = rejection_of(exc)
            return self._respond_error(status, error, cid, started, details)
        plan = self.store.plan
        if plan is None:
            self.metrics.unavailable("no_table").inc()
            detail = ErrorDetail(field="routing", message="no routing table loaded yet")
            return self._respond_error(_UNAVAILABLE, "no_routing_table", cid, started, [detail])
        entity = parsed.accountId
        pid = new_prediction_id()
        # Sticky on the account; without one, on the router's own ID (random per request): never on a value the
        # client chose, such as its correlation ID.
        route = plan.route(entity if entity is not None else pid)
        headers = upstream_headers(cid, span, request.headers.get(TRACESTATE_HEADER))
        received_at = datetime.now(UTC)
        self._deciding += 1
        try:
            # The decider also gets the prediction ID: its model server logs the served features under it
            # (service/data/feature_log.py); shadows do not (the decider's vector is the one served).
            decider_headers = {**headers, PREDICTION_ID_HEADER: pid}
            decided = await self._decide(plan, route.decider, route.fallback, route.arm, body, decider_headers)
        finally:
            self._deciding -= 1
        if isinstance(decided, Failure):
            return self._stable_failed(decided, plan, cid, started)
        answer = decided.answer
        exposed = self.settings.expose_decision_details
        if exposed:
            fields = self._response_fields(plan.stage, decided.arm, decided.fallback_from)
            content = splice(answer.body, b',"prediction_id":"' + pid.encode("ascii") + b'"' + fields)
        else:
            content = public_body(answer, pid, cid)
        self._record(plan, decided, pid, cid, entity, received_at)
        for shadow in route.shadows:
            if shadow.version != decided.endpoint.version:
                self.shadow.submit(
                    ShadowJob(
                        endpoint=shadow,
                        body=body,
                        headers=headers,
                        prediction_id=pid,
                        correlation_id=cid,
                        entity_key=entity,
                        received_at=received_at,
                        stage=plan.stage,
                        decider_version=decided.endpoint.version,
                        decider=answer,
                        table_stable_version=plan.table.stable.version,
                        enqueued_at=time.monotonic(),
                    )
                )
        elapsed = time.perf_counter() - started
        self.metrics.observe_response(plan.stage, 200, elapsed)
        if self.settings.log_decisions:
            log_event(
                logger,
                "routed",
                event="decision",
                correlation_id=cid,
                prediction_id=pid,
                trace_id=span.trace_id if span is not None else None,
                span_id=span.span_id if span is not None else None,
                stage=plan.stage,
                generation=plan.table.generation,
                routed_to=decided.arm,
                model_version=decided.endpoint.version,
                fallback_from=decided.fallback_from,
                score=answer.score,
                prediction=answer.prediction,
                latency_ms=round(elapsed * 1000.0, 3),
            )
        return Response(
            content,
            media_type=_JSON,
            headers={CORRELATION_HEADER: cid, PREDICTION_ID_HEADER: pid, MODEL_VERSION_HEADER: answer.reported_version}
            if exposed
            else {CORRELATION_HEADER: cid, PREDICTION_ID_HEADER: pid},
        )

    async def _decide(
        self,
        plan: RoutePlan,
        decider: VersionEndpoint,
        fallback: VersionEndpoint | None,
        arm: Arm,
        body: bytes,
        headers: dict[str, str],
    ) -> Decided | Failure:
        """Ask the decider; if it is a candidate and fails, ask stable; a stable failure is returned as is."""
        stage = plan.stage
        if fallback is None:
            result = await self.caller.call(decider, "decider", stage, body, headers, self.settings.stable_timeout_s)
            if isinstance(result, Answer):
                self._answered_urls.add(decider.url)
                return Decided(result, decider, arm, None)
            return result
        result = await self.caller.call(decider, "decider", stage, body, headers, self.settings.candidate_timeout_s)
        if isinstance(result, Answer):
            return Decided(result, decider, arm, None)
        self.metrics.fallbacks(decider.version, result.reason).inc()
        rescue = await self.caller.call(fallback, "decider", stage, body, headers, self.settings.stable_timeout_s)
        if isinstance(rescue, Answer):
            self._answered_urls.add(fallback.url)
            return Decided(rescue, fallback, "stable", decider.version)
        return rescue

    def _response_fields(self, stage: Stage, arm: Arm, fallback_from: str | None) -> bytes:
        key = (stage, arm, fallback_from)
        fields = self._fields.get(key)
        if fields is None:
            fields = response_fields(stage, arm, fallback_from)
            self._fields[key] = fields
        return fields

    def _record(
        self, plan: RoutePlan, decided: Decided, pid: str, cid: str, entity: str | None, received_at: datetime
    ) -> None:
        if self.prediction_log is None:
            return
        answer = decided.answer
        self.prediction_log.record(
            PredictionRecord(
                prediction_id=pid,
                entity_key=entity,
                ts=received_at,
                model_version=decided.endpoint.version,
                role="decider",
                score=answer.score,
                prediction=answer.prediction,
                threshold=answer.threshold,
                stage=plan.stage,
                stable_version=plan.table.stable.version,
                correlation_id=cid,
            )
        )

    def _stable_failed(self, failure: Failure, plan: RoutePlan, cid: str, started: float) -> Response:
        status = failure.status
        if failure.reason == "status_4xx" and status is not None:
            # The model service refused the input itself: the client's error, passed through unchanged.
            self.metrics.observe_response(plan.stage, status, time.perf_counter() - started)
            return Response(failure.body, status_code=status, media_type=_JSON, headers={CORRELATION_HEADER: cid})
        self.metrics.unavailable(f"stable_{failure.reason}").inc()
        message = f"stable model version {plan.table.stable.version} failed ({failure.reason})"
        log_event(
            logger, message, logging.WARNING, event="stable_failed", correlation_id=cid,
            model_version=plan.table.stable.version, reason=failure.reason, status=status,
        )  # fmt: skip
        detail = ErrorDetail(field="model_version", message=message)
        return self._respond_error(_UNAVAILABLE, "model_unavailable", cid, started, [detail], stage=plan.stage)

    def _respond_error(
        self,
        status: int,
        message: str,
        cid: str,
        started: float,
        details: Sequence[ErrorDetail] = (),
        stage: str | None = None,
    ) -> Response:
        plan = self.store.plan
        stage_label = stage if stage is not None else (plan.stage if plan is not None else "none")
        self.metrics.observe_response(stage_label, status, time.perf_counter() - started)
        return error_response(status, message, cid, details)

    # ------------------------------------------------------------------ health, metrics, admin

    async def livez(self, _request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def public_readyz(self, request: Request) -> Response:
        """The public probe: ready or not, without the stage, the generation or a version (the control listener's
        ``/readyz`` has them) — a client must not learn that a canary runs."""
        detailed = await self.readyz(request)
        status = "ready" if detailed.status_code == 200 else "not ready"
        return JSONResponse({"status": status}, status_code=detailed.status_code)

    async def readyz(self, _request: Request) -> Response:
        plan = self.store.plan
        if plan is None:
            return JSONResponse({"status": "not ready", "reason": "no routing table loaded"}, status_code=503)
        body: dict[str, Any] = {"generation": plan.table.generation, "stage": plan.stage}
        if not self.ready:
            reason = f"stable {plan.table.stable.version} has not answered yet"
            return JSONResponse({"status": "not ready", "reason": reason, **body}, status_code=503)
        return JSONResponse({"status": "ready", **body})

    async def openapi(self, _request: Request) -> Response:
        """The public port's OpenAPI 3.1 document (rollout/router/contract.py)."""
        return Response(self._openapi, media_type=_JSON)

    async def schema_json(self, _request: Request) -> Response:
        """BentoML's service schema, so ``bentoml.SyncHTTPClient(router_url)`` can call the scoring endpoint."""
        return Response(self._bentoml_schema, media_type=_JSON)

    async def metrics_endpoint(self, _request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _unauthorized(self) -> Response:
        message = "missing or wrong bearer token" if self._admin_secret else "admin endpoint disabled: no token set"
        response = error_response(401, message, None)
        response.headers["WWW-Authenticate"] = 'Bearer realm="fraudwatch-router"'
        return response

    async def get_routing(self, request: Request) -> Response:
        if not bearer_matches(request.headers.get("authorization"), self._admin_secret):
            return self._unauthorized()
        current = self.store.current
        if current is None:
            return error_response(404, "no routing table loaded", None)
        return JSONResponse({"source": current.source, "table": current.plan.table.model_dump(mode="json")})

    async def put_routing(self, request: Request) -> Response:
        if not bearer_matches(request.headers.get("authorization"), self._admin_secret):
            return self._unauthorized()
        body = await read_limited(request, self.settings.max_body_bytes)
        if body is None:
            return error_response(413, f"body larger than {self.settings.max_body_bytes} bytes", None)
        try:
            table = RoutingTable.model_validate_json(body)
        except ValidationError as exc:
            details = validation_details(exc)
            self.table_refused(ADMIN_SOURCE, "invalid", "; ".join(f"{d.field}: {d.message}" for d in details))
            return error_response(_INVALID, "invalid routing table", None, details)
        result = self.store.offer(table, ADMIN_SOURCE)
        current = self.store.current
        held = current.plan.table if current is not None else table
        if result == "stale":
            message = f"stale routing table: generation {table.generation} < current {held.generation}"
            return error_response(409, message, None, [ErrorDetail(field="generation", message=message)])
        return JSONResponse({"result": result, "table": held.model_dump(mode="json")})

    # ------------------------------------------------------------------ application

    def public_routes(self) -> list[BaseRoute]:
        """The public port: the scoring contract, its documents (OpenAPI, BentoML's schema) and the probes, nothing
        else."""
        return [
            Route(self.settings.predict_path, self.predict, methods=["POST"]),
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.public_readyz, methods=["GET"]),
            Route(OPENAPI_PATH, self.openapi, methods=["GET"]),
            Route(BENTOML_SCHEMA_PATH, self.schema_json, methods=["GET"]),
            *self._extra_routes,
        ]

    def control_routes(self) -> list[BaseRoute]:
        """The control listener's own routes (besides the label feed's): ``/metrics`` for Prometheus and
        ``GET|PUT /admin/routing`` (bearer token), never on the public port."""
        return [
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route(ADMIN_PATH, self.get_routing, methods=["GET"]),
            Route(ADMIN_PATH, self.put_routing, methods=["PUT"]),
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    def app(self) -> Starlette:
        """The public app (it owns the router's lifespan: sources, upstream pools, shadow workers, the log)."""
        app = Starlette(routes=self.public_routes(), lifespan=self.lifespan)
        app.state.router = self
        return app

    def control_app(self, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
        """The control listener's app: :meth:`control_routes` and ``extra_routes`` (the label feed's)."""
        return Starlette(routes=[*extra_routes, *self.control_routes()])


class FeedbackTokenMissingError(RuntimeError):
    """No feedback token is configured and ``feedback_insecure_dev`` is not set, or the label sources' tokens are
    inconsistent: the router refuses to start."""


@dataclass(frozen=True)
class RouterApps:
    """The public scoring app and the control app (the label feed's listener) of one router process."""

    public: Starlette
    control: Starlette
    prediction_log: PredictionLog
    #: Where recorded fraud labels also go (the online feature store), if configured; closed by :func:`main`.
    label_sink: OnlineLabelSink | None = None


def create_apps(settings: RolloutSettings | None = None) -> RouterApps:
    """The production apps: the file source and the ModelRollout watch (each when configured), the prediction log
    and the outcome metrics on one registry; the feedback routes only on the control app, behind its bearer token."""
    rollout_settings = settings or get_rollout_settings()
    router_settings = rollout_settings.router
    try:
        credentials = router_settings.feedback_credentials()
    except (FeedbackCredentialsError, OSError) as exc:
        raise FeedbackTokenMissingError(f"label sources' tokens: {exc}") from exc
    if not credentials and not router_settings.feedback_insecure_dev:
        raise FeedbackTokenMissingError(
            "no feedback token: set FW_ROLLOUT_ROUTER__FEEDBACK_TOKEN_FILE (or __FEEDBACK_TOKEN) or "
            "__FEEDBACK_TOKENS_DIR (one token file per label source); "
            "FW_ROLLOUT_ROUTER__FEEDBACK_INSECURE_DEV=true accepts unauthenticated labels (development only)"
        )
    if credentials:
        log_event(logger, "feedback listener", label_sources=sorted(credentials))
    else:
        log_event(logger, "feedback listener without a token: labels are accepted unauthenticated", logging.WARNING)
    registry = CollectorRegistry()
    log = PredictionLog(get_outcome_settings(), registry=registry)
    label_sink = open_label_sink(router_settings.online_store, registry)
    tracker = OutcomeTracker(
        log,
        registry=registry,
        tokens=credentials,
        insecure_dev=router_settings.feedback_insecure_dev,
        label_sink=label_sink,
    )
    sources: list[TableSource] = []
    if router_settings.routing_file is not None:
        sources.append(FileTableSource(router_settings.routing_file, router_settings.poll_interval_s))
    if router_settings.kube.rollout_name is not None:
        sources.append(KubeRolloutTableSource(router_settings.kube))
    router = Router(router_settings, registry=registry, prediction_log=log, sources=sources)
    router.store.add_observer(tracker)  # outcome and paired series of each table's versions start at zero
    return RouterApps(
        public=router.app(), control=router.control_app(tracker.routes()), prediction_log=log, label_sink=label_sink
    )


def control_port_of(settings: RouterSettings) -> int:
    """The control listener's port: ``control_port``, else the public port + 1."""
    return settings.control_port if settings.control_port is not None else settings.port + 1


class _ControlServer(uvicorn.Server):
    """The control listener: it leaves signals to the public server, which stops it (see :func:`serve`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _PublicServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, companion: uvicorn.Server) -> None:
        super().__init__(config)
        self.companion = companion

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.companion.should_exit = True


async def serve(public: uvicorn.Server, control: uvicorn.Server) -> None:
    """Both listeners in one event loop; when the public one stops (SIGTERM), so does the control one."""
    control_task = asyncio.create_task(control.serve())
    try:
        await public.serve()
    finally:
        control.should_exit = True
        await control_task


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fraudwatch-router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="bind address (default: FW_ROLLOUT_ROUTER__HOST)")
    parser.add_argument("--port", type=int, help="port (default: FW_ROLLOUT_ROUTER__PORT)")
    parser.add_argument("--control-port", type=int, help="feedback listener port (FW_ROLLOUT_ROUTER__CONTROL_PORT)")
    parser.add_argument("--routing-file", type=Path, help="routing table file (FW_ROLLOUT_ROUTER__ROUTING_FILE)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    base = get_rollout_settings()
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "control_port": args.control_port,
            "routing_file": args.routing_file,
        }.items()
        if v is not None
    }
    settings = base.model_copy(update={"router": base.router.model_copy(update=overrides)})
    configure_logging(settings.log_level)
    router_settings = settings.router
    try:
        apps = create_apps(settings)
    except FeedbackTokenMissingError as exc:
        log_event(logger, "router refuses to start", logging.ERROR, error=str(exc))
        raise SystemExit(EXIT_REFUSED) from exc
    try:  # before listening: an unreachable database is one clear line and an exit, not a startup traceback
        apps.prediction_log.check_reachable()
    except PredictionLogUnavailableError as exc:
        log_event(logger, "router refuses to start", logging.ERROR, event="prediction_log_unreachable", error=str(exc))
        raise SystemExit(EXIT_DATABASE_UNREACHABLE) from exc
    control = _ControlServer(
        uvicorn.Config(
            apps.control,
            host=router_settings.control_host or router_settings.host,
            port=control_port_of(router_settings),
            access_log=False,
            log_config=None,
            lifespan="off",
        )
    )
    public_config = uvicorn.Config(
        apps.public,
        host=router_settings.host,
        port=router_settings.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(router_settings.graceful_shutdown_s),
        lifespan="on",
    )
    try:
        asyncio.run(serve(_PublicServer(public_config, control), control))
    finally:
        if apps.label_sink is not None:  # the labels still queued are written (within close_timeout_s)
            apps.label_sink.close()


if __name__ == "__main__":
    main()
