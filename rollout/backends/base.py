"""Every port of the rollout controller: the narrow interfaces between its loop and the world it acts on.

The controller decides with :mod:`rollout.core.machine` and acts and remembers only through these protocols:

* :class:`Workloads` — make a model version run and report whether it is ready; stop it;
* :class:`RoutingPublisher` — publish ``{stable, candidate, stage, weight, shadow}`` to every router and read it back;
* :class:`MetricsProvider` — PromQL in, a number (or nothing) out; is the metrics store online;
* :class:`ModelSource` — the model registry seen from delivery: version names, bundles, aliases (never training);
* :class:`QualityCheck` — the pre-rollout regression-set metrics of a version;
* :class:`StateStorage`, :class:`CommandSource`, :class:`EventSink` — where the controller's state, its operator
  commands and its events live.

Every method is level-triggered: it makes the world match the argument and may be called again with the same
argument at no cost (a second ``ensure_running`` of a running version starts nothing; a second ``publish`` of the
table the routers hold changes nothing). Implementations: :mod:`rollout.backends.local` (child processes on
loopback, files in the state directory), :mod:`rollout.backends.podman` (model-server containers),
:mod:`rollout.backends.kube` (Deployments + Services owned by a ModelRollout, its status and spec, Kubernetes
Events), :mod:`rollout.backends.prometheus`, :mod:`rollout.backends.registry` (MLflow through
:mod:`service.artifacts.registry`) and the in-memory doubles of the tests (tests/kits).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from rollout.core.commands import InboxCommand
from rollout.core.machine import (
    RolloutState,
    Transition,
)
from rollout.core.routing import Stage
from rollout.core.state import ControllerState
from rollout.core.workloads import WorkloadStatus


class Workloads(Protocol):
    """Model-version workloads (processes locally, Deployments on Kubernetes)."""

    def ensure_running(self, version: str) -> WorkloadStatus:
        """Start the version if it does not run (without waiting for it); report its readiness."""
        ...

    def scale_down(self, version: str) -> bool:
        """Stop the version's workload; True when something was stopped."""
        ...

    def status(self, version: str) -> WorkloadStatus:
        """The version's readiness without changing anything."""
        ...

    def running(self) -> tuple[str, ...]:
        """Every version that has a workload (ready or not)."""
        ...


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """What the controller wants the routers to do (versions only; the publisher adds URLs and the generation)."""

    stage: Stage
    stable: str
    candidate: str | None
    candidate_weight: int
    shadow: tuple[str, ...] = ()

    def versions(self) -> tuple[str, ...]:
        """Every version the table names, stable first."""
        named = (self.stable, *((self.candidate,) if self.candidate else ()), *self.shadow)
        return tuple(dict.fromkeys(named))


PublishOutcome = Literal["applied", "unchanged"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What one publication did at each router (``url → applied | unchanged``) and the generation in force."""

    outcome: PublishOutcome
    generation: int
    routers: Mapping[str, PublishOutcome] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PublishedTable:
    """A router's current table read back: the spec it encodes, its generation and endpoint URLs."""

    router: str
    spec: RoutingSpec | None
    generation: int
    urls: Mapping[str, str] = field(default_factory=dict)


class RoutingError(RuntimeError):
    """A router could not be reached or refused the table."""


class RoutingPublisher(Protocol):
    """The routers' routing table."""

    def publish(self, spec: RoutingSpec, urls: Mapping[str, str]) -> PublishResult:
        """Make every router hold ``spec`` with these endpoint URLs (``version → base URL``); raise
        :class:`RoutingError` when a router cannot be brought there."""
        ...

    def read(self) -> Sequence[PublishedTable]:
        """Every router's current table."""
        ...


class MetricsProvider(Protocol):
    """The metrics store the gates are measured in (Prometheus)."""

    def query(self, promql: str) -> float | None: ...

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]: ...

    def is_online(self) -> bool: ...


class VersionNotFoundError(LookupError):
    """The registry has no such version, number or alias."""


class ModelSource(Protocol):
    """The model registry as delivery sees it: version names, verified bundles, aliases with an audit trail."""

    def resolve(self, ref: str) -> str:
        """The version name (as the model reports it, e.g. ``v3``) of a version name, a registry version number or
        an alias; :class:`VersionNotFoundError` when there is none."""
        ...

    def alias_target(self, alias: str) -> str | None:
        """The version name an alias points at, or None."""
        ...

    def fetch(self, version: str, dest: Path) -> Path:
        """The version's verified bundle in ``dest`` (downloaded when not there yet); returns the directory."""
        ...

    def bundle_digest(self, version: str) -> str | None:
        """The registry's digest over every file of the version's bundle (``bundle_sha256``): a model server started
        on the fetched directory checks it again before it parses anything. None when the source records none."""
        ...

    def ensure_alias(self, alias: str, version: str, reason: str) -> bool:
        """Point ``alias`` at ``version`` (audited); True when it moved, False when it already pointed there."""
        ...

    def clear_alias(self, alias: str, version: str, reason: str) -> bool:
        """Remove ``alias`` if it points at ``version`` (audited); True when it was removed."""
        ...


class QualityCheck(Protocol):
    """The pre-rollout quality stage: a version scored on the frozen labelled regression set."""

    def evaluate(self, version: str) -> Mapping[str, float]:
        """Metric name → value (``pr_auc``, ``recall``, …) of ``version`` on the regression set."""
        ...


class RegistryUnavailableError(RuntimeError):
    """The MLflow registry backend was asked for but the model stack is not installed."""


#: What rollout.backends.registry imports (the quality stage scores bundles): pyproject's [train] extra.
REGISTRY_STACK: tuple[str, ...] = ("mlflow", "pandas", "xgboost", "sklearn")


def require_registry_stack() -> None:
    """Refuse, naming what is missing, when the registry backend cannot be imported here (the controller image
    carries no model stack: a registry-backed controller runs from the retraining image)."""
    missing = [module for module in REGISTRY_STACK if importlib.util.find_spec(module) is None]
    if missing:
        raise RegistryUnavailableError(
            f"the MLflow registry (aliases, the quality stage) needs fraudwatch[train]; missing here: "
            f"{', '.join(missing)} — run the controller from the retraining image (scripts/images.sh retraining)"
        )


@dataclass
class Backend:
    """What the controller acts on and measures with."""

    workloads: Workloads
    publisher: RoutingPublisher
    metrics: MetricsProvider
    source: ModelSource
    quality: QualityCheck


class StateStorage(Protocol):
    """The controller's durable state (``state.json`` locally, the ModelRollout's status on Kubernetes)."""

    def load(self) -> ControllerState | None: ...

    def save(self, state: ControllerState, /) -> None:
        """Make ``state`` durable before anything is acted upon; raise ``OSError`` when it could not be saved."""
        ...


class CommandSource(Protocol):
    """Operator commands, each applied once per id (an inbox of files locally, ``spec`` on Kubernetes).

    ``pending`` yields ``(handle, command)`` in the order they must be applied (``command`` is the error text of
    an unreadable one); ``done(handle)`` is called once the command's result is saved."""

    def pending(self) -> Sequence[tuple[Any, InboxCommand | str]]: ...

    def done(self, handle: Any, /) -> None: ...

    def has_pending(self) -> bool:
        """Something to react to right now (the loop reconciles at once instead of waiting for its interval)."""
        ...


class EventSink(Protocol):
    """Where transitions (exactly once, derived from the saved state) and notes are recorded."""

    def sync(self, rollout: RolloutState, /) -> list[Transition]:
        """Record the rollout's transitions not recorded yet; return them."""
        ...

    def note(self, at: datetime, rollout_id: str | None, reason: str, **fields: object) -> None: ...
