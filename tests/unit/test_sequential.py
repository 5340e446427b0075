"""rollout.core.sequential: Wald's SPRT on a Gaussian difference, checked against known values, an exact DP,
simulation."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from rollout.core import sequential as sq
from rollout.core.sequential import Decision


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
    # 80/100 vs 70/100: pooled p = 150/200, variance p(1-p)(1/100 + 1/100).
    est, var = sq.two_sample_difference(80, 100, 70, 100)
    assert est == pytest.approx(0.1)
    assert var == pytest.approx(0.75 * 0.25 * 0.02)


@pytest.mark.parametrize("counts", [(80, 100, 70, 100), (3, 40, 120, 2000), (17, 25, 9, 31), (1, 500, 30, 9500)])
def test_two_sample_z_squared_is_pearson_chi_square(counts: tuple[int, int, int, int]) -> None:
    """An independent implementation: the pooled two-proportion z² equals scipy's Pearson χ² (no continuity
    correction) on the 2×2 table."""
    from scipy.stats import chi2_contingency

    sc, nc, ss, ns = counts
    est, var = sq.two_sample_difference(sc, nc, ss, ns)
    table = [[sc, nc - sc], [ss, ns - ss]]
    chi2 = chi2_contingency(table, correction=False).statistic
    assert est * est / var == pytest.approx(chi2, rel=1e-9)


def test_two_sample_variance_does_not_shrink_with_a_lucky_arm() -> None:
    """The finding: a per-arm variance is smallest when the small arm shows no events by chance; the pooled one is
    the same whichever arm the events fell in."""
    _, var_none = sq.two_sample_difference(0, 50, 27, 950)
    _, var_some = sq.two_sample_difference(2, 50, 25, 950)
    assert var_none == pytest.approx(var_some)


def test_canary_decision_rate_false_rollbacks_within_alpha() -> None:
    """A 5 % canary of a 2.7 % review rate, looked at every 30 s (1,500 requests a look), abs margin 0.01 judged by
    two one-sided SPRTs: identical arms are (almost) never Failed. The per-arm variance failed this at ~1 %."""
    rng = random.Random(11)
    alpha, reps, fails = 0.005, 400, 0
    for _ in range(reps):
        sc = nc = ss = ns = 0
        for _look in range(120):
            calls = 1500
            cand = sum(rng.random() < 0.05 for _ in range(calls))
            nc, ns = nc + cand, ns + calls - cand
            sc += sum(rng.random() < 0.027 for _ in range(cand))
            ss += sum(rng.random() < 0.027 for _ in range(calls - cand))
            if nc == 0:
                continue
            est, var = sq.two_sample_difference(sc, nc, ss, ns)
            low = sq.sprt_difference(est, var, nc, 0.01, alpha / 2, 0.01).decision
            high = sq.sprt_difference(-est, var, nc, 0.01, alpha / 2, 0.01).decision
            if Decision.FAILED in (low, high):
                fails += 1
                break
            if low is high is Decision.SUCCESSFUL:
                break
    assert fails / reps <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / reps)


def test_paired_difference_known_value_and_floor() -> None:
    est, var = sq.paired_difference(10, 4, 100)
    assert est == pytest.approx(0.06)
    assert var == pytest.approx(15 / 100**2)
    _, var0 = sq.paired_difference(0, 0, 100)
    assert var0 == pytest.approx(1 / 100**2)


def test_paired_difference_is_mcnemar() -> None:
    """McNemar's χ² = (b - c)²/(b + c): the textbook example b = 121, c = 59 gives 21.35 (McNemar 1947; the
    worked example of Wikipedia's "McNemar's test", n = 794 paired items)."""
    est, var = sq.paired_difference(121, 59, 794)
    # Without the pseudo-count's one discordant pair the statistic is McNemar's.
    mcnemar = est * est / var * (121 + 59 + 1) / (121 + 59)
    assert mcnemar == pytest.approx((121 - 59) ** 2 / (121 + 59), rel=1e-12)
    assert mcnemar == pytest.approx(21.35, abs=0.01)


def _paired_rollout(rng: random.Random, p_gain: float, p_loss: float, alpha: float, beta: float) -> Decision:
    b = c = n = 0
    for _look in range(300):
        for _ in range(30):
            u = rng.random()
            b, c, n = b + (u < p_gain), c + (p_gain <= u < p_gain + p_loss), n + 1
        decision = sq.sprt_difference(*sq.paired_difference(b, c, n), n, 0.05, alpha, beta).decision
        if decision is not Decision.INCONCLUSIVE:
            return decision
    return Decision.INCONCLUSIVE


def test_paired_sprt_error_rates_in_simulation() -> None:
    """Paired recall, stable 0.85, churn 0.2 (the candidate catches 20 % of stable's misses): identical candidates
    (loss share 0.0353) are not rolled back, candidates 0.10 worse (loss share 0.153) not promoted, beyond α = β =
    5 % plus two binomial standard errors, with a look every 30 fraud pairs."""
    rng = random.Random(3)
    gain = 0.15 * 0.2
    reps, alpha, beta = 400, 0.05, 0.05
    rollbacks = sum(_paired_rollout(rng, gain, 0.85 * 0.0353, alpha, beta) is Decision.FAILED for _ in range(reps))
    promotions = sum(_paired_rollout(rng, gain, 0.85 * 0.153, alpha, beta) is Decision.SUCCESSFUL for _ in range(reps))
    allowance = 2 * math.sqrt(alpha * (1 - alpha) / reps)
    assert rollbacks / reps <= alpha + allowance
    assert promotions / reps <= beta + allowance


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


# --- paired ROC-AUC difference (DeLong) on binned scores ------------------------------------------------------------


def _delong_brute(pos_s: list[float], pos_c: list[float], neg_s: list[float], neg_c: list[float]) -> tuple[float, ...]:
    """DeLong et al. (1988) from the raw (tied) scores, O(m·n): structural components and their covariances."""

    def psi(x: float, y: float) -> float:
        return 1.0 if x > y else 0.5 if x == y else 0.0

    def components(pos: list[float], neg: list[float]) -> tuple[list[float], list[float]]:
        v10 = [sum(psi(p, q) for q in neg) / len(neg) for p in pos]
        v01 = [sum(psi(p, q) for p in pos) / len(pos) for q in neg]
        return v10, v01

    def cov(x: list[float], y: list[float]) -> float:
        mx, my = sum(x) / len(x), sum(y) / len(y)
        return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / (len(x) - 1)

    s10, s01 = components(pos_s, neg_s)
    c10, c01 = components(pos_c, neg_c)
    m, n = len(pos_s), len(neg_s)
    var = (cov(s10, s10) + cov(c10, c10) - 2 * cov(s10, c10)) / m + (
        cov(s01, s01) + cov(c01, c01) - 2 * cov(s01, c01)
    ) / n
    return sum(s10) / m, sum(c10) / m, var


def _table(stable: list[float], candidate: list[float]) -> sq.Cells:
    cells: sq.Cells = {}
    for key in zip(stable, candidate, strict=True):
        cells[key] = cells.get(key, 0.0) + 1.0
    return cells


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_paired_auc_matches_brute_force_delong(seed: int) -> None:
    rng = random.Random(seed)
    pos_s = [float(rng.randint(2, 9)) for _ in range(40)]
    pos_c = [min(9.0, max(0.0, s + rng.choice((-2, -1, 0, 0, 1)))) for s in pos_s]
    neg_s = [float(rng.randint(0, 5)) for _ in range(90)]
    neg_c = [min(9.0, max(0.0, s + rng.choice((-1, 0, 0, 1)))) for s in neg_s]
    auc_s, auc_c, var = _delong_brute(pos_s, pos_c, neg_s, neg_c)
    got = sq.paired_auc_difference(_table(pos_s, pos_c), _table(neg_s, neg_c))
    assert got.stable_auc == pytest.approx(auc_s, rel=1e-12)
    assert got.candidate_auc == pytest.approx(auc_c, rel=1e-12)
    assert got.estimate == pytest.approx(auc_c - auc_s, abs=1e-12)
    assert got.variance == pytest.approx(var, rel=1e-9)


def test_paired_auc_identical_tables_floor_and_edges() -> None:
    same = sq.paired_auc_difference({(0.9, 0.9): 10.0, (0.5, 0.5): 5.0}, {(0.1, 0.1): 50.0, (0.5, 0.5): 5.0})
    assert same.estimate == 0.0 and same.variance == pytest.approx((15 + 55) / (15 * 55) ** 2)
    perfect = sq.paired_auc_difference({(1.0, 1.0): 3.0}, {(0.1, 0.1): 4.0})
    assert perfect.stable_auc == perfect.candidate_auc == 1.0
    with pytest.raises(ValueError):
        sq.paired_auc_difference({}, {(0.1, 0.1): 4.0})
    with pytest.raises(ValueError):
        sq.paired_auc_difference({(0.1, 0.1): -1.0}, {(0.1, 0.1): 4.0})


def test_paired_auc_interval_covers_in_simulation() -> None:
    """Coverage of estimate ± 1.96·√variance for the true AUC difference of two correlated binned scores."""
    rng = random.Random(5)

    def draw(fraud: bool) -> tuple[float, float]:
        shared = rng.gauss(1.2 if fraud else 0.0, 1.0)
        stable = shared + rng.gauss(0, 0.5)
        candidate = shared + rng.gauss(0.3 if fraud else 0.0, 0.5)  # the candidate separates better
        return float(min(9, max(0, round(stable * 2 + 3)))), float(min(9, max(0, round(candidate * 2 + 3))))

    def tables(m: int, n: int) -> tuple[sq.Cells, sq.Cells]:
        pos = [draw(True) for _ in range(m)]
        neg = [draw(False) for _ in range(n)]
        return _table([p[0] for p in pos], [p[1] for p in pos]), _table([q[0] for q in neg], [q[1] for q in neg])

    truth_pos, truth_neg = tables(20000, 20000)
    truth = sq.paired_auc_difference(truth_pos, truth_neg).estimate
    reps, covered = 300, 0
    for _ in range(reps):
        got = sq.paired_auc_difference(*tables(80, 400))
        covered += abs(got.estimate - truth) <= 1.96 * math.sqrt(got.variance)
    # 95 % nominal; 300 reps → a binomial standard error of 1.3 points (the large-sample truth adds a little).
    assert 0.91 <= covered / reps <= 0.99
