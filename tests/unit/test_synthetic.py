"""The synthetic refund-request generator: deterministic, time-ordered, realistic, and drift switchable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from service.data import aggregates
from service.data.features import DEFAULT_AGGREGATES, categorize
from service.data.synthetic import PATTERNS, SyntheticConfig, generate

SMALL = SyntheticConfig(n_accounts=2_000, n_requests=40_000, seed=3)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate(SMALL)


@pytest.fixture(scope="module")
def drifted() -> pd.DataFrame:
    return generate(SyntheticConfig(n_accounts=2_000, n_requests=40_000, seed=3, drift=True))


def test_same_seed_same_data(frame: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(frame, generate(SMALL))
    other = generate(SyntheticConfig(n_accounts=2_000, n_requests=40_000, seed=4))
    assert not frame["amount"].equals(other["amount"])


def test_rows_are_time_ordered_with_unique_ids(frame: pd.DataFrame) -> None:
    assert frame["timestamp"].is_monotonic_increasing
    assert frame["request_id"].is_unique


def test_fraud_rate_near_one_percent_and_all_base_patterns_present(frame: pd.DataFrame) -> None:
    assert 0.006 < frame["is_fraud"].mean() < 0.016
    present = set(frame["pattern"])
    assert {"legit", "serial_refunder", "bot_farm", "high_value"} <= present <= set(PATTERNS)
    assert "new_bot_farm" not in present
    assert ((frame["pattern"] != "legit") == (frame["is_fraud"] == 1)).all()


def test_amounts_have_retail_skew(frame: pd.DataFrame) -> None:
    legit = frame.loc[frame["pattern"] == "legit", "amount"]
    cents = np.round(legit.to_numpy() * 100).astype(int) % 100
    assert (cents == 99).mean() > 0.4  # charm prices dominate
    assert 0.05 < (cents == 0).mean() < 0.4
    bots = frame.loc[frame["pattern"] == "bot_farm", "amount"].to_numpy()
    assert (np.round(bots * 100).astype(int) % 100 == 0).all()  # farms claim round amounts


def test_fraud_patterns_have_their_signatures(frame: pd.DataFrame) -> None:
    by = frame.groupby("pattern")
    assert by["ipAccounts"].median()["bot_farm"] >= 8 > by["ipAccounts"].median()["legit"]
    assert by["yearsActive"].max()["bot_farm"] < 0.15
    assert by["amount"].median()["high_value"] > 10 * by["amount"].median()["legit"]
    assert by["prior_refunds_base"].median()["serial_refunder"] >= 8
    serial_text = frame.loc[frame["pattern"] == "serial_refunder", "itemDescription"].map(categorize)
    assert (serial_text == "food_perishable").mean() > 0.9


def test_missing_values_present(frame: pd.DataFrame) -> None:
    missing = frame["itemDescription"].isna()
    assert 0.02 < missing.mean() < 0.1
    assert missing[frame["pattern"] == "bot_farm"].mean() > missing[frame["pattern"] == "legit"].mean()


def test_drift_adds_a_new_farm_only_after_drift_start(drifted: pd.DataFrame) -> None:
    new = drifted["pattern"] == "new_bot_farm"
    assert new.sum() > 50
    start = drifted["timestamp"].iloc[0] + (drifted["timestamp"].iloc[-1] - drifted["timestamp"].iloc[0]) * 0.5
    assert (drifted.loc[new, "timestamp"] >= start - pd.Timedelta(hours=1)).all()
    assert drifted["is_fraud"].mean() > generate(SMALL)["is_fraud"].mean()
    farm = drifted[new]
    assert farm["ipAccounts"].between(4, 7).all() and farm["yearsActive"].between(1.0, 3.0).all()


def test_label_delays_positive_and_fraud_takes_days(frame: pd.DataFrame) -> None:
    assert (frame["label_delay_hours"] > 0).all()
    assert frame.loc[frame["is_fraud"] == 1, "label_delay_hours"].median() > 24


def test_point_in_time_aggregates_use_only_the_past() -> None:
    history = pd.DataFrame(
        {
            "account_id": ["a", "b", "a", None, "a"],
            "amount": [10.0, 99.0, 30.0, 5.0, 50.0],
            "prior_refunds_base": [2.0, 0.0, 2.0, 0.0, 2.0],
            "avg_amount_base": [40.0, np.nan, 40.0, np.nan, 40.0],
        }
    )
    pit = aggregates.point_in_time(history)
    assert pit[0].prior_refunds == 2.0 and pit[0].avg_refund_amount == pytest.approx(40.0)
    assert pit[2].prior_refunds == 3.0 and pit[2].avg_refund_amount == pytest.approx((80.0 + 10.0) / 3)
    assert pit[4].prior_refunds == 4.0 and pit[4].avg_refund_amount == pytest.approx((80.0 + 40.0) / 4)
    assert pit[1] == DEFAULT_AGGREGATES  # no history, no prior refunds
    assert pit[3] == DEFAULT_AGGREGATES  # no entity key
    latest = aggregates.latest(history)
    assert latest["a"].prior_refunds == 5.0 and latest["a"].avg_refund_amount == pytest.approx(170.0 / 5)
    assert latest["b"].known and latest["b"].avg_refund_amount == pytest.approx(99.0)


def test_a_stream_without_bursts_has_no_burst_farm_and_keeps_numeric_columns() -> None:
    frame = generate(SyntheticConfig(n_requests=2_000, n_accounts=400, fraud_rate=0.1, seed=3, burst_share=0.0))
    assert "burst_farm" not in set(frame["pattern"])
    assert len(frame) == 2_000
    assert frame["is_fraud"].sum() > 0
    # an empty burst frame once made these object columns (None downstream in the aggregates)
    for column in ("yearsActive", "amount", "ipAccounts", "is_fraud"):
        assert pd.api.types.is_numeric_dtype(frame[column]), column
