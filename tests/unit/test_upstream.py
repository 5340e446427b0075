"""How the router reads model-service answers: single answers, batch answers, failures by status and shape."""

from __future__ import annotations

import json

import pytest

from rollout.router.upstream import Answer, Failure, batch_body, classify, classify_batch, parse_answer
from service.api.schema import BatchRequest


def answer(score: float, version: str = "v2", prediction: int = 0) -> dict[str, object]:
    return {"prediction": prediction, "score": score, "threshold": 0.5, "model_version": version, "correlation_id": "c"}


def test_a_single_answer_keeps_its_body_and_fields() -> None:
    body = json.dumps(answer(0.25)).encode()
    parsed = classify(200, b"  " + body + b"\n")
    assert isinstance(parsed, Answer)
    assert (parsed.score, parsed.prediction, parsed.threshold, parsed.reported_version) == (0.25, 0, 0.5, "v2")
    assert parsed.body == body


@pytest.mark.parametrize(
    ("status", "content", "reason"),
    [
        (503, b"{}", "status_5xx"),
        (422, b'{"error": "validation_error"}', "status_4xx"),
        (204, b"", "invalid_response"),
        (200, b"not json", "invalid_response"),
        (200, json.dumps({**answer(0.2), "score": "NaN"}).encode(), "invalid_response"),
        (200, json.dumps({**answer(0.2), "prediction": 2}).encode(), "invalid_response"),
    ],
)
def test_failures_are_classified_by_status_then_shape(status: int, content: bytes, reason: str) -> None:
    failed = classify(status, content)
    assert isinstance(failed, Failure)
    assert failed.reason == reason
    assert parse_answer(content) is None or status != 200


def test_a_batch_answer_is_one_result_per_request_and_a_bad_item_fails_alone() -> None:
    content = json.dumps({"results": [answer(0.1), {"score": 0.3}, answer(0.9, prediction=1)]}).encode()
    results = classify_batch((200, content), 3)
    assert [type(r) for r in results] == [Answer, Failure, Answer]
    assert [r.score for r in results if isinstance(r, Answer)] == [0.1, 0.9]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (Failure("timeout"), "timeout"),
        ((500, b"boom"), "status_5xx"),
        ((422, b"{}"), "status_4xx"),
        ((200, json.dumps({"results": [answer(0.1)]}).encode()), "invalid_response"),  # 1 result for 2 requests
        ((200, b"[]"), "invalid_response"),
    ],
)
def test_a_failed_batch_call_fails_every_request(raw: tuple[int, bytes] | Failure, reason: str) -> None:
    results = classify_batch(raw, 2)
    assert len(results) == 2
    assert all(isinstance(r, Failure) and r.reason == reason for r in results)


def test_the_batch_body_is_what_the_model_service_validates() -> None:
    bodies = [
        b'{"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2}',
        b' {"yearsActive": 2, "amount": 1, "ipAccounts": 1}\n',
    ]
    batch = BatchRequest.model_validate_json(batch_body(bodies, ["cid-1", "cid-2"]))
    assert [r.yearsActive for r in batch.requests] == [1.5, 2.0]
    assert batch.correlation_ids == ["cid-1", "cid-2"]
