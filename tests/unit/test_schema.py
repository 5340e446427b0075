"""The public API's validation: the seed body is accepted; every bad field is rejected with its name."""

from __future__ import annotations

import json

import pytest

from service.api.schema import BatchRequest, RefundRequest, RefundResponse, confidence_of, decision_of
from service.serving.bento import Rejection, field_path, validate_batch, validate_single
from service.settings import Settings

SEED = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
CID = "cid-test"


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def test_seed_body_validates_unchanged() -> None:
    request = RefundRequest.model_validate_json(body(SEED))
    assert (request.yearsActive, request.amount, request.ipAccounts) == (1.5, 45.0, 2)
    assert request.accountId is None
    assert request.itemDescription is None
    assert isinstance(validate_single(body(SEED), Settings(), CID), RefundRequest)


def test_optional_fields_and_unknown_extras() -> None:
    payload = {**SEED, "accountId": "acct-1", "itemDescription": "Pad Thai with tofu", "channel": "web"}
    request = RefundRequest.model_validate_json(body(payload))
    assert request.accountId == "acct-1"
    assert request.itemDescription == "Pad Thai with tofu"
    assert isinstance(validate_single(body(payload), Settings(), CID), RefundRequest)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (body({"amount": 45.0, "ipAccounts": 2}), "yearsActive"),
        (body({"yearsActive": 1.5, "ipAccounts": 2}), "amount"),
        (body({"yearsActive": 1.5, "amount": 45.0}), "ipAccounts"),
        (body({**SEED, "amount": -1.0}), "amount"),
        (body({**SEED, "amount": "forty"}), "amount"),
        (body({**SEED, "amount": [45]}), "amount"),
        (b'{"yearsActive": 1.5, "amount": NaN, "ipAccounts": 2}', "amount"),
        (b'{"yearsActive": 1.5, "amount": Infinity, "ipAccounts": 2}', "amount"),
        (b'{"yearsActive": -Infinity, "amount": 4, "ipAccounts": 2}', "yearsActive"),
        (b'{"yearsActive": 1.5, "amount": 1e400, "ipAccounts": 2}', "amount"),
        (body({**SEED, "yearsActive": -0.5}), "yearsActive"),
        (body({**SEED, "ipAccounts": 0}), "ipAccounts"),
        (body({**SEED, "ipAccounts": 2.5}), "ipAccounts"),
        (body({**SEED, "accountId": ""}), "accountId"),
        (body({**SEED, "accountId": 12}), "accountId"),
        (body({**SEED, "itemDescription": "x" * 501}), "itemDescription"),
    ],
)
def test_each_bad_field_is_named(raw: bytes, field: str) -> None:
    rejection = validate_single(raw, Settings(), CID)
    assert isinstance(rejection, Rejection)
    assert rejection.status == 422
    assert [detail.field for detail in rejection.body.details] == [field]
    assert rejection.body.correlation_id == CID


def test_several_bad_fields_are_all_named() -> None:
    rejection = validate_single(body({"amount": -3, "ipAccounts": "many"}), Settings(), CID)
    assert isinstance(rejection, Rejection)
    assert {detail.field for detail in rejection.body.details} == {"yearsActive", "amount", "ipAccounts"}


@pytest.mark.parametrize("raw", [b"not json", b'{"yearsActive": 1.5,', b"\xff\xfe"])
def test_non_json_is_400_invalid_json(raw: bytes) -> None:
    rejection = validate_single(raw, Settings(), CID)
    assert isinstance(rejection, Rejection)
    assert (rejection.status, rejection.body.error) == (400, "invalid_json")
    assert [detail.field for detail in rejection.body.details] == ["body"]


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"", b"null"])
def test_json_that_is_not_an_object_is_rejected(raw: bytes) -> None:
    rejection = validate_single(raw, Settings(), CID)
    assert isinstance(rejection, Rejection)
    assert 400 <= rejection.status < 500


def test_batch_names_the_bad_item_and_field() -> None:
    requests = [SEED, SEED, SEED, {**SEED, "ipAccounts": -4}, {**SEED, "amount": "x"}]
    rejection = validate_batch(body({"requests": requests}), Settings(), CID)
    assert isinstance(rejection, Rejection)
    assert rejection.status == 422
    assert [detail.field for detail in rejection.body.details] == ["requests.3.ipAccounts", "requests.4.amount"]


def test_valid_batch_passes() -> None:
    batch = validate_batch(body({"requests": [SEED, {**SEED, "accountId": "a"}]}), Settings(), CID)
    assert isinstance(batch, BatchRequest)
    assert [r.accountId for r in batch.requests] == [None, "a"]
    assert len(BatchRequest.model_validate_json(body({"requests": [SEED]})).requests) == 1


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"requests": []}, "requests"), ({}, "requests"), ({"requests": [SEED], "extra": 1}, "extra")],
)
def test_batch_shape_errors(payload: dict[str, object], field: str) -> None:
    rejection = validate_batch(body(payload), Settings(), CID)
    assert isinstance(rejection, Rejection)
    assert [detail.field for detail in rejection.body.details] == [field]


def test_batch_larger_than_the_settings_limit_names_requests() -> None:
    settings = Settings.model_validate({"serve": {"max_batch_items": 3}})
    assert isinstance(validate_batch(body({"requests": [SEED] * 3}), settings, CID), BatchRequest)
    rejection = validate_batch(body({"requests": [SEED] * 4}), settings, CID)
    assert isinstance(rejection, Rejection)
    assert rejection.status == 422
    assert [detail.field for detail in rejection.body.details] == ["requests"]
    assert "at most 3" in rejection.body.details[0].message


def test_field_path_is_dotted() -> None:
    assert field_path(("requests", 3, "ipAccounts")) == "requests.3.ipAccounts"
    assert field_path(()) == "body"


@pytest.mark.parametrize(("score", "prediction", "confidence"), [(0.94, 1, 0.94), (0.25, 0, 0.75)])
def test_response_confidence_is_the_predicted_class_probability(
    score: float, prediction: int, confidence: float
) -> None:
    assert confidence_of(score, prediction) == pytest.approx(confidence)
    response = RefundResponse(
        prediction=prediction,
        confidence=confidence_of(score, prediction),
        score=score,
        decision=decision_of(prediction),
        threshold=0.5,
        model_version="v",
        correlation_id=CID,
    )
    assert response.decision == ("review" if prediction else "approve")


def test_batch_carries_one_safe_correlation_id_per_request() -> None:
    ok = validate_batch(body({"requests": [SEED, SEED], "correlation_ids": ["a-1", "b:2"]}), Settings(), CID)
    assert isinstance(ok, BatchRequest)
    assert ok.correlation_ids == ["a-1", "b:2"]
    short = validate_batch(body({"requests": [SEED, SEED], "correlation_ids": ["a-1"]}), Settings(), CID)
    assert isinstance(short, Rejection)
    assert short.status == 422
    assert [d.field for d in short.body.details] == ["correlation_ids"]
    assert "1 IDs for 2 requests" in short.body.details[0].message
    unsafe = validate_batch(body({"requests": [SEED], "correlation_ids": ["x\ny"]}), Settings(), CID)
    assert isinstance(unsafe, Rejection)
    assert [d.field for d in unsafe.body.details] == ["correlation_ids.0"]
