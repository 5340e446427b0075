"""Per-account aggregates from refund history: point-in-time for training, latest for the feature store.

Both use the same arithmetic (:func:`combine`), so what the model learned from is what serving looks up.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from service.data.features import DEFAULT_AGGREGATES, EntityAggregates

HISTORY_COLUMNS = ("account_id", "amount", "prior_refunds_base", "avg_amount_base")


def combine(base_count: float, base_avg: float, n_new: float, sum_new: float) -> EntityAggregates:
    """Aggregates of an account with ``base_count`` refunds (mean ``base_avg``) before the window and ``n_new``
    refunds totalling ``sum_new`` since. An unknown base average counts as the default basket."""
    avg_base = DEFAULT_AGGREGATES.avg_refund_amount if math.isnan(base_avg) else base_avg
    count = base_count + n_new
    if count <= 0:
        return DEFAULT_AGGREGATES
    avg = (avg_base * base_count + sum_new) / count
    return EntityAggregates(prior_refunds=float(count), avg_refund_amount=float(avg), known=True)


def point_in_time(history: pd.DataFrame) -> list[EntityAggregates]:
    """For each row (time-ordered), the account's aggregates from everything strictly before it.

    Rows without an ``account_id`` get the default, as a request without an entity key would at serving time.
    """
    frame = history.loc[:, list(HISTORY_COLUMNS)].reset_index(drop=True)
    has_id = frame["account_id"].notna().to_numpy()
    key = frame["account_id"].where(has_id, "")
    grouped = frame.groupby(key, sort=False)["amount"]
    n_before = grouped.cumcount().to_numpy(dtype=float)
    sum_before = (grouped.cumsum() - frame["amount"]).to_numpy(dtype=float)
    base_count = frame["prior_refunds_base"].fillna(0.0).to_numpy(dtype=float)
    base_avg = frame["avg_amount_base"].to_numpy(dtype=float)
    return [
        combine(base_count[i], base_avg[i], n_before[i], sum_before[i]) if has_id[i] else DEFAULT_AGGREGATES
        for i in range(len(frame))
    ]


def latest(history: pd.DataFrame) -> dict[str, EntityAggregates]:
    """Each account's aggregates after all of ``history``: what the feature store serves afterwards."""
    frame = history.loc[history["account_id"].notna(), list(HISTORY_COLUMNS)]
    summary = frame.groupby("account_id", sort=True).agg(
        n=("amount", "size"),
        total=("amount", "sum"),
        base_count=("prior_refunds_base", "first"),
        base_avg=("avg_amount_base", "first"),
    )
    base_counts = np.nan_to_num(summary["base_count"].to_numpy(dtype=float))
    return {
        str(account): combine(base_counts[i], float(row.base_avg), float(row.n), float(row.total))
        for i, (account, row) in enumerate(summary.iterrows())
    }
