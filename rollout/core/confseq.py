"""An anytime-valid confidence sequence for a proportion (error rates, agreement): the beta-binomial mixture.

For Bernoulli observations with true rate p, Robbins' mixture martingale (Robbins 1970, *Ann. Math. Statist.*
41:1397-1409; the beta-binomial case in Howard, Ramdas, McAuliffe & Sekhon 2021, *Ann. Statist.* 49:1055-1080,
section 3) with a Beta(a, b) mixing distribution is

    M_n(p) = B(a + S, b + n - S) / B(a, b) / (p^S · (1 - p)^(n - S))

for S events in n trials. Under p it is a nonnegative martingale with M_0 = 1, so by Ville's inequality
P(∃ n: M_n(p) ≥ 1/α) ≤ α: the set ``{p : M_n(p) < 1/α}`` covers the true rate at every n at once, however often it
is looked at and whenever the looking stops. ``log M_n`` is convex in p (minimal at S/n), so the set is an interval;
its ends are found by bisection.

A health gate ``value <= t`` (an error rate at most t) is then judged as: Failed when the lower end at level α
exceeds t (P(roll back | p ≤ t) ≤ α), Successful when the upper end at level β is at most t
(P(promote | p > t) ≤ β), Inconclusive otherwise — the gate's own sample minimum: a handful of calls never decides.

The mixing distribution is centred on the threshold, Beta(1, (1 - t)/t) (mean t, one prior event): it makes the
sequence tightest for rates near the limit the gate is about. Pure stdlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_BISECTION_STEPS = 56  # below 1e-16 of the unit interval


def log_mixture(events: float, trials: float, p: float, a: float, b: float) -> float:
    """log M_n(p) for ``events`` in ``trials`` (real-valued counts are accepted: ``increase()`` extrapolates)."""
    if not 0.0 < p < 1.0:
        return math.inf
    failures = trials - events
    return (_log_beta(a + events, b + failures) - _log_beta(a, b)) - events * math.log(p) - failures * math.log1p(-p)


def _log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def prior_for(threshold: float) -> tuple[float, float]:
    """Beta(1, (1 - t)/t): mean ``threshold``, one prior event (at least Beta(1, 1))."""
    t = min(max(threshold, 1e-6), 0.5)
    return 1.0, max((1.0 - t) / t, 1.0)


def interval(events: float, trials: float, alpha: float, a: float = 1.0, b: float = 1.0) -> tuple[float, float]:
    """The (1 - α) anytime-valid interval for the rate after ``events`` in ``trials``."""
    return lower_end(events, trials, alpha, a, b), upper_end(events, trials, alpha, a, b)


def lower_end(events: float, trials: float, alpha: float, a: float = 1.0, b: float = 1.0) -> float:
    """The lower end of :func:`interval` alone (one root to find, not two)."""
    return _end(events, trials, alpha, a, b, lower=True)


def upper_end(events: float, trials: float, alpha: float, a: float = 1.0, b: float = 1.0) -> float:
    """The upper end of :func:`interval` alone."""
    return _end(events, trials, alpha, a, b, lower=False)


def _end(events: float, trials: float, alpha: float, a: float, b: float, *, lower: bool) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if trials < 0 or events < 0 or events > trials:
        raise ValueError(f"need 0 <= events <= trials, got {events} of {trials}")
    if trials == 0:
        return 0.0 if lower else 1.0
    level = math.log(1.0 / alpha)
    centre = min(max(events / trials, 1e-12), 1.0 - 1e-12)
    if log_mixture(events, trials, centre, a, b) >= level:  # cannot happen for a proper mixture; be safe
        return centre
    if lower:
        return 0.0 if events == 0 else _edge(events, trials, level, a, b, 0.0, centre)
    return 1.0 if events == trials else _edge(events, trials, level, a, b, 1.0, centre)


def _edge(events: float, trials: float, level: float, a: float, b: float, outside: float, inside: float) -> float:
    """The point between ``outside`` (rejected) and ``inside`` (covered) where log M crosses ``level``."""
    out, inn = outside, inside
    for _ in range(_BISECTION_STEPS):
        mid = (out + inn) / 2.0
        if log_mixture(events, trials, mid, a, b) >= level:
            out = mid
        else:
            inn = mid
    return inn


@dataclass(frozen=True)
class RateJudgement:
    """A rate judged against an upper (``value <= t``) or lower (``value >= t``) limit."""

    decision: str  # "Successful" | "Failed" | "Inconclusive"
    estimate: float | None
    #: The two-sided interval: lower end at level α (roll-back side), upper at level β, for an upper limit.
    interval: tuple[float, float]
    trials: float
    #: Further trials to a decision if the rate stays at its estimate (None when decided or not estimable).
    trials_needed: float | None


def judge_rate(
    events: float,
    trials: float,
    threshold: float,
    *,
    upper_limit: bool,
    alpha: float,
    beta: float,
    detail: bool = True,
) -> RateJudgement:
    """Failed only when the α-sequence excludes every rate within the limit; Successful only when the β-sequence
    lies within it (see the module docstring). The decision costs one evaluation of the mixture at the threshold
    (the sequence is an interval around the estimate); ``detail`` adds the interval and the trials still needed."""
    if not upper_limit:  # value >= t ⟺ (1 - value) <= 1 - t: the same test on the complement
        judged = judge_rate(trials - events, trials, 1.0 - threshold, upper_limit=True, alpha=alpha, beta=beta,
                            detail=detail)  # fmt: skip
        low, high = judged.interval
        estimate = None if judged.estimate is None else 1.0 - judged.estimate
        return RateJudgement(judged.decision, estimate, (1.0 - high, 1.0 - low), trials, judged.trials_needed)
    a, b = prior_for(threshold)
    estimate = events / trials if trials > 0 else None
    at_limit = log_mixture(events, trials, threshold, a, b) if trials > 0 else 0.0
    if estimate is not None and estimate > threshold and at_limit >= math.log(1.0 / alpha):
        decision = "Failed"
    elif estimate is not None and estimate < threshold and at_limit >= math.log(1.0 / beta):
        decision = "Successful"
    else:
        decision = "Inconclusive"
    if not detail:
        return RateJudgement(decision, estimate, (math.nan, math.nan), trials, None)
    bounds = (lower_end(events, trials, alpha, a, b), upper_end(events, trials, beta, a, b))
    needed = None if decision != "Inconclusive" else _trials_needed(estimate, trials, threshold, alpha, beta, a, b)
    return RateJudgement(decision, estimate, bounds, trials, needed)


def _trials_needed(
    estimate: float | None, trials: float, threshold: float, alpha: float, beta: float, a: float, b: float
) -> float | None:
    """Further trials at which the current rate would decide (doubling, then bisection; None when it never would)."""
    if estimate is None:
        estimate = 0.0
    if math.isclose(estimate, threshold):
        return None
    level = math.log(1.0 / (alpha if estimate > threshold else beta))

    def decides(n: float) -> bool:
        return log_mixture(estimate * n, n, threshold, a, b) >= level

    high = max(trials, 1.0)
    for _ in range(40):
        high *= 2.0
        if decides(high):
            break
    else:
        return None
    low = max(trials, 1.0)
    for _ in range(60):
        mid = (low + high) / 2.0
        if decides(mid):
            high = mid
        else:
            low = mid
    return float(max(math.ceil(high - trials), 1))
