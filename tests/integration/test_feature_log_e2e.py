"""Log and wait, end to end on real processes: a real ``bentoml serve`` model server behind a real router writes the
feature vector of each decision it served to the Parquet feature log under the router's prediction ID; labels arrive
through the router's authenticated label feed into the real prediction log (SQLite); the training-set builder joins
the two — and the training set is point-in-time correct: a label that arrived after the cut-off is not in it, and
every row's features are the vector that was scored (the bundle re-scores them to the very score the client got).
A request sent to the model server directly (no prediction ID: no label could ever join it) is not logged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout.core.routing import RoutingTable
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from service.artifacts.bundle import load_bundle, read_manifest
from service.data.synthetic import generate
from service.serving.process import BentoServer
from service.training.training_set import TrainingSet, build_training_set, read_labels
from tests.kits.bundles import SMALL_DATA
from tests.kits.feature_log import decided_rows, logged_rows, logging_server_env
from tests.kits.serving import scoring_server
from tests.kits.stack import refund_body
from tests.kits.waiting import wait_for

pytestmark = pytest.mark.integration

DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
PREDICT = "/api/v1/refund-predict"
N_REQUESTS = 40
LABELLED_BEFORE = 24  # labels that arrive before the cut-off
LABELLED_AFTER = 8  # labels that arrive after it


@dataclass
class Served:
    router: RouterProcess
    server: BentoServer
    log_dir: Path
    dsn: str
    bundle_dir: Path


@pytest.fixture(scope="module")
def served(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("feature-log-stack")
    log_dir = home / "feature-log"
    server = scoring_server(home / "v1", bundle_dir, "v1", logging_server_env(log_dir))
    routing_file = home / "routing.json"
    dsn = f"sqlite:///{home / 'predictions.db'}"
    router = RouterProcess(
        log_path=home / "router.log",
        routing_file=routing_file,
        env={DSN_ENV: dsn, "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false", "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": "5.0"},
    )
    try:
        server.start()
        server.wait_ready()
        version = read_manifest(bundle_dir).version
        table = {"generation": 1, "stage": "stable", "stable": {"version": version, "url": server.url}}
        write_table_file(routing_file, RoutingTable.model_validate(table))
        router.start()
        router.wait_live()
        yield Served(router, server, log_dir, dsn, bundle_dir)
    finally:
        router.stop()
        server.stop()


def label(served: Served, feed: httpx.Client, prediction_id: str, fraud: bool) -> None:
    body = {"prediction_id": prediction_id, "label": "fraud" if fraud else "legit"}
    answer = feed.post("/api/v1/feedback", json=body, headers=served.router.feedback_headers())
    assert answer.status_code == 200, answer.text


def test_served_vectors_and_arrived_labels_become_a_point_in_time_training_set(served: Served, tmp_path: Path) -> None:
    rows = generate(SMALL_DATA).head(N_REQUESTS).to_dict("records")
    answers: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    with httpx.Client(base_url=served.router.url, timeout=30, trust_env=False) as client:
        for row in rows:
            answer = client.post(PREDICT, json=refund_body(row))
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
    # straight to the model server: no prediction ID, not logged
    direct = httpx.post(served.server.url + PREDICT, json=refund_body(rows[0]), timeout=30, trust_env=False)
    assert direct.status_code == 200
    db = Path(served.dsn.removeprefix("sqlite:///"))
    wait_for(lambda: decided_rows(db) >= N_REQUESTS or None, "the prediction log's decisions", 60)
    wait_for(lambda: logged_rows(served.log_dir) >= N_REQUESTS or None, "the feature log's rows", 60)
    time.sleep(1.5)  # three more flush intervals: nothing else may arrive
    assert logged_rows(served.log_dir) == N_REQUESTS

    ids = [a["prediction_id"] for a in answers]
    truth = [bool(r["is_fraud"]) for r in rows]
    with httpx.Client(base_url=served.router.control_url, timeout=30, trust_env=False) as feed:
        for i in range(LABELLED_BEFORE):
            label(served, feed, ids[i], truth[i])
        time.sleep(0.05)
        as_of = datetime.now(UTC)
        time.sleep(0.05)
        for i in range(LABELLED_BEFORE, LABELLED_BEFORE + LABELLED_AFTER):
            label(served, feed, ids[i], truth[i])

    since = started - timedelta(minutes=1)
    end = datetime.now(UTC) + timedelta(minutes=1)
    labels = read_labels(served.dsn, as_of, since)
    assert labels.num_rows == LABELLED_BEFORE
    manifest = read_manifest(served.bundle_dir)
    info = build_training_set(served.log_dir, labels, list(manifest.feature_names), since, end, as_of, tmp_path / "set")
    assert info.rows == LABELLED_BEFORE and info.logged_rows == N_REQUESTS
    assert info.unlabelled_rows == N_REQUESTS - LABELLED_BEFORE
    assert info.positives == sum(truth[:LABELLED_BEFORE])

    # the rows are the decisions, in time order, with their labels and the vectors that were scored
    training_set = TrainingSet.open(tmp_path / "set")
    table = pa.concat_tables([pq.read_table(f) for f in training_set.files])  # one file per UTC day
    assert table.column("prediction_id").to_pylist() == ids[:LABELLED_BEFORE]
    assert table.column("label").to_pylist() == [int(t) for t in truth[:LABELLED_BEFORE]]
    x = np.column_stack([table.column(name).to_numpy() for name in manifest.feature_names]).astype(np.float32)
    rescored = load_bundle(served.bundle_dir).scores(x)
    served_scores = [a["score"] for a in answers[:LABELLED_BEFORE]]
    np.testing.assert_allclose(rescored, served_scores, rtol=0, atol=1e-6)
