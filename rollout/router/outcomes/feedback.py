"""The label join: ground-truth labels posted by the label sources, joined to the prediction log, counted as outcome
metrics.

Data plane::

    label source ──POST /api/v1/feedback──▶ OutcomeTracker ──find(prediction_id)──▶ the predictions of that request
                                             ├──▶ labels table (first label wins; the primary key arbitrates)
                                             ├──▶ outcome metrics per (model_version, role, stage)
                                             └──▶ paired tables per (stable, candidate, stage)

Label sources: each has its own bearer token (source → token); a label's ``source`` is the one its token
authenticates (the body may omit it; naming another is a 403 naming ``source``), quotas count per authenticated
source, and the stored label carries it — a source cannot post, or exhaust the quota, under another's name.

Label policy: the first label of a prediction ID stands. The same label again → 200 ``duplicate`` (counted once);
a different label → 409. Outcome metrics are updated once per label, for every prediction of the ID (the decider
and each shadow), with that prediction's own decision (taken at its own threshold). A shadow prediction logged
after its label arrived gets no outcome (labels arrive days later; shadows answer within seconds).

``stage`` on every outcome series is the routing stage in force when the PREDICTION was made (a column of the
log), not when its label arrived: a gate of stage S counts exactly the predictions made while the arms ran side by
side in S, whenever their labels come. A request both versions scored (the decider and a shadow of the same
prediction ID) also counts once, when its label arrives, in the paired tables — both decisions
(``fraudwatch_outcome_paired_total``: discordant pairs per label give paired recall, precision and decision-rate
differences) and both score bins (``fraudwatch_outcome_paired_score_total``: a paired AUC difference). The sides
are named after the routing table's stable at prediction time (column ``stable_version``), as the shadow
comparison series are (:func:`rollout.core.routing.comparison_pair`).

Series are created at zero when a routing table names their (version, role, stage) or (pair, stage) — the tracker
observes the router's table store — so Prometheus sees the first label as an increase (the paired score table's
cells excepted: see :meth:`OutcomeTracker.prepare_pair`).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Summary
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import (
    select,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rollout.core.drift import calibration_bin_of
from rollout.core.routing import ComparisonPair, Role, RoutePlan, comparison_pair
from rollout.router.outcomes.online_labels import OnlineLabelSink
from rollout.router.outcomes.prediction_log import (
    LABEL_NAMES,
    FeedbackStatus,
    PredictionLog,
    PredictionRecord,
    as_utc,
    labels_table,
)
from rollout.router.outcomes.settings import OutcomeSettings, get_outcome_settings
from service.api.errors import error_response, validation_details
from service.api.schema import ErrorDetail
from service.common.clock import utc_now
from service.common.http import bearer_matches, read_limited
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

SECONDS_PER_HOUR: Final[float] = 3600.0

FEEDBACK_PATH: Final[str] = "/api/v1/feedback"


FEEDBACK_BATCH_PATH: Final[str] = "/api/v1/feedback/batch"


#: An insecure development tracker (no tokens) takes each label's own source, or this one when it names none.
INSECURE_SOURCE: Final[str] = "unauthenticated"


#: What :meth:`OutcomeTracker._authenticated_source` answers for such a tracker (not a source name: it has a space).
ANY_SOURCE: Final[str] = "any source"


_LABEL_VALUES: Final[dict[str, int]] = {name: value for value, name in LABEL_NAMES.items()}


def _parse_label(value: object) -> int:
    """``"fraud"``/``"legit"`` (any case) or ``1``/``0``; booleans and other numbers are refused."""
    if isinstance(value, str) and value.strip().lower() in _LABEL_VALUES:
        return _LABEL_VALUES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in LABEL_NAMES:
        return value
    raise ValueError('must be "fraud", "legit", 1 or 0')


class FeedbackRequest(BaseModel):
    """A ground-truth label for one earlier prediction (joined by ``prediction_id``).

    Length limits come from :class:`OutcomeSettings`, passed as validation context ``{"settings": …}``.
    """

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    prediction_id: str = Field(..., min_length=1)
    label: Annotated[int, BeforeValidator(_parse_label)]
    #: The label source. On the wire optional: the router binds it to the source the bearer token authenticates
    #: (a body naming another source is refused); a label is stored under the authenticated source only.
    source: str | None = Field(None, min_length=1)
    #: When the truth became known (e.g. the chargeback date); default: when the label was received.
    observed_at: AwareDatetime | None = None

    @field_validator("prediction_id")
    @classmethod
    def _prediction_id_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _context_settings(info).max_prediction_id_chars
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value

    @field_validator("source")
    @classmethod
    def _source_length(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = _context_settings(info).max_source_chars
        if value is not None and len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value


def _context_settings(info: ValidationInfo) -> OutcomeSettings:
    context = info.context if isinstance(info.context, dict) else {}
    settings = context.get("settings")
    return settings if isinstance(settings, OutcomeSettings) else get_outcome_settings()


@dataclass(frozen=True)
class StoredLabel:
    label: int
    source: str
    observed_at: datetime
    received_at: datetime


@dataclass(frozen=True)
class FeedbackResult:
    status: FeedbackStatus
    prediction_id: str
    predictions: int
    existing: StoredLabel | None = None


class _OutcomeMetrics:
    def __init__(self, registry: CollectorRegistry, settings: OutcomeSettings) -> None:
        by_version = ["model_version", "role", "stage"]
        self.outcomes = Counter(
            "fraudwatch_outcome",
            "Labelled predictions by confusion-matrix cell, at each prediction's own threshold; stage = the routing "
            "stage when the prediction was made.",
            [*by_version, "outcome"],
            registry=registry,
        )
        self.score = Histogram(
            "fraudwatch_outcome_score",
            "Scores of labelled predictions, split by the label (ROC-AUC from the two histograms).",
            [*by_version, "label"],
            buckets=settings.score_buckets,
            registry=registry,
        )
        self.calibration_predicted = Summary(
            "fraudwatch_calibration_predicted",
            "Scores of labelled predictions per equal-width calibration bin (_sum / _count = mean score).",
            [*by_version, "bin"],
            registry=registry,
        )
        self.calibration_observed = Counter(
            "fraudwatch_calibration_observed_fraud",
            "Labelled predictions per calibration bin whose label is fraud (÷ _count = observed rate).",
            [*by_version, "bin"],
            registry=registry,
        )
        self.label_delay = Histogram(
            "fraudwatch_label_delay_seconds",
            "Time from a prediction to the observation of its label.",
            by_version,
            buckets=tuple(h * SECONDS_PER_HOUR for h in settings.label_delay_buckets_hours),
            registry=registry,
        )
        by_pair = ["stable", "candidate", "stage", "label"]
        self.paired = Counter(
            "fraudwatch_outcome_paired",
            "Labelled requests both versions scored (decider + shadow), by label and each side's prediction; "
            "stage = the routing stage when the predictions were made.",
            [*by_pair, "stable_prediction", "candidate_prediction"],
            registry=registry,
        )
        self.paired_score = Counter(
            "fraudwatch_outcome_paired_score",
            "Labelled requests both versions scored, by label and each side's score bin (non-cumulative cells; "
            "*_le = the bin's upper edge, +Inf last).",
            [*by_pair, "stable_le", "candidate_le"],
            registry=registry,
        )
        self.feedback = Counter(
            "fraudwatch_feedback",
            "Feedback labels by result (recorded, duplicate, conflict, unknown, invalid, unauthorized, forbidden, "
            "over_quota, unavailable).",
            ["result"],
            registry=registry,
        )


def confusion_cell(prediction: int, label: int) -> Literal["tp", "fp", "tn", "fn"]:
    if prediction == 1:
        return "tp" if label == 1 else "fp"
    return "fn" if label == 1 else "tn"


def le_of(edge: float) -> str:
    """A bucket edge spelt as a Prometheus histogram's ``le`` label (prometheus_client: ``repr`` of the float for
    the edges of scores in [0, 1], ``+Inf``)."""
    return "+Inf" if math.isinf(edge) else repr(float(edge))


def bin_edges(buckets: Sequence[float]) -> tuple[str, ...]:
    """The ``le`` label values of the bins of ``buckets``, as Prometheus histograms spell them, ``+Inf`` last."""
    return (*(le_of(b) for b in buckets), "+Inf")


def score_bin(score: float, buckets: Sequence[float]) -> str:
    """The upper edge (``le`` value) of the bin holding ``score``: the smallest bucket ≥ score, else ``+Inf``."""
    index = bisect.bisect_left(buckets, score)
    return le_of(buckets[index]) if index < len(buckets) else "+Inf"


@dataclass(frozen=True)
class PairedPrediction:
    """The two versions' predictions of one request, named after the rollout's sides."""

    pair: ComparisonPair
    stage: str
    stable: PredictionRecord
    candidate: PredictionRecord


def paired_predictions(found: Sequence[PredictionRecord]) -> list[PairedPrediction]:
    """The (decider, shadow) pairs among the predictions of one prediction ID, made in the same stage.

    The sides follow the routing table's stable at prediction time, as the shadow comparison series do; a row
    without ``stable_version`` (written before the column) falls back to the stage: in ``full`` the shadow is the
    old stable, in every other stage the decider is stable.
    """
    deciders = [r for r in found if r.role == "decider"]
    if not deciders:
        return []
    decider = deciders[0]
    out: list[PairedPrediction] = []
    for shadow in found:
        if shadow.role != "shadow" or shadow.stage != decider.stage or shadow.model_version == decider.model_version:
            continue
        table_stable = shadow.stable_version or decider.stable_version
        if table_stable is None:
            table_stable = shadow.model_version if decider.stage == "full" else decider.model_version
        pair = comparison_pair(decider.model_version, shadow.model_version, table_stable)
        stable_rec, candidate_rec = (shadow, decider) if pair.shadow_is_stable else (decider, shadow)
        out.append(PairedPrediction(pair, decider.stage, stable_rec, candidate_rec))
    return out


def plan_series(plan: RoutePlan) -> tuple[set[tuple[str, Role, str]], set[tuple[str, str, str]]]:
    """The (version, role, stage) and (stable, candidate, stage) a routing plan can produce predictions for."""
    stage = plan.stage
    versions: set[tuple[str, Role, str]] = set()
    pairs: set[tuple[str, str, str]] = set()
    for route in (plan.stable_route, plan.candidate_route):
        if route is None:
            continue
        versions.add((route.decider.version, "decider", stage))
        if route.fallback is not None:
            versions.add((route.fallback.version, "decider", stage))
        for shadow in route.shadows:
            versions.add((shadow.version, "shadow", stage))
            pair = comparison_pair(route.decider.version, shadow.version, plan.table.stable.version)
            pairs.add((pair.stable, pair.candidate, stage))
    return versions, pairs


class OutcomeTracker:
    """Joins labels to logged predictions and keeps the outcome metrics; serves ``POST /api/v1/feedback``."""

    def __init__(
        self,
        log: PredictionLog,
        settings: OutcomeSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        tokens: Mapping[str, str] | None = None,
        insecure_dev: bool = False,
        label_sink: OnlineLabelSink | None = None,
    ) -> None:
        """``tokens``: each label source's bearer token (source → token, e.g.
        :meth:`rollout.settings.RouterSettings.feedback_credentials`); none refuses every label unless
        ``insecure_dev``, which takes the body's ``source`` (else :data:`INSECURE_SOURCE`) unauthenticated.
        ``label_sink``: where each newly recorded label also goes (the online feature store), if anywhere."""
        self._label_sink = label_sink
        self._log = log
        self._tokens = dict(tokens or {})
        self._insecure_dev = insecure_dev
        self._quota_window = -1
        self._quota_used: dict[tuple[str, int], int] = {}
        self._settings = settings or log.settings
        self._metrics = _OutcomeMetrics(registry if registry is not None else REGISTRY, self._settings)
        self._prepared: set[tuple[str, Role, str]] = set()
        self._prepared_pairs: set[tuple[str, str, str]] = set()

    def routes(self) -> list[Route]:
        """The feedback routes, for the router's control listener (never its public one)."""
        return [
            Route(FEEDBACK_PATH, self.feedback_endpoint, methods=["POST"]),
            Route(FEEDBACK_BATCH_PATH, self.feedback_batch_endpoint, methods=["POST"]),
        ]

    async def submit(self, feedback: FeedbackRequest, received_at: datetime | None = None) -> FeedbackResult:
        """Store the label (first one wins) and, when it is new, update the outcome metrics of every prediction.
        ``feedback.source`` must be set (the endpoints set it to the authenticated source)."""
        if feedback.source is None:
            raise ValueError("a label is submitted with its (authenticated) source")
        received = as_utc(received_at or utc_now())
        observed = as_utc(feedback.observed_at or received)
        pid = feedback.prediction_id
        found = await self._log.find(pid)
        if not found:
            return self._counted(FeedbackResult("unknown", pid, 0))
        new = StoredLabel(label=feedback.label, source=feedback.source, observed_at=observed, received_at=received)
        existing = await asyncio.to_thread(self._store_label, pid, new)
        if existing is None:
            self.observe(found, feedback.label, observed)
            if self._label_sink is not None:  # enqueued only: the store is written off this call's path
                self._label_sink.labelled(pid, found, feedback.label, received)
            return self._counted(FeedbackResult("recorded", pid, len(found)))
        status: FeedbackStatus = "duplicate" if existing.label == feedback.label else "conflict"
        return self._counted(FeedbackResult(status, pid, len(found), existing))

    # ------------------------------------------------------------------ table store observer

    def table_applied(self, plan: RoutePlan, _source: str) -> None:
        """Create at zero every outcome and paired series the new routing table can feed (see :meth:`prepare`)."""
        versions, pairs = plan_series(plan)
        for version, role, stage in sorted(versions):
            self.prepare(version, role, stage)
        for stable, candidate, stage in sorted(pairs):
            self.prepare_pair(stable, candidate, stage)

    def table_refused(self, _source: str, _result: str, _detail: str) -> None:
        return

    def prepare(self, model_version: str, role: Role, stage: str) -> None:
        """Create every outcome series of a (version, role, stage) at zero, so Prometheus sees the first labels as
        an increase (a series born with a non-zero value counts as no increase). Called when a routing table names
        the version (:meth:`table_applied`); :meth:`observe` does it for any it has not seen."""
        keys = (model_version, role, stage)
        if keys in self._prepared:
            return
        self._prepared.add(keys)
        for cell in ("tp", "fp", "tn", "fn"):
            self._metrics.outcomes.labels(*keys, cell)
        for label_name in LABEL_NAMES.values():
            self._metrics.score.labels(*keys, label_name)
        for cal_bin in range(self._settings.calibration_bins):
            self._metrics.calibration_predicted.labels(*keys, str(cal_bin))
            self._metrics.calibration_observed.labels(*keys, str(cal_bin))
        self._metrics.label_delay.labels(*keys)

    def prepare_pair(self, stable: str, candidate: str, stage: str) -> None:
        """Create the 8 paired prediction cells of a (stable, candidate, stage) at zero. The score table's cells
        ((edges + 1)² × 2 of them) are created when first counted — at zero they would multiply the router's
        exposition (scraped every few seconds) by thousands of series per rollout — so ``increase()`` does not see
        the first count of each score cell: read it with ``(x unless x offset W) or increase(x[W])``, or over the
        total of the 8 cells."""
        keys = (stable, candidate, stage)
        if keys in self._prepared_pairs:
            return
        self._prepared_pairs.add(keys)
        for label_name in LABEL_NAMES.values():
            for stable_prediction in ("0", "1"):
                for candidate_prediction in ("0", "1"):
                    self._metrics.paired.labels(*keys, label_name, stable_prediction, candidate_prediction)

    def observe(self, found: Sequence[PredictionRecord], label: int, observed_at: datetime) -> None:
        """Outcome metrics for a label joined to predictions, each under the stage of its prediction; and the
        paired tables for the requests both versions scored."""
        label_name = LABEL_NAMES[label]
        for rec in found:
            keys = (rec.model_version, rec.role, rec.stage)
            self.prepare(*keys)
            self._metrics.outcomes.labels(*keys, confusion_cell(rec.prediction, label)).inc()
            self._metrics.score.labels(*keys, label_name).observe(rec.score)
            cal_bin = str(calibration_bin_of(rec.score, self._settings.calibration_bins))
            self._metrics.calibration_predicted.labels(*keys, cal_bin).observe(rec.score)
            self._metrics.calibration_observed.labels(*keys, cal_bin).inc(label)
            delay = max(0.0, (as_utc(observed_at) - as_utc(rec.ts)).total_seconds())
            self._metrics.label_delay.labels(*keys).observe(delay)
        buckets = self._settings.paired_score_buckets
        for paired in paired_predictions(found):
            keys_pair = (paired.pair.stable, paired.pair.candidate, paired.stage)
            self.prepare_pair(*keys_pair)
            self._metrics.paired.labels(
                *keys_pair, label_name, str(paired.stable.prediction), str(paired.candidate.prediction)
            ).inc()
            stable_le, candidate_le = (
                score_bin(paired.stable.score, buckets),
                score_bin(paired.candidate.score, buckets),
            )
            self._metrics.paired_score.labels(*keys_pair, label_name, stable_le, candidate_le).inc()

    def _counted(self, result: FeedbackResult) -> FeedbackResult:
        self._metrics.feedback.labels(result.status).inc()
        return result

    def _store_label(self, prediction_id: str, new: StoredLabel) -> StoredLabel | None:
        """Insert the label unless one exists; return the existing one (None when this one was stored)."""
        existing = self._read_label(prediction_id)
        if existing is not None:
            return existing
        row = {
            "prediction_id": prediction_id,
            "label": new.label,
            "source": new.source,
            "observed_at": new.observed_at,
            "received_at": new.received_at,
        }
        try:
            with self._log.engine.begin() as conn:
                conn.execute(labels_table.insert(), row)
        except IntegrityError:
            return self._read_label(prediction_id)
        return None

    def _read_label(self, prediction_id: str) -> StoredLabel | None:
        query = select(labels_table).where(labels_table.c.prediction_id == prediction_id)
        with self._log.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return StoredLabel(
            label=int(row.label),
            source=row.source,
            observed_at=as_utc(row.observed_at),
            received_at=as_utc(row.received_at),
        )

    def _authenticated_source(self, request: Request) -> str | None:
        """The label source whose token the request carries (every token is compared, in constant time each);
        :data:`ANY_SOURCE` for an insecure development tracker without tokens; None → 401."""
        if not self._tokens:
            return ANY_SOURCE if self._insecure_dev else None
        authorization = request.headers.get("authorization")
        matched = [source for source, token in self._tokens.items() if bearer_matches(authorization, token)]
        return matched[0] if matched else None

    def _bind(self, feedback: FeedbackRequest, source: str) -> FeedbackRequest | None:
        """The label under its authenticated source, or None when the body names another source."""
        if source == ANY_SOURCE:
            return feedback if feedback.source is not None else feedback.model_copy(update={"source": INSECURE_SOURCE})
        if feedback.source is not None and feedback.source != source:
            return None
        return feedback.model_copy(update={"source": source})

    def _wrong_source(self, feedback: FeedbackRequest) -> Response:
        self._metrics.feedback.labels("forbidden").inc()
        return _error(
            403,
            f"source {feedback.source!r} is not the label source this token authenticates",
            "source",
            "omit it, or name the source of the bearer token",
        )

    def _unauthorized(self) -> Response:
        self._metrics.feedback.labels("unauthorized").inc()
        response = _error(401, "missing or wrong bearer token", "authorization", "a label source's bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="fraudwatch-feedback"'
        return response

    def _over_quota(self, source: str | None) -> bool:
        """A fixed one-minute window of labels per ``source`` (``feedback_quota_per_minute``)."""
        now = time.monotonic()
        window = int(now // 60.0)
        key = (source or INSECURE_SOURCE, window)
        if self._quota_window != window:
            self._quota_window = window
            self._quota_used.clear()
        used = self._quota_used.get(key, 0)
        if used >= self._settings.feedback_quota_per_minute:
            return True
        self._quota_used[key] = used + 1
        return False

    async def _read_json(self, request: Request, limit: int) -> tuple[object, Response | None]:
        """The parsed body, or the 4xx to answer: the read stops at ``limit`` bytes, and any body that is not JSON
        (including one nested too deep for the parser) is a 400."""
        body = await read_limited(request, limit)
        if body is None:
            self._metrics.feedback.labels("invalid").inc()
            return None, _error(413, f"body larger than {limit} bytes", "body", "too large")
        try:
            return json.loads(body), None
        except (ValueError, RecursionError):
            self._metrics.feedback.labels("invalid").inc()
            return None, _error(400, "body is not valid JSON", "body", "expected a JSON object")

    async def feedback_endpoint(self, request: Request) -> Response:
        source = self._authenticated_source(request)
        if source is None:
            return self._unauthorized()
        payload, refused = await self._read_json(request, self._settings.max_body_bytes)
        if refused is not None:
            return refused
        try:
            parsed = FeedbackRequest.model_validate(payload, context={"settings": self._settings})
        except ValidationError as exc:
            self._metrics.feedback.labels("invalid").inc()
            return _validation_error(exc)
        feedback = self._bind(parsed, source)
        if feedback is None:
            return self._wrong_source(parsed)
        if self._over_quota(feedback.source):
            self._metrics.feedback.labels("over_quota").inc()
            return _error(429, f"label quota of source {feedback.source!r} exhausted; retry later", "source", "quota")
        try:
            result = await self.submit(feedback)
        except (OperationalError, InterfaceError) as exc:
            self._metrics.feedback.labels("unavailable").inc()
            log_event(logger, "feedback join failed: prediction log unavailable", logging.ERROR, error=str(exc.orig))
            return _error(503, "the prediction log is unavailable; retry later", "prediction_id", "not looked up")
        return _response_of(result, feedback)

    async def feedback_batch_endpoint(self, request: Request) -> Response:
        """Many labels per call, each accepted or refused on its own (``results[i]`` answers ``labels[i]``).

        Retrying a batch counts nothing twice: a label already stored answers ``duplicate`` and changes no metric.
        """
        source = self._authenticated_source(request)
        if source is None:
            return self._unauthorized()
        payload, refused = await self._read_json(request, self._settings.max_batch_body_bytes)
        if refused is not None:
            return refused
        items = payload.get("labels") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            self._metrics.feedback.labels("invalid").inc()
            return _error(422, "invalid feedback batch: labels", "labels", "a non-empty list of labels")
        if len(items) > self._settings.max_batch_labels:
            self._metrics.feedback.labels("invalid").inc()
            limit = self._settings.max_batch_labels
            return _error(422, f"invalid feedback batch: at most {limit} labels", "labels", "too many labels")
        results = [await self._one_of_batch(item, source) for item in items]
        return JSONResponse({"results": results}, status_code=200)

    async def _one_of_batch(self, item: object, source: str) -> dict[str, Any]:
        try:
            parsed = FeedbackRequest.model_validate(item, context={"settings": self._settings})
        except ValidationError as exc:
            self._metrics.feedback.labels("invalid").inc()
            fields = [".".join(str(part) for part in err["loc"]) or "label" for err in exc.errors()]
            return {"status": "invalid", "fields": fields}
        feedback = self._bind(parsed, source)
        if feedback is None:
            self._metrics.feedback.labels("forbidden").inc()
            return {"status": "forbidden", "prediction_id": parsed.prediction_id, "fields": ["source"]}
        if self._over_quota(feedback.source):
            self._metrics.feedback.labels("over_quota").inc()
            return {"status": "over_quota", "prediction_id": feedback.prediction_id}
        try:
            result = await self.submit(feedback)
        except (OperationalError, InterfaceError):
            self._metrics.feedback.labels("unavailable").inc()
            return {"status": "unavailable", "prediction_id": feedback.prediction_id}
        return {"status": result.status, "prediction_id": result.prediction_id, "predictions": result.predictions}


def _error(status: int, message: str, field: str, detail: str) -> Response:
    return error_response(status, message, None, [ErrorDetail(field=field, message=detail)])


def _validation_error(exc: ValidationError) -> Response:
    details = validation_details(exc)
    return error_response(422, f"invalid feedback: {', '.join(d.field for d in details)}", None, details)


def _response_of(result: FeedbackResult, feedback: FeedbackRequest) -> Response:
    pid = result.prediction_id
    # The 404 and the 409 name only what the caller sent: never the stored label, its source or its time (a label
    # feed that needs them reads the prediction log; the router's log line below has them for operators).
    if result.status == "unknown":
        return _error(
            404,
            f"unknown prediction_id {pid!r}: no prediction was logged under this ID",
            "prediction_id",
            "no prediction with this prediction_id",
        )
    if result.status == "conflict" and result.existing is not None:
        first = result.existing
        log_event(
            logger,
            "conflicting label refused",
            prediction_id=pid,
            label=LABEL_NAMES[feedback.label],
            source=feedback.source,
            stored_label=LABEL_NAMES[first.label],
            stored_source=first.source,
            stored_received_at=first.received_at.isoformat(),
        )
        return _error(
            409,
            f"conflicting label for {pid!r}: a different label is already recorded; the first label stands",
            "label",
            "conflicts with the label already recorded",
        )
    return JSONResponse(
        {
            "status": result.status,
            "prediction_id": pid,
            "label": LABEL_NAMES[feedback.label],
            "predictions": result.predictions,
        },
        status_code=200,
    )
