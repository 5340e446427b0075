"""The feature-log source of ``fraudwatch retrain`` (service/retraining/log_source.py): where the labels come from, the
window, the too-little-data verdict on a real training set written by the training-set code, and which aggregate
snapshot the new bundle carries (a real MLflow registry on SQLite)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from service.artifacts.bundle import read_manifest, sha256_of
from service.artifacts.registry import ModelRegistry, RunPayload
from service.data.feature_store import STORE_FILE
from service.data.features import FEATURE_NAMES
from service.retraining.log_source import carry_snapshot, labels_dsn, log_window, window_of
from service.retraining.sources import InsufficientDataError, LabelSourceMissingError
from service.settings import RetrainSettings, Settings
from service.training.training_set import TrainingSet, write_training_set

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def test_the_dsn_file_wins_over_the_value(tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql+psycopg://fw:pw@db/fraudwatch\n", encoding="utf-8")
    settings = RetrainSettings(labels_dsn=SecretStr("sqlite:///other.db"), labels_dsn_file=dsn_file)
    assert labels_dsn(settings) == "postgresql+psycopg://fw:pw@db/fraudwatch"
    assert labels_dsn(RetrainSettings(labels_dsn=SecretStr("sqlite:///x.db"))) == "sqlite:///x.db"


def test_no_label_source_is_a_setting_error_naming_both_settings(tmp_path: Path) -> None:
    with pytest.raises(LabelSourceMissingError, match=r"FW_RETRAIN__LABELS_DSN_FILE.*FW_RETRAIN__LABELS_DSN"):
        labels_dsn(RetrainSettings())
    empty = tmp_path / "dsn"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(LabelSourceMissingError, match="is empty"):
        labels_dsn(RetrainSettings(labels_dsn_file=empty))


def test_the_window_ends_at_the_run_and_takes_the_labels_known_then() -> None:
    window = log_window(28, None, NOW)
    assert (window.start, window.end, window.as_of) == (NOW - timedelta(days=28), NOW, NOW)
    naive_end = datetime(2026, 11, 30, 12, 0)  # an ISO --window-end without a zone is UTC
    window = log_window(7, naive_end, NOW)
    assert window.end == window.as_of == naive_end.replace(tzinfo=UTC)
    assert window.start == window.end - timedelta(days=7)


def small_set(directory: Path, rows: int, frauds: int) -> TrainingSet:
    stamps = np.array([np.datetime64("2026-12-01T00:00") + np.timedelta64(i, "m") for i in range(rows)])
    x = np.zeros((rows, len(FEATURE_NAMES)), dtype=np.float32)
    y = np.array([1] * frauds + [0] * (rows - frauds))
    write_training_set(directory, stamps, x, y, list(FEATURE_NAMES), "feature_log")
    return TrainingSet.open(directory)


def test_too_few_rows_or_frauds_is_insufficient_data(tmp_path: Path) -> None:
    window = log_window(7, None, NOW)
    settings = RetrainSettings(min_rows=100, min_positives=5)
    info = window_of(small_set(tmp_path / "ok", 120, 5), window, 7, settings)
    assert (info.rows, info.positives, info.source, info.as_of) == (120, 5, "feature_log", NOW.isoformat())
    with pytest.raises(InsufficientDataError, match="120 labelled rows and 4 frauds"):
        window_of(small_set(tmp_path / "few-frauds", 120, 4), window, 7, settings)
    with pytest.raises(InsufficientDataError, match="99 labelled rows"):
        window_of(small_set(tmp_path / "few-rows", 99, 10), window, 7, settings)


def test_the_snapshot_of_the_version_that_served_most_rows_is_carried(bundle_dir: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    registry = ModelRegistry(settings)
    served = read_manifest(bundle_dir).version
    ref = registry.register(registry.log_run(RunPayload(run_name="served", bundle_dir=bundle_dir)))
    model = settings.registered_model_name

    carried = tmp_path / "carried"
    carried.mkdir()
    tags = carry_snapshot(registry, model, Counter({served: 9, "an-older-version": 1}), carried)
    assert tags["aggregate_snapshot"] == f"{served} (registry {ref.version})"
    assert tags["snapshot_rows_share"] == "0.900"
    assert tags["aggregate_snapshot_sha256"] == sha256_of(bundle_dir / STORE_FILE) == sha256_of(carried / STORE_FILE)

    # rows served by a version this registry does not know: nothing copied, and the run says so
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    tags = carry_snapshot(registry, model, Counter({"elsewhere": 3, served: 1}), orphan)
    assert tags["aggregate_snapshot"] == f"none: elsewhere is not a version of {model}"
    assert not (orphan / STORE_FILE).exists()
