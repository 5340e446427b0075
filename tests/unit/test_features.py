"""Preprocessing and feature engineering, and the training/serving parity of the one feature path."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.api.schema import RefundRequest
from service.data import aggregates, features
from service.data.features import DEFAULT_AGGREGATES, FEATURE_NAMES, EntityAggregates
from service.data.synthetic import SyntheticConfig, generate


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(19.994, 19.99), (19.995, 20.0), (45.0, 45.0), (0.004, 0.0), (1234.5678, 1234.57), (0.1 + 0.2, 0.3)],
)
def test_round_amount_to_cents(raw: float, expected: float) -> None:
    assert features.round_amount(raw) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("amount", "cents"), [(20.0, 0), (19.99, 99), (19.995, 0), (7.5, 50), (0.01, 1)])
def test_cents_of(amount: float, cents: int) -> None:
    assert features.cents_of(amount) == cents


@pytest.mark.parametrize(
    ("text", "bucket"),
    [
        ("Pad Thai with tofu", "food_perishable"),
        ("Pizza arrived cold and spoiled", "food_perishable"),
        ("Wireless headphones", "electronics"),
        ("Running shoes", "apparel"),
        ("Gift card $50", "gift_card"),
        ("Robot vacuum faulty", "home"),
        ("Paperback novel", "other"),
        ("   ", "missing"),
        ("", "missing"),
        (None, "missing"),
        ("TV stand", "electronics"),
        ("tvshow box set", "other"),
    ],
)
def test_categorize(text: str | None, bucket: str) -> None:
    assert features.categorize(text) == bucket


def test_refund_rate_counts_young_accounts_as_minimum_age() -> None:
    assert features.refund_rate(3.0, 1.5) == pytest.approx(2.0)
    assert features.refund_rate(2.0, 0.0) == pytest.approx(2.0 / features.MIN_YEARS_FOR_RATE)


def test_feature_vector_layout_matches_names() -> None:
    agg = EntityAggregates(prior_refunds=4.0, avg_refund_amount=20.0, known=True)
    vec = features.feature_vector(2.0, 39.994, 3, "Sushi platter", agg)
    named = dict(zip(FEATURE_NAMES, vec, strict=True))
    assert named["amount"] == pytest.approx(39.99)
    assert named["amount_is_charm"] == 1.0 and named["amount_is_round"] == 0.0
    assert named["refund_rate"] == pytest.approx(2.0)
    assert named["amount_to_avg"] == pytest.approx(39.99 / 20.0)
    assert named["account_known"] == 1.0
    assert named["category_food_perishable"] == 1.0
    assert sum(v for k, v in named.items() if k.startswith("category_")) == 1.0


def test_missing_description_and_unknown_account_use_defaults() -> None:
    vec = dict(zip(FEATURE_NAMES, features.feature_vector(1.5, 45.0, 2, None, DEFAULT_AGGREGATES), strict=True))
    assert vec["description_missing"] == 1.0 and vec["category_missing"] == 1.0
    assert vec["account_known"] == 0.0 and vec["prior_refunds"] == 0.0


def test_feature_matrix_is_float32_and_treats_nan_text_as_missing() -> None:
    rows = [
        {"yearsActive": 1.0, "amount": 10.0, "ipAccounts": 1, "itemDescription": float("nan")},
        {"yearsActive": 1.0, "amount": 10.0, "ipAccounts": 1},
    ]
    matrix = features.feature_matrix(rows, [DEFAULT_AGGREGATES] * 2)
    assert matrix.dtype == np.float32 and matrix.shape == (2, features.N_FEATURES)
    np.testing.assert_array_equal(matrix[0], matrix[1])
    assert features.feature_matrix([], []).shape == (0, features.N_FEATURES)


@given(
    years=st.floats(0.0, 100.0),
    amount=st.floats(0.0, 1_000_000.0),
    ips=st.integers(1, 100_000),
    text=st.one_of(st.none(), st.text(max_size=50)),
    prior=st.floats(0.0, 1e4),
    avg=st.floats(0.0, 1e5),
)
def test_feature_vector_is_always_finite(
    years: float, amount: float, ips: int, text: str | None, prior: float, avg: float
) -> None:
    vec = features.feature_vector(years, amount, ips, text, EntityAggregates(prior, avg, True))
    assert len(vec) == features.N_FEATURES
    assert all(math.isfinite(v) for v in vec)


def test_training_and_serving_paths_build_identical_vectors() -> None:
    """Parity: the training matrix (point-in-time aggregates over history) equals what serving builds from a
    validated API request plus the feature store's aggregates as of that moment, for every probed row."""
    frame = generate(SyntheticConfig(n_accounts=300, n_requests=3_000, seed=11, drift=True))
    train_matrix = features.feature_matrix(frame.to_dict("records"), aggregates.point_in_time(frame))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(frame), size=60, replace=False):
        row = frame.iloc[int(i)]
        store = aggregates.latest(frame.iloc[: int(i)])  # the store as it was just before this request
        request = RefundRequest.model_validate(_api_body(row))
        agg = store.get(request.accountId or "", DEFAULT_AGGREGATES)
        if request.accountId is not None and request.accountId not in store:
            agg = aggregates.combine(row["prior_refunds_base"], row["avg_amount_base"], 0.0, 0.0)
        served = features.feature_matrix([request.model_dump()], [agg])
        np.testing.assert_array_equal(served[0], train_matrix[int(i)], err_msg=f"row {i}")


def _api_body(row: pd.Series) -> dict[str, object]:
    body: dict[str, object] = {
        "yearsActive": float(row["yearsActive"]),
        "amount": float(row["amount"]),
        "ipAccounts": int(row["ipAccounts"]),
        "accountId": row["account_id"],
    }
    if isinstance(row["itemDescription"], str):
        body["itemDescription"] = row["itemDescription"]
    return body
