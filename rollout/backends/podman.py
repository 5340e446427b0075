"""The podman backend: the local backend with each model version in a container of the model-server image.

Everything but the workload is the local backend's (:mod:`rollout.backends.local.workloads`): bundles fetched from the
registry (verified) into ``local.models_dir``, routers reached through their admin endpoint, Prometheus file-SD
targets, readiness and health probes, restarts counted as the candidate's evidence. :class:`PodmanWorkloads`
replaces the ``bentoml serve`` child process with a container, created and started through the libpod REST API
(``podman system service``, a unix socket) with what the Helm chart gives a model-server pod:

* the image (``podman.image``: scripts/images.sh serve, the built Bento run by ``bentoml serve``);
* the security context — uid/gid 1034, read-only root filesystem, every capability dropped, no privilege
  escalation, podman's default seccomp profile (the chart's RuntimeDefault); rlimits given explicitly (runc);
* writable tmpfs mounts where the chart has emptyDirs (``/tmp``, ``/var/lib/fraudwatch``);
* the chart's environment (``podman.env``) plus what the controller sets per version: ``FW_SERVE__MODEL_VERSION``
  and ``FW_SERVE__MODEL_DIR`` (the fetched bundle, bind-mounted read-only);
* the container port (3000) published on ``host_ip`` at a free port: the version's URL.

Containers carry the labels ``io.fraudwatch.rollout``, ``…version`` and ``…port``, so a restarted controller adopts
the running ones (podman is the record, not a pid file). A container that exited counts as a dead server: it is
removed and started again (a restart). Why a podman backend and not the Kubernetes one: this machine runs OCI
containers but no kubelet (docs/kubernetes-testing.md); the Workloads protocol is the seam both implement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import httpx

from rollout.backends.base import ModelSource
from rollout.backends.local.workloads import LocalWorkloads, WorkloadRecord, _Workload
from rollout.settings import LocalBackendSettings, PodmanBackendSettings
from service.common.logging import get_logger, log_event
from service.common.processes import free_port
from service.settings import Settings

logger = get_logger(__name__)

API: Final[str] = "http://d/v4.0.0/libpod"
ROLLOUT_LABEL: Final[str] = "io.fraudwatch.rollout"
VERSION_LABEL: Final[str] = "io.fraudwatch.version"
PORT_LABEL: Final[str] = "io.fraudwatch.port"
_NOT_FOUND: Final[int] = 404
_NOT_MODIFIED: Final[int] = 304


class PodmanError(RuntimeError):
    """The libpod API refused a call."""


def container_name(prefix: str, rollout: str, version: str) -> str:
    """``<prefix>-<rollout>-<version>`` with anything but letters, digits, '.', '_' and '-' replaced by '-'."""
    raw = f"{prefix}-{rollout}-{version}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in raw)


def container_spec(
    settings: PodmanBackendSettings, *, name: str, rollout: str, version: str, model_dir: Path, host_port: int
) -> dict[str, Any]:
    """The libpod SpecGenerator of one model-server container (the chart's pod template, translated)."""
    bundle = f"{settings.models_mount}/{version}"
    env = {**settings.env, "FW_SERVE__MODEL_VERSION": version, "FW_SERVE__MODEL_DIR": bundle}
    scratch = [
        {"destination": path, "type": "tmpfs", "source": "tmpfs", "options": ["rw", "nosuid", "nodev", "mode=1777"]}
        for path in settings.scratch_dirs
    ]
    bind = {"destination": bundle, "type": "bind", "source": str(model_dir.resolve()), "options": ["ro", "rbind"]}
    return {
        "name": name,
        "image": settings.image,
        "env": env,
        "labels": {ROLLOUT_LABEL: rollout, VERSION_LABEL: version, PORT_LABEL: str(host_port)},
        "user": settings.user,
        "read_only_filesystem": True,
        "read_only_tmpfs": False,
        "cap_drop": ["ALL"],
        "no_new_privileges": True,
        "mounts": [*scratch, bind],
        "netns": {"nsmode": "bridge"},
        "portmappings": [
            {
                "host_ip": settings.host_ip,
                "host_port": host_port,
                "container_port": settings.container_port,
                "protocol": "tcp",
            }
        ],
        "r_limits": [
            {"type": "nofile", "soft": settings.nofile, "hard": settings.nofile},
            {"type": "nproc", "soft": settings.nproc, "hard": settings.nproc},
        ],
        "stop_timeout": 20,
    }


def readable(bundle: Path) -> Path:
    """The bundle readable by the model server's uid (the controller fetched it as its own; a registry download
    keeps the artifact store's 0600 modes). A model bundle is no secret; it stays read-only to the server."""
    bundle.chmod(0o755)
    for path in bundle.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return bundle


class PodmanApi:
    """The few libpod REST calls the backend makes, over the API's unix socket."""

    def __init__(self, socket: Path, timeout_s: float) -> None:
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def _check(self, response: httpx.Response, what: str) -> httpx.Response:
        if response.is_success or response.status_code == _NOT_MODIFIED:
            return response
        raise PodmanError(f"{what}: HTTP {response.status_code} {response.text[:300]}")

    def run(self, spec: Mapping[str, Any]) -> str:
        """Create and start a container; its ID."""
        created = self._check(self._client.post(f"{API}/containers/create", json=dict(spec)), "create")
        ident = str(created.json()["Id"])
        self._check(self._client.post(f"{API}/containers/{ident}/start"), "start")
        return ident

    def running(self, name: str) -> bool:
        response = self._client.get(f"{API}/containers/{name}/json")
        if response.status_code == _NOT_FOUND:
            return False
        return bool(self._check(response, "inspect").json()["State"]["Running"])

    def remove(self, name: str, grace_s: float) -> None:
        """Stop (SIGTERM, SIGKILL after ``grace_s``) and remove; nothing when there is no such container."""
        stopped = self._client.post(f"{API}/containers/{name}/stop", params={"timeout": int(grace_s)},
                                    timeout=grace_s + 30)  # fmt: skip
        if stopped.status_code == _NOT_FOUND:
            return
        self._check(self._client.delete(f"{API}/containers/{name}", params={"force": "true"}), "remove")

    def labelled(self, label: str) -> list[dict[str, Any]]:
        """Every container (running or not) carrying ``label`` (``key=value``)."""
        filters = json.dumps({"label": [label]})
        response = self._check(self._client.get(f"{API}/containers/json", params={"all": "true", "filters": filters}),
                               "list")  # fmt: skip
        found: list[dict[str, Any]] = response.json() or []
        return found


class PodmanWorkloads(LocalWorkloads):
    """:class:`~rollout.backends.base.Workloads` as model-server containers (the local backend's probing, restarts,
    file-SD targets and records; podman's labels for adoption)."""

    def __init__(
        self,
        settings: LocalBackendSettings,
        podman: PodmanBackendSettings,
        serve_settings: Settings,
        source: ModelSource,
        state_dir: Path,
        rollout: str,
    ) -> None:
        self._podman = podman
        self._rollout = rollout
        self._api = PodmanApi(podman.socket, podman.api_timeout_s)
        # the servers' address (URLs, scrape targets) is where their ports are published
        published = serve_settings.process.model_copy(update={"host": podman.host_ip})
        super().__init__(settings, serve_settings.model_copy(update={"process": published}), source, state_dir)

    def _name(self, version: str) -> str:
        return container_name(self._podman.name_prefix, self._rollout, version)

    def _url(self, port: int) -> str:
        return f"http://{self._podman.host_ip}:{port}"

    def _adopt(self) -> None:
        """Adopt this rollout's running containers; remove the ones that exited."""
        for found in self._api.labelled(f"{ROLLOUT_LABEL}={self._rollout}"):
            labels, name = found.get("Labels") or {}, str(found["Names"][0])
            version, port = labels.get(VERSION_LABEL), labels.get(PORT_LABEL)
            if found.get("State") == "running" and version and port:
                record = WorkloadRecord(version=version, pid=0, port=int(port), model_dir=self._models_dir / version,
                                        tag=name)  # fmt: skip
                self._workloads[version] = _Workload(record, self._url(int(port)), time.monotonic(), server=None)
                log_event(logger, "model server container adopted", event="workload_adopted", version=version,
                          container=name, url=self._url(int(port)))  # fmt: skip
            else:
                self._api.remove(name, self._settings.stop_timeout_s)
        self._save()

    def _alive(self, workload: _Workload) -> bool:
        return self._api.running(workload.record.tag)

    def _launch(self, version: str, model_dir: Path) -> _Workload:
        name = self._name(version)
        self._api.remove(name, 0)  # what is left of an exited one
        port = free_port(self._podman.host_ip)
        spec = container_spec(self._podman, name=name, rollout=self._rollout, version=version,
                              model_dir=readable(model_dir), host_port=port)  # fmt: skip
        ident = self._api.run(spec)
        log_event(logger, "model server container started", event="workload_started", version=version,
                  url=self._url(port), container=name, id=ident[:12], image=self._podman.image)  # fmt: skip
        record = WorkloadRecord(version=version, pid=0, port=port, model_dir=model_dir, tag=name)
        return _Workload(record, self._url(port), time.monotonic(), server=None)

    def _stop(self, workload: _Workload) -> None:
        self._api.remove(workload.record.tag, self._settings.stop_timeout_s)

    def close(self, *, stop_servers: bool) -> None:
        super().close(stop_servers=stop_servers)
        self._api.close()
