"""The main job, as small steps the CLI (and later the rollout demo) composes.

generate data → train a version (bundle + feature store + report) → quality gate → log the run to MLflow →
register it and move an alias → fetch the aliased bundle back from the registry (verified) → serve it with a real
``bentoml serve`` on loopback → score the seed request and one realistic request per traffic pattern → stop.

Everything lives under ``settings.home``: ``data/``, ``artifacts/<version>/`` (bundle and report),
``mlflow.db`` + ``mlruns/`` (the embedded MLflow store), ``serving/<alias>/`` (the fetched bundle) and ``logs/``.
Progress and results are reported to a :class:`DemoObserver` (the CLI renders them with rich).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, Self

import httpx
import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.artifacts.bundle import MANIFEST_FILE, MODEL_FILE, Manifest, ScoringModel, load_bundle, read_manifest
from service.artifacts.registry import (
    CHALLENGER,
    CHAMPION,
    AliasMove,
    ModelRef,
    ModelRegistry,
    RunInfo,
    RunPayload,
    payload_from_result,
)
from service.common.logging import get_logger, log_event
from service.data import aggregates
from service.data.feature_store import STORE_FILE, build_store
from service.data.features import EntityAggregates
from service.data.synthetic import PATTERNS, SyntheticConfig, generate
from service.serving.process import BentoServer
from service.settings import QualitySettings, Settings
from service.training.evaluate import GateReport, file_sha256, frame_features, quality_gate, time_ordered
from service.training.train import TrainingResult, latest_store, train_pipeline

logger = get_logger(__name__)

DATA_FILE: Final[str] = "refunds.csv.gz"
SERVING_DIR: Final[str] = "serving"
#: The route of a single scoring request (the seed's contract; ``service.serving.bento.PREDICT_ROUTE``).
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


# ------------------------------------------------------------------------------ the rollout demo's versions
#
# The model-side half of the rollout demo (``fraudwatch demo-versions``; the delivery half is rollout/demo/main.py,
# which runs this as a subprocess and reads its JSON): one seeded stream in which a new bot farm appears half-way,
# cut in time — v1 learns from the window before the farm, v2 from the window after it appeared, the rest is the
# live traffic the load test replays — and v3, v2's booster with its threshold raised (a deliberately bad version:
# same scores, so the same input and output distributions and the same ranking, but it misses fraud).

LIVE_FILE: Final[str] = "live.csv.gz"
REGRESSION_DIR: Final[str] = "regression"
REGRESSION_DATA_FILE: Final[str] = "regression.csv.gz"
REGRESSION_META_FILE: Final[str] = "regression.json"
#: The three roles of the rollout demo's versions.
DEMO_ROLES: Final[tuple[str, ...]] = ("champion", "challenger", "bad")
_SECONDS_PER_DAY: Final[float] = 86_400.0


class DemoDataSettings(BaseSettings):
    """The rollout demo's model side (``FW_DEMO__…``): the stream, where it is cut, and how bad v3 is.

    ``champion_until`` and ``challenger_until`` are fractions of the stream's window: v1 learns from the window up
    to ``champion_until`` (before the new bot farm by default), v2 from the window up to ``challenger_until`` (the
    farm included); what follows is the live traffic. Three accounts per two requests keep the refunds an account
    makes within the window few, so the aggregates served for live traffic stay close to what the models learned
    from (input PSI well under the gates' 0.2); 5 % fraud makes labelled frauds arrive within seconds under load.
    """

    model_config = SettingsConfigDict(env_prefix="FW_DEMO__", extra="ignore")

    n_requests: int = Field(40_000, ge=2_000)
    n_accounts: int = Field(60_000, ge=100)
    days: int = Field(180, ge=7)
    fraud_rate: float = Field(0.05, gt=0.0, lt=0.5)
    seed: int = 7
    drift_start: float = Field(0.5, gt=0.0, lt=1.0)
    champion_until: float = Field(0.5, gt=0.0, lt=1.0)
    challenger_until: float = Field(0.85, gt=0.0, lt=1.0)
    #: The frozen labelled regression set of the rollout's quality stage: a separate drifted stream.
    regression_rows: int = Field(4_000, ge=500)
    regression_seed: int = 99
    #: v3 flags only this share of the regression set's fraud (v2 flags nearly all of it).
    bad_recall: float = Field(0.65, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.champion_until < self.challenger_until:
            raise ValueError("champion_until must be before challenger_until")
        if not self.drift_start < self.challenger_until:
            raise ValueError("the drift must start before challenger_until (v2 must see the new bot farm)")
        return self


def stream_config(demo: DemoDataSettings) -> SyntheticConfig:
    return SyntheticConfig(
        n_accounts=demo.n_accounts,
        n_requests=demo.n_requests,
        days=demo.days,
        fraud_rate=demo.fraud_rate,
        seed=demo.seed,
        drift=True,
        drift_start=demo.drift_start,
    )


def regression_config(demo: DemoDataSettings) -> SyntheticConfig:
    """The regression set: the same scenario (the new bot farm half-way) from another seed, smaller, with the same
    accounts-per-request ratio."""
    accounts = max(100, round(demo.n_accounts * demo.regression_rows / demo.n_requests))
    return replace(stream_config(demo), n_accounts=accounts, n_requests=demo.regression_rows, seed=demo.regression_seed)


def cut_at(frame: pd.DataFrame, days: int, until: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``frame`` (time-ordered) split at the fraction ``until`` of its ``days``-long window: (before, from then)."""
    ordered = time_ordered(frame)
    elapsed = (ordered["timestamp"] - ordered["timestamp"].iloc[0]).dt.total_seconds()
    before = (elapsed < until * days * _SECONDS_PER_DAY).to_numpy()
    return ordered.loc[before].reset_index(drop=True), ordered.loc[~before].reset_index(drop=True)


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


def _iso(timestamp: pd.Timestamp) -> str:
    return str(timestamp.isoformat(timespec="seconds"))


def write_frozen_set(frame: pd.DataFrame, directory: Path) -> Path:
    """``frame`` as a frozen labelled set (CSV + JSON meta with its SHA-256, as :func:`load_frozen_set` reads)."""
    data = write_frame(frame, directory / REGRESSION_DATA_FILE)
    meta = directory / REGRESSION_META_FILE
    document = {
        "file": data.name,
        "sha256": file_sha256(data),
        "rows": len(frame),
        "frauds": int(frame["is_fraud"].sum()),
    }
    meta.write_text(json.dumps(document, indent=2, sort_keys=True), encoding="utf-8")
    return meta


def threshold_for_recall(model: ScoringModel, labelled: pd.DataFrame, recall: float) -> float:
    """The score threshold at which ``model`` flags ``recall`` of ``labelled``'s fraud."""
    frame = time_ordered(labelled)
    scores = model.scores(frame_features(frame))
    fraud_scores = scores[frame["is_fraud"].to_numpy() == 1]
    if fraud_scores.size == 0:
        raise ValueError("the labelled set has no fraud to choose a threshold on")
    return float(np.quantile(fraud_scores, 1.0 - recall))


def degraded_copy(source: Path, dest: Path, version: str, threshold: float, note: str) -> Manifest:
    """A bundle named ``version`` with ``source``'s booster and feature store and another decision threshold."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, STORE_FILE):
        shutil.copy2(source / name, dest / name)
    manifest = read_manifest(source)
    degraded = replace(
        manifest,
        version=version,
        threshold=replace(manifest.threshold, threshold=threshold, validation_precision=None, validation_recall=None),
        created_at=datetime.now(UTC).isoformat(),
        extra={**manifest.extra, "derived_from": manifest.version, "degraded": note},
    )
    (dest / MANIFEST_FILE).write_text(degraded.to_json(), encoding="utf-8")
    load_bundle(dest)  # the booster still matches the manifest's checksum
    return degraded


@dataclass
class DemoVersions:
    """What the rollout demo's delivery half needs from the model side (written as JSON)."""

    model_name: str
    tracking_uri: str
    #: role (champion / challenger / bad) → version name.
    versions: dict[str, str] = field(default_factory=dict)
    #: version name → registry version number.
    registry_versions: dict[str, str] = field(default_factory=dict)
    live_traffic: str = ""
    regression_set: str = ""
    stream: dict[str, Any] = field(default_factory=dict)
    #: version name → metrics on the regression set at the version's own threshold.
    regression_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class VersionsObserver(Protocol):
    def step(self, title: str) -> AbstractContextManager[None]: ...

    def trained(self, trained: TrainedVersion) -> None: ...

    def registered(self, registration: Registration) -> None: ...


def regression_values(model: ScoringModel, frame: pd.DataFrame, settings: Settings) -> dict[str, float]:
    report = quality_gate(model, frame, settings.quality)
    return {key: round(float(report.values[key]), 4) for key in ("pr_auc", "recall", "precision")}


def prepare_rollout_versions(
    settings: Settings, demo: DemoDataSettings, observer: VersionsObserver, *, reason: str = "rollout demo"
) -> DemoVersions:
    """Generate and cut the stream, write the live traffic and the regression set, train v1 and v2, derive v3,
    log and register all three (v1 as champion), and report where everything is."""
    result = DemoVersions(model_name=settings.registered_model_name, tracking_uri=settings.tracking_uri)
    started = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal started
        result.timings_s[key] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()

    registry = ModelRegistry(settings)
    name = settings.registered_model_name
    with observer.step("Generating the stream (a new bot farm appears half-way) and the regression set"):
        stream = generate(stream_config(demo))
        early, _ = cut_at(stream, demo.days, demo.champion_until)
        history, live = cut_at(stream, demo.days, demo.challenger_until)
        store = store_as_of(history, live)
        result.live_traffic = str(write_frame(live, settings.data_dir / LIVE_FILE).resolve())
        regression = generate(regression_config(demo))
        result.regression_set = str(write_frozen_set(regression, settings.home / REGRESSION_DIR).resolve())
        result.stream = {
            "rows": len(stream),
            "champion_rows": len(early),
            "challenger_rows": len(history),
            "live_rows": len(live),
            "live_fraud_rate": round(float(live["is_fraud"].mean()), 4),
            "live_new_bot_farm_share": round(float((live["pattern"] == "new_bot_farm").mean()), 4),
            "drift_starts_at": _iso(stream["timestamp"].iloc[0] + pd.Timedelta(days=demo.drift_start * demo.days)),
            "live_starts_at": _iso(live["timestamp"].iloc[0]),
        }
    lap("generate")
    roles: dict[str, str] = {}
    for role, frame, alias, why in (
        ("champion", early, CHAMPION, "trained before the new bot farm appeared"),
        ("challenger", history, None, "trained after the new bot farm appeared"),
    ):
        version = next_version_name(registry, name)
        out_dir = settings.artifacts_dir / version
        with observer.step(f"Training {version} ({role}: {why}, {len(frame):,} requests)"):
            trained = train_version(frame, settings, version, out_dir, store=store)
        observer.trained(trained)
        with observer.step(f"Logging {version} to MLflow and registering it" + (f" as {alias}" if alias else "")):
            registration = track_and_register(
                trained, settings, register=True, alias=alias, reason=f"{reason}: {why}", registry=registry
            )
        observer.registered(registration)
        roles[role] = version
        result.registry_versions[version] = registration.ref.version if registration.ref else ""
        lap(f"train_{role}")
    bad = next_version_name(registry, name)
    challenger_dir = settings.artifacts_dir / roles["challenger"]
    with observer.step(f"Deriving {bad}: {roles['challenger']}'s booster with its threshold raised (deliberately bad)"):
        threshold = threshold_for_recall(load_bundle(challenger_dir), regression, demo.bad_recall)
        note = f"threshold raised to flag {demo.bad_recall:.0%} of the regression set's fraud (deliberately bad)"
        degraded_copy(challenger_dir, settings.artifacts_dir / bad, bad, threshold, note)
    with observer.step(f"Logging {bad} to MLflow and registering it"):
        payload = RunPayload(
            run_name=f"degrade-{bad}",
            bundle_dir=settings.artifacts_dir / bad,
            params={"derived_from": roles["challenger"], "bad_recall": demo.bad_recall, "threshold": threshold},
            tags={"deliberately_bad": "true", "derived_from": roles["challenger"], "quality_gate": "skipped"},
        )
        run = registry.log_run(payload)
        ref = registry.register(run, name, description=f"{bad}: {note}")
    observer.registered(Registration(run=run, ref=ref))
    roles["bad"] = bad
    result.registry_versions[bad] = ref.version
    lap("derive_bad")
    result.versions = roles
    with observer.step("Scoring the regression set with each version"):
        result.regression_metrics = {
            version: regression_values(load_bundle(settings.artifacts_dir / version), regression, settings)
            for version in roles.values()
        }
    lap("regression")
    return result
