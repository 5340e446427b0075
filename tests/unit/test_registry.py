"""The registry against a real MLflow SQLite store in a temporary directory (one store for the module: MLflow's
first initialisation runs its migrations and takes seconds)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import xgboost as xgb

from service.artifacts.bundle import (
    Calibration,
    Manifest,
    ModelIntegrityError,
    ReferenceBins,
    ThresholdPolicy,
    load_bundle,
    save_bundle,
    sha256_of,
)
from service.artifacts.registry import (
    AUDIT_PREFIX,
    CHALLENGER,
    CHAMPION,
    FEATURE_STORE_FILE,
    PREVIOUS,
    TAG_BUNDLE_SHA256,
    ModelRegistry,
    RegistryNotFoundError,
    RunInfo,
    RunPayload,
    chunks,
    flatten_params,
)
from service.data.features import FEATURE_NAMES, N_FEATURES
from service.settings import Settings


def make_bundle(directory: Path, version: str, seed: int, threshold: float = 0.5) -> Manifest:
    """A small real bundle: a booster trained on random data, its manifest, a SQLite feature store, a report."""
    rng = np.random.default_rng(seed)
    x = rng.random((300, N_FEATURES), dtype=np.float32)
    y = (x[:, 0] + 0.2 * rng.random(300) > 0.6).astype(np.int64)
    booster = xgb.train(
        {"objective": "binary:logistic", "nthread": 1, "seed": seed, "max_depth": 2},
        xgb.DMatrix(x, label=y),
        num_boost_round=4,
    )
    manifest = save_bundle(
        booster,
        Manifest(
            version=version,
            feature_names=list(FEATURE_NAMES),
            calibration=Calibration("identity"),
            threshold=ThresholdPolicy("target_precision", threshold, target_precision=0.8),
            feature_reference={},
            score_reference=ReferenceBins(edges=[0.5], fractions=[0.5, 0.5]),
            metrics={"pr_auc": 0.9},
            params={"seed": seed},
            sha256="",
            created_at="2026-01-01T00:00:00+00:00",
        ),
        directory,
    )
    with sqlite3.connect(directory / FEATURE_STORE_FILE) as connection:
        connection.execute("CREATE TABLE aggregates (account_id TEXT PRIMARY KEY, prior_refunds REAL)")
        connection.execute("INSERT INTO aggregates VALUES (?, ?)", (f"acct-{seed}", float(seed)))
    connection.close()
    (directory / "report.md").write_text(f"# report {version}\n", encoding="utf-8")
    return manifest


def payload_for(directory: Path, version: str, seed: int) -> RunPayload:
    return RunPayload(
        run_name=f"train-{version}",
        bundle_dir=directory,
        report_files=(directory / "report.md",),
        params={"train": {"max_depth": 2, "strategies": ["none", "smote"]}, "seed": seed},
        metrics={"test_pr_auc": 0.5 + seed / 100, "test_roc_auc": math.nan, "valid_pr_auc_none": 0.4},
        tags={"data_fingerprint": f"fp-{seed}", "strategy": "none"},
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    home = tmp_path_factory.mktemp("fwhome")
    return ModelRegistry(Settings(home=home, mlflow_tracking_uri=None))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for seed, version in enumerate(("v1", "v2", "v3"), start=1):
        make_bundle(root / version, version, seed, threshold=0.4 + seed / 10)
        out[version] = root / version
    return out


@pytest.fixture(scope="module")
def runs(registry: ModelRegistry, bundles: dict[str, Path]) -> dict[str, RunInfo]:
    return {
        version: registry.log_run(payload_for(path, version, seed))
        for seed, (version, path) in enumerate(bundles.items(), start=1)
    }


def local_path(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


def test_flatten_params_dots_nested_keys_and_serialises_sequences() -> None:
    flat = flatten_params({"a": {"b": 1, "c": {"d": "x"}}, "e": (1, 2), "f": None})
    assert flat == {"a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "None"}


def test_chunks_cover_every_item_once_within_the_size() -> None:
    parts = list(chunks(list(range(250)), 100))
    assert [len(p) for p in parts] == [100, 100, 50]
    assert [item for part in parts for item in part] == list(range(250))


def test_embedded_store_lives_under_home(registry: ModelRegistry, runs: dict[str, RunInfo]) -> None:
    home = registry.settings.home
    assert registry.tracking_uri.startswith("sqlite:///")
    assert (home / "mlflow.db").is_file()
    assert local_path(runs["v1"].artifact_uri).is_relative_to(home / "mlruns")


def test_run_logs_params_finite_metrics_tags_and_artifacts(
    registry: ModelRegistry, runs: dict[str, RunInfo], bundles: dict[str, Path]
) -> None:
    info = runs["v1"]
    run = registry.client.get_run(info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_depth"] == "2"
    assert json.loads(run.data.params["train.strategies"]) == ["none", "smote"]
    assert run.data.metrics == {"test_pr_auc": 0.51, "valid_pr_auc_none": 0.4}  # the NaN AUC is left out
    manifest = load_bundle(bundles["v1"]).manifest
    assert run.data.tags["sha256"] == manifest.sha256 == info.sha256
    assert run.data.tags["data_fingerprint"] == "fp-1"
    assert info.features_sha256 == sha256_of(bundles["v1"] / FEATURE_STORE_FILE)
    bundle_files = {Path(a.path).name for a in registry.client.list_artifacts(info.run_id, "bundle")}
    assert bundle_files == {"model.ubj", "manifest.json", FEATURE_STORE_FILE}
    report_files = {Path(a.path).name for a in registry.client.list_artifacts(info.run_id, "report")}
    assert report_files == {"report.md"}


def test_register_tags_version_with_checksums_threshold_and_test_metrics(
    registry: ModelRegistry, runs: dict[str, RunInfo]
) -> None:
    ref = registry.register(runs["v2"], name="tags-model")
    assert ref.version == "1"
    assert ref.sha256 == runs["v2"].sha256
    assert ref.model_version == "v2"
    assert float(ref.tags["threshold"]) == pytest.approx(0.6)
    assert float(ref.tags["metric.test_pr_auc"]) == pytest.approx(0.52)
    assert "metric.valid_pr_auc_none" not in ref.tags
    assert ref.tags["data_fingerprint"] == "fp-2"
    assert ref.run_id == runs["v2"].run_id
    assert registry.register(runs["v3"], name="tags-model").version == "2"


def test_promote_moves_champion_and_keeps_previous_then_rollback_restores(
    registry: ModelRegistry, runs: dict[str, RunInfo]
) -> None:
    name = "alias-model"
    v1 = registry.register(runs["v1"], name=name).version
    v2 = registry.register(runs["v2"], name=name).version

    registry.promote(name, v1, reason="first model")
    assert registry.aliases(name) == {CHAMPION: v1}

    registry.set_challenger(name, v2, reason="candidate")
    assert registry.aliases(name) == {CHAMPION: v1, CHALLENGER: v2}

    assert registry.promote(name, v1) == []  # promoting the champion again is a no-op
    registry.promote(name, v2, reason="better recall")
    assert registry.aliases(name) == {CHAMPION: v2, PREVIOUS: v1}
    assert [(ref.version, ref.aliases) for ref in registry.versions(name)] == [(v2, (CHAMPION,)), (v1, (PREVIOUS,))]
    assert registry.resolve(name, CHAMPION).version == v2

    registry.rollback(name, reason="alert fired")
    assert registry.aliases(name) == {CHAMPION: v1}
    with pytest.raises(RegistryNotFoundError):
        registry.rollback(name)

    audit_v2 = registry.get_version(name, v2).audit
    assert [(e["action"], e["alias"]) for e in audit_v2] == [
        ("challenger", CHALLENGER),
        ("promote", CHAMPION),
        ("promoted", CHALLENGER),
        ("rolled_back", CHAMPION),
    ]
    assert audit_v2[1]["reason"] == "better recall"
    assert audit_v2[1]["before"] == v1
    assert all(e["by"] and e["at"] for e in audit_v2)
    audit_v1 = registry.get_version(name, v1).audit
    assert [e["action"] for e in audit_v1] == ["promote", "demote", "rollback", "rollback"]
    assert all(key.startswith(AUDIT_PREFIX) for key in registry.get_version(name, v1).tags if "audit" in key)


def test_resolve_by_number_and_alias_and_not_found(registry: ModelRegistry, runs: dict[str, RunInfo]) -> None:
    name = "resolve-model"
    version = registry.register(runs["v3"], name=name).version
    registry.set_alias(name, "staging", version, reason="test")
    assert registry.resolve(name, version).sha256 == runs["v3"].sha256
    assert registry.resolve(name, "staging").version == version
    with pytest.raises(RegistryNotFoundError):
        registry.resolve(name, "nope")
    with pytest.raises(RegistryNotFoundError):
        registry.resolve(name, "99")
    with pytest.raises(RegistryNotFoundError):
        registry.aliases("no-such-model")
    assert registry.versions("no-such-model") == []
    assert [ref.version for ref in registry.versions(name)] == [version]


def test_fetch_bundle_downloads_a_verified_copy_and_replaces_the_destination(
    registry: ModelRegistry, runs: dict[str, RunInfo], tmp_path: Path
) -> None:
    name = "fetch-model"
    first = registry.register(runs["v1"], name=name)
    second = registry.register(runs["v2"], name=name)
    dest = tmp_path / "serving" / "bundle"

    path = registry.fetch_bundle(first, dest)
    assert path == dest.resolve()
    assert load_bundle(path).manifest.sha256 == runs["v1"].sha256
    assert sha256_of(path / FEATURE_STORE_FILE) == runs["v1"].features_sha256

    registry.fetch_bundle(second, dest)
    assert load_bundle(dest).version == "v2"
    assert sorted(p.name for p in dest.iterdir()) == sorted(["model.ubj", "manifest.json", FEATURE_STORE_FILE])
    assert [p.name for p in dest.parent.iterdir()] == ["bundle"]  # no staging directory left behind


def _tampered_version(registry: ModelRegistry, tmp_path: Path, name: str, seed: int) -> tuple[Path, str]:
    bundle = tmp_path / f"src-{name}"
    make_bundle(bundle, name, seed)
    run = registry.log_run(payload_for(bundle, name, seed))
    version = registry.register(run, name=name).version
    return local_path(run.artifact_uri) / "bundle", version


def test_tampered_booster_is_rejected_and_destination_untouched(registry: ModelRegistry, tmp_path: Path) -> None:
    stored, version = _tampered_version(registry, tmp_path, "tamper-booster", seed=11)
    data = bytearray((stored / "model.ubj").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (stored / "model.ubj").write_bytes(bytes(data))
    dest = tmp_path / "out"
    with pytest.raises(ModelIntegrityError, match="bundle digest"):  # the digest over every file, before parsing
        registry.fetch_bundle(registry.resolve("tamper-booster", version), dest)
    assert not dest.exists()
    assert list(tmp_path.glob(".out-*")) == []


def test_swapped_bundle_with_consistent_manifest_is_rejected(registry: ModelRegistry, tmp_path: Path) -> None:
    stored, version = _tampered_version(registry, tmp_path, "tamper-swap", seed=12)
    other = tmp_path / "other"
    make_bundle(other, "tamper-swap", seed=13)  # a different, self-consistent booster + manifest in its place
    for file in ("model.ubj", "manifest.json"):
        shutil.copyfile(other / file, stored / file)
    with pytest.raises(ModelIntegrityError, match=r"bundle digest .* does not match the registry's"):
        registry.fetch_bundle(registry.resolve("tamper-swap", version), tmp_path / "out")


def test_tampered_feature_store_is_rejected(registry: ModelRegistry, tmp_path: Path) -> None:
    stored, version = _tampered_version(registry, tmp_path, "tamper-store", seed=14)
    with sqlite3.connect(stored / FEATURE_STORE_FILE) as connection:
        connection.execute("UPDATE aggregates SET prior_refunds = 0")
    connection.close()
    with pytest.raises(ModelIntegrityError, match="bundle digest"):
        registry.fetch_bundle(registry.resolve("tamper-store", version), tmp_path / "out")


def test_a_tampered_manifest_threshold_is_refused_before_it_is_parsed(registry: ModelRegistry, tmp_path: Path) -> None:
    """Issue 11 (6): the threshold and the calibration live in manifest.json, which the booster and feature-store
    checksums do not cover. One digest over every file does; the stored copy with its threshold set to 1.0 (and
    the booster's checksum left consistent) is refused, and nothing lands in the destination."""
    stored, version = _tampered_version(registry, tmp_path, "tamper-threshold", seed=15)
    manifest = json.loads((stored / "manifest.json").read_text(encoding="utf-8"))
    manifest["threshold"]["threshold"] = 1.0
    (stored / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    load_bundle(stored)  # still self-consistent: only the registry's digest can tell
    ref = registry.resolve("tamper-threshold", version)
    dest = tmp_path / "out"
    with pytest.raises(ModelIntegrityError, match="bundle digest"):
        registry.fetch_bundle(ref, dest)
    assert not dest.exists()
    (stored / "manifest.json").write_text("[" * 4000, encoding="utf-8")  # not even JSON: never parsed
    with pytest.raises(ModelIntegrityError, match="bundle digest"):
        load_bundle(stored, expected_digest=ref.bundle_sha256)


def test_an_added_file_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    stored, version = _tampered_version(registry, tmp_path, "tamper-extra", seed=16)
    (stored / f"{FEATURE_STORE_FILE}-journal").write_bytes(b"\0" * 512)
    with pytest.raises(ModelIntegrityError, match="bundle digest"):
        registry.fetch_bundle(registry.resolve("tamper-extra", version), tmp_path / "out")


def test_the_bundle_digest_is_sha256sum_of_the_listing(registry: ModelRegistry, tmp_path: Path) -> None:
    """Independent of service.artifacts.bundle: the digest an operator computes with ``sha256sum * | sha256sum``."""
    stored, version = _tampered_version(registry, tmp_path, "digest-listing", seed=17)
    listing = "".join(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n" for path in sorted(stored.iterdir())
    )
    assert registry.resolve("digest-listing", version).bundle_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert sorted(path.name for path in stored.iterdir()) == sorted(["model.ubj", "manifest.json", FEATURE_STORE_FILE])


def test_a_version_registered_without_a_bundle_digest_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    """A version registered before whole-bundle digests cannot have its manifest verified: refused, naming why."""
    _, version = _tampered_version(registry, tmp_path, "legacy", seed=18)
    registry.client.delete_model_version_tag("legacy", version, TAG_BUNDLE_SHA256)
    with pytest.raises(ModelIntegrityError, match=r"registered before whole-bundle digests.*register the bundle again"):
        registry.fetch_bundle(registry.resolve("legacy", version), tmp_path / "out")
    assert not (tmp_path / "out").exists()
