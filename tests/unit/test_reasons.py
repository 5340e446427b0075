"""Reasons with review decisions (service/serving/reasons.py): XGBoost's ``pred_contribs`` of the real small bundle,
computed for review decisions and for requests that ask, never for the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.api.schema import RefundRequest
from service.artifacts.bundle import ScoringModel, load_bundle
from service.data.features import DEFAULT_AGGREGATES, FEATURE_NAMES, feature_matrix
from service.serving.bento import load_runtime, request_row
from service.serving.metrics import Metrics
from service.serving.reasons import rows_to_explain, top_reasons
from service.settings import Settings

#: Requests over the range of the synthetic fraud patterns: new accounts on shared IPs with round amounts (review)
#: down to old accounts with one IP (approve).
REQUESTS = [
    RefundRequest(yearsActive=years, amount=amount, ipAccounts=ips, itemDescription=item)
    for years in (0.01, 0.1, 2.0, 8.0)
    for amount, ips, item in ((500.0, 60, "Gift card"), (45.0, 2, "Pad Thai"), (1899.99, 1, "Laptop"))
]


@pytest.fixture(scope="module")
def model(bundle_dir: Path) -> ScoringModel:
    return load_bundle(bundle_dir, nthread=1)


def test_contributions_add_up_to_the_boosters_margin(model: ScoringModel) -> None:
    features = feature_matrix([request_row(r) for r in REQUESTS], [DEFAULT_AGGREGATES] * len(REQUESTS))
    contributions = model.contributions(features)
    assert contributions.shape == (len(REQUESTS), len(FEATURE_NAMES) + 1)
    raw = model.raw_scores(features).astype(np.float64)
    margin = np.log(raw / (1.0 - raw))
    np.testing.assert_allclose(contributions.sum(axis=1), margin, atol=1e-3)


def test_top_reasons_are_the_largest_positive_contributions_and_never_the_bias() -> None:
    row = np.array([0.5, -2.0, 1.5, 0.0, 0.2, 9.0], dtype=np.float32)  # the last value is the bias
    reasons = top_reasons(row, ["a", "b", "c", "d", "e"], k=3)
    assert [(r.feature, r.contribution) for r in reasons] == [("c", 1.5), ("a", 0.5), ("e", pytest.approx(0.2))]
    assert top_reasons(np.array([-1.0, 0.0, 3.0], dtype=np.float32), ["a", "b"], k=3) == []


def test_rows_to_explain() -> None:
    assert rows_to_explain([1, 0, 0, 1], [False, True, False, False], on_review=True) == [0, 1, 3]
    assert rows_to_explain([1, 0, 0, 1], [False, True, False, False], on_review=False) == [1]


def test_review_decisions_carry_reasons_and_approvals_only_on_request(bundle_dir: Path) -> None:
    settings = Settings.model_validate({"serve": {"model_dir": bundle_dir, "reasons_top_k": 2}})
    runtime = load_runtime(settings, Metrics(registry=CollectorRegistry()))
    requests = [*REQUESTS, *(r.model_copy(update={"explain": True}) for r in REQUESTS)]
    answers = asyncio.run(runtime.decide(requests, [f"cid-{i}" for i in range(len(requests))]))
    plain, explained = answers[: len(REQUESTS)], answers[len(REQUESTS) :]
    assert {a.decision for a in plain} == {"approve", "review"}, "the requests must cover both decisions"
    for answer in plain:
        if answer.decision == "review":
            assert answer.reasons, answer
            assert 1 <= len(answer.reasons) <= 2
            assert all(r.contribution > 0 and r.feature in FEATURE_NAMES for r in answer.reasons)
            contributions = [r.contribution for r in answer.reasons]
            assert contributions == sorted(contributions, reverse=True)
        else:
            assert answer.reasons is None
    assert all(a.reasons is not None for a in explained)
    assert [a.score for a in explained] == [a.score for a in plain]
