"""The controller's command inbox, its command results and its liveness record — light enough for ``rolloutctl``.

This module imports pydantic and nothing of the analysis stack (no numpy/scipy), so ``rolloutctl revert`` starts,
queues its command and sees it applied within a fraction of a second. :mod:`rollout.core.state` builds the full state
file on top of it.

* ``inbox/<issued>-<id>.json`` — one operator command per file, written atomically by ``rolloutctl``, consumed in
  issue order by the controller and removed once its result is saved;
* ``state.json`` ``command_results`` — what the controller did with each command (applied / ignored, why);
* ``controller.json`` — the running controller's pid, metrics URL and heartbeat.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from pathlib import Path
from typing import Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from rollout.core.commands import CommandResult, InboxCommand
from service.common.files import write_atomically

STATE_FILE: Final[str] = "state.json"
EVENTS_FILE: Final[str] = "events.jsonl"
INBOX_DIR: Final[str] = "inbox"
HEARTBEAT_FILE: Final[str] = "controller.json"
_COMMAND_SUFFIX: Final[str] = ".json"


# --------------------------------------------------------------------------------------------------- commands


def read_command_result(state_dir: Path, command_id: str) -> CommandResult | None:
    """The controller's result for ``command_id`` from ``state.json`` (read raw: no stage-machine import)."""
    try:
        raw = json.loads((state_dir / STATE_FILE).read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    results = raw.get("command_results", []) if isinstance(raw, dict) else []
    for item in reversed(results):
        if isinstance(item, dict) and item.get("id") == command_id:
            try:
                return CommandResult.model_validate(item)
            except ValidationError:
                return None
    return None


class CommandInbox:
    """Operator commands as files ``inbox/<issued>-<id>.json``; processed in issue order, removed when done."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / INBOX_DIR

    def submit(self, command: InboxCommand) -> Path:
        stamp = command.issued_at.strftime("%Y%m%dT%H%M%S%f")
        path = self.directory / f"{stamp}-{command.id}{_COMMAND_SUFFIX}"
        write_atomically(path, command.model_dump_json())
        return path

    def _names(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.suffix == _COMMAND_SUFFIX and p.name[0] != ".")
        except FileNotFoundError:
            return []

    def pending(self) -> list[tuple[Path, InboxCommand | str]]:
        """Queued commands in issue order; an unreadable file yields its error text instead of a command."""
        queued: list[tuple[Path, InboxCommand | str]] = []
        for path in self._names():
            try:
                queued.append((path, InboxCommand.model_validate_json(path.read_bytes())))
            except FileNotFoundError:
                continue
            except (OSError, ValidationError) as exc:
                queued.append((path, f"{type(exc).__name__}: {exc}"))
        return queued

    def has_pending(self) -> bool:
        return bool(self._names())

    def withdraw(self, command_id: str) -> bool:
        """Remove a command that is still queued; True when it was."""
        for path in self._names():
            if path.stem.endswith(f"-{command_id}"):
                self.done(path)
                return True
        return False

    def done(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------------------------------- heartbeat


class Heartbeat(BaseModel):
    """The running controller: who, where its metrics are, when it last looked at the world."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    name: str
    backend: str
    started_at: AwareDatetime
    heartbeat_at: AwareDatetime
    metrics_url: str | None = None
    #: On Kubernetes: the leading replica (the Lease holder); its renewals are the heartbeat.
    identity: str | None = None


def write_heartbeat(state_dir: Path, heartbeat: Heartbeat) -> None:
    write_atomically(state_dir / HEARTBEAT_FILE, heartbeat.model_dump_json())


def read_heartbeat(state_dir: Path) -> Heartbeat | None:
    try:
        return Heartbeat.model_validate_json((state_dir / HEARTBEAT_FILE).read_bytes())
    except (FileNotFoundError, ValidationError):
        return None


def heartbeat_age_s(heartbeat: Heartbeat, now: datetime) -> float:
    return max(0.0, (now - heartbeat.heartbeat_at).total_seconds())
