"""The full walk on Kubernetes: the helm-installed ModelRollout rolled out by the real controller, every part real.

On the session's control plane (etcd, kube-apiserver, controller manager, scheduler, kwok):

* ``helm install --wait`` of the chart with the time-compressed policy of tests/kits/rollout.py in ``spec.policy``;
* two controller processes (``python -m rollout.controller``, backend kube, as the chart's controller
  ServiceAccount) with Lease leader election: one leads, the other stands by;
* the router process (as the router ServiceAccount) watching the ModelRollout's ``status.routing``;
* the model versions served by real local ``bentoml serve`` processes — kwok's pods run nothing, so the
  controller's documented seam ``controller.kube.version_urls`` maps each version to its process (the controller
  still creates and waits for each version's Deployment and Service, which kwok makes available);
* a real Prometheus scraping the router, the model servers and both controllers with the project's rules; locust
  (its CLI) sending refund traffic and delayed fraud labels; the MLflow registry (SQLite) for aliases and the
  regression set of the quality stage.

Scenarios, in order (each leaves the stack as the next expects it):

1. ``helm upgrade --set model.version=v2``: v2 is promoted through quality, shadow, canary, A/B and full; only the
   leader acted (the standby never reconciled);
2. ``kubectl modelrollout revert``: every decision is back on v1 — the seconds from the command reaching the API
   server to the router holding the table are measured and printed, and must be ≤ 1 s;
3. ``model.version=v3``: rolled back by an outcome gate in A/B or full, its health and drift gates having passed;
4. ``model.version=v2`` again: the only controller SIGKILLed mid-shadow and started again resumes where it was;
   then (paused with ``kubectl modelrollout pause`` while the second replica starts, and moved to canary with
   ``promote --to canary`` if it was still in shadow) the leader SIGKILLed mid-canary: the standby takes over once
   the Lease expires, the rollout is where it was — still paused — and the new leader applies the ``resume``. Each
   time: same stage, same stage clock, the same Deployments, every transition recorded exactly once across the
   processes' lives; the rollout then moves on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rollout.backends.kube.api import Informer, KubeApi, rollout_path
from rollout.backends.kube.resource import event_name, state_of
from rollout.backends.local.prometheus import ScrapeTarget
from rollout.core.machine import RolloutState
from rollout.router.process import RouterProcess
from service.serving.process import BentoServer
from tests.kits.cluster import ControlPlane
from tests.kits.kube import (
    CONTROLLER_SA,
    ROLLOUT,
    ROUTER_SA,
    ControllerProcess,
    admin_api,
    controller_env,
    ensure_crd,
    get_rollout,
    helm_install,
    helm_upgrade,
    lease_holder,
    namespace,
    owned,
    service_account_kubeconfig,
)
from tests.kits.rollout import (
    POLICY_YAML,
    ROLLOUT_TIMEOUT_S,
    START_TIMEOUT_S,
    Models,
    aliases_if,
    answer,
    build_models,
    check_good_ab_exit,
    check_outcome_rollback,
    prometheus_server,
    published_tables,
    router_env,
    router_ready,
    stage_timings,
    start_locust,
    stop_locust,
)
from tests.kits.stack import replay_server_env
from tests.kits.waiting import wait_for

pytestmark = pytest.mark.e2e

TOKEN = "rollout-kube-token"
VERSIONS = ("v1", "v2", "v3")
#: Lease duration, renew deadline and retry period (s): a standby takes over within seconds, not the default 15.
LEASE = {"leaseDurationSeconds": 6, "renewDeadlineSeconds": 4, "retryPeriodSeconds": 1}
REVERT_BUDGET_S = 1.0


@dataclass
class Walk:
    cluster: ControlPlane
    api: KubeApi
    ns: str
    workdir: Path
    models: Models
    router: RouterProcess
    controllers: dict[str, ControllerProcess]
    timings: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        obj = get_rollout(self.api, self.ns)
        assert obj is not None
        return dict(obj.get("status") or {})

    def rollout(self) -> RolloutState | None:
        state = state_of(self.status())
        return state.rollout if state is not None else None

    def routing(self) -> dict[str, Any]:
        response = httpx.get(self.router.control_url + "/admin/routing", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=10, trust_env=False)  # fmt: skip
        response.raise_for_status()
        table: dict[str, Any] = response.json()["table"]
        return table

    def answer(self) -> dict[str, Any]:
        return answer(self.router.url)

    def plugin(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.cluster.env['PATH']}"}
        return subprocess.run([str(self.cluster.bin_dir / "kubectl"), "modelrollout", *args, ROLLOUT, "-n", self.ns],
                              capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip

    def start(self, version: str) -> str:
        """``helm upgrade --set model.version=<version>``; the id of the rollout the controller started."""
        helm_upgrade(self.cluster, self.ns, f"model.version={version}")

        def started() -> str | None:
            rollout = self.rollout()
            if rollout is not None and rollout.candidate == version and rollout.phase == "Progressing":
                return rollout.rollout_id
            return None

        return wait_for(started, f"a rollout of {version}", 60, 0.2)

    def finished(self, rollout_id: str) -> RolloutState:
        def done() -> RolloutState | None:
            rollout = self.rollout()
            if rollout is not None and rollout.rollout_id == rollout_id and rollout.phase != "Progressing":
                return rollout
            return None

        return wait_for(done, f"rollout {rollout_id} to finish", ROLLOUT_TIMEOUT_S)

    def timed_rollout(self, version: str, name: str) -> RolloutState:
        """Roll ``version`` out and wait until the rollout ends; its duration and stage times in the timings."""
        started = time.monotonic()
        rollout = self.finished(self.start(version))
        self.timings[f"{name}_s"] = round(time.monotonic() - started, 1)
        self.timings[f"{name}_stage_s"] = stage_timings(rollout)
        return rollout

    def at_stage(self, rollout_id: str, stage: str) -> RolloutState:
        def there() -> RolloutState | None:
            rollout = self.rollout()
            if rollout is None or rollout.rollout_id != rollout_id:
                return None
            assert rollout.phase == "Progressing", f"{rollout.phase}: {rollout.history[-1].reason}"
            return rollout if rollout.stage == stage else None

        return wait_for(there, f"rollout {rollout_id} at {stage}", ROLLOUT_TIMEOUT_S)

    def leader(self) -> str | None:
        return lease_holder(self.api, self.ns)

    def reconciles(self, identity: str) -> float:
        """How often a controller process reconciled (0 for one that never led)."""
        count = self.controllers[identity].sample("fraudwatch_rollout_reconcile_duration_seconds_count")
        return count or 0.0


def model_server(models: Models, workdir: Path, version: str) -> BentoServer:
    """A real ``bentoml serve`` of one version's bundle, with a BentoML home of its own."""
    settings = models.settings.model_copy(update={"home": workdir / "servers" / version})
    return BentoServer(model_dir=models.home / "bundles" / version, settings=settings, name=f"model-{version}",
                       extra_env=replay_server_env(workdir))  # fmt: skip


def router_process(workdir: Path, ns: str, kubeconfig: Path) -> RouterProcess:
    """The router watching the ModelRollout, as the router ServiceAccount."""
    kube = "FW_ROLLOUT_ROUTER__KUBE__"
    env = {**router_env(workdir), f"{kube}ROLLOUT_NAME": ROLLOUT, f"{kube}NAMESPACE": ns,
           f"{kube}KUBECONFIG": str(kubeconfig)}  # fmt: skip
    return RouterProcess(log_path=workdir / "router.log", admin_token=TOKEN, env=env)


def controller_process(walk_dir: Path, cluster: ControlPlane, kubeconfig: Path, ns: str, identity: str,
                       extra: dict[str, str]) -> ControllerProcess:  # fmt: skip
    home = walk_dir / f"controller-{identity}"
    env = controller_env(cluster, kubeconfig, ns, identity, 0, {**extra, "FW_ROLLOUT_HOME": str(home)})
    return ControllerProcess(env, walk_dir / f"controller-{identity}.log")


@pytest.fixture(scope="module")
def walk(k8s_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    started = time.monotonic()
    models = build_models(tmp_path_factory.mktemp("model-home"))
    workdir = tmp_path_factory.mktemp("rollout-kube")
    api = admin_api(k8s_cluster)
    ensure_crd(k8s_cluster, api)
    servers = {v: model_server(models, workdir, v) for v in VERSIONS}
    prometheus = prometheus_server(workdir / "prometheus")
    locust: subprocess.Popen[bytes] | None = None
    controllers: dict[str, ControllerProcess] = {}
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(namespace(api, "fw-walk"))
        for server in servers.values():
            server.start()
            stack.callback(server.stop)
        values = {"model": {"replicas": 1}, "rollout": {"policy": yaml.safe_load(POLICY_YAML)},
                  "controller": {"leaderElection": LEASE}}  # fmt: skip
        helm_install(k8s_cluster, values, workdir, ns)
        controller_kubeconfig = service_account_kubeconfig(k8s_cluster, api, ns, CONTROLLER_SA,
                                                           workdir / "controller.kubeconfig")  # fmt: skip
        router_kubeconfig = service_account_kubeconfig(k8s_cluster, api, ns, ROUTER_SA, workdir / "router.kubeconfig")
        router = router_process(workdir, ns, router_kubeconfig)
        prometheus.start()  # its targets follow (file SD) once every address is known
        stack.callback(prometheus.stop)
        for server in servers.values():
            server.wait_ready()
        urls = {v: s.url for v, s in servers.items()}
        kube = "FW_ROLLOUT_CONTROLLER__KUBE__"
        extra = {
            "FW_HOME": str(models.home),
            "FW_ROLLOUT_CONTROLLER__PROMETHEUS_URL": prometheus.url,
            "FW_ROLLOUT_CONTROLLER__QUALITY_SET": str(models.regression_meta),
            f"{kube}USE_REGISTRY": "true",
            f"{kube}VERSION_URLS": json.dumps(urls),
            f"{kube}LEASE_DURATION_S": str(LEASE["leaseDurationSeconds"]),
            f"{kube}RENEW_DEADLINE_S": str(LEASE["renewDeadlineSeconds"]),
            f"{kube}RETRY_PERIOD_S": str(LEASE["retryPeriodSeconds"]),
        }
        for identity in ("a", "b"):
            controllers[identity] = controller_process(workdir, k8s_cluster, controller_kubeconfig, ns, identity, extra)
        router.start()
        stack.callback(router.stop)
        router.wait_live()
        targets = [ScrapeTarget(router.control_url.removeprefix("http://"), {"component": "static"})]
        targets += [ScrapeTarget(u.removeprefix("http://"), {"component": "model-server"}) for u in urls.values()]
        targets += [ScrapeTarget(f"127.0.0.1:{c.port}", {"component": "static"}) for c in controllers.values()]
        prometheus.set_targets(targets)
        for controller in controllers.values():
            stack.callback(controller.stop)
        controllers["a"].start()
        wait_for(lambda: lease_holder(api, ns) == "a", "controller a leading", 60)
        controllers["b"].start()
        built = Walk(k8s_cluster, api, ns, workdir, models, router, controllers)
        wait_for(lambda: built.answer() if router_ready(router.url) else None, "v1 behind the router", START_TIMEOUT_S)
        locust = start_locust(router, workdir / "locust.log")
        stack.callback(stop_locust, locust)
        built.timings["stack_ready_s"] = round(time.monotonic() - started, 1)
        try:
            yield built
        finally:
            print(f"\nrollout on Kubernetes, timings: {json.dumps(built.timings)}")
    api.close()


# --------------------------------------------------------------------------------------------------- scenarios


def test_a_good_version_is_promoted_through_every_stage_by_the_leader_only(walk: Walk) -> None:
    rollout = walk.timed_rollout("v2", "promotion")

    assert rollout.phase == "Promoted", rollout.history[-1].reason
    assert [(t.from_stage, t.to_stage) for t in rollout.history] == [
        ("quality", "shadow"), ("shadow", "canary"), ("canary", "ab"), ("ab", "full"), ("full", "full"),
    ]  # fmt: skip
    check_good_ab_exit(rollout.history[3])
    status = walk.status()
    assert (status["phase"], status["stableVersion"], status["previous"]["version"]) == ("Promoted", "v2", "v1")
    wait_for(lambda: walk.routing()["stable"]["version"] == "v2" or None, "the router on v2", 30)
    table = walk.routing()
    assert [e["version"] for e in table["shadow"]] == ["v1"]  # warm for a one-step revert
    assert walk.answer()["model_version"] == "v2"
    wait_for(lambda: aliases_if(walk.models, champion="v2"), "the champion alias on v2", 30)
    assert set(owned(walk.api, walk.ns, "deployments")) >= {f"{ROLLOUT}-v1", f"{ROLLOUT}-v2"}
    events = walk.api.list(f"/api/v1/namespaces/{walk.ns}/events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == ROLLOUT}
    assert {"RolloutStarted", "StageEntered", "Promoted"} <= reasons

    assert walk.leader() == "a"
    assert walk.reconciles("a") > 0
    assert walk.reconciles("b") == 0  # the standby watched, and never acted
    assert walk.controllers["b"].sample("fraudwatch_rollout_controller_leader") == 0


def test_kubectl_modelrollout_revert_takes_effect_within_a_second(walk: Walk) -> None:
    """Measured, not slept: an informer of the test sees the command arrive at the API server; a poller of the
    router (every 2 ms) sees the router hold the table with v1 as stable."""
    seen: dict[str, float] = {}

    def on_change(_kind: str, obj: dict[str, Any]) -> None:
        command = (obj.get("spec") or {}).get("manualCommand") or {}
        if command.get("kind") == "revert":
            seen.setdefault("command_at_api", time.monotonic())

    informer = Informer(walk.api, rollout_path(walk.ns), "walk-rollout", name=ROLLOUT, on_change=on_change)
    informer.start()
    assert informer.wait_synced(10)
    switched = threading.Event()

    def poll_router() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5, trust_env=False) as client:
            while not switched.is_set():
                table = client.get(walk.router.control_url + "/admin/routing").json()["table"]
                if table["stable"]["version"] == "v1" and table.get("candidate") is None:
                    seen["router_holds"] = time.monotonic()
                    switched.set()
                    return
                time.sleep(0.002)

    poller = threading.Thread(target=poll_router, daemon=True)
    poller.start()
    issued = time.monotonic()
    done = walk.plugin("revert", "--reason", "e2e drill")
    returned = time.monotonic()
    switched.wait(30)
    informer.stop()

    assert done.returncode == 0, done.stdout + done.stderr
    assert "command_at_api" in seen and "router_holds" in seen, seen
    effect_s = seen["router_holds"] - seen["command_at_api"]
    figures = {
        "revert_command_at_api_to_router_s": round(effect_s, 3),
        "revert_kubectl_start_to_router_s": round(seen["router_holds"] - issued, 3),
        "revert_kubectl_wall_s": round(returned - issued, 3),
    }
    walk.timings.update(figures)
    print(f"\nrevert on Kubernetes: {json.dumps(figures)}")
    assert effect_s <= REVERT_BUDGET_S
    assert walk.answer()["model_version"] == "v1"
    rollout = walk.rollout()
    assert rollout is not None and rollout.phase == "RolledBack" and rollout.history[-1].trigger == "command"
    wait_for(lambda: aliases_if(walk.models, champion="v1"), "the champion alias back on v1", 30)


def test_a_bad_version_is_rolled_back_by_an_outcome_gate(walk: Walk) -> None:
    rollout = walk.timed_rollout("v3", "rollback")

    recall = check_outcome_rollback(rollout)
    status = walk.status()
    assert (status["phase"], status["stableVersion"]) == ("RolledBack", "v1")
    assert any(g["result"] == "Failed" and g["name"] == recall for g in status["gates"])
    wait_for(lambda: walk.routing()["candidate"] is None or None, "the stable-only table", 30)
    assert walk.routing()["stable"]["version"] == "v1"
    assert walk.answer()["model_version"] == "v1"
    events = walk.api.list(f"/api/v1/namespaces/{walk.ns}/events")["items"]
    assert any(e["reason"] == "RolledBack" and e["type"] == "Warning" for e in events)


def deployment_uids(walk: Walk) -> dict[str, str]:
    return {n: d["metadata"]["uid"] for n, d in owned(walk.api, walk.ns, "deployments").items()}


def logged_transitions(controller: ControllerProcess, rollout_id: str) -> list[int]:
    return [int(e["seq"]) for e in controller.log_events()
            if e.get("event") == "rollout_transition" and e.get("rollout_id") == rollout_id]  # fmt: skip


def assert_resumed(walk: Walk, before: RolloutState, uids: dict[str, str]) -> None:
    """The rollout as ``before`` left it: the same id, its history kept as it was, the same stage clock, the same
    Deployments (adopted, not re-created)."""
    after = walk.rollout()
    assert after is not None and after.rollout_id == before.rollout_id
    assert after.history[: len(before.history)] == before.history  # nothing lost, nothing redone
    assert next(t.at for t in after.history if t.to_stage == before.stage) == before.stage_entered_at
    assert {n: u for n, u in deployment_uids(walk).items() if n in uids} == uids


def test_a_killed_controller_resumes_mid_stage_and_a_standby_replaces_a_killed_leader(walk: Walk) -> None:
    # the only controller, SIGKILLed mid-shadow and started again (a pod restarted in place)
    walk.controllers["b"].stop()
    rollout_id = walk.start("v2")
    in_shadow = walk.at_stage(rollout_id, "shadow")
    shadow_uids = deployment_uids(walk)
    # killed once it has recorded the stage it is in: a kill between creating an Event and logging it is another test
    # (the restarted controller finds the Event and rightly does not log the transition a second time)
    seen = set(range(len(in_shadow.history)))
    wait_for(lambda: seen <= set(logged_transitions(walk.controllers["a"], rollout_id)) or None,
             "the shadow transitions recorded", 30)  # fmt: skip
    walk.controllers["a"].stop(signal.SIGKILL)
    killed = time.monotonic()
    walk.controllers["a"].start()
    wait_for(lambda: walk.reconciles("a") > 0, "the restarted controller reconciling", 60)
    walk.timings["restart_to_reconcile_s"] = round(time.monotonic() - killed, 2)
    assert walk.leader() == "a"  # its own Lease record: taken back at once, not after the lease duration
    assert_resumed(walk, in_shadow, shadow_uids)
    # paused while the second replica starts (seconds on a busy machine: canary lasts 3.4 s), then moved to canary by
    # hand and left paused there, so the leader is killed mid-canary whatever the machine's speed
    held = walk.plugin("pause")
    assert held.returncode == 0, held.stdout + held.stderr
    walk.controllers["b"].start()
    wait_for(lambda: walk.controllers["b"].sample("fraudwatch_rollout_controller_leader") == 0 or None,
             "the second replica standing by", 30)  # fmt: skip
    paused = walk.rollout()
    assert paused is not None and paused.paused and paused.stage in ("shadow", "canary"), paused
    if paused.stage == "shadow":
        moved_on = walk.plugin("promote", "--to", "canary")
        assert moved_on.returncode == 0, moved_on.stdout + moved_on.stderr

    # the leader SIGKILLed mid-canary, the standby taking over once the Lease expires
    before = walk.rollout()
    assert before is not None and (before.stage, before.paused) == ("canary", True), before
    uids = deployment_uids(walk)
    assert walk.leader() == "a" and walk.reconciles("b") == 0

    walk.controllers["a"].stop(signal.SIGKILL)
    killed = time.monotonic()
    assert walk.answer()["model_version"] in ("v1", "v2")  # the data plane does not need a controller
    wait_for(lambda: walk.leader() == "b", "the standby holding the Lease", 60, 0.05)
    walk.timings["takeover_s"] = round(time.monotonic() - killed, 2)
    wait_for(lambda: walk.reconciles("b") > 0, "the new leader reconciling", 30)

    assert_resumed(walk, before, uids)
    resumed = walk.plugin("resume")  # applied by the new leader: the pause outlived the takeover
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    def past_canary() -> RolloutState | None:
        rollout = walk.rollout()
        assert rollout is not None
        return rollout if rollout.stage in ("ab", "full") or rollout.phase != "Progressing" else None

    moved = wait_for(past_canary, "the rollout to move past canary", ROLLOUT_TIMEOUT_S)
    walk.timings["resume_to_next_stage_s"] = round(time.monotonic() - killed, 1)
    assert moved.phase in ("Progressing", "Promoted"), moved.history[-1].reason
    assert [(t.from_stage, t.to_stage) for t in moved.history if t.from_stage != t.to_stage][:3] == [
        ("quality", "shadow"), ("shadow", "canary"), ("canary", "ab"),
    ]  # fmt: skip

    done = walk.plugin("abort", "--reason", "end of test")
    assert done.returncode in (0, 4), done.stdout + done.stderr  # 4: it finished on its own first
    final = walk.finished(rollout_id)
    by_a, by_b = (
        logged_transitions(walk.controllers["a"], rollout_id),
        logged_transitions(walk.controllers["b"], rollout_id),
    )
    assert sorted(by_a + by_b) == list(range(len(final.history)))  # each transition recorded once, by one of them

    def every_event() -> bool:  # Events follow the status write
        names = {e["metadata"]["name"] for e in walk.api.list(f"/api/v1/namespaces/{walk.ns}/events")["items"]}
        return all(event_name(ROLLOUT, rollout_id, str(i)) in names for i in range(len(final.history)))

    wait_for(every_event, "an Event per transition", 30)
    tables = published_tables(walk.controllers["a"].log_path) + published_tables(walk.controllers["b"].log_path)
    assert all(a != b for a, b in itertools.pairwise(tables))  # no table sent twice in a row, takeover or not

    walk.controllers["a"].start()  # back, as the standby now
    wait_for(lambda: walk.controllers["a"].sample("fraudwatch_rollout_controller_leader") == 0 or None,
             "the restarted replica standing by", 30)  # fmt: skip
    assert walk.leader() == "b"
