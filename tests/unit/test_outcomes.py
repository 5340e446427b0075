"""Feedback endpoint and outcome metrics on a real (embedded, file-backed) SQLite prediction log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from starlette.applications import Starlette

from rollout.core.drift import calibration_bin_of
from rollout.core.routing import RoutePlan, RoutingTable
from rollout.router.outcomes.feedback import (
    FEEDBACK_BATCH_PATH,
    FEEDBACK_PATH,
    OutcomeTracker,
    bin_edges,
    confusion_cell,
    paired_predictions,
    score_bin,
)
from rollout.router.outcomes.prediction_log import PredictionLog, PredictionRecord
from rollout.router.outcomes.settings import OutcomeSettings
from service.common.processes import free_port

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
TOKEN = "label-feed-token"
#: The label source TOKEN authenticates, and a second source with its own token.
SOURCE = "chargeback"
FLOOD_TOKEN = "flood-feed-token"
FLOOD_AUTH = {"Authorization": f"Bearer {FLOOD_TOKEN}"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Harness:
    """A prediction log + tracker behind a Starlette app, with a client and the metric registry."""

    def __init__(self, log: PredictionLog, tracker: OutcomeTracker, client: httpx.AsyncClient, reg: CollectorRegistry):
        self.log = log
        self.tracker = tracker
        self.client = client
        self.registry = reg

    async def feedback(self, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **AUTH}
        return await self.client.post(FEEDBACK_PATH, content=content, headers=headers)

    async def batch(self, labels: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post(FEEDBACK_BATCH_PATH, json={"labels": labels}, headers=AUTH | (headers or {}))

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def outcome(self, version: str, role: str, cell: str, stage: str = "shadow") -> float:
        """``fraudwatch_outcome_total`` of a (version, role, prediction stage, cell)."""
        return self.value("fraudwatch_outcome_total", model_version=version, role=role, stage=stage, outcome=cell)


def _settings(tmp_path: Path, **overrides: Any) -> OutcomeSettings:
    return OutcomeSettings(dsn=f"sqlite:///{tmp_path / 'log.db'}", **overrides)


def run_with(tmp_path: Path, scenario: Callable[[Harness], Awaitable[None]], **overrides: Any) -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        settings = _settings(tmp_path, **overrides)
        log = PredictionLog(settings, registry=registry)
        await log.start()
        tracker = OutcomeTracker(log, registry=registry, tokens={SOURCE: TOKEN, "flood": FLOOD_TOKEN})
        app = Starlette(routes=tracker.routes())
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://fraudwatch.test") as client:
                await scenario(Harness(log, tracker, client, registry))
        finally:
            await log.close()

    asyncio.run(main())


def _pred(cid: str, version: str, role: str, score: float, threshold: float = 0.5, hours: float = 0.0) -> Any:
    return PredictionRecord(
        prediction_id=cid,
        entity_key="acct-1",
        ts=T0 + timedelta(hours=hours),
        model_version=version,
        role=role,  # type: ignore[arg-type]
        score=score,
        prediction=int(score >= threshold),
        threshold=threshold,
        stage="shadow",
    )


@pytest.mark.parametrize(("prediction", "label", "cell"), [(1, 1, "tp"), (1, 0, "fp"), (0, 0, "tn"), (0, 1, "fn")])
def test_confusion_cell(prediction: int, label: int, cell: str) -> None:
    assert confusion_cell(prediction, label) == cell


def test_join_updates_outcomes_of_decider_and_shadow_at_their_own_thresholds(tmp_path: Path) -> None:
    observed = T0 + timedelta(days=3)

    async def scenario(h: Harness) -> None:
        # The decider flags at its threshold 0.5; the shadow, with threshold 0.7, lets the same request through.
        h.log.record(_pred("c-1", "v1", "decider", score=0.62, threshold=0.5))
        h.log.record(_pred("c-1", "v2", "shadow", score=0.66, threshold=0.7))
        await h.log.flush()
        response = await h.feedback(
            {"prediction_id": "c-1", "label": "fraud", "source": "chargeback", "observed_at": observed.isoformat()}
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "recorded", "prediction_id": "c-1", "label": "fraud", "predictions": 2}

        assert h.outcome("v1", "decider", "tp") == 1
        assert h.outcome("v2", "shadow", "fn") == 1
        assert h.outcome("v2", "shadow", "tp") == 0
        # score histograms split by label; 0.62 lies in (0.6, 0.65]
        assert (
            h.value(
                "fraudwatch_outcome_score_bucket",
                model_version="v1",
                role="decider",
                stage="shadow",
                label="fraud",
                le="0.6",
            )
            == 0
        )
        assert (
            h.value(
                "fraudwatch_outcome_score_bucket",
                model_version="v1",
                role="decider",
                stage="shadow",
                label="fraud",
                le="0.65",
            )
            == 1
        )
        assert (
            h.value("fraudwatch_outcome_score_sum", model_version="v2", role="shadow", stage="shadow", label="fraud")
            == 0.66
        )
        # calibration: the bin holds the score sum, the count and the observed fraud
        cal_bin = str(calibration_bin_of(0.62, h.log.settings.calibration_bins))
        labels = {"model_version": "v1", "role": "decider", "stage": "shadow", "bin": cal_bin}
        assert h.value("fraudwatch_calibration_predicted_sum", **labels) == pytest.approx(0.62)
        assert h.value("fraudwatch_calibration_predicted_count", **labels) == 1
        assert h.value("fraudwatch_calibration_observed_fraud_total", **labels) == 1
        # the label delay is observed_at − prediction ts = 72 h
        assert (
            h.value("fraudwatch_label_delay_seconds_sum", model_version="v1", role="decider", stage="shadow")
            == 72 * 3600
        )
        assert h.value("fraudwatch_feedback_total", result="recorded") == 1

    run_with(tmp_path, scenario)


def test_legit_label_counts_false_positive_and_true_negative(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-2", "v1", "decider", score=0.9))
        h.log.record(_pred("c-2", "v2", "shadow", score=0.1))
        response = await h.feedback({"prediction_id": "c-2", "label": 0})
        assert response.status_code == 200, response.text
        assert h.outcome("v1", "decider", "fp") == 1
        assert h.outcome("v2", "shadow", "tn") == 1
        labels = {"model_version": "v2", "role": "shadow", "stage": "shadow", "bin": "1"}
        assert h.value("fraudwatch_calibration_observed_fraud_total", **labels) == 0
        assert h.value("fraudwatch_calibration_predicted_count", **labels) == 1

    run_with(tmp_path, scenario)


def test_prediction_still_in_the_write_buffer_is_found(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-buffered", "v1", "decider", score=0.8))
        assert h.log.pending == 1  # the writer sleeps for a minute: the row is only in memory
        response = await h.feedback({"prediction_id": "c-buffered", "label": "fraud", "source": "chargeback"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == 1
        assert h.outcome("v1", "decider", "tp") == 1

    run_with(tmp_path, scenario, flush_interval_ms=60_000)


def test_same_label_twice_is_counted_once_and_a_conflicting_label_is_refused(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-3", "v1", "decider", score=0.7))
        first = await h.feedback({"prediction_id": "c-3", "label": "fraud", "source": "chargeback"})
        again = await h.feedback({"prediction_id": "c-3", "label": 1})
        other = await h.feedback({"prediction_id": "c-3", "label": "legit"})
        assert (first.status_code, again.status_code, other.status_code) == (200, 200, 409)
        assert again.json()["status"] == "duplicate"
        conflict = other.json()
        assert "a different label is already recorded" in conflict["error"]
        text = json.dumps(conflict)  # nothing of the stored label: not its verdict, source or time
        assert "fraud" not in text and "chargeback" not in text and re.search(r"\d{4}-\d{2}-\d{2}T", text) is None
        assert conflict["details"][0]["field"] == "label"
        # nothing about the stored label leaks: not its verdict, its source or its time
        for secret in ("fraud", "chargeback", "manual", str(T0.year)):
            assert secret not in other.text
        assert h.outcome("v1", "decider", "tp") == 1
        assert h.outcome("v1", "decider", "fp") == 0
        assert h.value("fraudwatch_feedback_total", result="duplicate") == 1
        assert h.value("fraudwatch_feedback_total", result="conflict") == 1

    run_with(tmp_path, scenario)


def test_concurrent_identical_labels_are_counted_once(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-race", "v1", "decider", score=0.7))
        await h.log.flush()
        body = {"prediction_id": "c-race", "label": "fraud", "source": "chargeback"}
        responses = await asyncio.gather(*(h.feedback(body) for _ in range(8)))
        assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * 7 + ["recorded"]
        assert h.outcome("v1", "decider", "tp") == 1

    run_with(tmp_path, scenario)


def test_unknown_prediction_id_is_404_with_a_clear_message(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        response = await h.feedback({"prediction_id": "nope", "label": "fraud", "source": "chargeback"})
        assert response.status_code == 404
        body = response.json()
        assert "unknown prediction_id 'nope'" in body["error"]
        assert body["details"][0]["field"] == "prediction_id"
        assert h.value("fraudwatch_feedback_total", result="unknown") == 1

    run_with(tmp_path, scenario)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"label": "fraud"}, "prediction_id"),
        # a feed still citing the client's correlation ID is refused, not joined on it
        ({"correlation_id": "c", "label": "fraud"}, "prediction_id"),
        ({"prediction_id": "c"}, "label"),
        ({"prediction_id": "c", "label": "maybe"}, "label"),
        ({"prediction_id": "c", "label": True}, "label"),
        ({"prediction_id": "c", "label": 2}, "label"),
        ({"prediction_id": "c", "label": "fraud", "source": "s" * 65}, "source"),
        ({"prediction_id": "c", "label": "fraud", "source": ""}, "source"),
        ({"prediction_id": "c", "label": "fraud", "observed_at": "2024-03-01T10:00:00"}, "observed_at"),
        ({"prediction_id": "c", "label": "fraud", "observed_at": "yesterday"}, "observed_at"),
        ({"prediction_id": "c" * 200, "label": "fraud"}, "prediction_id"),
    ],
)
def test_invalid_feedback_is_422_naming_the_field(tmp_path: Path, body: dict[str, Any], field: str) -> None:
    async def scenario(h: Harness) -> None:
        response = await h.feedback(body)
        assert response.status_code == 422, response.text
        payload = response.json()
        assert [d["field"] for d in payload["details"]] == [field]
        assert field in payload["error"]
        assert h.value("fraudwatch_feedback_total", result="invalid") == 1

    run_with(tmp_path, scenario)


def test_malformed_and_oversized_bodies(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        not_json = await h.feedback(b"{label: fraud")
        assert not_json.status_code == 400
        assert not_json.json()["details"][0]["field"] == "body"
        not_object = await h.feedback([1, 2])
        assert not_object.status_code == 422
        big = await h.feedback({"prediction_id": "c", "label": "fraud", "source": "x" * 2000})
        assert big.status_code == 413

    run_with(tmp_path, scenario, max_body_bytes=1024)


def test_deeply_nested_json_is_400_not_a_recursion_error_500(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        for body in (b"[" * 4000, b"[" * 200_000 + b"]" * 200_000, b'{"labels":' + b"[" * 50_000):
            single = await h.feedback(body)
            assert single.status_code in (400, 413), single.text
            batch = await h.client.post(FEEDBACK_BATCH_PATH, content=body, headers=AUTH)
            assert batch.status_code == 400, batch.text

    run_with(tmp_path, scenario, max_body_bytes=1_000_000)


def test_an_oversized_body_without_content_length_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    sent: list[int] = []

    async def chunks() -> Any:
        for _ in range(1000):  # 64 MiB if it were read whole
            sent.append(1)
            yield b" " * 65_536

    async def scenario(h: Harness) -> None:
        response = await h.client.post(FEEDBACK_PATH, content=chunks(), headers=AUTH)
        assert response.status_code == 413
        assert len(sent) < 10  # the read stopped at the limit (16 KiB + one chunk), not after 64 MiB

    run_with(tmp_path, scenario)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic " + TOKEN, TOKEN, "Bearer "])
def test_a_label_without_the_right_bearer_token_is_401_and_counts_nothing(
    tmp_path: Path, authorization: str | None
) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-auth", "v1", "decider", score=0.7))
        headers = {} if authorization is None else {"Authorization": authorization}
        body = {"prediction_id": "c-auth", "label": "fraud", "source": "attacker"}
        single = await h.client.post(FEEDBACK_PATH, json=body, headers=headers)
        batch = await h.client.post(FEEDBACK_BATCH_PATH, json={"labels": [body]}, headers=headers)
        assert (single.status_code, batch.status_code) == (401, 401)
        assert "c-auth" not in single.text + batch.text
        assert h.outcome("v1", "decider", "tp") == 0
        assert h.value("fraudwatch_feedback_total", result="unauthorized") == 2

    run_with(tmp_path, scenario)


def test_a_tracker_without_a_token_refuses_every_label_unless_insecure_dev(tmp_path: Path) -> None:
    async def main() -> None:
        log = PredictionLog(_settings(tmp_path), registry=CollectorRegistry())
        await log.start()
        log.record(_pred("c-dev", "v1", "decider", score=0.7))
        body = {"prediction_id": "c-dev", "label": "fraud"}
        try:
            for insecure, expected in ((False, 401), (True, 200)):
                tracker = OutcomeTracker(log, registry=CollectorRegistry(), insecure_dev=insecure)
                app = Starlette(routes=tracker.routes())
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                    assert (await client.post(FEEDBACK_PATH, json=body)).status_code == expected
        finally:
            await log.close()

    asyncio.run(main())


def test_a_batch_answers_each_label_on_its_own_and_a_retry_counts_nothing_twice(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("b-1", "v1", "decider", score=0.7))
        h.log.record(_pred("b-2", "v1", "decider", score=0.2))
        labels = [
            {"prediction_id": "b-1", "label": "fraud", "source": "chargeback"},
            {"prediction_id": "b-2", "label": "legit", "source": "chargeback"},
            {"prediction_id": "b-unknown", "label": "legit", "source": "chargeback"},
            {"prediction_id": "b-1", "label": "maybe", "source": "chargeback"},
            [1, 2],
        ]
        first = await h.batch(labels)
        assert first.status_code == 200, first.text
        assert [r["status"] for r in first.json()["results"]] == [
            "recorded",
            "recorded",
            "unknown",
            "invalid",
            "invalid",
        ]
        assert first.json()["results"][3]["fields"] == ["label"]
        retry = await h.batch(labels)
        assert [r["status"] for r in retry.json()["results"]] == [
            "duplicate",
            "duplicate",
            "unknown",
            "invalid",
            "invalid",
        ]
        assert h.outcome("v1", "decider", "tp") == 1
        assert h.outcome("v1", "decider", "tn") == 1
        bad: object
        for bad in ({"labels": []}, {"labels": "x"}, {"nope": 1}, [1]):
            response = await h.client.post(FEEDBACK_BATCH_PATH, json=bad, headers=AUTH)
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["details"][0]["field"] == "labels"
        too_many = await h.batch([labels[0]] * 11)
        assert too_many.status_code == 422

    run_with(tmp_path, scenario, max_batch_labels=10)


def test_each_source_has_its_own_quota_keyed_on_its_token_not_on_the_body(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        for i in range(4):
            h.log.record(_pred(f"q-{i}", "v1", "decider", score=0.7))
        flood = [
            (await h.client.post(FEEDBACK_PATH, json={"prediction_id": f"q-{i}", "label": 1}, headers=FLOOD_AUTH))
            for i in range(3)
        ]
        assert [r.status_code for r in flood] == [200, 200, 429]
        assert flood[2].json()["details"][0]["field"] == "source"
        # the flooding source cannot spend another's quota by naming it: that is refused, not counted
        disguised = {"prediction_id": "q-2", "label": 1, "source": SOURCE}
        assert (await h.client.post(FEEDBACK_PATH, json=disguised, headers=FLOOD_AUTH)).status_code == 403
        other = await h.feedback({"prediction_id": "q-3", "label": "fraud", "source": SOURCE})
        assert other.status_code == 200
        batch = await h.batch([{"prediction_id": "q-2", "label": "fraud"}], headers=FLOOD_AUTH)
        assert batch.json()["results"][0]["status"] == "over_quota"
        assert h.outcome("v1", "decider", "tp") == 3

    run_with(tmp_path, scenario, feedback_quota_per_minute=2)


def test_a_label_is_stored_under_the_source_its_token_authenticates(tmp_path: Path) -> None:
    """Issue 11: the body's ``source`` was unauthenticated (quotas and the stored label trusted it). A body naming
    another source than its token's is a 403 naming ``source`` (a batch item: ``forbidden``) and counts nothing; a
    body without one is stored under the token's source."""

    async def scenario(h: Harness) -> None:
        for pid in ("a-1", "a-2", "a-3"):
            h.log.record(_pred(pid, "v1", "decider", score=0.7))
        await h.log.flush()
        impostor = {"prediction_id": "a-1", "label": "legit", "source": SOURCE}
        refused = await h.client.post(FEEDBACK_PATH, json=impostor, headers=FLOOD_AUTH)
        assert refused.status_code == 403, refused.text
        assert refused.json()["details"][0]["field"] == "source"
        batch = await h.batch([impostor, {"prediction_id": "a-2", "label": "fraud"}], headers=FLOOD_AUTH)
        assert [r["status"] for r in batch.json()["results"]] == ["forbidden", "recorded"]
        assert batch.json()["results"][0]["fields"] == ["source"]
        own = await h.feedback({"prediction_id": "a-3", "label": "fraud", "source": SOURCE})
        assert own.status_code == 200
        assert h.outcome("v1", "decider", "fp") + h.outcome("v1", "decider", "tn") == 0  # the impostor's "legit"
        assert h.value("fraudwatch_feedback_total", result="forbidden") == 2

    run_with(tmp_path, scenario)
    with sqlite3.connect(tmp_path / "log.db") as conn:
        stored = dict(conn.execute("SELECT prediction_id, source FROM labels").fetchall())
    assert stored == {"a-2": "flood", "a-3": SOURCE}


def test_label_spellings_are_accepted(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        for i, label in enumerate(["FRAUD", " legit ", 1, 0]):
            h.log.record(_pred(f"s-{i}", "v1", "decider", score=0.2))
            response = await h.feedback({"prediction_id": f"s-{i}", "label": label})
            assert response.status_code == 200, response.text
        assert h.outcome("v1", "decider", "fn") == 2
        assert h.outcome("v1", "decider", "tn") == 2

    run_with(tmp_path, scenario)


def test_prepare_creates_every_outcome_series_at_zero(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.tracker.prepare("v9", "shadow", "shadow")
        for cell in ("tp", "fp", "tn", "fn"):
            assert (
                h.registry.get_sample_value(
                    "fraudwatch_outcome_total",
                    {"model_version": "v9", "role": "shadow", "stage": "shadow", "outcome": cell},
                )
                == 0
            )
        for label in ("fraud", "legit"):
            labels = {"model_version": "v9", "role": "shadow", "stage": "shadow", "label": label}
            assert h.registry.get_sample_value("fraudwatch_outcome_score_count", labels) == 0
        last_bin = str(h.log.settings.calibration_bins - 1)
        labels = {"model_version": "v9", "role": "shadow", "stage": "shadow", "bin": last_bin}
        assert h.registry.get_sample_value("fraudwatch_calibration_predicted_count", labels) == 0
        assert h.registry.get_sample_value("fraudwatch_calibration_observed_fraud_total", labels) == 0

    run_with(tmp_path, scenario)


def test_feedback_is_503_when_the_prediction_log_database_is_down() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        port = free_port("127.0.0.1")  # nothing listens there: a real connection refusal
        settings = OutcomeSettings(dsn=f"postgresql+psycopg://fraudwatch@127.0.0.1:{port}/predictions")
        log = PredictionLog(settings, registry=registry)
        app = Starlette(routes=OutcomeTracker(log, registry=registry, tokens={SOURCE: TOKEN}).routes())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"prediction_id": "c", "label": 1}
            response = await client.post(FEEDBACK_PATH, json=body, headers=AUTH)
        assert response.status_code == 503
        assert "unavailable" in response.json()["error"]
        assert registry.get_sample_value("fraudwatch_feedback_total", {"result": "unavailable"}) == 1
        await asyncio.to_thread(log.engine.dispose)

    asyncio.run(main())


def test_malformed_records_are_rejected_and_the_rest_written(tmp_path: Path) -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        log = PredictionLog(_settings(tmp_path), registry=registry)
        log.record(_pred("ok-1", "v1", "decider", score=0.3))
        log.record(dataclasses.replace(_pred("bad", "v1", "decider", score=0.3), score="not a number"))
        log.record(_pred("ok-2", "v1", "decider", score=0.4))
        await log.close()  # never started: close creates the tables and writes what was recorded
        assert registry.get_sample_value("fraudwatch_prediction_log_written_total") == 2
        assert registry.get_sample_value("fraudwatch_prediction_log_dropped_total", {"reason": "rejected"}) == 1
        reopened = PredictionLog(_settings(tmp_path), registry=CollectorRegistry())
        assert [r.prediction_id for r in await reopened.find("ok-2")] == ["ok-2"]
        assert await reopened.find("bad") == []
        await reopened.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------- stage, pairs


def _rec(
    cid: str, version: str, role: str, score: float, stage: str, stable: str | None, threshold: float = 0.5
) -> PredictionRecord:
    record: PredictionRecord = _pred(cid, version, role, score, threshold)
    return dataclasses.replace(record, stage=stage, stable_version=stable)


def _paired(h: Harness, stable: str, candidate: str, stage: str, label: str, sp: str, cp: str) -> float:
    return h.value(
        "fraudwatch_outcome_paired_total",
        stable=stable, candidate=candidate, stage=stage, label=label, stable_prediction=sp, candidate_prediction=cp,
    )  # fmt: skip


def test_outcomes_count_under_the_stage_of_the_prediction_not_of_the_label(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        # predicted in canary; by the time the label arrives the rollout is in ab (it does not matter)
        h.log.record(_rec("c-s", "v2", "decider", 0.9, "canary", "v1"))
        h.log.record(_rec("c-t", "v1", "decider", 0.1, "ab", "v1"))
        assert (await h.feedback({"prediction_id": "c-s", "label": "fraud"})).status_code == 200
        assert (await h.feedback({"prediction_id": "c-t", "label": "fraud"})).status_code == 200
        assert h.outcome("v2", "decider", "tp", stage="canary") == 1
        assert h.outcome("v2", "decider", "tp", stage="ab") == 0
        assert h.outcome("v1", "decider", "fn", stage="ab") == 1
        for name, labels in (
            ("fraudwatch_outcome_score_count", {"label": "fraud"}),
            ("fraudwatch_calibration_predicted_count", {"bin": "9"}),
            ("fraudwatch_label_delay_seconds_count", {}),
        ):
            assert h.value(name, model_version="v2", role="decider", stage="canary", **labels) == 1, name
            assert h.value(name, model_version="v2", role="decider", stage="ab", **labels) == 0, name

    run_with(tmp_path, scenario)


def test_a_labelled_request_both_versions_scored_counts_once_in_the_paired_tables(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        # shadow stage: v1 (stable) decides and flags, v2 shadows and misses; both scores in the bin (0.6, 0.7]
        h.log.record(_rec("c-p", "v1", "decider", 0.62, "shadow", "v1", threshold=0.5))
        h.log.record(_rec("c-p", "v2", "shadow", 0.66, "shadow", "v1", threshold=0.7))
        # a request only one version scored (its shadow answer never came) is not paired
        h.log.record(_rec("c-q", "v1", "decider", 0.3, "shadow", "v1"))
        await h.log.flush()
        for cid in ("c-p", "c-q"):
            assert (await h.feedback({"prediction_id": cid, "label": "fraud"})).status_code == 200
        assert _paired(h, "v1", "v2", "shadow", "fraud", "1", "0") == 1
        cells = [
            _paired(h, "v1", "v2", "shadow", label, sp, cp)
            for label in ("fraud", "legit") for sp in "01" for cp in "01"
        ]  # fmt: skip
        assert sum(cells) == 1
        score = {"stable": "v1", "candidate": "v2", "stage": "shadow", "label": "fraud"}
        assert h.value("fraudwatch_outcome_paired_score_total", **score, stable_le="0.7", candidate_le="0.7") == 1
        assert h.value("fraudwatch_outcome_paired_score_total", **score, stable_le="0.6", candidate_le="0.7") == 0
        # the same label again is a duplicate: nothing is counted twice
        again = await h.feedback({"prediction_id": "c-p", "label": "fraud"})
        assert again.json()["status"] == "duplicate"
        assert _paired(h, "v1", "v2", "shadow", "fraud", "1", "0") == 1

    run_with(tmp_path, scenario)


def test_pair_sides_follow_the_table_stable_at_prediction_time(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        # full: the candidate v2 decides, the old stable v1 shadows → stable = the shadow
        h.log.record(_rec("c-f", "v2", "decider", 0.9, "full", "v1"))
        h.log.record(_rec("c-f", "v1", "shadow", 0.2, "full", "v1"))
        # canary with v1 as an explicit shadow of the deciding candidate: stable is still v1
        h.log.record(_rec("c-c", "v2", "decider", 0.2, "canary", "v1"))
        h.log.record(_rec("c-c", "v1", "shadow", 0.9, "canary", "v1"))
        # a row from before the stable_version column: in full the shadow is taken to be the stable
        h.log.record(_rec("c-o", "v2", "decider", 0.9, "full", None))
        h.log.record(_rec("c-o", "v1", "shadow", 0.9, "full", None))
        for cid in ("c-f", "c-c", "c-o"):
            assert (await h.feedback({"prediction_id": cid, "label": "legit"})).status_code == 200
        assert _paired(h, "v1", "v2", "full", "legit", "0", "1") == 1
        assert _paired(h, "v1", "v2", "canary", "legit", "1", "0") == 1
        assert _paired(h, "v1", "v2", "full", "legit", "1", "1") == 1
        assert _paired(h, "v2", "v1", "full", "legit", "1", "0") == 0

    run_with(tmp_path, scenario)


def test_paired_predictions_is_empty_without_a_decider_and_skips_other_stages() -> None:
    shadow_only = [_rec("c", "v2", "shadow", 0.5, "shadow", "v1")]
    assert paired_predictions(shadow_only) == []
    mixed = [_rec("c", "v1", "decider", 0.5, "shadow", "v1"), _rec("c", "v2", "shadow", 0.5, "canary", "v1")]
    assert paired_predictions(mixed) == []


@pytest.mark.parametrize(
    ("score", "edge"), [(0.0, "0.005"), (0.005, "0.005"), (0.0051, "0.01"), (0.5, "0.5"), (1.0, "1.0"), (1.5, "+Inf")]
)
def test_score_bin_is_the_smallest_upper_edge_at_or_above_the_score(score: float, edge: str) -> None:
    buckets = OutcomeSettings().paired_score_buckets
    assert score_bin(score, buckets) == edge
    assert edge in bin_edges(buckets)


def test_paired_bin_edges_spell_le_as_the_outcome_histogram_does(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.tracker.prepare("v1", "decider", "shadow")
        histogram_les = {
            sample.labels["le"]
            for metric in h.registry.collect()
            if metric.name == "fraudwatch_outcome_score"
            for sample in metric.samples
            if sample.name.endswith("_bucket")
        }
        assert set(bin_edges(h.log.settings.paired_score_buckets)) <= histogram_les

    run_with(tmp_path, scenario)


def test_paired_buckets_must_be_outcome_buckets() -> None:
    with pytest.raises(ValidationError, match="subset of score_buckets"):
        OutcomeSettings(paired_score_buckets=(0.33, 1.0))


def test_a_routing_table_creates_its_stage_series_at_zero(tmp_path: Path) -> None:
    table = RoutingTable.model_validate(
        {
            "generation": 3,
            "stage": "shadow",
            "stable": {"version": "v1", "url": "http://127.0.0.1:1"},
            "candidate": {"version": "v2", "url": "http://127.0.0.1:2"},
        }
    )

    async def scenario(h: Harness) -> None:
        h.tracker.table_applied(RoutePlan.compile(table), "test")
        outcome = {"stage": "shadow", "outcome": "tp"}
        assert h.registry.get_sample_value("fraudwatch_outcome_total", {"model_version": "v1", "role": "decider",
                                                                         **outcome}) == 0  # fmt: skip
        assert h.registry.get_sample_value("fraudwatch_outcome_total", {"model_version": "v2", "role": "shadow",
                                                                         **outcome}) == 0  # fmt: skip
        paired = [
            s for m in h.registry.collect() if m.name == "fraudwatch_outcome_paired" for s in m.samples
            if s.name.endswith("_total")
        ]  # fmt: skip
        assert len(paired) == 8
        assert {(s.labels["stable"], s.labels["candidate"], s.labels["stage"]) for s in paired} == {
            ("v1", "v2", "shadow")
        }
        cells = [
            s for m in h.registry.collect() if m.name == "fraudwatch_outcome_paired_score" for s in m.samples
            if s.name.endswith("_total")
        ]  # fmt: skip
        assert cells == []  # created when first counted: thousands of zero series would bloat every scrape
        assert all(s.value == 0 for s in paired)

    run_with(tmp_path, scenario)


def test_an_old_prediction_log_is_migrated_to_router_issued_prediction_ids(tmp_path: Path) -> None:
    """The schema of a release that joined on the client's correlation ID and had no stable_version column: its
    join key becomes ``prediction_id`` in place (old labels keep joining their old predictions), the tracing
    column and the stable version are added, and the old index is replaced."""
    path = tmp_path / "log.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, correlation_id VARCHAR NOT NULL, "
            "entity_key VARCHAR, ts DATETIME NOT NULL, model_version VARCHAR NOT NULL, role VARCHAR NOT NULL, "
            "score FLOAT NOT NULL, prediction SMALLINT NOT NULL, threshold FLOAT NOT NULL, stage VARCHAR NOT NULL)"
        )
        conn.execute("CREATE INDEX ix_predictions_correlation_id ON predictions (correlation_id)")
        conn.execute(
            "CREATE TABLE labels (correlation_id VARCHAR PRIMARY KEY, label SMALLINT NOT NULL, source VARCHAR NOT NULL,"
            " observed_at DATETIME NOT NULL, received_at DATETIME NOT NULL)"
        )
        conn.execute(
            "INSERT INTO predictions (correlation_id, ts, model_version, role, score, prediction, threshold, stage) "
            "VALUES ('old', '2024-03-01 12:00:00', 'v1', 'decider', 0.9, 1, 0.5, 'full'), "
            "('old-unlabelled', '2024-03-01 12:00:00', 'v1', 'decider', 0.2, 0, 0.5, 'full')"
        )
        conn.execute("INSERT INTO labels VALUES ('old', 1, 'chargeback', '2024-03-02 00:00:00', '2024-03-02 00:00:00')")

    async def scenario(h: Harness) -> None:
        (old,) = await h.log.find("old")
        assert (old.prediction_id, old.correlation_id, old.stable_version, old.stage) == ("old", None, None, "full")
        again = await h.feedback({"prediction_id": "old", "label": "legit"})
        assert again.status_code == 409  # the old label still stands for its old prediction
        assert (await h.feedback({"prediction_id": "old-unlabelled", "label": 0})).status_code == 200
        h.log.record(dataclasses.replace(_rec("new", "v1", "decider", 0.1, "shadow", "v1"), correlation_id="trace"))
        await h.log.flush()
        (new,) = await h.log.find("new")
        assert (new.stable_version, new.correlation_id) == ("v1", "trace")

    run_with(tmp_path, scenario)
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(predictions)")]
        label_columns = [row[1] for row in conn.execute("PRAGMA table_info(labels)")]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(predictions)")}
    assert columns[1] == "prediction_id" and columns[-2:] == ["stable_version", "correlation_id"]
    assert label_columns[0] == "prediction_id"
    assert indexes == {"ix_predictions_prediction_id"}


def test_the_dsn_is_read_from_a_mounted_secret_file_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart mounts the prediction-log Secret as a file (FW_ROLLOUT_OUTCOMES__DSN_FILE): the DSN and its password
    are in no environment variable and no settings repr, and the log writes to the database the file names."""
    database = tmp_path / "from-secret.db"
    secret = tmp_path / "dsn"
    secret.write_text(f"sqlite:///{database}\n", encoding="utf-8")
    monkeypatch.setenv("FW_ROLLOUT_OUTCOMES__DSN_FILE", str(secret))

    settings = OutcomeSettings()
    log = PredictionLog(settings, registry=CollectorRegistry())
    log.record(_pred("p-1", "v1", "decider", 0.9))
    asyncio.run(log.close())

    assert settings.database_url() == f"sqlite:///{database}"
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT prediction_id FROM predictions").fetchall() == [("p-1",)]
    with_password = OutcomeSettings(dsn="postgresql+psycopg://fw:hunter2@db:5432/fw", dsn_file=None)
    assert "hunter2" not in repr(with_password) and "hunter2" in with_password.database_url()
    assert OutcomeSettings(dsn_file=None).database_url() == "sqlite:///var/predictions.db"
    with pytest.raises(ValidationError, match="dsn or dsn_file"):
        OutcomeSettings(dsn="sqlite://")  # the env's dsn_file and an inline dsn: which database is meant?
