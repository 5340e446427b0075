"""The router's Kubernetes table source: a real router process (``python -m rollout.router``) authenticated as the
chart's router ServiceAccount watches the helm-installed ModelRollout and applies its ``status.routing``.

The controller is played by the test here (status writes through the status subresource, as the controller
makes them), so each step is exact: the table at startup, every later table applied in order, an invalid table
refused with the current one kept, a stale generation refused. The seconds from a status write to the router
holding the table are printed (the revert figure of the whole system is measured in test_rollout_kube.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.backends.kube.api import KubeApi, rollout_path
from rollout.router.process import RouterProcess
from tests.e2e.cluster import ControlPlane
from tests.e2e.kubekit import (
    ROLLOUT,
    ROUTER_SA,
    installed_release,
    sample,
    service_account_kubeconfig,
    wait_until,
)

pytestmark = pytest.mark.e2e

TOKEN = "router-kube-token"
UPDATES = 20


@dataclass
class Setup:
    api: KubeApi
    ns: str
    router: RouterProcess

    def write_routing(self, table: dict[str, Any]) -> float:
        """Write ``status.routing`` as the controller does; the monotonic time the API server answered."""
        obj = self.api.get(rollout_path(self.ns, ROLLOUT))
        assert obj is not None
        status = {**(obj.get("status") or {}), "routing": table, "routingGeneration": table.get("generation", 0)}
        self.api.replace(rollout_path(self.ns, ROLLOUT, "status"), {**obj, "status": status})
        return time.monotonic()

    def held(self) -> dict[str, Any] | None:
        response = httpx.get(self.router.control_url + "/admin/routing", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=5, trust_env=False)  # fmt: skip
        return response.json() if response.status_code == 200 else None

    def metrics(self) -> str:
        return httpx.get(self.router.control_url + "/metrics", timeout=5, trust_env=False).text


def table(generation: int, weight: int) -> dict[str, Any]:
    return {
        "generation": generation,
        "stage": "canary" if weight else "stable",
        "stable": {"version": "v1", "url": "http://127.0.0.1:9101"},
        "candidate": {"version": "v2", "url": "http://127.0.0.1:9102"},
        "candidate_weight": weight,
    }


@pytest.fixture(scope="module")
def setup(k8s_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("router-kube")
    with installed_release(k8s_cluster, {}, workdir, "fw-router") as (api, ns):
        kubeconfig = service_account_kubeconfig(k8s_cluster, api, ns, ROUTER_SA, workdir / "router.kubeconfig")
        setup = Setup(api, ns, RouterProcess(log_path=workdir / "router.log", admin_token=TOKEN, env=router_env(
            ns, kubeconfig, workdir)))  # fmt: skip
        setup.write_routing(table(5, 0))  # before the router starts: it reads it at startup
        with setup.router:
            yield setup


def router_env(ns: str, kubeconfig: Path, workdir: Path) -> dict[str, str]:
    return {
        "FW_ROLLOUT_ROUTER__KUBE__ROLLOUT_NAME": ROLLOUT,
        "FW_ROLLOUT_ROUTER__KUBE__NAMESPACE": ns,
        "FW_ROLLOUT_ROUTER__KUBE__KUBECONFIG": str(kubeconfig),
        "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
        "FW_ROLLOUT_OUTCOMES__DSN": f"sqlite:///{workdir / 'predictions.db'}",
    }


def refusals(setup: Setup, result: str) -> float | None:
    labels = {"source": "modelrollout", "result": result}
    return sample(setup.metrics(), "fraudwatch_router_table_updates_total", labels)


def holds(setup: Setup, generation: int) -> dict[str, Any] | None:
    held = setup.held()
    return held if held is not None and held["table"]["generation"] == generation else None


def test_the_table_in_the_status_at_startup_is_applied(setup: Setup) -> None:
    held = wait_until("the startup table", lambda: holds(setup, 5), 30)
    assert held["source"] == "modelrollout"
    assert held["table"]["stage"] == "stable"


def test_every_status_write_reaches_the_router_in_order(setup: Setup) -> None:
    delays = []
    for i in range(UPDATES):
        generation = 10 + i
        written = setup.write_routing(table(generation, 1 + i % 5))
        wait_until(f"generation {generation}", lambda g=generation: holds(setup, g), 10, interval_s=0.002)  # type: ignore[misc]
        delays.append(time.monotonic() - written)
    print(f"\nstatus.routing write → router holds it: p50 {statistics.median(delays) * 1000:.1f} ms, "
          f"max {max(delays) * 1000:.1f} ms over {UPDATES} writes")  # fmt: skip
    assert setup.held() is not None


def test_an_invalid_table_is_refused_and_the_current_one_stays(setup: Setup) -> None:
    before = wait_until("a table", setup.held, 10)
    broken = {**table(before["table"]["generation"] + 1, 5), "stage": "shadow"}  # shadow with weight 5: invalid
    setup.write_routing(broken)
    wait_until("the refusal counted", lambda: refusals(setup, "invalid"), 10)
    assert setup.held() == before


def test_an_older_generation_is_refused_as_stale(setup: Setup) -> None:
    before = wait_until("a table", setup.held, 10)
    setup.write_routing(table(1, 3))
    wait_until("the stale refusal counted", lambda: refusals(setup, "stale"), 10)
    assert setup.held() == before
