"""The main job, as small steps the CLI (and later the rollout demo) composes.

generate data → train a version (bundle + feature store + report) → quality gate → log the run to MLflow →
register it and move an alias → fetch the aliased bundle back from the registry (verified) → serve it with a real
``bentoml serve`` on loopback → score the seed request and one realistic request per traffic pattern → stop.

Everything lives under ``settings.home``: ``data/``, ``artifacts/<version>/`` (bundle and report),
``mlflow.db`` + ``mlruns/`` (the embedded MLflow store), ``serving/<alias>/`` (the fetched bundle) and ``logs/``.
Progress and results are reported to a :class:`DemoObserver` (the CLI renders them with rich).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import pandas as pd

from service.datasets.synthetic import PATTERNS, SyntheticConfig, generate
from service.evaluate import GateReport, time_ordered
from service.featurestore import STORE_FILE, build_store
from service.logging import get_logger, log_event
from service.registry import (
    CHALLENGER,
    CHAMPION,
    AliasMove,
    ModelRef,
    ModelRegistry,
    RunInfo,
    payload_from_result,
)
from service.serving_process import BentoServer
from service.settings import QualitySettings, Settings
from service.train import TrainingResult, train_pipeline

logger = get_logger(__name__)

DATA_FILE: Final[str] = "refunds.csv.gz"
SERVING_DIR: Final[str] = "serving"
#: The route of a single scoring request (the seed's contract; ``service.bento.PREDICT_ROUTE``).
PREDICT_ROUTE: Final[str] = "/api/v1/refund-predict"
#: The seed's example request; its contract must keep working unchanged.
SEED_REQUEST: Final[dict[str, Any]] = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
SEED_LABEL: Final[str] = "seed"
#: Floors checked on the test window: metric name in ``TrainingResult.test_metrics`` → ``QualitySettings`` field.
GATED_METRICS: Final[dict[str, str]] = {"pr_auc": "min_pr_auc", "recall": "min_recall_at_threshold"}


class QualityGateFailedError(RuntimeError):
    """A trained version is below the quality floors; it is logged but not registered."""

    def __init__(self, gate: GateReport) -> None:
        super().__init__(f"quality gate failed for {gate.model_version}: " + "; ".join(gate.failures))
        self.gate = gate


# -------------------------------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------------------------- training


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
    wanted = {metric: float(getattr(floors, field_name)) for metric, field_name in GATED_METRICS.items()}
    values = dict(result.test_metrics)
    failures = [
        f"{name} {values.get(name, math.nan):.4f} < floor {floor:.4f}"
        for name, floor in wanted.items()
        if not values.get(name, math.nan) >= floor
    ]
    return GateReport(not failures, result.manifest.version, result.split.test, values, wanted, failures)


def train_version(frame: pd.DataFrame, settings: Settings, version: str, out_dir: Path) -> TrainedVersion:
    """Train, write the feature store into the bundle directory, and check the quality gate."""
    result = train_pipeline(frame, settings, version, out_dir)
    store = out_dir / STORE_FILE
    build_store(store, result.aggregates)
    gate = gate_on_test_window(result, settings.quality)
    log_event(logger, "version trained", version=version, gate_passed=gate.passed, failures=gate.failures)
    return TrainedVersion(result=result, gate=gate, feature_store=store)


# ---------------------------------------------------------------------------------------------- registry


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


# ----------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Example:
    """A request to score and what is known about it (``pattern``/``is_fraud`` are None for the seed)."""

    label: str
    request: dict[str, Any]
    pattern: str | None = None
    is_fraud: bool | None = None


@dataclass(frozen=True)
class Scored:
    example: Example
    status: int
    body: dict[str, Any]
    latency_ms: float


def request_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The public request for a history row: the seed's three fields, the entity key and the item text."""
    request: dict[str, Any] = {
        "yearsActive": round(float(row["yearsActive"]), 4),
        "amount": float(row["amount"]),
        "ipAccounts": int(row["ipAccounts"]),
        "accountId": str(row["account_id"]),
    }
    text = row.get("itemDescription")
    if isinstance(text, str) and text:
        request["itemDescription"] = text
    return request


def pattern_examples(frame: pd.DataFrame) -> list[Example]:
    """One request per traffic pattern present (legitimate and each fraud pattern): its latest row."""
    examples = []
    for pattern in PATTERNS:
        rows = frame.loc[frame["pattern"] == pattern]
        if rows.empty:
            continue
        row = rows.iloc[-1].to_dict()
        examples.append(Example(pattern, request_of(row), pattern, bool(row["is_fraud"])))
    return examples


def demo_examples(frame: pd.DataFrame) -> list[Example]:
    return [Example(SEED_LABEL, dict(SEED_REQUEST)), *pattern_examples(frame)]


def score(client: httpx.Client, base_url: str, example: Example) -> Scored:
    started = time.perf_counter()
    response = client.post(base_url + PREDICT_ROUTE, json=example.request)
    latency_ms = (time.perf_counter() - started) * 1000.0
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text}
    return Scored(example, response.status_code, body if isinstance(body, dict) else {"body": body}, latency_ms)


# ------------------------------------------------------------------------------------------------- demo


class DemoObserver(Protocol):
    """What the demo reports as it goes (the CLI renders it)."""

    def step(self, title: str) -> AbstractContextManager[None]: ...

    def trained(self, trained: TrainedVersion) -> None: ...

    def registered(self, registration: Registration) -> None: ...

    def serving(self, ref: ModelRef, bundle: Path, server: BentoServer) -> None: ...

    def scored(self, scored: Scored) -> None: ...


@dataclass
class DemoSummary:
    model_name: str
    version: str = ""
    model_version: str = ""
    run_id: str = ""
    server_url: str = ""
    server_log: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    responses: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(self.timings_s.values())

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total_s": round(self.total_s, 3)}


@contextmanager
def timed(summary: DemoSummary, observer: DemoObserver, key: str, title: str) -> Iterator[None]:
    """Run one step under the observer's display and record its wall time in ``summary.timings_s[key]``."""
    started = time.perf_counter()
    try:
        with observer.step(title):
            yield
    finally:
        summary.timings_s[key] = round(time.perf_counter() - started, 3)
        log_event(logger, "demo step", step=key, seconds=summary.timings_s[key])


def run_demo(settings: Settings, observer: DemoObserver, *, drift: bool = False, reason: str = "demo") -> DemoSummary:
    """generate → train → register as champion → fetch the champion → serve → score → stop."""
    summary = DemoSummary(model_name=settings.registered_model_name)
    with timed(summary, observer, "open_store", f"Opening the MLflow store {settings.tracking_uri}"):
        registry = ModelRegistry(settings)
        version = next_version_name(registry, settings.registered_model_name)
    with timed(summary, observer, "generate", "Generating synthetic refund traffic"):
        frame = generate(dataset_config(settings, drift=drift))
        data_path = write_frame(frame, settings.data_dir / DATA_FILE)
    out_dir = settings.artifacts_dir / version
    with timed(summary, observer, "train", f"Training {version} ({len(frame):,} requests)"):
        trained = train_version(frame, settings, version, out_dir)
    observer.trained(trained)
    with timed(summary, observer, "register", f"Logging to MLflow and registering {version} as {CHAMPION}"):
        registration = track_and_register(
            trained, settings, register=True, alias=CHAMPION, reason=reason, registry=registry
        )
    observer.registered(registration)
    with timed(summary, observer, "fetch", f"Fetching the {CHAMPION} bundle from the registry"):
        ref, bundle = fetch_for_serving(settings, CHAMPION, registry)
    summary.version, summary.model_version, summary.run_id = (
        ref.version,
        ref.model_version or "",
        registration.run.run_id,
    )
    summary.paths = {
        "data": str(data_path.resolve()),
        "report": str(trained.result.report.markdown.resolve()),
        "training_dir": str(out_dir.resolve()),
        "serving_bundle": str(bundle),
        "mlflow_tracking_uri": registry.tracking_uri,
        "mlflow_artifacts": settings.mlflow_artifact_root,
    }
    server = BentoServer(model_dir=bundle, settings=settings, name=f"bento-{CHAMPION}")
    try:
        with timed(summary, observer, "serve", "Starting bentoml serve and waiting for /readyz"):
            server.start()
            server.wait_ready()
        summary.server_url, summary.server_log = server.url, str(server.log_path)
        observer.serving(ref, bundle, server)
        with (
            timed(summary, observer, "score", "Scoring the seed request and one request per pattern"),
            httpx.Client(timeout=settings.process.http_timeout_s) as client,
        ):
            for example in demo_examples(frame):
                scored = score(client, server.url, example)
                summary.responses.append(scored_dict(scored))
                observer.scored(scored)
    finally:
        with timed(summary, observer, "stop", "Stopping the server"):
            server.stop()
    return summary


def scored_dict(scored: Scored) -> dict[str, Any]:
    return {
        "label": scored.example.label,
        "pattern": scored.example.pattern,
        "is_fraud": scored.example.is_fraud,
        "request": scored.example.request,
        "status": scored.status,
        "response": scored.body,
        "latency_ms": round(scored.latency_ms, 2),
    }
