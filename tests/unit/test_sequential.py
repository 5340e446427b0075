"""rollout.sequential: Wald's SPRT on a Gaussian difference, checked against known values, an exact DP, simulation."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from rollout import sequential as sq
from rollout.sequential import Decision


def test_wald_bounds_known_values() -> None:
    # Wald 1945: A = (1-β)/α, B = β/(1-α); α = β = 0.05 → log 19 = 2.944439, log(1/19) = -2.944439.
    low, high = sq.wald_bounds(0.05, 0.05)
    assert high == pytest.approx(2.944438979, abs=1e-9)
    assert low == pytest.approx(-2.944438979, abs=1e-9)
    low, high = sq.wald_bounds(0.01, 0.01)
    assert high == pytest.approx(math.log(99), abs=1e-12)
    assert low == pytest.approx(math.log(0.01 / 0.99), abs=1e-12)
    low, high = sq.wald_bounds(0.05, 0.2)
    assert (low, high) == pytest.approx((math.log(0.2 / 0.95), math.log(0.8 / 0.05)))


@pytest.mark.parametrize(("alpha", "beta"), [(0, 0.1), (0.1, 0), (0.6, 0.5), (1, 0.1)])
def test_wald_bounds_reject_bad_rates(alpha: float, beta: float) -> None:
    with pytest.raises(ValueError):
        sq.wald_bounds(alpha, beta)


def test_log_lr_is_gaussian_likelihood_ratio() -> None:
    # Independent check: log N(est; θ1, V) - log N(est; θ0, V).
    est, var, t0, t1 = -0.013, 0.0004, 0.0, -0.04

    def logpdf(x: float, mu: float) -> float:
        return -((x - mu) ** 2) / (2 * var) - 0.5 * math.log(2 * math.pi * var)

    assert sq.log_lr(est, var, t0, t1) == pytest.approx(logpdf(est, t1) - logpdf(est, t0), rel=1e-12)


def test_two_sample_zero_and_all_correct_give_finite_information() -> None:
    for counts in [(0, 10, 0, 10), (10, 10, 10, 10), (0, 1, 1, 1), (50, 50, 0, 50)]:
        est, var = sq.two_sample_difference(*counts)
        assert var > 0 and math.isfinite(var)
        result = sq.sprt_difference(est, var, 10, 0.02, 0.01, 0.01)
        assert math.isfinite(result.log_lr)


def test_two_sample_variance_known_value() -> None:
    # 80/100 vs 70/100 with +1/+1 pseudo-counts: (81/102)(21/102)/102 + (71/102)(31/102)/102.
    est, var = sq.two_sample_difference(80, 100, 70, 100)
    assert est == pytest.approx(0.1)
    assert var == pytest.approx((81 / 102) * (21 / 102) / 102 + (71 / 102) * (31 / 102) / 102)


def test_paired_difference_known_value_and_floor() -> None:
    est, var = sq.paired_difference(10, 4, 100)
    assert est == pytest.approx(0.06)
    b, c, n = 11, 5, 102
    assert var == pytest.approx(((b + c) - (b - c) ** 2 / n) / n**2)
    _, var0 = sq.paired_difference(0, 0, 100)
    assert var0 > 0


@pytest.mark.parametrize("bad", [(-1, 0, 10), (6, 6, 10), (0, 0, 0)])
def test_paired_difference_rejects_bad_counts(bad: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        sq.paired_difference(*bad)


def test_two_sample_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        sq.two_sample_difference(11, 10, 5, 10)
    with pytest.raises(ValueError):
        sq.two_sample_difference(0, 0, 5, 10)


def test_min_samples_keeps_tiny_samples_inconclusive() -> None:
    # One all-wrong candidate label against one all-right stable one: a huge estimated regression, but too few.
    est, var = sq.two_sample_difference(0, 1, 1, 1)
    result = sq.sprt_difference(est, var, 1, 0.02, 0.01, 0.01, min_samples=30)
    assert result.decision is Decision.INCONCLUSIVE
    assert result.samples_needed == 29


def test_decisions_and_samples_needed() -> None:
    est, var = sq.two_sample_difference(9000, 10000, 9000, 10000)
    assert sq.sprt_difference(est, var, 10000, 0.02, 0.01, 0.01).decision is Decision.SUCCESSFUL
    est, var = sq.two_sample_difference(8000, 10000, 9000, 10000)
    failed = sq.sprt_difference(est, var, 10000, 0.02, 0.01, 0.01)
    assert failed.decision is Decision.FAILED and failed.samples_needed is None
    est, var = sq.two_sample_difference(90, 100, 90, 100)
    pending = sq.sprt_difference(est, var, 100, 0.02, 0.01, 0.01)
    assert pending.decision is Decision.INCONCLUSIVE
    assert pending.samples_needed is not None and pending.samples_needed > 0
    assert pending.interval[0] < 0 < pending.interval[1]


# --- an exact DP for a Bernoulli SPRT, as an independent check of a simulated error rate --------------------------


def _bernoulli_sprt_steps(p0: float, p1: float) -> tuple[float, float]:
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


def exact_bernoulli_sprt(p: float, p0: float, p1: float, alpha: float, beta: float, horizon: int) -> float:
    """P(crossing the upper Wald boundary by ``horizon`` observations | true p), by DP over (n, successes)."""
    low, high = sq.wald_bounds(alpha, beta)
    up, down = _bernoulli_sprt_steps(p0, p1)
    alive = {0: 1.0}  # successes -> probability of still running
    upper = 0.0
    for n in range(1, horizon + 1):
        nxt: dict[int, float] = {}
        for k, prob in alive.items():
            for k2, q in ((k + 1, p), (k, 1 - p)):
                llr = k2 * up + (n - k2) * down
                if llr >= high:
                    upper += prob * q
                elif llr > low:
                    nxt[k2] = nxt.get(k2, 0.0) + prob * q
        alive = nxt
    return upper


def simulate_bernoulli_sprt(
    p: float, p0: float, p1: float, alpha: float, beta: float, horizon: int, reps: int, seed: int
) -> float:
    low, high = sq.wald_bounds(alpha, beta)
    up, down = _bernoulli_sprt_steps(p0, p1)
    rng = random.Random(seed)
    crossings = 0
    for _ in range(reps):
        llr = 0.0
        for _ in range(horizon):
            llr += up if rng.random() < p else down
            if llr >= high:
                crossings += 1
                break
            if llr <= low:
                break
    return crossings / reps


def test_exact_dp_agrees_with_simulation_and_wald() -> None:
    p0, p1, alpha, beta, horizon = 0.1, 0.2, 0.05, 0.05, 2000
    exact = exact_bernoulli_sprt(p0, p0, p1, alpha, beta, horizon)
    reps = 4000
    simulated = simulate_bernoulli_sprt(p0, p0, p1, alpha, beta, horizon, reps, seed=7)
    # The simulated rate lies inside a 99.9 % binomial band around the exact one.
    lo, hi = binom.ppf([0.0005, 0.9995], reps, exact) / reps
    assert lo <= simulated <= hi
    # Wald's inequalities: α' ≤ α/(1-β), β' ≤ β/(1-α).
    assert exact <= alpha / (1 - beta)
    power = exact_bernoulli_sprt(p1, p0, p1, alpha, beta, horizon)
    assert 1 - power <= beta / (1 - alpha) + 1e-9


# --- simulated error rates of the Gaussian-difference SPRT under many looks -----------------------------------------


def _run(p_cand: float, p_stable: float, margin: float, alpha: float, beta: float, rng: random.Random) -> Decision:
    step, looks = 50, 120
    sc = ss = 0
    for look in range(1, looks + 1):
        sc += sum(rng.random() < p_cand for _ in range(step))
        ss += sum(rng.random() < p_stable for _ in range(step))
        n = look * step
        est, var = sq.two_sample_difference(sc, n, ss, n)
        decision = sq.sprt_difference(est, var, n, margin, alpha, beta, min_samples=100).decision
        if decision is not Decision.INCONCLUSIVE:
            return decision
    return Decision.INCONCLUSIVE


@pytest.mark.parametrize("seed", [1, 2])
def test_simulated_error_rates_within_alpha_beta(seed: int) -> None:
    rng = random.Random(seed)
    alpha = beta = 0.05
    margin, base, reps = 0.05, 0.8, 300
    rollbacks = sum(_run(base, base, margin, alpha, beta, rng) is Decision.FAILED for _ in range(reps))
    bad = base - 2 * margin
    promotions = sum(_run(bad, base, margin, alpha, beta, rng) is Decision.SUCCESSFUL for _ in range(reps))
    # Rates ≤ the nominal ones (up to a binomial allowance of 2 standard errors at the nominal rate).
    allowance = 2 * math.sqrt(alpha * (1 - alpha) / reps)
    assert rollbacks / reps <= alpha + allowance
    assert promotions / reps <= beta + allowance


@given(
    n=st.integers(min_value=1, max_value=5000),
    stable_frac=st.floats(min_value=0, max_value=1),
    cand_frac=st.floats(min_value=0, max_value=1),
    extra=st.integers(min_value=1, max_value=500),
)
def test_more_candidate_evidence_never_turns_successful_into_failed(
    n: int, stable_frac: float, cand_frac: float, extra: int
) -> None:
    ss = round(stable_frac * n)
    sc = round(cand_frac * n)
    sc2 = min(n, sc + extra)

    def decide(successes: int) -> Decision:
        est, var = sq.two_sample_difference(successes, n, ss, n)
        return sq.sprt_difference(est, var, n, 0.02, 0.01, 0.01).decision

    if decide(sc) is Decision.SUCCESSFUL:
        assert decide(sc2) is not Decision.FAILED
