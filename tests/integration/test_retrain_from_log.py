"""Log and wait is what retraining does: ``fraudwatch retrain`` with ``FW_RETRAIN__SOURCE=feature_log`` trains on the
decisions a real ``bentoml serve`` behind a real router served — the vectors it logged under the router's prediction
IDs — joined with the labels that arrived through the router's authenticated label feed into the real prediction log
(SQLite), passes (or fails) the same test-window and frozen regression-set gates, and registers the challenger in
MLflow on a real SQLite store, with the source, window, row counts and engine on the run. The new bundle reads the
same features as the served one, and carries the serving version's aggregate snapshot, so the per-account aggregates
it will serve are those it learned from.

Before this source existed, ``fraudwatch retrain`` ignored the setting and read ``FW_RETRAIN__DATA_PATH``: without
one it ended "no refund stream configured" (exit 4), the assertion on the exit code below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout.core.routing import RoutingTable
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from service.artifacts.bundle import read_manifest, sha256_of
from service.artifacts.registry import CHALLENGER, ModelRegistry, RunPayload
from service.data.feature_log import data_files, partitions
from service.data.feature_store import STORE_FILE, SQLiteFeatureStore
from service.data.synthetic import generate
from service.settings import Settings
from tests.kits.bundles import SMALL_DATA
from tests.kits.feature_log import decided_rows, logged_rows, logging_server_env
from tests.kits.retrain import FROZEN_SET
from tests.kits.serving import DSN_ENV, scoring_server
from tests.kits.stack import refund_body
from tests.kits.waiting import wait_for

pytestmark = pytest.mark.integration

PREDICT = "/api/v1/refund-predict"
FEEDBACK_BATCH = "/api/v1/feedback/batch"
#: Requests served (from the stream the served bundle was trained on: its snapshot knows the accounts) and labelled.
N_REQUESTS = 1_200
N_LABELLED = 1_080
#: Floors a version trained on 1,080 served decisions meets with room, and floors it cannot. Two runs' values on
#: 2026-12-06: regression-set PR-AUC 0.255 and 0.222 (test window 0.777, 0.743), but recall at the version's own
#: threshold 0.357 and 0.065 (2 of 10 runs failed a 0.1 recall floor) — the served velocity features carry real time
#: and arrival order, so each run's model differs, and a threshold set on ~160 validation rows moves a lot on a later
#: regime with a new bot farm. The passing case therefore floors PR-AUC only.
PASSING_FLOORS = {"FW_QUALITY__MIN_PR_AUC": "0.1", "FW_QUALITY__MIN_RECALL_AT_THRESHOLD": "0.0"}
FAILING_FLOORS = {"FW_QUALITY__MIN_PR_AUC": "0.999", "FW_QUALITY__MIN_RECALL_AT_THRESHOLD": "0.999"}


@dataclass
class Served:
    home: Path
    log_dir: Path
    dsn_file: Path
    served_version: str
    served_bundle: Path
    labelled: list[str]


def post_labels(control_url: str, headers: Mapping[str, str], labels: list[dict[str, str]]) -> None:
    with httpx.Client(base_url=control_url, timeout=60, trust_env=False) as feed:
        for start in range(0, len(labels), 100):
            answer = feed.post(FEEDBACK_BATCH, json={"labels": labels[start : start + 100]}, headers=dict(headers))
            assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def served(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The served bundle registered as champion; N_REQUESTS decisions served through the router and logged; the
    first N_LABELLED labelled through the label feed. The servers are stopped before the retrains run."""
    home = tmp_path_factory.mktemp("retrain-from-log")
    registry = ModelRegistry(Settings(home=home))
    champion = registry.register(registry.log_run(RunPayload(run_name="train-served", bundle_dir=bundle_dir)))
    registry.promote(Settings(home=home).registered_model_name, champion.version, "the served version")
    log_dir = home / "feature-log"
    db = home / "predictions.db"
    dsn_file = home / "prediction-log-dsn"
    dsn_file.write_text(f"sqlite:///{db}\n", encoding="utf-8")
    server = scoring_server(home / "v1", bundle_dir, "v1", logging_server_env(log_dir))
    routing_file = home / "routing.json"
    router = RouterProcess(
        log_path=home / "router.log",
        routing_file=routing_file,
        env={DSN_ENV: f"sqlite:///{db}", "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
             "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": "10.0"},
    )  # fmt: skip
    version = read_manifest(bundle_dir).version
    rows = generate(SMALL_DATA).tail(N_REQUESTS).to_dict("records")
    try:
        server.start()
        server.wait_ready()
        table = {"generation": 1, "stage": "stable", "stable": {"version": version, "url": server.url}}
        write_table_file(routing_file, RoutingTable.model_validate(table))
        router.start()
        router.wait_live()

        def score(row: dict[str, Any]) -> str:
            with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as client:
                answer = client.post(PREDICT, json=refund_body(row))
            assert answer.status_code == 200, answer.text
            return str(answer.json()["prediction_id"])

        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(score, rows))
        wait_for(lambda: decided_rows(db) >= N_REQUESTS or None, "the prediction log's decisions", 120)
        wait_for(lambda: logged_rows(log_dir) >= N_REQUESTS or None, "the feature log's rows", 120)
        labels = [
            {"prediction_id": pid, "label": "fraud" if row["is_fraud"] else "legit"}
            for pid, row in zip(ids[:N_LABELLED], rows[:N_LABELLED], strict=True)
        ]
        post_labels(router.control_url, router.feedback_headers(), labels)
    finally:
        router.stop()
        server.stop()
    yield Served(home, log_dir, dsn_file, version, bundle_dir, ids[:N_LABELLED])


def run_retrain(served: Served, name: str, floors: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
    summary = served.home / f"{name}-summary.json"
    env = {
        **os.environ,
        "FW_HOME": str(served.home),
        "FW_LOG_LEVEL": "WARNING",
        "FW_RETRAIN__SOURCE": "feature_log",
        "FW_RETRAIN__LABELS_DSN_FILE": str(served.dsn_file),
        "FW_FEATURE_LOG__DIRECTORY": str(served.log_dir),
        "FW_RETRAIN__REGRESSION_SET": str(FROZEN_SET),
        "FW_RETRAIN__HANDOFF": "none",
        "FW_RETRAIN__MIN_ROWS": "500",
        "FW_RETRAIN__MIN_POSITIVES": "20",
        "FW_RETRAIN__WINDOW_DAYS": "1",
        "FW_TRAIN__N_ESTIMATORS": "80",
        **floors,
    }
    env.pop("FW_RETRAIN__DATA_PATH", None)
    command = [sys.executable, "-m", "service.cli.main", "retrain", "--trigger", "scheduled",
               "--version-name", name, "--summary-json", str(summary)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = done.stdout + done.stderr
    report = json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else {}
    return done.returncode, report, output


def test_retrain_trains_on_the_served_decisions_and_registers_the_challenger(served: Served) -> None:
    code, report, output = run_retrain(served, "vlog1", PASSING_FLOORS)
    assert code == 0, output
    assert report["outcome"] == "registered", report
    assert report["source"] == "feature_log" and report["engine"] == "local"
    window = report["window"]
    assert window["source"] == "feature_log" and window["as_of"]
    # every labelled decision, none of those whose label had not arrived
    assert window["rows"] == N_LABELLED and window["unlabelled_dropped"] == N_REQUESTS - N_LABELLED
    assert report["gate"]["passed"] and "regression_pr_auc" in report["gate"]["values"]

    settings = Settings(home=served.home)
    registry = ModelRegistry(settings)
    ref = registry.resolve(settings.registered_model_name, CHALLENGER)
    assert ref.version == report["registry_version"] and ref.model_version == "vlog1"
    run = registry.client.get_run(str(ref.run_id))
    tags = run.data.tags
    assert tags["data_source"] == "feature_log" and tags["engine"] == "local"
    assert tags["window_rows"] == str(N_LABELLED) and tags["window_as_of"] == window["as_of"]
    assert tags["unlabelled_rows"] == str(N_REQUESTS - N_LABELLED) and tags["retrain_kind"] == "scheduled"
    assert tags["aggregate_snapshot"].startswith(f"{served.served_version} (registry ")

    # the new bundle serves the features it was trained on: the served model's, from the same snapshot
    bundle = registry.fetch_bundle(ref, served.home / "fetched" / "vlog1")
    assert read_manifest(bundle).feature_names == read_manifest(served.served_bundle).feature_names
    assert sha256_of(bundle / STORE_FILE) == sha256_of(served.served_bundle / STORE_FILE)
    set_dir = settings.artifacts_dir / f"{report['retrain_id']}-training-set"
    training = pa.concat_tables([pq.read_table(f) for _, day in partitions(set_dir) for f in data_files(day)])
    assert sorted(training.column("prediction_id").to_pylist()) == sorted(served.labelled)
    logged = pa.concat_tables([pq.read_table(f) for _, day in partitions(served.log_dir) for f in data_files(day)])
    store = SQLiteFeatureStore(bundle / STORE_FILE)
    try:
        accounts = logged.column("entity_key").to_pylist()
        looked_up = store.lookup_many([a for a in accounts if a is not None])
        priors, knowns = logged.column("prior_refunds").to_pylist(), logged.column("account_known").to_pylist()
        for account, prior, known in zip(accounts, priors, knowns, strict=True):
            aggregates = looked_up.get(account) if account is not None else None
            assert known == (1.0 if aggregates is not None else 0.0), (account, known, aggregates)
            assert prior == pytest.approx(aggregates.prior_refunds if aggregates is not None else 0.0), account
    finally:
        store.close()


def test_a_version_below_the_floors_is_logged_not_registered(served: Served) -> None:
    settings = Settings(home=served.home)
    registry = ModelRegistry(settings)
    before = {ref.version for ref in registry.versions(settings.registered_model_name)}
    code, report, output = run_retrain(served, "vlog2", FAILING_FLOORS)
    assert code == 3, output
    assert report["outcome"] == "quality_gate_failed" and report["source"] == "feature_log"
    assert report["registry_version"] is None and report["run_id"]
    assert {ref.version for ref in registry.versions(settings.registered_model_name)} == before
    run = registry.client.get_run(str(report["run_id"]))
    assert run.data.tags["quality_gate"] == "failed" and run.data.tags["data_source"] == "feature_log"
