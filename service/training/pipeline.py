"""The training pipeline as steps production retraining, the CLI and the demos compose: a data window → a trained
version (bundle, feature store, report) checked against the test-window floors → the run logged to MLflow →
registered with an alias → its verified bundle fetched back for serving."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import pandas as pd

from service.artifacts.registry import (
    CHALLENGER,
    CHAMPION,
    STRATEGY_METRIC_PREFIX,
    TEST_METRIC_PREFIX,
    VALID_METRIC_PREFIX,
    AliasMove,
    ModelRef,
    ModelRegistry,
    RunInfo,
    RunPayload,
)
from service.common.logging import get_logger, log_event
from service.data import aggregates
from service.data.feature_store import STORE_FILE, build_store
from service.data.features import EntityAggregates
from service.data.synthetic import SyntheticConfig
from service.settings import QualitySettings, Settings
from service.training.evaluate import GateReport, time_ordered
from service.training.train import TrainingResult, latest_store, train_pipeline

logger = get_logger(__name__)

DATA_FILE: Final[str] = "refunds.csv.gz"


SERVING_DIR: Final[str] = "serving"


#: Floors checked on the test window: metric name in ``TrainingResult.test_metrics`` → ``QualitySettings`` field.
GATED_METRICS: Final[dict[str, str]] = {"pr_auc": "min_pr_auc", "recall": "min_recall_at_threshold"}


class QualityGateFailedError(RuntimeError):
    """A trained version is below the quality floors; it is logged but not registered."""

    def __init__(self, gate: GateReport) -> None:
        super().__init__(f"quality gate failed for {gate.model_version}: " + "; ".join(gate.failures))
        self.gate = gate


def dataset_config(
    settings: Settings, *, drift: bool = False, seed: int | None = None, n_requests: int | None = None
) -> SyntheticConfig:
    """The generator's configuration: ``settings.data`` with the command line's overrides."""
    data = settings.data
    return SyntheticConfig(
        n_accounts=data.n_accounts,
        n_requests=data.n_requests if n_requests is None else n_requests,
        days=data.days,
        fraud_rate=data.fraud_rate,
        seed=data.seed if seed is None else seed,
        drift=drift,
    )


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def read_frame(path: Path) -> pd.DataFrame:
    """A history file written by :func:`write_frame` (or any CSV in the synthetic schema), in time order."""
    frame = pd.read_csv(path, parse_dates=["timestamp"], dtype={"account_id": object, "itemDescription": object})
    return time_ordered(frame)


@dataclass(frozen=True)
class TrainedVersion:
    result: TrainingResult
    gate: GateReport
    feature_store: Path

    @property
    def version(self) -> str:
        return self.result.manifest.version


def gate_on_test_window(result: TrainingResult, floors: QualitySettings) -> GateReport:
    """Compare the test-window metrics with the quality floors (NaN fails: no evidence is not a pass)."""
    return gate_on_metrics(result.manifest.version, result.split.test, result.test_metrics, floors)


def gate_on_metrics(version: str, rows: int, metrics: Mapping[str, float], floors: QualitySettings) -> GateReport:
    """The test-window gate of any trained version (the pipeline's, an engine's fit) from its test metrics."""
    wanted = {metric: float(getattr(floors, field_name)) for metric, field_name in GATED_METRICS.items()}
    values = dict(metrics)
    failures = [
        f"{name} {values.get(name, math.nan):.4f} < floor {floor:.4f}"
        for name, floor in wanted.items()
        if not values.get(name, math.nan) >= floor
    ]
    return GateReport(not failures, version, rows, values, wanted, failures)


def train_version(
    frame: pd.DataFrame,
    settings: Settings,
    version: str,
    out_dir: Path,
    *,
    store: Mapping[str, EntityAggregates] | None = None,
) -> TrainedVersion:
    """Train, write the feature store into the bundle directory, and check the quality gate. The store holds
    ``store`` when given (built by :func:`store_as_of`, which then also shapes the drift references), else the
    training history's latest aggregates."""
    builder = latest_store if store is None else store_as_of
    result = train_pipeline(frame, settings, version, out_dir, store_builder=builder)
    store_path = out_dir / STORE_FILE
    build_store(store_path, result.aggregates if store is None else store)
    gate = gate_on_test_window(result, settings.quality)
    log_event(logger, "version trained", version=version, gate_passed=gate.passed, failures=gate.failures)
    return TrainedVersion(result=result, gate=gate, feature_store=store_path)


@dataclass(frozen=True)
class Registration:
    run: RunInfo
    ref: ModelRef | None
    moves: list[AliasMove] = field(default_factory=list)


def next_version_name(registry: ModelRegistry, name: str) -> str:
    """``v<N+1>`` where N is the highest registered version number of ``name`` (``v1`` for a new model)."""
    versions = registry.versions(name)
    return f"v{max((int(ref.version) for ref in versions), default=0) + 1}"


def apply_alias(registry: ModelRegistry, name: str, alias: str | None, version: str, reason: str) -> list[AliasMove]:
    """``champion`` promotes (the old champion becomes ``previous``); ``challenger`` marks the candidate; any
    other alias is set as given."""
    if alias is None:
        return []
    if alias == CHAMPION:
        return registry.promote(name, version, reason)
    if alias == CHALLENGER:
        return [registry.set_challenger(name, version, reason)]
    return [registry.set_alias(name, alias, version, reason)]


def track_and_register(
    trained: TrainedVersion,
    settings: Settings,
    *,
    register: bool,
    alias: str | None,
    reason: str,
    registry: ModelRegistry | None = None,
) -> Registration:
    """Log the run (always, with the gate's verdict); register and alias it only if the gate passed.
    Raises :class:`QualityGateFailedError` after logging when it did not and registration was asked for."""
    registry = registry or ModelRegistry(settings)
    payload = payload_from_result(trained.result, run_name=f"train-{trained.version}")
    verdict = {"quality_gate": "passed" if trained.gate.passed else "failed"}
    run = registry.log_run(replace(payload, tags={**payload.tags, **verdict}))
    if not register:
        return Registration(run=run, ref=None)
    if not trained.gate.passed:
        raise QualityGateFailedError(trained.gate)
    name = settings.registered_model_name
    ref = registry.register(run, name, description=f"{trained.version}: {reason}")
    moves = apply_alias(registry, name, alias, ref.version, reason)
    return Registration(run=run, ref=registry.get_version(name, ref.version), moves=moves)


def serving_dir(settings: Settings, alias_or_version: str) -> Path:
    return settings.home / SERVING_DIR / alias_or_version


def fetch_for_serving(
    settings: Settings, alias_or_version: str, registry: ModelRegistry | None = None
) -> tuple[ModelRef, Path]:
    """Resolve ``alias_or_version`` in the registry and download its verified bundle to ``home/serving/…``."""
    registry = registry or ModelRegistry(settings)
    ref = registry.resolve(settings.registered_model_name, alias_or_version)
    return ref, registry.fetch_bundle(ref, serving_dir(settings, alias_or_version))


def store_as_of(history: pd.DataFrame, later: pd.DataFrame) -> dict[str, EntityAggregates]:
    """The feature store at the end of ``history``: each account's refund record until then.

    Accounts that refunded in ``history`` get their refunds there on top of their record from before the window
    (:func:`service.data.aggregates.latest`); accounts of ``later`` that have not refunded in the window yet get their
    record from before the window alone (``prior_refunds_base`` / ``avg_amount_base``, which the platform knows
    before they ask) — nothing of ``later``'s requests (amounts, times, labels) is used. Without them every new
    account would be served the unknown-account default although its history is on file.
    """
    known = aggregates.latest(history)
    first = later.loc[later["account_id"].notna()].drop_duplicates("account_id")
    fresh = {
        str(row.account_id): aggregates.combine(float(row.prior_refunds_base), float(row.avg_amount_base), 0.0, 0.0)
        for row in first.itertuples(index=False)
        if str(row.account_id) not in known and float(row.prior_refunds_base) > 0
    }
    return {**fresh, **known}


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
