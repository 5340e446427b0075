"""Preprocessing and feature engineering: the one code path used by training and by serving.

Training calls :func:`feature_matrix` on the historical rows with point-in-time entity aggregates; the scoring
service calls the same :func:`feature_matrix` on the request rows with aggregates from the feature store.
A parity test proves both produce identical vectors for the same request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

#: Free-text buckets, checked in this order; the first bucket with a matching keyword wins.
CATEGORY_KEYWORDS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("gift_card", ("gift card", "giftcard", "voucher", "gift code", "prepaid card", "store credit")),
    (
        "food_perishable",
        (
            "pad thai",
            "tofu",
            "pizza",
            "sushi",
            "burger",
            "salad",
            "meal",
            "grocer",
            "produce",
            "milk",
            "cheese",
            "bread",
            "fruit",
            "vegetable",
            "meat",
            "chicken",
            "fish",
            "noodle",
            "curry",
            "takeout",
            "delivery food",
            "sandwich",
            "dessert",
            "cake",
            "coffee",
            "spoiled",
            "rotten",
            "expired",
        ),
    ),
    (
        "electronics",
        (
            "laptop",
            "phone",
            "iphone",
            "tablet",
            "headphone",
            "earbud",
            "camera",
            "console",
            "tv",
            "television",
            "monitor",
            "charger",
            "speaker",
            "smartwatch",
            "watch",
            "gpu",
            "graphics card",
            "drone",
            "keyboard",
        ),
    ),
    (
        "apparel",
        (
            "shirt",
            "t-shirt",
            "jeans",
            "dress",
            "jacket",
            "coat",
            "shoe",
            "sneaker",
            "boot",
            "hoodie",
            "sweater",
            "pants",
            "skirt",
            "sock",
            "size",
            "handbag",
            "bag",
        ),
    ),
    (
        "home",
        (
            "lamp",
            "chair",
            "table",
            "sofa",
            "mattress",
            "pillow",
            "blanket",
            "towel",
            "kitchen",
            "pan",
            "blender",
            "vacuum",
            "curtain",
            "rug",
            "furniture",
            "mug",
            "plate",
        ),
    ),
)
CATEGORIES: Final[tuple[str, ...]] = (*(name for name, _ in CATEGORY_KEYWORDS), "other", "missing")
_WORD = re.compile(r"[a-z0-9\-]+")

#: Accounts younger than this are treated as this old when dividing (avoids infinite rates).
MIN_YEARS_FOR_RATE: Final[float] = 0.25
#: Average refund amounts below this are treated as this when dividing.
MIN_AVG_AMOUNT: Final[float] = 1.0


@dataclass(frozen=True, slots=True)
class EntityAggregates:
    """Per-account aggregates that cannot be computed within the request budget.

    ``known`` is False when the feature store has no row for the entity, timed out, or failed; then the
    conservative defaults below are used and the model sees ``account_known = 0``.
    """

    prior_refunds: float
    avg_refund_amount: float
    known: bool


#: The conservative default on a miss or a timeout: no refund history, a typical basket.
DEFAULT_AGGREGATES: Final[EntityAggregates] = EntityAggregates(prior_refunds=0.0, avg_refund_amount=60.0, known=False)

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "years_active",
    "amount",
    "amount_is_round",
    "amount_is_charm",
    "ip_accounts",
    "prior_refunds",
    "refund_rate",
    "amount_to_avg",
    "account_known",
    "description_missing",
    *(f"category_{name}" for name in CATEGORIES),
)
N_FEATURES: Final[int] = len(FEATURE_NAMES)
#: Continuous features whose reference bins are kept for drift (PSI); indicators are skipped.
DRIFT_FEATURES: Final[tuple[str, ...]] = (
    "years_active",
    "amount",
    "ip_accounts",
    "prior_refunds",
    "refund_rate",
    "amount_to_avg",
)


def round_amount(amount: float) -> float:
    """Round a dollar amount to whole cents, half away from zero (19.994 → 19.99, 19.995 → 20.0)."""
    cents = math.floor(abs(amount) * 100.0 + 0.5 + 1e-9)
    return math.copysign(cents / 100.0, amount)


def cents_of(amount: float) -> int:
    """The cents part of an already rounded amount (20.00 → 0, 19.99 → 99)."""
    return round(round_amount(amount) * 100.0) % 100


def categorize(text: str | None) -> str:
    """Map free text to a bucket: "Pad Thai with tofu" → ``food_perishable``; empty or None → ``missing``."""
    if text is None:
        return "missing"
    lowered = " ".join(_WORD.findall(text.lower()))
    if not lowered:
        return "missing"
    padded = f" {lowered} "
    for name, keywords in CATEGORY_KEYWORDS:
        if any(_contains_word(padded, keyword) for keyword in keywords):
            return name
    return "other"


def _contains_word(padded: str, keyword: str) -> bool:
    """Whole-word (or whole-phrase) match, allowing a plural ``s``: "shoes" matches "shoe", "tv" not "tvshow"."""
    return f" {keyword} " in padded or f" {keyword}s " in padded or f" {keyword}es " in padded


def refund_rate(prior_refunds: float, years_active: float) -> float:
    """Refunds per year of account age, with young accounts counted as ``MIN_YEARS_FOR_RATE`` old."""
    return prior_refunds / max(years_active, MIN_YEARS_FOR_RATE)


def feature_vector(
    years_active: float,
    amount: float,
    ip_accounts: float,
    description: str | None,
    aggregates: EntityAggregates,
) -> list[float]:
    """The model's input for one request, in ``FEATURE_NAMES`` order."""
    rounded = round_amount(amount)
    cents = cents_of(rounded)
    category = categorize(description)
    prior = aggregates.prior_refunds
    one_hot = [1.0 if category == name else 0.0 for name in CATEGORIES]
    return [
        float(years_active),
        rounded,
        1.0 if cents == 0 else 0.0,
        1.0 if cents == 99 else 0.0,
        float(ip_accounts),
        float(prior),
        refund_rate(prior, years_active),
        rounded / max(aggregates.avg_refund_amount, MIN_AVG_AMOUNT),
        1.0 if aggregates.known else 0.0,
        1.0 if category == "missing" else 0.0,
        *one_hot,
    ]


def feature_matrix(
    rows: Iterable[Mapping[str, Any]], aggregates: Sequence[EntityAggregates]
) -> npt.NDArray[np.float32]:
    """Float32 matrix for rows shaped like the public request (``yearsActive``, ``amount``, ``ipAccounts``,
    optional ``itemDescription``), one aggregate per row. Used by training and serving alike."""
    vectors = [
        feature_vector(
            float(row["yearsActive"]),
            float(row["amount"]),
            float(row["ipAccounts"]),
            _text_or_none(row.get("itemDescription")),
            agg,
        )
        for row, agg in zip(rows, aggregates, strict=True)
    ]
    if not vectors:
        return np.empty((0, N_FEATURES), dtype=np.float32)
    return np.asarray(vectors, dtype=np.float32)


def _text_or_none(value: object) -> str | None:
    """Training data carries missing text as NaN/None; serving as None. Both mean missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)
