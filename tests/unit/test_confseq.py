"""rollout.core.confseq: the beta-binomial mixture confidence sequence, against closed forms, an independent
implementation
(scipy's betaln and brentq), and its anytime guarantee by simulation at fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.special import betaln

from rollout.core import confseq


@pytest.mark.parametrize("n", [1, 10, 100, 1000, 5000])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.001])
def test_no_events_under_a_uniform_mixture_has_a_closed_form(n: int, alpha: float) -> None:
    """S = 0, Beta(1, 1): M_n(p) = 1 / ((n + 1)(1 - p)^n), so the upper end is 1 - (α / (n + 1))^(1/n)."""
    low, high = confseq.interval(0, n, alpha)
    assert low == 0.0
    assert high == pytest.approx(1.0 - (alpha / (n + 1)) ** (1.0 / n), rel=1e-9)


def _independent(events: float, trials: float, alpha: float, a: float, b: float) -> tuple[float, float]:
    def excess(p: float) -> float:
        log_m = betaln(a + events, b + trials - events) - betaln(a, b)
        log_m -= events * math.log(p) + (trials - events) * math.log(1.0 - p)
        return float(log_m - math.log(1.0 / alpha))

    centre = events / trials
    low = 0.0 if events == 0 else brentq(excess, 1e-15, centre, xtol=1e-14)
    high = 1.0 if events == trials else brentq(excess, centre, 1.0 - 1e-15, xtol=1e-14)
    return low, high


@pytest.mark.parametrize(
    ("events", "trials", "alpha", "prior"),
    [(3, 40, 0.05, (1.0, 1.0)), (12, 1000, 0.01, (1.0, 99.0)), (500, 1000, 0.001, (1.0, 1.0)),
     (37.4, 812.9, 0.0025, (1.0, 19.0)), (190, 200, 0.01, (1.0, 1.0))],
)  # fmt: skip
def test_the_interval_matches_an_independent_root_finder(
    events: float, trials: float, alpha: float, prior: tuple[float, float]
) -> None:
    ours = confseq.interval(events, trials, alpha, *prior)
    theirs = _independent(events, trials, alpha, *prior)
    assert ours == pytest.approx(theirs, abs=1e-9)


@given(
    trials=st.integers(1, 5000),
    share=st.floats(0.0, 1.0),
    alpha=st.floats(0.0005, 0.2),
)
def test_the_interval_contains_the_estimate_and_narrows_with_confidence(
    trials: int, share: float, alpha: float
) -> None:
    events = round(share * trials)
    low, high = confseq.interval(events, trials, alpha)
    assert 0.0 <= low <= events / trials <= high <= 1.0
    wider = confseq.interval(events, trials, alpha / 2)
    assert wider[0] <= low + 1e-12 and high <= wider[1] + 1e-12


def test_coverage_holds_at_every_look_at_once() -> None:
    """Ville: P(the sequence ever misses p) ≤ α, over 2,000 looks per run (a look after every 5 trials)."""
    rng = np.random.default_rng(20261203)
    alpha, p, runs, looks, step = 0.05, 0.02, 400, 2000, 5
    a, b = confseq.prior_for(p)
    missed = 0
    for _ in range(runs):
        draws = np.cumsum(rng.random(looks * step) < p)
        # p is outside the sequence at n exactly when M_n(p) >= 1/α (the set is {p : M_n(p) < 1/α})
        if any(confseq.log_mixture(float(draws[n - 1]), float(n), p, a, b) >= math.log(1 / alpha)
               for n in range(step, looks * step + 1, step)):  # fmt: skip
            missed += 1
    assert missed / runs <= alpha  # Ville's bound is conservative


def _sequential(rate: float, threshold: float, seed: int, runs: int = 300, looks: int = 500) -> dict[str, float]:
    """Share of runs Failed / Successful / undecided, judged after every 20 calls up to 10,000."""
    step = 20
    rng = np.random.default_rng(seed)
    outcomes = {"Failed": 0, "Successful": 0, "Inconclusive": 0}
    for _ in range(runs):
        events = np.cumsum(rng.random(looks * step) < rate)
        decision = "Inconclusive"
        for k in range(1, looks + 1):
            n = k * step
            judged = confseq.judge_rate(float(events[n - 1]), float(n), threshold, upper_limit=True, alpha=0.01,
                                        beta=0.01, detail=False)  # fmt: skip
            if judged.decision != "Inconclusive":
                decision = judged.decision
                break
        outcomes[decision] += 1
    return {k: v / runs for k, v in outcomes.items()}


def test_a_rate_within_the_limit_is_almost_never_failed_however_often_it_is_judged() -> None:
    at_limit = _sequential(0.01, 0.01, seed=1)  # the worst case for a false roll-back: exactly at the limit
    assert at_limit["Failed"] <= 0.01
    healthy = _sequential(0.002, 0.01, seed=2)
    assert healthy["Failed"] == 0.0 and healthy["Successful"] >= 0.95


def test_a_rate_beyond_the_limit_is_almost_never_promoted_and_a_bad_one_is_failed() -> None:
    beyond = _sequential(0.0101, 0.01, seed=3)  # just beyond: the worst case for a false promotion
    assert beyond["Successful"] <= 0.01
    broken = _sequential(0.05, 0.01, seed=4)
    assert broken["Failed"] >= 0.99


def test_a_lower_limit_is_the_same_test_on_the_complement() -> None:
    agree = confseq.judge_rate(995, 1000, 0.95, upper_limit=False, alpha=0.01, beta=0.01)
    disagree = confseq.judge_rate(5, 1000, 0.05, upper_limit=True, alpha=0.01, beta=0.01)
    assert agree.decision == disagree.decision == "Successful"
    assert agree.interval == pytest.approx((1 - disagree.interval[1], 1 - disagree.interval[0]))
    assert agree.estimate == pytest.approx(0.995)


def test_edge_cases_and_what_is_still_needed() -> None:
    assert confseq.interval(0, 0, 0.05) == (0.0, 1.0)
    assert confseq.interval(7, 7, 0.05)[1] == 1.0
    few = confseq.judge_rate(0, 20, 0.01, upper_limit=True, alpha=0.001, beta=0.01)
    assert few.decision == "Inconclusive" and few.trials_needed is not None and few.trials_needed > 100
    enough = confseq.judge_rate(0, 20 + few.trials_needed, 0.01, upper_limit=True, alpha=0.001, beta=0.01)
    assert enough.decision == "Successful"
    one_error_in_40 = confseq.judge_rate(1, 40, 0.01, upper_limit=True, alpha=0.001, beta=0.01)
    assert one_error_in_40.decision == "Inconclusive"  # 2.5 % on 40 calls is no evidence of > 1 %
    with pytest.raises(ValueError, match="alpha"):
        confseq.interval(1, 2, 1.5)
    with pytest.raises(ValueError, match="events"):
        confseq.interval(3, 2, 0.05)
