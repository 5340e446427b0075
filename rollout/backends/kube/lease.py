"""Leader election with a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection package does it.

Every replica runs a :class:`LeaseElector`; the one that holds the Lease is the leader and the only one that acts.

* acquire: create the Lease, or take it over once its holder has not renewed it for ``lease_duration_s`` *as
  observed here* (the time this replica last saw the record change — not the holder's timestamps, so clock skew
  between machines does not matter); every write carries the Lease's ``resourceVersion``, so of two replicas
  racing for it exactly one wins (the other gets 409 Conflict);
* renew: the leader rewrites ``renewTime`` every ``retry_period_s``; when it could not renew for
  ``renew_deadline_s`` (shorter than the lease duration: a margin before anyone may take over) it stops leading;
* release: on a clean shutdown the leader empties ``holderIdentity`` and sets a one-second duration, so a standby
  takes over at once instead of after the lease duration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from rollout.backends.kube.api import KubeApi, KubeError, lease_path
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

Decision = Literal["acquire", "renew", "wait"]
_RELEASED_DURATION_S: Final[int] = 1


def micro_time(at: datetime) -> str:
    """A metav1.MicroTime."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decide(spec: Mapping[str, Any], identity: str, observed_at: float, now: float, duration_s: float) -> Decision:
    """What to do with a Lease whose spec is ``spec``, last seen changing at ``observed_at`` (monotonic)."""
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    held_for = float(spec.get("leaseDurationSeconds") or duration_s)
    if holder and now < observed_at + held_for:
        return "wait"
    return "acquire"


@dataclass
class LeaseElector:
    """One replica's side of the election; :meth:`start` runs it in a thread."""

    api: KubeApi
    namespace: str
    name: str
    identity: str
    lease_duration_s: float
    renew_deadline_s: float
    retry_period_s: float
    on_started: Callable[[], None] = lambda: None
    on_stopped: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.monotonic
    leading: threading.Event = field(default_factory=threading.Event, init=False)
    lost: threading.Event = field(default_factory=threading.Event, init=False)
    #: Seconds from start until this replica first led (None while it never did).
    acquired_after_s: float | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _started: float = field(default=0.0, init=False)
    _observed: tuple[str, ...] | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)
    _last_renew: float = field(default=0.0, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    @property
    def path(self) -> str:
        return lease_path(self.namespace, self.name)

    def start(self) -> None:
        self._started = self.clock()
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_period_s + self.api.request_timeout_s)
        if release and self.leading.is_set():
            self.release()

    # ---- the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                won = self.try_acquire_or_renew()
            except KubeError as exc:
                won = False
                log_event(logger, "lease request failed", event="lease_error", lease=self.name, error=str(exc))
            now = self.clock()
            if won:
                self._last_renew = now
                if not self.leading.is_set():
                    self.acquired_after_s = round(now - self._started, 3)
                    self.leading.set()
                    log_event(logger, "leading", event="leader_elected", lease=self.name, identity=self.identity,
                              waited_s=self.acquired_after_s)  # fmt: skip
                    self.on_started()
            elif self.leading.is_set() and now - self._last_renew > self.renew_deadline_s:
                self.leading.clear()
                self.lost.set()
                log_event(logger, "leadership lost", event="leader_lost", lease=self.name, identity=self.identity,
                          since_renew_s=round(now - self._last_renew, 3))  # fmt: skip
                self.on_stopped()
                return
            self._stop.wait(self.retry_period_s)

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        now_wall = datetime.now(UTC)
        lease = self.api.get(self.path)
        if lease is None:
            return self._create(now_wall)
        spec: dict[str, Any] = dict(lease.get("spec") or {})
        record = tuple(str(spec.get(k, "")) for k in ("holderIdentity", "renewTime", "leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        decision = decide(spec, self.identity, self._observed_at, self.clock(), self.lease_duration_s)
        if decision == "wait":
            return False
        spec["renewTime"] = micro_time(now_wall)
        spec["leaseDurationSeconds"] = round(self.lease_duration_s)
        if decision == "acquire":
            spec["holderIdentity"] = self.identity
            spec["acquireTime"] = micro_time(now_wall)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        body = {**lease, "spec": spec}
        try:
            updated = self.api.replace(self.path, body)
        except KubeError as exc:
            if exc.conflict:
                return False  # someone else wrote it first
            raise
        self._observe(updated)
        return True

    def _create(self, now_wall: datetime) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": round(self.lease_duration_s),
                "acquireTime": micro_time(now_wall),
                "renewTime": micro_time(now_wall),
                "leaseTransitions": 0,
            },
        }
        try:
            created = self.api.create(lease_path(self.namespace), body)
        except KubeError as exc:
            if exc.conflict:
                return False  # created by another replica a moment ago
            raise
        self._observe(created)
        return True

    def _observe(self, lease: Mapping[str, Any]) -> None:
        spec = lease.get("spec") or {}
        self._observed = tuple(str(spec.get(k, "")) for k in ("holderIdentity", "renewTime", "leaseTransitions"))
        self._observed_at = self.clock()

    def release(self) -> bool:
        """Give the Lease up (a clean shutdown): a standby acquires it on its next try."""
        try:
            lease = self.api.get(self.path)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return False
            spec = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": _RELEASED_DURATION_S,
                    "renewTime": micro_time(datetime.now(UTC))}  # fmt: skip
            self.api.replace(self.path, {**lease, "spec": spec})
        except KubeError as exc:
            log_event(logger, "lease release failed", event="lease_error", lease=self.name, error=str(exc))
            return False
        self.leading.clear()
        log_event(logger, "lease released", event="leader_released", lease=self.name, identity=self.identity)
        return True
