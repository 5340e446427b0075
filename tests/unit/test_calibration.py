"""Centred (interpolated) isotonic calibration keeps the booster's ranking and stays as well calibrated as the step
fit it replaces (service/training/calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from service.artifacts.bundle import Calibration
from service.settings import TrainSettings
from service.training.calibration import fit_interpolated_isotonic, keeps_order, pooled_blocks
from service.training.evaluate import choose_calibration, expected_calibration_error, fit_isotonic


def _scores(seed: int, n: int, base_rate: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Booster-like raw scores (float32, many distinct values) and labels drawn from a miscalibrated truth."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < base_rate).astype(np.int64)
    margin = rng.normal(-3.0, 1.2, n) + 3.2 * y
    raw = (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)
    return raw, y


def test_the_step_fit_makes_ties_and_the_interpolated_fit_keeps_the_raw_ranking() -> None:
    raw, y = _scores(1, 20_000)
    fit_raw, fit_y, test_raw, test_y = raw[:10_000], y[:10_000], raw[10_000:], y[10_000:]
    step = fit_isotonic(fit_raw, fit_y)
    centred = fit_interpolated_isotonic(fit_raw, fit_y)
    raw_pr_auc = average_precision_score(test_y, test_raw)
    assert not keeps_order(step, test_raw)
    assert average_precision_score(test_y, step.apply(test_raw)) < raw_pr_auc - 1e-3  # the ties cost PR-AUC
    assert keeps_order(centred, test_raw)
    served = centred.apply(test_raw)
    assert average_precision_score(test_y, served) == pytest.approx(raw_pr_auc, abs=1e-12)
    assert roc_auc_score(test_y, served) == pytest.approx(roc_auc_score(test_y, test_raw), abs=1e-12)


def test_the_interpolated_fit_is_calibrated_as_well_as_the_step_fit_out_of_sample() -> None:
    raw, y = _scores(2, 60_000)
    fit_raw, fit_y, test_raw, test_y = raw[:30_000], y[:30_000], raw[30_000:], y[30_000:]
    step = fit_isotonic(fit_raw, fit_y).apply(test_raw)
    centred = fit_interpolated_isotonic(fit_raw, fit_y).apply(test_raw)
    assert brier_score_loss(test_y, centred) <= brier_score_loss(test_y, step) * 1.01
    assert expected_calibration_error(test_y, centred, 10) <= expected_calibration_error(test_y, step, 10) + 0.002
    assert brier_score_loss(test_y, centred) < brier_score_loss(test_y, test_raw)  # it does calibrate


def test_knots_sit_at_block_centroids_with_the_block_rates() -> None:
    raw = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    centroids, rates, weights = pooled_blocks(raw, y)
    # PAV: [0.1, 0.2] rate 0; [0.3, 0.4, 0.6] pooled (1, 0, 0) → 1/3; [0.7, 0.8, 0.9] rate 1
    np.testing.assert_allclose(centroids, [0.15, (0.3 + 0.4 + 0.6) / 3, 0.8])
    np.testing.assert_allclose(rates, [0.0, 1 / 3, 1.0])
    np.testing.assert_allclose(weights, [2, 3, 3])
    calibration = fit_interpolated_isotonic(raw, y)
    inside = 1 / 16  # half an observation of the 8 fitted
    assert calibration.method == "isotonic"
    np.testing.assert_allclose(calibration.x, [0.0, 0.15, (0.3 + 0.4 + 0.6) / 3, 0.8, 1.0])
    np.testing.assert_allclose(calibration.y, [0.0, inside, 1 / 3, 1 - inside, 1.0])


def test_blocks_of_equal_rate_are_pooled_so_the_knots_rise_strictly() -> None:
    raw = np.array([0.1, 0.2, 0.3, 0.4])
    y = np.array([0, 1, 0, 1])  # PAV leaves (0.1) 0, (0.2, 0.3) 1/2, (0.4) 1 — no equal neighbours
    assert list(pooled_blocks(raw, y)[1]) == [0.0, 0.5, 1.0]
    tied = pooled_blocks(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 0]))
    assert tied[1].size == 1 and tied[1][0] == pytest.approx(0.5)  # one block: every rate equal after pooling


def test_blocks_that_clipping_makes_equal_are_pooled() -> None:
    """Found by hypothesis: the isotonic fit returns 1.2e-38 beside 0 for these raw scores; both clip to 1/6."""
    raw = np.array([0.0, 1.1754943508222875e-38, 1.0], dtype=np.float32)
    calibration = fit_interpolated_isotonic(raw, np.array([0, 0, 1]))
    assert all(b > a for a, b in zip(calibration.y, calibration.y[1:], strict=False)), calibration.y
    assert all(b > a for a, b in zip(calibration.x, calibration.x[1:], strict=False)), calibration.x


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=2, max_size=300),
    seed=st.integers(0, 2**16),
)
def test_the_map_is_strictly_increasing_on_the_unit_interval(raw: list[float], seed: int) -> None:
    values = np.asarray(raw, dtype=np.float32)
    y = (np.random.default_rng(seed).random(values.size) < 0.3).astype(np.int64)
    calibration = fit_interpolated_isotonic(values, y)
    assert all(b > a for a, b in zip(calibration.x, calibration.x[1:], strict=False))
    assert all(b > a for a, b in zip(calibration.y, calibration.y[1:], strict=False))
    assert calibration.x[0] == 0.0 and calibration.x[-1] == 1.0
    assert calibration.y[0] >= 0.0 and calibration.y[-1] <= 1.0
    probe = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    assert np.all(np.diff(calibration.apply(probe)) > 0.0)


def test_it_is_stored_as_data_that_round_trips_through_the_manifest_json() -> None:
    raw, y = _scores(3, 5_000)
    calibration = fit_interpolated_isotonic(raw, y)
    restored = Calibration(**json.loads(json.dumps(calibration.__dict__)))
    np.testing.assert_array_equal(restored.apply(raw), calibration.apply(raw))


def test_the_default_training_choice_keeps_the_ranking() -> None:
    raw, y = _scores(4, 40_000)
    methods = TrainSettings().calibration_methods
    assert "isotonic" not in methods  # the step fit is there to compare with, not to serve
    choice = choose_calibration(raw, y, methods, 0.5)
    assert keeps_order(choice.calibration, raw[raw > 1e-5])  # Platt clips logit at 1e-6: below it, ties
