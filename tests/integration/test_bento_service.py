"""The scoring service through HTTP: a real ``bentoml serve`` (2 workers) on 127.0.0.1 with a real bundle."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api.schema import BatchResponse, ErrorResponse, RefundResponse
from service.artifacts.bundle import MODEL_FILE, ScoringModel, load_bundle
from service.artifacts.registry import ModelRegistry, RunPayload
from service.data.feature_store import STORE_FILE, SQLiteFeatureStore
from service.data.features import DEFAULT_AGGREGATES, DRIFT_FEATURES, feature_matrix
from service.serving.process import BentoServer
from service.settings import Settings
from tests.kits.serving import scoring_server, server_settings
from tests.kits.waiting import seconds_until, wait_for

pytestmark = pytest.mark.integration

PREDICT = "/api/v1/refund-predict"
BATCH = "/api/v1/refund-predict-batch"
SEED = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
TIMEOUT_S = 30.0
MAX_BODY = 65536  # as configured in the served_model fixture
MAX_ITEMS = 50

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def client(served_model: BentoServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served_model.url, timeout=TIMEOUT_S) as http:
        yield http


@pytest.fixture(scope="module")
def model(bundle_dir: Path) -> ScoringModel:
    return load_bundle(bundle_dir, nthread=1)


@pytest.fixture(scope="module")
def known_accounts(bundle_dir: Path) -> list[str]:
    with sqlite3.connect(bundle_dir / STORE_FILE) as conn:
        rows = conn.execute("SELECT account_id FROM entity_aggregates ORDER BY prior_refunds DESC LIMIT 3").fetchall()
    return [str(row[0]) for row in rows]


def scrape(client: httpx.Client) -> Samples:
    text = client.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(
        value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= sample_labels
    )


def expected_score(model: ScoringModel, bundle_dir: Path, row: dict[str, Any]) -> float:
    """The in-process score of ``row``: the same store, the same feature code, the same booster."""
    store = SQLiteFeatureStore(bundle_dir / STORE_FILE)
    account = row.get("accountId")
    aggregates = (store.lookup(account) if account else None) or DEFAULT_AGGREGATES
    store.close()
    return float(model.scores(feature_matrix([row], [aggregates]))[0])


# ------------------------------------------------------------------------------------------------ scoring


def test_seed_request_answers_every_field_consistently(client: httpx.Client, model: ScoringModel) -> None:
    response = client.post(PREDICT, json=SEED)
    assert response.status_code == 200, response.text
    body = RefundResponse.model_validate(response.json())
    # every field; `reasons` only with a review decision (or explain: true), and then non-empty
    assert set(response.json()) == set(RefundResponse.model_fields) - ({"reasons"} if body.reasons is None else set())
    assert (body.reasons is not None) == (body.decision == "review")
    assert body.prediction == int(body.score >= body.threshold)
    assert body.confidence == pytest.approx(body.score if body.prediction else 1.0 - body.score)
    assert body.decision == ("review" if body.prediction else "approve")
    assert body.threshold == pytest.approx(model.threshold)
    assert body.model_version == model.version
    assert uuid.UUID(body.correlation_id).version == 4
    assert response.headers["x-correlation-id"] == body.correlation_id


def parity_rows(known: list[str]) -> list[dict[str, Any]]:
    return [
        dict(SEED),
        {**SEED, "itemDescription": "Pad Thai with tofu"},
        {"yearsActive": 0.02, "amount": 100.0, "ipAccounts": 40, "itemDescription": "Gift card"},
        {"yearsActive": 6.0, "amount": 1899.99, "ipAccounts": 1, "itemDescription": "Laptop arrived damaged"},
        {**SEED, "accountId": known[0], "itemDescription": "Weekly grocery box"},
        {**SEED, "accountId": known[1]},
        {**SEED, "accountId": "acct-not-in-store"},
    ]


def test_http_scores_equal_in_process_scores(
    client: httpx.Client, model: ScoringModel, bundle_dir: Path, known_accounts: list[str]
) -> None:
    rows = parity_rows(known_accounts)
    served = [client.post(PREDICT, json=row).json()["score"] for row in rows]
    expected = [expected_score(model, bundle_dir, row) for row in rows]
    assert served == expected
    assert len(set(served)) > 3, "the rows should not all score alike"


def test_correlation_id_is_echoed_in_body_header_and_log(client: httpx.Client, served_model: BentoServer) -> None:
    correlation_id = f"it-{uuid.uuid4().hex[:12]}"
    response = client.post(
        PREDICT, json={**SEED, "accountId": "acct-log"}, headers={"X-Correlation-ID": correlation_id}
    )
    assert response.status_code == 200
    assert response.json()["correlation_id"] == correlation_id
    assert response.headers["x-correlation-id"] == correlation_id
    line = wait_for_log_line(served_model.log_path, lambda entry: entry.get("correlation_id") == correlation_id)
    assert line["message"] == "decision"
    assert line["model_version"] == response.json()["model_version"]
    assert line["score"] == response.json()["score"]
    assert line["decision"] == response.json()["decision"]
    assert line["account_id"] == "acct-log"
    assert line["latency_ms"] >= 0.0
    assert not {"amount", "yearsActive", "ipAccounts", "itemDescription"} & set(line)


def test_unsafe_correlation_id_is_replaced(client: httpx.Client) -> None:
    response = client.post(PREDICT, json=SEED, headers={"X-Correlation-ID": 'x" injected=1'})
    assert response.status_code == 200
    assert uuid.UUID(response.json()["correlation_id"]).version == 4


def log_entries(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [dict(json.loads(raw)) for raw in lines if raw.startswith("{")]


def wait_for_log_line(path: Path, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    probe = lambda: next((entry for entry in log_entries(path) if match(entry)), None)  # noqa: E731
    return wait_for(probe, f"a matching JSON log line in {path}", TIMEOUT_S)


def test_batch_endpoint_scores_like_single_requests(
    client: httpx.Client, known_accounts: list[str], model: ScoringModel
) -> None:
    rows = parity_rows(known_accounts)
    response = client.post(BATCH, json={"requests": rows}, headers={"X-Correlation-ID": "batch-cid-1"})
    assert response.status_code == 200, response.text
    batch = BatchResponse.model_validate(response.json())
    assert batch.correlation_id == "batch-cid-1"
    assert batch.model_version == model.version
    assert [result.correlation_id for result in batch.results] == ["batch-cid-1"] * len(rows)
    singles = [client.post(PREDICT, json=row).json()["score"] for row in rows]
    assert [result.score for result in batch.results] == singles


# ------------------------------------------------------------------------------------------------- errors


BAD_SINGLE: list[tuple[str, bytes, int, str]] = [
    ("missing field", json.dumps({"yearsActive": 1.5, "amount": 45.0}).encode(), 422, "ipAccounts"),
    ("wrong type", json.dumps({**SEED, "amount": "forty-five"}).encode(), 422, "amount"),
    ("negative amount", json.dumps({**SEED, "amount": -45.0}).encode(), 422, "amount"),
    ("NaN", b'{"yearsActive": 1.5, "amount": NaN, "ipAccounts": 2}', 422, "amount"),
    ("Infinity", b'{"yearsActive": Infinity, "amount": 45.0, "ipAccounts": 2}', 422, "yearsActive"),
    ("not JSON", b"yearsActive=1.5&amount=45", 400, "body"),
    ("JSON array", b"[1, 2, 3]", 422, "body"),
    ("empty body", b"", 422, "yearsActive"),
    ("huge payload", json.dumps({**SEED, "itemDescription": "x" * (MAX_BODY + 10)}).encode(), 413, "body"),
]


@pytest.mark.parametrize(("case", "raw", "status", "field"), BAD_SINGLE, ids=[case[0] for case in BAD_SINGLE])
def test_bad_single_input_is_4xx_naming_the_field(
    client: httpx.Client, case: str, raw: bytes, status: int, field: str
) -> None:
    response = client.post(PREDICT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate(response.json())
    assert field in [detail.field for detail in error.details]
    assert error.correlation_id == response.headers["x-correlation-id"]


def test_huge_chunked_payload_without_length_is_413(client: httpx.Client) -> None:
    chunk = b" " * 8192

    def body() -> Iterator[bytes]:
        yield b'{"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2, "pad": "'
        for _ in range(MAX_BODY // len(chunk) + 2):
            yield chunk
        yield b'"}'

    response = client.post(PREDICT, content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert ErrorResponse.model_validate(response.json()).error == "payload_too_large"


BAD_BATCH: list[tuple[str, dict[str, Any], str]] = [
    ("bad item field", {"requests": [SEED, SEED, SEED, {**SEED, "ipAccounts": 0}]}, "requests.3.ipAccounts"),
    ("item missing field", {"requests": [SEED, {"yearsActive": 1.0, "ipAccounts": 1}]}, "requests.1.amount"),
    ("batch too large", {"requests": [SEED] * (MAX_ITEMS + 1)}, "requests"),
    ("empty batch", {"requests": []}, "requests"),
    ("not wrapped", SEED, "requests"),
]


@pytest.mark.parametrize(("case", "payload", "field"), BAD_BATCH, ids=[case[0] for case in BAD_BATCH])
def test_bad_batch_is_422_naming_the_field(
    client: httpx.Client, case: str, payload: dict[str, Any], field: str
) -> None:
    response = client.post(BATCH, json=payload)
    assert response.status_code == 422, response.text
    assert field in [detail.field for detail in ErrorResponse.model_validate(response.json()).details]


def test_wrong_content_type_is_still_parsed_as_json(client: httpx.Client) -> None:
    response = client.post(PREDICT, content=json.dumps(SEED).encode(), headers={"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    assert RefundResponse.model_validate(response.json()).model_version


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_count_every_request_across_both_workers(
    client: httpx.Client, served_model: BentoServer, model: ScoringModel
) -> None:
    version = model.version
    before = scrape(client)
    n_single, n_batch_rows, n_invalid, n_not_json = 0, 0, 0, 0
    pids: set[int] = set()
    marker = uuid.uuid4().hex[:8]

    def one(index: int) -> int:
        with httpx.Client(base_url=served_model.url, timeout=TIMEOUT_S) as fresh:  # a new connection each time
            cid = f"m-{marker}-{index}"
            return fresh.post(PREDICT, json=SEED, headers={"X-Correlation-ID": cid}).status_code

    for round_ in range(20):  # both workers take connections once requests overlap; bounded rounds
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(one, range(round_ * 24, (round_ + 1) * 24)))
        assert statuses == [200] * 24
        n_single += 24
        pids = decision_pids(served_model.log_path, marker, expected=n_single)
        if len(pids) >= 2:
            break
    assert len(pids) == 2, f"requests reached only worker(s) {pids}"

    batch = client.post(BATCH, json={"requests": [SEED] * 7})
    assert batch.status_code == 200
    n_batch_rows += 7
    for payload in ({**SEED, "amount": -1}, {"yearsActive": 1}):
        assert client.post(PREDICT, json=payload).status_code == 422
        n_invalid += 1
    assert client.post(PREDICT, content=b"{oops").status_code == 400
    n_not_json += 1

    n_scored = n_single + n_batch_rows
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
        ("fraudwatch_decisions_total", ()): n_scored,
        ("fraudwatch_score_count", ()): n_scored,
        **{("fraudwatch_feature_bin_total", (("feature", f),)): n_scored for f in (*DRIFT_FEATURES, "score")},
        ("fraudwatch_request_duration_seconds_count", (("endpoint", "refund_predict"),)): (
            n_single + n_invalid + n_not_json
        ),
        ("fraudwatch_request_duration_seconds_count", (("endpoint", "refund_predict_batch"),)): 1,
        ("fraudwatch_request_errors_total", (("reason", "validation"),)): n_invalid,
        ("fraudwatch_request_errors_total", (("reason", "invalid_json"),)): n_not_json,
    }

    def deltas(after: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            key: total(after, key[0], model_version=version, **dict(key[1]))
            - total(before, key[0], model_version=version, **dict(key[1]))
            for key in expected
        }

    # Latency and error counters are updated as each response completes: poll until the last ones are in.
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        after = scrape(client)
        observed = deltas(after)
        if observed == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert observed == expected
    assert total(after, "fraudwatch_model_info", model_version=version) == 1.0
    trained = datetime.fromisoformat(model.manifest.created_at).timestamp()
    assert total(after, "fraudwatch_model_trained_timestamp_seconds", model_version=version) == trained
    reference = [
        total(after, "fraudwatch_reference_bin_fraction", model_version=version, feature="amount", bin=str(i))
        for i in range(len(model.manifest.feature_reference["amount"].fractions))
    ]
    assert reference == pytest.approx(model.manifest.feature_reference["amount"].fractions)


def decision_pids(log_path: Path, marker: str, expected: int) -> set[int]:
    """Worker PIDs of the decision lines tagged with ``marker`` (waits until all ``expected`` are logged)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        entries = [
            json.loads(raw)
            for raw in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            if raw.startswith("{") and f'"m-{marker}-' in raw
        ]
        decisions = [entry for entry in entries if entry["message"] == "decision"]
        if len(decisions) >= expected or time.monotonic() > deadline:
            return {int(entry["pid"]) for entry in decisions}
        time.sleep(0.1)


def test_feature_store_lookups_and_misses_are_counted(
    client: httpx.Client, model: ScoringModel, known_accounts: list[str]
) -> None:
    before = scrape(client)
    rows = [
        {**SEED, "accountId": known_accounts[0]},
        {**SEED, "accountId": "nobody-1"},
        {**SEED, "accountId": "nobody-2"},
    ]
    assert client.post(BATCH, json={"requests": rows}).status_code == 200
    after = scrape(client)
    version = model.version

    def delta(name: str, **labels: str) -> float:
        return total(after, name, model_version=version, **labels) - total(
            before, name, model_version=version, **labels
        )

    assert delta("fraudwatch_feature_store_lookups_total") == 3
    assert delta("fraudwatch_feature_store_fallback_total", reason="miss") == 2
    assert delta("fraudwatch_feature_store_fallback_total", reason="timeout") == 0


def test_health_endpoints(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------------------------- readiness


def status_of(url: str, path: str) -> int | None:
    try:
        return httpx.get(url + path, timeout=5.0).status_code
    except httpx.TransportError:
        return None


def test_not_ready_until_the_bundle_appears_then_ready(bundle_dir: Path, tmp_path: Path) -> None:
    """The worker is alive but not ready while its bundle is missing; it loads it once it appears."""
    target = tmp_path / "later" / "model"
    env = {"FW_SERVE__MODEL_WAIT_TIMEOUT_S": "300", "FW_SERVE__MODEL_POLL_INTERVAL_S": "0.1"}
    server = scoring_server(tmp_path / "home", target, "late-model", env)
    server.start()
    try:
        seconds_until(lambda: status_of(server.url, "/livez") == 200, 120.0, 0.2, "the server to be alive")
        assert status_of(server.url, "/readyz") == 503
        early = httpx.post(server.url + PREDICT, json=SEED, timeout=TIMEOUT_S)
        assert early.status_code == 503
        assert ErrorResponse.model_validate(early.json()).error == "model_not_ready"
        staging = tmp_path / "later" / "staging"
        shutil.copytree(bundle_dir, staging)
        staging.rename(target)  # appears atomically, as a model sync would publish it
        seconds_until(
            lambda: status_of(server.url, "/readyz") == 200, 120.0, 0.2, "readiness after the bundle appeared"
        )
        response = httpx.post(server.url + PREDICT, json=SEED, timeout=TIMEOUT_S)
        assert response.status_code == 200
        assert response.json()["model_version"] == load_bundle(bundle_dir).version
    finally:
        server.stop()


def test_tampered_bundle_is_never_served(bundle_dir: Path, tmp_path: Path) -> None:
    """A booster that does not match its manifest's SHA-256: the worker reports dead and serves nothing."""
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    with (tampered / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    server = scoring_server(tmp_path / "home", tampered, "tampered", {})
    server.start()
    try:
        seconds_until(lambda: status_of(server.url, "/livez") == 503, 120.0, 0.2, "the liveness probe to fail")
        assert status_of(server.url, "/readyz") == 503
        response = httpx.post(server.url + PREDICT, json=SEED, timeout=TIMEOUT_S)
        assert response.status_code == 503
        assert ErrorResponse.model_validate(response.json()).error == "model_unavailable"
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- dispatch


def without_correlation(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key != "correlation_id"}


def test_bentoml_dispatch_answers_exactly_like_the_direct_one(
    client: httpx.Client, bundle_dir: Path, known_accounts: list[str], tmp_path: Path
) -> None:
    """``FW_SERVE__DISPATCH=bentoml`` (BentoML's API methods answer) and the default ``direct`` (the guard answers):
    the same bodies for single and batch requests, the same 4xx naming the same fields, the routes in the OpenAPI."""
    env = {"FW_SERVE__DISPATCH": "bentoml", "FW_SERVE__FEATURE_STORE_TIMEOUT_MS": "5000"}
    server = scoring_server(tmp_path / "home", bundle_dir, "bentoml-dispatch", env)
    rows = parity_rows(known_accounts)
    bad = {"yearsActive": -1, "amount": "x", "ipAccounts": 2}
    with server, httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as other:
        for http in (client, other):
            assert http.post(PREDICT, json=SEED).status_code == 200
        singles = [
            [without_correlation(http.post(PREDICT, json=row).json()) for row in rows] for http in (client, other)
        ]
        batches = [http.post(BATCH, json={"requests": rows}).json() for http in (client, other)]
        errors = [http.post(PREDICT, json=bad) for http in (client, other)]
        spec = other.get("/docs.json").json()
    assert singles[0] == singles[1]
    assert [without_correlation(r) for r in batches[0]["results"]] == [
        without_correlation(r) for r in batches[1]["results"]
    ]
    assert [r["model_version"] for r in batches] == [singles[0][0]["model_version"]] * 2
    assert [e.status_code for e in errors] == [422, 422]
    assert [sorted(d["field"] for d in e.json()["details"]) for e in errors] == [["amount", "yearsActive"]] * 2
    assert {PREDICT, BATCH} <= set(spec["paths"])


# ---------------------------------------------------------------------------------------------- model source


def test_a_server_loads_its_model_from_the_registry_by_uri(bundle_dir: Path, tmp_path: Path) -> None:
    """``FW_SERVE__MODEL_URI=models:/<name>/<n>`` and no directory: two workers fetch (once, under the lock) the
    verified bundle from the MLflow registry (SQLite) and serve exactly the registered version."""
    settings = Settings(home=tmp_path / "registry-home", mlflow_tracking_uri=None)
    registry = ModelRegistry(settings)
    ref = registry.register(registry.log_run(RunPayload(run_name="by-uri", bundle_dir=bundle_dir)))
    env = {
        "FW_SERVE__MODEL_URI": f"models:/{settings.registered_model_name}/{ref.version}",
        "FW_MLFLOW_TRACKING_URI": settings.tracking_uri,
        "FW_HOME": str(settings.home),
        "FW_SERVE__WORKERS": "2",
    }
    serve_settings = server_settings(tmp_path / "serve-home")
    server = BentoServer(model_dir=None, settings=serve_settings, name="by-uri", extra_env=env)
    with server:
        answers = [httpx.post(server.url + PREDICT, json=SEED, timeout=TIMEOUT_S) for _ in range(8)]
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["model_version"] for a in answers} == {load_bundle(bundle_dir).version}
    fetched = settings.home / "serving" / f"{settings.registered_model_name}-v{ref.version}"
    assert load_bundle(fetched).manifest.sha256 == ref.sha256
    assert [p.name for p in fetched.parent.iterdir() if not p.name.endswith(".lock")] == [fetched.name]
