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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pandas as pd
import xgboost as xgb

from rollout.outcome_settings import OutcomeSettings, PrometheusSettings
from rollout.prometheus import PrometheusServer
from service import aggregates
from service.datasets.synthetic import SyntheticConfig, generate
from service.evaluate import file_sha256, reference_bins, time_ordered
from service.features import DEFAULT_AGGREGATES, DRIFT_FEATURES, FEATURE_NAMES, feature_matrix
from service.featurestore import STORE_FILE, build_store
from service.model import MANIFEST_FILE, Calibration, Manifest, ThresholdPolicy, load_bundle, save_bundle
from service.registry import ModelRegistry, RunPayload
from service.settings import Settings
from tests.conftest import N_REFERENCE_BINS

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
T = TypeVar("T")

#: The traffic locust replays is the history the models were trained on, and they were trained on the features
#: serving computes for it (the feature store's latest aggregates), so a good model's served distributions match
#: its training reference and the drift gates see only sampling noise.
STREAM = SyntheticConfig(n_requests=20_000, seed=7, fraud_rate=0.1)
REGRESSION_SET = SyntheticConfig(n_requests=4_000, n_accounts=3_000, seed=99, fraud_rate=0.1)
TREES = {"v1": 40, "v2": 60}
#: v3 catches only this share of the stream's fraud (v2 catches ~95 %).
BAD_RECALL = 0.65
LOAD_ENV = {
    "FW_LOAD_ROWS": str(STREAM.n_requests),
    "FW_LOAD_SEED": str(STREAM.seed),
    "FW_LOAD_FRAUD_RATE": str(STREAM.fraud_rate),
    "FW_LOAD_LABEL_SECONDS_PER_HOUR": "0.001",
    "FW_LOAD_WAIT_MIN": "0.02",
    "FW_LOAD_WAIT_MAX": "0.05",
    "FW_LOAD_LABEL_USERS": "3",
}
LOCUST_USERS = 7
START_TIMEOUT_S = 180.0
ROLLOUT_TIMEOUT_S = 240.0
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"

#: The default policy's gates, time-compressed. Where it differs from the default, and why:
#: * every metric gate carries an evidence minimum in its query (``… and on () <sample count> >= N``): PSI with
#:   ε-clipped empty bins is ≈ 3 on 40 requests whatever the model, and one error in 40 calls is 2.5 % — without
#:   the minimum a candidate is rolled back by its first seconds of traffic (no data → Inconclusive instead);
#: * the stream is 10 % fraud (ten times production) so that labelled frauds arrive within seconds; the gates on
#:   decisions scale with it: the review rate may shift by 10 points and shadow agreement may drop to 85 % (v3
#:   reviews ~3.5 points less and disagrees with v1 on ~6 % of requests: at production's 1 % fraud that would be
#:   a 0.35-point shift, inside any sane tolerance — which is the point of the scenario);
#: * the regression set is judged on PR-AUC only (a ranking metric: v3's defect is a threshold a ranking cannot
#:   show); p99 may reach 1 s (two cores shared with everything else);
#: * outcome gates compare at 90 % confidence with a 0.15–0.2 margin, so a few dozen labelled frauds decide.
POLICY_YAML = """
stages:
  shadow: {min_duration_s: 3, min_requests: 20}
  canary: {weight: 5, min_duration_s: 3, min_requests: 3}
  ab: {weight: 50, min_duration_s: 3, min_requests: 20, min_labels: 100}
  full: {min_duration_s: 3, min_requests: 20}
analysis:
  interval_s: 1
  window_s: 30
  consecutive_error_limit: 5
  inconclusive_timeout_s: 30
  labels_timeout_s: 120
  confidence: 0.9
promotion: {alias: champion, warm_window_s: 600, scale_down_delay_s: 30}
samples:
  requests: >-
    sum(increase(fraudwatch_router_requests_total{model_version="{{version}}",outcome="2xx"}[{{stage_window}}]))
  labels: >-
    sum(increase(fraudwatch_outcome_total{model_version="{{version}}"}[{{stage_window}}]))
gates:
  - name: regression-set
    layer: quality
    floors: {pr_auc: 0.80}
  - name: error-rate
    layer: health
    stages: [shadow, canary, ab, full]
    query: >-
      (sum(model_version_role:fraudwatch_router_errors:rate5m{model_version="{{version}}"})
      / (sum(model_version_role:fraudwatch_router_requests:rate5m{model_version="{{version}}"}) > 0))
      and on () sum(increase(fraudwatch_router_requests_total{model_version="{{version}}"}[5m])) >= 100
    condition: value <= 0.01
  - name: latency-p99
    layer: health
    stages: [shadow, canary, ab, full]
    query: max(model_version_role:fraudwatch_router_request_duration_seconds:p99_5m{model_version="{{version}}"})
    condition: value <= 1.0
  - name: input-psi-max
    layer: input_drift
    stages: [shadow, canary, ab, full]
    query: >-
      max(model_version_feature:fraudwatch_psi:5m{model_version="{{version}}",feature!="score"})
      and on ()
      sum(model_version_feature:fraudwatch_feature_bin:increase5m{model_version="{{version}}",feature="amount"})
      >= 200
    condition: value <= 0.2
  - name: score-psi
    layer: output_drift
    stages: [shadow, canary, ab, full]
    query: >-
      max(model_version_feature:fraudwatch_psi:5m{model_version="{{version}}",feature="score"})
      and on ()
      sum(model_version_feature:fraudwatch_feature_bin:increase5m{model_version="{{version}}",feature="score"})
      >= 200
    condition: value <= 0.2
  - name: decision-rate-shift
    layer: output_drift
    stages: [shadow, canary, ab]
    query: >-
      max(model_version:fraudwatch_review_decision_ratio:ratio_rate5m{model_version="{{version}}"})
      and on ()
      sum(model_version_feature:fraudwatch_feature_bin:increase5m{model_version="{{version}}",feature="score"})
      >= 200
    condition: abs(candidate - stable) <= 0.1
  - name: shadow-agreement
    layer: output_drift
    stages: [shadow, full]
    query: >-
      max(stable_candidate:fraudwatch_shadow_agreement:ratio5m{stable="{{stable}}",candidate="{{candidate}}"})
      and on () sum(stable_candidate:fraudwatch_shadow_pairs:increase5m{stable="{{stable}}",candidate="{{candidate}}"})
      >= 100
    condition: value >= 0.85
  - name: recall
    layer: outcome
    stages: [ab, full]
    labels_query: sum(increase(fraudwatch_outcome_total{model_version="{{version}}"}[{{stage_window}}]))
    min_labels: 100
    estimator:
      method: wilson
      successes: sum(increase(fraudwatch_outcome_total{model_version="{{version}}",outcome="tp"}[{{stage_window}}]))
      trials: sum(increase(fraudwatch_outcome_total{model_version="{{version}}",outcome=~"tp|fn"}[{{stage_window}}]))
    condition: candidate - stable >= -0.15
  - name: precision
    layer: outcome
    stages: [ab, full]
    labels_query: sum(increase(fraudwatch_outcome_total{model_version="{{version}}"}[{{stage_window}}]))
    min_labels: 100
    estimator:
      method: wilson
      successes: sum(increase(fraudwatch_outcome_total{model_version="{{version}}",outcome="tp"}[{{stage_window}}]))
      trials: sum(increase(fraudwatch_outcome_total{model_version="{{version}}",outcome=~"tp|fp"}[{{stage_window}}]))
    condition: candidate - stable >= -0.2
  - name: roc-auc
    layer: outcome
    stages: [ab, full]
    labels_query: sum(increase(fraudwatch_outcome_total{model_version="{{version}}"}[{{stage_window}}]))
    min_labels: 100
    estimator:
      method: histogram_auc
      positive_buckets: >-
        sum by (le) (increase(
        fraudwatch_outcome_score_bucket{model_version="{{version}}",label="fraud"}[{{stage_window}}]))
      negative_buckets: >-
        sum by (le) (increase(
        fraudwatch_outcome_score_bucket{model_version="{{version}}",label="legit"}[{{stage_window}}]))
    condition: candidate - stable >= -0.05
"""


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float, interval_s: float = 0.25) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Models:
    home: Path
    settings: Settings
    numbers: dict[str, str]  # version name → registry version number
    regression_meta: Path


def train_bundle(directory: Path, version: str, frame: pd.DataFrame, n_trees: int) -> None:
    """An XGBoost bundle trained on the features serving computes for ``frame`` (latest aggregates), with its
    feature and score reference bins, its threshold at the stream's fraud rate, and its feature store."""
    ordered = time_ordered(frame)
    latest = aggregates.latest(ordered)
    rows = ordered.to_dict("records")
    features = feature_matrix(rows, [latest.get(str(r["account_id"]), DEFAULT_AGGREGATES) for r in rows])
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 4, "eta": 0.2, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(features, label=ordered["is_fraud"].to_numpy()), num_boost_round=n_trees)
    calibration = Calibration(method="identity")
    scores = calibration.apply(np.asarray(booster.inplace_predict(features), dtype=np.float32))
    threshold = float(np.quantile(scores, 1.0 - STREAM.fraud_rate))
    manifest = Manifest(
        version=version,
        feature_names=list(FEATURE_NAMES),
        calibration=calibration,
        threshold=ThresholdPolicy(policy="target_precision", threshold=threshold, target_precision=0.8),
        feature_reference={
            name: reference_bins(features[:, FEATURE_NAMES.index(name)], N_REFERENCE_BINS) for name in DRIFT_FEATURES
        },
        score_reference=reference_bins(scores, N_REFERENCE_BINS),
        metrics={"train_rows": float(len(ordered))},
        params={**params, "num_boost_round": n_trees},
        sha256="",
        created_at=datetime.now(UTC).isoformat(),
    )
    save_bundle(booster, manifest, directory)
    build_store(directory / STORE_FILE, latest)


def with_threshold(source: Path, directory: Path, version: str, recall: float) -> None:
    """A copy of a bundle under another version name whose threshold flags only ``recall`` of the stream's fraud
    (the booster, so every score, unchanged)."""
    shutil.copytree(source, directory)
    model = load_bundle(directory)
    ordered = time_ordered(generate(STREAM))
    latest = aggregates.latest(ordered)
    rows = ordered.to_dict("records")
    features = feature_matrix(rows, [latest.get(str(r["account_id"]), DEFAULT_AGGREGATES) for r in rows])
    fraud_scores = model.scores(features)[ordered["is_fraud"].to_numpy() == 1]
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    manifest["threshold"]["threshold"] = float(np.quantile(fraud_scores, 1.0 - recall))
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_regression_set(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "regression.csv.gz"
    generate(REGRESSION_SET).to_csv(data, index=False)
    meta = directory / "regression.json"
    meta.write_text(json.dumps({"file": data.name, "sha256": file_sha256(data)}))
    return meta


def build_models(home: Path) -> Models:
    """v1, v2 and v3 trained, registered in an MLflow registry under ``home`` (v1 the champion), and the regression
    set of the quality stage."""
    settings = Settings.model_validate({"home": home})
    bundles = home / "bundles"
    history = generate(STREAM)
    for version, trees in TREES.items():
        train_bundle(bundles / version, version, history, trees)
    with_threshold(bundles / "v2", bundles / "v3", "v3", BAD_RECALL)
    registry = ModelRegistry(settings)
    numbers = {}
    for version in ("v1", "v2", "v3"):
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


def start_locust(router_url: str, log: Path) -> subprocess.Popen[bytes]:
    """locust's CLI in its own process: refund traffic plus delayed fraud labels, for up to half an hour."""
    return subprocess.Popen(
        [str(BIN / "locust"), "-f", "loadtests/locustfile.py", "--headless", "-u", str(LOCUST_USERS), "-r",
         str(LOCUST_USERS), "-t", "1800s", "--host", router_url, "--only-summary", "--loglevel", "WARNING"],
        cwd=ROOT, env={**os.environ, **LOAD_ENV}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
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
