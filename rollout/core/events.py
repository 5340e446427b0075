"""A rollout's events as records: a transition (with its reason code and the gate values behind it) or a note.

Pure: the records are written by the backends' event sinks (``events.jsonl`` locally, Kubernetes Events), read by
``rolloutctl history``, the controller's metrics and the demo's timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from rollout.core.analysis import GateResult
from rollout.core.machine import RolloutState, Transition

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
