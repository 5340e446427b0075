"""The rollout controller's own Prometheus metrics (prefix ``fraudwatch_rollout_``), served on its ``/metrics`` port.

Series (label ``rollout`` = the rollout's name)::

    fraudwatch_rollout_info{rollout, rollout_id, stable, candidate}      1 for the current rollout
    fraudwatch_rollout_phase{rollout, phase}                             1 for the current phase, 0 for the others
    fraudwatch_rollout_stage{rollout, stage}                             1 for the current stage, 0 for the others
    fraudwatch_rollout_stage_index{rollout}                              0 quality, 1 shadow … 4 full
    fraudwatch_rollout_paused{rollout}                                   1 while paused
    fraudwatch_rollout_candidate_weight{rollout}                         the candidate's share of decisions, percent
    fraudwatch_rollout_stage_entered_timestamp_seconds{rollout}
    fraudwatch_rollout_gate_result{rollout, gate, result}                1 for the gate's latest result, 0 for others
    fraudwatch_rollout_gate_value{rollout, gate, value}                  value = candidate | stable | bound | threshold
                                                                         | estimate | interval_low | interval_high
                                                                         | samples | samples_needed (the evidence)
    fraudwatch_rollout_transitions_total{rollout, from, to, reason}      from/to = phase/stage, reason = a reason code
    fraudwatch_rollout_reconcile_errors_total{rollout, step}             step = observe | analyse | act | persist
    fraudwatch_rollout_reconcile_duration_seconds{rollout}               histogram
    fraudwatch_rollout_last_successful_reconcile_timestamp_seconds{rollout}
    fraudwatch_rollout_commands_total{rollout, kind, outcome}            outcome = applied | ignored
    fraudwatch_rollout_workload_ready{rollout, version}                  1 when the version's workload is ready
    fraudwatch_rollout_workload_restarts{rollout, version}               its restarts after failures, as the backend
                                                                         counts them (a gauge: the count restarts
                                                                         with the controller on the local backend)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rollout.core.analysis import GateHistory, GateStatus
from rollout.core.events import reason_code
from rollout.core.evidence import gate_evidence
from rollout.core.machine import MACHINE_STAGES, RolloutState, Transition
from rollout.core.workloads import WorkloadStatus

PHASES: Final[tuple[str, ...]] = ("Progressing", "Promoted", "RolledBack", "Aborted")
RESULTS: Final[tuple[str, ...]] = tuple(s.value for s in GateStatus)
ReconcileStep = Literal["observe", "analyse", "act", "persist"]


def state_label(phase: str, stage: str) -> str:
    """``Progressing/canary`` — a transition's end as one label value."""
    return f"{phase}/{stage}"


def gate_values(history: GateHistory) -> dict[str, float]:
    """The numbers of a gate's latest result worth a gauge (missing ones are left out)."""
    last = history.last
    if last is None:
        return {}
    values = {"candidate": last.candidate_value, "stable": last.stable_value, "bound": last.bound}
    values["threshold"] = last.threshold
    evidence = gate_evidence(last)
    interval = evidence["interval"] or (None, None)
    values |= {"estimate": evidence["estimate"], "interval_low": interval[0], "interval_high": interval[1]}
    values |= {"samples": evidence["samples"], "samples_needed": evidence["samples_needed"]}
    return {name: float(v) for name, v in values.items() if v is not None}


class ControllerMetrics:
    """The controller's metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry, rollout: str, duration_buckets_s: Sequence[float]) -> None:
        self.registry = registry
        self.rollout = rollout
        self.info = Gauge(
            "fraudwatch_rollout_info",
            "The current rollout.",
            ["rollout", "rollout_id", "stable", "candidate"],
            registry=registry,
        )
        self.phase = Gauge(
            "fraudwatch_rollout_phase", "1 for the current phase.", ["rollout", "phase"], registry=registry
        )
        self.stage = Gauge(
            "fraudwatch_rollout_stage", "1 for the current stage.", ["rollout", "stage"], registry=registry
        )
        self.stage_index = Gauge(
            "fraudwatch_rollout_stage_index",
            "The current stage: 0 quality, 1 shadow, 2 canary, 3 ab, 4 full.",
            ["rollout"],
            registry=registry,
        )
        self.paused = Gauge(
            "fraudwatch_rollout_paused", "1 while the rollout is paused.", ["rollout"], registry=registry
        )
        self.weight = Gauge(
            "fraudwatch_rollout_candidate_weight",
            "The candidate's share of decisions (percent).",
            ["rollout"],
            registry=registry,
        )
        self.stage_entered = Gauge(
            "fraudwatch_rollout_stage_entered_timestamp_seconds",
            "When the current stage began.",
            ["rollout"],
            registry=registry,
        )
        self.gate_result = Gauge(
            "fraudwatch_rollout_gate_result",
            "1 for the latest result of each gate of the current stage.",
            ["rollout", "gate", "result"],
            registry=registry,
        )
        self.gate_value = Gauge(
            "fraudwatch_rollout_gate_value",
            "The numbers behind each gate's latest result.",
            ["rollout", "gate", "value"],
            registry=registry,
        )
        self.transitions = Counter(
            "fraudwatch_rollout_transitions",
            "Transitions of phase, stage or pause.",
            ["rollout", "from", "to", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            "fraudwatch_rollout_reconcile_errors",
            "Reconciles that failed, by the step that failed.",
            ["rollout", "step"],
            registry=registry,
        )
        self.duration = Histogram(
            "fraudwatch_rollout_reconcile_duration_seconds",
            "Wall time of one reconcile.",
            ["rollout"],
            buckets=tuple(duration_buckets_s),
            registry=registry,
        )
        self.last_success = Gauge(
            "fraudwatch_rollout_last_successful_reconcile_timestamp_seconds",
            "When a reconcile last succeeded.",
            ["rollout"],
            registry=registry,
        )
        self.commands = Counter(
            "fraudwatch_rollout_commands",
            "Operator commands by outcome.",
            ["rollout", "kind", "outcome"],
            registry=registry,
        )
        self.workload_ready = Gauge(
            "fraudwatch_rollout_workload_ready",
            "1 when the version's workload is ready to serve.",
            ["rollout", "version"],
            registry=registry,
        )
        self.workload_restarts = Gauge(
            "fraudwatch_rollout_workload_restarts",
            "Restarts of the version's workload after failures (crash, dead endpoint, not ready in time).",
            ["rollout", "version"],
            registry=registry,
        )
        self._workloads_shown: set[str] = set()
        self._gates_shown: set[str] = set()
        self._info_shown: tuple[str, str, str] | None = None

    def show(self, rollout: RolloutState | None) -> None:
        """Set every gauge from the current rollout (none: phase and stage gauges all 0)."""
        name = self.rollout
        for phase in PHASES:
            self.phase.labels(name, phase).set(1.0 if rollout is not None and rollout.phase == phase else 0.0)
        for stage in MACHINE_STAGES:
            self.stage.labels(name, stage).set(1.0 if rollout is not None and rollout.stage == stage else 0.0)
        if rollout is None:
            return
        self._show_info(rollout)
        self.stage_index.labels(name).set(float(MACHINE_STAGES.index(rollout.stage)))
        self.paused.labels(name).set(1.0 if rollout.paused else 0.0)
        self.weight.labels(name).set(float(rollout.weights.candidate))
        self.stage_entered.labels(name).set(rollout.stage_entered_at.timestamp())
        self._show_gates(rollout.gates)

    def _show_info(self, rollout: RolloutState) -> None:
        key = (rollout.rollout_id, rollout.stable, rollout.candidate)
        if self._info_shown is not None and self._info_shown != key:
            self.info.remove(self.rollout, *self._info_shown)
        self.info.labels(self.rollout, *key).set(1.0)
        self._info_shown = key

    def _show_gates(self, gates: Mapping[str, GateHistory]) -> None:
        for gone in self._gates_shown - set(gates):
            for result in RESULTS:
                self.gate_result.remove(self.rollout, gone, result)
            for value in ("candidate", "stable", "bound", "threshold"):
                self._remove_value(gone, value)
        for gate, history in gates.items():
            latest = history.last.status.value if history.last is not None else None
            for result in RESULTS:
                self.gate_result.labels(self.rollout, gate, result).set(1.0 if result == latest else 0.0)
            values = gate_values(history)
            for value in ("candidate", "stable", "bound", "threshold"):
                if value in values:
                    self.gate_value.labels(self.rollout, gate, value).set(values[value])
                else:
                    self._remove_value(gate, value)
        self._gates_shown = set(gates)

    def _remove_value(self, gate: str, value: str) -> None:
        try:
            self.gate_value.remove(self.rollout, gate, value)
        except KeyError:
            return

    def workloads(self, statuses: Mapping[str, WorkloadStatus]) -> None:
        """The workloads the last act pass saw (versions no longer there lose their series)."""
        for gone in self._workloads_shown - set(statuses):
            self.workload_ready.remove(self.rollout, gone)
            self.workload_restarts.remove(self.rollout, gone)
        for version, status in statuses.items():
            self.workload_ready.labels(self.rollout, version).set(1.0 if status.ready else 0.0)
            self.workload_restarts.labels(self.rollout, version).set(float(status.restarts))
        self._workloads_shown = set(statuses)

    def transitioned(self, transitions: Sequence[Transition]) -> None:
        for t in transitions:
            self.transitions.labels(
                self.rollout,
                state_label(t.from_phase, t.from_stage),
                state_label(t.to_phase, t.to_stage),
                reason_code(t),
            ).inc()

    def failed(self, step: ReconcileStep) -> None:
        self.errors.labels(self.rollout, step).inc()

    def reconciled(self, seconds: float, finished_at: datetime) -> None:
        self.duration.labels(self.rollout).observe(seconds)
        self.last_success.labels(self.rollout).set(finished_at.timestamp())

    def command(self, kind: str, outcome: str) -> None:
        self.commands.labels(self.rollout, kind, outcome).inc()
