"""Operator commands and what the controller did with them: the vocabulary of ``rolloutctl``, the local inbox and
``spec.manualCommand`` alike (pydantic only, so ``rolloutctl`` starts in a fraction of a second)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

#: Commands of the controller itself (``start``) and of the stage machine (the rest).
InboxKind = Literal["start", "promote", "pause", "resume", "abort", "revert"]


#: applied; ignored (it does not apply now: a rollout in progress, an unknown version); failed (the controller could
#: not carry it out: the registry failed) — in every case the command is done and the next one runs.
CommandOutcome = Literal["applied", "ignored", "failed"]


#: The stages a ``promote`` may skip to (the machine's traffic stages).
PromoteTarget = Literal["shadow", "canary", "ab", "full"]


class InboxCommand(BaseModel):
    """One operator command as ``rolloutctl`` writes it; ``id`` makes it idempotent (applied once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    kind: InboxKind
    issued_at: AwareDatetime
    issued_by: str = ""
    reason: str = ""
    #: ``start``: the candidate (a version name, registry version number or alias) and optionally the stable.
    candidate: str | None = None
    stable: str | None = None
    #: ``promote``: the stage to skip to.
    to: PromoteTarget | None = None

    @model_validator(mode="after")
    def _fields_match_kind(self) -> InboxCommand:
        if (self.kind == "start") != (self.candidate is not None):
            raise ValueError("a start command (and only a start command) names a candidate")
        if self.stable is not None and self.kind != "start":
            raise ValueError("only a start command names a stable version")
        if self.to is not None and self.kind != "promote":
            raise ValueError("only a promote command takes a target stage")
        return self


def new_command_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


class CommandResult(BaseModel):
    """What the controller did with a command (``rolloutctl`` waits for this)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    kind: InboxKind
    outcome: CommandOutcome
    detail: str = ""
    at: AwareDatetime
    rollout_id: str | None = None
    #: When the routers first held the routing the command led to (applied commands only).
    in_force_at: AwareDatetime | None = None
