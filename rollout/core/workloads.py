"""A model version's workload as every backend reports it: ready, starting or failed, its URL and restarts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Readiness(StrEnum):
    """Where a version's workload stands."""

    READY = "ready"
    STARTING = "starting"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """A version's workload as the backend sees it now; ``url`` is set once it has an address."""

    version: str
    readiness: Readiness
    url: str | None = None
    detail: str = ""
    #: How often the workload was restarted after a failure (crash, endpoint dead, not ready in time), as far as
    #: the backend knows (locally: since the controller started; Kubernetes: the pods' container restarts).
    restarts: int = 0

    @property
    def ready(self) -> bool:
        return self.readiness is Readiness.READY and self.url is not None
