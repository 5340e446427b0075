"""rollout.core.machine: example-based tests of every transition, and property-based tests over random histories."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.core import machine as m
from rollout.core import policy as pol
from rollout.core.analysis import AnalysisReport, GateResult, analyse, required_samples
from rollout.core.analysis import GateStatus as S
from rollout.core.routing import MachineStage, RoutingTable, TrafficStage, VersionEndpoint
from rollout.core.state import record_revision

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STABLE, CANDIDATE = "v1", "v2"

POLICY_YAML = """
stages:
  shadow: {min_duration_s: 60, min_requests: 10}
  canary: {weight: 3, min_duration_s: 60}
  ab: {min_duration_s: 60, min_labels: 5}
  full: {min_duration_s: 60}
analysis:
  consecutive_error_limit: 2
  inconclusive_timeout_s: 300
  labels_timeout_s: 3000
promotion: {alias: champion, warm_window_s: 600, scale_down_delay_s: 120}
samples:
  requests: requests{model_version="{{version}}"}
  labels: labels{model_version="{{version}}"}
gates:
  - name: regression
    layer: quality
    floors: {pr_auc: 0.8}
  - name: errors
    layer: health
    stages: [shadow, canary, ab, full]
    query: errors{model_version="{{version}}"}
    condition: value <= 0.01
  - name: agreement
    layer: output_drift
    stages: [shadow]
    query: agree{stable="{{stable}}",candidate="{{candidate}}"}
    condition: value >= 0.9
  - name: recall
    layer: outcome
    stages: [ab]
    labels_query: n{model_version="{{version}}"}
    estimator:
      method: wilson
      successes: tp{model_version="{{version}}"}
      trials: pos{model_version="{{version}}"}
    condition: candidate - stable >= -0.05
"""
POLICY = pol.policy_from_mapping(yaml.safe_load(POLICY_YAML))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def start() -> m.RolloutState:
    return m.initial_state(POLICY, "r1", STABLE, CANDIDATE, T0)


def report(
    state: m.RolloutState,
    when: datetime,
    status: S = S.SUCCESSFUL,
    overrides: Mapping[str, S] | None = None,
    stage: MachineStage | None = None,
) -> AnalysisReport:
    """A report of every expected gate of the state's stage (sample gates carry a value at or below the minimum)."""
    stage = stage or state.stage
    results = []
    minimums = {} if stage == m.QUALITY_STAGE else required_samples(POLICY, m.traffic_stage(stage))
    for name in m.expected_gates(POLICY, stage):
        chosen = (overrides or {}).get(name, status)
        value = None
        if name in minimums:
            value = float(minimums[name] if chosen is S.SUCCESSFUL else minimums[name] - 1)
        results.append(GateResult(name=name, layer="health", status=chosen, candidate_value=value))
    return AnalysisReport(stage=stage, stable=state.stable, candidate=state.candidate, at=when, results=tuple(results))


def go(
    state: m.RolloutState,
    rep: AnalysisReport | None,
    now: datetime,
    command: m.ManualCommand | None = None,
) -> tuple[m.RolloutState, tuple[m.Action, ...]]:
    return m.step(state, rep, now, command, policy=POLICY)


def cmd(kind: m.CommandKind, ident: str = "c1", to: TrafficStage | None = None) -> m.ManualCommand:
    return m.ManualCommand(id=ident, kind=kind, to=to)


def of_kind(actions: Sequence[m.Action], kind: type[Any]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def routing(actions: Sequence[m.Action]) -> m.PublishRouting:
    tables = of_kind(actions, m.PublishRouting)
    assert len(tables) == 1
    return tables[0]  # type: ignore[no-any-return]


def pass_stage(state: m.RolloutState) -> m.RolloutState:
    """Report success once the stage's minimum duration is covered."""
    when = state.stage_entered_at + timedelta(seconds=_min_duration(state.stage))
    new, _ = go(state, report(state, when), when)
    return new


def _min_duration(stage: MachineStage) -> float:
    return 0.0 if stage == m.QUALITY_STAGE else POLICY.stages.of(m.traffic_stage(stage)).min_duration_s


def at_stage(stage: MachineStage) -> m.RolloutState:
    state = start()
    while state.stage != stage:
        state = pass_stage(state)
    assert state.phase == "Progressing"
    return state


# --------------------------------------------------------------------------------------------------- start


def test_a_rollout_starts_with_the_quality_gate_and_no_candidate_traffic() -> None:
    state, actions = go(start(), None, T0)
    assert state.stage == "quality" and state.phase == "Progressing"
    assert state.weights == m.Weights(stable=100, candidate=0)
    assert of_kind(actions, m.EnsureRunning) == [m.EnsureRunning(version=STABLE), m.EnsureRunning(version=CANDIDATE)]
    table = routing(actions)
    assert (table.stage, table.stable, table.candidate, table.candidate_weight) == ("stable", STABLE, CANDIDATE, 0)


def test_without_a_quality_gate_the_rollout_starts_in_shadow() -> None:
    data = yaml.safe_load(POLICY_YAML)
    data["gates"] = data["gates"][1:]
    policy = pol.policy_from_mapping(data)
    assert m.initial_state(policy, "r", STABLE, CANDIDATE, T0).stage == "shadow"


def test_quality_pass_enters_shadow_and_quality_failure_rolls_back() -> None:
    state, actions = go(start(), report(start(), T0), T0)
    assert state.stage == "shadow" and state.stage_entered_at == T0
    assert routing(actions).stage == "shadow"
    assert any(isinstance(a, m.RecordEvent) and "quality passed" in a.reason for a in actions)
    failed, actions = go(start(), report(start(), T0, S.FAILED), T0)
    assert failed.phase == "RolledBack"
    assert routing(actions) == m.PublishRouting(stage="stable", stable=STABLE, candidate=None, candidate_weight=0)


# --------------------------------------------------------------------------------------------------- promotion


def test_stage_waits_for_its_minimum_duration() -> None:
    state = at_stage("shadow")
    early = state.stage_entered_at + timedelta(seconds=59)
    waited, actions = go(state, report(state, early), early)
    assert waited.stage == "shadow"
    assert not of_kind(actions, m.RecordEvent)
    # the evidence must cover the minimum duration: an old report does not promote later
    later = state.stage_entered_at + timedelta(seconds=600)
    assert go(waited, report(state, early), later)[0].stage == "shadow"
    promoted, actions = go(waited, report(state, later), later)
    assert promoted.stage == "canary" and promoted.stage_entered_at == later
    assert promoted.weights == m.Weights(stable=97, candidate=3)
    assert routing(actions) == m.PublishRouting(stage="canary", stable=STABLE, candidate=CANDIDATE, candidate_weight=3)


def test_stage_waits_for_its_minimum_requests() -> None:
    state = at_stage("shadow")
    when = state.stage_entered_at + timedelta(seconds=120)
    rep = report(state, when, overrides={pol.MIN_REQUESTS_GATE: S.INCONCLUSIVE})
    assert go(state, rep, when)[0].stage == "shadow"
    # a report claiming Successful with a value below the policy's minimum does not promote either
    lying = rep.model_copy(
        update={
            "results": tuple(
                r.model_copy(update={"status": S.SUCCESSFUL, "candidate_value": 9.0})
                if r.name == pol.MIN_REQUESTS_GATE
                else r
                for r in rep.results
            )
        }
    )
    assert go(state, lying, when)[0].stage == "shadow"
    assert m.promotion_blockers(POLICY, state, lying) == [f"{pol.MIN_REQUESTS_GATE}: below 10"]


def test_stage_waits_for_its_minimum_labels() -> None:
    state = at_stage("ab")
    when = state.stage_entered_at + timedelta(seconds=120)
    assert go(state, report(state, when, overrides={pol.MIN_LABELS_GATE: S.INCONCLUSIVE}), when)[0].stage == "ab"
    assert go(state, report(state, when), when)[0].stage == "full"


def test_a_missing_gate_result_blocks_promotion() -> None:
    state = at_stage("shadow")
    when = state.stage_entered_at + timedelta(seconds=120)
    full = report(state, when)
    partial = full.model_copy(update={"results": tuple(r for r in full.results if r.name != "agreement")})
    assert go(state, partial, when)[0].stage == "shadow"


def test_full_rollout_to_promoted_keeps_the_previous_version_warm_then_scales_it_down() -> None:
    state = at_stage("full")
    assert state.weights == m.Weights(stable=0, candidate=100)
    promoted = pass_stage(state)
    assert promoted.phase == "Promoted" and promoted.promoted_at is not None
    assert [t.to_stage for t in promoted.history] == ["shadow", "canary", "ab", "full", "full"]
    now = promoted.promoted_at + timedelta(seconds=10)
    _, actions = go(promoted, None, now)
    until = promoted.promoted_at + timedelta(seconds=600)
    assert of_kind(actions, m.KeepWarm) == [m.KeepWarm(version=STABLE, until=until)]
    assert routing(actions) == m.PublishRouting(
        stage="stable", stable=CANDIDATE, candidate=None, candidate_weight=0, shadow=(STABLE,)
    )
    assert of_kind(actions, m.MoveAlias) == [m.MoveAlias(alias="champion", version=CANDIDATE)]
    assert of_kind(actions, m.ScaleDown) == [m.ScaleDown(version=STABLE, after=until)]
    after, actions = go(promoted, None, until)
    assert after == promoted
    assert not of_kind(actions, m.KeepWarm)
    assert routing(actions).shadow == ()
    assert of_kind(actions, m.ScaleDown) == [m.ScaleDown(version=STABLE, after=until)]


# --------------------------------------------------------------------------------------------------- failure


def test_a_failed_gate_rolls_back_with_its_values() -> None:
    state = at_stage("canary")
    when = state.stage_entered_at + timedelta(seconds=5)
    rep = report(state, when, overrides={"errors": S.FAILED})
    rolled, actions = go(state, rep, when)
    assert rolled.phase == "RolledBack" and rolled.finished_at == when
    assert rolled.weights == m.Weights(stable=100, candidate=0)
    assert rolled.history[-1].gates == rep.results and "errors" in rolled.history[-1].reason
    assert routing(actions) == m.PublishRouting(stage="stable", stable=STABLE, candidate=None, candidate_weight=0)
    assert of_kind(actions, m.ScaleDown) == [m.ScaleDown(version=CANDIDATE, after=when + timedelta(seconds=120))]
    assert not of_kind(actions, m.MoveAlias)  # the alias never moved
    events = of_kind(actions, m.RecordEvent)
    assert len(events) == 1 and events[0].values == rep.results


def test_a_failed_gate_rolls_back_even_while_paused() -> None:
    state, _ = go(at_stage("canary"), None, at(1000), cmd("pause"))
    when = at(1001)
    assert go(state, report(state, when, overrides={"errors": S.FAILED}), when)[0].phase == "RolledBack"


def test_errors_beyond_the_consecutive_limit_abort() -> None:
    state = at_stage("canary")
    base = state.stage_entered_at
    for i in range(1, 3):  # limit 2: two errors in a row are tolerated
        state, _ = go(state, report(state, base + timedelta(seconds=i), S.ERROR), base + timedelta(seconds=i))
        assert state.phase == "Progressing"
    assert state.gates["errors"].consecutive_errors == 2
    aborted, _ = go(state, report(state, base + timedelta(seconds=3), S.ERROR), base + timedelta(seconds=3))
    assert aborted.phase == "Aborted" and "errors" in aborted.history[-1].reason


def test_a_success_resets_the_error_count() -> None:
    state = at_stage("canary")
    base = state.stage_entered_at
    sequence = [S.ERROR, S.ERROR, S.INCONCLUSIVE, S.ERROR, S.ERROR]
    for i, status in enumerate(sequence, start=1):
        state, _ = go(state, report(state, base + timedelta(seconds=i), status), base + timedelta(seconds=i))
    assert state.phase == "Progressing" and state.gates["errors"].consecutive_errors == 2


def test_the_same_report_is_counted_once() -> None:
    state = at_stage("canary")
    when = state.stage_entered_at + timedelta(seconds=1)
    rep = report(state, when, S.ERROR)
    for i in range(5):
        state, _ = go(state, rep, when + timedelta(seconds=i))
    assert state.phase == "Progressing" and state.gates["errors"].consecutive_errors == 1


def test_inconclusive_beyond_the_timeout_aborts() -> None:
    state = at_stage("canary")
    base = state.stage_entered_at
    state, _ = go(state, report(state, base + timedelta(seconds=1), S.INCONCLUSIVE), base + timedelta(seconds=1))
    state, _ = go(state, None, base + timedelta(seconds=301))
    assert state.phase == "Progressing"
    aborted, actions = go(state, None, base + timedelta(seconds=302))
    assert aborted.phase == "Aborted" and aborted.history[-1].trigger == "timeout"
    assert routing(actions).candidate is None


def test_label_gates_wait_longer_than_the_other_gates() -> None:
    state = at_stage("ab")
    base = state.stage_entered_at
    rep = report(state, base + timedelta(seconds=1), overrides={"recall": S.INCONCLUSIVE})
    state, _ = go(state, rep, base + timedelta(seconds=1))
    assert go(state, None, base + timedelta(seconds=2000))[0].phase == "Progressing"
    assert go(state, None, base + timedelta(seconds=3002))[0].phase == "Aborted"


def test_pause_stops_promotion_and_the_timeout_and_resume_restarts_the_clock() -> None:
    state = at_stage("canary")
    base = state.stage_entered_at
    state, _ = go(state, report(state, base + timedelta(seconds=1), S.INCONCLUSIVE), base + timedelta(seconds=1))
    paused, _ = go(state, None, base + timedelta(seconds=2), cmd("pause", "p"))
    assert paused.paused and paused.history[-1].reason == "manual pause"
    late = base + timedelta(seconds=5000)
    held, _ = go(paused, report(paused, late), late)
    assert held.stage == "canary" and held.phase == "Progressing"  # all Successful, but paused
    blocked, _ = go(paused, None, late)
    assert blocked.phase == "Progressing"  # no timeout while paused
    resumed, _ = go(blocked, None, late, cmd("resume", "r"))
    assert not resumed.paused and resumed.gates["errors"].inconclusive_since == late
    assert go(resumed, None, late + timedelta(seconds=300))[0].phase == "Progressing"
    assert go(resumed, None, late + timedelta(seconds=301))[0].phase == "Aborted"


# --------------------------------------------------------------------------------------------------- commands


def test_manual_promote_moves_one_stage_or_to_a_named_stage() -> None:
    state = at_stage("shadow")
    nxt, _ = go(state, None, at(10), cmd("promote"))
    assert nxt.stage == "canary" and nxt.history[-1].command_id == "c1"
    skipped, actions = go(state, None, at(10), cmd("promote", to="full"))
    assert skipped.stage == "full" and routing(actions).candidate_weight == 100
    done, _ = go(skipped, None, at(11), cmd("promote", "c2"))
    assert done.phase == "Promoted"


def test_manual_promote_backwards_is_ignored_with_an_event() -> None:
    state = at_stage("ab")
    same, actions = go(state, None, at(10_000), cmd("promote", to="canary"))
    assert same.stage == "ab" and same.history == state.history
    assert any(isinstance(a, m.RecordEvent) and "ignored" in a.reason for a in actions)


def test_a_command_is_applied_once_per_id() -> None:
    state = at_stage("shadow")
    once, _ = go(state, None, at(10), cmd("promote", "same"))
    twice, actions = go(once, None, at(11), cmd("promote", "same"))
    assert twice.stage == "canary"
    assert not of_kind(actions, m.RecordEvent)


def test_abort_and_revert_are_honoured_in_every_progressing_stage() -> None:
    for stage in m.MACHINE_STAGES:
        state = at_stage(stage)
        aborted, actions = go(state, None, at(50_000), cmd("abort"))
        assert aborted.phase == "Aborted"
        assert routing(actions) == m.PublishRouting(stage="stable", stable=STABLE, candidate=None, candidate_weight=0)
        reverted, _ = go(state, None, at(50_000), cmd("revert"))
        assert reverted.phase == "RolledBack"


def test_revert_after_promotion_brings_the_previous_version_back() -> None:
    promoted = pass_stage(at_stage("full"))
    assert promoted.promoted_at is not None
    when = promoted.promoted_at + timedelta(seconds=30)
    reverted, actions = go(promoted, None, when, cmd("revert", "undo"))
    assert reverted.phase == "RolledBack" and reverted.finished_at == when
    assert of_kind(actions, m.EnsureRunning) == [m.EnsureRunning(version=STABLE)]
    assert routing(actions) == m.PublishRouting(stage="stable", stable=STABLE, candidate=None, candidate_weight=0)
    assert of_kind(actions, m.MoveAlias) == [m.MoveAlias(alias="champion", version=STABLE)]
    assert of_kind(actions, m.ScaleDown) == [m.ScaleDown(version=CANDIDATE, after=when + timedelta(seconds=120))]
    # a finished rollout ignores everything else
    for kind in ("promote", "pause", "resume", "abort", "revert"):
        again, _ = go(reverted, None, when, cmd(kind, f"late-{kind}"))
        assert again.phase == "RolledBack" and again.history == reverted.history


def test_commands_other_than_abort_and_revert_are_ignored_after_promotion() -> None:
    promoted = pass_stage(at_stage("full"))
    for kind in ("promote", "pause", "resume"):
        same, _ = go(promoted, None, at(99_999), cmd(kind, kind))
        assert same.phase == "Promoted" and same.history == promoted.history


def test_reports_of_another_stage_or_rollout_are_ignored() -> None:
    state = at_stage("canary")
    when = state.stage_entered_at + timedelta(seconds=600)
    assert go(state, report(state, when, S.FAILED, stage="shadow"), when)[0] == state
    other = report(state, when, S.FAILED).model_copy(update={"candidate": "v3"})
    assert go(state, other, when)[0] == state
    before_stage = report(state, state.stage_entered_at - timedelta(seconds=1), S.FAILED)
    assert go(state, before_stage, when)[0] == state


# --------------------------------------------------------------------------------------------------- steps

STEPPED = pol.policy_from_mapping(
    {**yaml.safe_load(POLICY_YAML), "stages": {**yaml.safe_load(POLICY_YAML)["stages"], "steps": [1, 2, 5, 25, 50]}}
)


def stepped(state: m.RolloutState, rep: AnalysisReport | None, now: datetime, command: m.ManualCommand | None = None
            ) -> tuple[m.RolloutState, tuple[m.Action, ...]]:  # fmt: skip
    return m.step(state, rep, now, command, policy=STEPPED)


def test_steps_walk_each_weight_in_turn_each_gated_and_timed_from_its_own_start() -> None:
    state = m.initial_state(STEPPED, "r1", STABLE, CANDIDATE, T0)
    seen: list[tuple[str, int, int]] = []
    while state.phase == "Progressing":
        minimum = _min_duration(state.stage)
        if minimum:  # not before the step's own minimum duration, counted from the step's entry
            early = state.stage_entered_at + timedelta(seconds=minimum - 1)
            held = stepped(state, report(state, early), early)[0]
            assert (held.stage, held.step, held.phase) == (state.stage, state.step, state.phase)
        when = state.stage_entered_at + timedelta(seconds=minimum)
        state, actions = stepped(state, report(state, when), when)
        if state.phase == "Progressing" and state.stage != m.QUALITY_STAGE:
            seen.append((state.stage, state.step, routing(actions).candidate_weight))
            assert state.weights.candidate == routing(actions).candidate_weight and state.gates == {}
    assert seen == [("shadow", 0, 0), ("canary", 0, 1), ("canary", 1, 2), ("canary", 2, 5), ("ab", 0, 25),
                    ("ab", 1, 50), ("full", 0, 100)]  # fmt: skip
    assert state.phase == "Promoted"
    reasons = [t.reason for t in state.history]
    assert "every gate of canary step 2/3 (2 %) passed" in reasons
    assert "every gate of ab step 1/2 (25 %) passed" in reasons
    steps = [(t.from_stage, t.from_step, t.to_stage, t.to_step) for t in state.history]
    assert ("canary", 2, "ab", 0) in steps and ("ab", 0, "ab", 1) in steps


def _at_step(stage: MachineStage, step: int) -> m.RolloutState:
    state = m.initial_state(STEPPED, "r1", STABLE, CANDIDATE, T0)
    while (state.stage, state.step) != (stage, step):
        when = state.stage_entered_at + timedelta(seconds=_min_duration(state.stage))
        state, _ = stepped(state, report(state, when), when)
    return state


def test_a_failed_gate_in_a_later_step_rolls_back_and_a_report_of_the_previous_step_is_ignored() -> None:
    state = _at_step("canary", 1)
    stale = report(state, state.stage_entered_at - timedelta(seconds=1), S.FAILED)
    assert stepped(state, stale, state.stage_entered_at + timedelta(seconds=5))[0] == state
    when = state.stage_entered_at + timedelta(seconds=5)
    failed, actions = stepped(state, report(state, when, overrides={"errors": S.FAILED}), when)
    assert failed.phase == "RolledBack" and failed.history[-1].from_step == 1
    assert routing(actions).candidate_weight == 0


def test_manual_promote_moves_one_step_and_promote_to_a_stage_starts_its_first_step() -> None:
    state = _at_step("canary", 0)
    nxt, actions = stepped(state, None, at(10_000), cmd("promote"))
    assert (nxt.stage, nxt.step, routing(actions).candidate_weight) == ("canary", 1, 2)
    jumped, actions = stepped(state, None, at(10_000), cmd("promote", to="ab"))
    assert (jumped.stage, jumped.step, routing(actions).candidate_weight) == ("ab", 0, 25)
    last = _at_step("ab", 1)
    to_full, actions = stepped(last, None, at(99_000), cmd("promote"))
    assert (to_full.stage, to_full.step, routing(actions).candidate_weight) == ("full", 0, 100)


def test_without_steps_each_stage_has_one_step_at_its_weight() -> None:
    assert [POLICY.stages.step_weights(s) for s in pol.TRAFFIC_STAGES] == [(0,), (3,), (50,), (100,)]
    assert m.step_label(POLICY, "canary", 0) == "canary"


def test_state_round_trips_through_json() -> None:
    state = pass_stage(at_stage("full"))
    assert m.RolloutState.model_validate_json(state.model_dump_json()) == state


def test_analysis_and_machine_together() -> None:
    """The pure pipeline: a fake provider's numbers → analyse → step."""
    state = at_stage("shadow")
    when = state.stage_entered_at + timedelta(minutes=5)
    values = {'requests{model_version="v2"}': 50.0, 'errors{model_version="v2"}': 0.0}
    values['agree{stable="v1",candidate="v2"}'] = 0.97

    class Provider:
        def query(self, promql: str) -> float | None:
            return values.get(promql)

    rep = analyse(POLICY, "shadow", Provider(), STABLE, CANDIDATE, when, stage_entered_at=state.stage_entered_at)
    assert go(state, rep, when)[0].stage == "canary"
    values['agree{stable="v1",candidate="v2"}'] = 0.5
    rep = analyse(POLICY, "shadow", Provider(), STABLE, CANDIDATE, when, stage_entered_at=state.stage_entered_at)
    assert go(state, rep, when)[0].phase == "RolledBack"
    del values['errors{model_version="v2"}']
    values['agree{stable="v1",candidate="v2"}'] = 0.97
    rep = analyse(POLICY, "shadow", Provider(), STABLE, CANDIDATE, when, stage_entered_at=state.stage_entered_at)
    assert go(state, rep, when)[0].stage == "shadow"  # no data for a gate: wait, never promote


# --------------------------------------------------------------------------------------------------- properties


@dataclass(frozen=True)
class Event:
    dt: int
    report: str  # "none" | "current" | "other-stage"
    statuses: tuple[S, ...]
    command: m.ManualCommand | None


_commands = st.builds(
    m.ManualCommand,
    id=st.sampled_from([f"c{i}" for i in range(6)]),
    kind=st.sampled_from(["promote", "pause", "resume", "abort", "revert"]),
).flatmap(
    lambda c: (
        st.sampled_from([None, *pol.TRAFFIC_STAGES]).map(lambda to: c.model_copy(update={"to": to}))
        if c.kind == "promote"
        else st.just(c)
    )
)
_events = st.builds(
    Event,
    dt=st.integers(0, 400),
    report=st.sampled_from(["none", "current", "current", "current", "other-stage"]),
    statuses=st.lists(st.sampled_from(list(S)), min_size=5, max_size=5).map(tuple),
    command=st.none() | st.none() | st.none() | _commands,
)


def _report_for(state: m.RolloutState, event: Event, when: datetime) -> AnalysisReport | None:
    if event.report == "none":
        return None
    stage = state.stage
    if event.report == "other-stage":
        stage = m.MACHINE_STAGES[(m.stage_index(stage) + 1) % len(m.MACHINE_STAGES)]
    names = m.expected_gates(POLICY, stage)
    overrides = {name: event.statuses[i] for i, name in enumerate(names)}
    return report(state, when, overrides=overrides, stage=stage)


_URLS = {STABLE: "http://127.0.0.1:3001", CANDIDATE: "http://127.0.0.1:3002"}


def _check_routing(table: m.PublishRouting) -> None:
    """The published fields make a routing table the router accepts."""
    RoutingTable(
        stage=table.stage,
        stable=VersionEndpoint(version=table.stable, url=_URLS[table.stable]),
        candidate=VersionEndpoint(version=table.candidate, url=_URLS[table.candidate]) if table.candidate else None,
        candidate_weight=table.candidate_weight,
        shadow=tuple(VersionEndpoint(version=v, url=_URLS[v]) for v in table.shadow),
    )


def _check_step(
    pre: m.RolloutState,
    rep: AnalysisReport | None,
    now: datetime,
    command: m.ManualCommand | None,
    post: m.RolloutState,
    actions: tuple[m.Action, ...],
) -> None:
    # valid state, valid weights, a valid routing table
    assert m.RolloutState.model_validate(post.model_dump()) == post
    assert 0 <= post.weights.candidate <= 100 and post.weights.stable + post.weights.candidate == 100
    table = routing(actions)
    _check_routing(table)
    if post.phase == "Progressing" and post.stage == "canary":
        assert pol.CANARY_WEIGHT_MIN <= table.candidate_weight <= pol.CANARY_WEIGHT_MAX
        assert post.weights.candidate == table.candidate_weight
    new_command = command if command is not None and command.id not in pre.applied_commands else None
    # abort / revert are always honoured
    if new_command is not None and new_command.kind in ("abort", "revert"):
        if pre.phase in m.ROLLED_BACK_PHASES:
            assert post.phase == pre.phase
        else:
            assert post.phase == ("Aborted" if new_command.kind == "abort" else "RolledBack")
        assert table == m.PublishRouting(stage="stable", stable=STABLE, candidate=None, candidate_weight=0)
    # rolled back is final
    if pre.phase in m.ROLLED_BACK_PHASES:
        assert post.phase == pre.phase and post.stage == pre.stage
    if pre.phase == "Promoted":
        assert post.phase == "Promoted" or (new_command is not None and post.phase in m.ROLLED_BACK_PHASES)
    # progress only forwards; automatic progress one stage at a time and only on complete, successful evidence
    advanced = post.phase == "Promoted" and pre.phase != "Promoted"
    advanced |= post.phase == "Progressing" and m.stage_index(post.stage) != m.stage_index(pre.stage)
    if post.phase == "Progressing":
        assert m.stage_index(post.stage) >= m.stage_index(pre.stage)
    if advanced and not (new_command is not None and new_command.kind == "promote"):
        resumed_now = new_command is not None and new_command.kind == "resume"
        assert pre.phase == "Progressing" and (not pre.paused or resumed_now) and not post.paused
        if post.phase == "Progressing":
            assert m.stage_index(post.stage) == m.stage_index(pre.stage) + 1
        else:
            assert pre.stage == "full"
        assert rep is not None and rep.stage == pre.stage and rep.at >= pre.stage_entered_at
        for name in m.expected_gates(POLICY, pre.stage):
            result = rep.result(name)
            assert result is not None and result.status is S.SUCCESSFUL  # never on Inconclusive / Error
        assert (rep.at - pre.stage_entered_at).total_seconds() >= _min_duration(pre.stage)
    # deterministic, and idempotent: the same inputs again change nothing
    assert m.step(pre, rep, now, command, policy=POLICY) == (post, actions)
    again, _ = m.step(post, rep, now, command, policy=POLICY)
    assert again == post


@settings(max_examples=200, deadline=None)
@given(st.lists(_events, max_size=40))
def test_random_histories_keep_every_invariant(events: list[Event]) -> None:
    state = start()
    now = T0
    for event in events:
        now += timedelta(seconds=event.dt)
        rep = _report_for(state, event, now)
        new, actions = m.step(state, rep, now, event.command, policy=POLICY)
        _check_step(state, rep, now, event.command, new, actions)
        state = new
    assert state.phase in ("Progressing", "Promoted", "RolledBack", "Aborted")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 120), min_size=1, max_size=10))
def test_successful_evidence_reaches_promoted(intervals: list[int]) -> None:
    """Liveness: with every gate Successful the rollout is promoted after each stage's minimum duration."""
    state, now = start(), T0
    steps = 0
    while state.phase == "Progressing":
        now += timedelta(seconds=intervals[steps % len(intervals)])
        state, _ = m.step(state, report(state, now), now, None, policy=POLICY)
        steps += 1
        assert steps < 1000
    assert state.phase == "Promoted"
    assert [t.to_stage for t in state.history if t.to_phase == "Progressing"] == list(pol.TRAFFIC_STAGES)


@settings(max_examples=100, deadline=None)
@given(st.lists(_events, max_size=25), st.sampled_from(["abort", "revert"]))
def test_abort_or_revert_at_any_point_returns_all_traffic_to_stable(events: list[Event], kind: str) -> None:
    state, now = start(), T0
    for event in events:
        now += timedelta(seconds=event.dt)
        state, _ = m.step(state, _report_for(state, event, now), now, event.command, policy=POLICY)
    final, actions = m.step(state, None, now, m.ManualCommand(id="final", kind=kind), policy=POLICY)
    assert final.phase in m.ROLLED_BACK_PHASES
    assert routing(actions) == m.PublishRouting(stage="stable", stable=STABLE, candidate=None, candidate_weight=0)
    assert final.weights == m.Weights(stable=100, candidate=0)


# --------------------------------------------------------------------------------------------------- revisions


def test_revisions_record_each_new_serving_version_once_numbered_and_bounded() -> None:
    state = start()
    revisions = record_revision((), state, keep=3)
    assert [(r.number, r.version) for r in revisions] == [(1, STABLE)]  # the stable a first rollout begins from
    promoted = pass_stage(at_stage("full"))
    revisions = record_revision(revisions, promoted, keep=3)
    assert [(r.number, r.version, r.rollout_id) for r in revisions] == [(1, STABLE, None), (2, CANDIDATE, "r1")]
    assert revisions[-1].since == promoted.finished_at
    assert record_revision(revisions, promoted, keep=3) == revisions  # idempotent
    reverted, _ = go(promoted, None, at(99_000), cmd("revert", "undo"))
    revisions = record_revision(revisions, reverted, keep=3)
    assert [(r.number, r.version) for r in revisions] == [(1, STABLE), (2, CANDIDATE), (3, STABLE)]
    again = m.initial_state(POLICY, "r2", STABLE, CANDIDATE, at(100_000))
    again = pass_stage(again)
    while again.phase == "Progressing":
        again = pass_stage(again)
    revisions = record_revision(revisions, again, keep=3)
    assert [(r.number, r.version) for r in revisions] == [(2, CANDIDATE), (3, STABLE), (4, CANDIDATE)]  # 3 kept


def test_a_revision_records_the_bundle_digest_it_was_deployed_with() -> None:
    """Two revisions of one version name told apart: the digest is asked for each added revision (never again for
    one already recorded), so a version re-registered with another bundle shows a new digest."""
    digests = {STABLE: "a" * 64, CANDIDATE: "b" * 64}
    asked: list[str] = []

    def digest_of(version: str) -> str | None:
        asked.append(version)
        return digests.get(version)

    promoted = pass_stage(at_stage("full"))
    revisions = record_revision((), promoted, keep=5, digest_of=digest_of)
    assert [(r.version, r.digest) for r in revisions] == [(STABLE, "a" * 64), (CANDIDATE, "b" * 64)]
    assert record_revision(revisions, promoted, keep=5, digest_of=digest_of) == revisions
    assert asked == [STABLE, CANDIDATE]
    digests[STABLE] = "c" * 64  # the stable's name registered again with another bundle
    reverted, _ = go(promoted, None, at(99_000), cmd("revert", "undo"))
    revisions = record_revision(revisions, reverted, keep=5, digest_of=digest_of)
    assert [(r.number, r.version, r.digest) for r in revisions] == [
        (1, STABLE, "a" * 64), (2, CANDIDATE, "b" * 64), (3, STABLE, "c" * 64)
    ]  # fmt: skip
    assert record_revision((), promoted, keep=5)[0].digest is None  # a backend without a registry
