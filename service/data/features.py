"""Preprocessing and feature engineering: the one code path used by training and by serving.

Training calls :func:`feature_matrix` on the historical rows with point-in-time entity aggregates and velocity
features (``service.data.velocity.point_in_time``); the scoring service calls the same :func:`feature_matrix` on the
request rows with aggregates from the bundle's snapshot and velocity features from the online store.
A parity test proves both produce identical vectors for the same request.

:data:`FEATURE_NAMES` is the full vector; a model uses one of :data:`FEATURE_SETS` (its manifest lists the names,
and :func:`column_index` selects them), so a bundle trained before the velocity features keeps working.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from service.data.velocity import NOTHING_SEEN, VELOCITY_FEATURES, Velocity, cents

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

BASE_FEATURES: Final[tuple[str, ...]] = (
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
#: The full vector: the base features, then the velocity features (``service.data.velocity``) and whether the online
#: store answered (``velocity_known``; 0 = the conservative defaults were served).
FEATURE_NAMES: Final[tuple[str, ...]] = (*BASE_FEATURES, *VELOCITY_FEATURES, "velocity_known")
N_FEATURES: Final[int] = len(FEATURE_NAMES)
#: What a model may be trained on (``train.feature_set``): ``base`` is the vector before the velocity features.
FEATURE_SETS: Final[dict[str, tuple[str, ...]]] = {"base": BASE_FEATURES, "velocity": FEATURE_NAMES}
#: Continuous features whose reference bins are kept for drift (PSI); indicators are skipped.
DRIFT_FEATURES: Final[tuple[str, ...]] = (
    "years_active",
    "amount",
    "ip_accounts",
    "prior_refunds",
    "refund_rate",
    "amount_to_avg",
    *VELOCITY_FEATURES,
)


def round_amount(amount: float) -> float:
    """Round a dollar amount to whole cents, half away from zero (19.994 → 19.99, 19.995 → 20.0)."""
    return math.copysign(abs(cents(amount)) / 100.0, amount)


def column_index(names: Sequence[str]) -> list[int]:
    """The columns of :data:`FEATURE_NAMES` a model with these feature names reads (ValueError naming an unknown
    one)."""
    unknown = [name for name in names if name not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"unknown features {unknown}")
    return [FEATURE_NAMES.index(name) for name in names]


def select(matrix: npt.NDArray[np.float32], names: Sequence[str]) -> npt.NDArray[np.float32]:
    """A full feature matrix reduced to a model's features (unchanged when they are the full vector)."""
    if tuple(names) == FEATURE_NAMES:
        return matrix
    return np.ascontiguousarray(matrix[:, column_index(names)])


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
    velocity: Velocity = NOTHING_SEEN,
) -> list[float]:
    """The full feature vector of one request, in ``FEATURE_NAMES`` order."""
    rounded = round_amount(amount)
    cent_part = cents_of(rounded)
    category = categorize(description)
    prior = aggregates.prior_refunds
    one_hot = [1.0 if category == name else 0.0 for name in CATEGORIES]
    return [
        float(years_active),
        rounded,
        1.0 if cent_part == 0 else 0.0,
        1.0 if cent_part == 99 else 0.0,
        float(ip_accounts),
        float(prior),
        refund_rate(prior, years_active),
        rounded / max(aggregates.avg_refund_amount, MIN_AVG_AMOUNT),
        1.0 if aggregates.known else 0.0,
        1.0 if category == "missing" else 0.0,
        *one_hot,
        *velocity.values(),
        1.0 if velocity.known else 0.0,
    ]


def feature_matrix(
    rows: Iterable[Mapping[str, Any]],
    aggregates: Sequence[EntityAggregates],
    velocities: Sequence[Velocity] | None = None,
) -> npt.NDArray[np.float32]:
    """Float32 matrix (the full vector) for rows shaped like the public request (``yearsActive``, ``amount``,
    ``ipAccounts``, optional ``itemDescription``), one aggregate and one velocity reading per row (None: nothing
    seen, unknown). Used by training and serving alike."""
    velocity_rows = [NOTHING_SEEN] * len(aggregates) if velocities is None else velocities
    vectors = [
        feature_vector(
            float(row["yearsActive"]),
            float(row["amount"]),
            float(row["ipAccounts"]),
            _text_or_none(row.get("itemDescription")),
            agg,
            velocity,
        )
        for row, agg, velocity in zip(rows, aggregates, velocity_rows, strict=True)
    ]
    if not vectors:
        return np.empty((0, N_FEATURES), dtype=np.float32)
    return np.asarray(vectors, dtype=np.float32)


def _text_or_none(value: object) -> str | None:
    """Training data carries missing text as NaN/None; serving as None. Both mean missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)
