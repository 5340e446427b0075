"""Each training engine (``FW_TRAIN__ENGINE``) trains on the same training set on disk and produces a verified bundle
that passes the pre-rollout quality gate on the frozen regression set.

Real parts only: ``local`` (one process, ``hist``), ``dask`` (``xgboost.dask`` on a real ``dask.distributed``
LocalCluster of 2 worker processes reading the Parquet files themselves) and ``external_memory``
(``ExtMemQuantileDMatrix`` over the Parquet batches, with batches smaller than the training window so it really pages).
The training set is a drifted synthetic stream (the new bot farm in its second half) written in the training-set
layout (one Parquet file per day). Sized for CI: 16,000 rows, 120 trees at most.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.artifacts.bundle import bundle_digest, load_bundle
from service.data.features import FEATURE_NAMES
from service.data.synthetic import SyntheticConfig, generate
from service.settings import Settings
from service.training.engines import EngineFit, bundle_fit, fit_training_set
from service.training.evaluate import frame_features, load_frozen_set, quality_gate, time_ordered
from service.training.training_set import TrainingSet, write_training_set
from tests.kits.retrain import FROZEN_SET

pytestmark = pytest.mark.integration

STREAM = SyntheticConfig(
    n_accounts=4_000, n_requests=16_000, days=40, fraud_rate=0.02, seed=16, drift=True, drift_start=0.5
)
BATCH_ROWS = 2_000


@pytest.fixture(scope="module")
def training_set(tmp_path_factory: pytest.TempPathFactory) -> TrainingSet:
    frame = time_ordered(generate(STREAM))
    directory = tmp_path_factory.mktemp("training-set")
    stamps = pd.to_datetime(frame["timestamp"], utc=True).dt.tz_localize(None).to_numpy().astype("datetime64[us]")
    info = write_training_set(
        directory, stamps, frame_features(frame), frame["is_fraud"].to_numpy(), list(FEATURE_NAMES), "synthetic"
    )
    assert info.rows == STREAM.n_requests and len(info.days) >= STREAM.days - 1
    return TrainingSet.open(directory)


def settings_for(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "home": tmp_path,
            "train": {"n_estimators": 120, "early_stopping_rounds": 20},
            "engine": {"dask_workers": 2, "dask_memory_limit": "1GiB", "external_memory_batch_rows": BATCH_ROWS},
        }
    )


@pytest.fixture(scope="module")
def fits(training_set: TrainingSet, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], EngineFit]:
    """Each engine's fit, made once per module (the comparison test reuses them)."""
    made: dict[str, EngineFit] = {}

    def fit(engine: str) -> EngineFit:
        if engine not in made:
            made[engine] = fit_training_set(training_set, settings_for(tmp_path_factory.mktemp(engine)), engine)
        return made[engine]

    return fit


@pytest.mark.parametrize("engine", ["local", "dask", "external_memory"])
def test_each_engine_makes_a_verified_bundle_that_passes_the_quality_gate(
    engine: str, training_set: TrainingSet, fits: Callable[[str], EngineFit], tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    result = fits(engine)
    assert result.engine == engine
    split = result.split
    assert split.train + split.valid + split.test == training_set.rows
    assert split.train > 0.6 * training_set.rows and split.test > 0
    assert result.cuts.valid_from < result.cuts.test_from

    out_dir = tmp_path / "bundle"
    manifest, test_metrics = bundle_fit(result, settings, f"engine-{engine}", out_dir)
    model = load_bundle(out_dir, expected_digest=bundle_digest(out_dir))  # the digest verifies
    assert model.version == f"engine-{engine}" == manifest.version
    assert manifest.extra["engine"] == engine and manifest.extra["time_split"] == result.cuts.to_dict()
    assert test_metrics["pr_auc"] > 0.5

    report = quality_gate(model, load_frozen_set(FROZEN_SET), settings.quality)
    assert report.passed, report.failures
    _check_engine_specifics(engine, result)


def _check_engine_specifics(engine: str, result: EngineFit) -> None:
    if engine == "local":
        assert not result.notes and not result.workers_peak_rss_mb
        return
    # the out-of-core engines cannot run SMOTE (it needs the whole window in one process) and say so
    assert "smote" not in {row.strategy for row in result.fit.strategies}
    assert any(note.startswith("smote skipped") for note in result.notes)
    if engine == "dask":
        assert len(result.workers_peak_rss_mb) == 2 and all(peak > 0 for peak in result.workers_peak_rss_mb)


def test_external_memory_and_local_agree_on_the_same_windows(fits: Callable[[str], EngineFit]) -> None:
    """The out-of-core path sees the same rows: the same test window, the same labels, in the same order."""
    local, paged = fits("local"), fits("external_memory")
    assert paged.cuts == local.cuts and paged.split == local.split
    np.testing.assert_array_equal(paged.y_test, local.y_test)
    assert paged.reference_columns.keys() == local.reference_columns.keys()
    for name, column in local.reference_columns.items():
        np.testing.assert_array_equal(paged.reference_columns[name], column)
