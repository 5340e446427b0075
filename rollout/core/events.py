"""The rollout event log: every transition (with its reason and the gate values behind it) exactly once.

``events.jsonl`` beside the state file is append-only, one JSON object per line. Transitions are not written when
they happen but *derived from the persisted state*: after each save the log is brought level with the rollout's
``history`` (``seq`` = the transition's index), and on start-up the log is scanned for the last ``seq`` of each
rollout. So a controller killed between saving its state and appending the line appends it after the restart
(never lost), and one killed after appending does not append it again (never doubled). A torn last line (killed
mid-write) is skipped when reading and written again.

Notes (a command that was ignored, a rollout that started) are appended as they happen.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from rollout.core.analysis import GateResult
from rollout.core.machine import RolloutState, Transition
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

EventKind = Literal["transition", "note"]
#: Short, bounded reason codes (metric labels); the free-text reason stays in the event.
ReasonCode = Literal[
    "gates_passed",
    "gate_failed",
    "measurement_errors",
    "inconclusive_timeout",
    "manual_promote",
    "manual_pause",
    "manual_resume",
    "manual_abort",
    "manual_revert",
    "superseded",
    "other",
]
_MANUAL_PREFIX: Final[str] = "manual "
#: Ids of the aborts a backend issues because the desired candidate changed under a running rollout (on Kubernetes:
#: a new ``spec.candidate``); their transitions have the reason code ``superseded``.
SUPERSEDE_PREFIX: Final[str] = "supersede-"


def reason_code(transition: Transition) -> ReasonCode:
    """The transition's reason as one of a few codes (for metric labels and filtering)."""
    if transition.trigger == "command":
        if (transition.command_id or "").startswith(SUPERSEDE_PREFIX):
            return "superseded"
        kind = transition.reason.removeprefix(_MANUAL_PREFIX).split(":", 1)[0].strip()
        codes: dict[str, ReasonCode] = {
            "promote": "manual_promote",
            "pause": "manual_pause",
            "resume": "manual_resume",
            "abort": "manual_abort",
            "revert": "manual_revert",
        }
        return codes.get(kind, "other")
    if transition.trigger == "timeout":
        return "inconclusive_timeout"
    if transition.to_phase == "RolledBack":
        return "gate_failed"
    if transition.to_phase == "Aborted":
        return "measurement_errors"
    return "gates_passed"


def gate_record(result: GateResult) -> dict[str, Any]:
    """The numbers of one gate result worth keeping in the log."""
    record = result.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    record["name"], record["status"] = result.name, result.status.value
    return record


def transition_event(rollout: RolloutState, seq: int, transition: Transition) -> dict[str, Any]:
    return {
        "kind": "transition",
        "at": transition.at.isoformat(),
        "rollout_id": rollout.rollout_id,
        "seq": seq,
        "stable": rollout.stable,
        "candidate": rollout.candidate,
        "trigger": transition.trigger,
        "reason_code": reason_code(transition),
        "reason": transition.reason,
        "from_phase": transition.from_phase,
        "to_phase": transition.to_phase,
        "from_stage": transition.from_stage,
        "to_stage": transition.to_stage,
        "paused": transition.paused,
        "command_id": transition.command_id,
        "gates": [gate_record(g) for g in transition.gates],
    }


def note_event(at: datetime, rollout_id: str | None, reason: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "note", "at": at.isoformat(), "rollout_id": rollout_id, "reason": reason, **fields}


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete, valid line of the log (torn or corrupt lines skipped)."""
    try:
        handle = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield event


class EventLog:
    """``events.jsonl``: transitions synced from the state (exactly once), notes appended directly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._logged: dict[str, int] = {}
        for event in read_events(path):
            if event.get("kind") == "transition" and isinstance(event.get("seq"), int):
                rid = str(event.get("rollout_id"))
                self._logged[rid] = max(self._logged.get(rid, 0), int(event["seq"]) + 1)

    def logged(self, rollout_id: str) -> int:
        """How many transitions of the rollout are in the log."""
        return self._logged.get(rollout_id, 0)

    def sync(self, rollout: RolloutState) -> list[Transition]:
        """Append the rollout's transitions the log does not have yet; return them."""
        start = self.logged(rollout.rollout_id)
        new = list(rollout.history[start:])
        if not new:
            return []
        events = [transition_event(rollout, start + i, t) for i, t in enumerate(new)]
        self._append(events)
        self._logged[rollout.rollout_id] = len(rollout.history)
        for event in events:
            log_event(
                logger,
                f"rollout {event['to_phase']} at {event['to_stage']}: {event['reason']}",
                logging.WARNING if event["to_phase"] in ("RolledBack", "Aborted") else logging.INFO,
                **{k: v for k, v in event.items() if k != "kind"},
                event="rollout_transition",
            )
        return new

    def note(self, at: datetime, rollout_id: str | None, reason: str, **fields: Any) -> None:
        self._append([note_event(at, rollout_id, reason, **fields)])
        log_event(logger, reason, event="rollout_note", rollout_id=rollout_id, **fields)

    def _append(self, events: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(e, separators=(",", ":"), default=str) + "\n" for e in events)
        with self.path.open("a", encoding="utf-8") as handle:
            self._heal_torn_line(handle)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def _heal_torn_line(self, handle: Any) -> None:
        """Start on a fresh line when the file ends mid-line (a write cut short by a kill)."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("rb") as reader:
            reader.seek(size - 1)
            if reader.read(1) != b"\n":
                handle.write("\n")


def now_utc() -> datetime:
    return datetime.now(UTC)
