"""Evaluation functions checked against scikit-learn and brute force on random data."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from service.artifacts.bundle import logit
from service.settings import TrainSettings
from service.training.evaluate import (
    FrozenSetIntegrityError,
    bin_fractions,
    choose_calibration,
    choose_threshold,
    classification_metrics,
    file_sha256,
    fit_isotonic,
    fit_platt,
    gap_edges,
    load_frozen_set,
    policy_cost,
    psi,
    reference_bins,
    top_k_key,
)


def _noisy_scores(seed: int, n: int = 4000, base_rate: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < base_rate).astype(np.int64)
    scores = np.clip(rng.normal(0.25 + 0.35 * y, 0.18), 0.0, 1.0)
    return y, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    y, s = _noisy_scores(seed)
    threshold = 0.5
    m = classification_metrics(y, s, threshold, (1.0, 5.0), calibration_bins=10)
    pred = (s >= threshold).astype(int)
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, s))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["brier"] == pytest.approx(brier_score_loss(y, s))
    assert m["positives"] == y.sum()
    assert m["negatives"] == y.size - y.sum()


def test_top_k_and_ece_match_brute_force() -> None:
    y, s = _noisy_scores(3, n=1999)
    m = classification_metrics(y, s, 0.5, (0.5, 1.0, 5.0), calibration_bins=7)
    for k in (0.5, 1.0, 5.0):
        n_top = math.ceil(y.size * k / 100.0)
        ranked = sorted(range(y.size), key=lambda i: (-s[i], i))[:n_top]
        caught = sum(int(y[i]) for i in ranked)
        assert m[top_k_key("recall", k)] == pytest.approx(caught / y.sum())
        assert m[top_k_key("lift", k)] == pytest.approx((caught / n_top) / y.mean())
    ece = 0.0
    for b in range(7):
        in_bin = [i for i in range(y.size) if min(int(s[i] * 7), 6) == b]
        if in_bin:
            ece += len(in_bin) / y.size * abs(np.mean(y[in_bin]) - np.mean(s[in_bin]))
    assert m["ece"] == pytest.approx(ece)


def test_single_class_gives_nan_aucs() -> None:
    m = classification_metrics(np.zeros(50), np.linspace(0, 1, 50), 0.5, ())
    assert math.isnan(m["pr_auc"]) and math.isnan(m["roc_auc"])
    assert m["recall"] == 0.0


def _precision_at(y: np.ndarray, s: np.ndarray, t: float) -> float:
    flagged = s >= t
    return float(y[flagged].mean()) if flagged.any() else 0.0


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_target_precision_is_lowest_threshold_reaching_target(target: float) -> None:
    y, s = _noisy_scores(4, n=3000, base_rate=0.1)
    s = np.round(s, 3)  # ties, as isotonic calibration produces
    policy = choose_threshold(y, s, TrainSettings(threshold_policy="target_precision", target_precision=target))
    assert policy.target_reached is True
    assert _precision_at(y, s, policy.threshold) >= target
    lower = np.unique(s[s < policy.threshold])
    assert all(_precision_at(y, s, t) < target for t in lower)
    assert policy.validation_precision == pytest.approx(_precision_at(y, s, policy.threshold))
    assert policy.validation_recall == pytest.approx(y[s >= policy.threshold].sum() / y.sum())


def test_unreachable_target_precision_uses_max_precision_and_says_so() -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    policy = choose_threshold(y, s, TrainSettings(target_precision=0.95))
    assert policy.target_reached is False
    best = max(_precision_at(y, s, t) for t in s)
    assert policy.validation_precision == pytest.approx(best)
    assert _precision_at(y, s, policy.threshold) == pytest.approx(best)


@pytest.mark.parametrize(("c_fn", "c_fp"), [(50.0, 5.0), (1.0, 1.0), (2.0, 30.0)])
def test_cost_policy_minimises_cost_versus_brute_force(c_fn: float, c_fp: float) -> None:
    y, s = _noisy_scores(5, n=1500, base_rate=0.08)
    settings = TrainSettings(threshold_policy="cost", cost_false_negative=c_fn, cost_false_positive=c_fp)
    policy = choose_threshold(y, s, settings)
    candidates = [*np.unique(s), np.inf]
    brute = min(policy_cost(y, s, t, c_fn, c_fp) for t in candidates)
    assert policy_cost(y, s, policy.threshold, c_fn, c_fp) == pytest.approx(brute)
    assert policy.policy == "cost"


def test_cost_policy_can_flag_nothing() -> None:
    y = np.array([0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    policy = choose_threshold(y, s, TrainSettings(threshold_policy="cost", cost_false_negative=1.0))
    assert policy.threshold > s.max()


def _miscalibrated(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.beta(0.5, 6.0, n)
    y = (rng.random(n) < p).astype(np.int64)
    raw = np.clip(p, 1e-4, 1 - 1e-4) ** 0.4  # overconfident, strongly miscalibrated
    return raw, y


@pytest.mark.parametrize("fitter", [fit_isotonic, fit_platt])
def test_calibration_reduces_brier_on_held_out_rows(fitter: object) -> None:
    raw, y = _miscalibrated(6, 8000)
    calibration = fitter(raw[:4000], y[:4000])  # type: ignore[operator]
    before = brier_score_loss(y[4000:], raw[4000:])
    after = brier_score_loss(y[4000:], calibration.apply(raw[4000:]))
    assert after < before * 0.8


def test_isotonic_breakpoints_reproduce_sklearn() -> None:
    raw, y = _miscalibrated(7, 3000)
    reference = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, y)
    probe = np.concatenate([np.linspace(-0.1, 1.1, 500), raw[:200]])
    np.testing.assert_allclose(fit_isotonic(raw, y).apply(probe), reference.predict(probe), atol=1e-12)


def test_platt_reproduces_sklearn_logistic_regression() -> None:
    raw, y = _miscalibrated(8, 3000)
    reference = LogisticRegression(penalty=None).fit(logit(raw).reshape(-1, 1), y)
    probe = np.linspace(0.001, 0.999, 200, dtype=np.float32)
    expected = reference.predict_proba(logit(probe).reshape(-1, 1))[:, 1]
    np.testing.assert_allclose(fit_platt(raw, y).apply(probe), expected, atol=1e-9)


def test_choose_calibration_picks_lower_held_out_brier_and_refits_on_all() -> None:
    raw, y = _miscalibrated(9, 6000)
    choice = choose_calibration(raw, y, ("isotonic", "platt"), 0.5)
    assert choice.n_fit == 3000 and choice.n_holdout == 3000
    other = "platt" if choice.method == "isotonic" else "isotonic"
    assert choice.holdout_brier[choice.method] <= choice.holdout_brier[other]
    held_raw, held_y = raw[3000:], y[3000:]
    fitted_on_half = (fit_isotonic if choice.method == "isotonic" else fit_platt)(raw[:3000], y[:3000])
    assert choice.holdout_brier[choice.method] == pytest.approx(
        brier_score_loss(held_y, fitted_on_half.apply(held_raw))
    )
    refit = (fit_isotonic if choice.method == "isotonic" else fit_platt)(raw, y)
    np.testing.assert_allclose(choice.calibration.apply(raw), refit.apply(raw))
    assert choice.holdout_brier[choice.method] < choice.holdout_brier["identity"]


def test_choose_calibration_with_one_class_is_identity() -> None:
    choice = choose_calibration(np.linspace(0, 1, 100), np.zeros(100), ("isotonic",), 0.5)
    assert choice.method == "identity" and choice.note


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(10).lognormal(size=5000),
        np.concatenate([np.zeros(3000), np.random.default_rng(11).poisson(3, 2000)]),
        np.full(100, 7.0),
    ],
)
def test_reference_bins_fractions_sum_to_one_and_edges_increase(values: np.ndarray) -> None:
    bins = reference_bins(values, 10)
    assert len(bins.fractions) == len(bins.edges) + 1
    assert sum(bins.fractions) == pytest.approx(1.0)
    assert all(b > a for a, b in zip(bins.edges, bins.edges[1:], strict=False))
    counts = np.bincount([bins.bin_of(v) for v in values], minlength=len(bins.fractions))
    np.testing.assert_allclose(bins.fractions, counts / values.size)


def test_reference_bins_of_continuous_values_are_near_equal_mass() -> None:
    bins = reference_bins(np.random.default_rng(12).normal(size=10_000), 10)
    assert len(bins.edges) == 9
    assert max(bins.fractions) - min(bins.fractions) < 0.002


def test_reference_edges_sit_between_observed_values_so_rounding_moves_no_mass() -> None:
    """Repeated values (one age per account, many requests each): no observed value lies on an edge, so a client
    that rounds its values to 4 decimals lands in the same bins."""
    rng = np.random.default_rng(14)
    ages = rng.gamma(2.0, 1.5, size=800)
    values = rng.choice(ages, size=20_000)
    bins = reference_bins(values, 10)
    assert not set(bins.edges) & set(values.tolist())
    rounded = bin_fractions(np.round(values, 4), bins.edges)
    assert psi(bins.fractions, rounded) < 1e-3
    assert gap_edges(np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 3.0, 4.0])) == [1.5, 3.0]


def test_psi_zero_for_same_distribution_and_grows_with_shift() -> None:
    rng = np.random.default_rng(13)
    reference = reference_bins(rng.normal(size=20_000), 10)
    same = bin_fractions(rng.normal(size=20_000), reference.edges)
    shifted = bin_fractions(rng.normal(0.5, 1.0, 20_000), reference.edges)
    far = bin_fractions(rng.normal(1.5, 1.0, 20_000), reference.edges)
    assert psi(reference.fractions, same) < 0.01
    assert 0.1 < psi(reference.fractions, shifted) < psi(reference.fractions, far)
    # hand-computed: 0.4·ln(0.9/0.5) + (−0.4)·ln(0.1/0.5)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) - 0.4 * math.log(0.2))
    with pytest.raises(ValueError, match="equal bin counts"):
        psi([0.5, 0.5], [1.0])


def test_frozen_set_checksum_is_verified(tmp_path: object) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    frame = pd.DataFrame({"timestamp": ["2026-01-02", "2026-01-01"], "is_fraud": [0, 1], "account_id": ["a", "b"]})
    data = directory / "frozen.csv.gz"
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        frame.to_csv(handle, index=False)
    meta = directory / "frozen.json"
    meta.write_text(json.dumps({"file": data.name, "sha256": file_sha256(data)}))
    loaded = load_frozen_set(meta)
    assert list(loaded["is_fraud"]) == [1, 0]  # time-ordered
    data.write_bytes(data.read_bytes() + b"\x00")
    with pytest.raises(FrozenSetIntegrityError):
        load_frozen_set(meta)
