"""The rollout policy as data: stages, gates and timings (YAML ⇄ pydantic), with a shipped default.

A policy says how a candidate model version earns its traffic::

    quality (pre-rollout regression set) → shadow → canary (1–5 %) → ab (50 %) → full → Promoted

or, with ``stages.steps: [1, 5, 25, 50]``, canary at 1 % then 5 % and A/B at 25 % then 50 %, each step gated.

Each traffic stage has minimums (time in the stage, requests the candidate scored, labels that arrived) and a set
of gates. A gate is a PromQL template and a condition on its value:

* absolute — ``value <= 0.01`` (the candidate's value against a threshold);
* relative to stable — ``candidate - stable <= 0.02``, ``abs(candidate - stable) <= 0.01`` or
  ``candidate / stable >= 0.95`` (the same query rendered once for each version).

Outcome gates (labels arrive days later) compare a *confidence bound* of the candidate, not its point estimate, and
need a minimum number of labels. The pre-rollout gate (``layer: quality``) holds floors for the metrics of the
model-quality regression set, which the controller computes.

Templates use ``{{version}}`` (the version being measured: the candidate, and for a relative condition the stable
too), ``{{stable}}``, ``{{candidate}}``, ``{{window}}`` (the policy's rate window) and ``{{stage_window}}`` (the
time since the stage began). Version placeholders may only stand as the whole value of an exact label matcher
(``label="{{version}}"`` or ``label!="{{version}}"``) and versions are validated and escaped when rendered, so a
version name cannot inject PromQL.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from rollout.core.buckets import DEFAULT_LATENCY_BUCKETS_S
from rollout.core.routing import Stage, TrafficStage

TRAFFIC_STAGES: Final[tuple[TrafficStage, ...]] = get_args(TrafficStage)
#: Layers of the gates that watch a stage; ``quality`` is the pre-rollout gate.
MetricLayer = Literal["health", "input_drift", "output_drift"]
GateLayer = Literal["health", "input_drift", "output_drift", "outcome", "quality"]

#: The canary's share of traffic in percent is bounded: big enough to see, small enough to be cheap.
CANARY_WEIGHT_MIN: Final[int] = 1
CANARY_WEIGHT_MAX: Final[int] = 5
DEFAULT_CANARY_WEIGHT: Final[int] = 5
DEFAULT_AB_WEIGHT: Final[int] = 50
PERCENT: Final[int] = 100
#: ``stages.steps`` (Argo's ``setWeight`` steps, Flagger's ``stepWeights``): at most this many weights.
MAX_TRAFFIC_STEPS: Final[int] = 10

#: Model version names (label values): the routing table's grammar — no quotes, backslashes, spaces or braces.
VERSION_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@-]*$")
MAX_VERSION_CHARS: Final[int] = 128

DEFAULT_POLICY_RESOURCE: Final[str] = "default_policy.yaml"

#: Names of the stage-minimum pseudo-gates that analysis reports beside the policy's gates (layer ``sample``).
MIN_REQUESTS_GATE: Final[str] = "min-requests"
MIN_LABELS_GATE: Final[str] = "min-labels"
#: The candidate's own workload (restarts, readiness) — rollout/core/workload_gate.py; a health gate of every traffic
# stage.
WORKLOAD_GATE: Final[str] = "candidate-workload"

#: A reusable metric template's name (``metric_templates``; a gate's ``template``).
TEMPLATE_NAME_PATTERN: Final[str] = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
#: Fields a metric template cannot give: a gate's identity, its args, and another template (no chains).
_GATE_OWN_FIELDS: Final[frozenset[str]] = frozenset({"name", "template"})
#: A metric template's args (Argo AnalysisTemplate ``args``): declared by the template (``args: [{name, value?}]``, a
#: value being the default), given by the gate (``args: [{name, value}]``), used as ``{{args.NAME}}`` in any of its
#: string fields (queries, condition) and rendered when the policy is loaded.
ARG_NAME_PATTERN: Final[str] = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"
MAX_ARG_VALUE_CHARS: Final[int] = 256
_ARG_PLACEHOLDER: Final[re.Pattern[str]] = re.compile(r"\{\{\s*args\.([^\s{}]*)\s*\}\}")
_ARG_FORBIDDEN: Final[tuple[str, ...]] = ("{{", "}}", "\n", "\r", "\0")

_PLACEHOLDER: Final[re.Pattern[str]] = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
VERSION_PLACEHOLDERS: Final[frozenset[str]] = frozenset({"version", "stable", "candidate"})
WINDOW_PLACEHOLDERS: Final[frozenset[str]] = frozenset({"window", "stage_window"})
#: ``{{stage}}``: the traffic stage being measured, for the ``stage`` label of outcome series (the routing stage in
#: force when each prediction was made): a gate then counts only the predictions of its own stage, whenever their
#: labels arrive. An exact matcher's whole value, like the versions.
STAGE_PLACEHOLDERS: Final[frozenset[str]] = frozenset({"stage"})
_EXACT_MATCHER_PREFIX: Final[str] = '="'
_MATCHER_QUOTE: Final[str] = '"'
_NEGATED_REGEX_PREFIX: Final[str] = '~"'

# --------------------------------------------------------------------------------------------------- versions


class InvalidVersionError(ValueError):
    """A model version name that is not a safe label value."""


def is_valid_version(version: str) -> bool:
    """True when ``version`` follows the routing table's version grammar (and so is a safe PromQL label value)."""
    return 0 < len(version) <= MAX_VERSION_CHARS and VERSION_PATTERN.fullmatch(version) is not None


def check_version(version: str) -> str:
    """``version`` unchanged, or :class:`InvalidVersionError`."""
    if not is_valid_version(version):
        raise InvalidVersionError(f"invalid model version name {version!r}")
    return version


def promql_string(value: str) -> str:
    """The content of a double-quoted PromQL string literal for ``value`` (backslash, quote, newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")


# --------------------------------------------------------------------------------------------------- templates


def template_placeholders(template: str) -> frozenset[str]:
    return frozenset(m.group(1) for m in _PLACEHOLDER.finditer(template))


@functools.lru_cache(maxsize=4096)
def _check_template(template: str) -> str:
    """``template`` when its placeholders are known and safely placed (cached: every analysis renders each one)."""
    if not template.strip():
        raise ValueError("a PromQL template must not be empty")
    unknown = template_placeholders(template) - VERSION_PLACEHOLDERS - WINDOW_PLACEHOLDERS - STAGE_PLACEHOLDERS
    if unknown:
        raise ValueError(f"unknown placeholder(s) {sorted(unknown)} in {template!r}")
    for match in _PLACEHOLDER.finditer(template):
        if match.group(1) in VERSION_PLACEHOLDERS | STAGE_PLACEHOLDERS:
            _check_version_position(template, match)
    return template


def _check_version_position(template: str, match: re.Match[str]) -> None:
    before = template[: match.start()]
    after = template[match.end() :]
    exact = before.endswith(_EXACT_MATCHER_PREFIX) and not before.endswith(_NEGATED_REGEX_PREFIX)
    if not exact or not after.startswith(_MATCHER_QUOTE):
        raise ValueError(
            f'{match.group(0)} must be the whole value of an exact label matcher (label="{match.group(0)}" or '
            f'label!="{match.group(0)}"), never a regex matcher or free text: {template!r}'
        )


PromQLTemplate = Annotated[str, AfterValidator(_check_template)]


@dataclass(frozen=True, slots=True)
class RenderContext:
    """The values the placeholders of a template take for one measurement."""

    stable: str
    candidate: str
    version: str
    window_s: float
    stage_window_s: float
    #: The traffic stage measured (``{{stage}}``); a template that names it cannot be rendered without it.
    stage: str | None = None


def prometheus_duration(seconds: float) -> str:
    """A PromQL range duration in whole seconds (rounded up, at least one second)."""
    return f"{max(1, math.ceil(seconds))}s"


@functools.lru_cache(maxsize=8192)
def render(template: str, context: RenderContext) -> str:
    """The template with its placeholders replaced; versions validated and escaped as label values (cached: a
    round renders each template for each version once when it is filled and again when it is measured)."""
    values = {
        "stable": promql_string(check_version(context.stable)),
        "candidate": promql_string(check_version(context.candidate)),
        "version": promql_string(check_version(context.version)),
        "window": prometheus_duration(context.window_s),
        "stage_window": prometheus_duration(context.stage_window_s),
    }
    _check_template(template)
    if "stage" in template_placeholders(template):
        if context.stage not in TRAFFIC_STAGES:
            raise ValueError(f"{{{{stage}}}} needs the traffic stage measured, got {context.stage!r}: {template!r}")
        values["stage"] = context.stage
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------------------------------- conditions

Operator = Literal["<=", ">=", "<", ">"]
Comparison = Literal["value", "difference", "abs_difference", "ratio"]

_NUMBER: Final[str] = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_OPERATOR: Final[str] = r"<=|>=|<|>"
_LHS: Final[dict[str, Comparison]] = {
    "value": "value",
    "candidate": "value",
    "candidate-stable": "difference",
    "abs(candidate-stable)": "abs_difference",
    "candidate/stable": "ratio",
}
_LHS_TEXT: Final[dict[Comparison, str]] = {
    "value": "value",
    "difference": "candidate - stable",
    "abs_difference": "abs(candidate - stable)",
    "ratio": "candidate / stable",
}
_CONDITION: Final[re.Pattern[str]] = re.compile(rf"^(?P<lhs>.+?)(?P<op>{_OPERATOR})(?P<threshold>{_NUMBER})$")


class Condition(BaseModel):
    """``<lhs> <op> <threshold>``; the lhs is the candidate's value or its difference / ratio to stable's.

    Written in YAML as one string, e.g. ``"candidate / stable >= 0.95"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    comparison: Comparison
    op: Operator
    threshold: float = Field(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        return parse_condition(data) if isinstance(data, str) else data

    @property
    def relative(self) -> bool:
        """True when the condition needs the stable version's value too."""
        return self.comparison != "value"

    @property
    def wants_high(self) -> bool:
        """True when larger left-hand sides are better (``>=`` / ``>``)."""
        return self.op in (">=", ">")

    def holds(self, lhs: float) -> bool:
        """Whether the left-hand side value satisfies the condition."""
        match self.op:
            case "<=":
                return lhs <= self.threshold
            case ">=":
                return lhs >= self.threshold
            case "<":
                return lhs < self.threshold
            case ">":
                return lhs > self.threshold

    def text(self) -> str:
        return f"{_LHS_TEXT[self.comparison]} {self.op} {self.threshold!r}"


def parse_condition(text: str) -> dict[str, Any]:
    """``"candidate - stable <= 0.02"`` → the fields of a :class:`Condition`; ``ValueError`` when malformed."""
    compact = re.sub(r"\s+", "", text)
    match = _CONDITION.fullmatch(compact)
    if match is None or match.group("lhs") not in _LHS:
        raise ValueError(
            f"condition {text!r} must read '<lhs> <op> <number>' with lhs one of "
            "value, candidate - stable, abs(candidate - stable), candidate / stable and op one of <=, >=, <, >"
        )
    return {"comparison": _LHS[match.group("lhs")], "op": match.group("op"), "threshold": float(match["threshold"])}


ConditionField = Annotated[Condition, PlainSerializer(lambda c: c.text(), return_type=str)]


# --------------------------------------------------------------------------------------------------- stages


class StagePolicy(BaseModel):
    """Minimums a stage must reach before it may be promoted (besides every gate being Successful)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_duration_s: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    #: Requests the candidate scored during the stage (in shadow: shadow calls; later: deciding calls too).
    min_requests: int = Field(0, ge=0)
    #: Labels (outcomes) of the candidate's predictions that arrived during the stage.
    min_labels: int = Field(0, ge=0)


class CanaryStagePolicy(StagePolicy):
    #: Percent of entities the candidate decides for.
    weight: int = Field(DEFAULT_CANARY_WEIGHT, ge=CANARY_WEIGHT_MIN, le=CANARY_WEIGHT_MAX)


class ABStagePolicy(StagePolicy):
    weight: int = Field(DEFAULT_AB_WEIGHT, gt=0, lt=PERCENT)


class Stages(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    shadow: StagePolicy = StagePolicy()
    canary: CanaryStagePolicy = CanaryStagePolicy()
    ab: ABStagePolicy = ABStagePolicy()
    full: StagePolicy = StagePolicy()
    #: The candidate's deciding share in percent at each gated step of the canary/A/B progression, e.g.
    #: ``[1, 5, 25, 50]`` (Argo Rollouts' ``setWeight`` steps, Flagger's ``stepWeights``): the weights up to
    #: :data:`CANARY_WEIGHT_MAX` are canary steps, the larger ones A/B steps. Each step is judged like a stage, by its
    #: stage's gates and minimums, and counts as one more gate×stage instance in the α split. When set, it replaces
    #: ``canary.weight`` and ``ab.weight``; None keeps one canary and one A/B step at those weights.
    steps: tuple[int, ...] | None = Field(None, min_length=1, max_length=MAX_TRAFFIC_STEPS)

    def of(self, stage: TrafficStage) -> StagePolicy:
        policies: dict[TrafficStage, StagePolicy] = {
            "shadow": self.shadow,
            "canary": self.canary,
            "ab": self.ab,
            "full": self.full,
        }
        return policies[stage]

    def step_weights(self, stage: TrafficStage) -> tuple[int, ...]:
        """The candidate's share of deciding traffic in percent at each step of ``stage``: one step per stage, unless
        ``steps`` splits canary (its weights up to :data:`CANARY_WEIGHT_MAX`) and A/B (the larger ones) into more."""
        if stage == "shadow":
            return (0,)
        if stage == "full":
            return (PERCENT,)
        if self.steps is None:
            return (self.canary.weight,) if stage == "canary" else (self.ab.weight,)
        return tuple(w for w in self.steps if (w <= CANARY_WEIGHT_MAX) == (stage == "canary"))

    def step_count(self, stage: TrafficStage) -> int:
        """How many gated steps ``stage`` runs (each one judged by the stage's gates and minimums)."""
        return len(self.step_weights(stage))

    def candidate_weight(self, stage: TrafficStage, step: int = 0) -> int:
        """The candidate's share of deciding traffic in percent during ``step`` of ``stage``."""
        weights = self.step_weights(stage)
        return weights[min(step, len(weights) - 1)]

    @model_validator(mode="after")
    def _growing(self) -> Stages:
        if self.steps is not None:
            check_steps(self.steps)
        elif not self.canary.weight < self.ab.weight:
            raise ValueError("the A/B weight must exceed the canary weight")
        return self


def check_steps(steps: tuple[int, ...]) -> None:
    """``ValueError`` naming ``stages.steps`` unless the weights grow strictly, stay within 1–99 % and give canary
    (≤ :data:`CANARY_WEIGHT_MAX` %) and A/B (above it) at least one step each."""
    if any(not 0 < w < PERCENT for w in steps):
        raise ValueError(f"stages.steps: every weight must be between 1 and {PERCENT - 1} percent, got {list(steps)}")
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise ValueError(f"stages.steps must grow strictly, got {list(steps)}")
    if steps[0] > CANARY_WEIGHT_MAX or steps[-1] <= CANARY_WEIGHT_MAX:
        raise ValueError(
            f"stages.steps needs at least one canary weight (1-{CANARY_WEIGHT_MAX} %) and one A/B weight (above "
            f"{CANARY_WEIGHT_MAX} %), got {list(steps)}"
        )


# --------------------------------------------------------------------------------------------------- gates


class _GateBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    #: What the gate's samples (and its label minimum) count, as people read it: "fraud labels", "flagged labels",
    #: "paired requests"… (rolloutctl status, the dashboard, the timeline); None → "labels" for outcome gates,
    #: "requests" for the others.
    unit: str | None = Field(None, min_length=1, max_length=40)
    #: The policy's ``metric_templates`` entry this gate was built from (its fields under the gate's own), if any.
    template: str | None = Field(None, pattern=TEMPLATE_NAME_PATTERN)
    #: The values the gate gave the template's args (already rendered into its fields; kept so the policy dumps and
    #: loads back the same).
    args: tuple[TemplateArg, ...] | None = None


class TemplateArg(BaseModel):
    """One arg a gate gives its metric template: ``{name, value}`` (Argo's AnalysisTemplate args)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., pattern=ARG_NAME_PATTERN)
    value: str = Field(..., max_length=MAX_ARG_VALUE_CHARS)


#: Histograms whose quantiles (``histogram_quantile`` and the recording rules built on it) cannot exceed their largest
#: finite bucket: a quantile above it is reported as that bucket's bound. Metric name → that bound (the router's
#: default buckets; a deployment with other buckets states ``max_value`` on the gate).
QUANTILE_CEILINGS: Final[dict[str, float]] = {
    "fraudwatch_router_request_duration_seconds": max(DEFAULT_LATENCY_BUCKETS_S),
}


_LATENCY_BUCKET: Final[re.Pattern[str]] = re.compile(
    r'fraudwatch_router_request_duration_seconds_bucket\{(?:[^{}]|\{\{\w+\}\})*?le="([^"]+)"'
)


def quantile_ceiling(query: str) -> tuple[float, str] | None:
    """The largest value ``query`` can return when it reads a quantile of a known histogram, and that histogram."""
    if "histogram_quantile" not in query and ":p9" not in query and ":p5" not in query:
        return None
    for metric, ceiling in QUANTILE_CEILINGS.items():
        if metric in query:
            return ceiling, metric
    return None


class RateEstimator(BaseModel):
    """A rate ``events / trials`` over the stage (failed calls of all calls, agreeing pairs of all pairs), judged
    with an anytime-valid confidence sequence (rollout/core/confseq.py) instead of a point value: Failed only when the
    evidence excludes every rate within the limit at level α, Successful when it lies within it at level β."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["confidence_sequence"] = "confidence_sequence"
    events: PromQLTemplate
    trials: PromQLTemplate


class PairedProportionEstimator(BaseModel):
    """A paired difference of proportions from the requests BOTH versions scored (shadow, and the stable's control
    shadow of the candidate's requests in canary, A/B and full): recall on fraud labels, the false-positive rate on
    legit labels (outcome gates), or the share sent to review of all pairs (a metric gate's decision-rate shift).
    ``candidate_only`` = pairs only the candidate counts as a success (e.g. frauds it flagged and stable did not),
    ``stable_only`` the reverse, ``pairs`` all pairs of the class. Wald's SPRT on (b - c)/n with the paired
    variance (rollout/core/sequential.py). Queries name the pair (``{{stable}}`` and ``{{candidate}}``), not
    ``{{version}}``: each is measured once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["paired_proportion"] = "paired_proportion"
    candidate_only: PromQLTemplate
    stable_only: PromQLTemplate
    pairs: PromQLTemplate


class PairedAUCEstimator(BaseModel):
    """A paired ROC-AUC difference (DeLong) from the joint score tables of the labelled requests both versions
    scored: vector queries by (``stable_le``, ``candidate_le``), one for fraud labels, one for legit labels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["paired_auc"] = "paired_auc"
    positive_cells: PromQLTemplate
    negative_cells: PromQLTemplate
    #: DeLong's variance is an asymptotic estimate: below this many labelled frauds or legit requests in the tables
    #: the gate is Inconclusive, whatever its labels_query counts (one fraud among 138 legit gave an "AUC
    #: difference" of -0.63 with a tiny variance).
    min_positives: int = Field(10, ge=2)
    min_negatives: int = Field(10, ge=2)


class PsiEstimator(BaseModel):
    """A drift gate judged on the stage's own sample (:func:`rollout.core.drift.psi_estimate`): each
    feature's PSI from the version's bin counts over the stage against its training reference, with its
    small-sample bias removed and bounds from its sampling noise — the delta-method standard error and the
    χ²(k - 1)/n noise of an unchanged distribution — instead of a point value over a 5-minute window. ``counts`` and
    ``reference`` are vector queries by (``feature``, ``bin``). With ``value <= t`` every feature's PSI is bounded by
    t; with ``candidate - stable <= δ`` the candidate's PSI may exceed stable's on the same traffic by at most δ
    (drift that both versions see is not the candidate's fault). α is split over the features."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["psi"] = "psi"
    counts: PromQLTemplate
    reference: PromQLTemplate
    #: Fractions are clipped to at least this (the recording rules' and DriftSettings.psi_epsilon's 1e-4).
    epsilon: float = Field(1e-4, gt=0.0, lt=0.1)


MetricEstimator = Annotated[RateEstimator | PairedProportionEstimator | PsiEstimator, Field(discriminator="method")]


class MetricGate(_GateBase):
    """A health or drift gate: one PromQL value per version compared by ``condition`` — or, with an ``estimator``,
    a rate judged on its own sample (``query`` is then the value dashboards show)."""

    layer: MetricLayer
    stages: tuple[TrafficStage, ...] = Field(..., min_length=1)
    query: PromQLTemplate
    condition: ConditionField
    estimator: MetricEstimator | None = None
    #: This gate's α / β when an estimator judges it; else the policy's (α split by Bonferroni).
    false_rollback: float | None = Field(None, gt=0.0, lt=0.5)
    false_promotion: float | None = Field(None, gt=0.0, lt=0.5)

    @property
    def sequential(self) -> bool:
        return self.estimator is not None

    @model_validator(mode="after")
    def _rate_condition(self) -> MetricGate:
        """A rate estimator judges an absolute rate limit (``value <= t`` / ``value >= t``, 0 < t < 1: a confidence
        sequence) or a margin on the difference of the two versions' rates (``candidate - stable <= δ``,
        ``candidate - stable >= -δ``, ``abs(candidate - stable) <= δ``: Wald's SPRT on the two-sample difference)."""
        if self.estimator is None:
            return self
        cond = self.condition
        absolute = cond.comparison == "value" and 0.0 < cond.threshold < 1.0
        margin = (
            (cond.comparison == "difference" and cond.threshold != 0.0 and (cond.threshold < 0) == cond.wants_high)
            or (cond.comparison == "abs_difference" and not cond.wants_high and cond.threshold > 0.0)
        )  # fmt: skip
        if isinstance(self.estimator, PsiEstimator):
            upper = not cond.wants_high and cond.threshold > 0.0
            if not (upper and cond.comparison in ("value", "difference")):
                raise ValueError(
                    f"gate {self.name!r}: a PSI estimator judges an upper limit (value <= t) or a margin over stable "
                    f"(candidate - stable <= δ), t, δ > 0, not {cond.text()!r}"
                )
            if cond.relative:
                _check_relative(self.name, cond, (self.estimator.counts, self.estimator.reference))
            return self
        if isinstance(self.estimator, PairedProportionEstimator):
            if not margin or abs(cond.threshold) >= 1.0:
                raise ValueError(
                    f"gate {self.name!r}: a paired estimator judges a margin on the difference (candidate - stable "
                    f"<= δ, candidate - stable >= -δ, abs(candidate - stable) <= δ), not {cond.text()!r}"
                )
            check_paired_queries(self.name, estimator_templates(self.estimator))
            return self
        if not (absolute or margin) or abs(cond.threshold) >= 1.0:
            raise ValueError(
                f"gate {self.name!r}: a rate estimator judges an absolute rate limit (value <= t or value >= t with "
                f"0 < t < 1) or a margin on the difference (candidate - stable <= δ, candidate - stable >= -δ, "
                f"abs(candidate - stable) <= δ), not {cond.text()!r}"
            )
        return self

    @property
    def paired(self) -> bool:
        """True when judged on the requests both versions scored (the pair's queries are measured once)."""
        return isinstance(self.estimator, PairedProportionEstimator)

    @model_validator(mode="after")
    def _latency_bucket_exists(self) -> MetricGate:
        """A share of slow calls read from the router's latency histogram needs its limit to be one of the
        histogram's buckets: ``le="0.3"`` matches no series, and the share would read as no data for ever."""
        templates = (self.estimator.events, self.estimator.trials) if isinstance(self.estimator, RateEstimator) else ()
        for template in templates:
            for match in _LATENCY_BUCKET.finditer(template):
                if float(match.group(1)) not in DEFAULT_LATENCY_BUCKETS_S:
                    raise ValueError(
                        f'gate {self.name!r}: le="{match.group(1)}" is no bucket of the router\'s latency histogram '
                        f"{list(DEFAULT_LATENCY_BUCKETS_S)}"
                    )
        return self

    #: The largest value the query can return (a quantile's largest finite bucket); found by itself for the known
    #: histograms (:data:`QUANTILE_CEILINGS`). An absolute upper-limit condition must be able to fail below it.
    max_value: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _relative_needs_version(self) -> MetricGate:
        _check_relative(self.name, self.condition, (self.query,))
        return self

    @model_validator(mode="after")
    def _can_fail(self) -> MetricGate:
        """Refuse ``value <= t`` when the query can never exceed t: such a gate passes whatever happens (issue 10:
        a p99 latency capped at the largest bucket, 1.0 s, recorded as Successful while calls took longer)."""
        cond = self.condition
        if cond.relative or cond.wants_high:
            return self
        found = (self.max_value, "max_value") if self.max_value is not None else quantile_ceiling(self.query)
        if found is None:
            return self
        ceiling, source = found
        if cond.holds(ceiling):
            raise ValueError(
                f"gate {self.name!r}: its query cannot exceed {ceiling:g} ({source}: the largest finite bucket), so "
                f"{cond.text()!r} can never fail — use a threshold below {ceiling:g}, or histogram buckets above it"
            )
        return self


class WilsonEstimator(BaseModel):
    """A proportion ``successes / trials`` (recall, precision) with its Wilson score interval."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["wilson"] = "wilson"
    successes: PromQLTemplate
    trials: PromQLTemplate


class HanleyMcNeilEstimator(BaseModel):
    """A ROC-AUC with the Hanley–McNeil standard error from the counts of positives and negatives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["hanley_mcneil"] = "hanley_mcneil"
    query: PromQLTemplate
    positives: PromQLTemplate
    negatives: PromQLTemplate


class HistogramAUCEstimator(BaseModel):
    """A ROC-AUC computed from two score histograms (vector queries by ``le``: labelled fraud, labelled legit),
    with the Hanley–McNeil standard error from their totals. Needs a provider that can query vectors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["histogram_auc"] = "histogram_auc"
    positive_buckets: PromQLTemplate
    negative_buckets: PromQLTemplate


class NormalEstimator(BaseModel):
    """Any estimate with a standard-error query: estimate ± z·stderr."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["normal"] = "normal"
    query: PromQLTemplate
    stderr: PromQLTemplate


PairedEstimator = PairedProportionEstimator | PairedAUCEstimator
AnyEstimator = (
    WilsonEstimator
    | HanleyMcNeilEstimator
    | HistogramAUCEstimator
    | NormalEstimator
    | PairedProportionEstimator
    | PairedAUCEstimator
)
Estimator = Annotated[AnyEstimator, Field(discriminator="method")]


def estimator_templates(estimator: AnyEstimator) -> tuple[str, ...]:
    match estimator:
        case WilsonEstimator():
            return (estimator.successes, estimator.trials)
        case HanleyMcNeilEstimator():
            return (estimator.query, estimator.positives, estimator.negatives)
        case HistogramAUCEstimator():
            return (estimator.positive_buckets, estimator.negative_buckets)
        case NormalEstimator():
            return (estimator.query, estimator.stderr)
        case PairedProportionEstimator():
            return (estimator.candidate_only, estimator.stable_only, estimator.pairs)
        case PairedAUCEstimator():
            return (estimator.positive_cells, estimator.negative_cells)


class OutcomeGate(_GateBase):
    """An outcome gate: needs ``min_labels`` labels per version, then compares the candidate's confidence bound.

    The condition is checked at the pessimistic end of the candidate's interval (Successful) and at its optimistic
    end (Failed when even that violates it); in between the evidence is not there yet (Inconclusive).
    """

    layer: Literal["outcome"]
    stages: tuple[TrafficStage, ...] = Field(..., min_length=1)
    labels_query: PromQLTemplate
    #: Labels each version needs before the gate is judged; None → the stage's ``min_labels``.
    min_labels: int | None = Field(None, ge=1)
    estimator: Estimator
    condition: ConditionField
    #: Two-sided confidence level of the interval; None → the policy's ``analysis.confidence``.
    confidence: float | None = Field(None, gt=0.5, lt=1.0)
    #: Per-gate α / β of the sequential test (used as given for each stage of this gate, not split); None → the
    #: policy's ``analysis.false_rollback`` (Bonferroni-split) / ``analysis.false_promotion``.
    false_rollback: float | None = Field(None, gt=0.0, lt=0.5)
    false_promotion: float | None = Field(None, gt=0.0, lt=0.5)

    @property
    def sequential(self) -> bool:
        """True for gates judged by Wald's SPRT on the difference — a relative ``candidate - stable >= -δ`` /
        ``<= δ`` condition (δ > 0), whatever the estimator (Wilson proportions: the two-sample binomial difference;
        paired: discordant pairs or DeLong; AUC and normal estimates: the difference of two normals); absolute and
        ratio conditions keep the fixed-confidence interval rule."""
        cond = self.condition
        if cond.comparison != "difference":
            return False
        return cond.threshold < 0 if cond.wants_high else cond.threshold > 0

    @property
    def paired(self) -> bool:
        """True for gates judged on the requests both versions scored (shadow): measured once per pair."""
        return isinstance(self.estimator, PairedEstimator)

    @model_validator(mode="after")
    def _relative_needs_version(self) -> OutcomeGate:
        if self.paired:
            return self._paired_queries()
        _check_relative(self.name, self.condition, estimator_templates(self.estimator))
        if "version" not in template_placeholders(self.labels_query):
            raise ValueError(f"gate {self.name!r}: labels_query must count labels per {{{{version}}}}")
        return self

    def _paired_queries(self) -> OutcomeGate:
        """A paired gate judges a margin on the difference, on queries that name the pair and not one version."""
        if not self.sequential:
            raise ValueError(
                f"gate {self.name!r}: a paired estimator judges a margin on the difference (candidate - stable >= -δ "
                f"or candidate - stable <= δ with δ > 0), not {self.condition.text()!r}"
            )
        check_paired_queries(self.name, (*estimator_templates(self.estimator), self.labels_query))
        return self


class QualityGate(_GateBase):
    """The pre-rollout gate: the candidate's metrics on the frozen labelled regression set vs floors/ceilings."""

    layer: Literal["quality"]
    #: metric name → minimum (e.g. ``pr_auc: 0.80``); a missing or NaN metric is Inconclusive.
    floors: dict[str, float] = Field(default_factory=dict)
    #: metric name → maximum (e.g. ``ece: 0.05``).
    ceilings: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_bounds(self) -> QualityGate:
        if not self.floors and not self.ceilings:
            raise ValueError(f"quality gate {self.name!r} needs at least one floor or ceiling")
        bad = [k for k, v in {**self.floors, **self.ceilings}.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"quality gate {self.name!r}: non-finite bound(s) for {bad}")
        return self


Gate = Annotated[MetricGate | OutcomeGate | QualityGate, Field(discriminator="layer")]
StageGate = MetricGate | OutcomeGate


def check_paired_queries(name: str, templates: tuple[str, ...]) -> None:
    """A paired gate's queries name the pair with ``{{stable}}`` and ``{{candidate}}``, never ``{{version}}``."""
    for template in templates:
        found = template_placeholders(template)
        if not {"stable", "candidate"} <= found or "version" in found:
            raise ValueError(
                f"gate {name!r}: a paired estimator's queries (and labels_query) name the pair with "
                f"{{{{stable}}}} and {{{{candidate}}}}, not {{{{version}}}}: {template!r}"
            )


def _check_relative(name: str, condition: Condition, templates: tuple[str, ...]) -> None:
    if condition.relative and not all("version" in template_placeholders(t) for t in templates):
        raise ValueError(
            f"gate {name!r}: a condition relative to stable needs {{{{version}}}} in every query "
            "(the same query is measured for the candidate and for stable)"
        )


# --------------------------------------------------------------------------------------------------- the rest


class AnalysisPolicy(BaseModel):
    """How often and how patiently gates are measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The controller measures every gate of the current stage this often.
    interval_s: float = Field(30.0, gt=0.0, allow_inf_nan=False)
    #: Range of rate()-style queries, rendered as ``{{window}}``.
    window_s: float = Field(300.0, gt=0.0, allow_inf_nan=False)
    #: A gate whose measurement errors more often than this in a row aborts the rollout.
    consecutive_error_limit: int = Field(4, ge=0)
    #: A gate Inconclusive for longer than this (no traffic, no data) aborts the rollout …
    inconclusive_timeout_s: float = Field(3600.0, gt=0.0, allow_inf_nan=False)
    #: … except the gates that wait for labels (outcome gates, the label minimum): labels arrive days later.
    labels_timeout_s: float = Field(7 * 86400.0, gt=0.0, allow_inf_nan=False)
    #: Two-sided confidence level of outcome bounds.
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    #: Sequential (SPRT) relative outcome gates: α, the probability of rolling back a candidate no worse than stable,
    #: for the whole rollout (split by Bonferroni over the gate × stage instances that can roll back, see
    #: :meth:`RolloutPolicy.false_rollback`) …
    false_rollback: float = Field(0.01, gt=0.0, lt=0.5)
    #: … and β, the probability of promoting past one gate a candidate worse than stable by twice its margin.
    false_promotion: float = Field(0.01, gt=0.0, lt=0.5)
    #: The candidate's workload restarted more often than this during the rollout (crashes, a dead endpoint, not ready
    #: within the start timeout) rolls the rollout back (the ``candidate-workload`` gate) …
    max_restarts: int = Field(3, ge=0)
    #: … and so does a candidate not ready for longer than this in a row (routing, hence analysis, waits for it).
    not_ready_timeout_s: float = Field(600.0, gt=0.0, allow_inf_nan=False)


class SampleQueries(BaseModel):
    """Counts behind a stage's ``min_requests`` / ``min_labels`` (rendered for the candidate)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests: PromQLTemplate
    labels: PromQLTemplate


class PromotionPolicy(BaseModel):
    """What happens around the end of a rollout."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The registry alias that names the serving version (moved to the candidate on promotion).
    alias: str = Field("champion", min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    #: After promotion the previous stable keeps scoring in shadow (one-step revert) for this long.
    warm_window_s: float = Field(3600.0, ge=0.0, allow_inf_nan=False)
    #: A rolled-back candidate is scaled down this long after the rollback (time to inspect it).
    scale_down_delay_s: float = Field(300.0, ge=0.0, allow_inf_nan=False)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge key by key, everything else (lists too: ``gates``) replaces."""
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in override.items():
        held = merged.get(key)
        if isinstance(value, Mapping) and isinstance(held, dict):
            merged[key] = deep_merge(held, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _args(raw: Any, where: str, *, defaults: bool) -> dict[str, str | None]:
    """``[{name, value}]`` as name → value (None: a template's arg without a default); ValueError naming ``where``
    and the arg for a bad name, a missing value (a gate's), a repeated name or an unsafe value."""
    if raw is None:
        return {}
    if not isinstance(raw, list | tuple):
        raise ValueError(f"{where}.args: a list of {{name, value}}")
    found: dict[str, str | None] = {}
    for item in raw:
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str) or re.fullmatch(ARG_NAME_PATTERN, name) is None:
            raise ValueError(f"{where}.args: {name!r} is not an arg name (a letter, then letters, digits, '_', '-')")
        if name in found:
            raise ValueError(f"{where}.args: {name!r} is given twice")
        if set(item) - {"name", "value"}:
            raise ValueError(f"{where}.args.{name}: only name and value")
        value = item.get("value")
        if value is None and not defaults:
            raise ValueError(f"{where}.args.{name}: needs a value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"{where}.args.{name}: the value is a string or a number")
            value = str(value)
            if len(value) > MAX_ARG_VALUE_CHARS or any(bad in value for bad in _ARG_FORBIDDEN):
                raise ValueError(f"{where}.args.{name}: at most {MAX_ARG_VALUE_CHARS} characters, no '{{{{', "
                                 "'}}', line break or NUL")  # fmt: skip
        found[name] = value
    return found


def _used_args(node: Any) -> set[str]:
    if isinstance(node, str):
        return set(_ARG_PLACEHOLDER.findall(node))
    if isinstance(node, Mapping):
        return set().union(*(_used_args(v) for v in node.values())) if node else set()
    if isinstance(node, list | tuple):
        return set().union(*(_used_args(v) for v in node)) if node else set()
    return set()


def _render_args(node: Any, values: Mapping[str, str]) -> Any:
    """``node`` with every ``{{args.NAME}}`` of its strings replaced by ``values[NAME]`` (all known: checked)."""
    if isinstance(node, str):
        return _ARG_PLACEHOLDER.sub(lambda m: values[m.group(1)], node)
    if isinstance(node, Mapping):
        return {k: _render_args(v, values) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_render_args(v, values) for v in node]
    return node


def _apply_template(gate: Mapping[str, Any], name: str, template: Mapping[str, Any]) -> dict[str, Any]:
    """The gate with the template's fields under its own and the template's args rendered with the gate's values
    (or the template's defaults)."""
    where = f"gate {gate.get('name')!r}"
    declared = _args(template.get("args"), f"metric_templates.{name}", defaults=True)
    given = _args(gate.get("args"), where, defaults=False)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"{where}: {unknown} not among the args of metric template {name!r} ({sorted(declared)})")
    merged = deep_merge({k: v for k, v in template.items() if k != "args"},
                        {k: v for k, v in gate.items() if k != "args"})  # fmt: skip
    undeclared = sorted(_used_args(merged) - set(declared))
    if undeclared:
        raise ValueError(f"{where}: {{{{args.{undeclared[0]}}}}} is used but metric template {name!r} declares no "
                         f"such arg ({sorted(declared)})")  # fmt: skip
    values = {**{k: v for k, v in declared.items() if v is not None}, **given}
    missing = sorted(set(declared) - set(values))
    if missing:
        raise ValueError(f"{where}: metric template {name!r} needs arg {missing[0]!r}: give it in the gate's "
                         f"args ([{{name: {missing[0]}, value: …}}])")  # fmt: skip
    rendered: dict[str, Any] = _render_args(merged, {k: v for k, v in values.items() if v is not None})
    if given:
        rendered["args"] = [{"name": k, "value": v} for k, v in given.items()]
    return rendered


def resolve_templates(data: Mapping[str, Any]) -> dict[str, Any]:
    """A policy mapping whose gates that name a ``template`` carry that metric template's fields under their own
    (deep-merged: a gate may override one estimator query), its ``{{args.NAME}}`` rendered with the gate's
    ``args`` or the template's defaults. Unknown templates, templates that set a gate's ``name`` or ``template``,
    a missing, unknown or unused-but-undeclared arg are refused, naming the gate and the arg."""
    templates = data.get("metric_templates") or {}
    gates = data.get("gates")
    if not isinstance(templates, Mapping) or not isinstance(gates, list | tuple):
        return dict(data)
    for name, fields in templates.items():
        if not isinstance(name, str) or re.fullmatch(TEMPLATE_NAME_PATTERN, name) is None:
            raise ValueError(f"metric_templates.{name}: a template's name is 1-63 of a-z, 0-9, '_', '.', '-'")
        if not isinstance(fields, Mapping):
            raise ValueError(f"metric_templates.{name}: a template is a mapping of gate fields (query, estimator, …)")
        own = sorted(_GATE_OWN_FIELDS & set(fields))
        if own:
            raise ValueError(f"metric_templates.{name}: a template cannot set {own} (the gate's own)")
    resolved = []
    for gate in gates:
        ref = gate.get("template") if isinstance(gate, Mapping) else None
        if ref is None:
            if isinstance(gate, Mapping) and (gate.get("args") is not None or _used_args(gate)):
                raise ValueError(f"gate {gate.get('name')!r}: args and {{{{args.…}}}} belong to a metric template")
            resolved.append(gate)
            continue
        if ref not in templates:
            raise ValueError(
                f"gate {gate.get('name')!r}: no metric template {ref!r} (metric_templates: {sorted(templates)})"
            )
        resolved.append(_apply_template(gate, ref, templates[ref]))
    return {**data, "gates": resolved}


class RolloutPolicy(BaseModel):
    """The whole policy: stages, gates, analysis timings, promotion, and the reusable metric templates the gates may
    be built from (Argo's AnalysisTemplate, Flagger's MetricTemplate): ``metric_templates`` maps a name to gate
    fields — its PromQL (``query``, ``estimator``, ``labels_query``), and ``layer``, ``stages``, ``condition`` or
    ``unit`` when they are shared too — and a gate with ``template: NAME`` gets them under its own fields. A gate
    without ``template`` states its PromQL inline, as before."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: Stages = Stages()
    analysis: AnalysisPolicy = AnalysisPolicy()
    promotion: PromotionPolicy = PromotionPolicy()
    samples: SampleQueries
    metric_templates: dict[Annotated[str, Field(pattern=TEMPLATE_NAME_PATTERN)], dict[str, Any]] = Field(
        default_factory=dict
    )
    gates: tuple[Gate, ...] = Field(..., min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _resolve_templates(cls, data: Any) -> Any:
        return resolve_templates(data) if isinstance(data, Mapping) else data

    @field_validator("gates")
    @classmethod
    def _unique_names(cls, gates: tuple[Gate, ...]) -> tuple[Gate, ...]:
        names = [g.name for g in gates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"gate names must be unique: {duplicates}")
        reserved = sorted({MIN_REQUESTS_GATE, MIN_LABELS_GATE, WORKLOAD_GATE} & set(names))
        if reserved:
            raise ValueError(f"gate names {reserved} are reserved for the stage minimums")
        return gates

    @model_validator(mode="after")
    def _every_stage_watched(self) -> RolloutPolicy:
        unwatched = [s for s in TRAFFIC_STAGES if not self.gates_for(s)]
        if unwatched:
            raise ValueError(f"every stage needs at least one gate; none for {unwatched}")
        for stage in TRAFFIC_STAGES:
            outcome = [g for g in self.gates_for(stage) if isinstance(g, OutcomeGate)]
            if any(g.min_labels is None for g in outcome) and self.stages.of(stage).min_labels <= 0:
                raise ValueError(f"stage {stage!r} has outcome gates without min_labels and no stage min_labels")
        return self

    def gates_for(self, stage: TrafficStage) -> tuple[StageGate, ...]:
        """The gates that watch ``stage``, in policy order."""
        return tuple(g for g in self.gates if isinstance(g, MetricGate | OutcomeGate) and stage in g.stages)

    def quality_gates(self) -> tuple[QualityGate, ...]:
        return tuple(g for g in self.gates if isinstance(g, QualityGate))

    def min_labels(self, gate: OutcomeGate, stage: TrafficStage) -> int:
        """Labels each version needs before ``gate`` is judged in ``stage``."""
        return gate.min_labels if gate.min_labels is not None else self.stages.of(stage).min_labels

    def waits_for_labels(self, gate_name: str) -> bool:
        """True for gates whose evidence is labels (outcome gates and the label minimum ``min-labels``)."""
        if gate_name == MIN_LABELS_GATE:
            return True
        return any(g.name == gate_name and isinstance(g, OutcomeGate) for g in self.gates)

    def inconclusive_timeout_s(self, gate_name: str) -> float:
        """How long the gate may stay Inconclusive before the rollout is aborted."""
        if self.waits_for_labels(gate_name):
            return self.analysis.labels_timeout_s
        return self.analysis.inconclusive_timeout_s

    def confidence(self, gate: OutcomeGate) -> float:
        return gate.confidence if gate.confidence is not None else self.analysis.confidence

    def sequential_instances(self) -> int:
        """How many (gate, stage step) instances of sequential gates — relative outcome gates and rate-estimated metric
        gates — there are (each can roll the rollout back; a stage split by ``stages.steps`` counts once per step)."""
        return sum(
            self.stages.step_count(stage)
            for g in self.gates
            if isinstance(g, OutcomeGate | MetricGate) and g.sequential
            for stage in g.stages
        )

    def false_rollback(self, gate: OutcomeGate | MetricGate) -> float:
        """α of ``gate``'s SPRT in one stage: its own ``false_rollback`` when set, else the policy's
        ``analysis.false_rollback`` split by Bonferroni over :meth:`sequential_instances`, so the probability that
        any of them rolls back a candidate no worse than stable stays ≤ ``analysis.false_rollback``."""
        if gate.false_rollback is not None:
            return gate.false_rollback
        return self.analysis.false_rollback / max(self.sequential_instances(), 1)

    def false_promotion(self, gate: OutcomeGate | MetricGate) -> float:
        """β of ``gate``'s SPRT: promoting past it a candidate worse than stable by twice the gate's margin."""
        return gate.false_promotion if gate.false_promotion is not None else self.analysis.false_promotion


def next_stage(stage: TrafficStage) -> TrafficStage | None:
    """The stage after ``stage``, or None after ``full`` (promotion)."""
    index = TRAFFIC_STAGES.index(stage)
    return TRAFFIC_STAGES[index + 1] if index + 1 < len(TRAFFIC_STAGES) else None


def routing_stage(stage: TrafficStage) -> Stage:
    """The routing-table stage of a traffic stage (the same name)."""
    return stage


# --------------------------------------------------------------------------------------------------- YAML


def policy_from_mapping(data: Mapping[str, Any]) -> RolloutPolicy:
    return RolloutPolicy.model_validate(dict(data))


def load_policy(path: Path | None = None) -> RolloutPolicy:
    """The policy in the YAML file at ``path``; the packaged default policy when ``path`` is None."""
    if path is None:
        text = resources.files("rollout.core").joinpath(DEFAULT_POLICY_RESOURCE).read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return loads_policy(text)


def loads_policy(text: str) -> RolloutPolicy:
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("a rollout policy must be a YAML mapping")
    return policy_from_mapping(data)


def dumps_policy(policy: RolloutPolicy) -> str:
    """The policy as YAML (conditions as strings; unset optional fields left out, as a user writes it, so the CRD
    and the chart's values schema accept it); ``loads_policy(dumps_policy(p)) == p``."""
    data = policy.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def dump_policy(policy: RolloutPolicy, path: Path) -> None:
    path.write_text(dumps_policy(policy), encoding="utf-8")
