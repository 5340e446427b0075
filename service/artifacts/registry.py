"""MLflow tracking and the model registry: runs, registered versions, aliases, and verified bundle downloads.

Embedded default: a SQLite tracking/registry store (``settings.tracking_uri``) with artifacts under
``settings.mlflow_artifact_root``; ``FW_MLFLOW_TRACKING_URI`` points everything at a tracking server instead.

A training run logs params, metrics (test window + each imbalance strategy's validation PR-AUC), the report files
and the whole bundle directory (``model.ubj``, ``manifest.json``, ``features.sqlite``) as plain artifacts — the
booster stays in XGBoost's native format; no MLflow model flavour, nothing pickled. A registered version points
at the run's ``bundle`` artifact directory and carries the checksums: ``bundle_sha256``, one digest over every file
of the bundle (:func:`service.artifacts.bundle.bundle_digest` — the manifest, so the threshold and the calibration, included),
is compared before anything of a download is parsed, and the booster and manifest are built from the bytes that
were hashed (:func:`service.artifacts.bundle.load_bundle`). A version registered before that tag existed cannot be verified
and is refused (:class:`service.artifacts.bundle.ModelIntegrityError` naming the fix: register the bundle again).

Aliases: ``champion`` serves, ``challenger`` is the candidate, ``previous`` is the last champion (rollback
target). Every alias move appends an audit tag (``audit.NNNN`` = JSON who/when/why/what) to the versions it
touches.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from service.common.logging import get_logger, log_event
from service.artifacts.bundle import (
    MANIFEST_FILE,
    ModelIntegrityError,
    ScoringModel,
    digest_of_listing,
    load_bundle,
    read_manifest,
    sha256_of,
)
from service.settings import Settings

if TYPE_CHECKING:
    from service.training.train import TrainingResult

logger = get_logger(__name__)
_T = TypeVar("_T")

CHAMPION: Final[str] = "champion"
CHALLENGER: Final[str] = "challenger"
PREVIOUS: Final[str] = "previous"
BUNDLE_ARTIFACT_PATH: Final[str] = "bundle"
REPORT_ARTIFACT_PATH: Final[str] = "report"
FEATURE_STORE_FILE: Final[str] = "features.sqlite"

TAG_SHA256: Final[str] = "sha256"
#: One digest over every file of the bundle (:func:`service.artifacts.bundle.bundle_digest`).
TAG_BUNDLE_SHA256: Final[str] = "bundle_sha256"
TAG_FEATURES_SHA256: Final[str] = "features_sha256"
TAG_MODEL_VERSION: Final[str] = "model_version"
TAG_THRESHOLD: Final[str] = "threshold"
TAG_RUN_ID: Final[str] = "run_id"
AUDIT_PREFIX: Final[str] = "audit."
TEST_METRIC_PREFIX: Final[str] = "test_"
VALID_METRIC_PREFIX: Final[str] = "valid_"
STRATEGY_METRIC_PREFIX: Final[str] = "valid_pr_auc_"
METRIC_TAG_PREFIX: Final[str] = "metric."
#: Version tags copied from the run's tags when registering.
COPIED_RUN_TAGS: Final[tuple[str, ...]] = ("data_fingerprint", "strategy", "calibration")

_BATCH: Final[int] = 100  # MLflow's limit of params/tags per log_batch call
_NOT_FOUND_CODES: Final[frozenset[str]] = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


class RegistryError(RuntimeError):
    """A registry operation could not be done as asked."""


class RegistryNotFoundError(RegistryError):
    """No such registered model, version or alias."""


@dataclass(frozen=True)
class RunPayload:
    """What one training run logs: a bundle directory, report files, params, metrics and tags."""

    run_name: str
    bundle_dir: Path
    report_files: Sequence[Path] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    """A finished tracking run and where its bundle lives."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    bundle_uri: str
    model_version: str
    sha256: str
    features_sha256: str | None
    bundle_sha256: str
    threshold: float
    metrics: Mapping[str, float]
    tags: Mapping[str, str]


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, as the registry describes it now."""

    name: str
    version: str
    source: str
    run_id: str | None
    aliases: tuple[str, ...]
    tags: Mapping[str, str]

    @property
    def sha256(self) -> str | None:
        return self.tags.get(TAG_SHA256)

    @property
    def bundle_sha256(self) -> str | None:
        return self.tags.get(TAG_BUNDLE_SHA256)

    @property
    def model_version(self) -> str | None:
        return self.tags.get(TAG_MODEL_VERSION)

    @property
    def audit(self) -> list[dict[str, Any]]:
        """The version's alias moves, oldest first."""
        keys = sorted(key for key in self.tags if key.startswith(AUDIT_PREFIX))
        return [json.loads(self.tags[key]) for key in keys]


@dataclass(frozen=True)
class AliasMove:
    """One alias change: ``alias`` now points at ``version`` (it pointed at ``before``)."""

    alias: str
    version: str | None
    before: str | None


# ---------------------------------------------------------------------------------------------- pure helpers


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys; every value becomes a string (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = str(value)
    return flat


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Only the finite values (an AUC of a one-class window is NaN: absent, not a number to plot)."""
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def audit_entry(action: str, alias: str, version: str | None, before: str | None, reason: str, who: str) -> str:
    """The JSON value of one audit tag."""
    return json.dumps(
        {
            "action": action,
            "alias": alias,
            "version": version,
            "before": before,
            "reason": reason,
            "by": who,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        sort_keys=True,
    )


def next_audit_key(tags: Mapping[str, str]) -> str:
    count = sum(1 for key in tags if key.startswith(AUDIT_PREFIX))
    return f"{AUDIT_PREFIX}{count + 1:04d}"


def current_user() -> str:
    """The OS user running the command (for audit tags)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


def is_version_number(text: str) -> bool:
    return text.isdigit()


def bundle_checksums(bundle_dir: Path) -> tuple[str, str | None]:
    """The booster's SHA-256 from the (verified) manifest and the feature store's SHA-256 if it is present."""
    manifest = load_bundle(bundle_dir).manifest
    store = bundle_dir / FEATURE_STORE_FILE
    return manifest.sha256, sha256_of(store) if store.exists() else None


def uploaded_bundle_digest(layout: Sequence[tuple[Path, str]]) -> str:
    """The bundle digest of the files uploaded under ``bundle/`` (what a download of the version will hold)."""
    return digest_of_listing(
        {path.name: sha256_of(path) for path, artifact_path in layout if artifact_path == BUNDLE_ARTIFACT_PATH}
    )


def artifact_layout(payload: RunPayload) -> list[tuple[Path, str]]:
    """(file, artifact directory) pairs: report files under ``report/``, every other file of the bundle
    directory (``model.ubj``, ``manifest.json``, ``features.sqlite``) under ``bundle/``."""
    reports = {path.resolve() for path in payload.report_files}
    bundle_files = sorted(
        path for path in payload.bundle_dir.iterdir() if path.is_file() and path.resolve() not in reports
    )
    return [(path, REPORT_ARTIFACT_PATH) for path in payload.report_files] + [
        (path, BUNDLE_ARTIFACT_PATH) for path in bundle_files
    ]


def version_tags(run: RunInfo) -> dict[str, str]:
    """Tags of a registered version: checksums, threshold, test metrics, provenance."""
    tags = {
        TAG_SHA256: run.sha256,
        TAG_BUNDLE_SHA256: run.bundle_sha256,
        TAG_MODEL_VERSION: run.model_version,
        TAG_THRESHOLD: repr(run.threshold),
        TAG_RUN_ID: run.run_id,
        **{
            f"{METRIC_TAG_PREFIX}{key}": repr(value)
            for key, value in run.metrics.items()
            if key.startswith(TEST_METRIC_PREFIX)
        },
        **{key: run.tags[key] for key in COPIED_RUN_TAGS if key in run.tags},
    }
    if run.features_sha256 is not None:
        tags[TAG_FEATURES_SHA256] = run.features_sha256
    return tags


def verify_against_registry(bundle_dir: Path, ref: ModelRef, nthread: int = 1) -> ScoringModel:
    """The model of the downloaded bundle if it is the one the registry recorded, else :class:`ModelIntegrityError`.

    The digest over every file is compared with the version's ``bundle_sha256`` tag before anything is parsed
    (a version without that tag — registered before it existed — is refused); the model is built from the bytes
    that were hashed; the booster's and the feature store's checksums are checked against their tags as well."""
    expected = ref.bundle_sha256
    if expected is None:
        raise ModelIntegrityError(
            f"{ref.name} v{ref.version} has no {TAG_BUNDLE_SHA256} tag: it was registered before whole-bundle "
            "digests, so its manifest (threshold, calibration) cannot be verified; register the bundle again from "
            "a trusted copy (fraudwatch train --register, or ModelRegistry.log_run + register)"
        )
    model = load_bundle(bundle_dir, nthread=nthread, expected_digest=expected, digest_source="registry")
    manifest = model.manifest
    if ref.sha256 is None:
        raise ModelIntegrityError(f"{ref.name} v{ref.version} has no {TAG_SHA256} tag to verify against")
    if manifest.sha256 != ref.sha256:
        raise ModelIntegrityError(
            f"{bundle_dir / MANIFEST_FILE}: sha256 {manifest.sha256} does not match registry {ref.sha256}"
        )
    expected_store = ref.tags.get(TAG_FEATURES_SHA256)
    store = bundle_dir / FEATURE_STORE_FILE
    if expected_store is not None:
        actual = sha256_of(store) if store.exists() else "missing"
        if actual != expected_store:
            raise ModelIntegrityError(f"{store}: sha256 {actual} does not match registry {expected_store}")
    return model


def _is_not_found(error: MlflowException) -> bool:
    return str(getattr(error, "error_code", "")) in _NOT_FOUND_CODES


# -------------------------------------------------------------------------------------------------- registry


class ModelRegistry:
    """Tracking runs and registered versions in one MLflow store (tracking and registry share the URI)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tracking_uri = settings.tracking_uri
        if not settings.mlflow_tracking_uri:
            settings.home.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # ---- tracking

    def experiment_id(self) -> str:
        """The experiment's id, created on first use (embedded store: with artifacts under ``home/mlruns``)."""
        name = self.settings.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        location = None if self.settings.mlflow_tracking_uri else self.settings.mlflow_artifact_root
        return str(self.client.create_experiment(name, artifact_location=location))

    def log_run(self, payload: RunPayload) -> RunInfo:
        """Log one training run; the run is marked FAILED if anything in it fails."""
        sha256, features_sha256 = bundle_checksums(payload.bundle_dir)
        manifest = read_manifest(payload.bundle_dir)
        layout = artifact_layout(payload)
        bundle_sha256 = uploaded_bundle_digest(layout)
        tags = {
            **payload.tags,
            TAG_SHA256: sha256,
            TAG_BUNDLE_SHA256: bundle_sha256,
            TAG_MODEL_VERSION: manifest.version,
        }
        if features_sha256 is not None:
            tags[TAG_FEATURES_SHA256] = features_sha256
        run = self.client.create_run(self.experiment_id(), run_name=payload.run_name, tags=tags)
        run_id = str(run.info.run_id)
        try:
            self._log_values(run_id, payload.params, payload.metrics)
            for path, artifact_path in layout:
                self.client.log_artifact(run_id, str(path), artifact_path)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")
        log_event(logger, "run logged", run_id=run_id, run_name=payload.run_name, sha256=sha256)
        return RunInfo(
            run_id=run_id,
            experiment_id=str(run.info.experiment_id),
            artifact_uri=str(run.info.artifact_uri),
            bundle_uri=f"runs:/{run_id}/{BUNDLE_ARTIFACT_PATH}",
            model_version=manifest.version,
            sha256=sha256,
            features_sha256=features_sha256,
            bundle_sha256=bundle_sha256,
            threshold=manifest.threshold.threshold,
            metrics=finite_metrics(payload.metrics),
            tags=dict(tags),
        )

    def _log_values(self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        timestamp = int(datetime.now(UTC).timestamp() * 1000)
        flat = sorted(flatten_params(params).items())
        for batch in chunks(flat, _BATCH):
            self.client.log_batch(run_id, params=[Param(key, value) for key, value in batch])
        values = sorted(finite_metrics(metrics).items())
        for metric_batch in chunks(values, _BATCH):
            metric_list = [Metric(key, value, timestamp, 0) for key, value in metric_batch]
            self.client.log_batch(run_id, metrics=metric_list)

    # ---- registered versions

    def register(self, run: RunInfo, name: str | None = None, description: str | None = None) -> ModelRef:
        """A new registered version whose source is the run's bundle directory."""
        model_name = name or self.settings.registered_model_name
        self._ensure_registered_model(model_name)
        created = self.client.create_model_version(
            model_name, run.bundle_uri, run_id=run.run_id, tags=version_tags(run), description=description
        )
        log_event(
            logger,
            "version registered",
            model=model_name,
            version=created.version,
            run_id=run.run_id,
            sha256=run.sha256,
        )
        return self.get_version(model_name, str(created.version))

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
        except MlflowException as error:
            if not _is_not_found(error):
                raise
            self.client.create_registered_model(name)

    def get_version(self, name: str, version: str) -> ModelRef:
        try:
            return _ref(self.client.get_model_version(name, version))
        except MlflowException as error:
            if _is_not_found(error):
                raise RegistryNotFoundError(f"model {name!r} has no version {version}") from error
            raise

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version an alias points at, or None."""
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as error:
            if _is_not_found(error):
                return None
            raise

    def resolve(self, name: str, alias_or_version: str) -> ModelRef:
        """A version by number (``"3"``) or by alias (``"champion"``)."""
        if is_version_number(alias_or_version):
            return self.get_version(name, alias_or_version)
        version = self.alias_version(name, alias_or_version)
        if version is None:
            raise RegistryNotFoundError(f"model {name!r} has no alias {alias_or_version!r}")
        return self.get_version(name, version)

    def versions(self, name: str) -> list[ModelRef]:
        """All versions of a model, newest first ([] if the model does not exist)."""
        found = [_ref(item) for item in self.client.search_model_versions(f"name = '{name}'")]
        if not found:
            return []
        # Search results do not carry aliases; the registered model does.
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        refs = [replace(ref, aliases=tuple(sorted(by_version.get(ref.version, [])))) for ref in found]
        return sorted(refs, key=lambda ref: int(ref.version), reverse=True)

    def aliases(self, name: str) -> dict[str, str]:
        try:
            return {str(k): str(v) for k, v in self.client.get_registered_model(name).aliases.items()}
        except MlflowException as error:
            if _is_not_found(error):
                raise RegistryNotFoundError(f"no registered model {name!r}") from error
            raise

    # ---- aliases

    def set_alias(self, name: str, alias: str, version: str, reason: str = "", action: str = "set") -> AliasMove:
        """Point ``alias`` at ``version`` and record the move on that version."""
        target = self.get_version(name, version)
        before = self.alias_version(name, alias)
        self.client.set_registered_model_alias(name, alias, target.version)
        self._audit(name, target.version, audit_entry(action, alias, target.version, before, reason, current_user()))
        log_event(logger, "alias moved", model=name, alias=alias, version=target.version, before=before)
        return AliasMove(alias=alias, version=target.version, before=before)

    def remove_alias(self, name: str, alias: str, reason: str = "", action: str = "remove") -> AliasMove:
        before = self.alias_version(name, alias)
        if before is not None:
            self.client.delete_registered_model_alias(name, alias)
            self._audit(name, before, audit_entry(action, alias, None, before, reason, current_user()))
            log_event(logger, "alias removed", model=name, alias=alias, before=before)
        return AliasMove(alias=alias, version=None, before=before)

    def set_challenger(self, name: str, version: str, reason: str = "") -> AliasMove:
        return self.set_alias(name, CHALLENGER, version, reason, action="challenger")

    def promote(self, name: str, version: str, reason: str = "") -> list[AliasMove]:
        """``champion`` → ``version``; the old champion becomes ``previous``; a ``challenger`` alias on
        ``version`` is cleared. Promoting the current champion again changes nothing."""
        old = self.alias_version(name, CHAMPION)
        target = self.get_version(name, version).version
        if old == target:
            return []
        moves: list[AliasMove] = []
        if old is not None:
            moves.append(self.set_alias(name, PREVIOUS, old, reason, action="demote"))
        moves.append(self.set_alias(name, CHAMPION, target, reason, action="promote"))
        if self.alias_version(name, CHALLENGER) == target:
            moves.append(self.remove_alias(name, CHALLENGER, reason, action="promoted"))
        return moves

    def rollback(self, name: str, reason: str = "") -> list[AliasMove]:
        """``previous`` becomes ``champion`` again; the rolled-back version loses the alias and ``previous`` is
        cleared (a second rollback must not bring the bad version back)."""
        previous = self.alias_version(name, PREVIOUS)
        if previous is None:
            raise RegistryNotFoundError(f"model {name!r} has no {PREVIOUS!r} version to roll back to")
        current = self.alias_version(name, CHAMPION)
        moves = [self.set_alias(name, CHAMPION, previous, reason, action="rollback")]
        moves.append(self.remove_alias(name, PREVIOUS, reason, action="rollback"))
        if current is not None and current != previous:
            self._audit(name, current, audit_entry("rolled_back", CHAMPION, None, current, reason, current_user()))
        return moves

    def _audit(self, name: str, version: str, entry: str) -> None:
        tags = self.get_version(name, version).tags
        self.client.set_model_version_tag(name, version, next_audit_key(tags), entry)

    # ---- artifacts

    def fetch_bundle(self, ref: ModelRef, dest: Path) -> Path:
        """Download the version's bundle into ``dest`` (replacing what is there) and verify it against its
        manifest and the registry's checksums; raise :class:`ModelIntegrityError` (leaving ``dest`` untouched)
        if anything does not match."""
        dest = dest.resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            downloaded = Path(
                download_artifacts(artifact_uri=ref.source, dst_path=str(staging), tracking_uri=self.tracking_uri)
            )
            verify_against_registry(downloaded, ref)
            if dest.exists():
                shutil.rmtree(dest)
            downloaded.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log_event(logger, "bundle fetched", model=ref.name, version=ref.version, dest=str(dest))
        return dest


def _ref(version: ModelVersion) -> ModelRef:
    return ModelRef(
        name=str(version.name),
        version=str(version.version),
        source=str(version.source),
        run_id=str(version.run_id) if version.run_id else None,
        aliases=tuple(sorted(str(alias) for alias in version.aliases or ())),
        tags={str(k): str(v) for k, v in (version.tags or {}).items()},
    )


# ------------------------------------------------------------------------------------------- training runs


def training_metrics(result: TrainingResult) -> dict[str, float]:
    """Test-window metrics (``test_*``), validation metrics (``valid_*``), each imbalance strategy's validation
    PR-AUC (``valid_pr_auc_<strategy>``) and the training time."""
    metrics = {f"{TEST_METRIC_PREFIX}{key}": value for key, value in result.test_metrics.items()}
    metrics.update({f"{VALID_METRIC_PREFIX}{key}": value for key, value in result.valid_metrics.items()})
    for row in result.strategy_table:
        metrics[f"{STRATEGY_METRIC_PREFIX}{row['strategy']}"] = float(row["valid_pr_auc"])
    metrics["train_seconds"] = result.seconds
    return metrics


def payload_from_result(result: TrainingResult, run_name: str) -> RunPayload:
    manifest = result.manifest
    return RunPayload(
        run_name=run_name,
        bundle_dir=result.bundle_dir,
        report_files=tuple(result.report.as_list()),
        params=result.params,
        metrics=training_metrics(result),
        tags={
            "data_fingerprint": result.data_fingerprint,
            "strategy": result.chosen_strategy,
            "calibration": manifest.calibration.method,
            "threshold_policy": manifest.threshold.policy,
            "data_rows": str(sum(result.split.as_dict().values())),
        },
    )


def log_training_run(result: TrainingResult, settings: Settings, run_name: str) -> RunInfo:
    """Log a :class:`service.training.train.TrainingResult` as one MLflow run."""
    return ModelRegistry(settings).log_run(payload_from_result(result, run_name))
