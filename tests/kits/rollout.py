"""Shared pieces of the end-to-end rollout tests (tests/integration/test_rollout_local.py on the local backend,
tests/e2e/test_rollout_kube.py on Kubernetes): the trained model versions in a real MLflow registry (SQLite), the
time-compressed policy, the traffic (locust, its CLI), Prometheus with the project's rules, the router's test
settings and small polling helpers.

One trained set per module: v1 and v2 (XGBoost, different tree counts) and v3 — v2's booster with its decision
threshold raised so that it misses most fraud: its score distribution is v2's exactly (no drift gate can see it)
and its ranking is v2's (the regression set's PR-AUC floor passes); only the outcome gates (recall) can catch it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from rollout.backends.local.prometheus import PrometheusServer
from rollout.core.policy import OutcomeGate, dumps_policy, loads_policy
from rollout.demo.policy import load_demo_policy
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.settings import PrometheusSettings
from service.artifacts.bundle import MANIFEST_FILE, load_bundle
from service.artifacts.registry import ModelRegistry, RunPayload
from service.data.synthetic import SyntheticConfig, generate
from service.settings import Settings
from service.training.evaluate import file_sha256
from tests.kits.stack import BIN, HOST, ROOT, serving_features, train_bundle
from tests.kits.waiting import wait_for

__all__ = ["BIN", "HOST", "ROOT", "wait_for"]

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

#: The traffic locust replays is the history the models were trained on, and they were trained on the features
#: serving computes for it (the feature store's latest aggregates), so a good model's served distributions match
#: its training reference and the drift gates see only sampling noise.
#: Without bot-farm bursts: the walks' stages last seconds, and a burst puts dozens of one farm's frauds in one stage
#: — labels that are not independent draws, which the sequential gates assume. With bursts (a quarter of the fraud)
#: v3 below, whose misses are mostly burst frauds (it catches 9 % of them, v1 87 %), showed a paired recall
#: difference of 0.00 over shadow's first 21 fraud pairs and -0.05 over A/B's 46 (-0.26 over the whole stream),
#: and was promoted in a whole-suite run (docs/architecture.md, Gate statistics: clustered fraud).
STREAM = SyntheticConfig(n_requests=20_000, seed=7, fraud_rate=0.1, burst_share=0.0)
REGRESSION_SET = SyntheticConfig(n_requests=4_000, n_accounts=3_000, seed=99, fraud_rate=0.1, burst_share=0.0)
TREES = {"v1": 40, "v2": 60}
#: v3 catches only this share of the stream's fraud (v2 catches ~95 %).
BAD_RECALL = 0.65
LOAD_ENV = {
    "FW_LOAD_ROWS": str(STREAM.n_requests),
    "FW_LOAD_SEED": str(STREAM.seed),
    "FW_LOAD_FRAUD_RATE": str(STREAM.fraud_rate),
    "FW_LOAD_BURST_SHARE": str(STREAM.burst_share),
    "FW_LOAD_LABEL_SECONDS_PER_HOUR": "0.001",
    "FW_LOAD_WAIT_MIN": "0.02",
    "FW_LOAD_WAIT_MAX": "0.05",
    "FW_LOAD_LABEL_USERS": "3",
}
LOCUST_USERS = 7
START_TIMEOUT_S = 180.0
ROLLOUT_TIMEOUT_S = 240.0
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"

#: The demo's policy (rollout/demo/demo_policy.yaml: the default policy's gates, time-compressed, with an evidence
#: minimum in every metric gate's query; the file says where it differs from the default and why), its stage
#: minimums scaled down to 3 s: the stages then last as long as their evidence takes.
STAGE_SCALE = 0.15
POLICY_YAML = dumps_policy(load_demo_policy(STAGE_SCALE))


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Models:
    home: Path
    settings: Settings
    numbers: dict[str, str]  # version name → registry version number
    regression_meta: Path


def with_threshold(source: Path, directory: Path, version: str, recall: float) -> None:
    """A copy of a bundle under another version name whose threshold flags only ``recall`` of the stream's fraud
    (the booster, so every score, unchanged)."""
    shutil.copytree(source, directory)
    model = load_bundle(directory)
    ordered, _, features = serving_features(generate(STREAM))
    fraud_scores = model.scores(features)[ordered["is_fraud"].to_numpy() == 1]
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    manifest["threshold"]["threshold"] = float(np.quantile(fraud_scores, 1.0 - recall))
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


#: A/A candidates (issue 10): each a copy of a version's bundle under a new name — the same booster and threshold,
#: so every score and decision is the stable's. A rollout of one must be promoted.
IDENTICAL: dict[str, str] = {"v1": "v1-same", "v2": "v2-same"}


def as_version(source: Path, directory: Path, version: str) -> None:
    """A copy of a bundle under another version name, nothing else changed."""
    shutil.copytree(source, directory)
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_regression_set(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "regression.csv.gz"
    generate(REGRESSION_SET).to_csv(data, index=False)
    meta = directory / "regression.json"
    meta.write_text(json.dumps({"file": data.name, "sha256": file_sha256(data)}))
    return meta


def build_models(home: Path) -> Models:
    """v1, v2 and v3 trained, and the identical copies of v1 and v2, registered in an MLflow registry under ``home``
    (v1 the champion), and the regression set of the quality stage."""
    settings = Settings.model_validate({"home": home})
    bundles = home / "bundles"
    history = generate(STREAM)
    for version, trees in TREES.items():
        train_bundle(bundles / version, version, history, trees, STREAM.fraud_rate)
    with_threshold(bundles / "v2", bundles / "v3", "v3", BAD_RECALL)
    for original, copy in IDENTICAL.items():
        as_version(bundles / original, bundles / copy, copy)
    registry = ModelRegistry(settings)
    numbers = {}
    for version in ("v1", "v2", "v3", *IDENTICAL.values()):
        run = registry.log_run(RunPayload(run_name=f"train-{version}", bundle_dir=bundles / version))
        numbers[version] = registry.register(run).version
    registry.promote(settings.registered_model_name, numbers["v1"], "integration baseline")
    return Models(home, settings, numbers, write_regression_set(home / "regression"))


def aliases_if(models: Models, **expected: str | None) -> dict[str, str] | None:
    """The registry's aliases when each named alias points at the given version name (None: absent)."""
    aliases = ModelRegistry(models.settings).aliases(models.settings.registered_model_name)
    for alias, version in expected.items():
        wanted = models.numbers[version] if version is not None else None
        if aliases.get(alias) != wanted:
            return None
    return aliases


# --------------------------------------------------------------------------------------------------- the stack


def prometheus_server(workdir: Path) -> PrometheusServer:
    """A real Prometheus with the project's rules, scraping and evaluating every second."""
    return PrometheusServer(
        workdir,
        rule_files=[RULES],
        settings=PrometheusSettings(scrape_interval_s=1.0, evaluation_interval_s=1.0, ready_timeout_s=60.0),
    )


def router_env(workdir: Path) -> dict[str, str]:
    """The router's test settings: its own prediction log, budgets for a busy two-core machine."""
    return {
        DSN_ENV: f"sqlite:///{workdir / 'predictions.db'}",
        "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
        "FW_ROLLOUT_ROUTER__CANDIDATE_TIMEOUT_S": "2.0",
        "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": "4.0",
        "FW_ROLLOUT_ROUTER__SHADOW_TIMEOUT_S": "2.0",
    }


class RouterEndpoints(Protocol):
    """A router's public and control URLs and its label feed's token (a RouterProcess, or a router container)."""

    @property
    def url(self) -> str: ...

    @property
    def control_url(self) -> str: ...

    @property
    def feedback_token(self) -> str: ...


def start_locust(router: RouterEndpoints, log: Path) -> subprocess.Popen[bytes]:
    """locust's CLI in its own process: refund traffic to the router's public port plus delayed fraud labels to its
    control listener (with the label feed's token), for up to half an hour."""
    feedback = {"FW_LOAD_FEEDBACK_URL": router.control_url, "FW_LOAD_FEEDBACK_TOKEN": router.feedback_token}
    return subprocess.Popen(
        [str(BIN / "locust"), "-f", "loadtests/locustfile.py", "--headless", "-u", str(LOCUST_USERS), "-r",
         str(LOCUST_USERS), "-t", "1800s", "--host", router.url, "--only-summary", "--loglevel", "WARNING"],
        cwd=ROOT, env={**os.environ, **LOAD_ENV, **feedback}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def stop_locust(locust: subprocess.Popen[bytes] | None) -> None:
    if locust is None:
        return
    locust.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        locust.wait(timeout=30)
    if locust.poll() is None:
        locust.kill()


def answer(router_url: str) -> dict[str, Any]:
    """One scoring call through the router."""
    response = httpx.post(
        router_url + "/api/v1/refund-predict",
        json={"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2, "accountId": f"probe-{time.monotonic_ns()}"},
        timeout=10,
        trust_env=False,
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def router_ready(router_url: str) -> bool:
    try:
        return httpx.get(router_url + "/readyz", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def stage_timings(rollout: Any) -> dict[str, float]:
    """Seconds spent in each stage, from the transitions."""
    times: dict[str, float] = {}
    for before, after in itertools.pairwise(rollout.history):
        times[before.to_stage] = round((after.at - before.at).total_seconds(), 2)
    return times


def failed_gates(transition: Any) -> list[Any]:
    return [g for g in transition.gates if g.status.value == "Failed"]


HEALTH_AND_DRIFT_GATES = frozenset(
    {"error-rate", "latency", "input-psi-max", "score-psi", "decision-rate-shift", "shadow-agreement"}
)


def check_good_ab_exit(transition: Any) -> None:
    """A good candidate's A/B exit: the arms' own recall passed on at least the fraud labels its gate needs (its
    minimum counts what its estimate uses), and every paired outcome gate of the stage passed."""
    minimum = next(
        g.min_labels for g in loads_policy(POLICY_YAML).gates if isinstance(g, OutcomeGate) and g.name == "recall"
    )
    recall = next(g for g in transition.gates if g.name == "recall")
    assert recall.status.value == "Successful" and recall.labels is not None and recall.labels >= minimum, recall
    assert recall.method == "sprt-two-sample"
    paired = {g.name: g for g in transition.gates if g.name.endswith("-paired")}
    assert paired and {g.status.value for g in paired.values()} == {"Successful"}, paired
    assert paired["recall-paired"].method == "sprt-paired"


def check_outcome_rollback(rollout: Any) -> str:
    """The bad candidate was rolled back by an outcome gate alone, after looking normal on health and drift.

    Issue 10: caught by the paired recall gate — in shadow when its fraud labels came in time (possibly before every
    drift gate's evidence minimum was met: none of them failed) — or by the two-sample recall gate of the arms' own
    decisions in A/B, after every health and drift gate passed. Returns the name of the recall gate that failed."""
    assert rollout.phase == "RolledBack", rollout.history[-1].reason
    last = rollout.history[-1]
    assert last.trigger == "analysis", last
    failed = {g.name for g in failed_gates(last)}
    assert failed and {g.layer for g in failed_gates(last)} == {"outcome"}, failed
    passed = {g.name for t in rollout.history for g in t.gates if g.status.value == "Successful"}
    if "recall-paired" in failed:
        # the paired gate judges shadow, A/B (stable's control shadow) and full; shadow when its labels came in time
        assert last.from_stage in ("shadow", "ab", "full"), last.from_stage
        assert {"error-rate", "latency"} <= passed, passed
        return "recall-paired"
    assert last.from_stage == "ab" and "recall" in failed, (last.from_stage, failed)
    assert passed >= HEALTH_AND_DRIFT_GATES, passed
    return "recall"


def published_tables(log: Path) -> list[tuple[Any, ...]]:
    """The tables a controller published, in order (from its JSON log, across restarts)."""
    tables = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "routing_published":
                keys = ("stage", "stable", "candidate", "candidate_weight", "shadow")
                tables.append(tuple(json.dumps(event.get(k)) for k in keys))
    return tables
