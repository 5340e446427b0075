"""The candidate's own workload as evidence: a candidate that crash-loops or never becomes ready is rolled back.

Analysis runs only once a stage's routing is in force, and routing waits for the candidate to be ready, so without
this gate a candidate killed on every start kept a rollout in its stage for ever (issue 12). The controller watches
the candidate's :class:`~rollout.backends.base.WorkloadStatus` after every act pass (:func:`observe`), and
:func:`judge` turns what it saw into the ``candidate-workload`` gate, a health gate of every traffic stage:

* **Failed** when the candidate's workload restarted more than the policy's ``analysis.max_restarts`` times since
  the rollout began (crashes, a dead endpoint, not ready within the backend's start timeout), or was not ready for
  longer than ``analysis.not_ready_timeout_s`` in a row — the rollout is rolled back with that reason, also while
  the stage's other gates cannot be measured;
* **Successful** while it is ready, **Inconclusive** while it is starting within the bound.

The bound a crash loop can last is therefore ``not_ready_timeout_s`` (or ``max_restarts`` + 1 failed starts, when
sooner) plus one reconcile. Restarts are counted as the backend sees them: the local backend since the controller
started, so a controller restart begins the count again (the not-ready clock too). Pure functions of their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from rollout.core.analysis import GateResult, GateStatus
from rollout.core.policy import WORKLOAD_GATE, AnalysisPolicy
from rollout.core.workloads import WorkloadStatus

__all__ = ["WORKLOAD_GATE", "CandidateWatch", "judge", "observe"]


@dataclass(frozen=True, slots=True)
class CandidateWatch:
    """What the controller has seen of one rollout's candidate workload."""

    rollout_id: str
    version: str
    #: The backend's restart count when the rollout was first observed (restarts before it are not the rollout's).
    baseline_restarts: int
    restarts: int
    #: Since when the candidate has not been ready (None while it is ready).
    not_ready_since: datetime | None
    detail: str = ""

    @property
    def rollout_restarts(self) -> int:
        return max(self.restarts - self.baseline_restarts, 0)


def observe(
    watch: CandidateWatch | None, rollout_id: str, version: str, status: WorkloadStatus | None, now: datetime
) -> CandidateWatch:
    """``watch`` brought up to date with the candidate's status (None: the backend could not say — not ready)."""
    restarts = status.restarts if status is not None else None
    if watch is None or (watch.rollout_id, watch.version) != (rollout_id, version):
        base = restarts if restarts is not None else 0
        watch = CandidateWatch(rollout_id, version, base, base, None)
    ready = status is not None and status.ready
    detail = "" if status is None else status.detail or status.readiness.value
    return replace(
        watch,
        restarts=max(watch.restarts, restarts) if restarts is not None else watch.restarts,
        not_ready_since=None if ready else (watch.not_ready_since or now),
        detail="no status from the backend" if status is None else detail,
    )


def judge(watch: CandidateWatch | None, limits: AnalysisPolicy, now: datetime) -> GateResult:
    """The ``candidate-workload`` gate at ``now``."""
    condition = f"restarts <= {limits.max_restarts}, not ready <= {limits.not_ready_timeout_s:g}s"
    if watch is None:
        return _result(GateStatus.INCONCLUSIVE, condition, "the candidate's workload not observed yet")
    restarts = watch.rollout_restarts
    down_s = (now - watch.not_ready_since).total_seconds() if watch.not_ready_since is not None else 0.0
    fields = {"candidate_value": float(restarts)}
    if restarts > limits.max_restarts:
        why = f"{watch.version} restarted {restarts} times during the rollout (limit {limits.max_restarts})"
        return _result(GateStatus.FAILED, condition, _with_detail(why, watch), **fields)
    if down_s > limits.not_ready_timeout_s:
        why = f"{watch.version} not ready for {down_s:.0f}s (limit {limits.not_ready_timeout_s:g}s)"
        return _result(GateStatus.FAILED, condition, _with_detail(why, watch), **fields)
    if watch.not_ready_since is not None:
        why = f"{watch.version} not ready for {down_s:.0f}s, {restarts} restart(s)"
        return _result(GateStatus.INCONCLUSIVE, condition, _with_detail(why, watch), **fields)
    return _result(GateStatus.SUCCESSFUL, condition, f"{watch.version} ready, {restarts} restart(s)", **fields)


def _with_detail(message: str, watch: CandidateWatch) -> str:
    return f"{message}: {watch.detail}" if watch.detail else message


def _result(status: GateStatus, condition: str, message: str, **fields: float) -> GateResult:
    return GateResult(
        name=WORKLOAD_GATE, layer="health", status=status, condition=condition, message=message,
        method="workload", **fields,
    )  # fmt: skip
