"""service.demo.versions (the rollout demo's model side) and service.training.pipeline.store_as_of: the settings, the
cut in time, the feature store as of the cut, the frozen regression set, and the deliberately bad version (a real
bundle: the session's small model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from service.artifacts.bundle import load_bundle, read_manifest
from service.data import aggregates
from service.data.synthetic import generate
from service.demo.versions import (
    DemoDataSettings,
    cut_at,
    degraded_copy,
    regression_config,
    stream_config,
    threshold_for_recall,
    write_frozen_set,
)
from service.training.evaluate import frame_features, load_frozen_set, time_ordered
from service.training.pipeline import store_as_of
from tests.conftest import SMALL_DATA

SMALL = DemoDataSettings(n_requests=4_000, n_accounts=6_000, days=30, regression_rows=1_000)


def test_the_cuts_must_be_in_order() -> None:
    with pytest.raises(ValidationError, match="champion_until"):
        DemoDataSettings(champion_until=0.9, challenger_until=0.8)
    with pytest.raises(ValidationError, match="drift"):
        DemoDataSettings(drift_start=0.9, challenger_until=0.85)


def test_the_stream_drifts_and_the_regression_set_is_another_drifted_stream() -> None:
    stream, regression = stream_config(SMALL), regression_config(SMALL)
    assert stream.drift and regression.drift and stream.seed != regression.seed
    assert regression.n_requests == SMALL.regression_rows
    assert regression.n_accounts == round(SMALL.n_accounts * SMALL.regression_rows / SMALL.n_requests)


def test_cut_at_splits_the_window_in_time() -> None:
    frame = generate(stream_config(SMALL))
    before, after = cut_at(frame, SMALL.days, 0.5)
    assert len(before) + len(after) == len(frame)
    assert before["timestamp"].max() < after["timestamp"].min()
    start = time_ordered(frame)["timestamp"].iloc[0]
    assert (after["timestamp"].min() - start).total_seconds() >= 0.5 * SMALL.days * 86_400
    new_farm = frame.loc[frame["pattern"] == "new_bot_farm", "timestamp"]
    assert new_farm.min() >= start + pd.Timedelta(days=SMALL.drift_start * SMALL.days)  # v1's window has no farm
    early, _ = cut_at(frame, SMALL.days, SMALL.champion_until)
    assert not (early["pattern"] == "new_bot_farm").any()


def test_the_store_as_of_the_cut_knows_later_accounts_by_their_record_only() -> None:
    history, later = cut_at(generate(stream_config(SMALL)), SMALL.days, SMALL.challenger_until)
    store = store_as_of(history, later)
    latest = aggregates.latest(history)
    assert {key: store[key] for key in latest} == latest
    fresh = later.loc[~later["account_id"].isin(history["account_id"]) & (later["prior_refunds_base"] > 0)]
    assert len(fresh) > 0
    row = fresh.iloc[0]
    assert store[str(row["account_id"])].prior_refunds == row["prior_refunds_base"]  # none of its later refunds
    # nothing of the later requests themselves is used
    changed = later.assign(amount=later["amount"] * 10.0, is_fraud=1 - later["is_fraud"])
    assert store_as_of(history, changed) == store
    never_refunded = later.loc[~later["account_id"].isin(history["account_id"]) & (later["prior_refunds_base"] == 0)]
    assert all(str(a) not in store for a in never_refunded["account_id"])  # the unknown-account default serves them


def test_the_frozen_set_round_trips_with_its_checksum(tmp_path: Path) -> None:
    frame = generate(regression_config(SMALL))
    meta = write_frozen_set(frame, tmp_path / "regression")
    document = json.loads(meta.read_text())
    assert document["rows"] == len(frame) and document["frauds"] == int(frame["is_fraud"].sum())
    assert len(load_frozen_set(meta)) == len(frame)


def test_the_bad_version_keeps_the_scores_and_misses_fraud(bundle_dir: Path, tmp_path: Path) -> None:
    labelled = generate(SMALL_DATA)
    model = load_bundle(bundle_dir)
    threshold = threshold_for_recall(model, labelled, 0.5)
    degraded = degraded_copy(bundle_dir, tmp_path / "bad", "vbad", threshold, "half the fraud")
    bad = load_bundle(tmp_path / "bad")
    assert bad.version == "vbad" and degraded.sha256 == model.manifest.sha256
    assert bad.manifest.score_reference == model.manifest.score_reference
    assert bad.manifest.feature_reference == model.manifest.feature_reference
    assert read_manifest(tmp_path / "bad").extra["derived_from"] == model.version
    frame = time_ordered(labelled)
    features = frame_features(frame)
    scores = bad.scores(features)
    np.testing.assert_array_equal(scores, model.scores(features))  # same scores: no drift gate can tell
    fraud = frame["is_fraud"].to_numpy() == 1
    recall_bad = float(np.mean(scores[fraud] >= bad.threshold))
    recall_good = float(np.mean(scores[fraud] >= model.threshold))
    assert recall_bad == pytest.approx(0.5, abs=0.05)
    assert recall_good > recall_bad + 0.2
    with pytest.raises(ValueError, match="no fraud"):
        threshold_for_recall(model, labelled.loc[labelled["is_fraud"] == 0], 0.5)
