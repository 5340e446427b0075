"""Why a refund went to review: the features that pushed its score toward fraud, from XGBoost's ``pred_contribs``
(exact TreeSHAP values of the booster, in log-odds; the calibration is monotone, so their order is the score's).

Computed only for the rows that need them — review decisions (``serve.reasons_on_review``) and requests that ask
(``explain``) — because a contribution call builds a DMatrix and walks every tree per feature
(benchmarks/extras_benchmark.py has its cost beside plain scoring).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.api.schema import Reason


def top_reasons(contributions: npt.NDArray[np.float32], names: Sequence[str], k: int) -> list[Reason]:
    """The (at most) ``k`` features of one row with the largest positive contribution, largest first; the row's last
    value is the bias, never a reason."""
    values = contributions[: len(names)]
    order = np.argsort(-values, kind="stable")[:k]
    return [Reason(feature=names[i], contribution=float(values[i])) for i in order if values[i] > 0.0]


def rows_to_explain(predictions: Sequence[int], asked: Sequence[bool], on_review: bool) -> list[int]:
    """The rows that get reasons: every one that asked, and with ``on_review`` every review (prediction 1)."""
    return [i for i, (p, a) in enumerate(zip(predictions, asked, strict=True)) if a or (on_review and p == 1)]
