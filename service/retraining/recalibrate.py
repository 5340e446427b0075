"""The calibration bridge: the serving booster with an isotonic calibration refit on the latest labelled window.

When the booster still ranks well but its scores no longer read as probabilities (the fraud base rate moved, a
pattern grew — ``FraudwatchCalibrationErrorHigh``), retraining is not needed: ``fraudwatch recalibrate``

1. fetches the base version (``champion`` by default) from the registry, verified;
2. takes the labelled window of the last ``recalibration_window_days`` (:func:`service.retraining.job.select_window`)
   and scores it with the base booster (raw probabilities, features through the one feature path);
3. measures the evidence out of sample: an isotonic fit on the earlier part of the window
   (:func:`service.training.calibration.fit_interpolated_isotonic`: centred isotonic, which keeps the booster's
   ranking), the base calibration and the new one compared on the later
   ``recalibration_holdout_fraction`` by ECE and Brier score; no improvement of at least ``min_ece_improvement``
   → ``no_improvement``, nothing shipped;
4. refits the isotonic map on the whole window, chooses the decision threshold again with the training policy
   (:func:`service.training.evaluate.choose_threshold`, as training does on its validation rows) and recomputes the
   score
   reference bins (so score-drift PSI compares against the new distribution); the feature reference bins stay (same
   booster, same inputs);
5. writes a new bundle in the format of :mod:`service.artifacts.bundle`: the same trees, saved again with two booster
   attributes — ``fraudwatch_base_sha256`` (the booster it came from) and ``fraudwatch_calibration_sha256`` (of
   the new calibration) — so the new version has its own checksum, which binds the calibration to the verified
   file; the feature store is the base version's; nothing is pickled;
6. ships it like a retrain (:func:`service.retraining.job.ship`): the frozen regression set gate, an MLflow run,
   ``challenger``, the hand-off to delivery.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from service.artifacts.bundle import Calibration, Manifest, ScoringModel, load_bundle, save_bundle
from service.artifacts.registry import FEATURE_STORE_FILE, ModelRegistry, RunPayload
from service.common.logging import get_logger, log_event
from service.data import velocity
from service.data.feature_store import SQLiteFeatureStore
from service.data.features import EntityAggregates
from service.retraining.handoff import RolloutHandoff
from service.retraining.job import (
    LABEL_COLUMN,
    RetrainReport,
    RetrainRequest,
    apply_shipped,
    combined_gate,
    finish_report,
    load_window,
    regression_gate,
    regression_set,
    ship,
    timed,
    unused_version_name,
)
from service.retraining.outcomes import RetrainOutcome
from service.retraining.sources import InsufficientDataError, Observer, QuietObserver, window_tags
from service.settings import Settings
from service.training.calibration import fit_interpolated_isotonic
from service.training.evaluate import (
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    frame_features,
    reference_bins,
    serving_features,
)
from service.training.train import data_fingerprint

logger = get_logger(__name__)

ATTR_BASE_SHA256: Final[str] = "fraudwatch_base_sha256"
ATTR_CALIBRATION_SHA256: Final[str] = "fraudwatch_calibration_sha256"
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CalibrationEvidence:
    """The base and the new calibration on the held-out (later) part of the window."""

    n_fit: int
    n_holdout: int
    holdout_positives: int
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    bins: int

    @property
    def ece_improvement(self) -> float:
        return self.ece_before - self.ece_after

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ece_improvement": self.ece_improvement}


def calibration_sha256(calibration: Calibration) -> str:
    """SHA-256 of the calibration's canonical JSON."""
    return hashlib.sha256(json.dumps(asdict(calibration), sort_keys=True).encode("utf-8")).hexdigest()


def brier(y: npt.NDArray[np.int64], scores: FloatArray) -> float:
    return float(np.mean((scores - y) ** 2))


def calibration_evidence(
    raw: FloatArray, y: npt.NDArray[np.int64], base: Calibration, holdout_fraction: float, n_bins: int
) -> CalibrationEvidence:
    """Fit isotonic on the first ``1 - holdout_fraction`` of the (time-ordered) rows, compare it with ``base`` on
    the rest. Raises :class:`InsufficientDataError` when a part lacks a class."""
    n_fit = int(raw.size * (1.0 - holdout_fraction))
    fit_raw, fit_y, hold_raw, hold_y = raw[:n_fit], y[:n_fit], raw[n_fit:], y[n_fit:]
    for part, labels in (("fitting", fit_y), ("held-out", hold_y)):
        if not 0 < int(labels.sum()) < labels.size:
            raise InsufficientDataError(f"the {part} part of the recalibration window lacks frauds or legit rows")
    before = base.apply(hold_raw.astype(np.float32))
    after = fit_interpolated_isotonic(fit_raw, fit_y).apply(hold_raw.astype(np.float32))
    return CalibrationEvidence(
        n_fit=int(n_fit),
        n_holdout=int(hold_raw.size),
        holdout_positives=int(hold_y.sum()),
        ece_before=expected_calibration_error(hold_y, before, n_bins),
        ece_after=expected_calibration_error(hold_y, after, n_bins),
        brier_before=brier(hold_y, before),
        brier_after=brier(hold_y, after),
        bins=n_bins,
    )


def recalibrated_manifest(
    base: Manifest,
    version: str,
    raw: FloatArray,
    y: npt.NDArray[np.int64],
    settings: Settings,
    extra: dict[str, Any],
    served_raw: FloatArray | None = None,
) -> Manifest:
    """The base manifest with an isotonic calibration fit on (``raw``, ``y``), the threshold chosen again by the
    training policy and the metrics of the window; the score reference of the window's raw scores as serving
    computes them (``served_raw``: the base's feature store; default ``raw``); feature names and references kept."""
    ts = settings.train
    calibration = fit_interpolated_isotonic(raw, y)
    scores = calibration.apply(raw.astype(np.float32))
    served = scores if served_raw is None else calibration.apply(served_raw.astype(np.float32))
    threshold = choose_threshold(y, scores, ts)
    metrics = classification_metrics(y, scores, threshold.threshold, ts.top_k_percents, ts.calibration_bins)
    return Manifest(
        version=version,
        feature_names=list(base.feature_names),
        calibration=calibration,
        threshold=threshold,
        feature_reference=dict(base.feature_reference),
        score_reference=reference_bins(served, ts.reference_bins),
        metrics=metrics,
        params={**base.params, "recalibrated_from": base.version},
        sha256="",
        created_at=datetime.now(UTC).isoformat(),
        extra={**base.extra, "reference_window": "recalibration window (serving view)", "recalibration": extra},
    )


def base_store(base_dir: Path, frame: pd.DataFrame) -> dict[str, EntityAggregates]:
    """The base bundle's feature-store entries of the window's accounts (what serving looks up for them)."""
    path = base_dir / FEATURE_STORE_FILE
    if not path.is_file():
        return {}
    accounts = [str(a) for a in frame["account_id"].dropna().unique().tolist()]
    store = SQLiteFeatureStore(path)
    try:
        return dict(store.lookup_many(accounts))
    finally:
        store.close()


def write_recalibrated_bundle(base_dir: Path, base: ScoringModel, manifest: Manifest, out_dir: Path) -> Manifest:
    """The new bundle: the base trees with the provenance attributes (hence their own checksum), the new
    manifest, the base feature store."""
    booster = base.booster.copy()
    booster.set_attr(
        **{ATTR_BASE_SHA256: base.manifest.sha256, ATTR_CALIBRATION_SHA256: calibration_sha256(manifest.calibration)}
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    saved = save_bundle(booster, manifest, out_dir)
    store = base_dir / FEATURE_STORE_FILE
    if store.exists():
        shutil.copy2(store, out_dir / FEATURE_STORE_FILE)
    return saved


def recalibrate(
    settings: Settings,
    request: RetrainRequest,
    *,
    handoff: RolloutHandoff | None,
    observer: Observer | None = None,
    registry: ModelRegistry | None = None,
) -> RetrainReport:
    """The calibration bridge (see the module docstring); expected endings are the report's outcome."""
    regression_set(settings)
    observer = observer or QuietObserver()
    rs = settings.retrain
    report = RetrainReport(request.retrain_id, request.kind.value, "recalibrate", RetrainOutcome.FAILED, request.reason)
    timings = report.timings_s
    registry = registry or ModelRegistry(settings)
    model_name = settings.registered_model_name
    with timed(timings, "fetch"), observer.step(f"Fetching {request.base} from the registry"):
        ref = registry.resolve(model_name, request.base)
        base_dir = registry.fetch_bundle(ref, settings.home / "retrain" / request.retrain_id / "base")
        base = load_bundle(base_dir, nthread=settings.train.nthread)
    days = request.window_days or rs.recalibration_window_days
    with timed(timings, "window"), observer.step(f"Selecting the last {days:g} days of labelled refunds"):
        try:
            frame, report.window = load_window(settings, days, request.data_path, request.window_end)
            live = velocity.point_in_time(frame)  # the velocity features as the online store served them
            raw = base.raw_scores(frame_features(frame, live)).astype(np.float64)
            y = frame[LABEL_COLUMN].to_numpy().astype(np.int64)
            evidence = calibration_evidence(
                raw, y, base.manifest.calibration, rs.recalibration_holdout_fraction, settings.train.calibration_bins
            )
        except InsufficientDataError as exc:
            report.outcome, report.detail = RetrainOutcome.INSUFFICIENT_DATA, str(exc)
            return finish_report(report)
    report.evidence = {"base_version": base.version, "base_sha256": base.manifest.sha256, **evidence.to_dict()}
    log_event(logger, "recalibration evidence", retrain_id=request.retrain_id, **report.evidence)
    if not evidence.ece_improvement > rs.min_ece_improvement:
        report.outcome = RetrainOutcome.NO_IMPROVEMENT
        report.detail = (
            f"held-out ECE {evidence.ece_before:.4f} → {evidence.ece_after:.4f}: "
            f"not better by more than {rs.min_ece_improvement:g}"
        )
        return finish_report(report)
    name = request.version_name or unused_version_name(registry, model_name)
    report.version = name
    out_dir = settings.artifacts_dir / name
    with timed(timings, "bundle"), observer.step(f"Writing {name}: {base.version}'s booster, new calibration"):
        served_raw = base.raw_scores(serving_features(frame, base_store(base_dir, frame), live)).astype(np.float64)
        manifest = recalibrated_manifest(base.manifest, name, raw, y, settings, report.evidence, served_raw)
        manifest = write_recalibrated_bundle(base_dir, base, manifest, out_dir)
    report.evidence["threshold_before"] = base.threshold
    report.evidence["threshold_after"] = manifest.threshold.threshold
    with timed(timings, "regression_set"), observer.step("Scoring the frozen regression set"):
        report.gate = combined_gate({"regression": regression_gate(out_dir, settings)})
    payload = RunPayload(
        run_name=f"recalibrate-{name}",
        bundle_dir=out_dir,
        params={"recalibration.base_version": base.version, "recalibration.window_days": days},
        metrics={
            **{f"holdout_{k}": float(v) for k, v in evidence.to_dict().items()},
            **{f"window_{k}": v for k, v in manifest.metrics.items()},
        },
        tags={
            "calibration": manifest.calibration.method,
            "threshold_policy": manifest.threshold.policy,
            "recalibrated_from": base.version,
            "base_sha256": base.manifest.sha256,
            "data_fingerprint": data_fingerprint(frame),
            **window_tags(report.window),
        },
    )
    with timed(timings, "ship"):
        shipped = ship(payload, report.gate, request, settings, registry, handoff, observer)
    return finish_report(apply_shipped(report, shipped))
