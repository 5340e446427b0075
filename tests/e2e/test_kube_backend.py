"""The Kubernetes backend's parts against the real API server, where the API server's behaviour is what matters:
status writes survive its schema (nothing pruned) and its optimistic concurrency (409 → retried), Events are
recorded once, workloads are built from the chart's real templates and owned by the ModelRollout, routing
generations, and Lease leader election (one holder, takeover after expiry, release on shutdown).

The controller process as a whole runs in test_controller_kube.py and test_rollout_kube.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rollout.backends.base import RoutingSpec
from rollout.backends.kube.api import KubeApi, rollout_path
from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.events import KubeEventSink
from rollout.backends.kube.lease import LeaseElector
from rollout.backends.kube.resource import (
    FINALIZER,
    ROLLOUT_LABEL,
    VERSION_LABEL,
    RolloutObject,
    state_of,
    workload_name,
)
from rollout.backends.kube.status import StatusRoutingPublisher, StatusWriter
from rollout.backends.kube.workloads import KubeWorkloads
from rollout.core.policy import load_policy
from rollout.core.workloads import Readiness
from rollout.settings import ControllerSettings, KubeBackendSettings
from tests.kits.cluster import ControlPlane
from tests.kits.doubles import Harness, start_rollout
from tests.kits.kube import (
    MODEL_SERVER_CONFIGMAP,
    admin_api,
    apply_model_server_objects,
    ensure_crd,
    namespace,
    owned,
    render,
    rollout_body,
    version_spec,
    wait_until,
)

pytestmark = pytest.mark.e2e

NAME = "unit-mr"
POLICY = load_policy()


@dataclass
class World:
    api: KubeApi
    ns: str
    settings: ControllerSettings
    cache: RolloutCache

    @property
    def kube(self) -> KubeBackendSettings:
        return self.settings.kube

    def rollout(self) -> dict[str, Any]:
        obj = self.api.get(rollout_path(self.ns, NAME))
        assert obj is not None
        return obj

    def writer(self) -> StatusWriter:
        return StatusWriter(self.api, self.cache, self.kube, lambda: POLICY)


@pytest.fixture(scope="module")
def api(k8s_cluster: ControlPlane) -> Iterator[KubeApi]:
    client = admin_api(k8s_cluster)
    ensure_crd(k8s_cluster, client)
    yield client
    client.close()


@pytest.fixture(scope="module")
def templates(k8s_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(k8s_cluster, {}, tmp_path_factory.mktemp("render"), "fraud")


@pytest.fixture
def world(api: KubeApi, templates: list[dict[str, Any]]) -> Iterator[World]:
    with namespace(api, "fw-backend") as ns:
        apply_model_server_objects(api, templates, ns)
        api.create(rollout_path(ns), rollout_body(NAME, {"candidate": version_spec("v2")}))
        kube = KubeBackendSettings(namespace=ns, model_server_configmap=MODEL_SERVER_CONFIGMAP, watch_timeout_s=30,
                                   lease_duration_s=3, renew_deadline_s=2, retry_period_s=0.5)  # fmt: skip
        settings = ControllerSettings(name=NAME, backend="kube", kube=kube)
        cache = RolloutCache(api, settings)
        cache.start()
        assert cache.wait_synced(20)
        try:
            yield World(api, ns, settings, cache)
        finally:
            cache.stop()


def canary_state(tmp_path: Path) -> Any:
    """A real controller state mid-canary (gate histories with values, transitions with gate results), made by the
    reconcile loop on the unit tests' in-memory world."""
    harness = Harness(tmp_path / "state")
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary" and bool(harness.rollout.gates))
    return harness.controller.state


# ------------------------------------------------------------------------------------------------ status


def test_the_whole_status_survives_the_schema_and_reads_back_equal(world: World, tmp_path: Path) -> None:
    state = canary_state(tmp_path)
    writer = world.writer()
    writer.state = state
    publisher = StatusRoutingPublisher(writer)
    publisher.publish(RoutingSpec("canary", "v1", "v2", 5), {"v1": "http://v1.x.svc:80", "v2": "http://v2.x.svc:80"})

    stored = world.rollout()["status"]
    composed = writer.compose(RolloutObject(world.rollout()))
    assert stored == composed  # the API server pruned nothing of what the controller writes
    assert state_of(stored) == state
    assert (stored["phase"], stored["stage"], stored["stableWeight"], stored["candidateWeight"]) == (
        "Progressing", "canary", 95, 5,
    )  # fmt: skip
    assert {g["name"] for g in stored["gates"]} == set(state.rollout.gates)
    assert [h["toStage"] for h in stored["history"]] == [t.to_stage for t in state.rollout.history]
    assert {c["type"] for c in stored["conditions"]} == {
        "Progressing", "Available", "Paused", "Ready", "Stalled", "Reconciling",
    }  # fmt: skip
    assert all("observedGeneration" in c for c in stored["conditions"])  # the schema keeps kstatus' field
    assert stored["routing"]["candidate_weight"] == 5 and stored["routingGeneration"] == stored["routing"]["generation"]
    assert writer.write() is False  # nothing new: no write


def test_a_status_write_meeting_a_newer_resource_version_is_retried(world: World, tmp_path: Path) -> None:
    stale = world.rollout()
    world.api.merge_patch(rollout_path(world.ns, NAME), {"spec": {"paused": True}})  # someone edits the spec
    cache = RolloutCache(world.api, world.settings)  # not started: its copy stays the stale one
    cache.rollout.put(stale)
    writer = StatusWriter(world.api, cache, world.kube, lambda: POLICY)
    writer.state = canary_state(tmp_path)

    assert writer.write() is True
    assert writer.conflicts == 1
    stored = world.rollout()
    assert stored["spec"]["paused"] is True  # the status write never touched the spec
    assert state_of(stored["status"]) == writer.state


def test_routing_generations_grow_only_when_the_table_changes(world: World) -> None:
    publisher = StatusRoutingPublisher(world.writer())
    urls = {"v1": "http://a:80", "v2": "http://b:80"}

    first = publisher.publish(RoutingSpec("shadow", "v1", "v2", 0), urls)
    again = publisher.publish(RoutingSpec("shadow", "v1", "v2", 0), urls)
    moved = publisher.publish(RoutingSpec("canary", "v1", "v2", 5), urls)

    # the first table of an object starts at the clock (ms): above any table of an earlier object of the same name
    assert first.outcome == "applied" and first.generation > 1_600_000_000_000
    assert (again.outcome, again.generation) == ("unchanged", first.generation)
    assert (moved.outcome, moved.generation) == ("applied", first.generation + 1)
    assert world.rollout()["status"]["routing"]["stage"] == "canary"
    (table,) = publisher.read()
    assert table.spec == RoutingSpec("canary", "v1", "v2", 5) and table.generation == first.generation + 1


# ------------------------------------------------------------------------------------------------ events


def test_each_transition_is_one_event_also_after_a_restart(world: World, tmp_path: Path) -> None:
    rollout = canary_state(tmp_path).rollout
    sink = KubeEventSink(world.api, world.cache, world.kube, "replica-a")

    first = sink.sync(rollout)
    restarted = KubeEventSink(world.api, world.cache, world.kube, "replica-b").sync(rollout)

    assert first == list(rollout.history) and restarted == []
    events = world.api.list(f"/api/v1/namespaces/{world.ns}/events")["items"]
    ours = [e for e in events if e["involvedObject"]["name"] == NAME]
    assert len(ours) == len(rollout.history)
    assert {e["reason"] for e in ours} == {"StageEntered"}
    assert all(e["involvedObject"]["uid"] == world.rollout()["metadata"]["uid"] for e in ours)
    assert any("shadow → Progressing/canary" in e["message"] for e in ours)


# ------------------------------------------------------------------------------------------------ workloads


def test_a_version_runs_as_a_deployment_and_service_from_the_chart_templates(world: World) -> None:
    workloads = KubeWorkloads(world.api, world.cache, world.kube)
    name = workload_name(NAME, "v2")

    first = workloads.ensure_running("v2")
    ready = wait_until("v2 ready (kwok)", lambda: s if (s := workloads.ensure_running("v2")).ready else None, 60)
    applied = workloads.applied

    deployments = owned(world.api, world.ns, "deployments", rollout=NAME)
    services = owned(world.api, world.ns, "services", "v1", rollout=NAME)
    deployment, service = deployments[name], services[name]
    uid = world.rollout()["metadata"]["uid"]
    assert first.readiness in (Readiness.STARTING, Readiness.READY)
    assert ready.url == f"http://{name}.{world.ns}.svc:80"
    for obj in (deployment, service):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("ModelRollout", uid, True)
        assert obj["metadata"]["labels"][VERSION_LABEL] == "v2"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "model-server"
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.invalid/fraudwatch/model:v2"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True  # the template's hardening is kept
    assert pod["metadata"]["labels"][ROLLOUT_LABEL] == NAME
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert workloads.running() == ("v2",)

    workloads.ensure_running("v2")
    assert workloads.applied == applied  # level-triggered: an unchanged manifest is not sent again

    assert workloads.scale_down("v2") is True
    wait_until("v2's objects gone", lambda: not owned(world.api, world.ns, "deployments", rollout=NAME), 60)
    assert workloads.status("v2").readiness is Readiness.STOPPED


def test_the_url_seam_maps_a_version_to_a_local_process(world: World) -> None:
    kube = world.kube.model_copy(update={"version_urls": {"v2": "http://127.0.0.1:3999"}})
    workloads = KubeWorkloads(world.api, world.cache, kube)
    wait_until("v2 ready", lambda: workloads.ensure_running("v2").ready, 60)

    assert workloads.status("v2").url == "http://127.0.0.1:3999"
    assert workloads.ensure_running("v9").readiness is Readiness.FAILED  # the ModelRollout names no v9


def test_the_finalizer_is_a_plain_metadata_entry(world: World) -> None:
    """What the controller adds is accepted by the API server and blocks deletion until removed."""
    path = rollout_path(world.ns, NAME)
    world.api.merge_patch(path, {"metadata": {"finalizers": [FINALIZER]}})
    world.api.delete(path)
    held = world.rollout()
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["finalizers"] == [FINALIZER]
    world.api.merge_patch(path, {"metadata": {"finalizers": []}})
    wait_until("the ModelRollout gone", lambda: world.api.get(path) is None, 30)


# ------------------------------------------------------------------------------------------------ leader election


def electors(world: World, *identities: str) -> list[LeaseElector]:
    kube = world.kube
    return [
        LeaseElector(
            world.api,
            world.ns,
            "unit-lease",
            identity,
            kube.lease_duration_s,
            kube.renew_deadline_s,
            kube.retry_period_s,
        )
        for identity in identities
    ]


def test_one_elector_leads_and_a_standby_takes_over_after_the_lease_expires(world: World) -> None:
    a, b = electors(world, "a", "b")
    a.start()
    assert a.leading.wait(10)
    b.start()
    time.sleep(world.kube.lease_duration_s + 1)
    assert not b.leading.is_set()  # the holder renews: the standby stays a standby

    a.stop(release=False)  # a crash: nobody renews, nobody releases
    stopped = time.monotonic()
    assert b.leading.wait(world.kube.lease_duration_s + 5)
    took = time.monotonic() - stopped
    b.stop()

    assert world.kube.lease_duration_s - world.kube.retry_period_s <= took <= world.kube.lease_duration_s + 3
    assert b.acquired_after_s is not None


def test_a_released_lease_is_taken_over_at_once(world: World) -> None:
    a, b = electors(world, "a", "b")
    a.start()
    assert a.leading.wait(10)
    b.start()
    a.stop(release=True)
    released = time.monotonic()
    assert b.leading.wait(10)
    took = time.monotonic() - released
    b.stop()

    assert took < world.kube.lease_duration_s
    lease = world.api.get(f"/apis/coordination.k8s.io/v1/namespaces/{world.ns}/leases/unit-lease")
    assert lease is not None and lease["spec"]["leaseTransitions"] >= 1


def test_a_leader_that_cannot_renew_stops_leading_within_the_renew_deadline(world: World) -> None:
    """Someone else holds the Lease now (a partition healed the wrong way, an operator's edit): the leader's renewals
    fail, and it stops acting once the renew deadline has passed — before anyone may take over."""
    (a,) = electors(world, "a")
    a.start()
    assert a.leading.wait(10)
    path = f"/apis/coordination.k8s.io/v1/namespaces/{world.ns}/leases/unit-lease"
    lease = world.api.get(path)
    assert lease is not None
    world.api.replace(path, {**lease, "spec": {**lease["spec"], "holderIdentity": "intruder"}})
    taken = time.monotonic()

    assert a.lost.wait(world.kube.renew_deadline_s + 3)
    lost_after = time.monotonic() - taken
    a.stop(release=False)
    assert not a.leading.is_set()
    assert lost_after < world.kube.lease_duration_s  # it stopped before the intruder's lease could expire
