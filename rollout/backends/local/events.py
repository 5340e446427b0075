"""The local backend's event log, every transition (with its reason and the gate values behind it) exactly once.

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
from datetime import datetime
from pathlib import Path
from typing import Any

from rollout.core.events import note_event, transition_event
from rollout.core.machine import RolloutState, Transition
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)


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
