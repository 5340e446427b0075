"""The BentoML scoring service: ``bentoml serve service.serving.bento:RefundFraudService``.

* Loads the model bundle ONCE per worker, in a background thread started by ``__init__`` so that ``/livez``
  answers at once and ``/readyz`` is 503 until the model is loaded, verified (SHA-256) and warmed up
  (BentoML 1.4 calls ``__is_ready__`` / ``__is_alive__`` for those probes).
* ``POST /api/v1/refund-predict`` takes the seed's top-level JSON body (``yearsActive``, ``amount``,
  ``ipAccounts``, optional ``accountId``, ``itemDescription``) and answers a :class:`RefundResponse`;
  ``POST /api/v1/refund-predict-batch`` takes ``{"requests": [...]}`` and answers a :class:`BatchResponse`.
* :class:`RequestGuard` (a pure ASGI middleware) runs before BentoML on those routes: correlation ID in and out
  (``X-Correlation-ID``), body-size limit (413), JSON + schema validation into :class:`ErrorResponse` naming
  each field (400 invalid JSON, 422 invalid fields), 503 while the model is not loaded, latency and error
  metrics. BentoML's own handling would answer 400 with pydantic's ``detail`` list and log a full traceback per
  bad request; validating first keeps bad input cheap and the error body ours. With ``serve.dispatch = direct``
  (the default) the guard then answers the validated request itself through the same :func:`answer_single` /
  :func:`answer_batch` the API methods call; ``bentoml`` hands the body on to BentoML's API method instead.
* Entity aggregates come from the bundle's feature store within ``serve.feature_store_timeout_ms``; the velocity
  features from the online store shared by every version (``service/data/online_store.py``) within
  ``serve.online_store.timeout_ms`` (one round trip; else the defaults, the reason counted), and every scored request
  is handed to its background writer after scoring (never waited for); adaptive batching (BentoML's CorkDispatcher
  over float32 feature rows) is optional (``serve.adaptive_batching``).

Why these defaults (adaptive batching off, the direct C call, one worker, ``dispatch = direct``): the figures of
``benchmarks/serving_benchmark.py`` in docs/architecture.md, "Serving: what was measured".
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import bentoml
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ValidationError

from service.api.errors import error_body, validation_details
from service.api.schema import (
    REASONS_HEADER,
    REASONS_OFF,
    BatchRequest,
    BatchResponse,
    ErrorDetail,
    ErrorResponse,
    RefundRequest,
    RefundResponse,
    confidence_of,
    decision_of,
)
from service.artifacts.bundle import MANIFEST_FILE, ScoringModel, load_bundle
from service.artifacts.source import ModelUnavailableError, ResolvedBundle, resolve_bundle
from service.common import processes as proctree
from service.common.logging import (
    CORRELATION_HEADER,
    CORRELATION_ID,
    configure_logging,
    correlation_id_from_header,
    get_logger,
    log_event,
    new_correlation_id,
)
from service.common.tracing import TRACEPARENT_HEADER, TraceContext, parse_traceparent
from service.data.feature_log import (
    PREDICTION_ID,
    PREDICTION_ID_HEADER,
    FeatureLogWriter,
    open_writer,
    prediction_id_from_header,
)
from service.data.feature_store import FALLBACK_REASONS, BudgetedLookup, SQLiteFeatureStore, budget_seconds, open_store
from service.data.features import DEFAULT_AGGREGATES, FEATURE_NAMES, EntityAggregates, feature_matrix
from service.data.online_store import OnlineFeatures, open_online_features, request_events
from service.data.velocity import VELOCITY_FEATURES
from service.serving.metrics import NO_MODEL, BoundMetrics, Metrics, default_metrics
from service.serving.reasons import rows_to_explain, top_reasons
from service.settings import Settings, get_settings

PREDICT_ROUTE: Final[str] = "/api/v1/refund-predict"
BATCH_ROUTE: Final[str] = "/api/v1/refund-predict-batch"
PREDICT_ENDPOINT: Final[str] = "refund_predict"
BATCH_ENDPOINT: Final[str] = "refund_predict_batch"
#: Fallback reason when the bundle ships no feature store but a request names an entity.
UNAVAILABLE: Final[str] = "unavailable"
#: Under ``settings.home``: each worker's private copy of the verified feature store (see :func:`verified_copy_dir`).
VERIFIED_DIR: Final[str] = "verified"

LOGGER = get_logger("bento")
_REQUEST_START: ContextVar[float | None] = ContextVar("fraudwatch_request_start", default=None)
#: The caller's span (W3C ``traceparent``: the router's), logged with each decision so a trace can be followed here.
_CALLER_SPAN: ContextVar[TraceContext | None] = ContextVar("fraudwatch_caller_span", default=None)
#: False when the caller discards the reasons (``REASONS_HEADER: off``, the router's shadow calls).
_REASONS_WANTED: ContextVar[bool] = ContextVar("fraudwatch_reasons_wanted", default=True)

FloatArray = npt.NDArray[np.float32]
ScoreArray = npt.NDArray[np.float64]
Batcher = Callable[[FloatArray], Awaitable[ScoreArray]]
ASGIScope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]


# --------------------------------------------------------------------------------------------------- loading


def wait_for_bundle(settings: Settings) -> ResolvedBundle:
    """Resolve the bundle directory and its digest (``service.artifacts.source``: a directory, or a verified download
    from the registry), waiting up to ``serve.model_wait_timeout_s`` for its manifest to appear."""
    deadline = time.monotonic() + settings.serve.model_wait_timeout_s
    while True:
        resolved = resolve_bundle(settings)
        if (resolved.directory / MANIFEST_FILE).is_file():
            return resolved
        if time.monotonic() >= deadline:
            raise ModelUnavailableError(f"no model bundle at {resolved.directory}")
        time.sleep(settings.serve.model_poll_interval_s)


@dataclass(frozen=True)
class ReasonsPolicy:
    """Which decisions carry reasons, and how many (``serve.reasons_on_review``, ``serve.reasons_top_k``)."""

    on_review: bool
    top_k: int


@dataclass
class Runtime:
    """Everything a loaded worker needs to decide: the verified model, its bound metrics, the store lookup."""

    model: ScoringModel
    metrics: BoundMetrics
    store: SQLiteFeatureStore | None
    lookup: BudgetedLookup | None
    directory: Path
    predict: Callable[[FloatArray], ScoreArray]
    reasons: ReasonsPolicy
    batcher: Batcher | None = None
    #: The served feature vectors under the router's prediction ID (``FW_FEATURE_LOG__ENABLED``).
    feature_log: FeatureLogWriter | None = None
    #: The online store (velocity features; written with every scored request whatever the model reads).
    online: OnlineFeatures | None = None

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def reads_velocity(self) -> bool:
        return self.online is not None and any(name in VELOCITY_FEATURES for name in self.model.manifest.feature_names)

    async def aggregates(self, requests: Sequence[RefundRequest]) -> list[EntityAggregates]:
        keys = [request.accountId for request in requests]
        if self.lookup is not None:
            return await self.lookup.alookup(keys)
        self.metrics.count_fallbacks(UNAVAILABLE, sum(key is not None for key in keys))
        return [DEFAULT_AGGREGATES] * len(keys)

    async def scores(self, features: FloatArray) -> ScoreArray:
        if self.batcher is not None and features.shape[0] == 1:
            return await self.batcher(features)
        return self.predict(features)

    async def decide(self, requests: Sequence[RefundRequest], correlation_ids: Sequence[str]) -> list[RefundResponse]:
        """Score ``requests`` (one feature path, shared with training), count them, log one line each; the i-th
        answer carries ``correlation_ids[i]``."""
        aggregates = await self.aggregates(requests)
        events = None
        velocities = None
        if self.online is not None:
            events = request_events(requests, correlation_ids, self.online.settings, int(time.time() * 1000))
            velocities = self.online.read(events) if self.reads_velocity else None
        rows = [request_row(request) for request in requests]
        features = self.model.model_input(feature_matrix(rows, aggregates, velocities))
        scores = await self.scores(features)
        predictions = self.model.predictions(scores)
        self.metrics.observe(features, scores, predictions)
        if self.feature_log is not None:
            keys = [request.accountId for request in requests]
            self.feature_log.record_decisions(PREDICTION_ID.get(), keys, features, scores, predictions)
        responses = [
            build_response(score, int(prediction), self.model.threshold, self.version, correlation_id)
            for score, prediction, correlation_id in zip(
                scores.tolist(), predictions.tolist(), correlation_ids, strict=True
            )
        ]
        explain = (
            rows_to_explain(predictions.tolist(), [r.explain for r in requests], self.reasons.on_review)
            if _REASONS_WANTED.get()
            else []
        )
        if explain:
            contributions = self.model.contributions(features[explain])
            for row, index in zip(contributions, explain, strict=True):
                responses[index].reasons = top_reasons(row, FEATURE_NAMES, self.reasons.top_k)
        log_decisions(requests, responses)
        if self.online is not None and events is not None:
            self.online.record(events)
        return responses

    def close(self) -> None:
        if self.feature_log is not None:
            self.feature_log.close()
        if self.online is not None:
            self.online.close()
        if self.lookup is not None:
            self.lookup.close()
        if self.store is not None:
            self.store.close()


def request_row(request: RefundRequest) -> dict[str, Any]:
    """The request as a row of the shared feature code (training uses the same column names)."""
    return {
        "yearsActive": request.yearsActive,
        "amount": request.amount,
        "ipAccounts": request.ipAccounts,
        "itemDescription": request.itemDescription,
    }


def build_response(
    score: float, prediction: int, threshold: float, version: str, correlation_id: str
) -> RefundResponse:
    return RefundResponse(
        prediction=prediction,
        confidence=confidence_of(score, prediction),
        score=score,
        decision=decision_of(prediction),
        threshold=threshold,
        model_version=version,
        correlation_id=correlation_id,
    )


def log_decisions(requests: Sequence[RefundRequest], responses: Sequence[RefundResponse]) -> None:
    """One JSON line per decision: no request fields except the entity key."""
    if not LOGGER.isEnabledFor(logging.INFO):
        return
    start = _REQUEST_START.get()
    latency_ms = None if start is None else round((time.perf_counter() - start) * 1000.0, 3)
    batch = len(responses) > 1
    caller = _CALLER_SPAN.get()
    for index, (request, response) in enumerate(zip(requests, responses, strict=True)):
        log_event(
            LOGGER,
            "decision",
            correlation_id=response.correlation_id,
            model_version=response.model_version,
            account_id=request.accountId,
            score=response.score,
            decision=response.decision,
            latency_ms=latency_ms,
            trace_id=caller.trace_id if caller is not None else None,
            parent_span_id=caller.span_id if caller is not None else None,
            **({"item": index} if batch else {}),
        )


class DirectPredictor:
    """Calibrated scores through XGBoost's C function ``XGBoosterPredictFromDense`` (its public C API), called
    exactly as ``Booster.inplace_predict`` calls it for a float32 numpy array, with the JSON arguments built once.

    Measured here (CPU per single-row call, 156 trees): ``inplace_predict`` ≈ 180-250 µs, of which ≈ 150 µs is
    Python (argument checks, JSON, array-interface wrapping) and ≈ 45 µs is a fresh proxy DMatrix that the C
    function builds when none is passed (its context reads cgroup files and maps/unmaps buffers on every call).
    This calls the same function with a per-thread proxy kept across calls (the proxy only carries meta info such
    as base margins, of which there are none): ≈ 55 µs. :func:`choose_predictor` uses it only after it has
    reproduced ``ScoringModel.raw_scores`` bit for bit.
    """

    def __init__(self, model: ScoringModel) -> None:
        from xgboost.core import _LIB, _check_call, _ProxyDMatrix

        self._lib = _LIB
        self._check = _check_call
        self._new_proxy = _ProxyDMatrix
        self._local = threading.local()
        self._ulong = ctypes.c_uint64  # xgboost.core.c_bst_ulong
        self._handle = model.booster.handle
        self._calibration = model.manifest.calibration
        self._args = json.dumps(
            {
                "type": 0,
                "training": False,
                "iteration_begin": 0,
                "iteration_end": 0,
                "missing": float("nan"),
                "strict_shape": False,
                "cache_id": 0,
            }
        ).encode()

    def raw_scores(self, features: FloatArray) -> FloatArray:
        data = np.ascontiguousarray(features, dtype=np.float32)
        interface = {"data": (data.ctypes.data, True), "shape": data.shape, "strides": None, "typestr": "<f4"}
        shape = ctypes.POINTER(self._ulong)()
        dims = self._ulong()
        out = ctypes.POINTER(ctypes.c_float)()
        self._check(
            self._lib.XGBoosterPredictFromDense(
                self._handle,
                json.dumps({**interface, "version": 3}).encode(),
                self._args,
                self._proxy().handle,
                ctypes.byref(shape),
                ctypes.byref(dims),
                ctypes.byref(out),
            )
        )
        if dims.value != 1 or int(shape[0]) != data.shape[0]:
            raise ValueError(f"unexpected prediction shape ({dims.value} dims) for {data.shape[0]} rows")
        # The buffer belongs to the booster (reused by its next prediction on this thread): copy it out.
        return np.ctypeslib.as_array(out, shape=(data.shape[0],)).copy()

    def scores(self, features: FloatArray) -> ScoreArray:
        return self._calibration.apply(self.raw_scores(features))

    def _proxy(self) -> Any:
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = self._local.proxy = self._new_proxy()
        return proxy


def choose_predictor(settings: Settings, model: ScoringModel, probe: FloatArray) -> Callable[[FloatArray], ScoreArray]:
    """:class:`DirectPredictor` when enabled and bit-identical to ``inplace_predict`` on ``probe`` (row by row and
    as one batch), else ``ScoringModel.scores``."""
    if not settings.serve.direct_predict:
        return model.scores
    try:
        direct = DirectPredictor(model)
        same = np.array_equal(direct.raw_scores(probe), model.raw_scores(probe)) and all(
            np.array_equal(direct.raw_scores(probe[i : i + 1]), model.raw_scores(probe[i : i + 1]))
            for i in range(probe.shape[0])
        )
    except Exception:
        LOGGER.exception("direct predictor unavailable; using inplace_predict")
        return model.scores
    if not same:
        log_event(LOGGER, "direct predictor differs from inplace_predict; using inplace_predict", logging.WARNING)
        return model.scores
    return direct.scores


def probe_rows(model: ScoringModel) -> FloatArray:
    """Rows spread over the model's reference bins (and defaults elsewhere) to check a predictor against."""
    requests = [
        RefundRequest(yearsActive=years, amount=amount, ipAccounts=ips, itemDescription=text)
        for years, amount, ips, text in (
            (1.5, 45.0, 2, None),
            (0.02, 100.0, 40, "Gift card"),
            (6.0, 1899.99, 1, "Laptop arrived damaged"),
            (3.0, 12.99, 3, "Pad Thai with tofu"),
            (0.5, 250.0, 7, "Winter jacket wrong size"),
        )
    ]
    aggregates = [
        DEFAULT_AGGREGATES,
        EntityAggregates(prior_refunds=9.0, avg_refund_amount=20.0, known=True),
        EntityAggregates(prior_refunds=1.0, avg_refund_amount=300.0, known=True),
        DEFAULT_AGGREGATES,
        EntityAggregates(prior_refunds=4.0, avg_refund_amount=80.0, known=True),
    ]
    return model.model_input(feature_matrix([request_row(request) for request in requests], aggregates))


def make_batcher(predict: Callable[[FloatArray], ScoreArray], settings: Settings) -> Batcher:
    """BentoML's adaptive batcher (the CorkDispatcher behind ``batchable=True`` APIs) over float32 feature rows:
    concurrent single requests are stacked into one prediction call."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher
    from bentoml.exceptions import ServiceUnavailable

    def overloaded() -> ScoreArray:
        raise ServiceUnavailable("scoring queue over its latency budget")

    async def score_many(batches: Sequence[FloatArray]) -> list[ScoreArray]:
        stacked = np.concatenate(batches) if len(batches) > 1 else batches[0]
        scores = predict(stacked)
        cuts = np.cumsum([batch.shape[0] for batch in batches])[:-1]
        return list(np.split(scores, cuts))

    dispatcher: Any = CorkDispatcher(
        max_latency_in_ms=settings.serve.batch_max_latency_ms,
        max_batch_size=settings.serve.batch_max_size,
        fallback=overloaded,
        get_batch_size=lambda rows: int(rows.shape[0]),
    )
    batched: Batcher = dispatcher(score_many)
    return batched


def verified_copy_dir(settings: Settings) -> Path:
    """A new directory only this worker can read (``<home>/verified/pid-<pid>-…``, removed at exit), for the copy of
    the feature store made from the bytes the bundle digest covers. Directories of workers that are gone are removed
    first (a SIGKILLed worker leaves its copy)."""
    base = settings.home / VERIFIED_DIR
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob("pid-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not proctree.alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix=f"pid-{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, private, True)
    return private


def load_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Resolve, verify (the digest over every file) and warm up the bundle; open its feature store if it ships one —
    the private copy written from the hashed bytes, never the bundle's file, which could change after the check."""
    resolved = wait_for_bundle(settings)
    directory = resolved.directory
    private = verified_copy_dir(settings)
    try:
        model = load_bundle(directory, nthread=1, expected_digest=resolved.digest, copy_to=private)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    bound = metrics.bind(
        model.manifest, endpoints=(PREDICT_ENDPOINT, BATCH_ENDPOINT), fallback_reasons=(*FALLBACK_REASONS, UNAVAILABLE)
    )
    store = open_store(private)
    lookup = (
        None
        if store is None
        else BudgetedLookup(
            store,
            budget_seconds(settings),
            on_fallback=bound.count_fallbacks,
            on_lookups=bound.count_lookups,
            inline=settings.serve.feature_store_inline,
            threads=settings.serve.feature_store_threads,
        )
    )
    predict = choose_predictor(settings, model, probe_rows(model))
    predict(probe_rows(model))  # warm-up: the first prediction allocates XGBoost's buffers
    model.contributions(probe_rows(model)[:1])  # warm-up of the reasons' path (its first DMatrix)
    batcher = make_batcher(predict, settings) if settings.serve.adaptive_batching else None
    features_log = open_writer(
        settings.feature_log, settings.feature_log_dir, model.version, model.manifest.feature_names
    )
    reasons = ReasonsPolicy(on_review=settings.serve.reasons_on_review, top_k=settings.serve.reasons_top_k)
    online = open_online_features(settings, metrics.online(model.version))
    return Runtime(
        model=model,
        metrics=bound,
        store=store,
        lookup=lookup,
        directory=directory,
        predict=predict,
        batcher=batcher,
        feature_log=features_log,
        reasons=reasons,
        online=online,
    )


@dataclass
class ServingState:
    """What this worker process serves; shared by the service instance and :class:`RequestGuard`."""

    runtime: Runtime | None = None
    failure: str | None = None
    metrics: Metrics | None = None

    def count_error(self, endpoint: str, reason: str) -> None:
        if self.runtime is not None:
            self.runtime.metrics.count_error(endpoint, reason)
        elif self.metrics is not None:
            self.metrics.errors.labels(NO_MODEL, endpoint, reason).inc()


STATE = ServingState()


# ------------------------------------------------------------------------------------------ request guard

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Rejection:
    """A 4xx/5xx answered by the guard itself; ``reason`` labels the error counter."""

    status: int
    body: ErrorResponse
    reason: str


def rejection_of(exc: ValidationError, correlation_id: str) -> Rejection:
    """400 for a body that is not JSON, else 422 with one detail per invalid field."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    invalid_json = [error for error in errors if error["type"] == "json_invalid"]
    if invalid_json:
        details = [ErrorDetail(field="body", message=str(invalid_json[0]["msg"]))]
        return Rejection(400, error_body("invalid_json", correlation_id, details), "invalid_json")
    return Rejection(422, error_body("validation_error", correlation_id, validation_details(exc)), "validation")


def _parse(model: type[M], body: bytes, correlation_id: str) -> M | Rejection:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return rejection_of(exc, correlation_id)


def validate_single(body: bytes, settings: Settings, correlation_id: str) -> RefundRequest | Rejection:
    return _parse(RefundRequest, body, correlation_id)


def validate_batch(body: bytes, settings: Settings, correlation_id: str) -> BatchRequest | Rejection:
    parsed = _parse(BatchRequest, body, correlation_id)
    if isinstance(parsed, Rejection):
        return parsed
    n_items, limit = len(parsed.requests), settings.serve.max_batch_items
    if n_items <= limit:
        return parsed
    detail = ErrorDetail(field="requests", message=f"at most {limit} requests per batch, got {n_items}")
    return Rejection(422, error_body("validation_error", correlation_id, [detail]), "batch_too_large")


def too_large(limit: int, correlation_id: str) -> Rejection:
    detail = ErrorDetail(field="body", message=f"request body larger than {limit} bytes")
    return Rejection(413, error_body("payload_too_large", correlation_id, [detail]), "payload_too_large")


def not_loaded(state: ServingState, correlation_id: str) -> Rejection:
    error = "model_unavailable" if state.failure is not None else "model_not_ready"
    return Rejection(503, error_body(error, correlation_id), error)


def error_reason(status: int) -> str | None:
    """The error-counter reason of a response that came from BentoML itself (after the guard let it through)."""
    if status == 503:
        return "overloaded"
    if status >= 500:
        return "internal"
    if status >= 400:
        return f"http_{status}"
    return None


Validator = Callable[[bytes, Settings, str], Any]
#: Answers a validated request (``dispatch = direct``); the API methods call the same functions.
Handler = Callable[[Runtime, Any, str], Awaitable[BaseModel]]


async def answer_single(runtime: Runtime, request: RefundRequest, correlation_id: str) -> RefundResponse:
    (response,) = await runtime.decide([request], [correlation_id])
    return response


async def answer_batch(runtime: Runtime, batch: BatchRequest, correlation_id: str) -> BatchResponse:
    ids = batch.correlation_ids if batch.correlation_ids is not None else [correlation_id] * len(batch.requests)
    results = await runtime.decide(batch.requests, ids)
    return BatchResponse(results=results, model_version=runtime.version, correlation_id=correlation_id)


@dataclass(frozen=True)
class Route:
    endpoint: str
    validate: Validator
    answer: Handler


@dataclass(frozen=True)
class Admitted:
    """A request that passed the guard: its raw body (for BentoML) and its parsed, validated model."""

    body: bytes
    parsed: BaseModel


class RequestGuard:
    """Pure ASGI middleware for the scoring routes; every other path passes through untouched."""

    def __init__(self, app: ASGIApp, state: ServingState, settings: Settings | None = None) -> None:
        self.app = app
        self.state = state
        self.settings = settings if settings is not None else get_settings()
        self.routes: Mapping[str, Route] = {
            PREDICT_ROUTE: Route(PREDICT_ENDPOINT, validate_single, answer_single),
            BATCH_ROUTE: Route(BATCH_ENDPOINT, validate_batch, answer_batch),
        }
        self.direct = self.settings.serve.dispatch == "direct"
        self.log_features = self.settings.feature_log.enabled

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = route.endpoint
        headers = _headers(scope)
        correlation_id = correlation_id_from_header(headers.get(CORRELATION_HEADER.lower()))
        cid_token = CORRELATION_ID.set(correlation_id)
        start_token = _REQUEST_START.set(start)
        pid_token = (
            PREDICTION_ID.set(prediction_id_from_header(headers.get(PREDICTION_ID_HEADER.lower())))
            if self.log_features
            else None
        )
        span_token = _CALLER_SPAN.set(parse_traceparent(headers.get(TRACEPARENT_HEADER)))
        reasons_token = _REASONS_WANTED.set(headers.get(REASONS_HEADER.lower()) != REASONS_OFF)
        try:
            admitted = await self._admit(receive, route.validate, headers, correlation_id)
            if isinstance(admitted, Rejection):
                await self._reject(send, endpoint, admitted, correlation_id)
                reason: str | None = admitted.reason
            elif self.direct:
                reason = await self._answer(send, route, admitted.parsed, correlation_id)
            else:
                reason = error_reason(await self._forward(scope, receive, send, admitted.body, correlation_id))
        finally:
            CORRELATION_ID.reset(cid_token)
            _REQUEST_START.reset(start_token)
            if pid_token is not None:
                PREDICTION_ID.reset(pid_token)
            _CALLER_SPAN.reset(span_token)
            _REASONS_WANTED.reset(reasons_token)
        runtime = self.state.runtime
        if runtime is not None:
            runtime.metrics.observe_latency(endpoint, time.perf_counter() - start)
        if reason is not None:
            self.state.count_error(endpoint, reason)

    async def _admit(
        self, receive: ASGIReceive, validator: Validator, headers: Mapping[str, str], correlation_id: str
    ) -> Admitted | Rejection:
        """The validated request, or why it is rejected (model not loaded, too large, invalid)."""
        if self.state.runtime is None:
            return not_loaded(self.state, correlation_id)
        limit = self.settings.serve.max_body_bytes
        body = None if _declared_length(headers) > limit else await _read_body(receive, limit)
        if body is None:
            return too_large(limit, correlation_id)
        parsed = validator(body, self.settings, correlation_id)
        return parsed if isinstance(parsed, Rejection) else Admitted(body, parsed)

    async def _answer(self, send: ASGISend, route: Route, parsed: BaseModel, correlation_id: str) -> str | None:
        """Answer a validated request here (``dispatch = direct``); the error-counter reason, or None on success."""
        runtime = self.state.runtime
        if runtime is None:  # unloaded between admission and now: cannot happen today (models are never unloaded)
            rejection = not_loaded(self.state, correlation_id)
            await self._reject(send, route.endpoint, rejection, correlation_id)
            return rejection.reason
        try:
            response = await route.answer(runtime, parsed, correlation_id)
        except Exception:
            LOGGER.exception("scoring failed")
            error = error_body("internal_error", correlation_id)
            await _send_json(send, 500, error.model_dump_json().encode("utf-8"), correlation_id)
            return "internal"
        await _send_json(send, 200, response.model_dump_json().encode("utf-8"), correlation_id)
        return None

    async def _forward(
        self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend, body: bytes, correlation_id: str
    ) -> int:
        """Hand the (already read) body to BentoML; add the correlation header; return the response status."""
        status = 500
        header = (CORRELATION_HEADER.lower().encode("latin-1"), correlation_id.encode("latin-1"))
        replayed = False

        async def replay() -> ASGIMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_with_id(message: ASGIMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        # The body is validated JSON: BentoML must parse it as JSON whatever the client's Content-Type said.
        forwarded = {**scope, "headers": [*_without_content_type(scope), (b"content-type", b"application/json")]}
        await self.app(forwarded, replay, send_with_id)
        return status

    async def _reject(self, send: ASGISend, endpoint: str, rejection: Rejection, correlation_id: str) -> None:
        await _send_json(send, rejection.status, rejection.body.model_dump_json().encode("utf-8"), correlation_id)
        log_event(
            LOGGER,
            "request rejected",
            level=logging.WARNING,
            endpoint=endpoint,
            status=rejection.status,
            error=rejection.body.error,
            fields=[detail.field for detail in rejection.body.details],
        )


async def _send_json(send: ASGISend, status: int, payload: bytes, correlation_id: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode("latin-1")),
                (CORRELATION_HEADER.lower().encode("latin-1"), correlation_id.encode("latin-1")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _headers(scope: ASGIScope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


def _without_content_type(scope: ASGIScope) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in scope.get("headers", []) if name.lower() != b"content-type"]


def _declared_length(headers: Mapping[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def _read_body(receive: ASGIReceive, limit: int) -> bytes | None:
    """The whole request body, or ``None`` as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# ---------------------------------------------------------------------------------------------- service

SETTINGS: Final[Settings] = get_settings()


F = TypeVar("F", bound=Callable[..., Any])


def api(route: str) -> Callable[[F], F]:
    """``bentoml.api`` with its type kept for mypy (BentoML's SDK module is untyped)."""
    decorator: Callable[[F], F] = bentoml.api(route=route)
    return decorator


def on_shutdown(func: F) -> F:
    hooked: F = bentoml.on_shutdown(func)
    return hooked


def _correlation_id() -> str:
    return CORRELATION_ID.get() or new_correlation_id()


def _require_runtime() -> Runtime:
    runtime = STATE.runtime
    if runtime is None:
        from bentoml.exceptions import ServiceUnavailable

        raise ServiceUnavailable("model not loaded")
    return runtime


#: Never traced when spans are exported: the probes and the scrape (several a second, nothing to follow).
UNTRACED_ROUTES: Final[tuple[str, ...]] = ("/livez", "/readyz", "/metrics")


def tracing_config(settings: Settings) -> dict[str, Any]:
    """Keep BentoML's OpenTelemetry middleware off the scoring routes unless ``serve.trace_scoring_routes``; with
    ``serve.otlp_endpoint``, export its spans over OTLP/HTTP (a span is sampled when its caller's is: the router
    decides; BentoML's ratio, 1.0 here, applies to requests that arrive without a ``traceparent``)."""
    excluded = [] if settings.serve.trace_scoring_routes else [PREDICT_ROUTE, BATCH_ROUTE]
    endpoint = settings.serve.otlp_endpoint
    if endpoint is None:
        return {"excluded_urls": excluded} if excluded else {}
    return {
        "excluded_urls": [*excluded, *UNTRACED_ROUTES],
        "exporter_type": "otlp",
        "sample_rate": 1.0,
        "otlp": {"protocol": "http", "endpoint": endpoint, "http": {"certificate_file": None, "headers": None}},
    }


@bentoml.service(
    name="refund_fraud",
    workers=SETTINGS.serve.workers,
    logging={"access": {"enabled": SETTINGS.serve.access_log}},
    tracing=tracing_config(SETTINGS),
)
class RefundFraudService:
    """Refund-fraud scoring: one verified XGBoost bundle per worker, loaded once at start-up."""

    def __init__(self) -> None:
        self.settings = get_settings()
        configure_logging(self.settings.log_level)
        STATE.metrics = default_metrics()
        self._loader = threading.Thread(target=self._load, name="fraudwatch-model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        started = time.perf_counter()
        assert STATE.metrics is not None
        try:
            runtime = load_runtime(self.settings, STATE.metrics)
        except Exception as exc:
            STATE.failure = f"{type(exc).__name__}: {exc}"
            LOGGER.exception("model load failed")
            return
        STATE.runtime = runtime
        log_event(
            LOGGER,
            "model loaded",
            model_version=runtime.version,
            model_dir=str(runtime.directory),
            feature_store=runtime.lookup is not None,
            adaptive_batching=runtime.batcher is not None,
            direct_predict=isinstance(getattr(runtime.predict, "__self__", None), DirectPredictor),
            load_ms=round((time.perf_counter() - started) * 1000.0, 1),
        )

    async def __is_ready__(self) -> bool:
        """``/readyz``: 503 until the model is loaded, verified and warmed up (async: no thread hop per probe)."""
        return STATE.runtime is not None

    async def __is_alive__(self) -> bool:
        """``/livez``: 503 once loading has failed (no bundle in time, checksum mismatch, ...)."""
        return STATE.failure is None

    @api(route=PREDICT_ROUTE)
    async def refund_predict(self, request: RefundRequest, /) -> RefundResponse:
        """Score one refund request (the seed's body, plus optional ``accountId`` and ``itemDescription``)."""
        return await answer_single(_require_runtime(), request, _correlation_id())

    @api(route=BATCH_ROUTE)
    async def refund_predict_batch(self, batch: BatchRequest, /) -> BatchResponse:
        """Score up to ``serve.max_batch_items`` refund requests in one call."""
        return await answer_batch(_require_runtime(), batch, _correlation_id())

    @on_shutdown
    def shutdown(self) -> None:
        runtime = STATE.runtime
        if runtime is not None:
            runtime.close()


cast(Any, RefundFraudService).add_asgi_middleware(RequestGuard, state=STATE, settings=SETTINGS)
