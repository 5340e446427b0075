"""Sequential tests for the relative outcome gates: Wald's SPRT on an estimated difference (pure; stdlib only).

A relative gate ``candidate - stable >= -δ`` ("the candidate is at most δ worse") is a test of

* ``H_good``: Δ = θ0 = 0 (no regression) against
* ``H_bad``:  Δ = θ1 = -2δ (a regression twice the tolerated margin),

where Δ is the true difference candidate - stable. The estimate ``est`` of Δ is approximately Gaussian with variance
``V`` (Whitehead 1997, *The Design and Analysis of Sequential Clinical Trials*, score/information form, information
``I = 1/V``), so the log likelihood ratio of H_bad to H_good is

    log LR = I · ((θ1 - θ0) · est - (θ1² - θ0²) / 2)

and Wald's SPRT (Wald 1945, *Ann. Math. Statist.* 16:117-186) stops with

* **Failed** (roll back)  when ``log LR >= log((1 - β) / α)``  (α = P(roll back | H_good), the false rollback rate),
* **Successful** (promote) when ``log LR <= log(β / (1 - α))`` (β = P(promote | H_bad), the false promotion rate),
* **Inconclusive** otherwise (keep collecting).

Wald's bounds hold approximately for any number of looks (the overshoot makes them conservative). Two variance
functions: two independent binomials (canary / A-B: each arm's own requests) with a pseudo-count floor so that zero
counts or all-correct samples never give infinite information, and paired proportions from discordant counts
(shadow: both versions scored the same requests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist

#: Pseudo-counts added to each binomial (Agresti-Caffo style: +1 success, +1 failure), so p̂(1-p̂) > 0.
PSEUDO_COUNT = 1.0


class Decision(StrEnum):
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


@dataclass(frozen=True)
class SprtResult:
    decision: Decision
    log_lr: float
    lower: float
    upper: float
    #: The estimated difference candidate - stable, and a normal interval around it at the given confidence.
    estimate: float
    interval: tuple[float, float]
    samples: float
    #: Estimated further samples (same unit as ``samples``) to reach a boundary at the current effect; None if decided.
    samples_needed: float | None
    reason: str = ""


def wald_bounds(alpha: float, beta: float) -> tuple[float, float]:
    """Wald's (lower, upper) log-likelihood-ratio boundaries: (log(β/(1-α)), log((1-β)/α))."""
    if not (0 < alpha < 1 and 0 < beta < 1 and alpha + beta < 1):
        raise ValueError(f"need 0 < alpha, beta and alpha + beta < 1, got alpha={alpha}, beta={beta}")
    return math.log(beta / (1 - alpha)), math.log((1 - beta) / alpha)


def log_lr(estimate: float, variance: float, theta0: float, theta1: float) -> float:
    """Whitehead's score-form log LR of θ1 against θ0 for a Gaussian estimate with the given variance."""
    if variance <= 0 or not math.isfinite(variance):
        raise ValueError(f"variance must be positive and finite, got {variance}")
    info = 1.0 / variance
    return info * ((theta1 - theta0) * estimate - (theta1 * theta1 - theta0 * theta0) / 2)


def two_sample_difference(
    cand_successes: float, cand_trials: float, stable_successes: float, stable_trials: float
) -> tuple[float, float]:
    """(estimate, variance) of p_candidate - p_stable from two independent binomials.

    The estimate uses the raw proportions; the variance uses proportions smoothed by :data:`PSEUDO_COUNT` per
    outcome (so zero counts and all-correct samples keep a positive variance)."""
    for name, value in (("candidate trials", cand_trials), ("stable trials", stable_trials)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    for s, n in ((cand_successes, cand_trials), (stable_successes, stable_trials)):
        if not 0 <= s <= n:
            raise ValueError(f"successes {s} outside [0, {n}]")
    estimate = cand_successes / cand_trials - stable_successes / stable_trials

    def var(s: float, n: float) -> float:
        p = (s + PSEUDO_COUNT) / (n + 2 * PSEUDO_COUNT)
        return p * (1 - p) / (n + 2 * PSEUDO_COUNT)

    return estimate, var(cand_successes, cand_trials) + var(stable_successes, stable_trials)


def paired_difference(candidate_only: float, stable_only: float, total: float) -> tuple[float, float]:
    """(estimate, variance) of p_candidate - p_stable from paired outcomes on the same ``total`` items.

    ``candidate_only`` = items only the candidate got right (e.g. fraud caught by the candidate, missed by stable),
    ``stable_only`` the reverse. Estimate (b - c)/n, variance ((b + c) - (b - c)²/n)/n² (McNemar / Newcombe's
    paired difference), floored by a pseudo-count of one discordant pair each way."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if candidate_only < 0 or stable_only < 0 or candidate_only + stable_only > total:
        raise ValueError("discordant counts must be non-negative and at most the total")
    b, c, n = candidate_only, stable_only, total
    estimate = (b - c) / n
    bs, cs, ns = b + PSEUDO_COUNT, c + PSEUDO_COUNT, n + 2 * PSEUDO_COUNT
    variance = ((bs + cs) - (bs - cs) ** 2 / ns) / (ns * ns)
    return estimate, variance


def sprt_difference(
    estimate: float,
    variance: float,
    samples: float,
    margin: float,
    alpha: float,
    beta: float,
    *,
    confidence: float = 0.95,
    min_samples: float = 0,
) -> SprtResult:
    """Wald's SPRT of H_good Δ=0 against H_bad Δ=-2·margin (a relative gate ``candidate - stable >= -margin``).

    ``variance`` is that of ``estimate`` at ``samples`` (per arm); ``samples_needed`` extrapolates with variance ∝
    1/samples at the current estimate (None when decided, or when the estimate sits where the drift is ~zero)."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    lower, upper = wald_bounds(alpha, beta)
    theta0, theta1 = 0.0, -2.0 * margin
    llr = log_lr(estimate, variance, theta0, theta1)
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(variance)
    interval = (estimate - half, estimate + half)

    def result(decision: Decision, needed: float | None, reason: str = "") -> SprtResult:
        return SprtResult(decision, llr, lower, upper, estimate, interval, samples, needed, reason)

    if samples < min_samples:
        return result(Decision.INCONCLUSIVE, min_samples - samples, "too few samples")
    if llr >= upper:
        return result(Decision.FAILED, None)
    if llr <= lower:
        return result(Decision.SUCCESSFUL, None)
    # log LR per unit of information at the current estimate; information grows ∝ samples.
    per_info = (theta1 - theta0) * estimate - (theta1 * theta1 - theta0 * theta0) / 2
    needed: float | None = None
    if abs(per_info) > 1e-12 and samples > 0:
        target = upper if per_info > 0 else lower
        total = target / per_info * variance * samples
        needed = max(total - samples, 0.0)
    return result(Decision.INCONCLUSIVE, needed)
