"""The controller's durable state as data: the current rollout, finished rollouts, command results and the running
versions' workloads, one schema-versioned JSON document.

Where it is kept is a backend's :class:`~rollout.backends.base.StateStorage`: ``state.json`` locally
(:mod:`rollout.backends.local.state`), ``status.state`` of the ModelRollout on Kubernetes. A document with another
``schema_version`` is refused (:class:`StateError`), never guessed at.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from rollout.core.commands import CommandResult, InboxCommand
from rollout.core.machine import CommandKind, ManualCommand, Phase, RolloutState
from rollout.core.workloads import Readiness, WorkloadStatus

SCHEMA_VERSION: Final[int] = 1


class StateError(RuntimeError):
    """The state file cannot be used (unknown schema version, invalid content)."""


def manual_command(command: InboxCommand) -> ManualCommand:
    """The stage machine's command for an inbox command (not for ``start``, the controller's own)."""
    if command.kind == "start" or command.kind == "retry":
        raise ValueError(f"{command.kind} is the controller's command, not the stage machine's")
    kind: CommandKind = command.kind
    return ManualCommand(id=command.id, kind=kind, to=command.to, reason=command.reason)


class RolloutSummary(BaseModel):
    """A finished rollout, kept after the next one starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rollout_id: str
    stable: str
    candidate: str
    phase: Phase
    started_at: AwareDatetime
    finished_at: AwareDatetime | None


class Revision(BaseModel):
    """A version that served 100 % of decisions, numbered in the order it began to (``rolloutctl undo
    --to-revision N``): the stable a first rollout began from, each promoted candidate, and the version a revert
    put back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    number: int = Field(..., ge=1)
    version: str
    #: When it began serving (None: it served before the controller's first rollout).
    since: AwareDatetime | None = None
    #: The rollout that made it the serving version (None for the first one).
    rollout_id: str | None = None
    #: The digest of the model bundle it was deployed with (the registry's ``bundle_sha256``, SHA-256 hex), so two
    #: revisions of one version name can be told apart; None when the backend knows none (no registry).
    digest: str | None = Field(None, max_length=128)


def serving_version(rollout: RolloutState) -> str:
    """The version that decides for 100 % once ``rollout`` has finished, or while it runs (its stable)."""
    return rollout.candidate if rollout.phase == "Promoted" else rollout.stable


def _no_digest(_version: str) -> str | None:
    return None


def record_revision(
    revisions: tuple[Revision, ...],
    rollout: RolloutState,
    keep: int,
    digest_of: Callable[[str], str | None] = _no_digest,
) -> tuple[Revision, ...]:
    """``revisions`` with the version ``rollout`` leaves serving appended when it differs from the last one (the
    newest ``keep`` kept; numbers keep growing), with its bundle's digest from ``digest_of`` (asked only for an
    added revision). Pure and idempotent."""
    version = serving_version(rollout)
    if revisions and revisions[-1].version == version:
        return revisions
    if not revisions:
        first = Revision(number=1, version=rollout.stable, digest=digest_of(rollout.stable))
        return record_revision((first,), rollout, keep, digest_of)
    changed_at = rollout.finished_at if rollout.phase != "Progressing" else None
    added = Revision(number=revisions[-1].number + 1, version=version, since=changed_at,
                     rollout_id=rollout.rollout_id, digest=digest_of(version))  # fmt: skip
    return (*revisions, added)[-keep:]


class WorkloadView(BaseModel):
    """A running version's workload as the controller last saw it (``rolloutctl status`` shows it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    readiness: Readiness
    #: Restarts after a failure as the backend counts them (locally since the controller started; Kubernetes: the
    #: pods' container restarts).
    restarts: int = 0
    detail: str = ""
    url: str | None = None

    @classmethod
    def of(cls, status: WorkloadStatus) -> WorkloadView:
        return cls(version=status.version, readiness=status.readiness, restarts=status.restarts, detail=status.detail,
                   url=status.url)  # fmt: skip


def workload_views(statuses: Mapping[str, WorkloadStatus]) -> tuple[WorkloadView, ...]:
    """The statuses as saved: one view per version, in version order."""
    return tuple(WorkloadView.of(statuses[v]) for v in sorted(statuses))


class ControllerState(BaseModel):
    """Everything the controller must remember across a restart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str
    rollout: RolloutState | None = None
    #: When the current rollout began (the machine keeps only the current stage's start).
    rollout_started_at: AwareDatetime | None = None
    past: tuple[RolloutSummary, ...] = ()
    command_results: tuple[CommandResult, ...] = ()
    #: Every running version's workload (readiness, restarts) after the last act pass.
    workloads: tuple[WorkloadView, ...] = ()
    #: The versions that served, newest last (bounded: ``ControllerSettings.kept_revisions``).
    revisions: tuple[Revision, ...] = ()

    def result_of(self, command_id: str) -> CommandResult | None:
        return next((r for r in self.command_results if r.id == command_id), None)

    def with_result(self, result: CommandResult, keep: int) -> ControllerState:
        kept = (*self.command_results, result)[-keep:]
        return self.model_copy(update={"command_results": kept})

    def summary(self) -> RolloutSummary | None:
        """The current rollout as a summary (for ``past`` when the next one starts)."""
        rollout = self.rollout
        if rollout is None:
            return None
        return RolloutSummary(
            rollout_id=rollout.rollout_id,
            stable=rollout.stable,
            candidate=rollout.candidate,
            phase=rollout.phase,
            started_at=self.rollout_started_at or rollout.stage_entered_at,
            finished_at=rollout.finished_at,
        )


def dumps_state(state: ControllerState) -> str:
    return state.model_dump_json(indent=2)


def loads_state(text: str) -> ControllerState:
    """Parse a state file, refusing schema versions this code does not know."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"state file is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise StateError("state file must hold a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StateError(f"state schema version {version!r} is not supported (this controller reads {SCHEMA_VERSION})")
    try:
        return ControllerState.model_validate(raw)
    except ValidationError as exc:
        raise StateError(f"invalid state file: {exc}") from exc
