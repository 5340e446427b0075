"""Pure maths of drift and outcome analysis: PSI, ROC-AUC from histograms, precision/recall, calibration error,
and binomial confidence bounds. No I/O; the controller feeds these with numbers read from Prometheus.

The PSI here is the same formula as the recording rules in ``deploy/prometheus/rules.yml``: fractions are
clipped to at least ``epsilon`` (no renormalisation) and ``PSI = Σ (a - e) · ln(a / e)`` over bins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval for a proportion."""

    estimate: float
    lower: float
    upper: float


@dataclass(frozen=True)
class CalibrationBin:
    """Outcomes of one score bin: ``count`` predictions, the sum of their scores, how many were fraud."""

    count: float
    predicted_sum: float
    observed_fraud: float


@dataclass(frozen=True)
class CalibrationError:
    """Expected (count-weighted mean) and maximum absolute gap between mean score and observed fraud rate."""

    expected: float
    maximum: float
    total: float


# --------------------------------------------------------------------------------------------------- PSI


def fractions(counts: Sequence[float]) -> list[float]:
    """Counts → fractions; raises on a negative count or an all-zero histogram (PSI is undefined there)."""
    if any(c < 0 for c in counts):
        raise ValueError("bin counts must be non-negative")
    total = float(sum(counts))
    if total <= 0.0:
        raise ValueError("a histogram with no observations has no fractions")
    return [float(c) / total for c in counts]


def psi(reference: Sequence[float], actual: Sequence[float], epsilon: float) -> float:
    """Population stability index between two fraction vectors over the same bins.

    Each fraction is clipped to at least ``epsilon`` so an empty bin contributes a large but finite term.
    """
    if len(reference) != len(actual):
        raise ValueError(f"bin count mismatch: reference has {len(reference)}, actual has {len(actual)}")
    if not reference:
        raise ValueError("PSI needs at least one bin")
    return float(sum(_psi_term(e, a, epsilon) for e, a in zip(reference, actual, strict=True)))


def _psi_term(expected: float, actual: float, epsilon: float) -> float:
    e = max(expected, epsilon)
    a = max(actual, epsilon)
    return (a - e) * math.log(a / e)


def psi_from_counts(reference_counts: Sequence[float], actual_counts: Sequence[float], epsilon: float) -> float:
    """PSI between two count histograms over the same bins."""
    return psi(fractions(reference_counts), fractions(actual_counts), epsilon)


def bin_counts(values: Iterable[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin for inner cut points ``edges`` (k edges → k+1 bins; a value v falls in bin
    ``searchsorted(edges, v, side='right')``, the convention of ``service.artifacts.bundle.ReferenceBins``)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.fromiter(values, dtype=np.float64), side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


# --------------------------------------------------------------------------------------------------- ROC-AUC


def roc_auc_from_histograms(positive_counts: Sequence[float], negative_counts: Sequence[float]) -> float | None:
    """ROC-AUC from per-bucket counts of positives and negatives over the same ascending score buckets.

    The trapezoid rule over the ROC curve traced by the bucket boundaries, i.e. the Mann–Whitney statistic with
    every pair inside one bucket counted as a tie (½). ``None`` when either class has no observations.
    """
    if len(positive_counts) != len(negative_counts):
        raise ValueError("positive and negative histograms need the same buckets")
    pos = np.asarray(positive_counts, dtype=np.float64)
    neg = np.asarray(negative_counts, dtype=np.float64)
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("bucket counts must be non-negative")
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos <= 0.0 or n_neg <= 0.0:
        return None
    negatives_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    wins = float(np.sum(pos * (negatives_below + 0.5 * neg)))
    return wins / (n_pos * n_neg)


def per_bucket_from_cumulative(cumulative: Mapping[float, float]) -> list[float]:
    """Prometheus ``_bucket`` counts (cumulative, keyed by ``le``, including ``+Inf``) → per-bucket counts in
    ascending ``le`` order. Small negative differences (counter resets across replicas) are clipped to 0."""
    ordered = [cumulative[le] for le in sorted(cumulative)]
    previous = [0.0, *ordered[:-1]]
    return [max(0.0, c - p) for c, p in zip(ordered, previous, strict=True)]


def roc_auc_from_prometheus_buckets(
    positive_cumulative: Mapping[float, float], negative_cumulative: Mapping[float, float]
) -> float | None:
    """ROC-AUC from two Prometheus histograms (``le`` → cumulative count) of fraud and legit scores."""
    if set(positive_cumulative) != set(negative_cumulative):
        raise ValueError("the fraud and legit histograms have different buckets")
    return roc_auc_from_histograms(
        per_bucket_from_cumulative(positive_cumulative), per_bucket_from_cumulative(negative_cumulative)
    )


def parse_le(value: str) -> float:
    """A Prometheus ``le`` label value as a float (``+Inf`` → inf)."""
    return math.inf if value in ("+Inf", "Inf", "inf") else float(value)


# --------------------------------------------------------------------------------------------------- counters


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or ``None`` when there is no evidence (denominator 0)."""
    return numerator / denominator if denominator > 0 else None


def precision(tp: float, fp: float) -> float | None:
    return ratio(tp, tp + fp)


def recall(tp: float, fn: float) -> float | None:
    return ratio(tp, tp + fn)


def wilson_interval(successes: float, trials: float, confidence: float) -> Interval | None:
    """Wilson score interval of a binomial proportion; ``None`` without trials."""
    _check_counts(successes, trials)
    if trials <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials)) / (1.0 + z2n)
    # The interval contains the estimate exactly: at 0 (or all) successes, rounding in centre − half would otherwise
    # leave a lower bound of ~3e-17 above an estimate of 0.
    return Interval(estimate=p, lower=max(0.0, min(p, centre - half)), upper=min(1.0, max(p, centre + half)))


def _check_counts(successes: float, trials: float) -> None:
    if successes < 0 or trials < 0 or successes > trials:
        raise ValueError(f"invalid binomial counts: {successes} successes of {trials} trials")


def recall_interval(tp: float, fn: float, confidence: float) -> Interval | None:
    return wilson_interval(tp, tp + fn, confidence)


def precision_interval(tp: float, fp: float, confidence: float) -> Interval | None:
    return wilson_interval(tp, tp + fp, confidence)


# --------------------------------------------------------------------------------------------------- calibration


def calibration_bin_of(score: float, n_bins: int) -> int:
    """Equal-width calibration bin of a score in [0, 1] (1.0 falls in the last bin)."""
    return min(max(int(score * n_bins), 0), n_bins - 1)


def calibration_error(bins: Sequence[CalibrationBin]) -> CalibrationError | None:
    """Expected and maximum calibration error over bins with observations; ``None`` when all are empty."""
    used = [b for b in bins if b.count > 0]
    total = float(sum(b.count for b in used))
    if total <= 0.0:
        return None
    gaps = [abs(b.predicted_sum / b.count - b.observed_fraud / b.count) for b in used]
    expected = sum(b.count / total * gap for b, gap in zip(used, gaps, strict=True))
    return CalibrationError(expected=expected, maximum=max(gaps), total=total)
