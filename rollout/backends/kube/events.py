"""Kubernetes Events as the controller's event sink: one per transition (deterministic names, so recorded once, also
across a restart) and one per note (``kubectl describe mro``)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from rollout.backends.kube.api import (
    KubeApi,
    KubeError,
    core_path,
)
from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.resource import (
    event_name,
    event_reason,
    note_reason,
)
from rollout.core.events import transition_event
from rollout.core.machine import RolloutState, Transition
from rollout.settings import KubeBackendSettings
from service.common.clock import Clock, utc_now
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

_MAX_EVENT_MESSAGE: Final[int] = 1024


@dataclass
class KubeEventSink:
    """:class:`~rollout.controller.loop.EventSink`: Kubernetes Events on the ModelRollout (``kubectl describe mro``)."""

    api: KubeApi
    cache: RolloutCache
    settings: KubeBackendSettings
    identity: str
    clock: Clock = utc_now
    _recorded: dict[str, int] = field(default_factory=dict, init=False)
    created: int = field(default=0, init=False)

    def sync(self, rollout: RolloutState, /) -> list[Transition]:
        """Create the Events of the rollout's transitions this process has not recorded; return those it created
        (an Event that exists already — recorded before a restart — is not returned again)."""
        start = self._recorded.get(rollout.rollout_id, 0)
        new: list[Transition] = []
        for seq in range(start, len(rollout.history)):
            transition = rollout.history[seq]
            reason, kind = event_reason(transition)
            name = event_name(self.cache.name, rollout.rollout_id, str(seq))
            message = f"{transition.from_phase}/{transition.from_stage} → {transition.to_phase}/{transition.to_stage}: "
            message += transition.reason + _gate_summary(transition)
            created = self._create(name, reason, kind, message, transition.at)
            if created is None:
                break  # the API refused or failed: retried at the next sync
            self._recorded[rollout.rollout_id] = seq + 1
            if created:
                new.append(transition)
                _log_transition(rollout, seq, transition)
        return new

    def note(self, at: datetime, rollout_id: str | None, reason: str, **fields: object) -> None:
        name = event_name(self.cache.name, "note", uuid.uuid4().hex[:12])
        detail = ", ".join(f"{k}={v}" for k, v in fields.items())
        self._create(name, note_reason(reason), "Normal", reason + (f" ({detail})" if detail else ""), at)
        log_event(logger, reason, logging.INFO, event="rollout_note", rollout_id=rollout_id, **fields)

    def _create(self, name: str, reason: str, kind: str, message: str, at: datetime) -> bool | None:
        """True when created, False when it existed, None when it could not be created."""
        obj = self.cache.object()
        if obj is None:
            return None
        stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": obj.namespace},
            "involvedObject": obj.involved_object(),
            "reason": reason,
            "message": message[:_MAX_EVENT_MESSAGE],
            "type": kind,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.settings.event_component},
            "reportingComponent": self.settings.event_component,
            "reportingInstance": self.identity,
        }
        try:
            self.api.create(core_path(obj.namespace, "events"), body)
        except KubeError as exc:
            if exc.conflict:
                return False
            log_event(logger, "event not recorded", event="kube_event_failed", reason=reason, error=str(exc))
            return None
        self.created += 1
        return True


def _gate_summary(transition: Transition) -> str:
    parts = []
    for gate in transition.gates:
        value = gate.bound if gate.bound is not None else gate.candidate_value
        shown = f"={value:.4g}" if value is not None else ""
        parts.append(f"{gate.name}{shown} {gate.status.value}")
    return f" [{', '.join(parts)}]" if parts else ""


def _log_transition(rollout: RolloutState, seq: int, transition: Transition) -> None:
    event = transition_event(rollout, seq, transition)
    level = logging.WARNING if event["to_phase"] in ("RolledBack", "Aborted") else logging.INFO
    log_event(logger, f"rollout {event['to_phase']} at {event['to_stage']}: {event['reason']}", level,
              **{k: v for k, v in event.items() if k != "kind"}, event="rollout_transition")  # fmt: skip
