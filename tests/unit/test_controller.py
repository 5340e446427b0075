"""rollout.controller.loop: the reconcile loop against an in-memory world.

Test doubles (pure logic, on purpose: these tests are about the loop's bookkeeping, not about processes): an
in-memory backend (workloads that become ready after a number of probes, a router that holds one table, a registry
of aliases, a regression-set check returning fixed metrics), a metrics provider made of a dict from rendered PromQL
to values, and a settable clock. Everything else is real: the stage machine, the analysis, the state file, the
inbox, the event log and the Prometheus metrics. The real backends run in tests/integration/test_rollout_local.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from rollout.backends.base import Backend, PublishedTable, PublishResult, RoutingSpec, VersionNotFoundError
from rollout.backends.local.events import read_events
from rollout.backends.local.inbox import EVENTS_FILE, STATE_FILE, CommandInbox
from rollout.backends.local.state import StateStore
from rollout.controller.loop import Controller
from rollout.controller.metrics import ControllerMetrics
from rollout.controller.runners import InlineRunner
from rollout.core import policy as pol
from rollout.core.commands import InboxCommand
from rollout.core.state import SCHEMA_VERSION, StateError, loads_state
from rollout.core.workloads import Readiness, WorkloadStatus
from rollout.settings import ControllerSettings

T0 = datetime(2025, 5, 1, 9, 0, tzinfo=UTC)
V1, V2 = "v1", "v2"

POLICY_YAML = """
stages:
  shadow: {min_duration_s: 10, min_requests: 10}
  canary: {weight: 5, min_duration_s: 10}
  ab: {min_duration_s: 10}
  full: {min_duration_s: 10}
analysis: {interval_s: 5, consecutive_error_limit: 2, inconclusive_timeout_s: 60, labels_timeout_s: 600}
promotion: {alias: champion, warm_window_s: 60, scale_down_delay_s: 30}
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
  - name: recall
    layer: outcome
    stages: [ab, full]
    labels_query: labels{model_version="{{version}}"}
    min_labels: 5
    estimator:
      method: wilson
      successes: tp{model_version="{{version}}"}
      trials: pos{model_version="{{version}}"}
    condition: candidate - stable >= -0.2
"""
POLICY = pol.policy_from_mapping(yaml.safe_load(POLICY_YAML))
SETTINGS = ControllerSettings(name="unit")

GOOD: dict[str, float] = {
    'requests{model_version="v2"}': 100.0,
    'errors{model_version="v1"}': 0.0,
    'errors{model_version="v2"}': 0.0,
    'labels{model_version="v1"}': 1000.0,
    'labels{model_version="v2"}': 1000.0,
    'tp{model_version="v1"}': 900.0,
    'pos{model_version="v1"}': 1000.0,
    'tp{model_version="v2"}': 890.0,
    'pos{model_version="v2"}': 1000.0,
}


class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing in the controller catches it."""


@dataclass
class World:
    """The in-memory world: every effect that changed something, in order; ``crash_at`` kills at that effect."""

    effects: list[tuple[Any, ...]] = field(default_factory=list)
    crash_at: int | None = None

    def effect(self, *what: Any) -> None:
        if self.crash_at is not None and len(self.effects) == self.crash_at:
            self.crash_at = None
            raise Crash(what)
        self.effects.append(what)


@dataclass
class MemoryWorkloads:
    """A version is ready on the ``ready_after``-th ensure after its start."""

    world: World
    ready_after: int = 1
    probes: dict[str, int] = field(default_factory=dict)
    #: Versions that crash on every start (each ensure finds the last start dead and counts a restart).
    crashing: set[str] = field(default_factory=set)
    restarts: dict[str, int] = field(default_factory=dict)

    def url(self, version: str) -> str:
        return f"http://127.0.0.1:{9000 + int(version.removeprefix('v'))}"

    def ensure_running(self, version: str) -> WorkloadStatus:
        if version in self.crashing:
            self.restarts[version] = self.restarts.get(version, 0) + int(version in self.probes)
            self.probes[version] = 0
            return WorkloadStatus(version, Readiness.FAILED, detail="process exited", restarts=self.restarts[version])
        if version not in self.probes:
            self.world.effect("start", version)
            self.probes[version] = 0
        else:
            self.probes[version] += 1
        return self.status(version)

    def status(self, version: str) -> WorkloadStatus:
        if version not in self.probes:
            return WorkloadStatus(version, Readiness.STOPPED)
        if version in self.crashing:
            return WorkloadStatus(version, Readiness.FAILED, detail="process exited", restarts=self.restarts[version])
        ready = self.probes[version] >= self.ready_after
        return WorkloadStatus(version, Readiness.READY if ready else Readiness.STARTING, self.url(version))

    def scale_down(self, version: str) -> bool:
        if version not in self.probes:
            return False
        self.world.effect("stop", version)
        del self.probes[version]
        return True

    def running(self) -> tuple[str, ...]:
        return tuple(self.probes)


@dataclass
class MemoryRouter:
    world: World
    table: tuple[RoutingSpec, tuple[tuple[str, str], ...]] | None = None
    generation: int = 0
    #: A second router that still holds this older table (it has not applied the latest one yet).
    lagging: tuple[RoutingSpec, tuple[tuple[str, str], ...]] | None = None

    def publish(self, spec: RoutingSpec, urls: Mapping[str, str]) -> PublishResult:
        wanted = (spec, tuple(sorted(urls.items())))
        if wanted == self.table:
            return PublishResult("unchanged", self.generation)
        self.world.effect("publish", spec.stage, spec.stable, spec.candidate, spec.candidate_weight, spec.shadow)
        self.table = wanted
        self.generation += 1
        return PublishResult("applied", self.generation)

    def read(self) -> Sequence[PublishedTable]:
        held = self.lagging if self.lagging is not None else self.table
        if held is None:
            return [PublishedTable("memory", None, 0)]
        return [PublishedTable("memory", held[0], self.generation, dict(held[1]))]


@dataclass
class MemoryRegistry:
    world: World
    versions: tuple[str, ...] = (V1, V2)
    aliases: dict[str, str] = field(default_factory=lambda: {"champion": V1})
    #: The registry is down: every resolve raises (not "version not found": an outage).
    down: bool = False

    def resolve(self, ref: str) -> str:
        if self.down:
            raise ConnectionError("registry unreachable")
        if ref in self.aliases:
            return self.aliases[ref]
        if ref in self.versions:
            return ref
        raise VersionNotFoundError(ref)

    def alias_target(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    def fetch(self, version: str, dest: Path) -> Path:
        return dest

    def bundle_digest(self, version: str) -> str | None:
        return None

    def ensure_alias(self, alias: str, version: str, reason: str) -> bool:
        if self.aliases.get(alias) == version:
            return False
        self.world.effect("alias", alias, version)
        self.aliases[alias] = version
        return True

    def clear_alias(self, alias: str, version: str, reason: str) -> bool:
        if self.aliases.get(alias) != version:
            return False
        self.world.effect("unalias", alias, version)
        del self.aliases[alias]
        return True


@dataclass
class FixedQuality:
    metrics: dict[str, dict[str, float]] = field(default_factory=lambda: {V2: {"pr_auc": 0.9}})

    def evaluate(self, version: str) -> Mapping[str, float]:
        return self.metrics[version]


@dataclass
class DictMetrics:
    """Rendered PromQL → value; a missing key is no data; ``online=False`` is Prometheus down, ``broken`` raises."""

    values: dict[str, float] = field(default_factory=lambda: dict(GOOD))
    online: bool = True
    broken: bool = False

    def query(self, promql: str) -> float | None:
        if self.broken:
            raise ConnectionError("refused")
        return self.values.get(promql)

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]:
        raise NotImplementedError(promql)

    def is_online(self) -> bool:
        return self.online


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Harness:
    state_dir: Path
    world: World = field(default_factory=World)
    clock: Clock = field(default_factory=Clock)
    metrics_values: DictMetrics = field(default_factory=DictMetrics)
    quality: FixedQuality = field(default_factory=FixedQuality)
    workloads: MemoryWorkloads = field(init=False)
    router: MemoryRouter = field(init=False)
    registry: MemoryRegistry = field(init=False)
    prom: CollectorRegistry = field(default_factory=CollectorRegistry)
    policy: pol.RolloutPolicy = POLICY
    controller: Controller = field(init=False)

    def __post_init__(self) -> None:
        self.workloads = MemoryWorkloads(self.world)
        self.router = MemoryRouter(self.world)
        self.registry = MemoryRegistry(self.world)
        self.controller = self.new_controller()

    def new_controller(self) -> Controller:
        """A fresh controller process on the same state directory and the same world (a restart)."""
        self.prom = CollectorRegistry()
        backend = Backend(self.workloads, self.router, self.metrics_values, self.registry, self.quality)
        return Controller(
            settings=SETTINGS,
            policy=self.policy,
            backend=backend,
            state_dir=self.state_dir,
            metrics=ControllerMetrics(self.prom, SETTINGS.name, SETTINGS.reconcile_duration_buckets_s),
            clock=self.clock,
            runner=InlineRunner(),
        )

    def command(self, kind: str, **fields: Any) -> InboxCommand:
        command = InboxCommand.model_validate(
            {"id": fields.pop("id", f"{kind}-{len(self.world.effects)}-{self.clock.now.timestamp():.0f}"), "kind": kind,
             "issued_at": self.clock.now, **fields}
        )  # fmt: skip
        CommandInbox(self.state_dir).submit(command)
        return command

    def tick(self, seconds: float = 1.0, n: int = 1) -> None:
        for _ in range(n):
            self.clock.advance(seconds)
            self.controller.reconcile()

    def run_until(self, predicate: Any, limit: int = 400) -> int:
        for i in range(limit):
            if predicate():
                return i
            self.tick()
        raise AssertionError("condition not reached")

    @property
    def rollout(self) -> Any:
        return self.controller.state.rollout

    def phase(self) -> str | None:
        return self.rollout.phase if self.rollout is not None else None

    def sample(self, name: str, **labels: str) -> float | None:
        return self.prom.get_sample_value(name, {"rollout": SETTINGS.name, **labels})


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "state")


def start_rollout(h: Harness) -> None:
    h.tick(n=2)  # baseline: the champion starts, becomes ready, is routed
    h.command("start", candidate=V2, id="r1")
    h.tick()


def outcome_of(h: Harness, command_id: str) -> str | None:
    result = h.controller.state.result_of(command_id)
    return result.outcome if result is not None else None


def published(world: World) -> list[tuple[Any, ...]]:
    return [e[1:] for e in world.effects if e[0] == "publish"]


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
