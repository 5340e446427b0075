"""The model-side half of the rollout demo (``fraudwatch demo-versions``; the delivery half is rollout/demo/main.py,
which runs this as a subprocess and reads its JSON): one seeded stream in which a new bot farm appears half-way,
cut in time — v1 learns from the window before the farm, v2 from the window after it appeared, the rest is the
live traffic the load test replays — and v3, v2's booster with its threshold raised (a deliberately bad version:
same scores, so the same input and output distributions and the same ranking, but it misses fraud).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, Self

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.artifacts.bundle import MANIFEST_FILE, MODEL_FILE, Manifest, ScoringModel, load_bundle, read_manifest
from service.artifacts.registry import (
    CHAMPION,
    ModelRegistry,
    RunPayload,
)
from service.common.logging import get_logger
from service.data.feature_store import STORE_FILE
from service.data.online_store import backfill, describe, history_events, open_online_store, store_url
from service.data.synthetic import SyntheticConfig, generate
from service.data.velocity import LabelEvent
from service.settings import Settings
from service.training.evaluate import file_sha256, frame_features, quality_gate, time_ordered
from service.training.pipeline import (
    Registration,
    TrainedVersion,
    next_version_name,
    store_as_of,
    track_and_register,
    train_version,
    write_frame,
)

logger = get_logger(__name__)


# -------------------------------------------------------------------------------------------------- data


# ---------------------------------------------------------------------------------------------- training


# ---------------------------------------------------------------------------------------------- registry


# ----------------------------------------------------------------------------------------------- scoring


# ------------------------------------------------------------------------------------------------- demo


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


def backfill_online_store(settings: Settings, history: pd.DataFrame, live: pd.DataFrame) -> dict[str, Any]:
    """Fill the model servers' online store (``serve.online_store``: the embedded file under this home unless set)
    with ``history``'s refunds and the labels that arrived before ``live`` starts — what a store written since the
    start of the stream would hold. An empty store would serve the first day of live traffic as accounts without a
    past (no previous refund, no fraud label) although training's point-in-time features saw it."""
    config = settings.serve.online_store
    url = store_url(settings)
    store = open_online_store(url, config)
    if store is None:
        return {"url": describe(url), "refunds": 0, "labels": 0}
    until_ms = int(pd.Timestamp(live["timestamp"].min()).value // 1_000_000)
    events = history_events(time_ordered(history), until_ms)
    try:
        written = backfill(store, events, config.write_batch_max)
    finally:
        store.close()
    labels = sum(isinstance(event, LabelEvent) for event in events)
    return {"url": describe(url), "refunds": len(events) - labels, "labels": labels, "applied": written.applied}


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
    #: The online store the model servers of this home read and write (credentials never in it): where the router
    #: writes the labels too.
    online_store: str = ""
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
    with observer.step("Backfilling the online store with the history before the live traffic"):
        result.stream["online_store_backfill"] = backfill_online_store(settings, history, live)
        result.online_store = describe(store_url(settings))
    lap("backfill")
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
