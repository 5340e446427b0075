"""The router app in-process (Starlette TestClient) in front of stand-in model services on real loopback sockets.

Covers input validation, the admin endpoint's auth, stage routing, shadow pairing, fallback on every kind of
candidate failure, stable failure, shadow shedding, file reload and the prediction log on shutdown. Real
``bentoml serve`` processes are exercised in tests/integration/test_router.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from rollout.core.routing import RoutingTable, VersionEndpoint
from rollout.router.app import FeedbackTokenMissingError, Router, create_apps
from rollout.router.outcomes.prediction_log import PredictionLog, create_log_engine, predictions_table
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.table_sources import FileTableSource, write_table_file
from rollout.settings import RolloutSettings, RouterSettings
from tests.routerkit import StandIn, closed_port, metric_labels, metric_value, stand_in, wait_until

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
PREDICT = "/api/v1/refund-predict"
STABLE_SCORE = 0.2
CANDIDATE_SCORE = 0.7


@pytest.fixture
def stable() -> Iterator[StandIn]:
    with stand_in("v1", STABLE_SCORE) as server:
        yield server


@pytest.fixture
def candidate() -> Iterator[StandIn]:
    with stand_in("v2", CANDIDATE_SCORE) as server:
        yield server


BASE_SETTINGS: dict[str, Any] = {
    "admin_token": SecretStr(TOKEN),
    # Generous budgets: the machine running the tests may be busy; "slow" stand-ins sleep well past them.
    "candidate_timeout_s": 0.5,
    "stable_timeout_s": 2.0,
    "shadow_timeout_s": 1.0,
    "ready_probe_interval_s": 0.05,
    "shadow_drain_timeout_s": 2.0,
    "log_decisions": False,
}


def router_settings(**overrides: Any) -> RouterSettings:
    """The tests' router: with the decision details they read (the router's default is the contract only)."""
    return RouterSettings(**{**BASE_SETTINGS, "expose_decision_details": True, **overrides})


def table(
    stable: StandIn, candidate: StandIn | None, stage: str, weight: float | None = None, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {"stage": stage, "stable": {"version": stable.version, "url": stable.url}, **extra}
    if candidate is not None:
        data["candidate"] = {"version": candidate.version, "url": candidate.url}
    if weight is not None:
        data["candidate_weight"] = weight
    return data


@contextmanager
def running(router: Router) -> Iterator[TestClient]:
    """One in-process client for both of the router's listeners (the public routes and the control routes on one
    app, with the router's lifespan): these tests are about the handlers; which port serves which route is
    tested through the real process (tests/integration/test_router.py)."""
    app = Starlette(routes=[*router.control_routes(), *router.public_routes()], lifespan=router.lifespan)
    with TestClient(app) as client:
        yield client


def apply(client: TestClient, data: dict[str, Any]) -> None:
    response = client.put("/admin/routing", json=data, headers=AUTH)
    assert response.status_code == 200, response.text


def metrics(client: TestClient) -> str:
    return str(client.get("/metrics").text)


# ------------------------------------------------------------------ input validation, readiness


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 45.0, "ipAccounts": 2}, "yearsActive"),
        ({**SEED, "amount": "forty"}, "amount"),
        ({**SEED, "ipAccounts": 0}, "ipAccounts"),
        ({**SEED, "yearsActive": -1}, "yearsActive"),
        ({**SEED, "accountId": ""}, "accountId"),
    ],
)
def test_bad_input_is_a_422_naming_the_field_and_reaches_no_model(
    stable: StandIn, body: dict[str, Any], field: str
) -> None:
    with running(Router(router_settings())) as client:
        apply(client, table(stable, None, "stable"))
        response = client.post(PREDICT, json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"
    assert [d["field"] for d in response.json()["details"]] == [field]
    assert stable.seen == []


def test_malformed_empty_and_oversized_bodies_are_4xx_like_the_model_service(stable: StandIn) -> None:
    with running(Router(router_settings(max_body_bytes=1024))) as client:
        apply(client, table(stable, None, "stable"))
        malformed = client.post(PREDICT, content=b'{"yearsActive": 1.5,', headers={"content-type": "application/json"})
        oversized = client.post(PREDICT, json={**SEED, "itemDescription": "x" * 2000})
        empty = client.post(PREDICT, content=b"")
        text = metrics(client)
    assert (malformed.status_code, malformed.json()["error"]) == (400, "invalid_json")
    assert [d["field"] for d in malformed.json()["details"]] == ["body"]
    assert (oversized.status_code, oversized.json()["error"]) == (413, "payload_too_large")
    assert (empty.status_code, empty.json()["error"]) == (422, "validation_error")
    assert {d["field"] for d in empty.json()["details"]} == {"yearsActive", "amount", "ipAccounts"}
    assert metric_value(text, "fraudwatch_router_responses_total", code="4xx") == 3
    assert stable.seen == []


def test_without_a_table_the_router_is_unready_and_answers_503(stable: StandIn) -> None:
    with running(Router(router_settings())) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        response = client.post(PREDICT, json=SEED)
        assert response.status_code == 503
        assert response.json()["error"] == "no_routing_table"
        apply(client, table(stable, None, "stable"))
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=2.0)


@pytest.mark.parametrize("client_library", ["httpx", "aiohttp"])
def test_not_ready_until_stable_answers(stable: StandIn, client_library: str) -> None:
    stable.mode = "error"
    with running(Router(router_settings(upstream_client=client_library))) as client:
        apply(client, table(stable, None, "stable"))
        time.sleep(0.2)
        assert client.get("/readyz").json()["reason"] == "stable v1 has not answered yet"
        stable.mode = "ok"
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=2.0)


# ------------------------------------------------------------------ admin endpoint


def test_admin_endpoint_requires_the_bearer_token(stable: StandIn, candidate: StandIn) -> None:
    data = table(stable, candidate, "canary", 5, generation=2)
    with running(Router(router_settings())) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            assert client.get("/admin/routing", headers=headers).status_code == 401
            refused = client.put("/admin/routing", json=data, headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/admin/routing", headers=AUTH).status_code == 404
        applied = client.put("/admin/routing", json=data, headers=AUTH)
        assert applied.status_code == 200
        assert applied.json()["result"] == "applied"
        current = client.get("/admin/routing", headers=AUTH).json()
        assert current["source"] == "admin"
        assert RoutingTable.model_validate(current["table"]) == RoutingTable.model_validate(data)
        stale = client.put("/admin/routing", json={**data, "generation": 1}, headers=AUTH)
        assert stale.status_code == 409
        invalid = client.put("/admin/routing", json={**data, "candidate_weight": 150}, headers=AUTH)
        assert invalid.status_code == 422
        assert invalid.json()["details"][0]["field"] == "candidate_weight"
        text = metrics(client)
    assert metric_value(text, "fraudwatch_router_table_updates_total", source="admin", result="applied") == 1
    assert metric_value(text, "fraudwatch_router_table_updates_total", source="admin", result="stale") == 1
    assert metric_value(text, "fraudwatch_router_candidate_weight") == 5
    assert metric_value(text, "fraudwatch_router_routing_generation") == 2


def test_admin_endpoint_without_a_configured_token_refuses_everyone(stable: StandIn) -> None:
    with running(Router(router_settings(admin_token=None))) as client:
        response = client.put("/admin/routing", json=table(stable, None, "stable"), headers=AUTH)
    assert response.status_code == 401
    assert "no token" in response.json()["error"]


# ------------------------------------------------------------------ stages


def test_stable_stage_answers_with_routing_fields_and_propagates_the_correlation_id(stable: StandIn) -> None:
    with running(Router(router_settings())) as client:
        apply(client, table(stable, None, "stable"))
        given = client.post(PREDICT, json=SEED, headers={"X-Correlation-ID": "req-42"})
        generated = client.post(PREDICT, json=SEED)
    body = given.json()
    assert given.status_code == 200
    assert (body["model_version"], body["stage"], body["role"], body["routed_to"]) == (
        "v1",
        "stable",
        "decider",
        "stable",
    )
    assert body["score"] == STABLE_SCORE
    assert given.headers["x-model-version"] == "v1"
    assert given.headers["x-correlation-id"] == "req-42"
    new_id = generated.headers["x-correlation-id"]
    assert new_id != "req-42"
    assert [cid for cid, _ in stable.seen] == ["req-42", new_id]
    assert generated.json()["correlation_id"] == new_id
    # the router's own join key: in the body (spliced into the model's answer) and in X-Prediction-ID, per request
    assert body["prediction_id"] == given.headers["x-prediction-id"] != generated.json()["prediction_id"]


def test_without_decision_details_a_client_sees_only_the_scoring_contract(stable: StandIn, candidate: StandIn) -> None:
    """Issue 11, point 3: score, threshold and the deciding version let a fraudster probe the threshold and tell
    whether the lenient canary decided for an account; a router with default settings answers with the contract only
    (the default used to expose them)."""
    with running(Router(RouterSettings(**BASE_SETTINGS))) as client:  # expose_decision_details left at its default
        apply(client, table(stable, candidate, "canary", 50.0))
        answers = [client.post(PREDICT, json={**SEED, "accountId": f"acct-{i}"}) for i in range(20)]
    assert {a.status_code for a in answers} == {200}
    assert {tuple(sorted(a.json())) for a in answers} == {
        ("confidence", "correlation_id", "decision", "prediction", "prediction_id")
    }
    assert all("x-model-version" not in a.headers for a in answers)
    assert all(a.json()["correlation_id"] == a.headers["x-correlation-id"] for a in answers)
    assert all(a.json()["prediction_id"] == a.headers["x-prediction-id"] for a in answers)
    # both decided, neither shows (stable also scores the candidate's requests in shadow, off the response path)
    assert candidate.seen and len(stable.seen) >= 20 - len(candidate.seen)


@pytest.mark.parametrize(("client_library", "batch_max"), [("httpx", 1), ("aiohttp", 1), ("httpx", 8), ("aiohttp", 8)])
def test_shadow_stage_pairs_answers_and_logs_both_roles(
    stable: StandIn, candidate: StandIn, tmp_path: Path, client_library: str, batch_max: int
) -> None:
    """Single shadow calls (batch max 1) and batched ones (a long linger, so jobs queue up): the same pairs, counts
    and prediction-log rows, each shadow score under its own request's prediction ID (beside its correlation ID)."""
    n = 20
    outcome_settings = OutcomeSettings(dsn=f"sqlite:///{tmp_path / 'predictions.db'}", flush_interval_ms=20)
    settings = router_settings(
        upstream_client=client_library, shadow_batch_max=batch_max, shadow_batch_linger_ms=200.0, shadow_concurrency=1
    )
    registry = CollectorRegistry()
    router = Router(settings, registry=registry, prediction_log=PredictionLog(outcome_settings, registry=registry))
    with running(router) as client:
        apply(client, table(stable, candidate, "shadow"))
        answers = [client.post(PREDICT, json={**SEED, "accountId": f"a{i}"}) for i in range(n)]
        wait_until(lambda: len(candidate.seen) == n, timeout_s=5.0)
        wait_until(lambda: metric_value(metrics(client), "fraudwatch_shadow_agreement_total") == n, timeout_s=5.0)
        text = metrics(client)
    assert {a.json()["model_version"] for a in answers} == {"v1"}
    # v1 scores 0.2 (approve) and v2 scores 0.7 (review) at threshold 0.5: every pair disagrees by +0.5.
    assert metric_value(text, "fraudwatch_shadow_agreement_total", stable="v1", candidate="v2", agree="false") == n
    pairs = metric_value(
        text,
        "fraudwatch_shadow_pairs_total",
        stable="v1",
        candidate="v2",
        stage="shadow",
        stable_prediction="0",
        candidate_prediction="1",
    )
    assert pairs == n
    # the stage's other cells exist at zero from the moment the table was applied
    assert len(metric_labels(text, "fraudwatch_shadow_pairs_total")) == 4
    assert_deltas(text, n)
    assert metric_value(text, "fraudwatch_router_requests_total", model_version="v2", role="shadow", outcome="2xx") == n
    assert (
        metric_value(text, "fraudwatch_router_requests_total", model_version="v1", role="decider", stage="shadow") == n
    )
    rows = logged_rows(outcome_settings)
    assert sorted((r["model_version"], r["role"]) for r in rows) == sorted([("v1", "decider"), ("v2", "shadow")] * n)
    by_cid = {(r["prediction_id"], r["role"]): r for r in rows}
    for answer in answers:
        cid = answer.headers["x-prediction-id"]
        assert by_cid[(cid, "shadow")]["correlation_id"] == answer.headers["x-correlation-id"]
        assert by_cid[(cid, "decider")]["score"] == STABLE_SCORE
        assert by_cid[(cid, "shadow")]["score"] == CANDIDATE_SCORE
        assert by_cid[(cid, "shadow")]["stage"] == "shadow"
        assert by_cid[(cid, "shadow")]["stable_version"] == by_cid[(cid, "decider")]["stable_version"] == "v1"
    assert sorted(str(cid) for cid, _ in candidate.seen) == sorted(a.headers["x-correlation-id"] for a in answers)
    if batch_max == 1:
        assert candidate.batches == []
    else:
        assert sum(candidate.batches) == n
        assert max(candidate.batches) > 1
        assert max(candidate.batches) <= batch_max
        assert metric_value(text, "fraudwatch_router_shadow_batch_size_sum") == n


def assert_deltas(text: str, n: int) -> None:
    """n pairs, each with delta candidate − stable = 0.7 − 0.2 = 0.5: in bucket (0.25, 0.5], summing to n · 0.5."""
    pair = {"stable": "v1", "candidate": "v2"}
    assert metric_value(text, "fraudwatch_shadow_score_delta_bucket", le="0.25", **pair) == 0
    assert metric_value(text, "fraudwatch_shadow_score_delta_bucket", le="0.5", **pair) == n
    sums = {
        side: metric_value(text, "fraudwatch_shadow_paired_score_sum_total", side=side, **pair)
        for side in ("stable", "candidate")
    }
    assert sums["candidate"] - sums["stable"] == pytest.approx(n * (CANDIDATE_SCORE - STABLE_SCORE))


def logged_rows(settings: OutcomeSettings) -> list[dict[str, Any]]:
    engine = create_log_engine(settings)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(select(predictions_table))]
    finally:
        engine.dispose()


@pytest.mark.parametrize("stage", ["canary", "ab"])
def test_split_stages_are_sticky_per_account(stable: StandIn, candidate: StandIn, stage: str) -> None:
    accounts = [f"acct-{i}" for i in range(40)]
    with running(Router(router_settings())) as client:
        apply(client, table(stable, candidate, stage, 50))
        first = {a: client.post(PREDICT, json={**SEED, "accountId": a}).json()["model_version"] for a in accounts}
        again = {a: client.post(PREDICT, json={**SEED, "accountId": a}).json()["model_version"] for a in accounts}
        text = metrics(client)
    assert first == again
    n_candidate = sum(1 for v in first.values() if v == "v2")
    assert 0 < n_candidate < len(accounts)
    counted = metric_value(text, "fraudwatch_router_requests_total", model_version="v2", role="decider", stage=stage)
    assert counted == 2 * n_candidate
    assert len(candidate.seen) == 2 * n_candidate


def test_full_stage_candidate_decides_and_pairs_keep_candidate_minus_stable(
    stable: StandIn, candidate: StandIn
) -> None:
    n = 10
    with running(Router(router_settings())) as client:
        apply(client, table(stable, candidate, "full"))
        answers = [client.post(PREDICT, json=SEED) for _ in range(n)]
        wait_until(lambda: metric_value(metrics(client), "fraudwatch_shadow_agreement_total") == n, timeout_s=5.0)
        text = metrics(client)
    assert {(a.json()["model_version"], a.json()["routed_to"]) for a in answers} == {("v2", "candidate")}
    assert len(stable.seen) == n  # as shadow
    assert_deltas(text, n)


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("client_library", ["httpx", "aiohttp"])
@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("error", "status_5xx"),
        ("slow", "timeout"),
        ("garbage", "invalid_response"),
        ("reject", "status_4xx"),
        ("down", "connect"),
    ],
)
def test_a_failing_deciding_candidate_falls_back_to_stable(
    stable: StandIn, candidate: StandIn, mode: str, reason: str, client_library: str
) -> None:
    n = 5
    data = table(stable, candidate, "full")
    if mode == "down":
        data["candidate"]["url"] = f"http://127.0.0.1:{closed_port()}"
    else:
        candidate.mode = mode  # type: ignore[assignment]
    with running(Router(router_settings(upstream_client=client_library))) as client:
        apply(client, data)
        answers = [client.post(PREDICT, json=SEED) for _ in range(n)]
        text = metrics(client)
    assert {a.status_code for a in answers} == {200}
    assert {(a.json()["model_version"], a.json()["routed_to"], a.json()["fallback_from"]) for a in answers} == {
        ("v1", "stable", "v2")
    }
    assert metric_value(text, "fraudwatch_router_fallback_total", model_version="v2", reason=reason) == n
    assert (
        metric_value(text, "fraudwatch_router_upstream_errors_total", model_version="v2", role="decider", reason=reason)
        == n
    )


@pytest.mark.parametrize("client_library", ["httpx", "aiohttp"])
def test_a_failing_stable_is_a_503_naming_it_and_its_4xx_pass_through(stable: StandIn, client_library: str) -> None:
    with running(Router(router_settings(upstream_client=client_library))) as client:
        apply(client, table(stable, None, "stable"))
        stable.mode = "error"
        failed = client.post(PREDICT, json=SEED)
        stable.mode = "reject"
        refused = client.post(PREDICT, json=SEED)
        text = metrics(client)
    assert failed.status_code == 503
    assert failed.json()["error"] == "model_unavailable"
    assert "stable model version v1 failed (status_5xx)" in failed.json()["details"][0]["message"]
    assert refused.status_code == 422
    assert refused.json()["details"] == [{"field": "amount"}]
    assert metric_value(text, "fraudwatch_router_unavailable_total", reason="stable_status_5xx") == 1


def test_slow_shadow_is_shed_not_waited_for(stable: StandIn, candidate: StandIn) -> None:
    n = 30
    candidate.mode = "slow"
    candidate.slow_s = 0.3
    settings = router_settings(shadow_concurrency=1, shadow_queue_size=2, shadow_drain_timeout_s=0.0)
    router = Router(settings)
    with running(router) as client:
        apply(client, table(stable, candidate, "shadow"))
        answers = [client.post(PREDICT, json=SEED) for _ in range(n)]
        text = metrics(client)
    assert {a.status_code for a in answers} == {200}
    assert metric_value(text, "fraudwatch_shadow_dropped_total", reason="queue_full") > 0
    final = generate_latest(router.registry).decode()
    dropped = sum(
        metric_value(final, "fraudwatch_shadow_dropped_total", reason=r) for r in ("queue_full", "shutdown", "expired")
    )
    completed = metric_value(final, "fraudwatch_router_requests_total", role="shadow")
    # Every shadow job was either made (successfully or not) or dropped and counted: nothing vanished.
    assert dropped + completed == n
    assert metric_value(final, "fraudwatch_shadow_dropped_total", reason="shutdown") > 0


def test_shadow_is_shed_first_under_overload(stable: StandIn, candidate: StandIn) -> None:
    settings = router_settings(shadow_shed_inflight=1)
    router = Router(settings)
    with running(router) as client:
        apply(client, table(stable, candidate, "shadow"))
        router._deciding = 5  # as if five deciding calls were in flight
        response = client.post(PREDICT, json=SEED)
        router._deciding -= 5
        text = metrics(client)
    assert response.status_code == 200
    assert metric_value(text, "fraudwatch_shadow_dropped_total", reason="overload") == 1


# ------------------------------------------------------------------ file source


def test_file_change_takes_effect_within_a_second(stable: StandIn, candidate: StandIn, tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    write_table_file(path, RoutingTable.model_validate(table(stable, candidate, "shadow", generation=1)))
    settings = router_settings(routing_file=path, poll_interval_s=0.2)
    router = Router(settings, sources=[FileTableSource(path, settings.poll_interval_s)])
    with running(router) as client:
        assert client.post(PREDICT, json=SEED).json()["model_version"] == "v1"
        write_table_file(path, RoutingTable.model_validate(table(stable, candidate, "full", generation=2)))
        took = wait_until(lambda: client.post(PREDICT, json=SEED).json()["model_version"] == "v2", timeout_s=1.0)
        path.write_text("stage: [", encoding="utf-8")
        time.sleep(0.5)
        still = client.post(PREDICT, json=SEED).json()["model_version"]
        text = metrics(client)
    assert took < 1.0
    assert still == "v2"
    assert metric_value(text, "fraudwatch_router_table_updates_total", source="file", result="applied") == 2
    assert metric_value(text, "fraudwatch_router_table_updates_total", source="file", result="invalid") == 1


def test_version_endpoint_is_what_the_metrics_name(stable: StandIn) -> None:
    """Series are labelled with the table's version names, so gates and tables agree on names."""
    alias = VersionEndpoint(version="champion-7", url=stable.url)
    with running(Router(router_settings())) as client:
        apply(client, {"stage": "stable", "stable": alias.model_dump()})
        client.post(PREDICT, json=SEED)
        text = metrics(client)
    assert metric_value(text, "fraudwatch_router_requests_total", model_version="champion-7", role="decider") == 1


def test_router_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" from-file\n", encoding="utf-8")
    monkeypatch.setenv("FW_ROLLOUT_ROUTER__CANDIDATE_TIMEOUT_S", "0.3")
    monkeypatch.setenv("FW_ROLLOUT_ROUTER__SHADOW_QUEUE_SIZE", "7")
    monkeypatch.setenv("FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE", str(token_file))
    settings = RolloutSettings().router
    assert (settings.candidate_timeout_s, settings.shadow_queue_size) == (0.3, 7)
    assert settings.admin_secret() == "from-file"


def token_dir(tmp_path: Path, tokens: dict[str, str]) -> Path:
    """A mounted Secret as the kubelet lays it out: one file per key, plus its hidden ``..data`` directory."""
    directory = tmp_path / "feedback-tokens"
    (directory / "..data").mkdir(parents=True)
    for name, token in tokens.items():
        (directory / name).write_text(f"{token}\n", encoding="utf-8")
    return directory


def test_each_label_source_has_a_token_and_the_single_token_is_its_configured_source(tmp_path: Path) -> None:
    directory = token_dir(tmp_path, {"chargeback": "t-cb", "manual-review": "t-mr"})
    settings = RouterSettings(feedback_token=SecretStr("t-single"), feedback_tokens_dir=directory)
    assert settings.feedback_credentials() == {"default": "t-single", "chargeback": "t-cb", "manual-review": "t-mr"}
    named = RouterSettings(feedback_token=SecretStr("t-single"), feedback_source="bank-feed")
    assert named.feedback_credentials() == {"bank-feed": "t-single"}
    assert RouterSettings().feedback_credentials() == {}


@pytest.mark.parametrize(
    ("tokens", "single", "complaint"),
    [
        ({"chargeback": "same", "review": "same"}, None, "share one token"),
        ({"chargeback": "t-cb"}, "t-cb", "share one token"),
        ({"default": "t-d"}, "t-single", "'default' has a token"),
        ({"chargeback": "  "}, None, "is empty"),
        ({"bad name": "t"}, None, "label source's name"),
        ({"x" * 65: "t"}, None, "label source's name"),
    ],
)
def test_inconsistent_label_source_tokens_keep_the_router_from_starting(
    tmp_path: Path, tokens: dict[str, str], single: str | None, complaint: str
) -> None:
    router = RouterSettings(
        feedback_token=SecretStr(single) if single else None, feedback_tokens_dir=token_dir(tmp_path, tokens)
    )
    with pytest.raises(FeedbackTokenMissingError, match=complaint):
        create_apps(RolloutSettings(router=router))


def test_a_missing_token_directory_keeps_the_router_from_starting(tmp_path: Path) -> None:
    router = RouterSettings(feedback_token=SecretStr("t"), feedback_tokens_dir=tmp_path / "absent")
    with pytest.raises(FeedbackTokenMissingError, match="not a directory"):
        create_apps(RolloutSettings(router=router))
