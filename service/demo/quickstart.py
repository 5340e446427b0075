"""``fraudwatch demo`` (``make quickstart``): the model's main job end to end, on one machine.

generate data → train a version (:mod:`service.training.pipeline`: bundle + feature store + report) → quality gate
→ log the run to MLflow → register it and move an alias → fetch the aliased bundle back from the registry
(verified) → serve it with a real ``bentoml serve`` on loopback → score the seed request and one realistic request
per traffic pattern → stop.

Everything lives under ``settings.home``: ``data/``, ``artifacts/<version>/`` (bundle and report),
``mlflow.db`` + ``mlruns/`` (the embedded MLflow store), ``serving/<alias>/`` (the fetched bundle) and ``logs/``.
Progress and results are reported to a :class:`DemoObserver` (the CLI renders them with rich).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import pandas as pd

from service.artifacts.registry import (
    CHAMPION,
    ModelRef,
    ModelRegistry,
)
from service.common.logging import get_logger, log_event
from service.data.synthetic import PATTERNS, generate
from service.serving.process import BentoServer
from service.settings import Settings
from service.training.pipeline import (
    DATA_FILE,
    Registration,
    TrainedVersion,
    dataset_config,
    fetch_for_serving,
    next_version_name,
    track_and_register,
    train_version,
    write_frame,
)

logger = get_logger(__name__)

#: The route of a single scoring request (the seed's contract; ``service.serving.bento.PREDICT_ROUTE``).
PREDICT_ROUTE: Final[str] = "/api/v1/refund-predict"


#: The seed's example request; its contract must keep working unchanged.
SEED_REQUEST: Final[dict[str, Any]] = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}


SEED_LABEL: Final[str] = "seed"


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
