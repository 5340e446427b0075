"""The scoring core behind the BentoML service, in-process: the direct predictor's parity with
``inplace_predict``, the decision path, and the drift-bin counters against the manifest's reference bins."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.api.schema import RefundRequest
from service.artifacts.bundle import ScoringModel, bundle_digest, load_bundle
from service.data import aggregates
from service.data.feature_store import STORE_FILE, TABLE
from service.data.features import DEFAULT_AGGREGATES, feature_matrix
from service.data.synthetic import SyntheticConfig, generate
from service.serving.bento import DirectPredictor, Runtime, choose_predictor, load_runtime, probe_rows
from service.serving.metrics import SCORE_FEATURE, Metrics, trained_timestamp
from service.settings import Settings

ROWS = SyntheticConfig(n_accounts=300, n_requests=600, days=10, fraud_rate=0.05, seed=3)


@pytest.fixture(scope="module")
def model(bundle_dir: Path) -> ScoringModel:
    return load_bundle(bundle_dir, nthread=1)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    frame = generate(ROWS)
    return feature_matrix(frame.to_dict("records"), aggregates.point_in_time(frame))


def settings_for(bundle_dir: Path, **serve: object) -> Settings:
    return Settings.model_validate({"serve": {"model_dir": bundle_dir, **serve}})


def test_direct_predictor_is_bit_identical_to_inplace_predict(model: ScoringModel, features: np.ndarray) -> None:
    direct = DirectPredictor(model)
    assert np.array_equal(direct.raw_scores(features), model.raw_scores(features))
    for i in range(0, len(features), 37):
        row = features[i : i + 1]
        assert np.array_equal(direct.raw_scores(row), model.raw_scores(row))
    assert np.array_equal(direct.scores(features), model.scores(features))


def test_direct_predictor_copies_its_output(model: ScoringModel, features: np.ndarray) -> None:
    direct = DirectPredictor(model)
    first = direct.raw_scores(features[:1])
    kept = first.copy()
    direct.raw_scores(features[1:50])
    assert np.array_equal(first, kept)


def test_choose_predictor_honours_the_setting(model: ScoringModel, bundle_dir: Path) -> None:
    probe = probe_rows(model)
    chosen = choose_predictor(settings_for(bundle_dir), model, probe)
    assert isinstance(getattr(chosen, "__self__", None), DirectPredictor)
    fallback = choose_predictor(settings_for(bundle_dir, direct_predict=False), model, probe)
    assert getattr(fallback, "__self__", None) is model


def runtime_for(bundle_dir: Path) -> tuple[Runtime, CollectorRegistry]:
    registry = CollectorRegistry()
    return load_runtime(settings_for(bundle_dir), Metrics(registry=registry)), registry


def test_decide_scores_like_the_model_and_counts_every_bin(
    bundle_dir: Path, model: ScoringModel, features: np.ndarray
) -> None:
    runtime, registry = runtime_for(bundle_dir)
    requests = [
        RefundRequest(yearsActive=1.5, amount=45.0, ipAccounts=2),
        RefundRequest(yearsActive=0.02, amount=100.0, ipAccounts=40, itemDescription="Gift card"),
        RefundRequest(yearsActive=6.0, amount=1899.99, ipAccounts=1, itemDescription="Laptop"),
    ]
    batch = asyncio.run(runtime.decide(requests, ["cid-a", "cid-b", "cid-c"]))
    singles = [asyncio.run(runtime.decide([request], ["cid-2"]))[0] for request in requests]
    assert [response.correlation_id for response in batch] == ["cid-a", "cid-b", "cid-c"]
    rows = [
        {
            "yearsActive": r.yearsActive,
            "amount": r.amount,
            "ipAccounts": r.ipAccounts,
            "itemDescription": r.itemDescription,
        }
        for r in requests
    ]
    expected = model.scores(feature_matrix(rows, [DEFAULT_AGGREGATES] * len(rows))).tolist()
    assert [response.score for response in batch] == expected
    assert [response.score for response in singles] == expected
    assert [response.prediction for response in batch] == [int(score >= model.threshold) for score in expected]

    version = model.version
    matrix = feature_matrix(rows, [DEFAULT_AGGREGATES] * len(rows))
    for feature, reference in model.manifest.feature_reference.items():
        column = model.manifest.feature_names.index(feature)
        counts = np.zeros(len(reference.edges) + 1)
        for value in matrix[:, column]:
            counts[reference.bin_of(float(value))] += 2  # once in the batch, once as a single request
        served = [
            registry.get_sample_value(
                "fraudwatch_feature_bin_total", {"model_version": version, "feature": feature, "bin": str(i)}
            )
            for i in range(len(counts))
        ]
        assert served == counts.tolist(), feature
    score_bins = [model.manifest.score_reference.bin_of(score) for score in expected]
    for i in set(score_bins):
        labels = {"model_version": version, "feature": SCORE_FEATURE, "bin": str(i)}
        assert registry.get_sample_value("fraudwatch_feature_bin_total", labels) == 2 * score_bins.count(i)
    decisions = sum(
        registry.get_sample_value("fraudwatch_decisions_total", {"model_version": version, "decision": d}) or 0.0
        for d in ("approve", "review")
    )
    assert decisions == 2 * len(requests)
    runtime.close()


def test_trained_timestamp_reads_the_manifest_time_in_utc() -> None:
    assert trained_timestamp("2026-12-01T10:00:00+00:00") == 1_796_119_200.0
    assert trained_timestamp("2026-12-01T11:00:00+01:00") == 1_796_119_200.0
    assert trained_timestamp("2026-12-01T10:00:00") == 1_796_119_200.0  # no zone: UTC, not the host's zone
    assert trained_timestamp("last tuesday") is None


def test_the_model_trained_gauge_carries_the_bundle_time(bundle_dir: Path, model: ScoringModel) -> None:
    runtime, registry = runtime_for(bundle_dir)
    labels = {"model_version": model.version}
    served = registry.get_sample_value("fraudwatch_model_trained_timestamp_seconds", labels)
    assert served == trained_timestamp(model.manifest.created_at) and served is not None and served > 1.7e9
    runtime.close()


def test_the_feature_store_served_is_a_private_copy_of_the_verified_bytes(bundle_dir: Path, tmp_path: Path) -> None:
    """Issue 11: load_runtime hashed the bundle, then opened features.sqlite from the bundle directory, so a write
    after the check (or any later one) was served. The worker now opens a copy written from the hashed bytes, in a
    directory only it can read: changing the bundle's store afterwards changes nothing it serves."""
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    serve = {"model_dir": bundle, "model_digest": bundle_digest(bundle)}
    settings = Settings.model_validate({"home": tmp_path / "home", "serve": serve})
    runtime = load_runtime(settings, Metrics(registry=CollectorRegistry()))
    assert runtime.store is not None
    with contextlib.closing(sqlite3.connect(bundle / STORE_FILE)) as conn:
        (account,) = conn.execute(f"SELECT account_id FROM {TABLE} LIMIT 1").fetchone()
    served = runtime.store.lookup(account)
    assert served is not None

    with contextlib.closing(sqlite3.connect(bundle / STORE_FILE)) as conn, conn:
        conn.execute(f"UPDATE {TABLE} SET prior_refunds = prior_refunds + 1000")

    assert runtime.store.lookup(account) == served
    private = runtime.store.path.parent
    assert bundle not in runtime.store.path.parents and private.stat().st_mode & 0o777 == 0o700
    runtime.store.close()
