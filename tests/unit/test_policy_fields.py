"""rollout.core.policy_fields: spec.policy in Kubernetes API conventions (camelCase, durations like 10m) and the
deprecated snake_case ``*_s`` form, through effective_policy as the controller and rolloutctl read it."""

from __future__ import annotations

from typing import Any

import pytest

from rollout.backends.kube.events import WARNING_NOTES
from rollout.backends.kube.resource import (
    DEPRECATED_POLICY_NOTE,
    deprecated_policy_fields,
    effective_policy,
    note_reason,
)
from rollout.core.policy import load_policy
from rollout.core.policy_fields import DURATION_FIELDS, camel_case, from_api_conventions, snake_case

CAMEL: dict[str, Any] = {
    "stages": {"canary": {"minDuration": "10m", "minRequests": 200}, "ab": {"minDuration": "1h30m"}, "steps": [1, 25]},
    "analysis": {"interval": "30s", "window": "5m", "inconclusiveTimeout": "45m", "labelsTimeout": "72h",
                 "notReadyTimeout": "500ms", "consecutiveErrorLimit": 4, "falseRollback": 0.02, "maxRestarts": 2},
    "promotion": {"warmWindow": "15m", "scaleDownDelay": "2m"},
}  # fmt: skip


def test_camel_case_fields_and_durations_become_the_policy_s_own() -> None:
    policy = effective_policy(load_policy(), CAMEL)
    assert policy.stages.canary.min_duration_s == 600 and policy.stages.canary.min_requests == 200
    assert policy.stages.ab.min_duration_s == 5400 and policy.stages.steps == (1, 25)
    analysis = policy.analysis
    assert (analysis.interval_s, analysis.window_s, analysis.inconclusive_timeout_s) == (30, 300, 2700)
    assert (analysis.labels_timeout_s, analysis.not_ready_timeout_s) == (72 * 3600, 0.5)
    assert (analysis.consecutive_error_limit, analysis.false_rollback, analysis.max_restarts) == (4, 0.02, 2)
    assert (policy.promotion.warm_window_s, policy.promotion.scale_down_delay_s) == (900, 120)
    assert deprecated_policy_fields(CAMEL) == ()


def test_the_snake_case_seconds_form_is_still_accepted_and_named_as_deprecated() -> None:
    old = {"stages": {"canary": {"min_duration_s": 600}}, "promotion": {"warm_window_s": 900}}
    assert effective_policy(load_policy(), old) == effective_policy(
        load_policy(), {"stages": {"canary": {"minDuration": "10m"}}, "promotion": {"warmWindow": "15m"}}
    )
    assert deprecated_policy_fields(old) == ("stages.canary.min_duration_s", "promotion.warm_window_s")
    # the controller's note naming them is a Warning Event with its own reason
    code = note_reason(f"{DEPRECATED_POLICY_NOTE}: stages.canary.min_duration_s")
    assert code == "DeprecatedPolicyFields" and code in WARNING_NOTES


def test_gates_are_converted_too_but_metric_names_in_floors_are_data() -> None:
    gates = [g.model_dump(mode="json") for g in load_policy().gates]
    camel = [{camel_case(k) if k not in ("floors", "ceilings") else k: _camel_value(k, v) for k, v in g.items()}
             for g in gates]  # fmt: skip
    converted = from_api_conventions({"gates": camel})
    assert converted.mapping["gates"] == gates  # every gate's fields back to the policy's names, floors untouched
    assert converted.deprecated == ()
    assert any("pr_auc" in g.get("floors", {}) for g in gates)  # a snake_case metric name, not a deprecated field


def _camel_value(key: str, value: Any) -> Any:
    if key in DURATION_FIELDS and value is not None:
        return f"{value}s"
    if isinstance(value, dict) and key not in ("floors", "ceilings"):
        return {camel_case(k): v for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"stages": {"canary": {"minDuration": "10x"}}}, "stages.canary.minDuration: not a duration"),
        ({"stages": {"canary": {"minDuration": 600}}}, "stages.canary.minDuration must be a duration string"),
        ({"stages": {"canary": {"minDuration": "600"}}}, "stages.canary.minDuration must be a duration string"),
        ({"analysis": {"interval": "-5s"}}, "analysis.interval: not a duration"),
        ({"promotion": {"warmWindow": "1m", "warm_window_s": 60}}, "promotion.warm_window_s and promotion.warmWindow"),
    ],
)
def test_bad_durations_and_fields_given_twice_are_refused_naming_the_field(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=r"spec\.policy") as caught:
        effective_policy(load_policy(), override)
    assert message in str(caught.value)


def test_names_round_trip() -> None:
    for name in ("min_duration_s", "consecutive_error_limit", "labels_query", "window_s"):
        back = snake_case(camel_case(name))
        assert back + ("_s" if name in DURATION_FIELDS else "") == name


def test_metric_templates_keep_their_names_and_convert_their_fields() -> None:
    """Template names are data (a gate's ``template:`` refers to them as written); their fields are gate fields."""
    camel = {"metricTemplates": {"errorRate": {"labelsQuery": "sum(x)", "query": "sum(y)"}}}
    converted = from_api_conventions(camel)
    assert converted.mapping == {"metric_templates": {"errorRate": {"labels_query": "sum(x)", "query": "sum(y)"}}}
    assert converted.deprecated == ()
    old = from_api_conventions({"metric_templates": {"errorRate": {"labels_query": "sum(x)"}}})
    assert old.mapping == {"metric_templates": {"errorRate": {"labels_query": "sum(x)"}}}
    assert old.deprecated == ("metric_templates", "metric_templates.errorRate.labels_query")
