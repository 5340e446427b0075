"""An engine fit logged as an MLflow run (a real file-backed MLflow under the test's home) records the engine, the
data window and the row counts; the rich progress advances one step per boosting round."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from rich.console import Console

from service.artifacts.registry import ModelRegistry
from service.data.features import FEATURE_NAMES
from service.data.synthetic import SyntheticConfig, generate
from service.settings import Settings
from service.training.engines import bundle_fit, fit_training_set
from service.training.evaluate import frame_features, time_ordered
from service.training.from_log import RichProgress, run_payload
from service.training.training_set import TrainingSet, write_training_set

DATA = SyntheticConfig(n_accounts=800, n_requests=5_000, days=20, fraud_rate=0.05, seed=3)


def test_the_run_records_engine_window_and_row_counts(tmp_path: Path) -> None:
    frame = time_ordered(generate(DATA))
    stamps = pd.to_datetime(frame["timestamp"], utc=True).dt.tz_localize(None).to_numpy().astype("datetime64[us]")
    set_dir = tmp_path / "set"
    write_training_set(set_dir, stamps, frame_features(frame), frame["is_fraud"].to_numpy(), list(FEATURE_NAMES), "t")
    training_set = TrainingSet.open(set_dir)
    settings = Settings.model_validate(
        {"home": tmp_path, "train": {"n_estimators": 30, "imbalance_strategies": ["scale_pos_weight"]}}
    )
    console = Console(record=True, force_terminal=False, width=200)
    with RichProgress(console) as progress:
        result = fit_training_set(training_set, settings, "local", progress)
    # one round callback, advanced once per round the booster was trained for (early stopping may end it sooner)
    [callback] = progress.callbacks
    assert 1 <= callback.rounds <= 30 and callback.rounds >= result.fit.booster.num_boosted_rounds()
    assert "✓ Training on " in console.export_text()

    manifest, test_metrics = bundle_fit(result, settings, "from-log", tmp_path / "bundle")
    payload = run_payload(result, manifest, test_metrics, training_set, tmp_path / "bundle")
    info = ModelRegistry(settings).log_run(payload)
    run = mlflow.MlflowClient(tracking_uri=settings.tracking_uri).get_run(info.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["engine"] == "local" and params["engine"] == "local"
    assert tags["window_start"] == training_set.meta["start"] and tags["window_end"] == training_set.meta["end"]
    assert tags["data_rows"] == str(DATA.n_requests) and tags["data_positives"] == str(int(frame["is_fraud"].sum()))
    rows = [int(tags[f"rows_{window}"]) for window in ("train", "valid", "test")]
    assert sum(rows) == DATA.n_requests and rows == list(result.split.as_dict().values())
    assert np.isclose(run.data.metrics["test_pr_auc"], test_metrics["pr_auc"])
