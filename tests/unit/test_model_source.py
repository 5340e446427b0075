"""Where a scoring worker's bundle comes from: a directory, a registry URI, an alias — with a real MLflow registry
on SQLite (the embedded default)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.artifacts.bundle import MANIFEST_FILE, MODEL_FILE, ModelIntegrityError, bundle_digest, load_bundle
from service.artifacts.registry import ModelRegistry, RunPayload
from service.artifacts.source import (
    ModelUnavailableError,
    RegistryReference,
    ResolvedBundle,
    parse_model_uri,
    registry_reference,
    resolve_bundle,
    resolve_model_dir,
)
from service.settings import ServeSettings, Settings


def test_model_uris_name_a_version_or_an_alias() -> None:
    assert parse_model_uri("models:/refund-fraud/7") == RegistryReference("refund-fraud", "7")
    assert parse_model_uri("models:/refund-fraud@champion") == RegistryReference("refund-fraud", "champion")
    assert str(RegistryReference("refund-fraud", "7")) == "models:/refund-fraud/7"
    for bad in ("runs:/abc/model", "models:/refund-fraud", "models:/a/b/c", "models:/x@"):
        with pytest.raises(ModelUnavailableError, match="FW_SERVE__MODEL_URI"):
            parse_model_uri(bad)


def test_the_directory_wins_then_the_uri_then_an_explicit_alias() -> None:
    assert registry_reference(ServeSettings()) is None  # the default alias alone names nothing
    assert registry_reference(ServeSettings(model_alias="challenger")) == RegistryReference(
        "refund-fraud", "challenger"
    )
    uri = ServeSettings(model_uri="models:/other/3", model_alias="challenger")
    assert registry_reference(uri) == RegistryReference("other", "3")
    with pytest.raises(ModelUnavailableError, match="no model configured"):
        resolve_model_dir(Settings())
    assert resolve_model_dir(Settings.model_validate({"serve": {"model_dir": "/srv/bundle"}})) == Path("/srv/bundle")


@pytest.fixture(scope="module")
def registered(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    settings = Settings(home=tmp_path_factory.mktemp("registry-home"), mlflow_tracking_uri=None)
    registry = ModelRegistry(settings)
    ref = registry.register(registry.log_run(RunPayload(run_name="source", bundle_dir=bundle_dir)))
    registry.promote(settings.registered_model_name, ref.version, "model source test")
    return settings, ref.version


def test_a_registry_uri_or_alias_is_fetched_verified_and_reused(registered: tuple[Settings, str]) -> None:
    settings, number = registered
    by_number = settings.model_copy(
        update={"serve": ServeSettings(model_uri=f"models:/{settings.registered_model_name}/{number}")}
    )
    fetched = resolve_model_dir(by_number)
    assert fetched == settings.home / "serving" / f"{settings.registered_model_name}-v{number}"
    assert load_bundle(fetched).version == load_bundle(fetched).manifest.version
    stamp = (fetched / MANIFEST_FILE).stat().st_mtime_ns
    by_alias = settings.model_copy(update={"serve": ServeSettings(model_alias="champion")})
    assert resolve_model_dir(by_alias) == fetched
    assert (fetched / MANIFEST_FILE).stat().st_mtime_ns == stamp  # verified and reused, not downloaded again


def test_a_tampered_local_copy_is_fetched_again(registered: tuple[Settings, str]) -> None:
    settings, number = registered
    serve = ServeSettings(model_uri=f"models:/{settings.registered_model_name}/{number}")
    configured = settings.model_copy(update={"serve": serve})
    fetched = resolve_model_dir(configured)
    booster = fetched / MODEL_FILE
    original = booster.read_bytes()
    booster.write_bytes(original + b"\0")  # no longer the booster the manifest and the registry name
    with pytest.raises(ModelIntegrityError):
        load_bundle(fetched)
    assert resolve_model_dir(configured) == fetched
    assert booster.read_bytes() == original
    load_bundle(fetched)  # verifies


def test_unknown_versions_and_aliases_are_unavailable_naming_the_reference(registered: tuple[Settings, str]) -> None:
    settings, _ = registered
    for serve in (ServeSettings(model_uri="models:/refund-fraud/99"), ServeSettings(model_alias="nope")):
        with pytest.raises(ModelUnavailableError, match="models:/refund-fraud"):
            resolve_model_dir(settings.model_copy(update={"serve": serve}))


def test_a_served_copy_with_a_tampered_threshold_is_fetched_again(registered: tuple[Settings, str]) -> None:
    """The worker's copy under <home>/serving is checked with the digest over every file: a manifest whose
    threshold was changed is not reused, and the digest the worker loads with is the registry's."""
    settings, number = registered
    configured = settings.model_copy(
        update={"serve": ServeSettings(model_uri=f"models:/{settings.registered_model_name}/{number}")}
    )
    resolved = resolve_bundle(configured)
    manifest = resolved.directory / MANIFEST_FILE
    original = manifest.read_bytes()
    data = json.loads(original)
    data["threshold"]["threshold"] = 1.0
    manifest.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelIntegrityError, match="bundle digest"):
        load_bundle(resolved.directory, expected_digest=resolved.digest)
    again = resolve_bundle(configured)
    assert again == resolved
    assert manifest.read_bytes() == original
    assert load_bundle(again.directory, expected_digest=again.digest).threshold < 1.0


def test_a_model_dir_is_checked_against_its_configured_digest(bundle_dir: Path) -> None:
    digest = bundle_digest(bundle_dir)
    resolved = resolve_bundle(
        Settings.model_validate({"serve": {"model_dir": str(bundle_dir), "model_digest": digest}})
    )
    assert resolved == ResolvedBundle(bundle_dir, digest)
    load_bundle(resolved.directory, expected_digest=resolved.digest)
    with pytest.raises(ModelIntegrityError, match="bundle digest"):
        load_bundle(bundle_dir, expected_digest="0" * 64)
