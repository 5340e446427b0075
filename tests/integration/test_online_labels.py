"""Labels reach the online store, end to end through real processes: a real ``redis-server`` (with a password, read
from a file by both sides as the chart's Secret mounts it), a real ``bentoml serve`` of the scoring service reading
and writing it, and a real router process (``python -m rollout.router``) in front of it whose label feed writes
each recorded fraud label there (rollout/router/outcomes/online_labels.py).

A refund is scored through the router; its fraud label is posted to the router's control port; the next refund of
the same account is served ``acct_fraud_labels = 1`` — seen in the model server's own feature histogram (the
bundle's reference for that feature is given a bin edge at 0.5) and in the store. Replaying the label counts
nothing twice, and a legit label counts nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from rollout.core.routing import RoutingTable
from rollout.router.outcomes.feedback import FEEDBACK_PATH
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from service.artifacts.bundle import MANIFEST_FILE
from service.data import velocity as v
from service.data.online_store import open_online_store, resolve_all
from service.settings import OnlineStoreSettings
from tests.kits.redis import redis_server
from tests.kits.router import metric_value
from tests.kits.serving import scoring_server
from tests.kits.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
PASSWORD = "labels-test-password"
ACCOUNT = "acct-labelled"


def _with_label_bins(source: Path, directory: Path) -> Path:
    """The bundle with a reference for ``acct_fraud_labels`` that separates 0 from ≥ 1 (the small test bundle's is
    one bin: it was trained without labels), so the served histogram shows which one a request got."""
    shutil.copytree(source, directory)
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["feature_reference"]["acct_fraud_labels"] = {"edges": [0.5], "fractions": [0.97, 0.03]}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def _refund(http: httpx.Client, account: str) -> str:
    body = {"yearsActive": 0.2, "amount": 49.99, "ipAccounts": 1, "accountId": account, "ipAddress": "198.51.100.4"}
    response = http.post("/api/v1/refund-predict", json=body)
    assert response.status_code == 200, response.text
    prediction_id = response.json()["prediction_id"]
    assert isinstance(prediction_id, str)
    return prediction_id


def _labelled_bin(server_url: str, version: str) -> float:
    text = httpx.get(f"{server_url}/metrics", timeout=10.0).text
    return metric_value(text, "fraudwatch_feature_bin_total", model_version=version, feature="acct_fraud_labels",
                        bin="1")  # fmt: skip


def test_a_posted_fraud_label_changes_the_next_requests_velocity_features(bundle_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    model_dir = _with_label_bins(bundle_dir, tmp_path / "bundle")
    version = json.loads((model_dir / MANIFEST_FILE).read_text())["version"]
    with redis_server(tmp_path / "redis", password=PASSWORD) as store_server:
        store_env = {"ONLINE_STORE__URL": store_server.url, "ONLINE_STORE__PASSWORD_FILE": str(secret)}
        server = scoring_server(
            tmp_path / "home",
            model_dir,
            "labels",
            {"FW_SERVE__WORKERS": "1", "FW_SERVE__ONLINE_STORE__TIMEOUT_MS": "1000",
             **{f"FW_SERVE__{k}": value for k, value in store_env.items()}},
        )  # fmt: skip
        routing_file = tmp_path / "routing.json"
        with server:
            table = {"generation": 1, "stage": "stable", "stable": {"version": version, "url": server.url}}
            write_table_file(routing_file, RoutingTable.model_validate(table))
            router = RouterProcess(
                log_path=tmp_path / "router.log",
                routing_file=routing_file,
                admin_token="labels-admin-token",
                env={
                    DSN_ENV: f"sqlite:///{tmp_path / 'predictions.db'}",
                    **{f"FW_ROLLOUT_ROUTER__{k}": value for k, value in store_env.items()},
                },
            )
            with router, httpx.Client(base_url=router.url, timeout=30.0) as http:
                first = _refund(http, ACCOUNT)
                other = _refund(http, "acct-legit")
                before = _labelled_bin(server.url, version)

                feedback = httpx.Client(base_url=router.control_url, headers=router.feedback_headers(), timeout=30.0)
                with feedback:
                    for prediction_id, label, status in (
                        (first, "fraud", "recorded"),
                        (first, "fraud", "duplicate"),  # a replayed label
                        (other, "legit", "recorded"),
                    ):
                        answer = feedback.post(FEEDBACK_PATH, json={"prediction_id": prediction_id, "label": label})
                        assert answer.status_code == 200 and answer.json()["status"] == status, answer.text

                store = open_online_store(
                    store_server.url, OnlineStoreSettings(password_file=secret, timeout_ms=5_000.0)
                )
                assert store is not None

                def labels_of(account: str) -> float:
                    query = v.RefundEvent(f"probe-{account}", 4_000_000_000_000, account, 100)
                    return resolve_all([query], store.read([query], 5.0))[0].acct_fraud_labels

                try:
                    wait_for(lambda: labels_of(ACCOUNT) or None, "the fraud label written to Redis", 30.0)
                    _refund(http, ACCOUNT)  # the next request of the labelled account
                    after = _labelled_bin(server.url, version)
                    control = httpx.get(f"{router.control_url}/metrics", timeout=10.0).text
                    assert labels_of(ACCOUNT) == 1.0  # the replay counted nothing
                    assert labels_of("acct-legit") == 0.0  # a legit label counts nothing
                finally:
                    store.close()
    assert before == 0.0
    assert after == 1.0  # the model server read acct_fraud_labels = 1 for it
    assert metric_value(control, "fraudwatch_router_label_events_total", outcome="applied") == 1.0
    assert metric_value(control, "fraudwatch_router_label_events_total", outcome="error") == 0.0
