"""rollout.core.analysis: gate measurements → Successful / Failed / Inconclusive / Error, with a provider made of a
dict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from scipy.stats import norm

from rollout.backends.prometheus import PrometheusClient
from rollout.core import analysis as an
from rollout.core import policy as pol
from rollout.core.analysis import GateStatus as S

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STABLE, CANDIDATE = "v1", "v2"

POLICY_YAML = """
stages:
  shadow: {min_requests: 100}
  ab: {min_labels: 50}
analysis: {window_s: 300, confidence: 0.95}
samples:
  requests: requests{model_version="{{version}}"}
  labels: labels{model_version="{{version}}"}
gates:
  - name: quality
    layer: quality
    floors: {pr_auc: 0.8, recall: 0.6}
    ceilings: {ece: 0.05}
  - name: errors
    layer: health
    stages: [shadow, canary, ab, full]
    query: errors{model_version="{{version}}"}
    condition: value <= 0.01
  - name: decision-shift
    layer: output_drift
    stages: [canary]
    query: review{model_version="{{version}}"}
    condition: abs(candidate - stable) <= 0.01
  - name: latency-ratio
    layer: health
    stages: [canary]
    query: p99{model_version="{{version}}"}
    condition: candidate / stable <= 1.5
  - name: recall
    layer: outcome
    stages: [ab]
    labels_query: n{model_version="{{version}}"}
    estimator:
      method: wilson
      successes: tp{model_version="{{version}}"}
      trials: pos{model_version="{{version}}"}
    condition: candidate - stable >= -0.05
  - name: auc
    layer: outcome
    stages: [full]
    labels_query: n{model_version="{{version}}"}
    min_labels: 10
    estimator:
      method: histogram_auc
      positive_buckets: fraud{model_version="{{version}}"}
      negative_buckets: legit{model_version="{{version}}"}
    condition: candidate - stable >= -0.02
  - name: ece
    layer: outcome
    stages: [full]
    labels_query: n{model_version="{{version}}"}
    min_labels: 10
    estimator:
      method: normal
      query: ece{model_version="{{version}}"}
      stderr: ece_se{model_version="{{version}}"}
    condition: candidate - stable <= 0.02
"""
POLICY = pol.policy_from_mapping(yaml.safe_load(POLICY_YAML))
#: The same policy with the recall gate as a ratio (candidate / stable >= 0.9375, i.e. ≥ 0.75 at stable 0.8): a
#: relative gate that keeps the interval rule (only ``candidate - stable`` Wilson gates are sequential).
RATIO_POLICY = pol.policy_from_mapping(
    yaml.safe_load(
        POLICY_YAML.replace("condition: candidate - stable >= -0.05", "condition: candidate / stable >= 0.9375")
    )
)


def q(series: str, version: str) -> str:
    return f'{series}{{model_version="{version}"}}'


class DictProvider:
    """A metrics provider made of a dict: query text → value (missing → None, like an empty Prometheus answer)."""

    def __init__(
        self,
        values: Mapping[str, float | None],
        vectors: Mapping[str, Sequence[tuple[Mapping[str, str], float]]] | None = None,
    ) -> None:
        self.values = dict(values)
        self.vectors = dict(vectors or {})
        self.asked: list[str] = []

    def query(self, promql: str) -> float | None:
        self.asked.append(promql)
        return self.values.get(promql)

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]:
        self.asked.append(promql)
        return self.vectors.get(promql, [])


def _the_real_client_fits_both_protocols(client: PrometheusClient) -> tuple[an.MetricsQuery, an.VectorQuery]:
    """Checked by mypy: rollout.backends.prometheus.PrometheusClient can be handed to analyse() as it is."""
    return client, client


class DownProvider:
    def query(self, promql: str) -> float | None:
        raise ConnectionError("connection refused")


def by_name(report: an.AnalysisReport) -> dict[str, an.GateResult]:
    return {r.name: r for r in report.results}


def run(stage: pol.TrafficStage, values: Mapping[str, float | None], **kw: object) -> dict[str, an.GateResult]:
    provider = DictProvider(values, kw.pop("vectors", None))  # type: ignore[arg-type]
    policy = kw.pop("policy", POLICY)
    assert isinstance(policy, pol.RolloutPolicy)
    report = an.analyse(policy, stage, provider, STABLE, CANDIDATE, NOW, **kw)  # type: ignore[arg-type]
    assert report.stage == stage and report.at == NOW
    return by_name(report)


# --------------------------------------------------------------------------------------------------- metric gates


def test_absolute_gate_success_and_failure() -> None:
    assert run("shadow", {q("errors", CANDIDATE): 0.005})["errors"].status is S.SUCCESSFUL
    failed = run("shadow", {q("errors", CANDIDATE): 0.02})["errors"]
    assert failed.status is S.FAILED
    assert failed.candidate_value == 0.02 and failed.threshold == 0.01 and failed.condition == "value <= 0.01"


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_missing_or_non_finite_data_is_inconclusive_never_success(value: float | None) -> None:
    result = run("shadow", {q("errors", CANDIDATE): value})["errors"]
    assert result.status is S.INCONCLUSIVE
    assert result.candidate_value is None


def test_provider_failure_is_an_error_with_its_message() -> None:
    report = an.analyse(POLICY, "canary", DownProvider(), STABLE, CANDIDATE, NOW)
    assert {r.status for r in report.results} == {S.ERROR}
    assert all("connection refused" in r.message for r in report.results)


def test_relative_gates_measure_both_versions() -> None:
    values = {q("errors", CANDIDATE): 0.0, q("review", CANDIDATE): 0.03, q("review", STABLE): 0.025}
    values |= {q("p99", CANDIDATE): 0.03, q("p99", STABLE): 0.01}
    results = run("canary", values)
    shift = results["decision-shift"]
    assert shift.status is S.SUCCESSFUL
    assert (shift.candidate_value, shift.stable_value) == (0.03, 0.025)
    ratio = results["latency-ratio"]
    assert ratio.status is S.FAILED  # 3× stable's p99 > 1.5×
    values[q("review", STABLE)] = 0.01
    assert run("canary", values)["decision-shift"].status is S.FAILED  # |0.03 - 0.01| > 0.01 either way
    values[q("review", CANDIDATE)] = 0.0
    assert run("canary", values)["decision-shift"].status is S.SUCCESSFUL


def test_relative_gate_without_stable_data_or_with_zero_stable_is_inconclusive() -> None:
    values = {q("errors", CANDIDATE): 0.0, q("review", CANDIDATE): 0.03, q("p99", CANDIDATE): 0.01}
    results = run("canary", values)
    assert results["decision-shift"].status is S.INCONCLUSIVE
    assert "stable" in results["decision-shift"].message
    values[q("p99", STABLE)] = 0.0
    assert run("canary", values)["latency-ratio"].status is S.INCONCLUSIVE


def test_only_the_stage_gates_are_measured() -> None:
    assert set(run("shadow", {})) == {pol.MIN_REQUESTS_GATE, "errors"}
    assert set(run("canary", {})) == {"errors", "decision-shift", "latency-ratio"}
    assert set(run("ab", {})) == {pol.MIN_LABELS_GATE, "errors", "recall"}
    assert set(run("full", {})) == {"errors", "auc", "ece"}


# --------------------------------------------------------------------------------------------------- samples


def test_sample_minimums() -> None:
    assert run("shadow", {q("requests", CANDIDATE): 99})[pol.MIN_REQUESTS_GATE].status is S.INCONCLUSIVE
    ok = run("shadow", {q("requests", CANDIDATE): 100})[pol.MIN_REQUESTS_GATE]
    assert ok.status is S.SUCCESSFUL and ok.candidate_value == 100 and ok.threshold == 100
    assert run("shadow", {})[pol.MIN_REQUESTS_GATE].status is S.INCONCLUSIVE
    assert run("ab", {q("labels", CANDIDATE): 50})[pol.MIN_LABELS_GATE].labels == 50


def test_stage_window_is_the_time_since_the_stage_began() -> None:
    policy = pol.policy_from_mapping(
        yaml.safe_load(
            POLICY_YAML.replace(
                'requests{model_version="{{version}}"}', 'r{model_version="{{version}}"}[{{stage_window}}]'
            )
        )
    )
    provider = DictProvider({})
    an.analyse(policy, "shadow", provider, STABLE, CANDIDATE, NOW, stage_entered_at=NOW - timedelta(minutes=10))
    assert 'r{model_version="v2"}[600s]' in provider.asked
    provider = DictProvider({})
    an.analyse(policy, "shadow", provider, STABLE, CANDIDATE, NOW)
    assert 'r{model_version="v2"}[300s]' in provider.asked  # no stage start known: the policy's window


def test_invalid_versions_are_refused_before_any_query() -> None:
    provider = DictProvider({})
    with pytest.raises(pol.InvalidVersionError):
        an.analyse(POLICY, "shadow", provider, STABLE, 'v2"}or vector(1)', NOW)
    assert provider.asked == []


# --------------------------------------------------------------------------------------------------- outcomes


def _recall_values(tp_c: float, pos_c: float, tp_s: float, pos_s: float, n: float = 1000) -> dict[str, float | None]:
    return {
        q("errors", CANDIDATE): 0.0,
        q("labels", CANDIDATE): n,
        q("n", CANDIDATE): n,
        q("n", STABLE): n,
        q("tp", CANDIDATE): tp_c,
        q("pos", CANDIDATE): pos_c,
        q("tp", STABLE): tp_s,
        q("pos", STABLE): pos_s,
    }


def test_outcome_gate_needs_labels_for_both_versions() -> None:
    values = _recall_values(90, 100, 80, 100)
    values[q("n", CANDIDATE)] = 49
    result = run("ab", values)["recall"]
    assert result.status is S.INCONCLUSIVE and result.labels == 49 and "needs 50" in result.message
    values[q("n", CANDIDATE)] = 50
    values[q("n", STABLE)] = None
    assert run("ab", values)["recall"].status is S.INCONCLUSIVE


def test_interval_gate_compares_the_lower_bound_not_the_point_estimate() -> None:
    # A relative gate that is not sequential (a ratio) keeps the interval rule. Point estimates: candidate 0.78 vs
    # stable 0.80 → ratio 0.975 ≥ 0.9375 passes on the point estimate, but with 50 positives the Wilson lower bound
    # is far below 0.75: not enough evidence yet.
    few = run("ab", _recall_values(39, 50, 40_000, 50_000), policy=RATIO_POLICY)["recall"]
    assert few.candidate_value == pytest.approx(0.78)
    assert few.candidate_value / few.stable_value >= 0.9375  # type: ignore[operator]
    assert few.status is S.INCONCLUSIVE and few.method is None
    assert few.bound is not None and few.bound < 0.75
    assert few.interval is not None and few.candidate_value is not None
    assert few.interval[0] == few.bound < few.candidate_value < few.interval[1]
    # same rates with 50 000 positives: the bound is close to the estimate and passes
    many = run("ab", _recall_values(39_000, 50_000, 40_000, 50_000), policy=RATIO_POLICY)["recall"]
    assert many.status is S.SUCCESSFUL
    assert many.bound is not None and 0.77 < many.bound < 0.78


def test_interval_gate_fails_only_when_even_the_optimistic_bound_violates() -> None:
    clear = run("ab", _recall_values(300, 500, 40_000, 50_000), policy=RATIO_POLICY)["recall"]  # 0.60 vs 0.80
    assert clear.status is S.FAILED
    assert clear.interval is not None and clear.interval[1] / 0.80 < 0.9375
    unclear = run("ab", _recall_values(7, 10, 40_000, 50_000), policy=RATIO_POLICY)["recall"]  # 0.70 on ten
    assert unclear.status is S.INCONCLUSIVE


def test_wilson_bound_matches_the_textbook_formula() -> None:
    result = run("ab", _recall_values(80, 100, 40_000, 50_000), policy=RATIO_POLICY)["recall"]
    z = norm.ppf(0.975)
    p, n = 0.8, 100
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert result.bound == pytest.approx(centre - half, rel=1e-9)


def test_sequential_gate_uses_both_versions_uncertainty() -> None:
    # 0.78 on 50 vs 0.80 on 50 000: today's rule compared 0.78's interval with stable's point; the SPRT sees the
    # difference -0.02 with both variances, far from either boundary.
    few = run("ab", _recall_values(39, 50, 40_000, 50_000))["recall"]
    assert few.status is S.INCONCLUSIVE and few.method == "sprt-two-sample"
    assert few.estimate == pytest.approx(-0.02)
    assert few.samples == 50 and few.samples_needed is not None and few.samples_needed > 0
    # Known value of the log LR (Whitehead's score form, H1 Δ = -0.1), with the pooled variance under H0.
    pooled = 40_039 / 50_050
    var = pooled * (1 - pooled) * (1 / 50 + 1 / 50_000)
    llr = (-0.1 * -0.02 - 0.01 / 2) / var
    assert f"log LR {llr:.4g}" in few.message
    assert few.interval == pytest.approx(
        (-0.02 - norm.ppf(0.975) * math.sqrt(var), -0.02 + norm.ppf(0.975) * math.sqrt(var))
    )
    # α = false_rollback 0.01 split over POLICY's sequential gate × stage instances (recall, auc and ece)
    recall_gate = next(g for g in POLICY.gates if isinstance(g, pol.OutcomeGate) and g.name == "recall")
    assert f"α={POLICY.false_rollback(recall_gate):.4g}" in few.message
    assert few.interval is not None and few.bound == pytest.approx(0.8 + few.interval[0])
    many = run("ab", _recall_values(39_000, 50_000, 40_000, 50_000))["recall"]
    assert many.status is S.SUCCESSFUL and many.samples_needed is None
    clear = run("ab", _recall_values(300, 500, 40_000, 50_000))["recall"]  # 0.60 vs 0.80
    assert clear.status is S.FAILED and clear.interval is not None and clear.interval[1] < -0.05
    unclear = run("ab", _recall_values(7, 10, 40_000, 50_000))["recall"]  # 0.70 on ten positives
    assert unclear.status is S.INCONCLUSIVE


def test_sequential_gate_min_labels_and_smaller_is_better_mirror() -> None:
    # A ``<= δ`` sequential gate (a miss rate: larger is worse) is the mirror image of ``>= -δ``.
    mirrored = pol.policy_from_mapping(
        yaml.safe_load(
            POLICY_YAML.replace("condition: candidate - stable >= -0.05", "condition: candidate - stable <= 0.05")
        )
    )
    worse = run("ab", _recall_values(45_000, 50_000, 40_000, 50_000), policy=mirrored)["recall"]  # +0.10
    assert worse.status is S.FAILED and worse.estimate == pytest.approx(0.1)
    same = run("ab", _recall_values(40_000, 50_000, 40_000, 50_000), policy=mirrored)["recall"]
    assert same.status is S.SUCCESSFUL


def test_outcome_gate_with_no_trials_is_inconclusive() -> None:
    assert run("ab", _recall_values(0, 0, 40, 50))["recall"].status is S.INCONCLUSIVE


def _hist(counts: Sequence[float], edges: Sequence[float]) -> list[tuple[Mapping[str, str], float]]:
    cumulative = np.cumsum(counts)
    les = [*(str(e) for e in edges), "+Inf"]
    return [({"le": le}, float(c)) for le, c in zip(les, cumulative, strict=True)]


def test_histogram_auc_gate() -> None:
    edges = [0.1, 0.5, 0.9]
    good_pos, good_neg = [0, 10, 40, 150], [800, 150, 40, 10]
    bad_pos, bad_neg = [50, 50, 50, 50], [250, 250, 250, 250]
    vectors = {
        q("fraud", STABLE): _hist(good_pos, edges),
        q("legit", STABLE): _hist(good_neg, edges),
        q("fraud", CANDIDATE): _hist(bad_pos, edges),
        q("legit", CANDIDATE): _hist(bad_neg, edges),
    }
    values = {q("errors", CANDIDATE): 0.0, q("n", CANDIDATE): 1200, q("n", STABLE): 1200}
    result = run("full", values, vectors=vectors)["auc"]
    assert result.candidate_value == pytest.approx(0.5)
    assert result.stable_value is not None and result.stable_value > 0.9
    assert result.status is S.FAILED
    vectors[q("fraud", CANDIDATE)] = _hist(good_pos, edges)
    vectors[q("legit", CANDIDATE)] = _hist(good_neg, edges)
    same = run("full", values, vectors=vectors)["auc"]
    assert same.status is S.SUCCESSFUL  # equal AUCs; with 200 fraud labels the bound is within the margin
    assert same.bound is not None and same.stable_value is not None
    assert same.stable_value - same.bound <= 0.02


def test_histogram_auc_without_vector_support_is_an_error() -> None:
    class ScalarOnly:
        def query(self, promql: str) -> float | None:
            return 1000.0

    report = an.analyse(POLICY, "full", ScalarOnly(), STABLE, CANDIDATE, NOW)
    assert by_name(report)["auc"].status is S.ERROR


def test_normal_estimator_margin_is_sprt_on_the_difference_of_two_normals() -> None:
    """Issue 10: a relative normal gate (a calibration error, ``candidate - stable <= 0.02``) is Wald's SPRT on the
    difference with both versions' standard errors, not the candidate's interval against stable's point."""
    values = {q("errors", CANDIDATE): 0.0, q("n", CANDIDATE): 5000, q("n", STABLE): 5000}
    values |= {q("ece", STABLE): 0.02, q("ece", CANDIDATE): 0.03, q("ece_se", STABLE): 0.001}
    values[q("ece_se", CANDIDATE)] = 0.002  # Δ 0.01 ± 0.0022: far from H1 Δ = 0.04
    tight = run("full", values)["ece"]
    assert tight.status is S.SUCCESSFUL and tight.method == "sprt-normal"
    assert tight.estimate == pytest.approx(0.01) and (tight.candidate_value, tight.stable_value) == (0.03, 0.02)
    # Known value (mirrored ``<= δ`` gate: H1 Δ = +0.04): log LR = (0.04·0.01 - 0.04²/2) / (0.002² + 0.001²) = -80
    assert "log LR -80 " in tight.message
    values[q("ece_se", CANDIDATE)] = 0.01  # log LR = -0.0004 / 1.01e-4 = -3.96: between the boundaries
    wide = run("full", values)["ece"]
    assert wide.status is S.INCONCLUSIVE
    assert wide.bound == pytest.approx(0.02 + 0.01 + norm.ppf(0.975) * math.sqrt(0.01**2 + 0.001**2))
    values[q("ece", CANDIDATE)] = 0.09  # Δ 0.07: log LR = (0.0028 - 0.0008) / 1.01e-4 = 19.8
    assert run("full", values)["ece"].status is S.FAILED


@pytest.mark.parametrize("ratio", [4.0, 9.0])
def test_hanley_mcneil_stderr_matches_simulation(ratio: float) -> None:
    """The Hanley–McNeil standard error against the spread of AUCs over many simulated samples of its model
    (exponential scores: fraud ~ Exp(mean ratio), legit ~ Exp(mean 1), so AUC = ratio / (ratio + 1))."""
    rng = np.random.default_rng(5)
    n_pos, n_neg, reps = 60, 240, 600
    aucs = []
    for _ in range(reps):
        pos = rng.exponential(ratio, n_pos)
        neg = rng.exponential(1.0, n_neg)
        aucs.append(float(np.mean(pos[:, None] > neg[None, :])))
    stderr = an.hanley_mcneil_stderr(ratio / (ratio + 1.0), n_pos, n_neg)
    assert stderr is not None
    assert stderr == pytest.approx(float(np.std(aucs)), rel=0.1)


def test_hanley_mcneil_stderr_is_conservative_for_binormal_scores() -> None:
    rng = np.random.default_rng(6)
    n_pos, n_neg, reps = 60, 240, 400
    aucs = [
        float(np.mean(rng.normal(1.2, 1.0, n_pos)[:, None] > rng.normal(0.0, 1.0, n_neg)[None, :])) for _ in range(reps)
    ]
    stderr = an.hanley_mcneil_stderr(float(norm.cdf(1.2 / math.sqrt(2))), n_pos, n_neg)
    assert stderr is not None and stderr >= float(np.std(aucs))
    assert an.hanley_mcneil_stderr(0.8, 0, 10) is None


@example(comparison="difference", op="<=", threshold=0.0, low=0.0, width=0.21642924677908676,
         stable=0.21642924677908676)  # fmt: skip
@given(
    comparison=st.sampled_from(["value", "difference", "abs_difference", "ratio"]),
    op=st.sampled_from(["<=", ">=", "<", ">"]),
    threshold=st.floats(-2, 2),
    low=st.floats(0, 1),
    width=st.floats(0, 1),
    stable=st.floats(0.01, 1),
)
def test_judge_interval_is_sound(
    comparison: pol.Comparison, op: pol.Operator, threshold: float, low: float, width: float, stable: float
) -> None:
    """Successful ⇒ the condition holds everywhere in the interval; Failed ⇒ nowhere; else somewhere and not all."""
    cond = pol.Condition(comparison=comparison, op=op, threshold=threshold)
    high = low + width
    status, _ = an.judge_interval(cond, low, high, stable)
    # inside [low, high] exactly: low + width * 50 / 50 can exceed high by an ulp, outside the judged interval
    points = [min(high, low + width * k / 50) for k in range(51)] + ([stable] if low <= stable <= high else [])
    holds = [cond.holds(v) if isinstance(v := an.lhs_value(cond, p, stable), float) else False for p in points]
    if status is S.SUCCESSFUL:
        assert all(holds)
    elif status is S.FAILED:
        assert not any(holds)
    else:
        assert status is S.INCONCLUSIVE


# --------------------------------------------------------------------------------------------------- quality


def test_quality_gate() -> None:
    def report(metrics: Mapping[str, float]) -> an.GateResult:
        return an.analyse_quality(POLICY, lambda: metrics, STABLE, CANDIDATE, NOW).results[0]

    ok = report({"pr_auc": 0.85, "recall": 0.7, "ece": 0.01, "other": 1.0})
    assert ok.status is S.SUCCESSFUL and ok.values == {"pr_auc": 0.85, "recall": 0.7, "ece": 0.01}
    low = report({"pr_auc": 0.79, "recall": 0.7, "ece": 0.01})
    assert low.status is S.FAILED and "pr_auc" in low.message
    assert report({"pr_auc": 0.85, "recall": 0.7, "ece": 0.06}).status is S.FAILED
    assert report({"pr_auc": 0.85, "recall": 0.7}).status is S.INCONCLUSIVE
    assert report({"pr_auc": math.nan, "recall": 0.7, "ece": 0.01}).status is S.INCONCLUSIVE
    # a failed floor decides even when another metric is missing
    assert report({"pr_auc": 0.1}).status is S.FAILED


def test_quality_evaluation_that_raises_is_an_error() -> None:
    def broken() -> Mapping[str, float]:
        raise FileNotFoundError("frozen set missing")

    report = an.analyse_quality(POLICY, broken, STABLE, CANDIDATE, NOW)
    assert report.stage == "quality"
    assert [r.status for r in report.results] == [S.ERROR]
    assert "frozen set missing" in report.results[0].message


# --------------------------------------------------------------------------------------------------- history


def _result(status: S) -> an.GateResult:
    return an.GateResult(name="g", layer="health", status=status)


def test_history_counts_consecutive_errors_and_resets() -> None:
    h = an.GateHistory()
    for i in range(3):
        h = an.advance(h, _result(S.ERROR), NOW + timedelta(seconds=i))
    assert h.consecutive_errors == 3 and h.measurements == 3
    assert an.errors_exceeded(h, 2) and not an.errors_exceeded(h, 3)
    h = an.advance(h, _result(S.INCONCLUSIVE), NOW)
    assert h.consecutive_errors == 0


def test_history_tracks_how_long_a_gate_is_inconclusive() -> None:
    h = an.advance(an.GateHistory(), _result(S.INCONCLUSIVE), NOW)
    h = an.advance(h, _result(S.ERROR), NOW + timedelta(seconds=30))  # an error is no evidence: the run goes on
    h = an.advance(h, _result(S.INCONCLUSIVE), NOW + timedelta(seconds=60))
    assert h.inconclusive_since == NOW
    assert an.inconclusive_for_s(h, NOW + timedelta(seconds=90)) == 90
    assert an.timed_out(h, NOW + timedelta(seconds=91), 90) and not an.timed_out(h, NOW + timedelta(seconds=90), 90)
    h = an.advance(h, _result(S.SUCCESSFUL), NOW + timedelta(seconds=120))
    assert h.inconclusive_since is None and not an.timed_out(h, NOW + timedelta(days=1), 90)
    assert h.last is not None and h.last.status is S.SUCCESSFUL


def test_report_serialises() -> None:
    report = an.analyse(POLICY, "canary", DictProvider({q("errors", CANDIDATE): math.nan}), STABLE, CANDIDATE, NOW)
    assert an.AnalysisReport.model_validate_json(report.model_dump_json()) == report


class PinnableProvider(DictProvider):
    """A provider that can be pinned: every query records the instant it was evaluated at (None: unpinned)."""

    def __init__(self, values: Mapping[str, float | None]) -> None:
        super().__init__(values)
        self.instants: list[datetime | None] = []
        self._instant: datetime | None = None

    def at(self, instant: datetime) -> PinnableProvider:
        view = PinnableProvider(self.values)
        view.instants, view._instant, view.asked = self.instants, instant, self.asked
        return view

    def query(self, promql: str) -> float | None:
        self.instants.append(self._instant)
        return super().query(promql)

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]:
        self.instants.append(self._instant)
        return super().query_vector(promql)


def test_every_query_of_one_analysis_is_evaluated_at_the_rounds_instant() -> None:
    provider = PinnableProvider({})
    an.analyse(POLICY, "ab", provider, STABLE, CANDIDATE, NOW, stage_entered_at=NOW - timedelta(hours=1))
    assert len(provider.instants) == len(provider.asked) >= 4 and set(provider.instants) == {NOW}
    assert isinstance(PrometheusClient("http://127.0.0.1:1").at(NOW), an.PinnableQuery) is False  # a pinned view
    assert isinstance(PrometheusClient("http://127.0.0.1:1"), an.PinnableQuery)
    unpinnable = DictProvider({})
    assert an.pinned(unpinnable, NOW) is unpinnable


def rate_gate_policy(name: str, layer: str, condition: str, events: str, trials: str) -> pol.RolloutPolicy:
    """POLICY_YAML's stages with one rate-estimated gate in every traffic stage."""
    gate = {
        "name": name, "layer": layer, "stages": ["shadow", "canary", "ab", "full"],
        "query": 'ratio{model_version="{{version}}"}', "condition": condition,
        "estimator": {"method": "confidence_sequence", "events": events + '{model_version="{{version}}"}',
                      "trials": trials + '{model_version="{{version}}"}'},
    }  # fmt: skip
    return pol.policy_from_mapping({**yaml.safe_load(POLICY_YAML), "gates": [gate]})


RATE_POLICY = rate_gate_policy("error-rate", "health", "value <= 0.01", "errors", "calls")


@pytest.mark.parametrize(
    ("errors", "calls", "status"),
    [(0, 30, S.INCONCLUSIVE), (1, 40, S.INCONCLUSIVE), (0, 3000, S.SUCCESSFUL), (40, 1000, S.FAILED),
     (None, 100, S.INCONCLUSIVE), (0, 0, S.INCONCLUSIVE)],
)  # fmt: skip
def test_a_rate_gate_is_judged_on_its_own_sample_not_a_point_value(
    errors: float | None, calls: float, status: S
) -> None:
    """Two errors in a 5 % canary's few calls are no evidence (issue 10): the confidence sequence decides."""
    values = {'errors{model_version="v2"}': errors, 'calls{model_version="v2"}': calls}
    result = run("canary", values, policy=RATE_POLICY)["error-rate"]
    assert result.status is status, result.message
    assert result.method == "confidence-sequence" or errors is None or calls == 0
    if status is S.INCONCLUSIVE and errors == 0 and calls:
        assert result.samples == calls and result.samples_needed is not None and result.samples_needed > 0
    if status is S.FAILED:
        assert result.interval is not None and result.interval[0] > 0.01


def test_a_rate_estimator_needs_an_absolute_rate_limit() -> None:
    data = RATE_POLICY.model_dump(mode="json", exclude_none=True)
    data["gates"][0]["condition"] = "candidate / stable <= 1.1"
    with pytest.raises(ValueError, match="absolute rate limit"):
        pol.policy_from_mapping(data)


SHIFT_POLICY = rate_gate_policy(
    "decision-rate-shift", "output_drift", "abs(candidate - stable) <= 0.01", "review", "decisions"
)


@pytest.mark.parametrize(
    ("cand", "stab", "status"),
    [((5, 200), (540, 20000), S.INCONCLUSIVE),  # a 5 % canary's first calls: 2.5 % vs 2.7 %, too few to say
     ((27, 1000), (540, 20000), S.SUCCESSFUL),  # the same rate on a thousand calls: no shift of 2 points
     ((2700, 100000), (54000, 2000000), S.SUCCESSFUL),
     ((7000, 100000), (54000, 2000000), S.FAILED),  # 7 % vs 2.7 %: up by 4.3 points
     ((300, 100000), (54000, 2000000), S.FAILED),  # down by 2.4 points: abs() watches both directions
     ((4, 200), (540, 20000), S.INCONCLUSIVE)],  # 2 % on 200 calls: a 0.7-point point value is no shift either
)  # fmt: skip
def test_a_relative_rate_gate_is_wald_s_sprt_on_the_difference_both_ways(
    cand: tuple[float, float], stab: tuple[float, float], status: S
) -> None:
    values = {'review{model_version="v2"}': cand[0], 'decisions{model_version="v2"}': cand[1],
              'review{model_version="v1"}': stab[0], 'decisions{model_version="v1"}': stab[1]}  # fmt: skip
    result = run("canary", values, policy=SHIFT_POLICY)["decision-rate-shift"]
    assert result.status is status, result.message
    expected = cand[0] / cand[1] - stab[0] / stab[1]
    assert result.method == "sprt-two-sample" and result.estimate == pytest.approx(expected)
    assert result.interval is not None and result.interval[0] < expected < result.interval[1]


@pytest.mark.parametrize(
    "condition",
    ["candidate - stable <= -0.01", "candidate - stable >= 0.02", "candidate / stable <= 1.1",
     "abs(candidate - stable) >= 0.01"],
)  # fmt: skip
def test_a_relative_rate_estimator_needs_a_margin_the_candidate_may_not_exceed(condition: str) -> None:
    data = SHIFT_POLICY.model_dump(mode="json", exclude_none=True)
    data["gates"][0]["condition"] = condition
    with pytest.raises(ValueError, match="margin on the difference"):
        pol.policy_from_mapping(data)


# --------------------------------------------------------------------------------------------------- paired gates

PAIRED_GATES = """
  - name: recall-paired
    layer: outcome
    stages: [shadow]
    labels_query: frauds{stable="{{stable}}",candidate="{{candidate}}"}
    min_labels: 30
    estimator:
      method: paired_proportion
      candidate_only: gained{stable="{{stable}}",candidate="{{candidate}}"}
      stable_only: lost{stable="{{stable}}",candidate="{{candidate}}"}
      pairs: frauds{stable="{{stable}}",candidate="{{candidate}}"}
    condition: candidate - stable >= -0.05
  - name: fpr-paired
    layer: outcome
    stages: [shadow]
    labels_query: legit{stable="{{stable}}",candidate="{{candidate}}"}
    min_labels: 30
    estimator:
      method: paired_proportion
      candidate_only: newly_flagged{stable="{{stable}}",candidate="{{candidate}}"}
      stable_only: unflagged{stable="{{stable}}",candidate="{{candidate}}"}
      pairs: legit{stable="{{stable}}",candidate="{{candidate}}"}
    condition: candidate - stable <= 0.005
  - name: auc-paired
    layer: outcome
    stages: [shadow]
    labels_query: frauds{stable="{{stable}}",candidate="{{candidate}}"}
    min_labels: 30
    estimator:
      method: paired_auc
      positive_cells: pos_cells{stable="{{stable}}",candidate="{{candidate}}"}
      negative_cells: neg_cells{stable="{{stable}}",candidate="{{candidate}}"}
    condition: candidate - stable >= -0.02
"""
PAIRED_POLICY = pol.policy_from_mapping(yaml.safe_load(POLICY_YAML + PAIRED_GATES))


def pq(series: str) -> str:
    return f'{series}{{stable="{STABLE}",candidate="{CANDIDATE}"}}'


def _paired_values(frauds: float, gained: float, lost: float) -> dict[str, float | None]:
    return {pq("frauds"): frauds, pq("gained"): gained, pq("lost"): lost}


@pytest.mark.parametrize(
    ("frauds", "gained", "lost", "status"),
    [(20, 0, 9, S.INCONCLUSIVE),  # below the 30 fraud pairs
     (40, 3, 3, S.INCONCLUSIVE),  # an even trade on 40 frauds says little
     (2000, 30, 32, S.SUCCESSFUL),  # -0.001 on 2,000 fraud pairs
     (300, 2, 40, S.FAILED)],  # lost 38 more frauds than it gained: -0.127
)  # fmt: skip
def test_paired_recall_gate_is_sprt_on_the_discordant_pairs(frauds: float, gained: float, lost: float,
                                                             status: S) -> None:  # fmt: skip
    result = run("shadow", _paired_values(frauds, gained, lost), policy=PAIRED_POLICY)["recall-paired"]
    assert result.status is status, result.message
    assert result.labels == frauds
    if frauds >= 30:
        assert result.method == "sprt-paired" and result.estimate == pytest.approx((gained - lost) / frauds)
        assert result.samples == frauds
        # Known value: H1 Δ = -0.1, variance (b + c + 1)/n², α Bonferroni-split over the policy's sequential
        # instances (recall, auc and ece in ab/full + the three paired gates).
        llr = (-0.1 * (gained - lost) / frauds - 0.01 / 2) * frauds**2 / (gained + lost + 1)
        alpha = 0.01 / PAIRED_POLICY.sequential_instances()
        assert f"log LR {llr:.4g}" in result.message and f"α={alpha:.4g}" in result.message


def test_paired_recall_gate_queries_the_pair_once_and_keeps_counts_consistent() -> None:
    # increase() extrapolates series separately: discordant counts above the pairs are scaled into them.
    provider = DictProvider(_paired_values(100, 80, 40))
    report = an.analyse(PAIRED_POLICY, "shadow", provider, STABLE, CANDIDATE, NOW)
    result = by_name(report)["recall-paired"]
    assert result.estimate == pytest.approx((80 - 40) * (100 / 120) / 100)
    # recall-paired asks its labels_query and pairs, auc-paired its labels_query: once each, not once per version.
    assert provider.asked.count(pq("frauds")) == 3
    assert not any("model_version" in a and "frauds" in a for a in provider.asked)


def test_paired_fpr_gate_larger_is_worse() -> None:
    values = {pq("legit"): 20_000, pq("newly_flagged"): 400, pq("unflagged"): 40}  # +1.8 points of FPR
    worse = run("shadow", values, policy=PAIRED_POLICY)["fpr-paired"]
    assert worse.status is S.FAILED and worse.estimate == pytest.approx(360 / 20_000)
    values = {pq("legit"): 20_000, pq("newly_flagged"): 40, pq("unflagged"): 44}
    assert run("shadow", values, policy=PAIRED_POLICY)["fpr-paired"].status is S.SUCCESSFUL


def _cells(table: Mapping[tuple[str, str], float]) -> list[tuple[Mapping[str, str], float]]:
    return [({"stable_le": s, "candidate_le": c}, v) for (s, c), v in table.items()]


def test_paired_auc_gate_reads_the_joint_score_tables() -> None:
    # The candidate scores 60 of 200 frauds in the lowest bin where stable scored them high: AUC drops.
    pos = {("0.9", "0.9"): 140.0, ("0.9", "0.1"): 60.0}
    neg = {("0.1", "0.1"): 5000.0, ("0.5", "0.5"): 500.0}
    vectors = {pq("pos_cells"): _cells(pos), pq("neg_cells"): _cells(neg)}
    result = run("shadow", {pq("frauds"): 200}, vectors=vectors, policy=PAIRED_POLICY)["auc-paired"]
    assert result.method == "sprt-delong" and result.status is S.FAILED, result.message
    assert result.stable_value == pytest.approx(1.0)
    # 60 of 200 frauds tied with the 5,000 low negatives and below the 500 mid ones: 0.7 + 0.3 · 0.5 · 5000/5500.
    assert result.candidate_value == pytest.approx(0.7 + 0.3 * 0.5 * 5000 / 5500)
    assert result.estimate == pytest.approx(0.3 * 0.5 * 5000 / 5500 - 0.3)
    same = {pq("pos_cells"): _cells({("0.9", "0.9"): 200.0}), pq("neg_cells"): _cells(neg)}
    assert run("shadow", {pq("frauds"): 200}, vectors=same, policy=PAIRED_POLICY)["auc-paired"].status is S.SUCCESSFUL
    empty = run("shadow", {pq("frauds"): 200}, vectors={}, policy=PAIRED_POLICY)["auc-paired"]
    assert empty.status is S.INCONCLUSIVE and "paired score table" in empty.message
    # One fraud whose two scores differ, whatever the labels_query counted: no AUC difference to judge (it was a
    # "-0.63" with DeLong's tiny variance and a false rollback in the simulation).
    lone = {pq("pos_cells"): _cells({("0.9", "0.1"): 1.0}), pq("neg_cells"): _cells({("0.5", "0.5"): 138.0})}
    few = run("shadow", {pq("frauds"): 200}, vectors=lone, policy=PAIRED_POLICY)["auc-paired"]
    assert few.status is S.INCONCLUSIVE and "1 fraud and 138 legit pairs" in few.message, few.message


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [("condition: candidate - stable >= -0.05", "condition: candidate - stable >= 0.05", "margin on the difference"),
     ("condition: candidate - stable >= -0.05", "condition: value >= 0.8", "margin on the difference"),
     ('gained{stable="{{stable}}",candidate="{{candidate}}"}', 'gained{model_version="{{version}}"}', "name the pair"),
     ('labels_query: frauds{stable="{{stable}}",candidate="{{candidate}}"}',
      'labels_query: frauds{model_version="{{version}}"}', "name the pair")],
)  # fmt: skip
def test_paired_gate_validation(old: str, new: str, match: str) -> None:
    changed = PAIRED_GATES.replace(old, new, 1)
    assert changed != PAIRED_GATES
    with pytest.raises(ValueError, match=match):
        pol.policy_from_mapping(yaml.safe_load(POLICY_YAML + changed))


PAIRED_SHIFT_GATE = """
  - name: review-shift-paired
    layer: output_drift
    stages: [canary]
    query: review{model_version="{{version}}"}
    estimator:
      method: paired_proportion
      candidate_only: only_candidate_flagged{stable="{{stable}}",candidate="{{candidate}}"}
      stable_only: only_stable_flagged{stable="{{stable}}",candidate="{{candidate}}"}
      pairs: pairs{stable="{{stable}}",candidate="{{candidate}}"}
    condition: abs(candidate - stable) <= 0.01
"""
PAIRED_SHIFT_POLICY = pol.policy_from_mapping(yaml.safe_load(POLICY_YAML + PAIRED_SHIFT_GATE))


def _shift_values(pairs: float, only_candidate: float, only_stable: float) -> dict[str, float | None]:
    return {
        pq("pairs"): pairs,
        pq("only_candidate_flagged"): only_candidate,
        pq("only_stable_flagged"): only_stable,
        **{q(name, v): 0.0 for name in ("review", "p99") for v in (STABLE, CANDIDATE)},
    }


@pytest.mark.parametrize(
    ("pairs", "only_candidate", "only_stable", "status"),
    [(200, 3, 2, S.INCONCLUSIVE),  # +0.005 on 200 pairs: says little either way
     (20_000, 40, 35, S.SUCCESSFUL),  # +0.00025 on 20,000 pairs: well within ±0.01
     (2_000, 70, 10, S.FAILED),  # +0.03: the candidate sends 3 more points to review
     (2_000, 10, 70, S.FAILED)],  # -0.03: abs() fails in both directions
)  # fmt: skip
def test_paired_decision_rate_shift_is_sprt_on_the_discordant_pairs(
    pairs: float, only_candidate: float, only_stable: float, status: S
) -> None:
    """Issue 10: the decision-rate shift judged on the requests both versions scored (McNemar's variance), two
    one-sided SPRTs at α/2 for ``abs() <= δ`` — not two different sets of accounts compared as if independent."""
    result = run("canary", _shift_values(pairs, only_candidate, only_stable), policy=PAIRED_SHIFT_POLICY)[
        "review-shift-paired"
    ]
    assert result.status is status, result.message
    assert result.method == "sprt-paired" and result.samples == pairs
    assert result.estimate == pytest.approx((only_candidate - only_stable) / pairs)
    # Known value of the upward test's log LR (H1 Δ = +0.02, variance (b + c + 1)/n²), α/2 each way.
    b, c = only_candidate, only_stable
    llr_up = (0.02 * (b - c) / pairs - 0.02**2 / 2) * pairs**2 / (b + c + 1)
    gate = next(
        g for g in PAIRED_SHIFT_POLICY.gates if isinstance(g, pol.MetricGate) and g.name == "review-shift-paired"
    )
    assert f"{llr_up:.4g}" in result.message and f"α={PAIRED_SHIFT_POLICY.false_rollback(gate):.4g}" in result.message


def test_a_paired_metric_gate_must_judge_a_margin_on_the_pair() -> None:
    absolute = PAIRED_SHIFT_GATE.replace("abs(candidate - stable) <= 0.01", "value <= 0.1")
    with pytest.raises(ValueError, match="paired estimator judges a margin"):
        pol.policy_from_mapping(yaml.safe_load(POLICY_YAML + absolute))
    per_version = PAIRED_SHIFT_GATE.replace('pairs{stable="{{stable}}",candidate="{{candidate}}"}',
                                            'pairs{model_version="{{version}}"}')  # fmt: skip
    with pytest.raises(ValueError, match="name the pair"):
        pol.policy_from_mapping(yaml.safe_load(POLICY_YAML + per_version))
