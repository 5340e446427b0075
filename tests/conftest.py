"""Shared fixtures: a small, real model bundle (booster + manifest + feature store) built once per session."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from service.artifacts.bundle import Calibration, Manifest, ThresholdPolicy, save_bundle
from service.data import aggregates
from service.data.feature_store import STORE_FILE, build_store
from service.data.features import DRIFT_FEATURES, FEATURE_NAMES, feature_matrix
from service.data.synthetic import SyntheticConfig, generate
from service.training.evaluate import reference_bins

#: Small enough to build in about a second; big enough that the booster learns the fraud patterns.
SMALL_DATA = SyntheticConfig(n_accounts=600, n_requests=4_000, days=30, fraud_rate=0.05, seed=11)
SMALL_TREES = 50
N_REFERENCE_BINS = 10


def build_small_bundle(directory: Path, config: SyntheticConfig = SMALL_DATA, n_trees: int = SMALL_TREES) -> Manifest:
    """Train a small XGBoost model on synthetic data and save it as a verified bundle with a feature store."""
    frame = generate(config)
    pit = aggregates.point_in_time(frame)
    features = feature_matrix(frame.to_dict("records"), pit)
    labels = frame["is_fraud"].to_numpy()
    params = {
        "objective": "binary:logistic",
        "tree_method": "hist",
        "max_depth": 4,
        "eta": 0.2,
        "nthread": 1,
        "seed": config.seed,
        "eval_metric": "aucpr",
    }
    booster = xgb.train(params, xgb.DMatrix(features, label=labels), num_boost_round=n_trees)
    raw = np.asarray(booster.inplace_predict(features), dtype=np.float32)
    calibration = Calibration(method="identity")
    scores = calibration.apply(raw)
    threshold = float(np.quantile(scores, 1.0 - config.fraud_rate))
    columns = {name: FEATURE_NAMES.index(name) for name in DRIFT_FEATURES}
    digest = hashlib.sha256(features.tobytes()).hexdigest()[:8]
    manifest = Manifest(
        version=f"test-{digest}",
        feature_names=list(FEATURE_NAMES),
        calibration=calibration,
        threshold=ThresholdPolicy(policy="target_precision", threshold=threshold, target_precision=0.8),
        feature_reference={name: reference_bins(features[:, col], N_REFERENCE_BINS) for name, col in columns.items()},
        score_reference=reference_bins(scores, N_REFERENCE_BINS),
        metrics={"train_rows": float(len(frame))},
        params={**params, "num_boost_round": n_trees},
        sha256="",
        created_at=datetime.now(UTC).isoformat(),
    )
    saved = save_bundle(booster, manifest, directory)
    build_store(directory / STORE_FILE, aggregates.latest(frame))
    return saved


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ready model bundle directory (``model.ubj``, ``manifest.json``, ``features.sqlite``); do not modify."""
    directory = tmp_path_factory.mktemp("bundle") / "model"
    build_small_bundle(directory)
    return directory
