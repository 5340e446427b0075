"""The chart's pods as podman containers (tests/integration/test_rollout_podman.py, benchmarks/image_benchmark.py).

:func:`podman_run_argv` translates one container of a pod spec that ``helm template`` rendered into a ``podman run``:
the security context (user and group, read-only root filesystem, dropped capabilities, no privilege escalation,
RuntimeDefault seccomp = podman's default profile), its emptyDirs as tmpfs mounts, its Secret volumes as read-only
bind mounts of files with the Secret's data (group-readable by the pod's fsGroup, as the kubelet does), its
environment (fieldRefs and secretKeyRefs resolved from the rendered objects), command and args. The containers run
with runc and explicit rlimits (this machine's crun cannot start containers; runc needs the limits given).

:func:`images` builds the images through scripts/images.sh (cached by content hash); :class:`PodmanService` is the
libpod API socket the podman backend of the controller drives.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kits.stack import ROOT

IMAGES_TIMEOUT_S = 1800.0
RUNTIME = ("--runtime", "runc")
RLIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
NEEDED = ("podman", "buildah", "debootstrap", "runc")


def missing_tools() -> list[str]:
    return [tool for tool in NEEDED if shutil.which(tool) is None]


def images(*components: str) -> dict[str, str]:
    """``component → image`` built (or found in the cache) by scripts/images.sh."""
    missing = missing_tools()
    assert not missing, f"{missing} missing: apt-get install -y podman buildah runc debootstrap (scripts/bootstrap.sh)"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "images.sh"), *components],
        capture_output=True, text=True, timeout=IMAGES_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())


def secret_data(objects: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """``name → key → value`` of every rendered Secret."""
    found: dict[str, dict[str, str]] = {}
    for obj in objects:
        if obj.get("kind") == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            found[obj["metadata"]["name"]] = {**data, **(obj.get("stringData") or {})}
    return found


def resolve_env(
    container: Mapping[str, Any], secrets: Mapping[str, Mapping[str, str]], fields: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment with ``valueFrom`` resolved (``fields``: fieldPath → value)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom")
        if source is None:
            env[entry["name"]] = str(entry.get("value", ""))
        elif "fieldRef" in source:
            env[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            ref = source["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def security_argv(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    """``podman run`` options of the pod's and the container's securityContext (the container's wins)."""
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    uid, gid = csc.get("runAsUser", psc.get("runAsUser")), csc.get("runAsGroup", psc.get("runAsGroup"))
    assert uid not in (None, 0) and gid is not None, "the chart runs every container as a non-root uid/gid"
    assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    assert seccomp == "RuntimeDefault", seccomp  # podman's default profile
    argv = ["--user", f"{uid}:{gid}"]
    if csc.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]
    for capability in csc.get("capabilities", {}).get("drop", []):
        argv += ["--cap-drop", capability]
    if csc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    return argv


def volume_argv(
    pod: Mapping[str, Any], container: Mapping[str, Any], secrets: Mapping[str, Mapping[str, str]], files: Path
) -> list[str]:
    """emptyDirs as tmpfs, Secret volumes as read-only bind mounts of their items (written under ``files``)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    fs_group = int(pod.get("securityContext", {}).get("fsGroup", 0))
    argv: list[str] = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            argv += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
        elif "secret" in volume:
            secret = volume["secret"]
            directory = files / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
            for item in secret.get("items", []):
                path = directory / item["path"]
                path.write_text(secrets[secret["secretName"]][item["key"]], encoding="utf-8")
                os.chown(path, 0, fs_group)
                path.chmod(int(secret.get("defaultMode", 0o644)))
            argv += ["-v", f"{directory}:{mount['mountPath']}:ro"]
        else:
            raise AssertionError(f"volume {volume} has no podman translation here")
    return argv


@dataclass(frozen=True)
class Run:
    """One chart container translated: ``podman run`` options, environment and command."""

    options: list[str]
    env: dict[str, str]
    command: list[str]

    def argv(self, name: str, image: str, *extra: str) -> list[str]:
        env = [f"--env={key}={value}" for key, value in self.env.items()]
        return ["podman", *RUNTIME, "run", "-d", "--name", name, *RLIMITS, *self.options, *env, *extra, image,
                *self.command]  # fmt: skip


def podman_run(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, str]],
    fields: Mapping[str, str],
    files: Path,
    env: Callable[[dict[str, str]], dict[str, str]] = lambda e: e,
) -> Run:
    """The container of a rendered pod spec as a ``podman run`` (``env`` adapts the chart's environment)."""
    options = [*security_argv(pod, container), *volume_argv(pod, container, secrets, files)]
    command = [*container.get("command", []), *container.get("args", [])]
    return Run(options, env(resolve_env(container, secrets, fields)), command)


def rm(name: str) -> None:
    subprocess.run(["podman", "rm", "-f", "-t", "10", name], capture_output=True, timeout=120, check=False)


def inspect(name: str) -> dict[str, Any]:
    import json

    done = subprocess.run(["podman", "inspect", name], capture_output=True, text=True, timeout=60, check=True)
    found: list[dict[str, Any]] = json.loads(done.stdout)
    return found[0]


class PodmanService:
    """``podman system service`` (runc) on a unix socket under ``directory``: the libpod API of the controller's
    podman backend. The socket is opened to the controller's uid (it is root on this host: test only)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        self.socket = directory / "podman.sock"
        self._log = directory / "service.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                ["podman", *RUNTIME, "system", "service", "--time=0", f"unix://{self.socket}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            assert time.monotonic() < deadline, self._log.read_text()
            assert self._process.poll() is None, self._log.read_text()
            time.sleep(0.1)
        self.socket.chmod(0o666)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()


@contextlib.contextmanager
def removed_after(names: Iterable[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for name in names:
            rm(name)
