"""The local backend's workloads: model versions as real ``bentoml serve`` child processes, their Prometheus scrape
targets in a file-SD file.

:class:`LocalWorkloads`
    One :class:`service.serving.process.BentoServer` per version, on its own free port, serving the version's
    bundle fetched from the registry (verified) into ``<models_dir>/<version>``. ``ensure_running`` never waits:
    it starts the process and reports ``starting`` until ``/readyz`` answers 200. The workloads are recorded in
    ``workloads.json`` (version, pid, port), so a controller restarted after a kill *adopts* the servers that are
    still alive instead of starting them again — the routers keep pointing at the same URLs. Every change rewrites
    the Prometheus file-SD targets (the model servers plus ``scrape_targets``); Prometheus picks it up without a
    restart. Stopping happens in a background thread: the server's whole process tree
    (:func:`service.common.processes.stop_tree` — BentoML's workers leave the server's session, so a group signal would
    leave them serving), SIGTERM then SIGKILL. A server counts as dead when its main process exited *or* its
    ``/readyz`` stopped answering (``unhealthy_after`` probes in a row, every ``health_interval_s``): its tree is
    stopped and it is started again, and every such restart is counted (``restarts``, the candidate's evidence).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from rollout.backends.base import ModelSource
from rollout.backends.local.prometheus import ScrapeTarget, render_targets
from rollout.core.workloads import Readiness, WorkloadStatus
from rollout.settings import LocalBackendSettings
from service.common import processes
from service.common.files import write_atomically
from service.common.logging import get_logger, log_event
from service.serving.process import LIVE_PATH, READY_PATH, BentoServer
from service.settings import Settings

logger = get_logger(__name__)

WORKLOADS_FILE: Final[str] = "workloads.json"
MODEL_SERVER_COMPONENT: Final[str] = "model-server"
STATIC_COMPONENT: Final[str] = "static"


# --------------------------------------------------------------------------------------------------- workloads


class WorkloadRecord(BaseModel):
    """What survives a controller restart of one model server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    pid: int
    port: int
    model_dir: Path
    #: The server's process-tree tag (service.common.processes); '' in records written before it existed.
    tag: str = ""


@dataclass
class _Workload:
    record: WorkloadRecord
    url: str
    started: float
    server: BentoServer | None
    ready: bool = False
    last_probe: float = 0.0
    #: Readiness probes of a ready server that failed in a row.
    failures: int = 0

    @property
    def version(self) -> str:
        return self.record.version


class LocalWorkloads:
    """:class:`~rollout.backends.base.Workloads` as ``bentoml serve`` processes on loopback."""

    def __init__(
        self,
        settings: LocalBackendSettings,
        serve_settings: Settings,
        source: ModelSource,
        state_dir: Path,
    ) -> None:
        self._settings = settings
        self._serve = serve_settings
        self._source = source
        self._state_dir = state_dir
        self._models_dir = settings.models_dir if settings.models_dir is not None else state_dir / "models"
        self._workloads: dict[str, _Workload] = {}
        self._last_start: dict[str, float] = {}
        #: Restarts of each version after it died, stopped answering or was not ready in time (this process' life).
        self._restarts: dict[str, int] = {}
        self._stopping: list[threading.Thread] = []
        self._http = httpx.Client(timeout=settings.probe_timeout_s, trust_env=False)
        self._adopt()
        self._write_targets()

    @property
    def records_path(self) -> Path:
        return self._state_dir / WORKLOADS_FILE

    # ---- persistence and adoption

    def _save(self) -> None:
        records = [w.record.model_dump(mode="json") for w in self._workloads.values()]
        write_atomically(self.records_path, json.dumps(records, indent=2))

    def _adopt(self) -> None:
        try:
            raw = json.loads(self.records_path.read_text(encoding="utf-8"))
            records = [WorkloadRecord.model_validate(item) for item in raw]
        except (FileNotFoundError, json.JSONDecodeError, ValidationError, TypeError):
            records = []
        for record in records:
            url = f"http://{self._serve.process.host}:{record.port}"
            ours = not record.tag or processes.carries_tag(record.pid, record.tag)  # not a reused pid
            if not ours:
                processes.stop_tree(
                    0, record.tag, grace_s=self._settings.stop_timeout_s, poll_s=self._settings.probe_interval_s
                )
            elif processes.alive(record.pid) and self._answers(url + LIVE_PATH):
                self._workloads[record.version] = _Workload(record, url, time.monotonic(), server=None)
                log_event(logger, "model server adopted", event="workload_adopted", version=record.version,
                          server_pid=record.pid, url=url)  # fmt: skip
            else:  # dead or not answering: whatever is left of its tree (workers of a dead server) goes too
                processes.stop_tree(
                    record.pid,
                    record.tag,
                    grace_s=self._settings.stop_timeout_s,
                    poll_s=self._settings.probe_interval_s,
                )
        self._save()

    def _answers(self, url: str) -> bool:
        try:
            return self._http.get(url).status_code == httpx.codes.OK
        except httpx.HTTPError:
            return False

    # ---- the protocol

    def ensure_running(self, version: str) -> WorkloadStatus:
        self._write_targets()
        workload = self._workloads.get(version)
        if workload is not None and not self._alive(workload):
            log_event(logger, "model server exited", event="workload_exited", version=version, url=workload.url)
            self._failed(version)
            workload = None
        if workload is None:
            return self._with_restarts(self._start(version))
        return self._with_restarts(self._probe(workload))

    def restarts(self, version: str) -> int:
        """How often ``version``'s server was restarted after a failure (exited, stopped answering, not ready in
        time) since this backend started."""
        return self._restarts.get(version, 0)

    def _with_restarts(self, status: WorkloadStatus) -> WorkloadStatus:
        return WorkloadStatus(status.version, status.readiness, status.url, status.detail,
                              restarts=self.restarts(status.version))  # fmt: skip

    def _failed(self, version: str) -> None:
        """The server failed: stop what is left of its tree, count a restart (the next ensure_running starts it)."""
        self._forget(version, stop=True)
        self._restarts[version] = self._restarts.get(version, 0) + 1

    def status(self, version: str) -> WorkloadStatus:
        workload = self._workloads.get(version)
        restarts = self.restarts(version)
        if workload is None:
            return WorkloadStatus(version, Readiness.STOPPED, restarts=restarts)
        if not self._alive(workload):
            return WorkloadStatus(version, Readiness.FAILED, workload.url, "process exited", restarts=restarts)
        readiness = Readiness.READY if workload.ready else Readiness.STARTING
        return WorkloadStatus(version, readiness, workload.url, restarts=restarts)

    def scale_down(self, version: str) -> bool:
        if version not in self._workloads:
            return False
        self._forget(version, stop=True)
        log_event(logger, "model server stopping", event="workload_scaled_down", version=version)
        return True

    def running(self) -> tuple[str, ...]:
        return tuple(self._workloads)

    def close(self, *, stop_servers: bool) -> None:
        """Release the backend; with ``stop_servers`` stop every model server (else they keep running)."""
        if stop_servers:
            for version in list(self._workloads):
                self._forget(version, stop=True)
        for thread in self._stopping:
            thread.join()
        self._stopping.clear()
        self._http.close()

    # ---- internals

    def _alive(self, workload: _Workload) -> bool:
        if workload.server is not None:
            return workload.server.running()
        return processes.alive(workload.record.pid)

    def _start(self, version: str) -> WorkloadStatus:
        now = time.monotonic()
        last = self._last_start.get(version)
        if last is not None and now - last < self._settings.restart_backoff_s:
            return WorkloadStatus(version, Readiness.FAILED, detail="exited; waiting to start it again")
        self._last_start[version] = now
        model_dir = self._source.fetch(version, self._models_dir / version)
        workload = self._launch(version, model_dir)
        self._workloads[version] = workload
        self._save()
        self._write_targets()
        return WorkloadStatus(version, Readiness.STARTING, workload.url)

    def _launch(self, version: str, model_dir: Path) -> _Workload:
        """Start ``version``'s server on its fetched bundle (a ``bentoml serve`` child here; a container in the
        podman backend) without waiting for it."""
        server = BentoServer(
            model_dir=model_dir,
            # the registry's digest: the workers check the bundle against it again before parsing it, so bytes
            # changed on disk after this fetch verified them are refused, not served
            model_digest=self._source.bundle_digest(version),
            settings=self.server_settings(version),
            name=f"model-{version}",
            extra_env=dict(self._settings.server_env),
        )
        server.start()
        if server.pid is None or server.port is None:
            raise RuntimeError(f"model server of {version} did not start")
        record = WorkloadRecord(version=version, pid=server.pid, port=server.port, model_dir=model_dir, tag=server.tag)
        log_event(logger, "model server started", event="workload_started", version=version, url=server.url,
                  server_pid=server.pid, log=str(server.log_path))  # fmt: skip
        return _Workload(record, server.url, time.monotonic(), server=server)

    def server_settings(self, version: str) -> Settings:
        """The model side's settings with a home of the version's own: BentoML keeps its Prometheus multiprocess
        directory under ``BENTOML_HOME``, and two servers sharing it mix (and, on start, wipe) each other's
        metrics."""
        return self._serve.model_copy(update={"home": (self._state_dir / "servers" / version).resolve()})

    def _probe(self, workload: _Workload) -> WorkloadStatus:
        version = workload.version
        now = time.monotonic()
        if workload.ready:
            return self._health(workload, now)
        if now - workload.last_probe >= self._settings.probe_interval_s:
            workload.last_probe = now
            workload.ready = self._answers(workload.url + READY_PATH)
            if workload.ready:
                log_event(logger, "model server ready", event="workload_ready", version=version, url=workload.url,
                          waited_s=round(now - workload.started, 3))  # fmt: skip
                return WorkloadStatus(version, Readiness.READY, workload.url)
        if now - workload.started > self._settings.start_timeout_s:
            log_event(logger, "model server not ready in time, restarting", event="workload_start_timeout",
                      version=version)  # fmt: skip
            self._failed(version)
            self._last_start.pop(version, None)
            return WorkloadStatus(version, Readiness.FAILED, workload.url, "not ready in time")
        return WorkloadStatus(version, Readiness.STARTING, workload.url)

    def _health(self, workload: _Workload, now: float) -> WorkloadStatus:
        """A ready server stays ready while its ``/readyz`` answers: probed every ``health_interval_s``; after
        ``unhealthy_after`` failures in a row it is dead (its workers died, or hang) and is stopped and restarted."""
        version = workload.version
        if now - workload.last_probe < self._settings.health_interval_s:
            return WorkloadStatus(version, Readiness.READY, workload.url)
        workload.last_probe = now
        if self._answers(workload.url + READY_PATH):
            workload.failures = 0
            return WorkloadStatus(version, Readiness.READY, workload.url)
        workload.failures += 1
        if workload.failures < self._settings.unhealthy_after:
            return WorkloadStatus(version, Readiness.READY, workload.url)
        log_event(logger, "model server stopped answering, restarting", event="workload_unhealthy",
                  version=version, url=workload.url, failures=workload.failures)  # fmt: skip
        self._failed(version)
        return WorkloadStatus(version, Readiness.FAILED, workload.url, "endpoint not ready")

    def _forget(self, version: str, *, stop: bool) -> None:
        workload = self._workloads.pop(version, None)
        self._save()
        self._write_targets()
        if workload is None or not stop:
            return
        thread = threading.Thread(target=self._stop, args=(workload,), name=f"stop-{version}", daemon=True)
        thread.start()
        self._stopping = [t for t in self._stopping if t.is_alive()] + [thread]

    def _stop(self, workload: _Workload) -> None:
        if workload.server is not None:
            workload.server.stop()
        else:
            processes.stop_tree(workload.record.pid, workload.record.tag, grace_s=self._settings.stop_timeout_s,
                                poll_s=self._settings.probe_interval_s)  # fmt: skip

    def targets(self) -> list[ScrapeTarget]:
        """The scrape targets: the static ones and every model server."""
        static = [ScrapeTarget(address, {"component": STATIC_COMPONENT}) for address in self._settings.scrape_targets]
        servers = [
            ScrapeTarget(f"{self._serve.process.host}:{w.record.port}", {"component": MODEL_SERVER_COMPONENT})
            for w in self._workloads.values()
        ]
        return static + servers

    def _write_targets(self) -> None:
        """Make the file-SD file list exactly :meth:`targets` (rewritten only when it differs: a restarted
        Prometheus that wrote its own initial targets gets ours back on the next reconcile)."""
        path = self._settings.prometheus_targets_file
        if path is None:
            return
        text = json.dumps(render_targets(self.targets()), indent=2)
        try:
            if path.read_text(encoding="utf-8") == text:
                return
        except FileNotFoundError:
            pass
        write_atomically(path, text)
