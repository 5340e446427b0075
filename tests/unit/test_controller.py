"""rollout.controller.loop: the reconcile loop against an in-memory world.

The world is tests/kits/doubles.py's (pure logic, on purpose: these tests are about the loop's bookkeeping, not
about processes). Everything else is real: the stage machine, the analysis, the state file, the inbox, the event log
and the Prometheus metrics. The real backends run in tests/integration/test_rollout_local.py.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.backends.base import PublishResult, RoutingSpec
from rollout.backends.local.events import read_events
from rollout.backends.local.inbox import EVENTS_FILE, STATE_FILE, CommandInbox
from rollout.backends.local.state import StateStore
from rollout.core import policy as pol
from rollout.core.state import SCHEMA_VERSION, StateError, loads_state
from service.common.logging import FIELDS_ATTR as LOG_FIELDS_ATTR
from tests.kits.doubles import (
    POLICY,
    POLICY_YAML,
    V1,
    V2,
    Crash,
    DictMetrics,
    Harness,
    outcome_of,
    published,
    start_rollout,
)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "state")


# --------------------------------------------------------------------------------------------------- the loop


def test_baseline_serves_the_champion_before_any_rollout(harness: Harness) -> None:
    harness.tick(n=3)
    assert harness.world.effects == [("start", V1), ("publish", "stable", V1, None, 0, ())]
    assert harness.rollout is None


def test_a_good_candidate_goes_through_every_stage_and_the_previous_version_stays_warm(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")

    assert [h.to_stage for h in harness.rollout.history] == ["shadow", "canary", "ab", "full", "full"]
    assert published(harness.world) == [
        ("stable", V1, None, 0, ()),
        ("shadow", V1, V2, 0, ()),
        ("canary", V1, V2, 5, ()),
        ("ab", V1, V2, 50, ()),
        ("full", V1, V2, 100, ()),
        ("stable", V2, None, 0, (V1,)),
    ]
    assert harness.registry.aliases == {"champion": V2, "challenger": V2}
    # every traffic stage lasted at least its minimum: a stage is left on a report covering min_duration_s
    entered = [t.at for t in harness.rollout.history]
    assert all((b - a).total_seconds() >= 10 for a, b in itertools.pairwise(entered))
    assert V1 in harness.workloads.running()  # warm for a one-step revert

    harness.tick(seconds=61)  # past the warm window
    assert (("stop", V1)) in harness.world.effects
    assert published(harness.world)[-1] == ("stable", V2, None, 0, ())


def test_state_is_persisted_atomically_with_its_schema_version(harness: Harness) -> None:
    start_rollout(harness)
    harness.tick(n=12)
    saved = StateStore(harness.state_dir).load()
    assert saved == harness.controller.state
    raw = json.loads((harness.state_dir / STATE_FILE).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert not [p for p in harness.state_dir.iterdir() if p.name.endswith(".tmp")]


def test_an_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="schema version 99"):
        loads_state(json.dumps({"schema_version": 99, "name": "x"}))
    with pytest.raises(StateError, match="not JSON"):
        loads_state("{")


def test_a_failed_outcome_gate_rolls_back_and_the_candidate_is_stopped_after_the_delay(harness: Harness) -> None:
    harness.metrics_values.values['tp{model_version="v2"}'] = 200.0  # recall 0.2 against 0.9
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "RolledBack")

    last = harness.rollout.history[-1]
    assert (last.from_stage, last.to_phase, last.trigger) == ("ab", "RolledBack", "analysis")
    assert "recall" in last.reason
    assert published(harness.world)[-1] == ("stable", V1, None, 0, ())
    assert "challenger" not in harness.registry.aliases
    assert V2 in harness.workloads.running()  # kept for inspection …
    harness.tick(seconds=31)
    assert ("stop", V2) in harness.world.effects  # … until scale_down_delay_s


def test_prometheus_down_is_no_evidence_no_promotion_then_abort_after_the_timeout(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary")
    harness.metrics_values.online = False
    entered = harness.rollout.stage_entered_at
    harness.run_until(lambda: harness.phase() != "Progressing")

    assert harness.rollout.stage == "canary"
    assert harness.rollout.phase == "Aborted"
    assert harness.rollout.history[-1].trigger == "timeout"
    assert (harness.rollout.finished_at - entered).total_seconds() > POLICY.analysis.inconclusive_timeout_s
    assert published(harness.world)[-1] == ("stable", V1, None, 0, ())


def test_a_failing_provider_aborts_after_the_consecutive_error_limit(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "shadow")
    harness.metrics_values.broken = True
    harness.run_until(lambda: harness.phase() != "Progressing", limit=60)

    assert harness.rollout.phase == "Aborted"
    assert "errors beyond the limit" in harness.rollout.history[-1].reason


# --------------------------------------------------------------------------------------------------- restarts


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, ...]]:
    """The effects of an uninterrupted rollout to Promoted and past the warm window."""
    h = Harness(tmp_path_factory.mktemp("reference"))
    start_rollout(h)
    h.run_until(lambda: h.phase() == "Promoted")
    h.tick(seconds=61, n=2)
    return h.world.effects


@pytest.mark.parametrize("crash_at", range(12))
def test_a_controller_killed_at_any_effect_resumes_without_repeating_or_skipping_one(
    tmp_path: Path, crash_at: int, expected: list[tuple[Any, ...]]
) -> None:
    h = Harness(tmp_path / "crashy")
    h.world.crash_at = crash_at
    start_rollout_crashing(h)
    deadline = 400
    while h.phase() != "Promoted" and deadline:
        deadline -= 1
        crash_tick(h)
    crash_tick(h, seconds=61)
    crash_tick(h, seconds=61)

    # the same effects of each kind in the same order: none repeated, none skipped (how a restart interleaves
    # effects of different kinds — an alias move before or after a table — is not part of the contract)
    assert crash_at < len(expected)
    assert h.world.crash_at is None  # the kill happened
    assert by_kind(h.world.effects) == by_kind(expected)
    transitions = [e for e in read_events(h.state_dir / EVENTS_FILE) if e["kind"] == "transition"]
    assert [e["seq"] for e in transitions] == list(range(len(h.rollout.history)))


def by_kind(effects: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    kinds: dict[str, list[tuple[Any, ...]]] = {}
    for effect in effects:
        kinds.setdefault("workload" if effect[0] in ("start", "stop") else effect[0], []).append(effect)
    return kinds


def crash_tick(h: Harness, seconds: float = 1.0) -> None:
    """One reconcile; a kill replaces the controller by a new one on the same files, which reconciles at once."""
    h.clock.advance(seconds)
    try:
        h.controller.reconcile()
    except Crash:
        h.controller = h.new_controller()
        h.controller.reconcile()


def start_rollout_crashing(h: Harness) -> None:
    crash_tick(h)
    crash_tick(h)
    h.command("start", candidate=V2, id="r1")
    crash_tick(h)


def test_a_kill_before_the_state_is_saved_replays_the_command_once(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary")
    harness.command("pause", id="p1")
    original = harness.controller.store.save

    def killed(_state: object) -> None:
        raise Crash("killed before the rename")

    harness.controller.store.save = killed  # type: ignore[method-assign]
    with pytest.raises(Crash):
        harness.tick()
    harness.controller.store.save = original  # type: ignore[method-assign]
    saved = StateStore(harness.state_dir).load()
    assert saved is not None and saved.rollout is not None
    assert saved.rollout.paused is False  # nothing half-saved

    harness.controller = harness.new_controller()
    harness.tick(n=3)
    assert harness.rollout.paused is True
    assert [t.command_id for t in harness.rollout.history].count("p1") == 1
    assert not CommandInbox(harness.state_dir).has_pending()


def test_a_restart_mid_stage_keeps_the_stage_clock(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary")
    entered = harness.rollout.stage_entered_at
    harness.tick(n=3)
    effects = len(harness.world.effects)
    harness.controller = harness.new_controller()
    harness.tick()
    assert harness.rollout.stage_entered_at == entered
    assert len(harness.world.effects) == effects  # nothing started or published again


# --------------------------------------------------------------------------------------------------- commands


def test_pause_holds_the_stage_and_resume_releases_it(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "shadow")
    harness.command("pause", id="p1")
    harness.tick(n=40)
    assert (harness.rollout.stage, harness.rollout.paused) == ("shadow", True)
    harness.command("resume", id="r2")
    harness.run_until(lambda: harness.rollout.stage == "canary")
    assert outcome_of(harness, "p1") == "applied"


def test_promote_to_a_named_stage_skips_the_ones_between(harness: Harness) -> None:
    start_rollout(harness)
    harness.command("promote", id="jump", to="ab")
    harness.tick()
    assert harness.rollout.stage == "ab"
    assert published(harness.world)[-1] == ("ab", V1, V2, 50, ())


def test_revert_after_promotion_puts_everything_back_and_moves_the_alias_back(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    harness.command("revert", id="back", reason="complaints")
    harness.tick()

    assert harness.rollout.phase == "RolledBack"
    assert published(harness.world)[-1] == ("stable", V1, None, 0, ())
    assert harness.registry.aliases["champion"] == V1
    assert outcome_of(harness, "back") == "applied"


def test_abort_during_canary(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary")
    harness.command("abort", id="stop")
    harness.tick()
    assert harness.rollout.phase == "Aborted"
    assert published(harness.world)[-1] == ("stable", V1, None, 0, ())


def test_a_command_id_is_applied_once_even_when_its_file_reappears(harness: Harness) -> None:
    start_rollout(harness)
    command = harness.command("pause", id="once")
    harness.tick()
    CommandInbox(harness.state_dir).submit(command)  # a crash left the file behind
    harness.command("resume", id="go")
    harness.tick(n=3)
    assert harness.rollout.paused is False
    assert [t.command_id for t in harness.rollout.history if t.command_id] == ["once", "go"]
    assert not CommandInbox(harness.state_dir).has_pending()


@pytest.mark.parametrize(
    ("kind", "fields", "why"),
    [
        ("resume", {}, "nothing to do"),
        ("start", {"candidate": V2}, "in progress"),
        ("start", {"candidate": "v9"}, None),
    ],
)
def test_commands_that_do_not_apply_are_ignored_with_a_reason(
    harness: Harness, kind: str, fields: dict[str, Any], why: str | None
) -> None:
    start_rollout(harness)
    if fields.get("candidate") == "v9":
        harness.controller.state = harness.controller.state.model_copy(update={"rollout": None})
    command = harness.command(kind, id="odd", **fields)
    harness.tick()
    result = harness.controller.state.result_of(command.id)
    assert result is not None
    assert result.outcome == "ignored"
    assert why is None or why in result.detail
    notes = [e for e in read_events(harness.state_dir / EVENTS_FILE) if e["kind"] == "note"]
    assert any("ignored" in e["reason"] for e in notes)


def test_a_command_without_a_rollout_is_ignored(harness: Harness) -> None:
    harness.tick()
    harness.command("revert", id="early")
    harness.tick()
    result = harness.controller.state.result_of("early")
    assert result is not None
    assert result.detail == "no rollout"


def test_an_unreadable_command_file_is_discarded_and_noted(harness: Harness) -> None:
    inbox = CommandInbox(harness.state_dir)
    inbox.directory.mkdir(parents=True)
    (inbox.directory / "0-garbage.json").write_text("{not json")
    harness.tick()
    assert not inbox.has_pending()
    assert any(e["reason"] == "unreadable command discarded" for e in read_events(harness.state_dir / EVENTS_FILE))


def test_a_new_rollout_after_promotion_starts_from_the_promoted_version(harness: Harness) -> None:
    harness.registry.versions = (V1, V2, "v3")
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    harness.quality.metrics["v3"] = {"pr_auc": 0.95}
    harness.command("start", candidate="v3", id="r2")
    harness.tick()
    assert (harness.rollout.stable, harness.rollout.candidate) == (V2, "v3")
    assert [p.rollout_id for p in harness.controller.state.past] == ["r1"]
    harness.tick(n=2)
    assert V1 not in harness.workloads.running()  # the old warm version is no longer wanted


# --------------------------------------------------------------------------------------------------- record


def test_every_transition_is_logged_once_with_its_reason_and_gate_values(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    events = [e for e in read_events(harness.state_dir / EVENTS_FILE) if e["kind"] == "transition"]
    assert [(e["from_stage"], e["to_stage"], e["reason_code"]) for e in events] == [
        ("quality", "shadow", "gates_passed"),
        ("shadow", "canary", "gates_passed"),
        ("canary", "ab", "gates_passed"),
        ("ab", "full", "gates_passed"),
        ("full", "full", "gates_passed"),
    ]
    ab = events[3]
    recall = next(g for g in ab["gates"] if g["name"] == "recall")
    assert recall["status"] == "Successful"
    assert recall["candidate_value"] == pytest.approx(0.89)
    assert recall["stable_value"] == pytest.approx(0.9)
    assert recall["threshold"] == -0.2


def test_controller_metrics_follow_the_rollout(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary")
    harness.tick(n=6)

    assert harness.sample("fraudwatch_rollout_stage", stage="canary") == 1.0
    assert harness.sample("fraudwatch_rollout_stage", stage="shadow") == 0.0
    assert harness.sample("fraudwatch_rollout_stage_index") == 2.0
    assert harness.sample("fraudwatch_rollout_candidate_weight") == 5.0
    assert harness.sample("fraudwatch_rollout_gate_result", gate="errors", result="Successful") == 1.0
    assert harness.sample("fraudwatch_rollout_gate_result", gate="errors", result="Failed") == 0.0
    assert harness.sample("fraudwatch_rollout_gate_value", gate="errors", value="threshold") == 0.01
    moved = harness.sample(
        "fraudwatch_rollout_transitions_total", **{"from": "Progressing/shadow", "to": "Progressing/canary",
                                                   "reason": "gates_passed"}
    )  # fmt: skip
    assert moved == 1.0
    assert harness.sample("fraudwatch_rollout_last_successful_reconcile_timestamp_seconds") is not None
    assert (harness.sample("fraudwatch_rollout_reconcile_duration_seconds_count") or 0) > 0
    assert harness.sample("fraudwatch_rollout_commands_total", kind="start", outcome="applied") == 1.0


def test_a_failing_action_is_counted_and_retried_on_the_next_reconcile(harness: Harness) -> None:
    harness.tick(n=2)
    failures = {"left": 2}
    original = harness.router.publish

    def flaky(spec: RoutingSpec, urls: Mapping[str, str]) -> PublishResult:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("router down")
        return original(spec, urls)

    harness.router.publish = flaky  # type: ignore[method-assign]
    harness.command("start", candidate=V2, id="r1")
    harness.tick(n=4)
    assert harness.sample("fraudwatch_rollout_reconcile_errors_total", step="act") == 2.0
    assert published(harness.world)[-1][0] == "shadow"


def test_a_routing_command_is_in_force_only_once_the_routers_hold_its_table(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    original = harness.router.publish

    def down(spec: RoutingSpec, urls: Mapping[str, str]) -> PublishResult:
        raise ConnectionError("router down")

    harness.router.publish = down  # type: ignore[method-assign]
    harness.command("revert", id="back")
    harness.tick()
    applied = harness.controller.state.result_of("back")
    assert applied is not None and applied.outcome == "applied"
    assert applied.in_force_at is None  # decided and saved, but not in force: the router refused

    harness.router.publish = original  # type: ignore[method-assign]
    harness.tick()
    in_force = harness.controller.state.result_of("back")
    assert in_force is not None and in_force.in_force_at == harness.clock.now
    assert published(harness.world)[-1] == ("stable", V1, None, 0, ())


# --------------------------------------------------------------------------------------------------- the workload


def test_a_crash_looping_candidate_is_rolled_back_within_the_restart_bound(harness: Harness) -> None:
    harness.workloads.crashing.add(V2)
    start_rollout(harness)
    ticks = harness.run_until(lambda: harness.phase() != "Progressing", limit=60)

    last = harness.rollout.history[-1]
    assert (last.from_stage, last.to_phase, last.trigger) == ("shadow", "RolledBack", "analysis")
    assert "candidate-workload" in last.reason and "restarted 4 times during the rollout (limit 3)" in last.reason
    assert ticks <= POLICY.analysis.max_restarts + 3  # one restart per reconcile here, then one reconcile to decide
    assert all(V2 not in (p[2], *p[4]) for p in published(harness.world))  # never routed, not even in shadow
    assert harness.sample("fraudwatch_rollout_workload_restarts", version=V2) == 4
    assert harness.sample("fraudwatch_rollout_workload_ready", version=V2) == 0
    gate = harness.rollout.gates["candidate-workload"].last
    assert gate is not None and gate.status.value == "Failed" and gate.candidate_value == 4


def test_a_candidate_that_never_becomes_ready_is_rolled_back_after_the_not_ready_timeout(tmp_path: Path) -> None:
    policy = POLICY.model_copy(update={"analysis": POLICY.analysis.model_copy(update={"not_ready_timeout_s": 30.0})})
    harness = Harness(tmp_path / "state", policy=policy)
    harness.workloads.ready_after = 10**6  # the champion too would never be ready: make it ready at once
    harness.workloads.probes[V1] = 10**6
    start_rollout(harness)
    started = harness.clock.now
    harness.run_until(lambda: harness.phase() != "Progressing", limit=60)

    last = harness.rollout.history[-1]
    assert last.to_phase == "RolledBack" and "not ready for 3" in last.reason and "(limit 30s)" in last.reason
    assert 30 < (last.at - started).total_seconds() <= 30 + 2  # the bound plus one reconcile
    assert harness.sample("fraudwatch_rollout_workload_restarts", version=V2) == 0


def test_a_ready_candidate_carries_a_successful_workload_gate_and_is_promoted(harness: Harness) -> None:
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() != "Progressing")
    assert harness.phase() == "Promoted"
    shadow = next(t for t in harness.rollout.history if t.from_stage == "shadow" and t.to_stage == "canary")
    workload = next(g for g in shadow.gates if g.name == "candidate-workload")
    assert workload.status.value == "Successful" and workload.candidate_value == 0


def test_a_start_the_registry_fails_is_recorded_as_failed_and_the_revert_behind_it_runs(harness: Harness) -> None:
    """Issue 12, point 6: the retraining hand-off's start during a registry outage must not block a queued revert."""
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    harness.registry.down = True
    start = harness.command("start", candidate=V1, id="during-outage")
    revert = harness.command("revert", id="revert-after-it", reason="the on-call reverts")
    harness.tick(n=3)

    failed = harness.controller.state.result_of(start.id)
    assert failed is not None and failed.outcome == "failed"
    assert "registry failed" in failed.detail and "registry unreachable" in failed.detail
    assert outcome_of(harness, revert.id) == "applied"
    assert harness.phase() == "RolledBack" and harness.rollout.rollout_id == "r1"
    assert published(harness.world)[-1] == ("stable", V1, None, 0, ())
    notes = [e for e in read_events(harness.state_dir / EVENTS_FILE) if e.get("kind") == "note"]
    assert any("command start failed: the model registry failed" in str(e.get("reason")) for e in notes)
    assert harness.sample("fraudwatch_rollout_commands_total", kind="start", outcome="failed") == 1


def test_the_previous_version_is_stopped_only_once_no_router_holds_a_table_naming_it(harness: Harness) -> None:
    """Issue 12, point 3: stopping v1 while a router still shadowed it failed every shadow call until its table
    changed (1,506 of them after one promotion)."""
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    harness.router.lagging = harness.router.table  # a router still holds the table with v1 in shadow
    harness.tick(seconds=POLICY.promotion.warm_window_s + 1)
    harness.tick()
    assert published(harness.world)[-1] == ("stable", V2, None, 0, ())  # the table without v1 is published …
    assert ("stop", V1) not in harness.world.effects and V1 in harness.workloads.running()  # … v1 kept meanwhile
    harness.router.lagging = None  # the router catches up
    harness.tick()
    assert ("stop", V1) in harness.world.effects


def test_a_stage_s_minimum_duration_counts_from_when_its_routing_was_in_force(harness: Harness) -> None:
    """Issue 12, point 7: a shadow stage ran 12.5 s under its 20 s minimum, its clock started before the candidate
    was ready to be shadowed."""
    harness.workloads.ready_after = 8  # the candidate needs 8 reconciles (8 s here) before it can be shadowed …
    harness.workloads.probes[V1] = 100  # … the champion serves already
    start_rollout(harness)
    assert harness.rollout.stage == "shadow" and harness.rollout.routed_at is None
    harness.run_until(lambda: harness.rollout.routed_at is not None)
    routed = harness.rollout.routed_at
    assert published(harness.world)[-1] == ("shadow", V1, V2, 0, ())  # the shadow table, once v2 was ready
    entered = harness.rollout.stage_entered_at
    assert (routed - entered).total_seconds() >= 7
    harness.run_until(lambda: harness.rollout.stage != "shadow")
    left = harness.rollout.history[-1]
    assert left.from_stage == "shadow" and left.to_stage == "canary"
    assert (left.at - routed).total_seconds() >= POLICY.stages.shadow.min_duration_s  # not from `entered`
    assert harness.rollout.routed_at is not None and harness.rollout.routed_at >= left.at  # canary's own clock


@dataclass
class RecordingMetrics(DictMetrics):
    """DictMetrics that remembers every query it was asked, in order."""

    asked: list[str] = field(default_factory=list)

    def query(self, promql: str) -> float | None:
        self.asked.append(promql)
        return super().query(promql)


def test_the_stage_window_of_the_queries_starts_when_the_stage_s_routing_was_in_force(tmp_path: Path) -> None:
    """Issue 12, point 7: ``{{stage_window}}`` covered the time before the stage's routing took effect (the
    candidate not yet shadowed), so a stage's counts included calls made under the previous table."""
    errors = 'errors{model_version="{{version}}"}'
    windowed = POLICY_YAML.replace(errors, errors + "[{{stage_window}}]")
    policy = pol.policy_from_mapping(yaml.safe_load(windowed))
    harness = Harness(tmp_path / "state", policy=policy, metrics_values=RecordingMetrics())
    harness.workloads.ready_after = 8  # the candidate needs 8 reconciles (8 s) before it can be shadowed
    harness.workloads.probes[V1] = 100
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.routed_at is not None)
    recorder = harness.metrics_values
    assert isinstance(recorder, RecordingMetrics)
    harness.run_until(lambda: any("errors{" in q for q in recorder.asked))
    routed, entered = harness.rollout.routed_at, harness.rollout.stage_entered_at
    first = next(q for q in recorder.asked if q.startswith('errors{model_version="v2"}'))
    window_s = float(first.rsplit("[", 1)[1].removesuffix("s]"))
    assert (routed - entered).total_seconds() >= 7
    assert window_s == pytest.approx((harness.clock.now - routed).total_seconds(), abs=1)  # not since `entered`


def test_every_measurement_is_logged_when_it_starts_and_when_it_ends_with_its_duration(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fraudwatch")
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "Promoted")
    fields = [getattr(r, LOG_FIELDS_ATTR) for r in caplog.records if hasattr(r, LOG_FIELDS_ATTR)]
    started = [f for f in fields if f.get("event") == "analysis_started"]
    finished = [f for f in fields if f.get("event") == "analysis_finished"]
    assert [f["stage"] for f in started][:2] == ["quality", "shadow"]
    assert len(finished) == len(started)  # each measurement ends, once
    assert all(f["duration_s"] >= 0 and f["failed"] == [] for f in finished)
    assert {f["stage"] for f in finished} >= {"quality", "shadow", "canary", "ab", "full"}
