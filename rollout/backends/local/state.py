"""The local backend's state directory and its ``state.json``: the controller's state, written atomically, read at
start-up.

Layout of the state directory (``FW_ROLLOUT_CONTROLLER__STATE_DIR``, default ``<home>/rollout``)::

    state.json        the controller's whole state (rollout.core.state): the current rollout (the stage machine's
                      RolloutState), finished rollouts, command results, the running versions' workloads
    events.jsonl      append-only transition log (rollout.backends.local.events)
    inbox/            one JSON file per operator command (rollout.backends.local.inbox), written by rolloutctl
    controller.json   the running controller's pid, metrics URL and heartbeat (rollout.backends.local.inbox)
    workloads.json    the local backend's model servers (rollout.backends.local.workloads)

Only the controller writes ``state.json``. Every write goes through a temporary file in the same directory,
fsync and rename, so a reader — or a controller restarted after a kill — sees the old file or the new one, never
half of one.
"""

from __future__ import annotations

from pathlib import Path

from rollout.backends.local.inbox import STATE_FILE
from rollout.core.state import ControllerState, dumps_state, loads_state
from service.common.files import write_atomically


class StateStore:
    """``state.json`` in the state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> ControllerState | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return loads_state(text)

    def save(self, state: ControllerState) -> None:
        write_atomically(self.path, dumps_state(state))
