"""The rollout stage machine — pure: ``step(state, report, now, command, policy=…) → (new state, actions)``.

No I/O, no clock, no randomness: the controller passes the time, the latest :class:`AnalysisReport` and at most
one :class:`ManualCommand`, then executes the returned actions. The same inputs always give the same outputs.

Phases and stages::

    Progressing: quality → shadow → canary → ab → full ──▶ Promoted ──(revert/abort)──▶ RolledBack / Aborted
                      │ any Failed gate ───────────────────▶ RolledBack (stable keeps 100 %)
                      │ Errors beyond the limit, or Inconclusive beyond the timeout ─▶ Aborted
                      └ manual abort ─▶ Aborted, manual revert ─▶ RolledBack

Rules:

* a stage is promoted (to the next stage only) when every gate of the stage — and each of its minimums
  (``min-requests`` / ``min-labels``) — is Successful in a report of that stage, the report covers at least the
  stage's ``min_duration_s`` counted from when the stage's routing was in force (``routed_at``, set by the
  controller; stage entry until then), and the rollout is not paused. Inconclusive or Error never promotes;
* manual commands are always honoured where they make sense (promote: to the next or a named later stage, also
  while paused; pause/resume; abort; revert — also after promotion, while the previous version is still warm) and
  are applied once per command id;
* a Failed ``candidate-workload`` result (the controller's watch of the candidate's restarts and readiness,
  rollout/core/workload_gate.py) rolls back any traffic stage, also when it is the report's only result (analysis of the
  other gates waits for routing, which waits for a ready candidate); it is not needed to promote;
* pausing stops automatic promotion and the inconclusive timeout; a Failed gate or too many Errors still end the
  rollout (safety does not pause);
* after ``full`` passes: Promoted — the registry alias moves to the candidate, the previous stable keeps scoring in
  shadow for ``warm_window_s`` (one-step revert), then it is scaled down.

Idempotency: a report is counted into the per-gate histories once (by its timestamp), a command once (by its id),
so ``step`` applied again to its own output with the same inputs returns that output unchanged. The actions
describe the desired state (level-triggered): re-executing them is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Final, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from rollout.core.analysis import (
    AnalysisReport,
    AnalysisStage,
    GateHistory,
    GateResult,
    GateStatus,
    advance,
    errors_exceeded,
    required_samples,
    timed_out,
)
from rollout.core.policy import (
    PERCENT,
    TRAFFIC_STAGES,
    WORKLOAD_GATE,
    RolloutPolicy,
    TrafficStage,
    check_version,
    next_stage,
)
from rollout.core.routing import Stage as RoutingStage

Phase = Literal["Progressing", "Promoted", "RolledBack", "Aborted"]
#: Phases after which the candidate gets no more traffic and nothing but the record changes.
ROLLED_BACK_PHASES: Final[frozenset[str]] = frozenset({"RolledBack", "Aborted"})
#: Every stage of the machine, in order: the pre-rollout quality check, then the traffic stages.
MachineStage = AnalysisStage
MACHINE_STAGES: Final[tuple[MachineStage, ...]] = get_args(AnalysisStage)
QUALITY_STAGE: Final[MachineStage] = "quality"
CommandKind = Literal["promote", "pause", "resume", "abort", "revert"]
Trigger = Literal["analysis", "command", "timeout"]


# --------------------------------------------------------------------------------------------------- data


class Weights(BaseModel):
    """Deciding traffic in percent: stable + candidate = 100."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stable: int = Field(..., ge=0, le=PERCENT)
    candidate: int = Field(..., ge=0, le=PERCENT)

    @model_validator(mode="after")
    def _sum(self) -> Weights:
        if self.stable + self.candidate != PERCENT:
            raise ValueError("stable and candidate weights must add up to 100")
        return self


class ManualCommand(BaseModel):
    """An operator's command; ``id`` makes it idempotent (a command id is applied once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(..., min_length=1, max_length=128)
    kind: CommandKind
    #: ``promote`` only: the stage to skip to (default: the next stage; from ``full``: Promoted).
    to: TrafficStage | None = None
    reason: str = ""

    @model_validator(mode="after")
    def _target_only_for_promote(self) -> ManualCommand:
        if self.to is not None and self.kind != "promote":
            raise ValueError("only a promote command takes a target stage")
        return self


class Transition(BaseModel):
    """One change of phase, stage or pause flag, with why and the gate values behind it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: AwareDatetime
    trigger: Trigger
    from_phase: Phase
    to_phase: Phase
    from_stage: MachineStage
    to_stage: MachineStage
    paused: bool
    reason: str
    command_id: str | None = None
    gates: tuple[GateResult, ...] = ()


class RolloutState(BaseModel):
    """Everything the machine knows about one rollout; serialisable (a file locally, the CR status on Kubernetes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rollout_id: str = Field(..., min_length=1, max_length=128)
    #: The version that was stable when the rollout began (it gets 100 % back on rollback or revert).
    stable: str
    candidate: str
    phase: Phase = "Progressing"
    stage: MachineStage
    stage_entered_at: AwareDatetime
    #: When the routers first held the current stage's routing (set by the controller; None until then): a stage's
    #: minimum duration counts from here, not from stage entry (routing can take seconds to be in force).
    routed_at: AwareDatetime | None = None
    paused: bool = False
    weights: Weights
    #: Per-gate counters of the current stage (reset on every stage change).
    gates: dict[str, GateHistory] = Field(default_factory=dict)
    last_report_at: AwareDatetime | None = None
    applied_commands: tuple[str, ...] = ()
    promoted_at: AwareDatetime | None = None
    #: When the rollout reached Promoted, RolledBack or Aborted (the latest of these).
    finished_at: AwareDatetime | None = None
    history: tuple[Transition, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> RolloutState:
        check_version(self.stable)
        check_version(self.candidate)
        if self.stable == self.candidate:
            raise ValueError("stable and candidate must be different versions")
        if self.phase == "Promoted" and self.promoted_at is None:
            raise ValueError("a promoted rollout needs promoted_at")
        if self.phase != "Progressing" and self.finished_at is None:
            raise ValueError(f"phase {self.phase} needs finished_at")
        return self


class EnsureRunning(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["ensure_running"] = "ensure_running"
    version: str


class PublishRouting(BaseModel):
    """The routing table's fields (versions only; the controller adds URLs and the generation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["publish_routing"] = "publish_routing"
    stage: RoutingStage
    stable: str
    candidate: str | None
    candidate_weight: int = Field(..., ge=0, le=PERCENT)
    shadow: tuple[str, ...] = ()


class ScaleDown(BaseModel):
    """Stop the version's workload once ``after`` has passed (not before)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["scale_down"] = "scale_down"
    version: str
    after: AwareDatetime


class MoveAlias(BaseModel):
    """Point the registry alias at the version."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["move_alias"] = "move_alias"
    alias: str
    version: str


class KeepWarm(BaseModel):
    """Keep the version running (and scoring in shadow) until ``until``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["keep_warm"] = "keep_warm"
    version: str
    until: AwareDatetime


class RecordEvent(BaseModel):
    """Something happened (a transition, an ignored command): log it, emit a Kubernetes event."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["record_event"] = "record_event"
    at: AwareDatetime
    reason: str
    phase: Phase
    stage: MachineStage
    values: tuple[GateResult, ...] = ()


Action = Annotated[
    EnsureRunning | PublishRouting | ScaleDown | MoveAlias | KeepWarm | RecordEvent, Field(discriminator="kind")
]
StepResult = tuple[RolloutState, tuple[Action, ...]]


# --------------------------------------------------------------------------------------------------- start


def first_stage(policy: RolloutPolicy) -> MachineStage:
    """``quality`` when the policy has a pre-rollout gate, else ``shadow``."""
    return QUALITY_STAGE if policy.quality_gates() else TRAFFIC_STAGES[0]


def initial_state(policy: RolloutPolicy, rollout_id: str, stable: str, candidate: str, now: datetime) -> RolloutState:
    """A new rollout of ``candidate`` against ``stable``, at its first stage."""
    stage = first_stage(policy)
    return RolloutState(
        rollout_id=rollout_id,
        stable=stable,
        candidate=candidate,
        stage=stage,
        stage_entered_at=now,
        weights=weights_for(policy, "Progressing", stage),
    )


def weights_for(policy: RolloutPolicy, phase: Phase, stage: MachineStage) -> Weights:
    """The deciding-traffic split of a phase and stage."""
    if phase == "Promoted":
        candidate = PERCENT
    elif phase in ROLLED_BACK_PHASES or stage == QUALITY_STAGE:
        candidate = 0
    else:
        candidate = policy.stages.candidate_weight(traffic_stage(stage))
    return Weights(stable=PERCENT - candidate, candidate=candidate)


def traffic_stage(stage: MachineStage) -> TrafficStage:
    if stage == QUALITY_STAGE:
        raise ValueError("the quality stage carries no traffic")
    return TRAFFIC_STAGES[TRAFFIC_STAGES.index(stage)]


def stage_index(stage: MachineStage) -> int:
    return MACHINE_STAGES.index(stage)


def following_stage(stage: MachineStage) -> MachineStage | None:
    """The stage after ``stage``; None after ``full`` (the next step is Promoted)."""
    return TRAFFIC_STAGES[0] if stage == QUALITY_STAGE else next_stage(traffic_stage(stage))


def expected_gates(policy: RolloutPolicy, stage: MachineStage) -> tuple[str, ...]:
    """The names that must all be Successful before ``stage`` is promoted (its gates and minimums)."""
    if stage == QUALITY_STAGE:
        return tuple(g.name for g in policy.quality_gates())
    traffic = traffic_stage(stage)
    return (*required_samples(policy, traffic), *(g.name for g in policy.gates_for(traffic)))


# --------------------------------------------------------------------------------------------------- step


def step(
    state: RolloutState,
    report: AnalysisReport | None,
    now: datetime,
    command: ManualCommand | None = None,
    *,
    policy: RolloutPolicy,
) -> StepResult:
    """One decision: apply ``command`` (once per id), then ``report`` (if it is about the current stage), then
    the timeouts; return the new state and the actions of the desired state plus events for what changed."""
    current = state
    notes: list[RecordEvent] = []
    if command is not None and command.id not in current.applied_commands:
        current, note = _apply_command(current, command, now)
        current = current.model_copy(update={"applied_commands": (*current.applied_commands, command.id)})
        notes.extend(note)
    if current.phase == "Progressing":
        current = _observe(policy, current, report, now)
    current = current.model_copy(update={"weights": weights_for(policy, current.phase, current.stage)})
    events = [_event(t) for t in current.history[len(state.history) :]]
    return current, (*desired_actions(policy, current, now), *events, *notes)


def _event(transition: Transition) -> RecordEvent:
    return RecordEvent(
        at=transition.at,
        reason=transition.reason,
        phase=transition.to_phase,
        stage=transition.to_stage,
        values=transition.gates,
    )


def _transition(
    state: RolloutState,
    now: datetime,
    trigger: Trigger,
    reason: str,
    *,
    phase: Phase | None = None,
    stage: MachineStage | None = None,
    paused: bool | None = None,
    command_id: str | None = None,
    gates: Sequence[GateResult] = (),
) -> RolloutState:
    """``state`` moved to the given phase / stage / pause flag, with the transition recorded."""
    to_phase = phase or state.phase
    to_stage = stage or state.stage
    to_paused = state.paused if paused is None else paused
    update: dict[str, object] = {"phase": to_phase, "stage": to_stage, "paused": to_paused}
    if to_stage != state.stage:
        update |= {"stage_entered_at": now, "gates": {}}
    if to_phase != state.phase:
        update["finished_at"] = now
        if to_phase == "Promoted":
            update["promoted_at"] = now
        update["paused"] = to_paused = False  # pausing means holding a stage; a finished rollout has none
    record = Transition(
        at=now,
        trigger=trigger,
        from_phase=state.phase,
        to_phase=to_phase,
        from_stage=state.stage,
        to_stage=to_stage,
        paused=to_paused,
        reason=reason,
        command_id=command_id,
        gates=tuple(gates),
    )
    update["history"] = (*state.history, record)
    return state.model_copy(update=update)


# --------------------------------------------------------------------------------------------------- commands


def _apply_command(
    state: RolloutState, command: ManualCommand, now: datetime
) -> tuple[RolloutState, list[RecordEvent]]:
    said = f"manual {command.kind}" + (f": {command.reason}" if command.reason else "")

    def moved(
        *, phase: Phase | None = None, stage: MachineStage | None = None, paused: bool | None = None
    ) -> RolloutState:
        return _transition(
            state,
            now,
            "command",
            said,
            phase=phase,
            stage=stage,
            paused=paused,
            command_id=command.id,
            gates=_last_results(state),
        )

    if command.kind in ("abort", "revert") and state.phase not in ROLLED_BACK_PHASES:
        return moved(phase="Aborted" if command.kind == "abort" else "RolledBack"), []
    if state.phase != "Progressing":
        return state, [_ignored(state, now, command, f"the rollout is {state.phase}")]
    match command.kind:
        case "promote":
            target: MachineStage | None = command.to if command.to is not None else following_stage(state.stage)
            if target is None:
                return moved(phase="Promoted"), []
            if stage_index(target) <= stage_index(state.stage):
                return state, [_ignored(state, now, command, f"{target} is not after {state.stage}")]
            return moved(stage=target), []
        case "pause" if not state.paused:
            return moved(paused=True), []
        case "resume" if state.paused:
            resumed = moved(paused=False)
            return resumed.model_copy(update={"gates": _restart_clocks(resumed.gates, now)}), []
        case _:
            return state, [_ignored(state, now, command, "nothing to do")]


def _ignored(state: RolloutState, now: datetime, command: ManualCommand, why: str) -> RecordEvent:
    return RecordEvent(
        at=now, reason=f"manual {command.kind} ignored: {why}", phase=state.phase, stage=state.stage, values=()
    )


def _restart_clocks(gates: dict[str, GateHistory], now: datetime) -> dict[str, GateHistory]:
    """Inconclusive clocks do not run while paused: on resume they restart from now."""
    return {
        name: h.model_copy(update={"inconclusive_since": now}) if h.inconclusive_since is not None else h
        for name, h in gates.items()
    }


def _last_results(state: RolloutState) -> tuple[GateResult, ...]:
    return tuple(h.last for h in state.gates.values() if h.last is not None)


# --------------------------------------------------------------------------------------------------- analysis


def report_applies(state: RolloutState, report: AnalysisReport) -> bool:
    """True when the report measured this rollout's current stage, after the stage began."""
    return (
        report.stage == state.stage
        and report.stable == state.stable
        and report.candidate == state.candidate
        and report.at >= state.stage_entered_at
    )


def judged_gates(policy: RolloutPolicy, stage: MachineStage) -> tuple[str, ...]:
    """The names whose Failed result rolls ``stage`` back: its expected gates and, in a traffic stage, the
    candidate's workload (rollout/core/workload_gate.py; reported by the controller, not required to promote)."""
    expected = expected_gates(policy, stage)
    return expected if stage == QUALITY_STAGE else (*expected, WORKLOAD_GATE)


def _observe(policy: RolloutPolicy, state: RolloutState, report: AnalysisReport | None, now: datetime) -> RolloutState:
    expected = expected_gates(policy, state.stage)
    judged = judged_gates(policy, state.stage)
    usable = report if report is not None and report_applies(state, report) else None
    if usable is not None and (state.last_report_at is None or usable.at > state.last_report_at):
        state = _count(state, usable, judged)
    results = usable.results if usable is not None else ()
    failed = [r for r in results if r.name in judged and r.status is GateStatus.FAILED]
    if failed:
        reason = "gate(s) failed: " + ", ".join(f"{r.name} ({r.message})" for r in failed)
        return _transition(state, now, "analysis", reason, phase="RolledBack", gates=results)
    erring = [n for n in expected if n in state.gates and errors_exceeded(state.gates[n], _error_limit(policy))]
    if erring:
        reason = f"measurement errors beyond the limit of {_error_limit(policy)} in a row: {', '.join(erring)}"
        return _transition(state, now, "analysis", reason, phase="Aborted", gates=_last_results(state))
    stuck = [] if state.paused else _timed_out(policy, state, expected, now)
    if stuck:
        reason = f"inconclusive beyond the timeout: {', '.join(stuck)}"
        return _transition(state, now, "timeout", reason, phase="Aborted", gates=_last_results(state))
    if usable is not None and not promotion_blockers(policy, state, usable):
        return _promote(state, now, usable)
    if not expected and not state.paused:
        return _promote(state, now, None)
    return state


def _error_limit(policy: RolloutPolicy) -> int:
    return policy.analysis.consecutive_error_limit


def _count(state: RolloutState, report: AnalysisReport, expected: Sequence[str]) -> RolloutState:
    gates = dict(state.gates)
    for result in report.results:
        if result.name in expected:
            gates[result.name] = advance(gates.get(result.name, GateHistory()), result, report.at)
    return state.model_copy(update={"gates": gates, "last_report_at": report.at})


def _timed_out(policy: RolloutPolicy, state: RolloutState, expected: Sequence[str], now: datetime) -> list[str]:
    return [
        name
        for name in expected
        if name in state.gates and timed_out(state.gates[name], now, policy.inconclusive_timeout_s(name))
    ]


def promotion_blockers(policy: RolloutPolicy, state: RolloutState, report: AnalysisReport) -> list[str]:
    """Why the report does not (yet) promote the current stage; empty when it does."""
    blockers = ["paused"] if state.paused else []
    for name in expected_gates(policy, state.stage):
        result = report.result(name)
        if result is None:
            blockers.append(f"{name}: not measured")
        elif result.status is not GateStatus.SUCCESSFUL:
            blockers.append(f"{name}: {result.status}")
    if state.stage == QUALITY_STAGE:
        return blockers
    minimums = policy.stages.of(traffic_stage(state.stage))
    covered = (report.at - stage_clock_start(state)).total_seconds()
    if covered < minimums.min_duration_s:
        blockers.append(f"stage observed for {covered:.0f}s of {minimums.min_duration_s:.0f}s")
    for name, minimum in required_samples(policy, traffic_stage(state.stage)).items():
        result = report.result(name)
        if result is None or result.candidate_value is None or result.candidate_value < minimum:
            blockers.append(f"{name}: below {minimum}")
    return blockers


def stage_clock_start(state: RolloutState) -> datetime:
    """Where the current stage's minimum duration counts from: when its routing was in force, else its entry."""
    routed = state.routed_at
    return routed if routed is not None and routed >= state.stage_entered_at else state.stage_entered_at


def _promote(state: RolloutState, now: datetime, report: AnalysisReport | None) -> RolloutState:
    target = following_stage(state.stage)
    results = report.results if report is not None else ()
    if target is None:
        return _transition(state, now, "analysis", "every gate of full passed", phase="Promoted", gates=results)
    reason = f"every gate of {state.stage} passed"
    return _transition(state, now, "analysis", reason, stage=target, gates=results)


# --------------------------------------------------------------------------------------------------- actions


def desired_actions(policy: RolloutPolicy, state: RolloutState, now: datetime) -> tuple[Action, ...]:
    """What must be true right now for this state (level-triggered: executing it again changes nothing)."""
    stable, candidate = state.stable, state.candidate
    if state.phase == "Progressing":
        return (
            EnsureRunning(version=stable),
            EnsureRunning(version=candidate),
            _progressing_table(policy, state),
        )
    if state.phase == "Promoted":
        return _promoted_actions(policy, state, now)
    assert state.finished_at is not None  # guaranteed by RolloutState's validator
    actions: list[Action] = [
        EnsureRunning(version=stable),
        PublishRouting(stage="stable", stable=stable, candidate=None, candidate_weight=0),
    ]
    if state.promoted_at is not None:
        actions.append(MoveAlias(alias=policy.promotion.alias, version=stable))
    delay = timedelta(seconds=policy.promotion.scale_down_delay_s)
    actions.append(ScaleDown(version=candidate, after=state.finished_at + delay))
    return tuple(actions)


def _progressing_table(policy: RolloutPolicy, state: RolloutState) -> PublishRouting:
    weight = weights_for(policy, state.phase, state.stage).candidate
    stage: RoutingStage = "stable" if state.stage == QUALITY_STAGE else traffic_stage(state.stage)
    return PublishRouting(stage=stage, stable=state.stable, candidate=state.candidate, candidate_weight=weight)


def warm_until(policy: RolloutPolicy, state: RolloutState) -> datetime | None:
    """End of the previous stable's warm window after promotion."""
    if state.promoted_at is None:
        return None
    return state.promoted_at + timedelta(seconds=policy.promotion.warm_window_s)


def _promoted_actions(policy: RolloutPolicy, state: RolloutState, now: datetime) -> tuple[Action, ...]:
    until = warm_until(policy, state)
    assert until is not None  # Promoted implies promoted_at
    previous, new = state.stable, state.candidate
    warm = now < until
    actions: list[Action] = [EnsureRunning(version=new)]
    if warm:
        actions.append(KeepWarm(version=previous, until=until))
    actions += [
        PublishRouting(
            stage="stable", stable=new, candidate=None, candidate_weight=0, shadow=(previous,) if warm else ()
        ),
        MoveAlias(alias=policy.promotion.alias, version=new),
        ScaleDown(version=previous, after=until),
    ]
    return tuple(actions)
