"""Helpers of the e2e tests that run fraudwatch's own Kubernetes code (the controller's backend, the router's watch,
``kubectl modelrollout``) on the session's real control plane.

* the ModelRollout CRD applied server-side and Established (what ``kubectl apply --server-side -f crds/`` does);
* the chart rendered with ``helm template`` and installed with ``helm install --wait``;
* a kubeconfig that authenticates as a ServiceAccount (a TokenRequest token signed by the API server), so the
  processes under test run with exactly the chart's RBAC — never as the admin;
* a controller process (``python -m rollout.controller``, backend kube) with its environment and log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from rollout.backends.kube.api import KubeApi, KubeError, core_path, rollout_path
from tests.chartkit import CHART_DIR, CRD_FILE, DRY_RENDER_VALUES, parse_manifests, values_file
from tests.e2e.cluster import ControlPlane, free_port

T = TypeVar("T")
HOST = "127.0.0.1"
RELEASE = "fw"
ROLLOUT = "fw-fraudwatch"
CONTROLLER_SA = f"{ROLLOUT}-controller"
ROUTER_SA = f"{ROLLOUT}-router"
MODEL_SERVER_CONFIGMAP = f"{ROLLOUT}-model-server"
LEASE = f"{ROLLOUT}-controller"
CRD_NAME = "modelrollouts.fraudwatch.io"
#: Test values: nothing waits on storage or load balancers; a fixed admin token keeps renders deterministic.
#: This control plane publishes no `kubernetes` EndpointSlice (tests/e2e/cluster.py: it listens on loopback), so the
#: chart's API-server egress is named (DRY_RENDER_VALUES), as it must be wherever the lookup finds nothing.
BASE_VALUES: dict[str, Any] = {"router": {"adminToken": {"value": "e2e-admin-token"}}, **DRY_RENDER_VALUES}
TOKEN_SECONDS = 3600
PROCESS_STOP_TIMEOUT_S = 20.0


def wait_until(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy (not None, False, 0 or empty); that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def admin_api(cluster: ControlPlane) -> KubeApi:
    return KubeApi.connect(cluster.kubeconfig, None, 10.0)


def ensure_crd(cluster: ControlPlane, api: KubeApi) -> None:
    """The chart's CRD, applied server-side and Established (idempotent: every module may call it)."""
    document = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
    api.apply(path, document, "fraudwatch-e2e")

    def established() -> bool:
        crd = api.get(path) or {}
        return any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in (crd.get("status") or {}).get("conditions") or []
        )

    cluster.wait_for(f"CRD {CRD_NAME} Established", established)


@contextlib.contextmanager
def namespace(api: KubeApi, prefix: str) -> Iterator[str]:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        with contextlib.suppress(KubeError):
            for obj in api.list(rollout_path(name)).get("items", []):  # no controller is left to finalize them
                api.merge_patch(rollout_path(name, obj["metadata"]["name"]), {"metadata": {"finalizers": []}})
            api.delete(f"/api/v1/namespaces/{name}")


def helm(cluster: ControlPlane, *args: str) -> str:
    result = cluster.run_tool("helm", *args)
    return result.stdout + result.stderr


def render(cluster: ControlPlane, values: Mapping[str, Any], workdir: Path, ns: str) -> list[dict[str, Any]]:
    out = cluster.run_tool("helm", "template", RELEASE, str(CHART_DIR), "--namespace", ns, "-f",
                           str(values_file({**BASE_VALUES, **values}, workdir))).stdout  # fmt: skip
    return parse_manifests(out)


def helm_install(cluster: ControlPlane, values: Mapping[str, Any], workdir: Path, ns: str) -> str:
    return helm(
        cluster, "install", RELEASE, str(CHART_DIR), "--namespace", ns, "-f",
        str(values_file({**BASE_VALUES, **values}, workdir)), "--wait", "--timeout", "180s",
    )  # fmt: skip


@contextlib.contextmanager
def installed_release(
    cluster: ControlPlane, values: Mapping[str, Any], workdir: Path, prefix: str
) -> Iterator[tuple[KubeApi, str]]:
    """An admin API client and a fresh namespace with the chart installed (``helm install --wait``; the CRD first)."""
    api = admin_api(cluster)
    try:
        ensure_crd(cluster, api)
        with namespace(api, prefix) as ns:
            helm_install(cluster, values, workdir, ns)
            yield api, ns
    finally:
        api.close()


def helm_upgrade(cluster: ControlPlane, ns: str, *sets: str) -> str:
    args = [a for s in sets for a in ("--set", s)]
    return helm(cluster, "upgrade", RELEASE, str(CHART_DIR), "--namespace", ns, "--reuse-values", *args)


_CORE_PLURALS = {"ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts"}


def apply_model_server_objects(api: KubeApi, objects: list[dict[str, Any]], ns: str) -> None:
    """The chart's model-server ConfigMap (the templates) and ServiceAccount (the pods run as it), applied into
    ``ns`` — what the controller needs of an installed release."""
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in _CORE_PLURALS and name == MODEL_SERVER_CONFIGMAP:
            body = {**obj, "metadata": {**obj["metadata"], "namespace": ns}}
            api.apply(core_path(ns, _CORE_PLURALS[kind], name), body, "fraudwatch-e2e")


def service_account_kubeconfig(cluster: ControlPlane, api: KubeApi, ns: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ``system:serviceaccount:<ns>:<account>`` (a TokenRequest token)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": TOKEN_SECONDS}}  # fmt: skip
    token = api.create(core_path(ns, "serviceaccounts", account) + "/token", request)["status"]["token"]
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "e2e", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.pki.ca.cert)}}
        ],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "e2e", "user": account, "namespace": ns}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    path.chmod(0o600)
    return path


def get_rollout(api: KubeApi, ns: str, name: str = ROLLOUT) -> dict[str, Any] | None:
    return api.get(rollout_path(ns, name))


def rollout_body(name: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ModelRollout v1 → v2 (fake images: kwok runs no container)."""
    base: dict[str, Any] = {
        "modelName": "refund-fraud",
        "stable": {"version": "v1", "image": "registry.invalid/fraudwatch/model:v1", "replicas": 1},
        "candidate": {"version": "v1", "image": "registry.invalid/fraudwatch/model:v1", "replicas": 1},
    }
    return {"apiVersion": "fraudwatch.io/v1alpha1", "kind": "ModelRollout", "metadata": {"name": name},
            "spec": {**base, **(spec or {})}}  # fmt: skip


def version_spec(version: str, replicas: int = 1) -> dict[str, Any]:
    return {"version": version, "image": f"registry.invalid/fraudwatch/model:{version}", "replicas": replicas}


def can(api: KubeApi, user: str, verb: str, resource: str, ns: str, name: str | None = None) -> bool:
    """The API server's RBAC answer (a SubjectAccessReview) for a service account; ``resource`` is
    ``group:plural[/subresource]`` (group empty for the core API)."""
    group, _, rest = resource.partition(":")
    plural, _, subresource = rest.partition("/")
    attributes: dict[str, Any] = {"group": group, "resource": plural, "verb": verb, "namespace": ns}
    if subresource:
        attributes["subresource"] = subresource
    if name is not None:
        attributes["name"] = name
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    result = api.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    return bool(result["status"].get("allowed"))


# --------------------------------------------------------------------------------------------------- processes


def controller_env(
    cluster: ControlPlane, kubeconfig: Path, ns: str, identity: str, port: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the chart gives the controller (templates/_env.tpl), pointed at this cluster."""
    prefix, kube = "FW_ROLLOUT_CONTROLLER__", "FW_ROLLOUT_CONTROLLER__KUBE__"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}",
        "FW_ROLLOUT_LOG_LEVEL": "INFO",
        f"{prefix}BACKEND": "kube",
        f"{prefix}NAME": ROLLOUT,
        f"{prefix}HOST": HOST,
        f"{prefix}METRICS_PORT": str(port),
        f"{kube}NAMESPACE": ns,
        f"{kube}KUBECONFIG": str(kubeconfig),
        f"{kube}MODEL_SERVER_CONFIGMAP": MODEL_SERVER_CONFIGMAP,
        f"{kube}LEASE_NAME": LEASE,
        f"{kube}IDENTITY": identity,
    }
    env.pop("KUBECONFIG", None)
    env.update(extra or {})
    return env


@dataclass
class ControllerProcess:
    """``python -m rollout.controller`` on the kube backend, as a child process with its own log."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=lambda: free_port(HOST))
    process: subprocess.Popen[bytes] | None = None

    @property
    def identity(self) -> str:
        return self.env["FW_ROLLOUT_CONTROLLER__KUBE__IDENTITY"]

    def start(self) -> ControllerProcess:
        self.env["FW_ROLLOUT_CONTROLLER__METRICS_PORT"] = str(self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rollout.controller"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            return process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            return process.wait()

    def metrics(self) -> str:
        try:
            return httpx.get(f"http://{HOST}:{self.port}/metrics", timeout=5, trust_env=False).text
        except httpx.HTTPError:
            return ""

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample of the controller's /metrics (None when absent)."""
        return sample(self.metrics(), name, labels)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def sample(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of the first sample ``name`` with these labels in a Prometheus text exposition (None: absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(found.value)
    return None


def lease_holder(api: KubeApi, ns: str, name: str = LEASE) -> str | None:
    lease = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}")
    return (lease or {}).get("spec", {}).get("holderIdentity") or None


def owned(
    api: KubeApi, ns: str, plural: str, group_version: str = "apps/v1", rollout: str = ROLLOUT
) -> dict[str, dict[str, Any]]:
    """The model-server objects (Deployments, Services) of the rollout, by name."""
    base = f"/apis/{group_version}" if group_version != "v1" else "/api/v1"
    listed = api.list(f"{base}/namespaces/{ns}/{plural}", [("labelSelector", f"fraudwatch.io/rollout={rollout}")])
    return {o["metadata"]["name"]: o for o in listed.get("items", [])}
