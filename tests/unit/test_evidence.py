"""A gate's evidence as the controller's metrics and the demo's live view show it (rollout/evidence.py, read by
rollout/controller_metrics.py and rollout/demo_view.py; ``rolloutctl status`` in tests/unit/test_rolloutctl.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rollout.analysis import GateHistory, GateResult, GateStatus
from rollout.controller_metrics import gate_values
from rollout.evidence import gate_evidence, sample_unit

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
