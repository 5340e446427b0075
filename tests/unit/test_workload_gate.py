"""rollout.core.workload_gate: the candidate's restarts and readiness as a gate (pure functions, known inputs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rollout.core import policy as pol
from rollout.core.analysis import GateStatus
from rollout.core.workload_gate import WORKLOAD_GATE, judge, observe
from rollout.core.workloads import Readiness, WorkloadStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = pol.AnalysisPolicy(max_restarts=2, not_ready_timeout_s=60.0)


def ready(restarts: int = 0) -> WorkloadStatus:
    return WorkloadStatus("v2", Readiness.READY, "http://127.0.0.1:9", restarts=restarts)


def failed(restarts: int) -> WorkloadStatus:
    return WorkloadStatus("v2", Readiness.FAILED, detail="process exited", restarts=restarts)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_restarts_before_the_rollout_are_not_the_rollouts() -> None:
    watch = observe(None, "r1", "v2", ready(restarts=7), T0)
    assert watch.rollout_restarts == 0 and judge(watch, LIMITS, T0).status is GateStatus.SUCCESSFUL
    watch = observe(watch, "r1", "v2", failed(9), at(1))
    assert watch.rollout_restarts == 2 and judge(watch, LIMITS, at(1)).status is GateStatus.INCONCLUSIVE
    watch = observe(watch, "r1", "v2", failed(10), at(2))
    result = judge(watch, LIMITS, at(2))
    assert result.status is GateStatus.FAILED and result.name == WORKLOAD_GATE and result.layer == "health"
    assert result.message == "v2 restarted 3 times during the rollout (limit 2): process exited"
    assert result.candidate_value == 3


def test_the_not_ready_clock_runs_from_the_first_not_ready_sight_and_stops_when_ready() -> None:
    watch = observe(None, "r1", "v2", WorkloadStatus("v2", Readiness.STARTING), T0)
    assert judge(watch, LIMITS, at(60)).status is GateStatus.INCONCLUSIVE  # exactly the limit: not beyond it
    late = judge(observe(watch, "r1", "v2", None, at(61)), LIMITS, at(61))
    assert late.status is GateStatus.FAILED and late.message.startswith("v2 not ready for 61s (limit 60s)")
    assert "no status from the backend" in late.message
    recovered = observe(watch, "r1", "v2", ready(), at(30))
    assert recovered.not_ready_since is None and judge(recovered, LIMITS, at(500)).status is GateStatus.SUCCESSFUL


def test_a_new_rollout_or_candidate_starts_a_new_watch() -> None:
    watch = observe(None, "r1", "v2", failed(5), T0)
    watch = observe(watch, "r1", "v2", failed(9), at(1))
    fresh = observe(watch, "r2", "v2", failed(9), at(2))
    assert fresh.rollout_restarts == 0 and fresh.not_ready_since == at(2)
    assert judge(None, LIMITS, T0).status is GateStatus.INCONCLUSIVE


def test_a_restart_count_going_down_is_not_a_negative_restart() -> None:
    watch = observe(observe(None, "r1", "v2", failed(4), T0), "r1", "v2", failed(1), at(1))
    assert watch.rollout_restarts == 0


def test_the_gate_name_is_reserved_in_policies() -> None:
    base = pol.load_policy(None).model_dump(mode="json", exclude_none=True)
    base["gates"].append({"name": WORKLOAD_GATE, "layer": "health", "stages": ["canary"], "query": "vector(0)",
                          "condition": "value <= 1"})  # fmt: skip
    with pytest.raises(ValueError, match=WORKLOAD_GATE):
        pol.policy_from_mapping(base)
    defaults = pol.load_policy(None).analysis
    assert (defaults.max_restarts, defaults.not_ready_timeout_s) == (3, 600.0)
