"""The training core and the refund pipeline on small synthetic data (seconds, not minutes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from service.artifacts.bundle import MODEL_FILE, ModelIntegrityError, ReferenceBins, load_bundle
from service.data import aggregates, velocity
from service.data.features import DRIFT_FEATURES, FEATURE_NAMES
from service.data.synthetic import SyntheticConfig, generate
from service.settings import QualitySettings, Settings, TrainSettings
from service.training.evaluate import (
    bin_fractions,
    frame_features,
    psi,
    quality_gate,
    reference_bins,
    serving_features,
    time_ordered,
)
from service.training.train import TrainingResult, resample, time_split, train_model, train_pipeline

SMALL = TrainSettings(n_estimators=60, early_stopping_rounds=15, max_depth=4, learning_rate=0.15, nthread=1)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate(SyntheticConfig(n_accounts=1500, n_requests=8000, fraud_rate=0.03, seed=3))


@pytest.fixture(scope="module")
def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return frame_features(frame), frame["is_fraud"].to_numpy().astype(np.int64)


@pytest.fixture(scope="module")
def trained(frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    settings = Settings(train=SMALL)
    return train_pipeline(frame, settings, "v-test", tmp_path_factory.mktemp("bundle"))


def _cut(arrays: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    x, y = arrays
    split = time_split(len(y), SMALL)
    end = split.train + split.valid
    return x[: split.train], y[: split.train], x[split.train : end], y[split.train : end]


def test_train_model_reports_all_strategies_and_picks_best(arrays: tuple[np.ndarray, np.ndarray]) -> None:
    x_tr, y_tr, x_va, y_va = _cut(arrays)
    fit = train_model(x_tr, y_tr, x_va, y_va, SMALL, feature_names=list(FEATURE_NAMES))
    assert [r.strategy for r in fit.strategies] == ["none", "scale_pos_weight", "smote"]
    assert fit.strategy == max(fit.strategies, key=lambda r: r.valid_pr_auc).strategy
    chosen = next(r for r in fit.strategies if r.strategy == fit.strategy)
    assert fit.booster.num_boosted_rounds() == chosen.best_iteration + 1
    # the reported validation PR-AUC is the truncated booster's
    assert chosen.valid_pr_auc == pytest.approx(average_precision_score(y_va, fit.raw_scores(x_va)))
    spw = next(r for r in fit.strategies if r.strategy == "scale_pos_weight")
    assert spw.scale_pos_weight == pytest.approx((y_tr.size - y_tr.sum()) / y_tr.sum())
    assert fit.threshold.validation_precision is not None


def test_smote_resamples_training_rows_to_the_configured_ratio(arrays: tuple[np.ndarray, np.ndarray]) -> None:
    x_tr, y_tr, _, _ = _cut(arrays)
    xs, ys, weight, note = resample("smote", x_tr, y_tr, SMALL)
    negatives = int((y_tr == 0).sum())
    assert int((ys == 0).sum()) == negatives  # negatives untouched
    assert ys.sum() / negatives == pytest.approx(SMALL.smote_ratio, abs=1 / negatives)
    assert weight == 1.0 and not note
    np.testing.assert_array_equal(xs[: y_tr.size], x_tr)  # originals kept, synthetic rows appended
    already = TrainSettings(smote_ratio=0.01)
    _, ys_same, _, skipped = resample("smote", x_tr, y_tr, already)
    assert ys_same.size == y_tr.size and skipped


def test_training_is_deterministic_for_a_seed(arrays: tuple[np.ndarray, np.ndarray]) -> None:
    """Same data + settings (hist, nthread=2, SMOTE + row/column subsampling) → byte-identical booster."""
    x_tr, y_tr, x_va, y_va = _cut(arrays)
    settings = SMALL.model_copy(update={"imbalance_strategies": ("smote",), "nthread": 2})
    digests = {
        hashlib.sha256(bytes(train_model(x_tr, y_tr, x_va, y_va, settings).booster.save_raw("ubj"))).hexdigest()
        for _ in range(2)
    }
    assert len(digests) == 1


def test_pipeline_bundle_round_trip(trained: TrainingResult, frame: pd.DataFrame) -> None:
    model = load_bundle(trained.bundle_dir)
    manifest = model.manifest
    assert manifest.version == "v-test"
    assert manifest.feature_names == list(FEATURE_NAMES)
    assert set(manifest.feature_reference) == set(DRIFT_FEATURES)
    assert manifest.metrics["pr_auc"] == pytest.approx(trained.test_metrics["pr_auc"])
    assert manifest.extra["imbalance_strategy"] == trained.chosen_strategy
    assert set(manifest.extra["strategy_valid_pr_auc"]) == {"none", "scale_pos_weight", "smote"}
    assert manifest.extra["data_fingerprint"] == trained.data_fingerprint
    # the loaded model reproduces the test-window metrics recorded at training time
    x = frame_features(frame)
    test = slice(trained.split.train + trained.split.valid, None)
    scores = model.scores(x[test])
    y_test = frame["is_fraud"].to_numpy()[test]
    assert average_precision_score(y_test, scores) == pytest.approx(trained.test_metrics["pr_auc"], abs=1e-9)
    assert model.predictions(scores).sum() == trained.test_metrics["flagged"]


def test_tampered_model_file_is_rejected(trained: TrainingResult, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    copy.mkdir()
    for name in (MODEL_FILE, "manifest.json"):
        (copy / name).write_bytes((trained.bundle_dir / name).read_bytes())
    load_bundle(copy)
    data = bytearray((copy / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        load_bundle(copy)


def test_report_files_are_written(trained: TrainingResult) -> None:
    paths = trained.report
    assert paths.pr_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths.calibration.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(paths.metrics_json.read_text())
    assert metrics["test"]["pr_auc"] == pytest.approx(trained.test_metrics["pr_auc"])
    assert {row["strategy"] for row in metrics["strategies"]} == {"none", "scale_pos_weight", "smote"}
    text = paths.markdown.read_text()
    assert "Imbalance strategies" in text and trained.chosen_strategy in text


def test_feature_store_source_is_latest_aggregates(trained: TrainingResult, frame: pd.DataFrame) -> None:
    accounts = set(frame["account_id"].dropna())
    assert set(trained.aggregates) == accounts
    some = sorted(accounts)[0]
    rows = frame[frame["account_id"] == some]
    expected_count = rows["prior_refunds_base"].iloc[0] + len(rows)
    assert trained.aggregates[some].prior_refunds == pytest.approx(expected_count)
    assert trained.aggregates == aggregates.latest(frame)


def test_quality_gate_passes_and_fails_on_floors(trained: TrainingResult, frame: pd.DataFrame) -> None:
    model = load_bundle(trained.bundle_dir)
    recent = frame.iloc[trained.split.train + trained.split.valid :]
    lenient = quality_gate(model, recent, QualitySettings(min_pr_auc=0.0, min_recall_at_threshold=0.0))
    assert lenient.passed and not lenient.failures
    assert lenient.values["pr_auc"] > 0.5
    assert {"recall_bot_farm", "recall_serial_refunder", "recall_high_value"} <= set(lenient.values)
    strict = quality_gate(model, recent, QualitySettings(min_pr_auc=1.0, min_recall_at_threshold=1.0))
    assert not strict.passed and len(strict.failures) >= 1


def test_time_split_leaves_a_test_window() -> None:
    split = time_split(1000, TrainSettings(train_fraction=0.7, valid_fraction=0.15))
    assert (split.train, split.valid, split.test) == (700, 150, 150)
    with pytest.raises(ValueError, match="test window"):
        time_split(10, TrainSettings(train_fraction=0.9, valid_fraction=0.1))


def test_drift_references_match_what_serving_computes_after_training(tmp_path: Path) -> None:
    """Train on the first 80 % of a stream; serve the rest as serving would (the bundle's feature store, built from
    the training history, and the live online store's velocity features): no drift feature and not the score
    drifts against the bundle's references. A reference on the training rows' point-in-time aggregates would see
    this ordinary traffic as drifted (counts grow)."""
    stream = time_ordered(generate(SyntheticConfig(n_accounts=1500, n_requests=10_000, fraud_rate=0.03, seed=3)))
    cut = int(len(stream) * 0.8)
    history, future = stream.iloc[:cut], stream.iloc[cut:]
    result = train_pipeline(history, Settings(train=SMALL), "v-future", tmp_path)
    model = load_bundle(tmp_path)
    live = velocity.point_in_time(stream)[cut:]  # what the online store, updated by every event, serves
    served = serving_features(future, result.aggregates, live)

    def drift(reference: ReferenceBins, values: np.ndarray) -> float:
        return psi(reference.fractions, bin_fractions(values, reference.edges))

    for name, reference in model.manifest.feature_reference.items():
        assert drift(reference, served[:, FEATURE_NAMES.index(name)]) < 0.1, name
    assert drift(model.manifest.score_reference, model.scores(served)) < 0.1
    column = FEATURE_NAMES.index("prior_refunds")
    point_in_time = reference_bins(frame_features(history)[: result.split.train, column], 10)
    assert drift(point_in_time, served[:, column]) > 0.25  # what the references were before, and why they changed
