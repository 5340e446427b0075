"""The ModelRollout's spec as the controller's command source: ``spec.manualCommand`` (once per id), a new rollout when
``spec.candidate`` differs from the serving version, pause/resume following ``spec.paused``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.resource import (
    spec_commands,
)
from rollout.core.commands import InboxCommand
from rollout.core.state import ControllerState
from service.common.clock import Clock, utc_now

MANUAL_HANDLE: Final[str] = "spec.manualCommand"


@dataclass
class SpecCommandSource:
    """:class:`~rollout.controller.loop.CommandSource`: what the ModelRollout's spec asks for."""

    cache: RolloutCache
    state: Callable[[], ControllerState]
    clock: Clock = utc_now
    _discarded: set[str] = field(default_factory=set, init=False)

    def pending(self) -> Sequence[tuple[Any, InboxCommand | str]]:
        self.cache.changed.clear()  # what changed until now is seen by this reconcile
        obj = self.cache.object()
        if obj is None or obj.deleting:
            return []
        found: list[tuple[Any, InboxCommand | str]] = []
        for command in spec_commands(obj, self.state(), self.clock()):
            if isinstance(command, InboxCommand):
                found.append((command.id, command))
                continue
            manual = obj.manual_command or {}
            handle = f"{MANUAL_HANDLE} {manual.get('id')!r}"
            if handle not in self._discarded:
                found.append((handle, command))
        return found

    def done(self, handle: Any, /) -> None:
        if str(handle).startswith(MANUAL_HANDLE):
            self._discarded.add(str(handle))  # an invalid command: reported once, not on every reconcile

    def has_pending(self) -> bool:
        return self.cache.changed.is_set()
