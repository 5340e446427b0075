"""The drift and outcome maths against independent implementations (scikit-learn, scipy, numpy) on the same data."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from rollout.core import drift
from rollout.router.outcomes.settings import DEFAULT_SCORE_BUCKETS, DriftSettings
from service.artifacts.bundle import ReferenceBins

EPS = DriftSettings().psi_epsilon
CONFIDENCE = DriftSettings().confidence_level


def _scores(seed: int, n_pos: int, n_neg: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Fraud scores skewed high, legit scores skewed low, overlapping: a realistic, imperfect classifier."""
    rng = np.random.default_rng(seed)
    pos = rng.beta(4.0, 2.0, n_pos)
    neg = rng.beta(1.0, 12.0, n_neg)
    return np.concatenate([pos, neg]), np.concatenate([np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)])


def _histograms(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], upper_edges: list[float]
) -> tuple[list[float], list[float]]:
    """Per-bucket counts with Prometheus semantics: bucket i holds scores in (edge[i-1], edge[i]]."""
    edges = np.asarray(upper_edges)
    idx = np.searchsorted(edges, scores, side="left")
    pos = np.bincount(idx[labels == 1], minlength=len(edges) + 1)
    neg = np.bincount(idx[labels == 0], minlength=len(edges) + 1)
    return pos.astype(float).tolist(), neg.astype(float).tolist()


# --------------------------------------------------------------------------------------------------- ROC-AUC


def test_auc_from_fine_histograms_matches_sklearn() -> None:
    scores, labels = _scores(1, 400, 4000)
    fine = np.linspace(0.0, 1.0, 2001)[1:].tolist()
    pos, neg = _histograms(scores, labels, fine)
    auc = drift.roc_auc_from_histograms(pos, neg)
    assert auc is not None
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)


def test_auc_from_default_outcome_buckets_is_close_to_sklearn() -> None:
    scores, labels = _scores(2, 300, 6000)
    pos, neg = _histograms(scores, labels, list(DEFAULT_SCORE_BUCKETS))
    auc = drift.roc_auc_from_histograms(pos, neg)
    assert auc is not None
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=5e-3)


def test_auc_is_exact_when_every_distinct_score_has_its_own_bucket() -> None:
    """Discrete scores with ties: sklearn counts tied pairs as ½, and so do buckets holding one value each."""
    rng = np.random.default_rng(3)
    scores = np.round(np.concatenate([rng.uniform(0.2, 1.0, 300), rng.uniform(0.0, 0.6, 700)]), 2)
    labels = np.concatenate([np.ones(300, np.int64), np.zeros(700, np.int64)])
    buckets = np.round(np.arange(0.0, 1.001, 0.01), 2).tolist()
    pos, neg = _histograms(scores, labels, buckets)
    assert drift.roc_auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_from_prometheus_cumulative_buckets() -> None:
    scores, labels = _scores(4, 200, 2000)
    les = [*DEFAULT_SCORE_BUCKETS, math.inf]
    pos, neg = _histograms(scores, labels, list(DEFAULT_SCORE_BUCKETS))
    pos_cum = dict(zip(les, np.cumsum(pos).tolist(), strict=True))
    neg_cum = dict(zip(les, np.cumsum(neg).tolist(), strict=True))
    assert drift.roc_auc_from_prometheus_buckets(pos_cum, neg_cum) == pytest.approx(
        drift.roc_auc_from_histograms(pos, neg), abs=1e-12
    )
    assert drift.parse_le("+Inf") == math.inf
    assert drift.parse_le("0.25") == 0.25


def test_auc_without_one_class_is_none_and_mismatch_raises() -> None:
    assert drift.roc_auc_from_histograms([0, 0, 0], [1, 2, 3]) is None
    assert drift.roc_auc_from_histograms([1, 2, 3], [0, 0, 0]) is None
    with pytest.raises(ValueError, match="same buckets"):
        drift.roc_auc_from_histograms([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="different buckets"):
        drift.roc_auc_from_prometheus_buckets({0.5: 1.0, math.inf: 2.0}, {0.4: 1.0, math.inf: 2.0})


def test_auc_of_perfectly_separated_and_reversed_histograms() -> None:
    assert drift.roc_auc_from_histograms([0, 0, 5], [7, 0, 0]) == 1.0
    assert drift.roc_auc_from_histograms([5, 0, 0], [0, 0, 7]) == 0.0
    assert drift.roc_auc_from_histograms([3, 3], [2, 2]) == 0.5


# --------------------------------------------------------------------------------------------------- PSI


def _numpy_psi(reference_counts: npt.NDArray[np.float64], actual_counts: npt.NDArray[np.float64]) -> float:
    e = np.clip(reference_counts / reference_counts.sum(), EPS, None)
    a = np.clip(actual_counts / actual_counts.sum(), EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def test_psi_matches_numpy_on_a_shifted_normal() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(0.0, 1.0, 20_000)
    shifted = rng.normal(0.5, 1.2, 5_000)
    edges = np.quantile(reference, np.linspace(0.1, 0.9, 9)).tolist()
    ref_counts = drift.bin_counts(reference.tolist(), edges)
    cur_counts = drift.bin_counts(shifted.tolist(), edges)
    expected = _numpy_psi(np.asarray(ref_counts, float), np.asarray(cur_counts, float))
    assert drift.psi_from_counts(ref_counts, cur_counts, EPS) == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1  # a real shift, not a trivially small number


def test_psi_with_an_empty_bin_is_finite_and_large() -> None:
    value = drift.psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5], EPS)
    assert math.isfinite(value)
    assert value == pytest.approx(_numpy_psi(np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])), rel=1e-12)
    assert value > 5.0


@given(
    st.lists(st.integers(1, 1000), min_size=2, max_size=20).flatmap(
        lambda ref: st.tuples(st.just(ref), st.lists(st.integers(0, 1000), min_size=len(ref), max_size=len(ref)))
    )
)
def test_psi_properties(counts: tuple[list[int], list[int]]) -> None:
    ref, cur = counts
    if sum(cur) == 0:
        with pytest.raises(ValueError, match="no observations"):
            drift.psi_from_counts(ref, cur, EPS)
        return
    value = drift.psi_from_counts(ref, cur, EPS)
    assert value >= 0.0
    assert value == pytest.approx(drift.psi_from_counts(cur, ref, EPS), rel=1e-9, abs=1e-12)
    assert drift.psi_from_counts(ref, ref, EPS) == pytest.approx(0.0, abs=1e-12)


def test_bin_counts_follow_the_reference_bins_convention() -> None:
    rng = np.random.default_rng(6)
    values = np.round(rng.uniform(0, 10, 500), 1).tolist()
    bins = ReferenceBins(edges=[1.0, 2.5, 5.0, 7.5], fractions=[0.2] * 5)
    expected = np.bincount([bins.bin_of(v) for v in values], minlength=5).tolist()
    assert drift.bin_counts(values, bins.edges) == expected


def test_psi_rejects_mismatched_or_negative_input() -> None:
    with pytest.raises(ValueError, match="mismatch"):
        drift.psi([0.5, 0.5], [1.0], EPS)
    with pytest.raises(ValueError, match="non-negative"):
        drift.fractions([1, -1])


# --------------------------------------------------------------------------------------------------- counters


def test_precision_and_recall_match_sklearn() -> None:
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 2, 500)
    y_pred = np.where(rng.uniform(size=500) < 0.8, y_true, 1 - y_true)
    tp = float(np.sum((y_pred == 1) & (y_true == 1)))
    fp = float(np.sum((y_pred == 1) & (y_true == 0)))
    fn = float(np.sum((y_pred == 0) & (y_true == 1)))
    assert drift.precision(tp, fp) == pytest.approx(precision_score(y_true, y_pred))
    assert drift.recall(tp, fn) == pytest.approx(recall_score(y_true, y_pred))
    assert drift.precision(0, 0) is None
    assert drift.recall(0, 0) is None


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (47, 120), (990, 1000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    wilson = drift.wilson_interval(k, n, CONFIDENCE)
    assert wilson is not None
    ci_w = binomtest(k, n).proportion_ci(CONFIDENCE, method="wilson")
    assert (wilson.lower, wilson.upper) == pytest.approx((ci_w.low, ci_w.high), abs=1e-9)
    assert wilson.lower <= k / n <= wilson.upper


def test_interval_of_recall_and_precision_and_invalid_counts() -> None:
    recall = drift.recall_interval(tp=80, fn=20, confidence=CONFIDENCE)
    precision = drift.precision_interval(tp=80, fp=0, confidence=CONFIDENCE)
    assert recall is not None
    assert precision is not None
    assert recall.estimate == pytest.approx(0.8)
    assert recall.lower < 0.8 < recall.upper
    assert precision.upper == pytest.approx(1.0)
    assert drift.wilson_interval(0, 0, CONFIDENCE) is None
    with pytest.raises(ValueError, match="invalid binomial"):
        drift.wilson_interval(5, 3, CONFIDENCE)


# --------------------------------------------------------------------------------------------------- calibration


def test_calibration_error_matches_sklearn_calibration_curve() -> None:
    rng = np.random.default_rng(8)
    scores = rng.beta(1.0, 3.0, 5000)
    labels = (rng.uniform(size=5000) < np.clip(scores * 1.3, 0, 1)).astype(int)
    n_bins = 10
    bins: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(n_bins)]
    for score, label in zip(scores.tolist(), labels.tolist(), strict=True):
        b = bins[drift.calibration_bin_of(score, n_bins)]
        b[0] += 1
        b[1] += score
        b[2] += label
    result = drift.calibration_error([drift.CalibrationBin(*b) for b in bins])
    prob_true, prob_pred = calibration_curve(labels, scores, n_bins=n_bins, strategy="uniform")
    counts = np.array([b[0] for b in bins if b[0] > 0])
    expected_ece = float(np.sum(counts / counts.sum() * np.abs(prob_true - prob_pred)))
    assert result is not None
    assert result.expected == pytest.approx(expected_ece, rel=1e-9)
    assert result.maximum == pytest.approx(float(np.max(np.abs(prob_true - prob_pred))), rel=1e-9)
    assert result.total == 5000


def test_calibration_bins_and_empty_input() -> None:
    assert drift.calibration_bin_of(0.0, 10) == 0
    assert drift.calibration_bin_of(0.999, 10) == 9
    assert drift.calibration_bin_of(1.0, 10) == 9
    assert drift.calibration_error([drift.CalibrationBin(0, 0, 0)]) is None
