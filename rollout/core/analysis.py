"""Gate measurements: each gate of a stage → ``Successful | Failed | Inconclusive | Error`` with the values behind it.

The four states are Argo Rollouts' analysis phases:

* **Successful** — the evidence satisfies the condition (for outcome gates: at the pessimistic end of the
  candidate's confidence interval);
* **Failed** — the evidence violates it (for outcome gates: even at the optimistic end);
* **Inconclusive** — no evidence yet: a query returned nothing or NaN, too few labels or requests, an interval
  straddling the threshold, a ratio to a zero stable value. Never treated as success;
* **Error** — the measurement itself failed (the provider raised: Prometheus unreachable, a bad query).

Relative Wilson outcome gates ``candidate - stable >= -δ`` (or ``<= δ``) are judged instead by Wald's SPRT on the
difference with both versions' uncertainty (:mod:`rollout.core.sequential`; H0 Δ=0 vs H1 Δ=∓2δ, α = the policy's
``analysis.false_rollback`` Bonferroni-split over those gates' stages, β = ``analysis.false_promotion``): Failed at the
rollback boundary, Successful at the promotion boundary. Other outcome gates keep the interval rule above.

:func:`analyse` is pure apart from the provider's ``query`` calls, all evaluated at the round's instant when the
provider can be pinned (:func:`pinned`); tests pass a provider made of a dict. A :class:`GateHistory` per gate (kept
by the stage machine) counts consecutive errors and how long a gate has been inconclusive, so the machine can tell
"wait" from "abort".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from statistics import NormalDist
from typing import Literal, Protocol, runtime_checkable

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from rollout.core import confseq, sequential
from rollout.core.drift import parse_le, roc_auc_from_prometheus_buckets, wilson_interval
from rollout.core.policy import (
    MIN_LABELS_GATE,
    MIN_REQUESTS_GATE,
    Condition,
    HanleyMcNeilEstimator,
    HistogramAUCEstimator,
    MetricGate,
    NormalEstimator,
    OutcomeGate,
    PairedAUCEstimator,
    PairedProportionEstimator,
    QualityGate,
    RateEstimator,
    RenderContext,
    RolloutPolicy,
    TrafficStage,
    WilsonEstimator,
    check_version,
    render,
)

#: The pre-rollout stage (the model-quality regression set) followed by the traffic stages.
AnalysisStage = Literal["quality", "shadow", "canary", "ab", "full"]
ResultLayer = Literal["health", "input_drift", "output_drift", "outcome", "quality", "sample"]


class GateStatus(StrEnum):
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"
    ERROR = "Error"


class GateResult(BaseModel):
    """One gate's measurement and the numbers behind its status (None where not measured / not applicable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    layer: ResultLayer
    status: GateStatus
    candidate_value: float | None = None
    stable_value: float | None = None
    #: The candidate's bound that was compared (outcome gates): the pessimistic end of its interval (sequential
    #: gates: stable's estimate plus the pessimistic end of the difference's interval).
    bound: float | None = None
    interval: tuple[float, float] | None = None
    threshold: float | None = None
    condition: str | None = None
    #: Labels behind the candidate's (and stable's) estimate, for outcome gates and the label minimum.
    labels: float | None = None
    stable_labels: float | None = None
    #: Several named values (the quality gate's regression-set metrics).
    values: dict[str, float] = Field(default_factory=dict)
    message: str = ""
    #: Issue 10 evidence: the estimated difference candidate - stable (or the value for an absolute gate), what it
    #: used (fraud labels for recall, flagged labels for precision, requests for an error rate), the estimated further
    #: samples to a decision (None when decided or unknown), and the method ("sprt-two-sample", "sprt-paired", ...).
    #: ``interval`` above is then the interval around ``estimate`` at the gate's confidence.
    estimate: float | None = None
    samples: float | None = None
    samples_needed: float | None = None
    method: str | None = None
    #: What ``samples`` count (the gate's ``unit``: "fraud labels", "paired requests", …); None → not stated.
    unit: str | None = None


class AnalysisReport(BaseModel):
    """Every gate of one stage measured at one instant, for one (stable, candidate) pair."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: AnalysisStage
    stable: str
    candidate: str
    at: AwareDatetime
    results: tuple[GateResult, ...]

    def result(self, name: str) -> GateResult | None:
        return next((r for r in self.results if r.name == name), None)

    def with_status(self, status: GateStatus) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if r.status is status)

    @property
    def all_successful(self) -> bool:
        return bool(self.results) and all(r.status is GateStatus.SUCCESSFUL for r in self.results)


class MetricsQuery(Protocol):
    """The narrow view of a metrics provider analysis needs: one PromQL expression → a scalar or nothing."""

    def query(self, promql: str) -> float | None: ...


class VectorQuery(Protocol):
    """Providers that can also return an instant vector: one ``(labels, value)`` pair per series."""

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]: ...


@runtime_checkable
class PinnableQuery(Protocol):
    """Providers that can evaluate every query of one analysis round at one instant (Prometheus' ``time=``)."""

    def at(self, instant: datetime) -> MetricsQuery: ...


def pinned(provider: MetricsQuery, instant: datetime) -> MetricsQuery:
    """``provider`` with its queries evaluated at ``instant`` when it can be pinned, else as it is."""
    return provider.at(instant) if isinstance(provider, PinnableQuery) else provider


class MeasurementError(Exception):
    """The provider failed to answer (unreachable, timeout, rejected query)."""


# --------------------------------------------------------------------------------------------------- history


class GateHistory(BaseModel):
    """What the machine remembers of one gate within a stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    measurements: int = Field(0, ge=0)
    consecutive_errors: int = Field(0, ge=0)
    #: Start of the current run of non-conclusive measurements (Inconclusive, possibly interleaved with Errors).
    inconclusive_since: AwareDatetime | None = None
    last_at: AwareDatetime | None = None
    last: GateResult | None = None


def advance(history: GateHistory, result: GateResult, at: datetime) -> GateHistory:
    """The history after one more measurement: errors count in a row; inconclusive runs remember their start.

    An Error neither ends nor starts an inconclusive run (it is no evidence either way); only a conclusive result
    (Successful or Failed) ends it.
    """
    status = result.status
    errors = history.consecutive_errors + 1 if status is GateStatus.ERROR else 0
    since = history.inconclusive_since
    if status is GateStatus.INCONCLUSIVE and since is None:
        since = at
    elif status in (GateStatus.SUCCESSFUL, GateStatus.FAILED):
        since = None
    return GateHistory(
        measurements=history.measurements + 1,
        consecutive_errors=errors,
        inconclusive_since=since,
        last_at=at,
        last=result,
    )


def inconclusive_for_s(history: GateHistory, now: datetime) -> float:
    """Seconds the gate has been without a conclusion (0 when it has one)."""
    if history.inconclusive_since is None:
        return 0.0
    return max(0.0, (now - history.inconclusive_since).total_seconds())


def errors_exceeded(history: GateHistory, limit: int) -> bool:
    """True once the gate erred more than ``limit`` times in a row."""
    return history.consecutive_errors > limit


def timed_out(history: GateHistory, now: datetime, timeout_s: float) -> bool:
    return history.inconclusive_since is not None and inconclusive_for_s(history, now) > timeout_s


# --------------------------------------------------------------------------------------------------- measuring


def measure(provider: MetricsQuery, promql: str) -> float | None:
    """The provider's value; None for no data / NaN / ±inf; :class:`MeasurementError` when the provider fails."""
    try:
        value = provider.query(promql)
    except Exception as exc:
        raise MeasurementError(f"{type(exc).__name__}: {exc}") from exc
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def measure_buckets(provider: MetricsQuery, promql: str) -> dict[float, float] | None:
    """A histogram read as an instant vector by ``le`` (cumulative counts); None when empty or not finite."""
    query_vector = getattr(provider, "query_vector", None)
    if query_vector is None:
        raise MeasurementError(f"{type(provider).__name__} cannot query vectors (needed for {promql!r})")
    try:
        samples: Sequence[tuple[Mapping[str, str], float]] = query_vector(promql)
        buckets = {parse_le(labels["le"]): float(value) for labels, value in samples}
    except Exception as exc:
        raise MeasurementError(f"{type(exc).__name__}: {exc}") from exc
    if not buckets or not all(math.isfinite(v) for v in buckets.values()):
        return None
    return buckets


def measure_cells(provider: MetricsQuery, promql: str) -> sequential.Cells | None:
    """A joint score table read as an instant vector by (``stable_le``, ``candidate_le``); None when it has no
    count (or a count is not finite)."""
    query_vector = getattr(provider, "query_vector", None)
    if query_vector is None:
        raise MeasurementError(f"{type(provider).__name__} cannot query vectors (needed for {promql!r})")
    try:
        samples: Sequence[tuple[Mapping[str, str], float]] = query_vector(promql)
        cells: sequential.Cells = {}
        for labels, value in samples:
            key = (parse_le(labels["stable_le"]), parse_le(labels["candidate_le"]))
            cells[key] = cells.get(key, 0.0) + max(float(value), 0.0)
    except Exception as exc:
        raise MeasurementError(f"{type(exc).__name__}: {exc}") from exc
    if not all(math.isfinite(v) for v in cells.values()) or sum(cells.values()) <= 0:
        return None
    return cells


@dataclass(frozen=True, slots=True)
class _Context:
    policy: RolloutPolicy
    stage: TrafficStage
    provider: MetricsQuery
    stable: str
    candidate: str
    stage_window_s: float

    def render(self, template: str, version: str) -> str:
        return render(
            template,
            RenderContext(
                stable=self.stable,
                candidate=self.candidate,
                version=version,
                window_s=self.policy.analysis.window_s,
                stage_window_s=self.stage_window_s,
                stage=self.stage,
            ),
        )

    def value(self, template: str, version: str) -> float | None:
        return measure(self.provider, self.render(template, version))

    def buckets(self, template: str, version: str) -> dict[float, float] | None:
        return measure_buckets(self.provider, self.render(template, version))


def analyse(
    policy: RolloutPolicy,
    stage: TrafficStage,
    provider: MetricsQuery,
    stable: str,
    candidate: str,
    now: datetime,
    *,
    stage_entered_at: datetime | None = None,
) -> AnalysisReport:
    """Measure every gate of ``stage`` (and the stage's request/label minimums) for the (stable, candidate) pair.

    ``{{stage_window}}`` covers ``stage_entered_at`` → ``now`` (the policy's ``window_s`` when not given). Every query
    is evaluated at ``now`` when the provider can be pinned (:class:`PinnableQuery`): a ratio's two counts, or the
    candidate and its stable, come from the same data, not from instants a scrape apart.
    """
    check_version(stable)
    check_version(candidate)
    window_s = (now - stage_entered_at).total_seconds() if stage_entered_at else policy.analysis.window_s
    ctx = _Context(policy, stage, pinned(provider, now), stable, candidate, window_s)
    results = [*_sample_results(ctx), *(_gate_result(ctx, gate) for gate in policy.gates_for(stage))]
    return AnalysisReport(stage=stage, stable=stable, candidate=candidate, at=now, results=tuple(results))


def _gate_result(ctx: _Context, gate: MetricGate | OutcomeGate) -> GateResult:
    try:
        result = _metric_result(ctx, gate) if isinstance(gate, MetricGate) else _outcome_result(ctx, gate)
        return result.model_copy(update={"unit": gate.unit}) if gate.unit else result
    except MeasurementError as exc:
        return GateResult(
            name=gate.name,
            layer=gate.layer,
            status=GateStatus.ERROR,
            threshold=gate.condition.threshold,
            condition=gate.condition.text(),
            message=str(exc),
        )


def required_samples(policy: RolloutPolicy, stage: TrafficStage) -> dict[str, int]:
    """The stage's minimum pseudo-gates that apply (a minimum of 0 is no gate): name → minimum."""
    minimums = policy.stages.of(stage)
    wanted = {MIN_REQUESTS_GATE: minimums.min_requests, MIN_LABELS_GATE: minimums.min_labels}
    return {name: minimum for name, minimum in wanted.items() if minimum > 0}


def _sample_results(ctx: _Context) -> list[GateResult]:
    templates = {MIN_REQUESTS_GATE: ctx.policy.samples.requests, MIN_LABELS_GATE: ctx.policy.samples.labels}
    return [
        _sample_result(ctx, name, templates[name], minimum)
        for name, minimum in required_samples(ctx.policy, ctx.stage).items()
    ]


def _sample_result(ctx: _Context, name: str, template: str, minimum: int) -> GateResult:
    base = {"name": name, "layer": "sample", "threshold": float(minimum), "condition": f"value >= {minimum}"}
    try:
        value = ctx.value(template, ctx.candidate)
    except MeasurementError as exc:
        return GateResult(**base, status=GateStatus.ERROR, message=str(exc))
    if value is None:
        return GateResult(**base, status=GateStatus.INCONCLUSIVE, message="no data")
    status = GateStatus.SUCCESSFUL if value >= minimum else GateStatus.INCONCLUSIVE
    message = "" if status is GateStatus.SUCCESSFUL else f"{value:g} of {minimum} so far"
    labels = value if name == MIN_LABELS_GATE else None
    return GateResult(**base, status=status, candidate_value=value, labels=labels, message=message)


def _metric_result(ctx: _Context, gate: MetricGate) -> GateResult:
    if gate.estimator is not None:
        return _rate_result(ctx, gate, gate.estimator)
    cond = gate.condition
    candidate = ctx.value(gate.query, ctx.candidate)
    stable = ctx.value(gate.query, ctx.stable) if cond.relative else None
    base = {"name": gate.name, "layer": gate.layer, "threshold": cond.threshold, "condition": cond.text()}
    values = {"candidate_value": candidate, "stable_value": stable}
    lhs = lhs_value(cond, candidate, stable)
    if isinstance(lhs, str):
        return GateResult(**base, **values, status=GateStatus.INCONCLUSIVE, message=lhs)
    status = GateStatus.SUCCESSFUL if cond.holds(lhs) else GateStatus.FAILED
    return GateResult(**base, **values, status=status, message=f"{cond.text()}: lhs = {lhs:.6g}")


def _rate_result(ctx: _Context, gate: MetricGate, est: RateEstimator | PairedProportionEstimator) -> GateResult:
    """A rate judged on its own sample: by its anytime-valid confidence sequence (rollout/core/confseq.py) against an
    absolute limit, or by Wald's SPRT on the difference of the two versions' rates (:func:`_rate_difference_result`)."""
    cond = gate.condition
    if isinstance(est, PairedProportionEstimator):
        base = {"name": gate.name, "layer": gate.layer, "threshold": cond.threshold, "condition": cond.text()}
        evidence = _paired_evidence(ctx, est)
        if isinstance(evidence, str):
            return GateResult(**base, method="sprt-paired", status=GateStatus.INCONCLUSIVE, message=evidence)
        return _margin_sprt_result(ctx, gate, base, evidence, "")
    if cond.relative:
        return _rate_difference_result(ctx, gate, est)
    base = {"name": gate.name, "layer": gate.layer, "threshold": cond.threshold, "condition": cond.text(),
            "method": "confidence-sequence"}  # fmt: skip
    counts = _counts(ctx.value(est.events, ctx.candidate), ctx.value(est.trials, ctx.candidate))
    if isinstance(counts, str):
        return GateResult(**base, status=GateStatus.INCONCLUSIVE, message=counts)
    events, trials = counts
    alpha, beta = ctx.policy.false_rollback(gate), ctx.policy.false_promotion(gate)
    judged = confseq.judge_rate(events, trials, cond.threshold, upper_limit=not cond.wants_high, alpha=alpha,
                                beta=beta)  # fmt: skip
    low, high = judged.interval
    message = (
        f"{cond.text()}: {events:.0f} of {trials:.0f} ({judged.estimate:.4g}), anytime-valid interval "
        f"[{low:.4g}, {high:.4g}] (α={alpha:.3g}, β={beta:.3g})"
    )
    return GateResult(
        **base, status=GateStatus(judged.decision), candidate_value=judged.estimate, estimate=judged.estimate,
        interval=judged.interval, samples=trials, samples_needed=judged.trials_needed, message=message,
    )  # fmt: skip


def _rate_difference_result(ctx: _Context, gate: MetricGate, est: RateEstimator) -> GateResult:
    """Two versions' rates (e.g. the share of requests sent to review) with a margin on their difference, from each
    version's own counts: Wald's SPRT on the two-sample difference (:func:`_margin_sprt_result`)."""
    cond = gate.condition
    base = {"name": gate.name, "layer": gate.layer, "threshold": cond.threshold, "condition": cond.text()}
    cand = _counts(ctx.value(est.events, ctx.candidate), ctx.value(est.trials, ctx.candidate))
    stab = _counts(ctx.value(est.events, ctx.stable), ctx.value(est.trials, ctx.stable))
    if isinstance(cand, str) or isinstance(stab, str):
        reason = cand if isinstance(cand, str) else f"stable: {stab}"
        return GateResult(**base, method="sprt-two-sample", status=GateStatus.INCONCLUSIVE, message=str(reason))
    difference, variance = sequential.two_sample_difference(cand[0], cand[1], stab[0], stab[1])
    evidence = _Evidence(difference, variance, cand[1], cand[0] / cand[1], stab[0] / stab[1], "sprt-two-sample")
    counts = f" ({cand[0]:.0f}/{cand[1]:.0f} vs {stab[0]:.0f}/{stab[1]:.0f})"
    return _margin_sprt_result(ctx, gate, base, evidence, counts)


def _margin_sprt_result(
    ctx: _Context, gate: MetricGate, base: Mapping[str, object], ev: _Evidence, counts: str
) -> GateResult:
    """Wald's SPRT of a margin on the difference (H_good Δ=0 vs H_bad Δ=±2δ); ``abs(...) <= δ`` is both one-sided
    tests at α/2, Failed when either fails, Successful when both pass."""
    cond = gate.condition
    margin = abs(cond.threshold)
    alpha, beta = ctx.policy.false_rollback(gate), ctx.policy.false_promotion(gate)
    # the directions in which the candidate may not move: up (<= δ), down (>= -δ), or both (abs)
    signs = (1.0, -1.0) if cond.comparison == "abs_difference" else ((-1.0,) if cond.wants_high else (1.0,))
    share = alpha / len(signs)
    tests = [
        sequential.sprt_difference(-sign * ev.difference, ev.variance, ev.samples, margin, share, beta)
        for sign in signs
    ]
    decisions = {t.decision for t in tests}
    if sequential.Decision.FAILED in decisions:
        status = GateStatus.FAILED
    elif decisions == {sequential.Decision.SUCCESSFUL}:
        status = GateStatus.SUCCESSFUL
    else:
        status = GateStatus.INCONCLUSIVE
    half = (tests[0].interval[1] - tests[0].interval[0]) / 2
    needed = [t.samples_needed for t in tests if t.decision is sequential.Decision.INCONCLUSIVE and t.samples_needed]
    message = (
        f"{cond.text()}: SPRT H0 Δ=0 vs H1 |Δ|={2 * margin:.6g}, estimate {ev.difference:.6g}{counts}, log LR "
        + ", ".join(f"{t.log_lr:.4g}" for t in tests)
        + f" in ({tests[0].lower:.4g}, {tests[0].upper:.4g}), α={alpha:.4g}, β={beta:.4g}"
    )
    return GateResult(
        **base, status=status, candidate_value=ev.candidate_value, stable_value=ev.stable_value,
        estimate=ev.difference, interval=(ev.difference - half, ev.difference + half), samples=ev.samples,
        samples_needed=max(needed) if needed else None, method=ev.method, message=message,
    )  # fmt: skip


def lhs_value(cond: Condition, candidate: float | None, stable: float | None) -> float | str:
    """The condition's left-hand side for point values, or the reason it cannot be computed (a str)."""
    if candidate is None:
        return "no data for the candidate"
    if not cond.relative:
        return candidate
    if stable is None:
        return "no data for stable"
    match cond.comparison:
        case "difference":
            return candidate - stable
        case "abs_difference":
            return abs(candidate - stable)
        case _:
            return candidate / stable if stable > 0 else "stable's value is not positive: no ratio"


def lhs_range(cond: Condition, low: float, high: float, stable: float | None) -> tuple[float, float] | str:
    """(min, max) of the condition's left-hand side while the candidate ranges over ``[low, high]``."""
    if not cond.relative:
        return (low, high)
    if stable is None:
        return "no data for stable"
    match cond.comparison:
        case "difference":
            return (low - stable, high - stable)
        case "abs_difference":
            far = max(abs(low - stable), abs(high - stable))
            near = 0.0 if low <= stable <= high else min(abs(low - stable), abs(high - stable))
            return (near, far)
        case _:
            if stable <= 0:
                return "stable's value is not positive: no ratio"
            return (low / stable, high / stable)


# --------------------------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with a two-sided interval."""

    value: float
    low: float
    high: float


def z_score(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (1.96 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def hanley_mcneil_stderr(auc: float, positives: float, negatives: float) -> float | None:
    """Hanley & McNeil (1982) standard error of a ROC-AUC; None without both classes."""
    if positives <= 0 or negatives <= 0:
        return None
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (positives - 1.0) * (q1 - auc * auc) + (negatives - 1.0) * (q2 - auc * auc)) / (
        positives * negatives
    )
    return math.sqrt(max(variance, 0.0))


def _estimate(ctx: _Context, gate: OutcomeGate, version: str, confidence: float) -> Estimate | str:
    if isinstance(gate.estimator, WilsonEstimator):
        est = gate.estimator
        return _wilson(ctx.value(est.successes, version), ctx.value(est.trials, version), confidence)
    normal = _normal_estimate(ctx, gate, version)
    if isinstance(normal, str):
        return normal
    half = z_score(confidence) * normal.stderr
    low, high = normal.value - half, normal.value + half
    return (
        Estimate(normal.value, max(0.0, low), min(1.0, high)) if normal.bounded else Estimate(normal.value, low, high)
    )


@dataclass(frozen=True, slots=True)
class _Normal:
    """One version's estimate with its standard error (an AUC, a calibration error, any stated estimate)."""

    value: float
    stderr: float
    #: The smallest variance the estimate may claim (an AUC: (m + n)/(m·n)², as DeLong's paired variance is
    #: floored, so an AUC of 1 keeps a positive variance); 0 for a stated standard error.
    floor: float = 0.0
    #: An AUC: its interval is clipped to [0, 1].
    bounded: bool = False

    @property
    def variance(self) -> float:
        return max(self.stderr * self.stderr, self.floor)


def _normal_estimate(ctx: _Context, gate: OutcomeGate, version: str) -> _Normal | str:
    est = gate.estimator
    match est:
        case HanleyMcNeilEstimator():
            values = (
                ctx.value(est.query, version),
                ctx.value(est.positives, version),
                ctx.value(est.negatives, version),
            )
            return _hanley_mcneil(*values)
        case HistogramAUCEstimator():
            return _histogram_auc(
                ctx.buckets(est.positive_buckets, version), ctx.buckets(est.negative_buckets, version)
            )
        case NormalEstimator():
            return _normal(ctx.value(est.query, version), ctx.value(est.stderr, version))
        case _:
            raise TypeError(f"gate {gate.name!r}: {type(est).__name__} has no normal per-version estimate")


def _wilson(successes: float | None, trials: float | None, confidence: float) -> Estimate | str:
    if successes is None or trials is None:
        return "no data for successes/trials"
    # increase() extrapolates each series separately: keep the counts consistent before the binomial maths.
    trials = max(trials, 0.0)
    successes = min(max(successes, 0.0), trials)
    interval = wilson_interval(successes, trials, confidence)
    if interval is None:
        return "no trials"
    return Estimate(interval.estimate, interval.lower, interval.upper)


def _hanley_mcneil(auc: float | None, positives: float | None, negatives: float | None) -> _Normal | str:
    if auc is None or positives is None or negatives is None:
        return "no data for the AUC or the class counts"
    stderr = hanley_mcneil_stderr(min(max(auc, 0.0), 1.0), positives, negatives)
    if stderr is None:
        return "one class has no labels"
    floor = (positives + negatives) / (positives * negatives) ** 2
    return _Normal(auc, stderr, floor, bounded=True)


def _histogram_auc(positive: dict[float, float] | None, negative: dict[float, float] | None) -> _Normal | str:
    if positive is None or negative is None:
        return "no data for the fraud or the legit score histogram"
    try:
        auc = roc_auc_from_prometheus_buckets(positive, negative)
    except ValueError as exc:
        return f"histograms unusable: {exc}"
    if auc is None:
        return "one class has no labels"
    return _hanley_mcneil(auc, max(positive.values()), max(negative.values()))


def _normal(value: float | None, stderr: float | None) -> _Normal | str:
    if value is None or stderr is None:
        return "no data for the estimate or its standard error"
    if stderr < 0:
        return "negative standard error"
    return _Normal(value, stderr)


def _outcome_result(ctx: _Context, gate: OutcomeGate) -> GateResult:
    cond = gate.condition
    minimum = ctx.policy.min_labels(gate, ctx.stage)
    base = {"name": gate.name, "layer": gate.layer, "threshold": cond.threshold, "condition": cond.text()}
    if gate.paired:
        return _paired_result(ctx, gate, base, minimum)
    labels = ctx.value(gate.labels_query, ctx.candidate)
    stable_labels = ctx.value(gate.labels_query, ctx.stable) if cond.relative else None
    counts = {"labels": labels, "stable_labels": stable_labels}
    short = _too_few_labels(labels, stable_labels, minimum, cond.relative)
    if short:
        return GateResult(**base, **counts, **_short_of(labels, minimum), status=GateStatus.INCONCLUSIVE,
                          message=short)  # fmt: skip
    confidence = ctx.policy.confidence(gate)
    if gate.sequential and isinstance(gate.estimator, WilsonEstimator):
        return _sequential_result(ctx, gate, gate.estimator, base, counts, minimum)
    if gate.sequential:
        return _normal_sequential_result(ctx, gate, base, counts)
    candidate = _estimate(ctx, gate, ctx.candidate, confidence)
    stable = _estimate(ctx, gate, ctx.stable, confidence) if cond.relative else None
    if isinstance(candidate, str) or isinstance(stable, str):
        reason = candidate if isinstance(candidate, str) else f"stable: {stable}"
        return GateResult(**base, **counts, status=GateStatus.INCONCLUSIVE, message=str(reason))
    stable_point = stable.value if stable is not None else None
    values = {
        "candidate_value": candidate.value,
        "stable_value": stable_point,
        "interval": (candidate.low, candidate.high),
        "bound": candidate.low if cond.wants_high else candidate.high,
    }
    status, message = judge_interval(cond, candidate.low, candidate.high, stable_point)
    return GateResult(**base, **counts, **values, status=status, message=message)


def _counts(successes: float | None, trials: float | None) -> tuple[float, float] | str:
    if successes is None or trials is None:
        return "no data for successes/trials"
    # increase() extrapolates each series separately: keep the counts consistent before the binomial maths.
    trials = max(trials, 0.0)
    if trials <= 0:
        return "no trials"
    return min(max(successes, 0.0), trials), trials


def _sequential_result(
    ctx: _Context,
    gate: OutcomeGate,
    est: WilsonEstimator,
    base: Mapping[str, object],
    counts: Mapping[str, float | None],
    minimum: int,
) -> GateResult:
    """Wald's SPRT (:mod:`rollout.core.sequential`) on the two-sample difference of the proportions, with both versions'
    uncertainty: Failed at the rollback boundary, Successful at the promotion boundary, else Inconclusive."""
    cand = _counts(ctx.value(est.successes, ctx.candidate), ctx.value(est.trials, ctx.candidate))
    stab = _counts(ctx.value(est.successes, ctx.stable), ctx.value(est.trials, ctx.stable))
    if isinstance(cand, str) or isinstance(stab, str):
        reason = cand if isinstance(cand, str) else f"stable: {stab}"
        return GateResult(**base, **counts, status=GateStatus.INCONCLUSIVE, message=str(reason))
    difference, variance = sequential.two_sample_difference(cand[0], cand[1], stab[0], stab[1])
    evidence = _Evidence(difference, variance, cand[1], cand[0] / cand[1], stab[0] / stab[1], "sprt-two-sample")
    return _sprt_result(ctx, gate, base, counts, evidence)


def _normal_sequential_result(
    ctx: _Context, gate: OutcomeGate, base: Mapping[str, object], counts: Mapping[str, float | None]
) -> GateResult:
    """Wald's SPRT on the difference of two independent normal estimates (an AUC, a calibration error): variance
    the sum of the two versions' variances. Where the versions' samples overlap (stable's control shadow of the
    candidate's requests) they are positively correlated and this variance is larger than the true one: the test
    is then conservative (slower, never more error-prone)."""
    cand = _normal_estimate(ctx, gate, ctx.candidate)
    stab = _normal_estimate(ctx, gate, ctx.stable)
    if isinstance(cand, str) or isinstance(stab, str):
        reason = cand if isinstance(cand, str) else f"stable: {stab}"
        return GateResult(**base, **counts, status=GateStatus.INCONCLUSIVE, message=str(reason))
    variance = cand.variance + stab.variance
    if variance <= 0:
        return GateResult(**base, **counts, status=GateStatus.INCONCLUSIVE, message="zero variance: no evidence yet")
    samples = counts.get("labels") or 0.0
    evidence = _Evidence(cand.value - stab.value, variance, samples, cand.value, stab.value, "sprt-normal")
    return _sprt_result(ctx, gate, base, counts, evidence)


@dataclass(frozen=True, slots=True)
class _Evidence:
    """A difference candidate - stable with its variance, the sample it used, and the two values (if known)."""

    difference: float
    variance: float
    samples: float
    candidate_value: float | None
    stable_value: float | None
    method: str


def _sprt_result(
    ctx: _Context, gate: OutcomeGate, base: Mapping[str, object], counts: Mapping[str, float | None], ev: _Evidence
) -> GateResult:
    cond = gate.condition
    # ``<= δ`` gates (larger is worse) are the mirror image of ``>= -δ`` ones.
    sign = 1.0 if cond.wants_high else -1.0
    alpha, beta = ctx.policy.false_rollback(gate), ctx.policy.false_promotion(gate)
    test = sequential.sprt_difference(
        sign * ev.difference,
        ev.variance,
        ev.samples,
        abs(cond.threshold),
        alpha,
        beta,
        confidence=ctx.policy.confidence(gate),
        # The label minimum (in labels, checked before) is the minimum sample.
        min_samples=1,
    )
    low, high = sorted((sign * test.interval[0], sign * test.interval[1]))
    status = {
        sequential.Decision.SUCCESSFUL: GateStatus.SUCCESSFUL,
        sequential.Decision.FAILED: GateStatus.FAILED,
        sequential.Decision.INCONCLUSIVE: GateStatus.INCONCLUSIVE,
    }[test.decision]
    message = (
        f"{cond.text()}: SPRT H0 Δ=0 vs H1 Δ={-sign * 2 * abs(cond.threshold):.6g}, estimate {ev.difference:.6g}, "
        f"log LR {test.log_lr:.4g} in ({test.lower:.4g}, {test.upper:.4g}), α={alpha:.4g}, β={beta:.4g}"
    )
    # The candidate's value at the pessimistic end of the difference's interval (stable's estimate + that end), in
    # the unit of ``candidate_value``, comparable with ``stable_value`` ± the margin as the interval rule's was.
    bound = ev.stable_value + (low if cond.wants_high else high) if ev.stable_value is not None else None
    return GateResult(
        **base,
        **counts,
        status=status,
        candidate_value=ev.candidate_value,
        stable_value=ev.stable_value,
        bound=bound,
        estimate=ev.difference,
        interval=(low, high),
        samples=ev.samples,
        samples_needed=test.samples_needed,
        method=ev.method,
        message=message,
    )


def _paired_result(ctx: _Context, gate: OutcomeGate, base: Mapping[str, object], minimum: int) -> GateResult:
    """A gate on the requests both versions scored (shadow): one labels count for the pair, then Wald's SPRT on
    the paired difference (discordant pairs) or DeLong's paired AUC difference."""
    labels = ctx.value(gate.labels_query, ctx.candidate)
    counts = {"labels": labels, "stable_labels": labels}
    if labels is None or labels < minimum:
        message = f"{labels if labels is not None else 'no'} labelled pairs, needs {minimum}"
        return GateResult(**base, **counts, **_short_of(labels, minimum), status=GateStatus.INCONCLUSIVE,
                          message=message)  # fmt: skip
    evidence = _paired_evidence(ctx, gate.estimator)
    if isinstance(evidence, str):
        return GateResult(**base, **counts, status=GateStatus.INCONCLUSIVE, message=evidence)
    return _sprt_result(ctx, gate, base, counts, evidence)


def _paired_evidence(ctx: _Context, est: object) -> _Evidence | str:
    if isinstance(est, PairedProportionEstimator):
        b, c, n = (ctx.value(t, ctx.candidate) for t in (est.candidate_only, est.stable_only, est.pairs))
        if b is None or c is None or n is None:
            return "no data for the paired counts"
        if n <= 0:
            return "no labelled pairs"
        # increase() extrapolates each series separately: keep the discordant counts within the pairs.
        b, c = max(b, 0.0), max(c, 0.0)
        if b + c > n:
            b, c = b * n / (b + c), c * n / (b + c)
        difference, variance = sequential.paired_difference(b, c, n)
        return _Evidence(difference, variance, n, None, None, "sprt-paired")
    if isinstance(est, PairedAUCEstimator):
        positives = measure_cells(ctx.provider, ctx.render(est.positive_cells, ctx.candidate))
        negatives = measure_cells(ctx.provider, ctx.render(est.negative_cells, ctx.candidate))
        if positives is None or negatives is None:
            return "no paired score table yet (needs both fraud and legit labels)"
        m, n = sum(positives.values()), sum(negatives.values())
        if m < est.min_positives or n < est.min_negatives:
            return (f"{m:.0f} fraud and {n:.0f} legit pairs in the score tables, needs {est.min_positives} and "
                    f"{est.min_negatives}")  # fmt: skip
        auc = sequential.paired_auc_difference(positives, negatives)
        return _Evidence(auc.estimate, auc.variance, auc.positives, auc.candidate_auc, auc.stable_auc, "sprt-delong")
    raise TypeError(f"not a paired estimator: {type(est).__name__}")


def _short_of(labels: float | None, minimum: int) -> dict[str, float]:
    """A gate held back by its label minimum: the labels it has and how many more it needs before it is judged."""
    have = max(labels or 0.0, 0.0)
    return {"samples": have, "samples_needed": max(float(minimum) - have, 0.0)}


def _too_few_labels(labels: float | None, stable_labels: float | None, minimum: int, relative: bool) -> str:
    if labels is None or labels < minimum:
        return f"candidate has {labels if labels is not None else 'no'} labels, needs {minimum}"
    if relative and (stable_labels is None or stable_labels < minimum):
        return f"stable has {stable_labels if stable_labels is not None else 'no'} labels, needs {minimum}"
    return ""


def judge_interval(cond: Condition, low: float, high: float, stable: float | None) -> tuple[GateStatus, str]:
    """Successful when the condition holds over the whole interval (its pessimistic end), Failed when it holds
    nowhere (not even at the optimistic end), else Inconclusive."""
    span = lhs_range(cond, low, high, stable)
    if isinstance(span, str):
        return GateStatus.INCONCLUSIVE, span
    worst, best = (span[0], span[1]) if cond.wants_high else (span[1], span[0])
    detail = f"{cond.text()}: lhs in [{span[0]:.6g}, {span[1]:.6g}]"
    if cond.holds(worst):
        return GateStatus.SUCCESSFUL, detail
    if not cond.holds(best):
        return GateStatus.FAILED, detail
    return GateStatus.INCONCLUSIVE, f"{detail}: the interval straddles the threshold"


# --------------------------------------------------------------------------------------------------- quality


def analyse_quality(
    policy: RolloutPolicy,
    evaluate: Callable[[], Mapping[str, float]],
    stable: str,
    candidate: str,
    now: datetime,
) -> AnalysisReport:
    """The pre-rollout report: ``evaluate()`` scores the candidate on the regression set (metric → value); each
    quality gate compares those values with its floors and ceilings. ``evaluate`` raising → Error."""
    check_version(stable)
    check_version(candidate)
    gates = policy.quality_gates()
    try:
        metrics: Mapping[str, float] | str = dict(evaluate())
    except Exception as exc:
        metrics = f"{type(exc).__name__}: {exc}"
    results = tuple(quality_result(gate, metrics) for gate in gates)
    return AnalysisReport(stage="quality", stable=stable, candidate=candidate, at=now, results=results)


def quality_result(gate: QualityGate, metrics: Mapping[str, float] | str) -> GateResult:
    """One quality gate against the regression-set metrics (or the error that prevented computing them)."""
    if isinstance(metrics, str):
        return GateResult(name=gate.name, layer="quality", status=GateStatus.ERROR, message=metrics)
    missing: list[str] = []
    failures: list[str] = []
    bounds = [(name, floor, True) for name, floor in gate.floors.items()]
    bounds += [(name, ceiling, False) for name, ceiling in gate.ceilings.items()]
    for name, bound, is_floor in bounds:
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            missing.append(name)
        elif (value < bound) if is_floor else (value > bound):
            failures.append(f"{name} {value:.4g} {'<' if is_floor else '>'} {bound:g}")
    if failures:
        status, message = GateStatus.FAILED, "; ".join(failures)
    elif missing:
        status, message = GateStatus.INCONCLUSIVE, f"missing or NaN: {', '.join(missing)}"
    else:
        status, message = GateStatus.SUCCESSFUL, "every floor and ceiling met"
    wanted = {name for name, _, _ in bounds}
    values = {k: float(v) for k, v in metrics.items() if k in wanted and math.isfinite(v)}
    return GateResult(name=gate.name, layer="quality", status=status, values=values, message=message)
