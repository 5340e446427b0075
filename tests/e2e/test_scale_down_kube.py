"""A version is scaled down on Kubernetes only once every router replica confirms a table without it (issue 12,
point 3): the controller (``python -m rollout.controller``, backend kube, as the chart's controller ServiceAccount)
lists the router replicas behind the routers' control Service through its EndpointSlices — made by the real
controller manager for the chart's two (kwok) router pods — and reads each replica's table with ``GET
/admin/routing`` and the admin token.

kwok's pods run no process, so each router pod is stood in for by a real router process on loopback (the
documented seam ``controller.kube.router_urls``: pod name → URL). The test drives their tables through their
admin endpoint: one replica lags behind ``status.routing`` still naming the aborted candidate in shadow, and the
candidate's Deployment must stay until it catches up. Before, the controller read back only its own
``status.routing`` and deleted the candidate at once, while the replica still shadowed it.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.backends.kube.api import KubeApi, rollout_path
from rollout.backends.kube.resource import SERVICE_NAME_LABEL, router_endpoints, workload_name
from rollout.core.routing import RoutingTable
from rollout.router.process import RouterProcess
from tests.e2e.cluster import ControlPlane
from tests.e2e.kubekit import (
    BASE_VALUES,
    CONTROLLER_SA,
    ROLLOUT,
    ControllerProcess,
    controller_env,
    get_rollout,
    installed_release,
    owned,
    service_account_kubeconfig,
    version_spec,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONVERGE_S = 90.0
#: How long the candidate must stay while a replica still names it: many reconciles (0.5 s each).
HELD_S = 8.0
ADMIN_TOKEN = BASE_VALUES["router"]["adminToken"]["value"]
ROUTER_SERVICE = f"{ROLLOUT}-router-feedback"
VALUES: dict[str, Any] = {
    "model": {"replicas": 1},
    "prometheus": {"url": "http://127.0.0.1:9"},
    "router": {"replicaCount": 2, "autoscaling": {"enabled": False}},
    # an aborted candidate is due for scale-down at once: only the replicas' confirmation holds it
    "rollout": {"policy": {"promotion": {"scale_down_delay_s": 0}}},
}


@dataclass
class Stack:
    cluster: ControlPlane
    api: KubeApi
    ns: str
    workdir: Path
    routers: dict[str, RouterProcess]  # router pod name → its stand-in

    def status(self) -> dict[str, Any]:
        obj = get_rollout(self.api, self.ns)
        assert obj is not None
        return dict(obj.get("status") or {})

    def hold(self, pod: str, table: dict[str, Any]) -> None:
        """Make the replica ``pod`` hold ``table`` (a newer generation than it has)."""
        router = self.routers[pod]
        held = httpx.get(router.control_url + "/admin/routing", headers=auth(), timeout=10, trust_env=False)
        generation = held.json()["table"]["generation"] + 1 if held.status_code == 200 else 1
        body = RoutingTable.model_validate({**table, "generation": generation}).model_dump_json()
        put = httpx.put(router.control_url + "/admin/routing", content=body, headers=auth(), timeout=10,
                        trust_env=False)  # fmt: skip
        assert put.status_code == 200, put.text

    def deployments(self) -> set[str]:
        return set(owned(self.api, self.ns, "deployments"))


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def replica_pods(api: KubeApi, ns: str) -> list[str] | None:
    """The router pods behind the control Service, once the controller manager lists both as serving."""
    slices = api.list(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                      (("labelSelector", f"{SERVICE_NAME_LABEL}={ROUTER_SERVICE}"),))["items"]  # fmt: skip
    names = [e.name for e in router_endpoints(slices, "feedback")]
    return names if len(names) == 2 else None


@pytest.fixture(scope="module")
def stack(k8s_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("scale-down-kube")
    with installed_release(k8s_cluster, VALUES, workdir, "fw-scale") as (api, ns):
        pods = wait_until("both router replicas in the EndpointSlices", lambda: replica_pods(api, ns), CONVERGE_S)
        routers = {
            pod: RouterProcess(log_path=workdir / f"router-{n}.log", admin_token=ADMIN_TOKEN,
                               env={"FW_ROLLOUT_OUTCOMES__DSN": f"sqlite:///{workdir / f'predictions-{n}.db'}"})
            for n, pod in enumerate(pods)
        }  # fmt: skip
        try:
            for router in routers.values():
                router.start()
            for router in routers.values():
                router.wait_live()
            yield Stack(k8s_cluster, api, ns, workdir, routers)
        finally:
            for router in routers.values():
                router.stop()


def test_an_aborted_candidate_is_scaled_down_only_once_every_router_replica_dropped_it(stack: Stack) -> None:
    kubeconfig = service_account_kubeconfig(stack.cluster, stack.api, stack.ns, CONTROLLER_SA,
                                            stack.workdir / "controller.kubeconfig")  # fmt: skip
    urls = {pod: router.control_url for pod, router in stack.routers.items()}
    extra = {
        "FW_ROLLOUT_CONTROLLER__PROMETHEUS_URL": "http://127.0.0.1:9",
        "FW_ROLLOUT_CONTROLLER__KUBE__ROUTER_SERVICE": ROUTER_SERVICE,
        "FW_ROLLOUT_CONTROLLER__KUBE__ROUTER_URLS": json.dumps(urls),
        "FW_ROLLOUT_ROUTER__ADMIN_TOKEN": ADMIN_TOKEN,
    }
    env = controller_env(stack.cluster, kubeconfig, stack.ns, "e2e-scale", 0, extra)
    controller = ControllerProcess(env, stack.workdir / "controller.log").start()
    try:
        steady = wait_until("a steady status", lambda: (s := stack.status()).get("routing") and s, CONVERGE_S)
        stable = steady["routing"]["stable"]["version"]
        lagging, current = sorted(stack.routers)
        for pod in stack.routers:
            stack.hold(pod, steady["routing"])  # both replicas follow status.routing

        # the retraining hand-off's way (a patch of spec.candidate): a helm upgrade would also roll the router pods
        stack.api.merge_patch(rollout_path(stack.ns, ROLLOUT), {"spec": {"candidate": version_spec("v2")}})
        candidate = workload_name(ROLLOUT, "v2")
        wait_until("v2's Deployment", lambda: candidate in stack.deployments(), CONVERGE_S)
        shadowing = {**steady["routing"], "stage": "shadow",
                     "candidate": {"version": "v2", "url": "http://v2.invalid:80"}}  # fmt: skip
        stack.hold(lagging, shadowing)  # this replica still shadows v2 …
        aborted = stack.api.merge_patch(
            rollout_path(stack.ns, ROLLOUT),
            {"spec": {"manualCommand": {"id": "e2e-abort", "kind": "abort", "reason": "e2e",
                                        "requestedAt": "2026-01-01T00:00:00Z"}}},
        )  # fmt: skip
        assert aborted
        wait_until("the rollout aborted, routing back on the stable",
                   lambda: stack.status().get("phase") == "Aborted"
                   and stack.status()["routing"].get("candidate") is None, CONVERGE_S)  # fmt: skip

        held_until = time.monotonic() + HELD_S
        while time.monotonic() < held_until:  # … so v2 stays, reconcile after reconcile
            assert candidate in stack.deployments(), controller.log_tail()
            time.sleep(0.5)
        waiting = f"scale-down of v2 waits for router {lagging}"
        assert waiting in stack.status().get("message", ""), stack.status().get("message")
        assert current not in stack.status().get("message", "")  # the other replica had confirmed

        assert replica_pods(stack.api, stack.ns) == sorted(stack.routers)  # the same two replicas all along
        stack.hold(lagging, stack.status()["routing"])  # the replica catches up
        wait_until("v2's Deployment deleted", lambda: candidate not in stack.deployments(), CONVERGE_S)
        assert workload_name(ROLLOUT, stable) in stack.deployments()
    finally:
        assert controller.stop(signal.SIGTERM) == 0, controller.log_tail()
