"""Feedback endpoint and outcome metrics on a real (embedded, file-backed) SQLite prediction log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from rollout.drift import calibration_bin_of
from rollout.outcome_settings import OutcomeSettings
from rollout.outcomes import (
    FEEDBACK_PATH,
    OutcomeTracker,
    PredictionLog,
    PredictionRecord,
    confusion_cell,
)
from rollout.prometheus import free_port

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


class Harness:
    """A prediction log + tracker behind a Starlette app, with a client and the metric registry."""

    def __init__(self, log: PredictionLog, tracker: OutcomeTracker, client: httpx.AsyncClient, reg: CollectorRegistry):
        self.log = log
        self.tracker = tracker
        self.client = client
        self.registry = reg

    async def feedback(self, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(FEEDBACK_PATH, content=content, headers={"content-type": "application/json"})

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def _settings(tmp_path: Path, **overrides: Any) -> OutcomeSettings:
    return OutcomeSettings(dsn=f"sqlite:///{tmp_path / 'log.db'}", **overrides)


def run_with(tmp_path: Path, scenario: Callable[[Harness], Awaitable[None]], **overrides: Any) -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        settings = _settings(tmp_path, **overrides)
        log = PredictionLog(settings, registry=registry)
        await log.start()
        tracker = OutcomeTracker(log, registry=registry)
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
        correlation_id=cid,
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
            {"correlation_id": "c-1", "label": "fraud", "source": "chargeback", "observed_at": observed.isoformat()}
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "recorded", "correlation_id": "c-1", "label": "fraud", "predictions": 2}

        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="tp") == 1
        assert h.value("fraudwatch_outcome_total", model_version="v2", role="shadow", outcome="fn") == 1
        assert h.value("fraudwatch_outcome_total", model_version="v2", role="shadow", outcome="tp") == 0
        # score histograms split by label; 0.62 lies in (0.6, 0.65]
        assert (
            h.value("fraudwatch_outcome_score_bucket", model_version="v1", role="decider", label="fraud", le="0.6") == 0
        )
        assert (
            h.value("fraudwatch_outcome_score_bucket", model_version="v1", role="decider", label="fraud", le="0.65")
            == 1
        )
        assert h.value("fraudwatch_outcome_score_sum", model_version="v2", role="shadow", label="fraud") == 0.66
        # calibration: the bin holds the score sum, the count and the observed fraud
        cal_bin = str(calibration_bin_of(0.62, h.log.settings.calibration_bins))
        labels = {"model_version": "v1", "role": "decider", "bin": cal_bin}
        assert h.value("fraudwatch_calibration_predicted_sum", **labels) == pytest.approx(0.62)
        assert h.value("fraudwatch_calibration_predicted_count", **labels) == 1
        assert h.value("fraudwatch_calibration_observed_fraud_total", **labels) == 1
        # the label delay is observed_at − prediction ts = 72 h
        assert h.value("fraudwatch_label_delay_seconds_sum", model_version="v1", role="decider") == 72 * 3600
        assert h.value("fraudwatch_feedback_total", result="recorded") == 1

    run_with(tmp_path, scenario)


def test_legit_label_counts_false_positive_and_true_negative(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-2", "v1", "decider", score=0.9))
        h.log.record(_pred("c-2", "v2", "shadow", score=0.1))
        response = await h.feedback({"correlation_id": "c-2", "label": 0, "source": "review"})
        assert response.status_code == 200, response.text
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="fp") == 1
        assert h.value("fraudwatch_outcome_total", model_version="v2", role="shadow", outcome="tn") == 1
        labels = {"model_version": "v2", "role": "shadow", "bin": "1"}
        assert h.value("fraudwatch_calibration_observed_fraud_total", **labels) == 0
        assert h.value("fraudwatch_calibration_predicted_count", **labels) == 1

    run_with(tmp_path, scenario)


def test_prediction_still_in_the_write_buffer_is_found(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-buffered", "v1", "decider", score=0.8))
        assert h.log.pending == 1  # the writer sleeps for a minute: the row is only in memory
        response = await h.feedback({"correlation_id": "c-buffered", "label": "fraud", "source": "chargeback"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == 1
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="tp") == 1

    run_with(tmp_path, scenario, flush_interval_ms=60_000)


def test_same_label_twice_is_counted_once_and_a_conflicting_label_is_refused(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-3", "v1", "decider", score=0.7))
        first = await h.feedback({"correlation_id": "c-3", "label": "fraud", "source": "chargeback"})
        again = await h.feedback({"correlation_id": "c-3", "label": 1, "source": "manual"})
        other = await h.feedback({"correlation_id": "c-3", "label": "legit", "source": "manual"})
        assert (first.status_code, again.status_code, other.status_code) == (200, 200, 409)
        assert again.json()["status"] == "duplicate"
        conflict = other.json()
        assert "already labelled 'fraud' by 'chargeback'" in conflict["error"]
        assert conflict["details"][0]["field"] == "label"
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="tp") == 1
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="fp") == 0
        assert h.value("fraudwatch_feedback_total", result="duplicate") == 1
        assert h.value("fraudwatch_feedback_total", result="conflict") == 1

    run_with(tmp_path, scenario)


def test_concurrent_identical_labels_are_counted_once(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.log.record(_pred("c-race", "v1", "decider", score=0.7))
        await h.log.flush()
        body = {"correlation_id": "c-race", "label": "fraud", "source": "chargeback"}
        responses = await asyncio.gather(*(h.feedback(body) for _ in range(8)))
        assert sorted(r.json()["status"] for r in responses) == ["duplicate"] * 7 + ["recorded"]
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="tp") == 1

    run_with(tmp_path, scenario)


def test_unknown_correlation_id_is_404_with_a_clear_message(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        response = await h.feedback({"correlation_id": "nope", "label": "fraud", "source": "chargeback"})
        assert response.status_code == 404
        body = response.json()
        assert "unknown correlation_id 'nope'" in body["error"]
        assert body["details"][0]["field"] == "correlation_id"
        assert h.value("fraudwatch_feedback_total", result="unknown") == 1

    run_with(tmp_path, scenario)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"label": "fraud", "source": "x"}, "correlation_id"),
        ({"correlation_id": "c", "source": "x"}, "label"),
        ({"correlation_id": "c", "label": "maybe", "source": "x"}, "label"),
        ({"correlation_id": "c", "label": True, "source": "x"}, "label"),
        ({"correlation_id": "c", "label": 2, "source": "x"}, "label"),
        ({"correlation_id": "c", "label": "fraud"}, "source"),
        ({"correlation_id": "c", "label": "fraud", "source": ""}, "source"),
        ({"correlation_id": "c", "label": "fraud", "source": "x", "observed_at": "2024-03-01T10:00:00"}, "observed_at"),
        ({"correlation_id": "c", "label": "fraud", "source": "x", "observed_at": "yesterday"}, "observed_at"),
        ({"correlation_id": "c" * 200, "label": "fraud", "source": "x"}, "correlation_id"),
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
        big = await h.feedback({"correlation_id": "c", "label": "fraud", "source": "x" * 2000})
        assert big.status_code == 413

    run_with(tmp_path, scenario, max_body_bytes=1024)


def test_label_spellings_are_accepted(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        for i, label in enumerate(["FRAUD", " legit ", 1, 0]):
            h.log.record(_pred(f"s-{i}", "v1", "decider", score=0.2))
            response = await h.feedback({"correlation_id": f"s-{i}", "label": label, "source": "x"})
            assert response.status_code == 200, response.text
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="fn") == 2
        assert h.value("fraudwatch_outcome_total", model_version="v1", role="decider", outcome="tn") == 2

    run_with(tmp_path, scenario)


def test_prepare_creates_every_outcome_series_at_zero(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.tracker.prepare("v9", "shadow")
        for cell in ("tp", "fp", "tn", "fn"):
            assert (
                h.registry.get_sample_value(
                    "fraudwatch_outcome_total", {"model_version": "v9", "role": "shadow", "outcome": cell}
                )
                == 0
            )
        for label in ("fraud", "legit"):
            labels = {"model_version": "v9", "role": "shadow", "label": label}
            assert h.registry.get_sample_value("fraudwatch_outcome_score_count", labels) == 0
        last_bin = str(h.log.settings.calibration_bins - 1)
        labels = {"model_version": "v9", "role": "shadow", "bin": last_bin}
        assert h.registry.get_sample_value("fraudwatch_calibration_predicted_count", labels) == 0
        assert h.registry.get_sample_value("fraudwatch_calibration_observed_fraud_total", labels) == 0

    run_with(tmp_path, scenario)


def test_feedback_is_503_when_the_prediction_log_database_is_down() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        port = free_port("127.0.0.1")  # nothing listens there: a real connection refusal
        settings = OutcomeSettings(dsn=f"postgresql+psycopg://fraudwatch@127.0.0.1:{port}/predictions")
        log = PredictionLog(settings, registry=registry)
        app = Starlette(routes=OutcomeTracker(log, registry=registry).routes())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post(FEEDBACK_PATH, json={"correlation_id": "c", "label": 1, "source": "x"})
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
        assert [r.correlation_id for r in await reopened.find("ok-2")] == ["ok-2"]
        assert await reopened.find("bad") == []
        await reopened.close()

    asyncio.run(main())
