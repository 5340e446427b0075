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

Wald's bounds hold approximately for any number of looks (the overshoot makes them conservative). Three variance
functions, each under H_good (the information of Whitehead's score statistic): two independent binomials (canary /
A-B: each arm's own requests; the pooled proportion), paired proportions from discordant counts (shadow: both
versions scored the same requests; McNemar), and a paired ROC-AUC difference from the joint score tables (DeLong),
each floored so that zero counts or all-correct samples never give infinite information.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

    The variance is the one under H_good (no difference): the pooled proportion's p̄(1-p̄)(1/n_c + 1/n_s), as in
    Whitehead's score statistic for two proportions and the pooled two-proportion z-test (whose square is Pearson's
    χ² on the 2×2 table). A variance estimated from each arm's own proportion would be smallest exactly when an arm
    shows few events by chance, inflating the log LR towards a rollback: at a 5 % canary of a 2.7 % review rate that
    rolled back ~1 % of identical candidates against an α of 0.03 % (issue 10). When the pooled proportion is 0 or 1
    it is smoothed by :data:`PSEUDO_COUNT` per outcome, so zero counts and all-correct samples keep a positive
    variance."""
    for name, value in (("candidate trials", cand_trials), ("stable trials", stable_trials)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    for s, n in ((cand_successes, cand_trials), (stable_successes, stable_trials)):
        if not 0 <= s <= n:
            raise ValueError(f"successes {s} outside [0, {n}]")
    estimate = cand_successes / cand_trials - stable_successes / stable_trials
    successes, trials = cand_successes + stable_successes, cand_trials + stable_trials
    pooled = successes / trials
    if pooled * (1 - pooled) <= 0:
        pooled = (successes + PSEUDO_COUNT) / (trials + 2 * PSEUDO_COUNT)
    return estimate, pooled * (1 - pooled) * (1 / cand_trials + 1 / stable_trials)


def paired_difference(candidate_only: float, stable_only: float, total: float) -> tuple[float, float]:
    """(estimate, variance) of p_candidate - p_stable from paired outcomes on the same ``total`` items.

    ``candidate_only`` = items only the candidate got right (e.g. fraud caught by the candidate, missed by stable),
    ``stable_only`` the reverse. Estimate (b - c)/n; variance under H_good (b + c + 1)/n²: McNemar's (b + c)/n² (its
    statistic (b - c)²/(b + c) is the square of estimate/√variance) plus :data:`PSEUDO_COUNT` discordant pair, so
    that two versions that have not disagreed yet do not give (near) infinite information. Without it, 30 fraud
    pairs with no discordance promoted a candidate twice the margin worse in 2.7 % of simulated rollouts against a
    β of 1 % (with it: 0.9 %)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if candidate_only < 0 or stable_only < 0 or candidate_only + stable_only > total:
        raise ValueError("discordant counts must be non-negative and at most the total")
    b, c, n = candidate_only, stable_only, total
    return (b - c) / n, (b + c + PSEUDO_COUNT) / (n * n)


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


#: A joint score table of one label: (stable's bin upper edge, candidate's bin upper edge) → labelled requests.
Cells = dict[tuple[float, float], float]


@dataclass(frozen=True)
class PairedAUC:
    """A paired ROC-AUC comparison from the joint score tables of the requests both versions scored."""

    stable_auc: float
    candidate_auc: float
    #: candidate - stable, and DeLong's variance of it (with the pairing: the covariance of the two AUCs removed).
    estimate: float
    variance: float
    positives: float
    negatives: float


def _placements(
    own: Mapping[float, float], other: Mapping[float, float], other_total: float, below: bool
) -> dict[float, float]:
    """DeLong's structural components per bin: for an item in bin e, the share of the other class scored below
    (``below``) or above it, ties (same bin) counting one half."""
    edges = sorted(set(own) | set(other))
    out: dict[float, float] = {}
    running = 0.0
    for edge in edges if below else reversed(edges):
        tied = other.get(edge, 0.0)
        out[edge] = (running + 0.5 * tied) / other_total
        running += tied
    return out


def _marginal(cells: Mapping[tuple[float, float], float], side: int) -> dict[float, float]:
    out: dict[float, float] = {}
    for key, count in cells.items():
        out[key[side]] = out.get(key[side], 0.0) + count
    return out


def _weighted_covariance(points: Sequence[tuple[float, float, float]], total: float) -> tuple[float, float, float]:
    """(var x, var y, cov xy) of weighted points (x, y, weight), divisor total - 1."""
    mean_x = sum(x * w for x, _, w in points) / total
    mean_y = sum(y * w for _, y, w in points) / total
    dof = max(total - 1.0, 1.0)
    var_x = sum(w * (x - mean_x) ** 2 for x, _, w in points) / dof
    var_y = sum(w * (y - mean_y) ** 2 for _, y, w in points) / dof
    cov = sum(w * (x - mean_x) * (y - mean_y) for x, y, w in points) / dof
    return var_x, var_y, cov


def paired_auc_difference(positive_cells: Cells, negative_cells: Cells) -> PairedAUC:
    """DeLong, DeLong & Clarke-Pearson (1988, *Biometrics* 44:837-845) for two correlated ROC-AUCs, on binned
    scores: the AUC of each version's binned score (ties within a bin count one half, as Mann-Whitney does), the
    variance of candidate - stable from the covariance of the structural components over positives (V10) and
    negatives (V01):

        Var = (S10_cc + S10_ss - 2 S10_cs) / m + (S01_cc + S01_ss - 2 S01_cs) / n

    The variance is floored at (m + n)/(m·n)² — about what one positive and one negative ranked one place apart by
    the two versions would give — so two versions that scored every request in the same bin (no discordance at all
    yet) do not give infinite information."""
    cells = [c for c in (*positive_cells.values(), *negative_cells.values()) if c < 0 or not math.isfinite(c)]
    if cells:
        raise ValueError("cell counts must be finite and non-negative")
    m, n = sum(positive_cells.values()), sum(negative_cells.values())
    if m <= 0 or n <= 0:
        raise ValueError(f"need positives and negatives, got {m} and {n}")
    pos_s, pos_c = _marginal(positive_cells, 0), _marginal(positive_cells, 1)
    neg_s, neg_c = _marginal(negative_cells, 0), _marginal(negative_cells, 1)
    v10_s, v10_c = _placements(pos_s, neg_s, n, below=True), _placements(pos_c, neg_c, n, below=True)
    v01_s, v01_c = _placements(neg_s, pos_s, m, below=False), _placements(neg_c, pos_c, m, below=False)
    pos_points = [(v10_s[s], v10_c[c], w) for (s, c), w in positive_cells.items() if w > 0]
    neg_points = [(v01_s[s], v01_c[c], w) for (s, c), w in negative_cells.items() if w > 0]
    auc_s = sum(x * w for x, _, w in pos_points) / m
    auc_c = sum(y * w for _, y, w in pos_points) / m
    s10 = _weighted_covariance(pos_points, m)
    s01 = _weighted_covariance(neg_points, n)
    variance = (s10[0] + s10[1] - 2 * s10[2]) / m + (s01[0] + s01[1] - 2 * s01[2]) / n
    return PairedAUC(auc_s, auc_c, auc_c - auc_s, max(variance, (m + n) / (m * n) ** 2), m, n)
