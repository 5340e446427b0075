"""The rollout walked from the images: the router, the controller and the model servers as containers under podman,
each with the security context and the environment the Helm chart renders for it.

scripts/images.sh builds the images (cached by content hash: seconds when nothing changed, a few minutes the first
time). ``helm template`` renders the chart; tests/kits/pod.py turns the router's and the controller's pod specs into
``podman run`` (uid/gid, read-only root filesystem, every capability dropped, no privilege escalation, the emptyDirs as
tmpfs, the Secrets as read-only files, the rendered environment). The controller runs with its podman backend
(rollout/backends/podman.py): it starts one model-server container per version through the libpod API, with the
chart's model-server template's security context and environment. Prometheus (Debian's, with the project's rules)
and locust run as processes, as in the local walk; rolloutctl runs in the controller's container (podman exec).

What differs from the chart, and why: no Kubernetes API server here, so the chart's Kubernetes wiring
(FW_ROLLOUT_ROUTER__KUBE__*, FW_ROLLOUT_CONTROLLER__KUBE__*, BACKEND=kube) is replaced by the admin-endpoint routing
and the podman backend's settings; the router and the controller share the host's network namespace (the model
servers' ports are published on 127.0.0.1) and so listen on 127.0.0.1 instead of 0.0.0.0; the controller runs the
retraining image, which carries [train,controller] — the registry-backed quality stage scores bundles with XGBoost
and moves MLflow aliases (README, "Images").

The scenarios and their assertions are the local walk's (tests/integration/test_rollout_local.py, imported): a good
candidate promoted through every stage, a revert, a bad candidate rolled back by an outcome gate, Prometheus
scraping the controller and the model servers; then the containers' security context is checked against the chart.
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
from tests.kits.chart import Helm, locate_helm, one
from tests.kits.pod import PodmanService, Run, images, inspect, podman_run, rm, secret_data
from tests.kits.rollout import (
    HOST,
    POLICY_YAML,
    START_TIMEOUT_S,
    Models,
    build_models,
    prometheus_server,
)
from tests.kits.stack import REPLAY_SERVE_SETTINGS, ControllerConfig
from tests.kits.stack import controller_env as kit_controller_env
from tests.kits.waiting import wait_for
from tests.kits.walk import (
    NAME,
    TOKEN,
    Stack,
    serve_traffic,
    stop_traffic,
    walk_bad_candidate,
    walk_good_candidate,
    walk_prometheus_scrapes,
    walk_revert,
)

pytestmark = pytest.mark.integration

NAMESPACE = "fraudwatch"
FEEDBACK_TOKEN = "podman-walk-feedback-token"
CONTROLLER_UID = 10001
#: The router's test budgets (tests/kits/rollout.py's router_env), as the chart's router.settings.
ROUTER_SETTINGS = {
    "log_decisions": False,
    "candidate_timeout_s": 2.0,
    "stable_timeout_s": 4.0,
    "shadow_timeout_s": 2.0,
}
KUBE_WIRING = ("FW_ROLLOUT_ROUTER__KUBE__", "FW_ROLLOUT_CONTROLLER__KUBE__")


def router_live(url: str) -> bool:
    try:
        return httpx.get(url + "/livez", timeout=5, trust_env=False).status_code == httpx.codes.OK
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class RouterContainer:
    """The router container's two listeners (the shape tests/kits/rollout.py's helpers expect of a router)."""

    name: str
    url: str
    control_url: str
    feedback_token: str


def chart_objects(workdir: Path, router_port: int, control_port: int, metrics_port: int) -> list[dict[str, Any]]:
    values = {
        "logLevel": "INFO",
        "router": {
            "port": router_port,
            "feedback": {"port": control_port, "token": {"value": FEEDBACK_TOKEN}},
            "adminToken": {"value": TOKEN},
            "exposeDecisionDetails": True,  # the walk's assertions read model_version from the answers
            "settings": ROUTER_SETTINGS,
        },
        "controller": {"metricsPort": metrics_port},
        "modelServer": {"settings": REPLAY_SERVE_SETTINGS},
        "networkPolicy": {"enabled": False},
    }
    helm = Helm.isolated(locate_helm(), workdir / "helm-home")
    (workdir / "helm-home").mkdir(exist_ok=True)
    return helm.template(values, workdir, release="fw", namespace=NAMESPACE)


def pod_spec(objects: list[dict[str, Any]], component: str) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = one(objects, "Deployment", f"-{component}")["spec"]["template"]["spec"]
    return spec


def without_kube_wiring(env: dict[str, str], **replace: str) -> dict[str, str]:
    """The chart's environment less its Kubernetes wiring (no API server here), with ``replace`` applied."""
    return {k: v for k, v in env.items() if not k.startswith(KUBE_WIRING)} | replace


def model_server_template(objects: list[dict[str, Any]]) -> tuple[dict[str, str], str]:
    """The chart's model-server environment (no per-version entries) and ``uid:gid`` from its pod template."""
    template = yaml.safe_load(one(objects, "ConfigMap", "-model-server")["data"]["pod-template.yaml"])
    container = template["spec"]["containers"][0]
    env = {e["name"]: str(e["value"]) for e in container["env"]}
    csc = container["securityContext"]
    return env, f"{csc['runAsUser']}:{csc['runAsGroup']}"


def chown_tree(path: Path, uid: int) -> None:
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(path)], check=True, timeout=120)


@dataclass
class PodmanStack(Stack):
    """The local walk's Stack with the controller as a container (start/stop by podman)."""

    controller_run: Run | None = None
    controller_image: str = ""
    mounts: tuple[str, ...] = ()

    @property
    def controller_name(self) -> str:
        return f"fw-{NAME}-controller"

    def start_controller(self) -> None:
        assert self.controller_run is not None
        rm(self.controller_name)
        argv = self.controller_run.argv(self.controller_name, self.controller_image, "--network", "host", *self.mounts)
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """rolloutctl inside the controller's container (its user, its environment, its state directory), as an
        operator on this host would run it: ``podman exec <controller> rolloutctl …``."""
        return subprocess.run(["podman", "exec", self.controller_name, "rolloutctl", *args], capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip

    def stop_controller(self, sig: Any = None) -> None:
        log = self.workdir / "controller.log"
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            logs = subprocess.run(["podman", "logs", self.controller_name], capture_output=True, timeout=60)
            log.write_bytes(logs.stdout + logs.stderr)
        subprocess.run(["podman", "stop", "-t", "30", self.controller_name], capture_output=True, timeout=120)
        rm(self.controller_name)


def start_router(objects: list[dict[str, Any]], image: str, workdir: Path, ports: tuple[int, int]) -> RouterContainer:
    pod = pod_spec(objects, "router")
    container = pod["containers"][0]
    fields = {"metadata.namespace": NAMESPACE, "metadata.name": "fw-router-0"}
    run = podman_run(pod, container, secret_data(objects), fields, workdir / "router-secrets",
                     env=lambda env: without_kube_wiring(env, FW_ROLLOUT_ROUTER__HOST=HOST))  # fmt: skip
    name = f"fw-{NAME}-router"
    rm(name)
    subprocess.run(run.argv(name, image, "--network", "host"), check=True, capture_output=True, timeout=120)
    return RouterContainer(name, f"http://{HOST}:{ports[0]}", f"http://{HOST}:{ports[1]}", FEEDBACK_TOKEN)


def controller_run(
    objects: list[dict[str, Any]], models: Models, workdir: Path, router: RouterContainer, port: int, **podman: str
) -> tuple[Run, dict[str, str]]:
    """The controller's container (the chart's, on the podman backend) and rolloutctl's environment."""
    config = ControllerConfig(
        name=NAME, model_home=models.home, workdir=workdir, prometheus_url="", router_control_url=router.control_url,
        metrics_port=port, policy_yaml=POLICY_YAML, admin_token=TOKEN, quality_set=models.regression_meta,
        start_timeout_s=START_TIMEOUT_S,
    )  # fmt: skip
    kit = {k: v for k, v in kit_controller_env(config).items() if k.startswith("FW_")}
    prefix = "FW_ROLLOUT_CONTROLLER__"
    backend = {f"{prefix}BACKEND": "podman", f"{prefix}HOST": HOST}
    backend |= {f"{prefix}PODMAN__{key.upper()}": value for key, value in podman.items()}
    pod = pod_spec(objects, "controller")
    fields = {"metadata.namespace": NAMESPACE, "metadata.name": "fw-controller-0"}
    run = podman_run(pod, pod["containers"][0], secret_data(objects), fields, workdir / "controller-secrets",
                     env=lambda env: without_kube_wiring(env) | kit | backend)  # fmt: skip
    return run, kit | backend


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("model-home"))


@pytest.fixture(scope="module")
def stack(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    built = images("serve", "router", "retraining")
    workdir = tmp_path_factory.mktemp("rollout-podman")
    service = PodmanService(workdir / "podman")
    ports = (free_port(HOST), free_port(HOST))
    metrics_port = free_port(HOST)
    objects = chart_objects(workdir, *ports, metrics_port)
    prometheus = prometheus_server(workdir / "prometheus")
    server_env, server_user = model_server_template(objects)
    started = time.monotonic()
    prometheus.start()
    service.start()
    router = start_router(objects, built["router"], workdir, ports)
    run, env = controller_run(
        objects, models, workdir, router, metrics_port,
        socket="/run/podman/podman.sock", image=built["serve"], user=server_user, env=json.dumps(server_env),
    )  # fmt: skip
    env["FW_ROLLOUT_CONTROLLER__PROMETHEUS_URL"] = run.env["FW_ROLLOUT_CONTROLLER__PROMETHEUS_URL"] = prometheus.url
    chown_tree(workdir, CONTROLLER_UID)  # the controller writes its state, the bundles and the scrape targets …
    chown_tree(models.home, CONTROLLER_UID)  # … and moves the registry's aliases (SQLite)
    mounts = ("-v", f"{workdir}:{workdir}", "-v", f"{models.home}:{models.home}",
              "-v", f"{service.socket}:/run/podman/podman.sock")  # fmt: skip
    built_stack = PodmanStack(models, workdir, prometheus, router, metrics_port, env,
                              controller_run=run, controller_image=built["retraining"], mounts=mounts)  # fmt: skip
    try:
        wait_for(lambda: router_live(router.url) or None, "the router container live", 120)  # not ready: no table
        serve_traffic(built_stack, started)
        yield built_stack
    finally:
        stop_traffic(built_stack)
        for found in json.loads(subprocess.run(
            ["podman", "ps", "-a", "--format", "json", "--filter", f"label=io.fraudwatch.rollout={NAME}"],
            capture_output=True, text=True, timeout=60, check=False).stdout or "[]"):  # fmt: skip
            rm(found["Names"][0])
        with contextlib.suppress(subprocess.SubprocessError):
            (workdir / "router.log").write_bytes(subprocess.run(["podman", "logs", router.name], capture_output=True,
                                                                timeout=60).stdout)  # fmt: skip
        rm(router.name)
        service.stop()
        prometheus.stop()
        shutil.rmtree(workdir / "router-secrets", ignore_errors=True)
        print(f"\npodman rollout timings: {json.dumps(built_stack.timings)}")


# The local walk's scenarios, in its order, against this module's stack.
def test_a_good_candidate_is_promoted_through_every_stage(stack: Stack) -> None:
    walk_good_candidate(stack)


def test_revert_puts_every_decision_back_on_the_previous_version(stack: Stack) -> None:
    walk_revert(stack)


def test_a_bad_candidate_is_rolled_back_by_an_outcome_gate(stack: Stack) -> None:
    walk_bad_candidate(stack)


def test_prometheus_scrapes_the_controller_and_the_model_servers_it_registered(stack: Stack) -> None:
    walk_prometheus_scrapes(stack)


def test_every_container_runs_with_the_charts_security_context(stack: Stack) -> None:
    """The router, the controller and every model server the controller started: non-root uid/gid of the chart,
    read-only root filesystem, no capabilities, no privilege escalation."""
    assert isinstance(stack, PodmanStack)
    servers = subprocess.run(
        ["podman", "ps", "--format", "json", "--filter", f"label=io.fraudwatch.rollout={NAME}"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    names = [c["Names"][0] for c in json.loads(servers.stdout)]
    assert names, "no model-server container runs"
    expected = {stack.controller_name: "10001:10001", f"fw-{NAME}-router": "10001:10001"}
    expected |= dict.fromkeys(names, "1034:1034")
    for name, user in expected.items():
        found = inspect(name)
        assert found["Config"]["User"] == user, (name, found["Config"]["User"])
        assert found["HostConfig"]["ReadonlyRootfs"] is True, name
        assert found["HostConfig"]["CapAdd"] in (None, []), name
        assert "no-new-privileges" in (found["HostConfig"]["SecurityOpt"] or []), name
        assert found["HostConfig"]["CapDrop"], name
