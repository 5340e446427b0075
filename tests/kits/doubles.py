"""In-memory doubles of the controller's world, for tests about the loop's bookkeeping (not about processes):
workloads that become ready after a number of probes, a router that holds one table, a registry of aliases, a
regression-set check returning fixed metrics, a metrics provider made of a dict from rendered PromQL to values, a
settable clock — and :class:`Harness`, the real controller (stage machine, analysis, state file, inbox, event log,
Prometheus metrics) on them. The real backends run in tests/integration/test_rollout_local.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from rollout.backends.base import Backend, PublishedTable, PublishResult, RoutingSpec, VersionNotFoundError
from rollout.backends.local.inbox import CommandInbox
from rollout.controller.loop import Controller
from rollout.controller.metrics import ControllerMetrics
from rollout.controller.runners import InlineRunner
from rollout.core import policy as pol
from rollout.core.commands import InboxCommand
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
    #: Each version's bundle digest (none by default); a version re-registered with another bundle changes it.
    digests: dict[str, str] = field(default_factory=dict)

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
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.digests.get(version)

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


def start_rollout(h: Harness) -> None:
    h.tick(n=2)  # baseline: the champion starts, becomes ready, is routed
    h.command("start", candidate=V2, id="r1")
    h.tick()


def outcome_of(h: Harness, command_id: str) -> str | None:
    result = h.controller.state.result_of(command_id)
    return result.outcome if result is not None else None


def published(world: World) -> list[tuple[Any, ...]]:
    return [e[1:] for e in world.effects if e[0] == "publish"]
