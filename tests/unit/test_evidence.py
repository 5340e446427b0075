"""A gate's evidence as the controller's metrics and the demo's live view show it (rollout/core/evidence.py, read by
rollout/controller/metrics.py and rollout/demo/view.py; ``rolloutctl status`` in tests/unit/test_rolloutctl.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rollout.controller.metrics import gate_values
from rollout.core.analysis import GateHistory, GateResult, GateStatus
from rollout.core.evidence import gate_evidence, sample_unit

AT = datetime(2026, 1, 1, tzinfo=UTC)


def _result(**fields: Any) -> GateResult:
    base: dict[str, Any] = {"name": "recall", "layer": "outcome", "status": GateStatus.INCONCLUSIVE}
    return GateResult(**{**base, **fields})


def test_the_unit_of_the_samples_follows_what_the_gate_estimates() -> None:
    assert sample_unit("recall", "outcome") == "fraud labels"
    assert sample_unit("paired-precision", "outcome") == "flagged labels"
    assert sample_unit("roc-auc", "outcome") == "labels"
    assert sample_unit("errors", "health") == "requests"


def test_the_controller_exports_the_evidence_as_gate_values() -> None:
    history = GateHistory(
        measurements=1, last_at=AT, last=_result(candidate_value=0.7, stable_value=0.8, interval=(0.6, 0.8), labels=42)
    )
    values = gate_values(history)
    assert values["interval_low"] == 0.6 and values["interval_high"] == 0.8
    assert values["samples"] == 42  # the labels behind the estimate, until the controller reports samples
    assert "samples_needed" not in values and "estimate" not in values  # not measured → no gauge, never a made-up 0


def test_evidence_of_a_result_without_any_numbers_is_empty() -> None:
    assert gate_evidence(_result())["evidence"] == ""
    assert gate_evidence(_result(labels=120, status=GateStatus.SUCCESSFUL))["evidence"] == "120 fraud labels · decided"


def test_a_gate_held_back_by_its_label_minimum_says_how_many_more_of_its_own_unit_it_needs() -> None:
    """Issue 10, point 7: the unit comes from the gate (the policy's ``unit``), not from a word of its name, and a
    gate below its label minimum says how far it is from being judged."""
    import yaml

    from rollout.core import analysis as an
    from rollout.core import policy as pol

    policy = pol.policy_from_mapping(
        yaml.safe_load(
            """
samples: {requests: 'r{model_version="{{version}}"}', labels: 'l{model_version="{{version}}"}'}
gates:
  - name: miss-gap
    layer: outcome
    unit: legit labels
    stages: [shadow, canary, ab, full]
    labels_query: legit{stable="{{stable}}",candidate="{{candidate}}"}
    min_labels: 30
    estimator:
      method: paired_proportion
      candidate_only: b{stable="{{stable}}",candidate="{{candidate}}"}
      stable_only: c{stable="{{stable}}",candidate="{{candidate}}"}
      pairs: legit{stable="{{stable}}",candidate="{{candidate}}"}
    condition: candidate - stable <= 0.01
"""
        )
    )

    class Twelve:
        def query(self, promql: str) -> float | None:
            return 12.0 if promql.startswith("legit") else None

    report = an.analyse(policy, "shadow", Twelve(), "v1", "v2", AT)
    result = report.result("miss-gap")
    assert result is not None and result.status is GateStatus.INCONCLUSIVE
    assert (result.samples, result.samples_needed, result.unit) == (12.0, 18.0, "legit labels")
    assert gate_evidence(result)["evidence"] == "12 legit labels · needs about 18 more legit labels"
