"""Retraining on the latest labelled window, gated, registered as ``challenger`` and handed to delivery.

One path for every trigger — the weekly schedule (the chart's CronJob, or cron locally), an Alertmanager alert
(:mod:`service.retraining.webhook`) or an operator — ``fraudwatch retrain``:

1. **window** — from the configured source (``FW_RETRAIN__SOURCE``): ``stream`` (default), the labelled refund
   stream (``FW_RETRAIN__DATA_PATH``: a CSV(.gz) in the synthetic schema, or a directory of them) cut to its last
   ``window_days`` days, up to its newest labelled row; rows without a label yet are left out (a refund is only known
   to be legitimate once its chargeback window has passed); or ``feature_log``, what serving saw: the decisions of
   the last ``window_days`` days as the model servers logged their vectors, joined with the labels that had arrived
   in the prediction log by the run (:mod:`service.retraining.log_source`). Too few rows or frauds →
   ``insufficient_data``, nothing trained;
2. **train** — ``stream``: the training pipeline (:func:`service.training.pipeline.train_version`: time-ordered
   split, imbalance strategies, calibration, threshold, bundle + feature store); ``feature_log``: the configured
   engine (``FW_TRAIN__ENGINE``) on the training set, the same calibration, threshold and bundle, plus the serving
   version's aggregate snapshot — either way the test-window floors;
3. **regression set** — the bundle scored on the frozen labelled set (``FW_RETRAIN__REGRESSION_SET``, e.g.
   tests/quality/data/frozen_synthetic.json) with :func:`service.training.evaluate.quality_gate` and the
   ``FW_QUALITY__*``
   floors: both gates must pass (``quality_gate_failed``: the run is logged in MLflow, no version registered);
4. **register** — an MLflow run (metrics include ``regression_*``; tags the retrain id, trigger, source, engine,
   window and row counts) and a
   registered version whose ``challenger`` alias is moved to it (audited);
5. **hand-off** — :mod:`service.retraining.handoff` asks delivery to start a rollout of it (``rollout_started``), or
   reports that it did not (``rollout_not_started``: the challenger stays registered for a manual start).

:mod:`service.retraining.recalibrate` (the calibration bridge) shares steps 1, 3, 4 and 5 through :func:`ship`.
The outcome, the window, both gates' values and the hand-off's answer form a :class:`RetrainReport`
(``--summary-json``); the CLI maps its outcome to an exit code.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import pandas as pd

from service.artifacts.bundle import load_bundle
from service.artifacts.registry import ModelRef, ModelRegistry, RunInfo, RunPayload
from service.common.logging import get_logger, log_event
from service.retraining.handoff import Candidate, HandoffResult, RolloutHandoff
from service.retraining.outcomes import MAX_REASON_CHARS, RetrainOutcome
from service.retraining.sources import (
    Fitted,
    InsufficientDataError,
    Observer,
    QuietObserver,
    TrainingData,
    WindowInfo,
    window_tags,
)
from service.settings import Settings
from service.training.evaluate import GateReport, load_frozen_set, quality_gate, time_ordered

logger = get_logger(__name__)

#: File name patterns of a stream directory.
STREAM_PATTERNS: Final[tuple[str, ...]] = ("*.csv", "*.csv.gz")
#: Prefix of the regression-set metrics in the MLflow run and the combined gate.
REGRESSION_PREFIX: Final[str] = "regression_"
LABEL_COLUMN: Final[str] = "is_fraud"
TIME_COLUMN: Final[str] = "timestamp"
_ID_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._:-]+")


class RetrainKind(StrEnum):
    SCHEDULED = "scheduled"
    ALERT = "alert"
    MANUAL = "manual"


class RegressionSetMissingError(RuntimeError):
    """No frozen regression set is configured: a version that cannot be gated is not made."""


# ------------------------------------------------------------------------------------------------ the window


def stream_files(path: Path) -> list[Path]:
    """The stream's files: ``path`` itself, or every ``*.csv``/``*.csv.gz`` in the directory, sorted by name."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no refund stream at {path} (FW_RETRAIN__DATA_PATH)")
    files = sorted({p for pattern in STREAM_PATTERNS for p in path.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no {' or '.join(STREAM_PATTERNS)} files in {path}")
    return files


def read_stream(path: Path) -> pd.DataFrame:
    """Every row of the stream at ``path`` in time order (a label column that is empty is kept as NaN)."""
    frames = [
        pd.read_csv(f, parse_dates=[TIME_COLUMN], dtype={"account_id": object, "itemDescription": object})
        for f in stream_files(path)
    ]
    return time_ordered(pd.concat(frames, ignore_index=True))


def select_window(
    frame: pd.DataFrame,
    days: float,
    *,
    end: datetime | pd.Timestamp | None = None,
    min_rows: int = 1,
    min_positives: int = 1,
) -> tuple[pd.DataFrame, WindowInfo]:
    """The labelled rows of the last ``days`` days up to ``end`` (default: the newest labelled row), in time order.

    Raises :class:`InsufficientDataError` when fewer than ``min_rows`` rows or ``min_positives`` frauds remain.
    """
    if TIME_COLUMN not in frame.columns or LABEL_COLUMN not in frame.columns:
        raise ValueError(f"the stream needs {TIME_COLUMN!r} and {LABEL_COLUMN!r} columns")
    labelled_mask = frame[LABEL_COLUMN].notna()
    labelled = frame.loc[labelled_mask]
    if labelled.empty:
        raise InsufficientDataError("the stream has no labelled row")
    stamps = pd.to_datetime(labelled[TIME_COLUMN])
    upper = pd.Timestamp(end) if end is not None else stamps.max()
    if upper.tzinfo is None and stamps.dt.tz is not None:
        upper = upper.tz_localize(stamps.dt.tz)
    elif upper.tzinfo is not None and stamps.dt.tz is None:
        upper = upper.tz_convert("UTC").tz_localize(None)  # a naive stream is read as UTC
    lower = upper - pd.Timedelta(days=days)
    chosen = time_ordered(labelled.loc[(stamps > lower) & (stamps <= upper)])
    chosen[LABEL_COLUMN] = chosen[LABEL_COLUMN].astype(int)
    positives = int(chosen[LABEL_COLUMN].sum())
    info = WindowInfo(
        days=float(days),
        start=lower.isoformat(),
        end=upper.isoformat(),
        rows=len(chosen),
        positives=positives,
        unlabelled_dropped=int((~labelled_mask).sum()),
    )
    if info.rows < min_rows or positives < min_positives:
        raise InsufficientDataError(
            f"window {info.start} … {info.end} holds {info.rows} labelled rows and {positives} frauds "
            f"(need ≥ {min_rows} and ≥ {min_positives})"
        )
    return chosen, info


def load_window(
    settings: Settings, days: float, data_path: Path | None, end: datetime | None
) -> tuple[pd.DataFrame, WindowInfo]:
    """The configured stream's window (``data_path`` overrides ``FW_RETRAIN__DATA_PATH``)."""
    path = data_path or settings.retrain.data_path
    if path is None:
        raise FileNotFoundError("no refund stream configured (FW_RETRAIN__DATA_PATH or --data)")
    rs = settings.retrain
    return select_window(read_stream(path), days, end=end, min_rows=rs.min_rows, min_positives=rs.min_positives)


# ------------------------------------------------------------------------------------------------ the gates


def regression_set(settings: Settings) -> Path:
    """The configured frozen regression set; :class:`RegressionSetMissingError` when there is none (checked before
    any work: a version that cannot be gated is not made)."""
    meta = settings.retrain.regression_set
    if meta is None:
        raise RegressionSetMissingError(
            "no regression set configured (FW_RETRAIN__REGRESSION_SET, e.g. tests/quality/data/frozen_synthetic.json)"
        )
    if not meta.is_file():
        raise FileNotFoundError(f"regression set {meta} not found (FW_RETRAIN__REGRESSION_SET)")
    return meta


def regression_gate(bundle_dir: Path, settings: Settings) -> GateReport:
    """The bundle scored on the configured frozen regression set against the ``quality`` floors."""
    model = load_bundle(bundle_dir, nthread=settings.train.nthread)
    frozen = load_frozen_set(regression_set(settings))
    return quality_gate(model, frozen, settings.quality, settings.train.top_k_percents)


def combined_gate(gates: Mapping[str, GateReport]) -> GateReport:
    """One verdict from several gates: passed iff all passed; values, floors and failures prefixed by gate name
    (``regression_pr_auc``, ``test_window_recall``)."""
    first = next(iter(gates.values()))
    values = {f"{name}_{k}": v for name, gate in gates.items() for k, v in gate.values.items()}
    floors = {f"{name}_{k}": v for name, gate in gates.items() for k, v in gate.floors.items()}
    failures = [f"{name}: {failure}" for name, gate in gates.items() for failure in gate.failures]
    rows = sum(gate.n_rows for gate in gates.values())
    return GateReport(not failures, first.model_version, rows, values, floors, failures)


# ------------------------------------------------------------------------------------------------ requests and reports


def safe_id(text: str) -> str:
    """``text`` reduced to the characters a command id allows (``[A-Za-z0-9._:-]``, ≤ 128, alphanumeric start)."""
    cleaned = _ID_UNSAFE.sub("-", text).strip("-._:")[:128]
    if not cleaned:
        raise ValueError(f"{text!r} has no usable id characters")
    return cleaned


@dataclass(frozen=True)
class RetrainRequest:
    kind: RetrainKind
    reason: str
    retrain_id: str
    data_path: Path | None = None
    window_days: float | None = None
    window_end: datetime | None = None
    start_rollout: bool = True
    version_name: str | None = None
    #: For the calibration bridge: the version recalibrated (alias or number).
    base: str = "champion"


@dataclass
class RetrainReport:
    """Everything a retrain decided, as ``--summary-json`` writes it."""

    retrain_id: str
    kind: str
    operation: str
    outcome: RetrainOutcome
    reason: str
    detail: str = ""
    window: WindowInfo | None = None
    version: str | None = None
    registry_version: str | None = None
    run_id: str | None = None
    gate: GateReport | None = None
    handoff: HandoffResult | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    #: Where the window came from (``FW_RETRAIN__SOURCE``) and the engine that fitted it (``FW_TRAIN__ENGINE``).
    source: str = ""
    engine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "retrain_id": self.retrain_id,
            "kind": self.kind,
            "operation": self.operation,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            "engine": self.engine,
            "window": self.window.to_dict() if self.window else None,
            "version": self.version,
            "registry_version": self.registry_version,
            "run_id": self.run_id,
            "gate": _finite_dict(self.gate.to_dict()) if self.gate else None,
            "handoff": self.handoff.to_dict() if self.handoff else None,
            "evidence": self.evidence,
            "timings_s": self.timings_s,
        }


def _finite_dict(data: dict[str, Any]) -> dict[str, Any]:
    """NaN and ±Inf (e.g. an AUC of a one-class set) become None: the summary stays strict JSON."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = _finite_dict(value)
        elif isinstance(value, float) and not math.isfinite(value):
            out[key] = None
        else:
            out[key] = value
    return out


def unused_version_name(registry: ModelRegistry, model: str) -> str:
    """``v<N+1>`` (N = the highest registry version number), bumped past any name a version already reports."""
    refs = registry.versions(model)
    taken = {ref.model_version for ref in refs}
    number = max((int(ref.version) for ref in refs), default=0) + 1
    while f"v{number}" in taken:
        number += 1
    return f"v{number}"


# ------------------------------------------------------------------------------------------------ shipping


@dataclass(frozen=True)
class Shipped:
    run: RunInfo
    ref: ModelRef | None
    handoff: HandoffResult | None
    outcome: RetrainOutcome


def ship(
    payload: RunPayload,
    gate: GateReport,
    request: RetrainRequest,
    settings: Settings,
    registry: ModelRegistry,
    handoff: RolloutHandoff | None,
    observer: Observer,
) -> Shipped:
    """Log the run (always, with the gate's verdict and values); when the gate passed, register the version, move
    ``challenger`` to it and hand it to delivery (unless the request or the configuration says not to)."""
    verdict = "passed" if gate.passed else "failed"
    tags = {
        **payload.tags,
        "quality_gate": verdict,
        "retrain_id": request.retrain_id,
        "retrain_kind": request.kind.value,
        "retrain_reason": request.reason[:MAX_REASON_CHARS],
    }
    metrics = {**payload.metrics, **{k: v for k, v in gate.values.items() if k.startswith(REGRESSION_PREFIX)}}
    with observer.step("Logging the run to MLflow"):
        run = registry.log_run(replace(payload, tags=tags, metrics=metrics))
    if not gate.passed:
        log_event(logger, "retrain gate failed", retrain_id=request.retrain_id, failures=gate.failures)
        return Shipped(run, None, None, RetrainOutcome.QUALITY_GATE_FAILED)
    model = settings.registered_model_name
    with observer.step("Registering the version as challenger"):
        ref = registry.register(run, model, description=f"{run.model_version}: {request.kind.value} {request.reason}")
        registry.set_challenger(model, ref.version, f"{request.retrain_id}: {request.reason}"[:MAX_REASON_CHARS])
        ref = registry.get_version(model, ref.version)
    if handoff is None or not request.start_rollout:
        return Shipped(run, ref, None, RetrainOutcome.REGISTERED)
    candidate = Candidate(name=run.model_version, model=model, number=ref.version)
    with observer.step(f"Starting a rollout of {candidate.name} ({handoff.via})"):
        result = handoff.start(candidate, request_id=request.retrain_id, reason=request.reason[:MAX_REASON_CHARS])
    outcome = RetrainOutcome.ROLLOUT_STARTED if result.started else RetrainOutcome.ROLLOUT_NOT_STARTED
    return Shipped(run, ref, result, outcome)


def apply_shipped(report: RetrainReport, shipped: Shipped) -> RetrainReport:
    report.outcome = shipped.outcome
    report.run_id = shipped.run.run_id
    report.registry_version = shipped.ref.version if shipped.ref else None
    report.handoff = shipped.handoff
    if shipped.handoff is not None and not shipped.handoff.started:
        report.detail = f"registered as challenger; rollout not started ({shipped.handoff.outcome}): "
        report.detail += shipped.handoff.detail
    return report


# ------------------------------------------------------------------------------------------------ retrain


@dataclass(frozen=True)
class StreamData:
    """The window of the labelled refund stream (``FW_RETRAIN__SOURCE=stream``): features recomputed by the
    training pipeline (one process), the bundle's aggregate snapshot built from the history."""

    frame: pd.DataFrame
    window: WindowInfo
    engine: str = "local"

    def train(
        self, settings: Settings, name: str, out_dir: Path, registry: ModelRegistry, observer: Observer
    ) -> Fitted:
        from service.training.pipeline import payload_from_result, train_version

        trained = train_version(self.frame, settings, name, out_dir)
        payload = payload_from_result(trained.result, run_name=f"retrain-{name}")
        tags = {**payload.tags, **window_tags(self.window), "engine": self.engine}
        return Fitted(replace(payload, tags=tags), trained.gate, self.engine)


def load_data(settings: Settings, request: RetrainRequest, days: float) -> TrainingData:
    """The configured source's window (:class:`InsufficientDataError` when it is too small to train on)."""
    if settings.retrain.source == "feature_log":
        from service.retraining.log_source import load_log_data

        set_dir = settings.artifacts_dir / f"{request.retrain_id}-training-set"
        return load_log_data(settings, days, request.window_end, set_dir)
    frame, window = load_window(settings, days, request.data_path, request.window_end)
    return StreamData(frame, window)


def retrain(
    settings: Settings,
    request: RetrainRequest,
    *,
    handoff: RolloutHandoff | None,
    observer: Observer | None = None,
    registry: ModelRegistry | None = None,
) -> RetrainReport:
    """Train on the latest window of the configured source (``FW_RETRAIN__SOURCE``) and ship the result (see the
    module docstring). Expected endings (too little data, a failed gate, a hand-off that did not start) are the
    report's outcome; anything else raises."""
    regression_set(settings)
    observer = observer or QuietObserver()
    timings: dict[str, float] = {}
    report = RetrainReport(request.retrain_id, request.kind.value, "retrain", RetrainOutcome.FAILED, request.reason)
    report.timings_s = timings
    report.source = settings.retrain.source
    days = request.window_days or settings.retrain.window_days
    log_event(logger, "retrain started", retrain_id=request.retrain_id, kind=request.kind.value, days=days,
              source=report.source)  # fmt: skip
    what = "served decisions with labels" if report.source == "feature_log" else "labelled refunds"
    with timed(timings, "window"), observer.step(f"Selecting the last {days:g} days of {what}"):
        try:
            data = load_data(settings, request, days)
        except InsufficientDataError as exc:
            report.outcome, report.detail = RetrainOutcome.INSUFFICIENT_DATA, str(exc)
            return finish_report(report)
    report.window, report.engine = data.window, data.engine
    registry = registry or ModelRegistry(settings)
    name = request.version_name or unused_version_name(registry, settings.registered_model_name)
    report.version = name
    out_dir = settings.artifacts_dir / name
    with timed(timings, "train"), observer.step(f"Training {name} on {data.window.rows:,} rows ({data.engine})"):
        fitted = data.train(settings, name, out_dir, registry, observer)
    with timed(timings, "regression_set"), observer.step("Scoring the frozen regression set"):
        regression = regression_gate(out_dir, settings)
    report.gate = combined_gate({"test_window": fitted.test_gate, "regression": regression})
    with timed(timings, "ship"):
        shipped = ship(fitted.payload, report.gate, request, settings, registry, handoff, observer)
    return finish_report(apply_shipped(report, shipped))


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 3)


def finish_report(report: RetrainReport) -> RetrainReport:
    log_event(
        logger,
        "retrain finished",
        retrain_id=report.retrain_id,
        operation=report.operation,
        outcome=report.outcome.value,
        version=report.version,
        registry_version=report.registry_version,
        detail=report.detail,
        timings_s=report.timings_s,
    )
    return report


def failed_report(request: RetrainRequest, operation: str, error: BaseException) -> RetrainReport:
    """The report of a run that raised (the CLI still writes a summary)."""
    return RetrainReport(
        request.retrain_id, request.kind.value, operation, RetrainOutcome.FAILED, request.reason, repr(error)
    )
