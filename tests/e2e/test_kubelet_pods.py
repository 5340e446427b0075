"""The chart's pods on a real kubelet: kubelet (built from k8s.io/kubernetes like the control plane), Debian's
containerd and runc, the images of scripts/images.sh.

The kubelet runs standalone (static pods from a manifest directory: no API server, so no Secrets, ServiceAccounts or
Services) with what this machine needs (docs/kubernetes-testing.md, "A real kubelet"): ``failCgroupV1: false`` and
the cgroupfs driver (cgroup v1, no systemd), and containerd's ``restrict_oom_score_adj`` (the pod sandbox's -998 OOM
score cannot be set here: runc fails with "can't get final child's PID from pipe"). Pods get their own network
namespace on a CNI bridge made for the test (Debian's containernetworking-plugins).

Two pods from the rendered chart: a model server from the model-server ConfigMap's pod template (the controller's
contract; image, version and bundle set as the controller sets them, the bundle as a read-only hostPath instead of a
registry download) and the router from its Deployment's pod template (its Secret volumes as read-only hostPath files,
its DSN from the rendered Secret, without the ModelRollout watch: no API server). Both must start, pass the chart's
probes (startup, liveness, readiness), run with the chart's security context, and serve: a refund scored through the
router by the model server, each in its own pod.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.common.processes import free_port
from service.data.synthetic import SyntheticConfig, generate
from tests.chartkit import Helm, locate_helm, one
from tests.e2e.cluster import ClusterSettings, locate_binaries
from tests.podkit import images, secret_data
from tests.stackkit import train_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMESPACE = "fraudwatch"
ADMIN_TOKEN = "kubelet-walk-admin-token"
POD_SUBNET = "10.234.77.0/24"  # the test's own bridge, in network namespaces the test makes
READY_TIMEOUT_S = 240.0
IMPORT_TIMEOUT_S = 600.0


@dataclass
class Node:
    """containerd + a standalone kubelet in ``workdir``."""

    workdir: Path
    kubelet_port: int
    processes: list[subprocess.Popen[bytes]]

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def manifests(self) -> Path:
        return self.workdir / "manifests"

    def ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "-a", str(self.socket), "-n", "k8s.io", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def pods(self) -> list[dict[str, Any]]:
        """The kubelet's pods with their status (``/pods`` on its port, anonymous read on 127.0.0.1)."""
        try:
            response = httpx.get(f"https://127.0.0.1:{self.kubelet_port}/pods", verify=False, timeout=5)
        except httpx.HTTPError:
            return []
        found: list[dict[str, Any]] = response.json().get("items", []) if response.is_success else []
        return found


def containerd_config(workdir: Path, pause: str) -> str:
    return f"""version = 2
root = "{workdir}/containerd/root"
state = "{workdir}/containerd/state"
[grpc]
  address = "{workdir}/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{workdir}/cni"
"""


def cni_config(bridge: str) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "fw-kubelet-test",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]]}},
        ],
    }  # fmt: skip


def kubelet_config(node: Node, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # this machine has cgroup v1 (hybrid), no systemd
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "staticPodPath": str(node.manifests),
        "address": "127.0.0.1",
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        # the test reads /pods; bound to loopback, torn down with the test
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "failSwapOn": False,
        "fileCheckFrequency": "1s",
    }


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def import_image(node: Node, image: str, workdir: Path) -> None:
    archive = workdir / "image.tar"
    subprocess.run(["podman", "save", "--format", "oci-archive", "-o", str(archive), image], check=True,
                   capture_output=True, timeout=IMPORT_TIMEOUT_S)  # fmt: skip
    done = node.ctr("images", "import", "--base-name", image.rsplit(":", 1)[0], str(archive), timeout=IMPORT_TIMEOUT_S)
    archive.unlink()
    assert done.returncode == 0, done.stderr


def static_pod(name: str, spec: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE,
                                                            "labels": dict(labels)}, "spec": dict(spec)}  # fmt: skip


def as_static(spec: Mapping[str, Any], secrets: Mapping[str, Mapping[str, str]], files: Path) -> dict[str, Any]:
    """A rendered pod spec a static pod may have: no ServiceAccount, Secrets as read-only hostPath files, env
    secretKeyRefs resolved (static pods cannot refer to API objects)."""
    static = {k: v for k, v in spec.items() if k not in ("serviceAccountName", "automountServiceAccountToken")}
    fs_group = int(spec.get("securityContext", {}).get("fsGroup", 0))
    volumes = []
    for volume in spec.get("volumes", []):
        if "secret" not in volume:
            volumes.append(volume)
            continue
        directory = files / volume["name"]
        directory.mkdir(parents=True)
        for item in volume["secret"].get("items", []):
            path = directory / item["path"]
            path.write_text(secrets[volume["secret"]["secretName"]][item["key"]], encoding="utf-8")
            shutil.chown(path, 0, fs_group)
            path.chmod(0o440)
        volumes.append({"name": volume["name"], "hostPath": {"path": str(directory), "type": "Directory"}})
    static["volumes"] = volumes
    return static


def container_env(container: Mapping[str, Any], secrets: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
    """The container's env with secretKeyRefs resolved (fieldRefs stay: the kubelet fills them in)."""
    env = []
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        env.append({"name": entry["name"], "value": secrets[ref["name"]][ref["key"]]} if ref else entry)
    return env


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    kubelet = locate_binaries(ClusterSettings()).path("kubelet")
    assert kubelet.is_file(), f"{kubelet} missing: run scripts/k8s-binaries.sh (it builds the kubelet)"
    assert shutil.which("containerd") and shutil.which("ctr"), "apt-get install containerd (scripts/bootstrap.sh)"
    workdir = tmp_path_factory.mktemp("kubelet-node")
    built = images("pause", "serve", "router")
    (workdir / "cni").mkdir()
    bridge = f"fwk{free_port('127.0.0.1') % 10000}"
    (workdir / "cni" / "10-fw.conflist").write_text(json.dumps(cni_config(bridge)))
    (workdir / "containerd").mkdir()
    (workdir / "containerd" / "config.toml").write_text(containerd_config(workdir, built["pause"]))
    node = Node(workdir, free_port("127.0.0.1"), [])
    node.manifests.mkdir()
    try:
        node.processes.append(start(["containerd", "--config", str(workdir / "containerd" / "config.toml")],
                                    workdir / "containerd.log"))  # fmt: skip
        deadline = time.monotonic() + 60
        while not node.socket.exists():
            assert time.monotonic() < deadline, (workdir / "containerd.log").read_text()[-3000:]
            time.sleep(0.2)
        for component in ("pause", "serve", "router"):
            import_image(node, built[component], workdir)
        config = workdir / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(node, free_port("127.0.0.1"))))
        node.processes.append(start([str(kubelet), "--config", str(config), "--root-dir", str(workdir / "root"),
                                     "--hostname-override", "fw-kubelet-test"], workdir / "kubelet.log"))  # fmt: skip
        yield node
    finally:
        for manifest in node.manifests.glob("*.yaml"):
            manifest.unlink()  # the kubelet stops the pods
        with contextlib.suppress(subprocess.SubprocessError):
            deadline = time.monotonic() + 60
            while node.pods() and time.monotonic() < deadline:
                time.sleep(0.5)
        # the pods' tasks (their shims outlive containerd otherwise), then the kubelet and containerd
        if node.processes:
            node.processes[-1].terminate()
        for task in node.ctr("tasks", "list", "-q").stdout.split():
            node.ctr("tasks", "kill", "-s", "KILL", task)
        time.sleep(1)
        for container in node.ctr("containers", "list", "-q").stdout.split():
            node.ctr("tasks", "delete", "-f", container)
            node.ctr("containers", "delete", container)
        for process in reversed(node.processes):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, timeout=30, check=False)
        unmount_under(workdir)


def unmount_under(directory: Path) -> None:
    """Unmount what containerd and the kubelet left mounted below ``directory`` (the pods' root filesystems,
    sandbox files), deepest first, so the directory can be removed."""
    mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    points = sorted({line.split()[1] for line in mounts if line.split()[1].startswith(str(directory))}, reverse=True)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def chart(workdir: Path) -> list[dict[str, Any]]:
    values = {"router": {"adminToken": {"value": ADMIN_TOKEN}, "exposeDecisionDetails": True},
              "networkPolicy": {"enabled": False}}  # fmt: skip
    (workdir / "helm-home").mkdir(exist_ok=True)
    return Helm.isolated(locate_helm(), workdir / "helm-home").template(values, workdir, namespace=NAMESPACE)


def pod_ready(node: Node, name: str) -> dict[str, Any] | None:
    for pod in node.pods():
        if pod["metadata"]["name"].startswith(name):
            conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if conditions.get("Ready") == "True" and pod["status"].get("podIP"):
                return pod
    return None


def wait_ready(node: Node, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        pod = pod_ready(node, name)
        if pod is not None:
            return pod
        time.sleep(1)
    raise AssertionError(f"{name} not ready: {json.dumps(node.pods())[:3000]}\n"
                         f"{(node.workdir / 'kubelet.log').read_text()[-3000:]}")  # fmt: skip


def test_the_charts_model_server_and_router_run_pass_their_probes_and_serve(node: Node) -> None:
    objects = chart(node.workdir)
    secrets = secret_data(objects)
    built = images("serve", "router")

    bundle = node.workdir / "bundle" / "v1"
    train_bundle(bundle, "v1", generate(SyntheticConfig(n_requests=3000, seed=1, fraud_rate=0.1)), 20, 0.1)
    for path in [bundle, *bundle.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    template = yaml.safe_load(one(objects, "ConfigMap", "-model-server")["data"]["pod-template.yaml"])
    server = as_static(template["spec"], secrets, node.workdir / "server-files")
    container = server["containers"][0]
    container["image"] = built["serve"]  # what the controller sets per version
    container["imagePullPolicy"] = "Never"
    container["env"] = [*container["env"], {"name": "FW_SERVE__MODEL_VERSION", "value": "v1"},
                        {"name": "FW_SERVE__MODEL_DIR", "value": "/models/v1"}]  # fmt: skip
    container["volumeMounts"] = [*container["volumeMounts"], {"name": "bundle", "mountPath": "/models/v1",
                                                              "readOnly": True}]  # fmt: skip
    server["volumes"] = [*server["volumes"], {"name": "bundle", "hostPath": {"path": str(bundle)}}]
    (node.manifests / "model-server.yaml").write_text(
        yaml.safe_dump(static_pod("model-v1", server, template["metadata"]["labels"]))
    )

    deployment = one(objects, "Deployment", "-router")["spec"]["template"]
    router = as_static(deployment["spec"], secrets, node.workdir / "router-files")
    rc = router["containers"][0]
    rc["image"], rc["imagePullPolicy"] = built["router"], "Never"
    rc["env"] = [e for e in container_env(rc, secrets) if not e["name"].startswith("FW_ROLLOUT_ROUTER__KUBE__")]
    router.pop("affinity", None)
    (node.manifests / "router.yaml").write_text(
        yaml.safe_dump(static_pod("router", router, deployment["metadata"]["labels"]))
    )

    served = wait_ready(node, "model-v1")
    server_ip = served["status"]["podIP"]
    answer = httpx.post(f"http://{server_ip}:3000/api/v1/refund-predict", timeout=10,
                        json={"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2})  # fmt: skip
    assert answer.status_code == 200 and answer.json()["model_version"] == "v1", answer.text

    # the router is live but not ready until it holds a table: publish one on its control port
    deadline = time.monotonic() + READY_TIMEOUT_S
    router_ip = None
    while router_ip is None and time.monotonic() < deadline:
        router_ip = next(
            (p["status"]["podIP"] for p in node.pods() if p["metadata"]["name"].startswith("router")
             and p.get("status", {}).get("podIP")), None,
        )  # fmt: skip
        time.sleep(1)
    assert router_ip is not None, node.pods()
    table = {"generation": 1, "stage": "stable", "stable": {"version": "v1", "url": f"http://{server_ip}:3000"},
             "candidate": None, "candidate_weight": 0.0, "shadow": []}  # fmt: skip
    control = f"http://{router_ip}:8081"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(httpx.HTTPError):
            put = httpx.put(f"{control}/admin/routing", json=table, timeout=5,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
            if put.is_success:
                break
        assert time.monotonic() < deadline, "the router's control port never answered"
        time.sleep(1)
    routed = wait_ready(node, "router")
    scored = httpx.post(f"http://{routed['status']['podIP']}:8080/api/v1/refund-predict", timeout=10,
                        json={"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2, "accountId": "a-1"})  # fmt: skip
    assert scored.status_code == 200 and scored.json()["model_version"] == "v1", scored.text

    for pod in (served, routed):
        for status in pod["status"]["containerStatuses"]:
            assert status["ready"] and status["restartCount"] == 0, status
        spec = json.loads(node.ctr("containers", "info", status["containerID"].split("//")[-1]).stdout)["Spec"]
        process = spec["process"]
        assert process["user"]["uid"] in (1034, 10001) and process["noNewPrivileges"] is True, process["user"]
        assert spec["root"]["readonly"] is True
        assert not process.get("capabilities", {}).get("effective"), process.get("capabilities")
        assert spec["linux"].get("seccomp"), "RuntimeDefault seccomp"
