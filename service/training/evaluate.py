"""Evaluation of a fraud model: metrics, threshold policy, calibration, drift reference bins, PSI, quality gate.

Everything here is a pure function of arrays (numpy / scikit-learn), except :func:`load_frozen_set` (reads a
checksummed file) and :func:`quality_gate` (scores a frame with a loaded model).

Conventions
    * ``scores`` are probabilities in [0, 1]; a row is flagged when ``score >= threshold``.
    * Expected calibration error (``ece``) uses **equal-width** bins over [0, 1]: bin ``b`` holds scores in
      ``[b/B, (b+1)/B)`` (the last bin includes 1.0); ECE = Σ_b (n_b / n) · |mean(y_b) − mean(score_b)|.
    * Recall and lift at top-K %: the ``ceil(n·K/100)`` highest-scored rows (ties broken by row order).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from service.artifacts.bundle import Calibration, ReferenceBins, ScoringModel, ThresholdPolicy, logit
from service.data import aggregates, velocity
from service.data.features import DEFAULT_AGGREGATES, EntityAggregates, feature_matrix
from service.settings import QualitySettings, TrainSettings
from service.training.calibration import fit_interpolated_isotonic

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Columns of a history frame that :func:`frame_features` reads (the public request's fields).
REQUEST_COLUMNS: Final[tuple[str, ...]] = ("yearsActive", "amount", "ipAccounts", "itemDescription")
#: Default PSI floor for empty bins (a fraction of 0 would make the log infinite).
PSI_EPS: Final[float] = 1e-4


# --------------------------------------------------------------------------------------------------- metrics


def top_k_key(kind: Literal["recall", "lift"], percent: float) -> str:
    """Metric name for top-K %: ``recall_at_top_0.5pct``, ``lift_at_top_5pct``."""
    return f"{kind}_at_top_{percent:g}pct"


def classification_metrics(
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    threshold: float,
    top_k_percents: Sequence[float],
    calibration_bins: int = 10,
) -> dict[str, float]:
    """Precision/recall/F1 at ``threshold``, PR-AUC (average precision), ROC-AUC, recall and lift at each top-K %,
    Brier score, equal-width ECE and the class counts. AUCs are NaN when only one class is present."""
    y, s = _as_labels(y_true), _as_scores(scores)
    positives = int(y.sum())
    flagged = s >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    n_flagged = int(flagged.sum())
    precision = tp / n_flagged if n_flagged else 0.0
    recall = tp / positives if positives else 0.0
    both_classes = 0 < positives < y.size
    metrics: dict[str, float] = {
        "threshold": float(threshold),
        "positives": float(positives),
        "negatives": float(y.size - positives),
        "flagged": float(n_flagged),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "pr_auc": float(average_precision_score(y, s)) if both_classes else math.nan,
        "roc_auc": float(roc_auc_score(y, s)) if both_classes else math.nan,
        "brier": float(np.mean((s - y) ** 2)),
        "ece": expected_calibration_error(y, s, calibration_bins),
    }
    for percent in top_k_percents:
        top_recall, top_lift = recall_and_lift_at_top(y, s, percent)
        metrics[top_k_key("recall", percent)] = top_recall
        metrics[top_k_key("lift", percent)] = top_lift
    return metrics


def recall_and_lift_at_top(y_true: npt.ArrayLike, scores: npt.ArrayLike, percent: float) -> tuple[float, float]:
    """Share of all positives among the top ``percent`` % scores, and that slice's precision over the base rate."""
    y, s = _as_labels(y_true), _as_scores(scores)
    positives = int(y.sum())
    if positives == 0 or y.size == 0:
        return 0.0, 0.0
    n_top = max(1, math.ceil(y.size * percent / 100.0))
    top = np.argsort(-s, kind="stable")[:n_top]
    caught = int(y[top].sum())
    return caught / positives, (caught / n_top) / (positives / y.size)


def expected_calibration_error(y_true: npt.ArrayLike, scores: npt.ArrayLike, n_bins: int) -> float:
    """Equal-width-bin ECE (see the module docstring)."""
    y, s = _as_labels(y_true), _as_scores(scores)
    if y.size == 0:
        return 0.0
    bins = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    mean_y = np.bincount(bins, weights=y, minlength=n_bins)
    mean_s = np.bincount(bins, weights=s, minlength=n_bins)
    used = counts > 0
    gaps = np.abs(mean_y[used] - mean_s[used]) / counts[used]
    return float(np.sum(gaps * counts[used]) / y.size)


def reliability_curve(
    y_true: npt.ArrayLike, scores: npt.ArrayLike, n_bins: int
) -> tuple[FloatArray, FloatArray, IntArray]:
    """Per non-empty equal-width bin: mean score, observed positive rate, row count (for the calibration plot)."""
    y, s = _as_labels(y_true), _as_scores(scores)
    bins = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    used = counts > 0
    mean_s = np.bincount(bins, weights=s, minlength=n_bins)[used] / counts[used]
    mean_y = np.bincount(bins, weights=y, minlength=n_bins)[used] / counts[used]
    return mean_s, mean_y, counts[used].astype(np.int64)


def _as_labels(values: npt.ArrayLike) -> IntArray:
    return np.asarray(values).astype(np.int64).ravel()


def _as_scores(values: npt.ArrayLike) -> FloatArray:
    return np.asarray(values, dtype=np.float64).ravel()


# ------------------------------------------------------------------------------------------ threshold policy


@dataclass(frozen=True)
class OperatingPoints:
    """Every distinct threshold (descending) with the true/false positives flagged at ``score >= threshold``."""

    thresholds: FloatArray
    true_positives: IntArray
    false_positives: IntArray
    positives: int

    @property
    def precision(self) -> FloatArray:
        return self.true_positives / (self.true_positives + self.false_positives)

    @property
    def recall(self) -> FloatArray:
        return self.true_positives / self.positives if self.positives else np.zeros_like(self.thresholds)


def operating_points(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> OperatingPoints:
    """Confusion counts at each distinct score used as the threshold."""
    y, s = _as_labels(y_true), _as_scores(scores)
    order = np.argsort(-s, kind="stable")
    sorted_scores, sorted_y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1]
    tp = np.cumsum(sorted_y)[last_of_value]
    fp = np.cumsum(1 - sorted_y)[last_of_value]
    return OperatingPoints(sorted_scores[last_of_value], tp.astype(np.int64), fp.astype(np.int64), int(y.sum()))


def choose_threshold(y_true: npt.ArrayLike, scores: npt.ArrayLike, settings: TrainSettings) -> ThresholdPolicy:
    """The decision threshold on (validation) ``scores`` by ``settings.threshold_policy``.

    ``target_precision``: the lowest threshold whose precision ≥ ``settings.target_precision`` (maximal recall at
    that precision); if no threshold reaches it, the (lowest) threshold of maximal precision, with
    ``target_reached=False``. ``cost``: the threshold minimising FN·``cost_false_negative`` +
    FP·``cost_false_positive``, where flagging nothing is a candidate too.
    """
    points = operating_points(y_true, scores)
    if points.thresholds.size == 0:
        raise ValueError("cannot choose a threshold on an empty set")
    if settings.threshold_policy == "cost":
        return _cost_threshold(points, settings.cost_false_negative, settings.cost_false_positive)
    return _target_precision_threshold(points, settings.target_precision)


def _target_precision_threshold(points: OperatingPoints, target: float) -> ThresholdPolicy:
    precision = points.precision
    reaching = np.flatnonzero(precision >= target)
    reached = reaching.size > 0
    index = int(reaching[-1]) if reached else int(np.flatnonzero(precision == precision.max())[-1])
    return ThresholdPolicy(
        policy="target_precision",
        threshold=float(points.thresholds[index]),
        target_precision=target,
        target_reached=reached,
        validation_precision=float(precision[index]),
        validation_recall=float(points.recall[index]),
    )


def _cost_threshold(points: OperatingPoints, cost_fn: float, cost_fp: float) -> ThresholdPolicy:
    costs = (points.positives - points.true_positives) * cost_fn + points.false_positives * cost_fp
    flag_nothing_cost = points.positives * cost_fn
    best = int(np.flatnonzero(costs == costs.min())[-1])
    if flag_nothing_cost < costs[best]:
        threshold, precision, recall = float(np.nextafter(points.thresholds[0], np.inf)), 0.0, 0.0
    else:
        threshold, precision, recall = (
            float(points.thresholds[best]),
            float(points.precision[best]),
            float(points.recall[best]),
        )
    return ThresholdPolicy(
        policy="cost",
        threshold=threshold,
        cost_false_negative=cost_fn,
        cost_false_positive=cost_fp,
        validation_precision=precision,
        validation_recall=recall,
    )


def policy_cost(
    y_true: npt.ArrayLike, scores: npt.ArrayLike, threshold: float, cost_fn: float, cost_fp: float
) -> float:
    """FN·cost_fn + FP·cost_fp when flagging ``score >= threshold``."""
    y, s = _as_labels(y_true), _as_scores(scores)
    flagged = s >= threshold
    return float(np.sum(~flagged & (y == 1)) * cost_fn + np.sum(flagged & (y == 0)) * cost_fp)


# ----------------------------------------------------------------------------------------------- calibration

#: ``isotonic`` — the step fit (ties within each block); ``interpolated_isotonic`` — centred isotonic regression
#: (:mod:`service.training.calibration`: strictly increasing, keeps the booster's ranking); ``platt`` — a sigmoid.
CalibrationMethod = Literal["isotonic", "interpolated_isotonic", "platt"]


def fit_isotonic(raw: npt.ArrayLike, y_true: npt.ArrayLike) -> Calibration:
    """Isotonic regression of the label on the raw probability, stored as its breakpoints
    (``X_thresholds_``, ``y_thresholds_``); :meth:`Calibration.apply` interpolates them exactly as sklearn does."""
    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(_as_scores(raw), _as_labels(y_true))
    return Calibration(
        method="isotonic",
        x=[float(v) for v in model.X_thresholds_],
        y=[float(v) for v in model.y_thresholds_],
    )


def fit_platt(raw: npt.ArrayLike, y_true: npt.ArrayLike) -> Calibration:
    """Platt scaling: an unpenalised logistic regression of the label on logit(raw) → sigmoid(a·logit + b)."""
    model = LogisticRegression(penalty=None, solver="lbfgs")
    model.fit(logit(_as_scores(raw)).reshape(-1, 1), _as_labels(y_true))
    return Calibration(method="platt", a=float(model.coef_[0, 0]), b=float(model.intercept_[0]))


CALIBRATION_FITTERS: Final = {
    "isotonic": fit_isotonic,
    "interpolated_isotonic": fit_interpolated_isotonic,
    "platt": fit_platt,
}


@dataclass(frozen=True)
class CalibrationChoice:
    """The chosen calibration (refit on all rows) and the held-out evidence it was chosen on."""

    calibration: Calibration
    method: str
    holdout_brier: dict[str, float]
    holdout_log_loss: dict[str, float]
    n_fit: int
    n_holdout: int
    note: str = ""

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("calibration")
        return data


def choose_calibration(
    raw: npt.ArrayLike,
    y_true: npt.ArrayLike,
    methods: Sequence[CalibrationMethod],
    fit_fraction: float,
) -> CalibrationChoice:
    """Fit each method on the first ``fit_fraction`` of the rows (time order), pick the lowest Brier score on the
    rest (log-loss breaks ties), refit the winner on all rows. ``identity`` is reported for comparison only.

    If a part lacks one of the classes, no fair choice is possible: the first method is fit on all rows (or the
    identity is used when all rows are of one class), and ``note`` says so.
    """
    r, y = _as_scores(raw), _as_labels(y_true)
    if not methods:
        raise ValueError("no calibration method configured")
    n_fit = int(r.size * fit_fraction)
    fit_r, fit_y, hold_r, hold_y = r[:n_fit], y[:n_fit], r[n_fit:], y[n_fit:]
    if not (_has_both_classes(fit_y) and _has_both_classes(hold_y)):
        if not _has_both_classes(y):
            return CalibrationChoice(Calibration(method="identity"), "identity", {}, {}, 0, 0, "one class only")
        method = methods[0]
        calibration = CALIBRATION_FITTERS[method](r, y)
        return CalibrationChoice(calibration, method, {}, {}, r.size, 0, "a split part lacked a class")
    briers: dict[str, float] = {"identity": float(brier_score_loss(hold_y, hold_r))}
    losses: dict[str, float] = {"identity": float(log_loss(hold_y, hold_r, labels=[0, 1]))}
    for method in methods:
        calibrated = CALIBRATION_FITTERS[method](fit_r, fit_y).apply(hold_r.astype(np.float32))
        briers[method] = float(brier_score_loss(hold_y, calibrated))
        losses[method] = float(log_loss(hold_y, calibrated, labels=[0, 1]))
    best = min(methods, key=lambda m: (briers[m], losses[m]))
    return CalibrationChoice(CALIBRATION_FITTERS[best](r, y), best, briers, losses, n_fit, hold_r.size)


def _has_both_classes(y: IntArray) -> bool:
    return 0 < int(y.sum()) < y.size


# ------------------------------------------------------------------------------------ reference bins and PSI


def reference_bins(values: npt.ArrayLike, n_bins: int) -> ReferenceBins:
    """Quantile bins of ``values`` (strictly increasing edges) and the fraction of ``values`` in each bin.

    Each quantile cut is moved into the gap between the observed values around it (:func:`gap_edges`): a cut that
    sat exactly on a repeated value (an account's age, a plateau of isotonic scores) would otherwise send that whole
    mass to one side or the other on the smallest perturbation — a client rounding ``yearsActive`` to 4 decimals
    moved PSI from 0.02 to 0.47 that way."""
    v = _as_scores(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("reference bins need at least one finite value")
    quantiles = np.quantile(v, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    edges = gap_edges(np.unique(v), quantiles)
    return ReferenceBins(edges=edges, fractions=bin_fractions(v, edges))


def gap_edges(distinct: npt.NDArray[np.float64], cuts: npt.NDArray[np.float64]) -> list[float]:
    """Each cut replaced by the midpoint between the largest observed value ≤ it and the smallest one above it
    (``distinct`` sorted and unique); cuts with no observed value above them are dropped; deduplicated."""
    upper = np.searchsorted(distinct, cuts, side="right")
    inside = (upper > 0) & (upper < distinct.size)
    mids = (distinct[upper[inside] - 1] + distinct[upper[inside]]) / 2.0
    return [float(e) for e in np.unique(mids)]


def bin_fractions(values: npt.ArrayLike, edges: Sequence[float]) -> list[float]:
    """Fraction of ``values`` in each bin defined by inner ``edges`` (``searchsorted(..., side='right')``)."""
    v = _as_scores(values)
    counts = np.bincount(np.searchsorted(np.asarray(edges), v, side="right"), minlength=len(edges) + 1)
    total = max(int(counts.sum()), 1)
    return [float(c) / total for c in counts]


def psi(expected_fractions: Sequence[float], actual_fractions: Sequence[float], eps: float = PSI_EPS) -> float:
    """Population stability index Σ (a − e)·ln(a / e), with fractions floored at ``eps``."""
    expected = np.maximum(np.asarray(expected_fractions, dtype=np.float64), eps)
    actual = np.maximum(np.asarray(actual_fractions, dtype=np.float64), eps)
    if expected.shape != actual.shape:
        raise ValueError(f"PSI needs equal bin counts, got {expected.size} and {actual.size}")
    return float(np.sum((actual - expected) * np.log(actual / expected)))


# ----------------------------------------------------------------------------------- features of a history


def frame_features(
    frame: pd.DataFrame, velocities: Sequence[velocity.Velocity] | None = None
) -> npt.NDArray[np.float32]:
    """Feature matrix of a time-ordered history frame: point-in-time aggregates and velocity features (computed
    here unless given: ``velocity.point_in_time``) + the shared feature path."""
    pit = velocity.point_in_time(frame) if velocities is None else velocities
    return feature_matrix(_request_rows(frame), aggregates.point_in_time(frame), pit)


def serving_features(
    frame: pd.DataFrame,
    store: Mapping[str, EntityAggregates],
    velocities: Sequence[velocity.Velocity] | None = None,
) -> npt.NDArray[np.float32]:
    """Feature matrix of history rows as serving computes it after training: each row's account looked up in the
    feature store built from the history (``aggregates.latest``), the default for a missing or unknown account;
    the velocity features as the online store serves them (``velocities``; None: nothing seen)."""
    looked_up = [
        store.get(str(account), DEFAULT_AGGREGATES) if pd.notna(account) else DEFAULT_AGGREGATES
        for account in frame["account_id"].tolist()
    ]
    return feature_matrix(_request_rows(frame), looked_up, velocities)


def _request_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = frame.loc[:, [c for c in REQUEST_COLUMNS if c in frame.columns]].to_dict("records")
    return rows


# --------------------------------------------------------------------------------- frozen set & quality gate


class FrozenSetIntegrityError(RuntimeError):
    """A frozen evaluation file does not match the SHA-256 recorded beside it."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_frozen_set(meta_path: Path) -> pd.DataFrame:
    """Read a frozen labelled set described by ``meta_path`` (JSON with ``file`` and ``sha256``), verifying the
    checksum first; rows are returned in time order with ``timestamp`` parsed."""
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    data_path = meta_path.parent / str(meta["file"])
    actual = file_sha256(data_path)
    if actual != meta["sha256"]:
        raise FrozenSetIntegrityError(f"{data_path}: sha256 {actual} does not match {meta_path} ({meta['sha256']})")
    frame = pd.read_csv(data_path, parse_dates=["timestamp"], dtype={"account_id": object})
    return frame.sort_values("timestamp", kind="mergesort").reset_index(drop=True)


@dataclass(frozen=True)
class GateReport:
    """Outcome of the pre-rollout quality gate: passed iff every floored metric is at or above its floor."""

    passed: bool
    model_version: str
    n_rows: int
    values: dict[str, float]
    floors: dict[str, float]
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality_gate(
    model: ScoringModel,
    frozen_frame: pd.DataFrame,
    floors: QualitySettings,
    top_k_percents: Sequence[float] = (),
) -> GateReport:
    """Score ``frozen_frame`` (labelled history, ``is_fraud``) with ``model`` at its own threshold and compare
    PR-AUC and recall-at-threshold with the floors. Recall per fraud ``pattern`` is reported when present."""
    frame = time_ordered(frozen_frame)
    scores = model.scores(frame_features(frame))
    values = classification_metrics(frame["is_fraud"].to_numpy(), scores, model.threshold, top_k_percents)
    values.update(_recall_by_pattern(frame, scores, model.threshold))
    wanted = {"pr_auc": floors.min_pr_auc, "recall": floors.min_recall_at_threshold}
    failures = [
        f"{name} {values[name]:.4f} < floor {floor:.4f}"
        for name, floor in wanted.items()
        if not values[name] >= floor  # NaN fails too
    ]
    return GateReport(not failures, model.version, len(frozen_frame), values, wanted, failures)


def time_ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` in time order (stable), index reset; unchanged if it has no ``timestamp``."""
    if "timestamp" not in frame.columns:
        return frame.reset_index(drop=True)
    return frame.sort_values("timestamp", kind="mergesort").reset_index(drop=True)


def _recall_by_pattern(frame: pd.DataFrame, scores: FloatArray, threshold: float) -> dict[str, float]:
    if "pattern" not in frame.columns:
        return {}
    flagged = scores >= threshold
    out: dict[str, float] = {}
    for pattern in sorted(frame.loc[frame["is_fraud"] == 1, "pattern"].unique()):
        mask = (frame["pattern"] == pattern).to_numpy() & (frame["is_fraud"] == 1).to_numpy()
        out[f"recall_{pattern}"] = float(flagged[mask].mean())
    return out
