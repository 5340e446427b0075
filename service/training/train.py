"""XGBoost training: imbalance strategies compared on a validation window, calibration, threshold, bundle.

:func:`train_model` is the generic core (any float matrix — the refund features or the credit-card benchmark):
for each configured imbalance strategy (``none``; ``scale_pos_weight`` = negatives/positives; ``smote`` on the
training rows only) it trains a ``hist`` booster with early stopping on the validation PR-AUC, keeps the
strategy with the best validation PR-AUC, then chooses the calibration and the decision threshold on the
validation rows (see :mod:`service.training.evaluate`).

:func:`train_pipeline` is the refund-fraud pipeline: time-ordered split, features through the one feature path
(``aggregates.point_in_time`` + ``features.feature_matrix``), :func:`train_model`, test-window evaluation, the
bundle (``service.artifacts.bundle.save_bundle``), the report, and the feature-store source (``aggregates.latest``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb
from imblearn.over_sampling import SMOTE
from sklearn.metrics import average_precision_score

from service.artifacts.bundle import Manifest, ThresholdPolicy, save_bundle
from service.data import aggregates, velocity
from service.data.features import DRIFT_FEATURES, FEATURE_SETS, EntityAggregates, select
from service.settings import Settings, TrainSettings
from service.training.evaluate import (
    CalibrationChoice,
    choose_calibration,
    choose_threshold,
    classification_metrics,
    frame_features,
    reference_bins,
    serving_features,
    time_ordered,
)
from service.training.report import ReportInput, ReportPaths, write_report

log = logging.getLogger(__name__)

Strategy = Literal["none", "scale_pos_weight", "smote"]
Matrix = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]

#: Columns a synthetic/refund history frame must carry for :func:`train_pipeline`.
REQUIRED_COLUMNS: Final[tuple[str, ...]] = (
    "timestamp",
    "account_id",
    "yearsActive",
    "amount",
    "ipAccounts",
    "itemDescription",
    "is_fraud",
    "prior_refunds_base",
    "avg_amount_base",
)


# ------------------------------------------------------------------------------------------- generic core


@dataclass(frozen=True)
class StrategyResult:
    """One imbalance strategy's validation outcome."""

    strategy: str
    valid_pr_auc: float
    best_iteration: int
    train_rows: int
    train_positives: int
    scale_pos_weight: float
    seconds: float

    def row(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "valid_pr_auc": self.valid_pr_auc,
            "trees": self.best_iteration + 1,
            "train_rows": self.train_rows,
            "train_positives": self.train_positives,
            "scale_pos_weight": self.scale_pos_weight,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class ModelFit:
    """The outcome of :func:`train_model`: the chosen booster (truncated to its best iteration) and its policy."""

    booster: xgb.Booster
    strategy: str
    strategies: list[StrategyResult]
    calibration: CalibrationChoice
    threshold: ThresholdPolicy
    params: dict[str, Any]
    valid_raw: npt.NDArray[np.float64]
    valid_scores: npt.NDArray[np.float64]

    @property
    def strategy_pr_auc(self) -> dict[str, float]:
        return {r.strategy: r.valid_pr_auc for r in self.strategies}

    def raw_scores(self, features: Matrix) -> npt.NDArray[np.float64]:
        return np.asarray(self.booster.inplace_predict(features, validate_features=False), dtype=np.float64)

    def scores(self, features: Matrix) -> npt.NDArray[np.float64]:
        return self.calibration.calibration.apply(self.raw_scores(features).astype(np.float32))


def xgb_params(settings: TrainSettings, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Booster parameters from settings (``extra`` overrides/extends, e.g. a benchmark's tuned values)."""
    params: dict[str, Any] = {
        "objective": "binary:logistic",
        "eval_metric": "aucpr",
        "tree_method": "hist",
        "max_depth": settings.max_depth,
        "learning_rate": settings.learning_rate,
        "subsample": settings.subsample,
        "colsample_bytree": settings.colsample_bytree,
        "min_child_weight": settings.min_child_weight,
        "nthread": settings.nthread,
        "seed": settings.seed,
    }
    params.update(extra or {})
    return params


def resample(strategy: str, x: Matrix, y: Labels, settings: TrainSettings) -> tuple[Matrix, Labels, float, str]:
    """Training rows and ``scale_pos_weight`` for a strategy (SMOTE touches only the rows given here).

    Returns ``(x, y, scale_pos_weight, note)``; SMOTE is skipped (note says why) when the minority class is
    already at or above ``smote_ratio`` or has fewer than two rows.
    """
    positives = int(y.sum())
    negatives = int(y.size - positives)
    if strategy == "scale_pos_weight":
        return x, y, negatives / max(positives, 1), ""
    if strategy != "smote":
        return x, y, 1.0, ""
    if positives < 2 or positives / max(negatives, 1) >= settings.smote_ratio:
        return x, y, 1.0, "smote skipped: too few positives or ratio already reached"
    sampler = SMOTE(
        sampling_strategy=settings.smote_ratio,
        k_neighbors=min(settings.smote_k_neighbors, positives - 1),
        random_state=settings.seed,
    )
    x_res, y_res = sampler.fit_resample(x, y)
    return np.asarray(x_res, dtype=np.float32), np.asarray(y_res, dtype=np.int64), 1.0, ""


def fit_booster(
    x_train: Matrix,
    y_train: Labels,
    x_valid: Matrix,
    y_valid: Labels,
    params: Mapping[str, Any],
    settings: TrainSettings,
    feature_names: list[str] | None = None,
    callbacks: Sequence[xgb.callback.TrainingCallback] = (),
) -> xgb.Booster:
    """Train with early stopping on the validation PR-AUC; return the booster cut at its best iteration."""
    dtrain = xgb.DMatrix(x_train, label=y_train, feature_names=feature_names, nthread=settings.nthread)
    dvalid = xgb.DMatrix(x_valid, label=y_valid, feature_names=feature_names, nthread=settings.nthread)
    booster = xgb.train(
        dict(params),
        dtrain,
        num_boost_round=settings.n_estimators,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=settings.early_stopping_rounds,
        verbose_eval=False,
        callbacks=list(callbacks),
    )
    best = int(booster.best_iteration)
    return booster[: best + 1]


def train_model(
    x_train: Matrix,
    y_train: npt.ArrayLike,
    x_valid: Matrix,
    y_valid: npt.ArrayLike,
    settings: TrainSettings,
    *,
    feature_names: list[str] | None = None,
    extra_params: Mapping[str, Any] | None = None,
    callbacks: Sequence[xgb.callback.TrainingCallback] = (),
) -> ModelFit:
    """Compare the imbalance strategies of ``settings`` on the validation rows, keep the best by validation
    PR-AUC, then calibrate and choose the threshold on the validation rows.

    The validation rows should be in time order when the data has one: calibration is fit on their first
    ``calibration_fit_fraction`` and chosen on the rest before being refit on all of them.
    """
    y_tr = np.asarray(y_train).astype(np.int64)
    y_va = np.asarray(y_valid).astype(np.int64)
    x_tr, x_va = np.asarray(x_train, dtype=np.float32), np.asarray(x_valid, dtype=np.float32)
    if int(y_va.sum()) == 0 or int(y_tr.sum()) == 0:
        raise ValueError("training and validation rows must both contain positives")
    results: list[StrategyResult] = []
    boosters: dict[str, xgb.Booster] = {}
    base = xgb_params(settings, extra_params)
    for strategy in settings.imbalance_strategies:
        started = time.perf_counter()
        xs, ys, weight, note = resample(strategy, x_tr, y_tr, settings)
        params = {**base, "scale_pos_weight": weight}
        booster = fit_booster(xs, ys, x_va, y_va, params, settings, feature_names, callbacks)
        raw = booster.inplace_predict(x_va, validate_features=False)
        result = StrategyResult(
            strategy=strategy,
            valid_pr_auc=float(average_precision_score(y_va, raw)),
            best_iteration=booster.num_boosted_rounds() - 1,
            train_rows=int(ys.size),
            train_positives=int(ys.sum()),
            scale_pos_weight=weight,
            seconds=time.perf_counter() - started,
        )
        log.info("strategy trained", extra={"strategy_result": result.row(), "note": note})
        results.append(result)
        boosters[strategy] = booster

    def valid_raw_of(booster: xgb.Booster) -> npt.NDArray[np.float64]:
        return np.asarray(booster.inplace_predict(x_va, validate_features=False), dtype=np.float64)

    return choose_fit(results, boosters, valid_raw_of, y_va, settings, base)


def choose_fit(
    results: list[StrategyResult],
    boosters: Mapping[str, xgb.Booster],
    valid_raw_of: Callable[[xgb.Booster], npt.NDArray[np.float64]],
    y_valid: Labels,
    settings: TrainSettings,
    base_params: Mapping[str, Any],
) -> ModelFit:
    """The strategy with the best validation PR-AUC (the first listed wins a tie), then its calibration and decision
    threshold chosen on the validation rows — every engine (service/training/engines.py) ends its fit here."""
    best = max(results, key=lambda r: r.valid_pr_auc)
    booster = boosters[best.strategy]
    valid_raw = valid_raw_of(booster)
    calibration = choose_calibration(
        valid_raw, y_valid, settings.calibration_methods, settings.calibration_fit_fraction
    )
    valid_scores = calibration.calibration.apply(valid_raw.astype(np.float32))
    threshold = choose_threshold(y_valid, valid_scores, settings)
    params = {**base_params, "scale_pos_weight": best.scale_pos_weight, "num_boost_round": best.best_iteration + 1}
    return ModelFit(booster, best.strategy, results, calibration, threshold, params, valid_raw, valid_scores)


# --------------------------------------------------------------------------------------- refund pipeline


@dataclass(frozen=True)
class SplitSizes:
    train: int
    valid: int
    test: int

    def as_dict(self) -> dict[str, int]:
        return {"train": self.train, "valid": self.valid, "test": self.test}


def time_split(n_rows: int, settings: TrainSettings) -> SplitSizes:
    """Row counts of the train / validation / test windows of ``n_rows`` time-ordered rows."""
    n_train = int(n_rows * settings.train_fraction)
    n_valid = int(n_rows * settings.valid_fraction)
    if n_train + n_valid >= n_rows:
        raise ValueError("train_fraction + valid_fraction must leave rows for the test window")
    return SplitSizes(n_train, n_valid, n_rows - n_train - n_valid)


@dataclass
class TrainingResult:
    """Everything the registry helper logs: bundle, manifest, metrics, strategy table, report, params,
    and the feature-store source (``aggregates``: each account's latest aggregates after the whole frame)."""

    bundle_dir: Path
    manifest: Manifest
    test_metrics: dict[str, float]
    valid_metrics: dict[str, float]
    strategy_table: list[dict[str, Any]]
    chosen_strategy: str
    report: ReportPaths
    aggregates: dict[str, EntityAggregates]
    params: dict[str, Any]
    split: SplitSizes
    data_fingerprint: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact_paths(self) -> list[Path]:
        return [self.bundle_dir / "model.ubj", self.bundle_dir / "manifest.json", *self.report.as_list()]


def data_fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 of the frame's row hashes (values and column order; independent of the index)."""
    digest = hashlib.sha256(",".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def flat_params(settings: TrainSettings, fit: ModelFit, split: SplitSizes) -> dict[str, Any]:
    """Scalar parameters (MLflow-friendly): settings, chosen booster params, split sizes."""
    out: dict[str, Any] = {}
    for key, value in settings.model_dump().items():
        out[f"train.{key}"] = ",".join(map(str, value)) if isinstance(value, tuple | list) else value
    for key, value in fit.params.items():
        out[f"xgb.{key}"] = value
    out["imbalance_strategy"] = fit.strategy
    out["calibration_method"] = fit.calibration.method
    out.update({f"split.{k}": v for k, v in split.as_dict().items()})
    return out


def drift_columns(features: Matrix, names: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
    """The columns of ``features`` whose reference bins a manifest keeps (``DRIFT_FEATURES``)."""
    return {name: features[:, list(names).index(name)] for name in DRIFT_FEATURES if name in names}


def fit_manifest(
    fit: ModelFit,
    version: str,
    names: list[str],
    reference_columns: Mapping[str, npt.NDArray[Any]],
    served_scores: npt.NDArray[np.float64],
    test_metrics: dict[str, float],
    params: dict[str, Any],
    extra: dict[str, Any],
    settings: TrainSettings,
) -> Manifest:
    """The manifest of a fit (checksum filled in by ``save_bundle``); drift references from ``reference_columns`` —
    each drift feature's values as serving computes them — and ``served_scores``."""
    return Manifest(
        version=version,
        feature_names=names,
        calibration=fit.calibration.calibration,
        threshold=fit.threshold,
        feature_reference={
            name: reference_bins(reference_columns[name], settings.reference_bins)
            for name in DRIFT_FEATURES
            if name in reference_columns
        },
        score_reference=reference_bins(served_scores, settings.reference_bins),
        metrics=test_metrics,
        params=params,
        sha256="",
        created_at=datetime.now(UTC).isoformat(),
        extra=extra,
    )


#: How a feature store is built from a history, for requests that come after it: ``(history, later) → store``.
StoreBuilder = Callable[[pd.DataFrame, pd.DataFrame], Mapping[str, EntityAggregates]]


def latest_store(history: pd.DataFrame, later: pd.DataFrame) -> Mapping[str, EntityAggregates]:
    """The default feature store: each account's aggregates after ``history`` (``later`` is not used)."""
    return aggregates.latest(history)


def train_pipeline(
    frame: pd.DataFrame,
    settings: Settings,
    version: str,
    out_dir: Path,
    *,
    store_builder: StoreBuilder = latest_store,
) -> TrainingResult:
    """Train, evaluate and bundle a refund-fraud model from a labelled history ``frame`` (the synthetic schema).

    The frame is put in time order; features use the aggregates of everything strictly before each row; the
    train / validation / test windows are consecutive in time. The bundle and report go to ``out_dir``.
    ``store_builder`` is how the bundle's feature store will be built (the drift references are the test window as
    serving featurizes it with a store built that way from everything before the window).
    """
    started = time.perf_counter()
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"training frame lacks columns {missing}")
    ts = settings.train
    history = time_ordered(frame)
    names = list(FEATURE_SETS[ts.feature_set])
    live = velocity.point_in_time(history)
    features = select(frame_features(history, live), names)
    labels = history["is_fraud"].to_numpy().astype(np.int64)
    split = time_split(len(history), ts)
    train_end, valid_end = split.train, split.train + split.valid
    x_train, x_valid, x_test = features[:train_end], features[train_end:valid_end], features[valid_end:]
    y_train, y_valid, y_test = labels[:train_end], labels[train_end:valid_end], labels[valid_end:]
    fit = train_model(x_train, y_train, x_valid, y_valid, ts, feature_names=names)
    raw_test = fit.raw_scores(x_test)
    scores_test = fit.calibration.calibration.apply(raw_test.astype(np.float32))
    test_metrics = classification_metrics(
        y_test, scores_test, fit.threshold.threshold, ts.top_k_percents, ts.calibration_bins
    )
    valid_metrics = classification_metrics(
        y_valid, fit.valid_scores, fit.threshold.threshold, ts.top_k_percents, ts.calibration_bins
    )
    # Drift is measured on what serving computes, so the references come from a simulated serving period: the test
    # window featurized with a feature store built — as the bundle's is — from everything before it (accounts new
    # since then get what serving gives them). Not the training rows' point-in-time aggregates: cumulative counts
    # grow over a window, and a reference taken on its early rows made ordinary traffic look drifted. The velocity
    # features are what the live online store serves: each row's point-in-time values.
    before, recent = history.iloc[:valid_end], history.iloc[valid_end:]
    served_recent = select(serving_features(recent, store_builder(before, recent), live[valid_end:]), names)
    served_scores = fit.calibration.calibration.apply(fit.raw_scores(served_recent).astype(np.float32))
    fingerprint = data_fingerprint(history)
    params = flat_params(ts, fit, split)
    strategy_table = [r.row() for r in fit.strategies]
    extra: dict[str, Any] = {
        "imbalance_strategy": fit.strategy,
        "feature_set": ts.feature_set,
        "strategy_valid_pr_auc": fit.strategy_pr_auc,
        "strategies": strategy_table,
        "calibration_choice": fit.calibration.summary(),
        "data_fingerprint": fingerprint,
        "data_rows": len(history),
        "split": split.as_dict(),
        "time_range": [str(history["timestamp"].iloc[0]), str(history["timestamp"].iloc[-1])],
        "valid_metrics": valid_metrics,
        "reference_window": "test (serving view: feature-store aggregates)",
    }
    manifest = save_bundle(
        fit.booster,
        fit_manifest(
            fit, version, names, drift_columns(served_recent, names), served_scores, test_metrics, params, extra, ts
        ),
        out_dir,
    )
    report = write_report(
        out_dir,
        ReportInput(
            version=version,
            test_metrics=test_metrics,
            valid_metrics=valid_metrics,
            strategies=strategy_table,
            chosen_strategy=fit.strategy,
            calibration=fit.calibration.summary(),
            threshold=fit.threshold,
            split=split.as_dict(),
            y_test=y_test,
            raw_test=raw_test,
            scores_test=scores_test,
            calibration_bins=ts.calibration_bins,
        ),
    )
    seconds = time.perf_counter() - started
    log.info(
        "model trained",
        extra={"version": version, "strategy": fit.strategy, "test_pr_auc": test_metrics["pr_auc"], "s": seconds},
    )
    return TrainingResult(
        bundle_dir=out_dir,
        manifest=manifest,
        test_metrics=test_metrics,
        valid_metrics=valid_metrics,
        strategy_table=strategy_table,
        chosen_strategy=fit.strategy,
        report=report,
        aggregates=aggregates.latest(history),
        params=params,
        split=split,
        data_fingerprint=fingerprint,
        seconds=seconds,
        extra=extra,
    )
