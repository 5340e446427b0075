"""rollout.core.policy: the shipped default, YAML round trips, validation, and PromQL rendering that cannot be
injected."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from rollout.core import policy as pol
from rollout.core.policy_fields import from_api_conventions
from rollout.core.routing import STAGES, VersionEndpoint
from rollout.demo.policy import load_demo_policy
from rollout.router.metrics import RouterMetrics
from rollout.router.outcomes.feedback import _OutcomeMetrics
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.settings import PrometheusSettings
from service.data.velocity import BURST_FEATURES, VELOCITY_FEATURES
from service.serving.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

MINIMAL = """
samples:
  requests: sum(requests_total{model_version="{{version}}"})
  labels: sum(labels_total{model_version="{{version}}"})
gates:
  - name: errors
    layer: health
    stages: [shadow, canary, ab, full]
    query: errors{model_version="{{version}}"}
    condition: value <= 0.01
"""


def _minimal(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(MINIMAL)
    data.update(changes)
    return data


# --------------------------------------------------------------------------------------------------- default


DEFAULT_POLICY_TEXT = (Path(pol.__file__).parent / "default_policy.yaml").read_text(encoding="utf-8")


def test_default_policy_covers_every_layer_and_stage() -> None:
    policy = pol.load_policy(None)
    layers = {g.layer for g in policy.gates}
    assert layers == {"health", "input_drift", "output_drift", "outcome", "quality"}
    for stage in pol.TRAFFIC_STAGES:
        assert {g.layer for g in policy.gates_for(stage)} >= {"health", "output_drift"}
    # input drift where both versions score the same requests (a canary's sticky subset of accounts differs anyway)
    assert {s for g in policy.gates if g.layer == "input_drift" for s in g.stages} == {"shadow", "full"}
    assert policy.stages.canary.weight == pol.DEFAULT_CANARY_WEIGHT
    assert policy.stages.ab.weight == pol.DEFAULT_AB_WEIGHT
    names = {g.name for g in policy.gates}
    assert {"recall", "precision", "roc-auc-paired", "calibration-error"} <= names
    assert {"error-rate", "latency", "input-psi-max", "score-psi", "decision-rate-shift"} <= names
    assert "shadow-agreement" in {g.name for g in policy.gates_for("shadow")}
    assert [g.name for g in policy.quality_gates()] == ["regression-set"]


def test_default_outcome_gates_compare_a_bound_with_enough_labels() -> None:
    policy = pol.load_policy(None)
    outcome = [g for g in policy.gates if isinstance(g, pol.OutcomeGate)]
    assert outcome
    for gate in outcome:
        assert gate.condition.relative, gate.name
        for stage in gate.stages:
            assert policy.min_labels(gate, stage) > 0
        assert policy.inconclusive_timeout_s(gate.name) == policy.analysis.labels_timeout_s
    assert policy.inconclusive_timeout_s("error-rate") == policy.analysis.inconclusive_timeout_s
    assert policy.inconclusive_timeout_s(pol.MIN_LABELS_GATE) == policy.analysis.labels_timeout_s


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    policy = pol.load_policy(None)
    path = tmp_path / "policy.yaml"
    pol.dump_policy(policy, path)
    again = pol.load_policy(path)
    assert again == policy
    assert pol.dumps_policy(again) == path.read_text(encoding="utf-8")
    # conditions are written back as readable strings, not as nested mappings
    dumped = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert dumped["gates"][1]["condition"] == "value <= 0.01"


def test_changed_policy_round_trips(tmp_path: Path) -> None:
    data = yaml.safe_load(pol.dumps_policy(pol.load_policy(None)))
    data["stages"]["canary"]["weight"] = 2
    data["analysis"]["consecutive_error_limit"] = 1
    policy = pol.policy_from_mapping(data)
    assert policy.stages.canary.weight == 2
    assert pol.loads_policy(pol.dumps_policy(policy)) == policy


def test_traffic_stages_are_routing_stages_in_routing_order() -> None:
    assert set(pol.TRAFFIC_STAGES) <= set(STAGES)
    assert sorted(pol.TRAFFIC_STAGES, key=STAGES.index) == list(pol.TRAFFIC_STAGES)
    assert [pol.next_stage(s) for s in pol.TRAFFIC_STAGES] == [*pol.TRAFFIC_STAGES[1:], None]


# --------------------------------------------------------------------------------------------------- series names


def _exported_series() -> set[str]:
    """Sample names the real metric classes export (counters as _total, histograms as _bucket/_sum/_count)."""
    registry = CollectorRegistry()
    Metrics(registry)
    RouterMetrics(registry, latency_buckets_s=(0.1, 1.0), score_delta_buckets=(0.0, 1.0), process_metrics=False)
    _OutcomeMetrics(registry, OutcomeSettings())
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        kind_suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
        }
        names.update(family.name + suffix for suffix in kind_suffixes.get(family.type, ()))
    return names


def _recorded_series() -> set[str]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {r["record"] for group in rules["groups"] for r in group["rules"] if "record" in r}


def _all_templates(policy: pol.RolloutPolicy) -> list[str]:
    templates = [policy.samples.requests, policy.samples.labels]
    for gate in policy.gates:
        if isinstance(gate, pol.MetricGate):
            templates.append(gate.query)
        elif isinstance(gate, pol.OutcomeGate):
            templates += [gate.labels_query, *pol.estimator_templates(gate.estimator)]
    return templates


def test_default_queries_read_series_that_exist() -> None:
    """Every series the default policy reads is exported by service/router/outcome metrics or recorded by rules.yml."""
    known = _exported_series() | _recorded_series()
    used: set[str] = set()
    for template in _all_templates(pol.load_policy(None)):
        # a series name is an identifier directly followed by its label matchers
        used.update(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\{)", template))
    assert used, "the default policy reads no series?"
    missing = sorted(used - known)
    assert not missing, f"series read by the default policy but defined nowhere: {missing}"


def test_default_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each rendered default query is valid PromQL: promtool checks them as recording rules."""
    promtool = PrometheusSettings().promtool
    if not promtool.exists():
        pytest.fail(f"{promtool} is missing: install Debian's prometheus package")
    policy = pol.load_policy(None)
    context = pol.RenderContext(
        stable="v1", candidate="v2", version="v2", window_s=300, stage_window_s=3600, stage="ab"
    )
    rules = [
        {"record": f"fw_policy_check:query_{i}", "expr": pol.render(template, context)}
        for i, template in enumerate(_all_templates(policy))
    ]
    path = tmp_path / "policy_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "policy", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


# --------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("weight", [0, 6, 50])
def test_canary_weight_outside_one_to_five_is_rejected(weight: int) -> None:
    with pytest.raises(ValidationError, match="weight"):
        pol.policy_from_mapping(_minimal(stages={"canary": {"weight": weight}}))


@pytest.mark.parametrize("weight", [1, 3, 5])
def test_canary_weight_inside_one_to_five_is_accepted(weight: int) -> None:
    policy = pol.policy_from_mapping(_minimal(stages={"canary": {"weight": weight}}))
    assert policy.stages.candidate_weight("canary") == weight
    assert policy.stages.candidate_weight("shadow") == 0
    assert policy.stages.candidate_weight("ab") == pol.DEFAULT_AB_WEIGHT
    assert policy.stages.candidate_weight("full") == pol.PERCENT


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ([1, 5, 5, 50], "grow strictly"),
        ([5, 1, 50], "grow strictly"),
        ([0, 5, 50], "between 1 and 99"),
        ([1, 5, 100], "between 1 and 99"),
        ([1, 2, 5], "one A/B weight"),
        ([10, 25, 50], "one canary weight"),
        ([], "at least 1"),
        (list(range(1, 13)), "at most 10"),
    ],
)
def test_traffic_steps_that_do_not_grow_or_leave_canary_or_ab_empty_are_rejected_naming_the_field(
    steps: list[int], why: str
) -> None:
    with pytest.raises(ValidationError, match=why) as caught:
        pol.policy_from_mapping(_minimal(stages={"steps": steps}))
    assert "steps" in str(caught.value)


def test_traffic_steps_replace_the_canary_and_ab_weights_and_count_in_the_alpha_split() -> None:
    data = yaml.safe_load(DEFAULT_POLICY_TEXT)
    default = pol.policy_from_mapping(data)
    stepped = pol.policy_from_mapping({**data, "stages": {**data["stages"], "steps": [1, 5, 25, 50]}})
    assert [stepped.stages.step_weights(s) for s in pol.TRAFFIC_STAGES] == [(0,), (1, 5), (25, 50), (100,)]
    assert stepped.stages.candidate_weight("canary", 1) == 5 and stepped.stages.candidate_weight("ab", 0) == 25
    gates = [g for g in stepped.gates if isinstance(g, pol.OutcomeGate | pol.MetricGate) and g.sequential]
    extra = sum(1 for g in gates for s in g.stages if s in ("canary", "ab"))  # one more instance per added step
    assert stepped.sequential_instances() == default.sequential_instances() + extra
    for gate in gates:
        assert stepped.false_rollback(gate) == pytest.approx(0.01 / stepped.sequential_instances())
        assert stepped.false_rollback(gate) < default.false_rollback(gate)
    # without steps, nothing changes: the shipped policies keep their declared instance counts
    assert default.sequential_instances() == 30 and load_demo_policy().sequential_instances() == 25


def test_a_stage_without_gates_is_rejected() -> None:
    data = _minimal()
    data["gates"][0]["stages"] = ["shadow", "canary", "ab"]
    with pytest.raises(ValidationError, match="full"):
        pol.policy_from_mapping(data)


def test_duplicate_and_reserved_gate_names_are_rejected() -> None:
    data = _minimal()
    data["gates"] = [data["gates"][0], data["gates"][0]]
    with pytest.raises(ValidationError, match="unique"):
        pol.policy_from_mapping(data)
    data = _minimal()
    data["gates"][0]["name"] = pol.MIN_LABELS_GATE
    with pytest.raises(ValidationError, match="reserved"):
        pol.policy_from_mapping(data)


def test_relative_condition_needs_the_version_placeholder() -> None:
    data = _minimal()
    data["gates"][0]["condition"] = "candidate - stable <= 0.01"
    data["gates"][0]["query"] = 'errors{model_version="{{candidate}}"}'
    with pytest.raises(ValidationError, match="version"):
        pol.policy_from_mapping(data)


def test_outcome_gate_without_any_label_minimum_is_rejected() -> None:
    data = _minimal()
    data["gates"].append(
        {
            "name": "recall",
            "layer": "outcome",
            "stages": ["ab"],
            "labels_query": 'sum(labels_total{model_version="{{version}}"})',
            "estimator": {
                "method": "wilson",
                "successes": 'tp{model_version="{{version}}"}',
                "trials": 'pos{model_version="{{version}}"}',
            },
            "condition": "candidate - stable >= -0.05",
        }
    )
    with pytest.raises(ValidationError, match="min_labels"):
        pol.policy_from_mapping(data)
    data["stages"] = {"ab": {"min_labels": 10}}
    policy = pol.policy_from_mapping(data)
    gate = policy.gates[1]
    assert isinstance(gate, pol.OutcomeGate)
    assert policy.min_labels(gate, "ab") == 10


def test_quality_gate_needs_a_bound() -> None:
    data = _minimal()
    data["gates"].append({"name": "regression", "layer": "quality"})
    with pytest.raises(ValidationError, match="floor"):
        pol.policy_from_mapping(data)


# --------------------------------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("text", "comparison", "op", "threshold"),
    [
        ("value <= 0.01", "value", "<=", 0.01),
        ("candidate>=0.95", "value", ">=", 0.95),
        ("candidate - stable <= 0.02", "difference", "<=", 0.02),
        ("candidate-stable >= -5e-2", "difference", ">=", -0.05),
        ("abs(candidate - stable) < 0.01", "abs_difference", "<", 0.01),
        ("candidate / stable >= 0.95", "ratio", ">=", 0.95),
    ],
)
def test_conditions_parse(text: str, comparison: str, op: str, threshold: float) -> None:
    cond = pol.Condition.model_validate(text)
    assert (cond.comparison, cond.op, cond.threshold) == (comparison, op, threshold)


@pytest.mark.parametrize(
    "text", ["value == 0.1", "stable - candidate <= 1", "value <= abc", "value <= 1; drop", "", "value <= nan"]
)
def test_malformed_conditions_are_rejected(text: str) -> None:
    with pytest.raises(ValidationError):
        pol.Condition.model_validate(text)


@given(
    comparison=st.sampled_from(get_args(pol.Comparison)),
    op=st.sampled_from(get_args(pol.Operator)),
    threshold=st.floats(allow_nan=False, allow_infinity=False, width=64),
)
def test_condition_text_round_trips(comparison: pol.Comparison, op: pol.Operator, threshold: float) -> None:
    cond = pol.Condition(comparison=comparison, op=op, threshold=threshold)
    assert pol.Condition.model_validate(cond.text()) == cond


def test_condition_holds() -> None:
    assert pol.Condition.model_validate("value <= 1").holds(1.0)
    assert not pol.Condition.model_validate("value < 1").holds(1.0)
    assert pol.Condition.model_validate("value >= 1").holds(1.0)
    assert not pol.Condition.model_validate("value > 1").holds(1.0)


# --------------------------------------------------------------------------------------------------- templates


def _context(version: str = "v2") -> pol.RenderContext:
    return pol.RenderContext(stable="v1", candidate="v2", version=version, window_s=300, stage_window_s=61.2)


def test_render_fills_every_placeholder() -> None:
    template = (
        'sum(rate(x{model_version="{{version}}",a="{{ stable }}",b!="{{candidate}}"}[{{window}}]))'
        ' / sum(increase(y{model_version="{{version}}"}[{{stage_window}}]))'
    )
    rendered = pol.render(template, _context())
    assert rendered == (
        'sum(rate(x{model_version="v2",a="v1",b!="v2"}[300s])) / sum(increase(y{model_version="v2"}[62s]))'
    )


@pytest.mark.parametrize(
    "template",
    [
        'x{model_version=~"{{version}}"}',  # regex matcher: "." would match anything
        'x{model_version!~"{{version}}"}',
        'x{model_version="v-{{version}}"}',  # not the whole value
        'x{model_version="{{version}}-x"}',
        "x{{version}}",  # free text
        'x{model_version="{{versions}}"}',  # unknown placeholder
        "   ",
    ],
)
def test_unsafe_templates_are_rejected(template: str) -> None:
    with pytest.raises(ValueError):
        pol.render(template, _context())
    data = _minimal()
    data["gates"][0]["query"] = template
    with pytest.raises(ValidationError):
        pol.policy_from_mapping(data)


@pytest.mark.parametrize(
    "version",
    ['v1"} or vector(1) or x{a="', "v1\\", 'v"', "v1\n", "v1 ", "", "-v1", "v{1}", "a" * 129],
)
def test_injection_attempts_are_refused(version: str) -> None:
    with pytest.raises(pol.InvalidVersionError):
        pol.render('x{model_version="{{version}}"}', _context(version))


def _decode_promql_string(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), body)


@given(st.text(max_size=40) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+@-]{0,20}", fullmatch=True))
def test_rendered_label_value_is_exactly_the_version(version: str) -> None:
    """For any string: either refused, or the query holds one matcher whose decoded value is the version itself."""
    template = 'sum(x{model_version="{{version}}",role="decider"})'
    try:
        rendered = pol.render(template, _context(version))
    except pol.InvalidVersionError:
        assert not pol.is_valid_version(version)
        return
    match = re.fullmatch(r'sum\(x\{model_version="((?:[^"\\]|\\.)*)",role="decider"\}\)', rendered)
    assert match is not None, rendered
    assert _decode_promql_string(match.group(1)) == version


def test_promql_string_escapes() -> None:
    assert pol.promql_string('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


@given(st.text(max_size=30) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+@-]{0,20}", fullmatch=True))
def test_version_grammar_matches_the_routing_table(version: str) -> None:
    try:
        VersionEndpoint(version=version, url="http://127.0.0.1:3000")
        accepted = True
    except ValidationError:
        accepted = False
    assert pol.is_valid_version(version) == accepted


def test_prometheus_duration() -> None:
    assert pol.prometheus_duration(0.0) == "1s"
    assert pol.prometheus_duration(299.2) == "300s"
    assert pol.prometheus_duration(3600) == "3600s"


# --------------------------------------------------------------------------------------------------- PromQL values


def _counter(series: str, per_minute: float, minutes: int) -> dict[str, str]:
    return {"series": series, "values": f"0+{per_minute!r}x{minutes}"}


def _promtool_agrees(
    promtool: Path,
    path: Path,
    series: list[dict[str, str]],
    checks: list[tuple[str, float]],
    ctx: pol.RenderContext,
    minutes: int,
) -> None:
    """promtool evaluates each rendered template over ``series`` (on top of rules.yml) and finds its expected value."""
    tests = [
        {
            "expr": f"abs(({pol.render(template, ctx)}) - {expected!r}) < bool 1e-9",
            "eval_time": f"{minutes}m",
            "exp_samples": [{"labels": "{}", "value": 1}],
        }
        for template, expected in checks
    ]
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    path.write_text(yaml.safe_dump(spec, width=10_000), encoding="utf-8")
    result = subprocess.run([str(promtool), "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_queries_compute_what_the_analysis_expects(tmp_path: Path) -> None:
    """promtool evaluates the rendered default queries (on top of rules.yml) over synthetic counters; each value is
    checked against the same number computed in Python (ECE through rollout.core.drift, independently of PromQL)."""
    promtool = PrometheusSettings().promtool
    if not promtool.exists():
        pytest.fail(f"{promtool} is missing: install Debian's prometheus package")
    from rollout.core.drift import CalibrationBin, calibration_error

    rng = np.random.default_rng(3)
    minutes, window_min = 120, 60
    policy = pol.load_policy(None)
    ctx = pol.RenderContext(
        stable="v1", candidate="v2", version="v2", window_s=300, stage_window_s=window_min * 60, stage="ab"
    )
    gates = {g.name: g for g in policy.gates}
    series: list[dict[str, str]] = []
    checks: list[tuple[str, float]] = []

    cells = {cell: float(rng.integers(1, 20)) for cell in ("tp", "fp", "tn", "fn")}
    for cell, rate in cells.items():
        for stage in ("ab", "canary"):  # canary's predictions, labelled during ab, must not count in ab's gates
            labels = f'model_version="v2",role="decider",stage="{stage}",outcome="{cell}"'
            series.append(_counter(f"fraudwatch_outcome_total{{{labels}}}", rate, minutes))
        # v2 as stable's control shadow would not count in the arms' own recall and precision (role decider)
        shadow = f'model_version="v2",role="shadow",stage="ab",outcome="{cell}"'
        series.append(_counter(f"fraudwatch_outcome_total{{{shadow}}}", 100.0, minutes))
    recall, precision = gates["recall"], gates["precision"]
    assert isinstance(recall, pol.OutcomeGate) and isinstance(recall.estimator, pol.WilsonEstimator)
    assert isinstance(precision, pol.OutcomeGate) and isinstance(precision.estimator, pol.WilsonEstimator)
    checks += [
        # each gate's label minimum counts the labels its estimate uses: frauds for recall, flagged for precision
        (recall.labels_query, (cells["tp"] + cells["fn"]) * window_min),
        (precision.labels_query, (cells["tp"] + cells["fp"]) * window_min),
        (policy.samples.labels, (sum(cells.values()) + 4 * 100.0) * window_min),
        (recall.estimator.successes, cells["tp"] * window_min),
        (recall.estimator.trials, (cells["tp"] + cells["fn"]) * window_min),
        (precision.estimator.trials, (cells["tp"] + cells["fp"]) * window_min),
    ]

    bins = []
    for b in range(10):
        count = float(rng.integers(1, 30))
        predicted = round(count * rng.uniform(b / 10, (b + 1) / 10), 3)
        fraud = float(rng.integers(0, int(count) + 1))
        labels = f'model_version="v2",role="decider",stage="ab",bin="{b}"'
        series += [
            _counter(f"fraudwatch_calibration_predicted_count{{{labels}}}", count, minutes),
            _counter(f"fraudwatch_calibration_predicted_sum{{{labels}}}", predicted, minutes),
            _counter(f"fraudwatch_calibration_observed_fraud_total{{{labels}}}", fraud, minutes),
        ]
        bins.append(CalibrationBin(count * window_min, predicted * window_min, fraud * window_min))
    ece = calibration_error(bins)
    assert ece is not None
    n = np.array([b.count for b in bins])
    o = np.array([b.observed_fraud for b in bins])
    stderr = float(np.sqrt(np.sum(o - o * o / n)) / n.sum())
    calibration = gates["calibration-error"]
    assert isinstance(calibration, pol.OutcomeGate) and isinstance(calibration.estimator, pol.NormalEstimator)
    checks += [(calibration.estimator.query, ece.expected), (calibration.estimator.stderr, stderr)]

    calls = {"2xx": 50.0, "5xx": 1.0, "timeout": 0.5, "4xx": 3.0}
    for outcome, rate in calls.items():
        for role in ("decider", "shadow"):
            labels = f'model_version="v2",role="{role}",stage="canary",outcome="{outcome}"'
            series.append(_counter(f"fraudwatch_router_requests_total{{{labels}}}", rate, minutes))
    error_rate = gates["error-rate"]
    assert isinstance(error_rate, pol.MetricGate)
    checks += [(error_rate.query, (calls["5xx"] + calls["timeout"]) / sum(calls.values()))]

    series += [
        _counter('fraudwatch_decisions_total{model_version="v2",decision="review"}', 3.0, minutes),
        _counter('fraudwatch_decisions_total{model_version="v2",decision="approve"}', 97.0, minutes),
        _counter('fraudwatch_shadow_agreement_total{stable="v1",candidate="v2",agree="true"}', 45.0, minutes),
        _counter('fraudwatch_shadow_agreement_total{stable="v1",candidate="v2",agree="false"}', 5.0, minutes),
    ]
    decision, agreement = gates["decision-rate-shift"], gates["shadow-agreement"]
    assert isinstance(decision, pol.MetricGate) and isinstance(agreement, pol.MetricGate)
    checks += [(decision.query, 0.03), (agreement.query, 0.9)]

    # the latency gate's share of calls slower than its limit (0.1 s), from the router's histogram, both roles
    for role, (fast, total) in {"decider": (98.0, 100.0), "shadow": (45.0, 50.0)}.items():
        for le, count in (("0.05", fast / 2), ("0.1", fast), ("+Inf", total)):
            labels = f'model_version="v2",role="{role}",le="{le}"'
            series.append(_counter(f"fraudwatch_router_request_duration_seconds_bucket{{{labels}}}", count, minutes))
        labels = f'model_version="v2",role="{role}"'
        series.append(_counter(f"fraudwatch_router_request_duration_seconds_count{{{labels}}}", total, minutes))
    latency = gates["latency"]
    assert isinstance(latency, pol.MetricGate) and isinstance(latency.estimator, pol.RateEstimator)
    checks += [(latency.estimator.events, 7.0 * window_min), (latency.estimator.trials, 150.0 * window_min)]

    # the drift gates read each feature's bins over the stage window and the version's reference fractions; the
    # input gate not the score's, nor the burst features' (velocity.BURST_FEATURES: clustered requests)
    for feature, per_bin in (("amount", 2.0), ("score", 5.0), *((name, 3.0) for name in BURST_FEATURES)):
        for b in range(10):
            labels = f'model_version="v2",feature="{feature}",bin="{b}"'
            series.append(_counter(f"fraudwatch_feature_bin_total{{{labels}}}", per_bin, minutes))
            series.append({"series": f"fraudwatch_reference_bin_fraction{{{labels}}}", "values": f"0.1x{minutes}"})
    input_psi, score_psi = gates["input-psi-max"], gates["score-psi"]
    assert isinstance(input_psi, pol.MetricGate) and isinstance(input_psi.estimator, pol.PsiEstimator)
    assert isinstance(score_psi, pol.MetricGate) and isinstance(score_psi.estimator, pol.PsiEstimator)
    checks += [
        (f"sum({input_psi.estimator.counts})", 10 * 2.0 * window_min),  # amount's bins only
        (f"count({input_psi.estimator.reference})", 10.0),
        (f"sum({score_psi.estimator.counts})", 10 * 5.0 * window_min),
        (f"sum({score_psi.estimator.reference})", 1.0),
    ]

    _promtool_agrees(promtool, tmp_path / "policy_test.yml", series, checks, ctx, minutes)


def test_a_latency_share_must_read_a_bucket_the_router_has() -> None:
    """A limit between buckets (le="0.3") matches no series: the share of slow calls would be no data for ever."""
    gate = {
        "name": "slow-share", "layer": "health", "stages": ["canary"], "query": P99, "condition": "value <= 0.01",
        "estimator": {
            "method": "confidence_sequence",
            "events": 'sum(fraudwatch_router_request_duration_seconds_bucket{model_version="{{version}}",le="0.3"})',
            "trials": 'sum(fraudwatch_router_request_duration_seconds_count{model_version="{{version}}"})',
        },
    }  # fmt: skip
    with pytest.raises(ValueError, match="no bucket of the router's latency histogram"):
        pol.MetricGate.model_validate(gate)
    gate["estimator"]["events"] = gate["estimator"]["events"].replace('le="0.3"', 'le="0.25"')  # type: ignore[index]
    assert pol.MetricGate.model_validate(gate).sequential


@pytest.mark.parametrize("policy_name", ["default", "demo"])
def test_the_request_sample_counts_the_candidate_s_calls_in_its_stage_s_role_only(
    policy_name: str, tmp_path: Path
) -> None:
    """Issue 12, point 7: ``samples.requests`` counted every 2xx call of the candidate in the stage window — shadow
    calls made under another stage's table too. It counts the candidate's shadow calls in shadow and its deciding
    calls from canary on, each only under the stage's own table (promtool over synthetic counters)."""
    promtool = PrometheusSettings().promtool
    if not promtool.exists():
        pytest.fail(f"{promtool} is missing: install Debian's prometheus package")
    from rollout.demo.policy import load_demo_policy

    policy = pol.load_policy(None) if policy_name == "default" else load_demo_policy(1.0)
    minutes, window_min = 120, 60
    rates = {  # (role, stage) → 2xx calls of v2 per minute
        ("shadow", "shadow"): 7.0,
        ("decider", "canary"): 3.0,
        ("shadow", "canary"): 11.0,  # e.g. under a table that also shadows it: not the canary's decisions
        ("shadow", "stable"): 13.0,  # kept warm before the rollout's table was in force
        ("decider", "ab"): 17.0,
    }
    series = [
        _counter(f'fraudwatch_router_requests_total{{model_version="v2",role="{role}",stage="{stage}",outcome="{o}"}}',
                 rate if o == "2xx" else 1.0, minutes)
        for (role, stage), rate in rates.items()
        for o in ("2xx", "5xx")
    ]  # fmt: skip
    for stage, expected in (("shadow", 7.0), ("canary", 3.0), ("ab", 17.0)):
        ctx = pol.RenderContext(stable="v1", candidate="v2", version="v2", window_s=300,
                                stage_window_s=window_min * 60, stage=stage)  # fmt: skip
        checks = [(policy.samples.requests, expected * window_min)]
        _promtool_agrees(promtool, tmp_path / f"samples_{stage}.yml", series, checks, ctx, minutes)


def test_false_rollback_is_bonferroni_split_over_sequential_gate_stages() -> None:
    default = pol.load_policy()
    instances = default.sequential_instances()
    gates = [g for g in default.gates if isinstance(g, pol.OutcomeGate | pol.MetricGate) and g.sequential]
    assert {g.name for g in gates} == {"recall", "precision", "error-rate", "shadow-agreement", "decision-rate-shift",
                                       "recall-paired", "false-positive-rate-paired", "roc-auc-paired",
                                       "calibration-error", "latency", "input-psi-max", "score-psi"}  # fmt: skip
    assert instances == sum(len(g.stages) for g in gates) == 30
    # every gate of the default policy judges its own sample with declared error rates: none compares a point value
    assert all(g.sequential for g in default.gates if isinstance(g, pol.MetricGate | pol.OutcomeGate))
    # the shipped policy states its error rates (not only the defaults of AnalysisPolicy)
    assert "false_rollback: 0.01" in DEFAULT_POLICY_TEXT and "false_promotion: 0.01" in DEFAULT_POLICY_TEXT
    assert default.analysis.false_rollback == 0.01 and default.analysis.false_promotion == 0.01
    for gate in gates:
        assert default.false_rollback(gate) == pytest.approx(0.01 / instances)
        assert default.false_promotion(gate) == 0.01
    # A per-gate override is used as given.
    overridden = gates[0].model_copy(update={"false_rollback": 0.002, "false_promotion": 0.05})
    assert default.false_rollback(overridden) == 0.002 and default.false_promotion(overridden) == 0.05
    # Every outcome gate of the default policy has a ``candidate - stable`` margin: none is left to the
    # fixed-confidence interval rule (issue 10: that rule's error rates grow with the number of looks).
    assert all(g.sequential for g in default.gates if isinstance(g, pol.OutcomeGate))


def test_default_paired_queries_compute_what_the_analysis_expects(tmp_path: Path) -> None:
    """promtool evaluates the default policy's paired gates (outcomes and the decision-rate shift) over synthetic
    paired counters: only the shadow stage's predictions of this pair count, and a joint score cell born inside the
    stage counts whole (its first count is no increase() of a series that did not exist)."""
    promtool = PrometheusSettings().promtool
    if not promtool.exists():
        pytest.fail(f"{promtool} is missing: install Debian's prometheus package")
    minutes, window_min = 120, 60
    policy = pol.load_policy(None)
    gates = {g.name: g for g in policy.gates}
    ctx = pol.RenderContext("v1", "v2", "v2", 300, window_min * 60, "shadow")
    rates = {
        ("fraud", "1", "1"): 5.0, ("fraud", "1", "0"): 1.0, ("fraud", "0", "1"): 0.5, ("fraud", "0", "0"): 2.0,
        ("legit", "1", "1"): 3.0, ("legit", "1", "0"): 0.25, ("legit", "0", "1"): 0.75, ("legit", "0", "0"): 90.0,
    }  # fmt: skip
    series: list[dict[str, str]] = []
    for (label, sp, cp), rate in rates.items():
        for stage, pair in (("shadow", 'stable="v1",candidate="v2"'), ("canary", 'stable="v1",candidate="v2"'),
                            ("shadow", 'stable="v0",candidate="v2"')):  # fmt: skip
            labels = f'{pair},stage="{stage}",label="{label}",stable_prediction="{sp}",candidate_prediction="{cp}"'
            series.append(_counter(f"fraudwatch_outcome_paired_total{{{labels}}}", rate, minutes))
    cell = 'fraudwatch_outcome_paired_score_total{stable="v1",candidate="v2",stage="shadow",label="fraud",'
    series += [
        _counter(cell + 'stable_le="0.9",candidate_le="0.9"}', 2.0, minutes),  # counted since before the window
        {"series": cell + 'stable_le="0.9",candidate_le="0.1"}', "values": "_x90 1+1x30"},  # born at minute 90
    ]
    checks: list[tuple[str, float]] = []
    for name, label in (("recall-paired", "fraud"), ("false-positive-rate-paired", "legit")):
        gate = gates[name]
        assert isinstance(gate, pol.OutcomeGate) and isinstance(gate.estimator, pol.PairedProportionEstimator)
        total = sum(r for (lab, _, _), r in rates.items() if lab == label) * window_min
        checks += [
            (gate.labels_query, total),
            (gate.estimator.pairs, total),
            (gate.estimator.candidate_only, rates[(label, "0", "1")] * window_min),
            (gate.estimator.stable_only, rates[(label, "1", "0")] * window_min),
        ]
    auc = gates["roc-auc-paired"]
    assert isinstance(auc, pol.OutcomeGate) and isinstance(auc.estimator, pol.PairedAUCEstimator)
    checks.append((f"sum({auc.estimator.positive_cells})", 2.0 * window_min + 31))
    # the decision-rate shift reads the router's unlabelled pairs (every pair, at once) of this stage and pair
    decisions = {("1", "1"): 4.0, ("1", "0"): 0.5, ("0", "1"): 1.5, ("0", "0"): 60.0}
    for (sp, cp), rate in decisions.items():
        for stage, pair in (("shadow", 'stable="v1",candidate="v2"'), ("canary", 'stable="v1",candidate="v2"'),
                            ("shadow", 'stable="v0",candidate="v2"')):  # fmt: skip
            labels = f'{pair},stage="{stage}",stable_prediction="{sp}",candidate_prediction="{cp}"'
            series.append(_counter(f"fraudwatch_shadow_pairs_total{{{labels}}}", rate, minutes))
    shift = gates["decision-rate-shift"]
    assert isinstance(shift, pol.MetricGate) and isinstance(shift.estimator, pol.PairedProportionEstimator)
    checks += [
        (shift.estimator.pairs, sum(decisions.values()) * window_min),
        (shift.estimator.candidate_only, decisions[("0", "1")] * window_min),
        (shift.estimator.stable_only, decisions[("1", "0")] * window_min),
    ]
    _promtool_agrees(promtool, tmp_path / "paired_test.yml", series, checks, ctx, minutes)


@pytest.mark.parametrize("bad", [0.0, 0.5, -0.1])
def test_false_rates_must_be_in_range(bad: float) -> None:
    with pytest.raises(ValueError, match="false_rollback"):
        pol.AnalysisPolicy(false_rollback=bad)
    with pytest.raises(ValueError, match="false_promotion"):
        pol.AnalysisPolicy(false_promotion=bad)


# ------------------------------------------------------------------------------------------- gates that can fail

P99 = 'max(model_version_role:fraudwatch_router_request_duration_seconds:p99_5m{model_version="{{version}}"})'
QUANTILE = (
    "histogram_quantile(0.99, sum by (le) (rate(fraudwatch_router_request_duration_seconds_bucket"
    '{model_version="{{version}}"}[5m])))'
)


def _latency_gate(condition: str, query: str = P99, **extra: Any) -> dict[str, Any]:
    return {"name": "latency", "layer": "health", "stages": ["shadow", "canary", "ab", "full"], "query": query,
            "condition": condition,
            **extra}  # fmt: skip


@pytest.mark.parametrize("query", [P99, QUANTILE])
@pytest.mark.parametrize("condition", ["value <= 1.0", "value <= 2", "value < 1.5"])
def test_a_latency_limit_at_or_above_the_largest_bucket_is_refused(query: str, condition: str) -> None:
    """histogram_quantile reports a quantile beyond the largest finite bucket (1.0 s) as 1.0: ``value <= 1.0`` is
    Successful whatever the latency (issue 10: 64 of 12,353 calls over 1 s recorded as a pass)."""
    with pytest.raises(ValidationError, match="can never fail"):
        pol.policy_from_mapping(_minimal(gates=[_latency_gate(condition, query)]))


@pytest.mark.parametrize("condition", ["value <= 0.5", "value < 1.0", "value >= 0.001"])
def test_a_latency_limit_the_query_can_exceed_is_accepted(condition: str) -> None:
    assert pol.policy_from_mapping(_minimal(gates=[_latency_gate(condition)])).gates[0].name == "latency"


def test_a_stated_max_value_is_checked_for_any_query() -> None:
    gate = _latency_gate("value <= 5", query='max(my_ratio{model_version="{{version}}"})', max_value=5)
    with pytest.raises(ValidationError, match=r"cannot exceed 5 \(max_value"):
        pol.policy_from_mapping(_minimal(gates=[gate]))
    gate["condition"] = "value <= 4.5"
    accepted = pol.policy_from_mapping(_minimal(gates=[gate])).gates[0]
    assert isinstance(accepted, pol.MetricGate) and accepted.max_value == 5.0


def test_the_ceiling_is_the_routers_largest_finite_latency_bucket() -> None:
    from rollout.settings import RouterSettings

    assert pol.QUANTILE_CEILINGS["fraudwatch_router_request_duration_seconds"] == max(
        RouterSettings().latency_buckets_s
    )
    assert pol.quantile_ceiling('sum(fraudwatch_router_request_duration_seconds_count{model_version="v1"})') is None


def test_the_stage_placeholder_renders_the_stage_measured_and_only_as_an_exact_matcher() -> None:
    template = (
        'sum(increase(fraudwatch_outcome_total{model_version="{{version}}",stage="{{stage}}"}[{{stage_window}}]))'
    )
    context = pol.RenderContext(stable="v1", candidate="v2", version="v2", window_s=300, stage_window_s=61, stage="ab")
    assert pol.render(template, context) == (
        'sum(increase(fraudwatch_outcome_total{model_version="v2",stage="ab"}[61s]))'
    )
    with pytest.raises(ValueError, match="needs the traffic stage"):
        pol.render(template, pol.RenderContext(stable="v1", candidate="v2", version="v2", window_s=300,
                                               stage_window_s=61))  # fmt: skip
    with pytest.raises(ValueError, match="exact label matcher"):
        pol.policy_from_mapping(_minimal(samples={"requests": 'sum(r{stage=~"{{stage}}"})', "labels": "sum(l)"}))


def test_the_shipped_outcome_gates_count_only_their_own_stages_predictions() -> None:
    for policy in (pol.load_policy(), load_demo_policy()):
        assert 'stage="{{stage}}"' in policy.samples.labels
        for gate in policy.gates:
            if isinstance(gate, pol.OutcomeGate):
                assert 'stage="{{stage}}"' in gate.labels_query, gate.name
                est = gate.estimator
                templates = pol.estimator_templates(est)
                assert all('stage="{{stage}}"' in t for t in templates), gate.name


# --------------------------------------------------------------------------------------------------- metric templates

SAMPLES = """
samples:
  requests: sum(requests_total{model_version="{{version}}"})
  labels: sum(labels_total{model_version="{{version}}"})
"""
TEMPLATED = (
    SAMPLES
    + """
metric_templates:
  error-rate:
    layer: health
    stages: [shadow, canary, ab, full]
    query: sum(errors_total{model_version="{{version}}"}) / sum(requests_total{model_version="{{version}}"})
    unit: requests
gates:
  - name: errors-strict
    template: error-rate
    condition: value <= 0.01
  - name: errors-vs-stable
    template: error-rate
    stages: [canary]
    condition: candidate - stable <= 0.02
  - name: inline
    layer: health
    stages: [full]
    query: errors{model_version="{{version}}"}
    condition: value <= 0.05
"""
)


def test_gates_built_from_a_metric_template_keep_their_own_fields() -> None:
    policy = pol.loads_policy(TEMPLATED)
    strict, versus, inline = policy.gates
    assert isinstance(strict, pol.MetricGate) and isinstance(versus, pol.MetricGate)
    assert strict.query == versus.query == yaml.safe_load(TEMPLATED)["metric_templates"]["error-rate"]["query"]
    assert (strict.template, versus.template, inline.template) == ("error-rate", "error-rate", None)
    assert strict.stages == ("shadow", "canary", "ab", "full") and versus.stages == ("canary",)
    assert (strict.condition.text(), versus.condition.text()) == ("value <= 0.01", "candidate - stable <= 0.02")
    assert strict.unit == "requests" and inline.unit is None
    assert pol.loads_policy(pol.dumps_policy(policy)) == policy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gates": [{"name": "g", "template": "nope", "condition": "value <= 0.01"}]}, "no metric template 'nope'"),
        ({"metric_templates": {"t": {"name": "x", "query": "up"}}}, "cannot set ['name']"),
        ({"metric_templates": {"t": "up"}}, "a template is a mapping"),
        ({"metric_templates": {"Bad Name": {"query": "up"}}}, "metric_templates.Bad Name"),
    ],
)
def test_bad_metric_templates_are_refused_naming_them(change: dict[str, Any], message: str) -> None:
    data = {**yaml.safe_load(TEMPLATED), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        pol.policy_from_mapping(data)


def test_a_template_query_is_checked_like_an_inline_one() -> None:
    data = yaml.safe_load(TEMPLATED)
    data["metric_templates"]["error-rate"]["query"] = 'errors{model_version=~"{{version}}"}'
    with pytest.raises(ValueError, match="exact label matcher"):
        pol.policy_from_mapping(data)


WITH_ARGS = (
    SAMPLES
    + """
metricTemplates:
  error-rate:
    args:
      - name: job
      - name: max-rate
        value: 0.01
    layer: health
    stages: [shadow, canary, ab, full]
    query: >-
      sum(errors_total{job="{{args.job}}",model_version="{{version}}"}) /
      sum(requests_total{job="{{ args.job }}",model_version="{{version}}"})
    condition: value <= {{args.max-rate}}
gates:
  - name: router-errors
    template: error-rate
    args: [{name: job, value: router}]
  - name: model-errors
    template: error-rate
    args: [{name: job, value: model-server}, {name: max-rate, value: 0.05}]
"""
)


def test_metric_template_args_are_rendered_with_each_gate_s_values_or_the_defaults() -> None:
    """Argo AnalysisTemplate args: the template declares them (a value is a default), each gate gives its own, the
    PromQL and the condition are rendered when the policy is loaded — from the CRD's camelCase form too."""
    converted = from_api_conventions(yaml.safe_load(WITH_ARGS)).mapping
    policy = pol.policy_from_mapping(converted)
    router, model = policy.gates
    assert isinstance(router, pol.MetricGate) and isinstance(model, pol.MetricGate)
    assert router.query == (
        'sum(errors_total{job="router",model_version="{{version}}"}) / '
        'sum(requests_total{job="router",model_version="{{version}}"})'
    )
    assert 'job="model-server"' in model.query and "args" not in model.query
    assert (router.condition.text(), model.condition.text()) == ("value <= 0.01", "value <= 0.05")
    assert router.args == (pol.TemplateArg(name="job", value="router"),)
    assert pol.loads_policy(pol.dumps_policy(policy)) == policy


@pytest.mark.parametrize(
    ("gate_args", "template_args", "message"),
    [
        (None, None, "gate 'router-errors': metric template 'error-rate' needs arg 'job'"),
        ([{"name": "job", "value": "r"}, {"name": "jobs", "value": "x"}], None,
         "gate 'router-errors': ['jobs'] not among the args of metric template 'error-rate'"),
        ([{"name": "job"}], None, "gate 'router-errors'.args.job: needs a value"),
        ([{"name": "job", "value": "r"}, {"name": "job", "value": "s"}], None, "'job' is given twice"),
        ([{"name": "job", "value": 'r"}} or vector(1) {{x'}], None, "no '{{', '}}'"),
        (None, [{"name": "max-rate", "value": 0.01}],
         "{{args.job}} is used but metric template 'error-rate' declares no such arg"),
        ([{"name": "job", "value": "r"}], [{"name": "1job"}, {"name": "max-rate"}], "'1job' is not an arg name"),
    ],
)  # fmt: skip
def test_metric_template_args_the_wrong_way_are_refused_naming_the_arg(
    gate_args: list[dict[str, Any]] | None, template_args: list[dict[str, Any]] | None, message: str
) -> None:
    data = from_api_conventions(yaml.safe_load(WITH_ARGS)).mapping
    gate = data["gates"][0]
    data["gates"] = [{k: v for k, v in gate.items() if k != "args"} | ({"args": gate_args} if gate_args else {})]
    if template_args is not None:
        data["metric_templates"]["error-rate"]["args"] = template_args
    with pytest.raises(ValueError, match=re.escape(message)):
        pol.policy_from_mapping(data)


def test_args_outside_a_metric_template_are_refused() -> None:
    data = yaml.safe_load(TEMPLATED)
    data["gates"][2]["query"] = 'errors{job="{{args.job}}",model_version="{{version}}"}'
    with pytest.raises(ValueError, match=re.escape("gate 'inline': args and {{args.…}} belong to a metric template")):
        pol.policy_from_mapping(data)


@pytest.mark.parametrize("policy_name", ["default", "demo"])
def test_input_drift_gate_judges_every_drift_feature_but_the_burst_features(policy_name: str) -> None:
    """The shipped input-drift gate leaves out exactly the score and service.data.velocity.BURST_FEATURES: every
    other velocity feature is judged (a renamed or new burst feature must be named in both places)."""
    policy = pol.load_policy(None) if policy_name == "default" else load_demo_policy(1.0)
    gate = {g.name: g for g in policy.gates}["input-psi-max"]
    assert isinstance(gate, pol.MetricGate) and isinstance(gate.estimator, pol.PsiEstimator)
    matcher = 'feature!~"' + "|".join(("score", *BURST_FEATURES)) + '"'
    for query in (gate.query, gate.estimator.counts, gate.estimator.reference):
        assert matcher in query, query
    assert set(BURST_FEATURES) < set(VELOCITY_FEATURES)
