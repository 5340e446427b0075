"""rollout.backends.kube.resource (and the Lease decision): the Kubernetes backend's pure parts.

Workloads are built from the chart's real model-server templates (``helm template``); controller states come from
the real reconcile loop on the unit tests' in-memory world (tests/kits/doubles.py). The API server's side
of the same objects is tested in tests/e2e/test_kube_backend.py.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rollout.backends.kube.lease import decide
from rollout.backends.kube.resource import (
    MODEL_ALIAS_ENV,
    MODEL_URI_ENV,
    SPEC_HASH_ANNOTATION,
    ContractError,
    RolloutObject,
    StatusInputs,
    Templates,
    build_scaling,
    build_workload,
    compose_status,
    deployment_readiness,
    effective_policy,
    event_name,
    event_reason,
    history_rows,
    pod_restarts,
    pod_trouble,
    revision_versions,
    router_endpoints,
    spec_commands,
    spec_start_id,
    undo_patch,
    workload_name,
)
from rollout.core.commands import InboxCommand
from rollout.core.events import reason_code
from rollout.core.machine import Transition
from rollout.core.policy import deep_merge, load_policy
from rollout.core.routing import RoutingTable
from rollout.core.state import ControllerState, Revision
from rollout.core.workloads import Readiness
from tests.kits.chart import DRY_RENDER_VALUES, Helm, HelmNotFoundError, locate_helm, one
from tests.kits.doubles import POLICY, Harness, start_rollout

NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def obj(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, generation: int = 3) -> RolloutObject:
    base = {
        "stable": {"version": "v1", "image": "img:v1"},
        "candidate": {"version": "v1", "image": "img:v1"},
    }
    raw = {
        "apiVersion": "fraudwatch.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {
            "name": "fw",
            "namespace": "fraud",
            "uid": "u-1",
            "generation": generation,
            "resourceVersion": "42",
        },
        "spec": {**base, **(spec or {})},
        "status": status or {},
    }
    return RolloutObject(raw)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return _templates(tmp_path_factory, {})


SCALING_VALUES: dict[str, Any] = {
    "modelServer": {
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 60},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    }
}


@pytest.fixture(scope="module")
def scaling_templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return _templates(tmp_path_factory, SCALING_VALUES)


def _templates(tmp_path_factory: pytest.TempPathFactory, values: dict[str, Any]) -> Templates:
    try:
        helm = Helm.isolated(locate_helm(), tmp_path_factory.mktemp("helm")).with_base(DRY_RENDER_VALUES)
    except HelmNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    objects = helm.template(values, tmp_path_factory.mktemp("values"))
    return Templates.from_configmap(one(objects, "ConfigMap", "-model-server"))


def harness_state(tmp_path: Path, until: str) -> ControllerState:
    harness = Harness(tmp_path / "state")
    start_rollout(harness)
    if until == "Promoted":
        harness.run_until(lambda: harness.phase() == "Promoted")
    else:
        harness.run_until(lambda: harness.rollout.stage == until and bool(harness.rollout.gates))
    return harness.controller.state


# --------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("version", ["v1", "V2.0_rc1", "2024-05-01", "x" * 63, "a.b.c"])
def test_workload_names_are_unique_dns_labels(version: str) -> None:
    name = workload_name("fw-fraudwatch", version)
    assert DNS_LABEL.match(name) and len(name) <= 63
    assert workload_name("fw-fraudwatch", version) == name
    assert workload_name("fw-fraudwatch", version + "1") != name


def test_plain_names_stay_readable() -> None:
    assert workload_name("fw-fraudwatch", "v7") == "fw-fraudwatch-v7"


def test_event_names_are_deterministic_dns_subdomains() -> None:
    name = event_name("fw-fraudwatch", "V2-g7", "3")
    assert name == event_name("fw-fraudwatch", "V2-g7", "3") == "fw-fraudwatch.v2-g7.3"
    assert len(event_name("x" * 200, "y" * 128, "12")) <= 253


# --------------------------------------------------------------------------------------------------- workloads


def test_a_workload_is_the_chart_template_with_the_version_filled_in(templates: Templates) -> None:
    spec = obj({"candidate": {"version": "v2", "image": "img:v2", "registryAlias": "challenger", "replicas": 3,
                              "resources": {"limits": {"cpu": "2"}}}})  # fmt: skip
    version = spec.known_versions()["v2"]
    deployment, service = build_workload(templates, spec, version)

    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "fw-v2"
    assert deployment["metadata"]["ownerReferences"] == [spec.owner_reference()]
    assert deployment["spec"]["replicas"] == 3
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]
    assert all(pod["metadata"]["labels"][k] == v for k, v in selector.items())
    assert service["spec"]["selector"] == selector
    assert pod["metadata"]["labels"]["app.kubernetes.io/version"] == "v2"
    assert "app.kubernetes.io/instance" in pod["metadata"]["labels"]  # the template's labels are kept (NetworkPolicy)
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "img:v2"
    assert container["resources"] == {"limits": {"cpu": "2"}}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[MODEL_ALIAS_ENV] == "challenger" and MODEL_URI_ENV not in env
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_without_scaling_values_a_version_gets_no_hpa_or_pdb_and_a_fixed_replica_count(templates: Templates) -> None:
    spec = obj({"candidate": {"version": "v2", "image": "img:v2"}})
    version = spec.known_versions()["v2"]
    assert (templates.hpa, templates.pdb) == (None, None)
    assert build_scaling(templates, spec, version) == ()
    assert build_workload(templates, spec, version)[0]["spec"]["replicas"] == 1


def test_each_version_gets_its_own_hpa_and_pdb_from_the_chart_values(scaling_templates: Templates) -> None:
    spec = obj({"candidate": {"version": "v2", "image": "img:v2", "replicas": 3}})
    version = spec.known_versions()["v2"]
    deployment, _ = build_workload(scaling_templates, spec, version)
    hpa, pdb = build_scaling(scaling_templates, spec, version)

    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert (hpa["apiVersion"], hpa["kind"], pdb["apiVersion"], pdb["kind"]) == (
        "autoscaling/v2", "HorizontalPodAutoscaler", "policy/v1", "PodDisruptionBudget",
    )  # fmt: skip
    name = deployment["metadata"]["name"]
    assert hpa["metadata"]["name"] == pdb["metadata"]["name"] == name
    assert hpa["metadata"]["ownerReferences"] == pdb["metadata"]["ownerReferences"] == [spec.owner_reference()]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    # another version's PDB selects none of this version's pods
    other = obj({"candidate": {"version": "v3", "image": "img:v3"}})
    other_pdb = build_scaling(scaling_templates, other, other.known_versions()["v3"])[1]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in other_pdb["spec"]["selector"]["matchLabels"].items())


def test_the_spec_hash_changes_with_the_version_spec_only(templates: Templates) -> None:
    one_spec = obj({"candidate": {"version": "v2", "image": "img:v2"}})
    same = build_workload(templates, one_spec, one_spec.known_versions()["v2"])[0]
    again = build_workload(templates, one_spec, one_spec.known_versions()["v2"])[0]
    other = obj({"candidate": {"version": "v2", "image": "img:v2b", "modelUri": "models:/m/2"}})
    changed = build_workload(templates, other, other.known_versions()["v2"])[0]

    hashes = [d["metadata"]["annotations"][SPEC_HASH_ANNOTATION] for d in (same, again, changed)]
    assert hashes[0] == hashes[1] != hashes[2]
    env = {e["name"]: e.get("value") for e in changed["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[MODEL_URI_ENV] == "models:/m/2"


def test_a_configmap_of_another_contract_is_refused(templates: Templates) -> None:
    with pytest.raises(ContractError, match="contract version"):
        Templates.from_configmap({"data": {"contract-version": "2"}})
    with pytest.raises(ContractError, match="incomplete"):
        Templates.from_configmap({"data": {"contract-version": "1"}})


def test_a_version_spec_is_immutable_once_recorded() -> None:
    recorded = obj({"candidate": {"version": "v2", "image": "img:v2-rebuilt"}},
                   {"candidate": {"version": "v2", "image": "img:v2"}})  # fmt: skip
    assert recorded.known_versions()["v2"].image == "img:v2"


@pytest.mark.parametrize(
    ("status", "readiness"),
    [
        ({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}, Readiness.READY),
        ({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}, Readiness.STARTING),
        ({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}, Readiness.STARTING),
        ({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}, Readiness.STARTING),
        ({"conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]}, Readiness.FAILED),
        ({"conditions": [{"type": "ReplicaFailure", "status": "True", "message": "no sa"}]}, Readiness.FAILED),
    ],
)
def test_deployment_readiness(status: dict[str, Any], readiness: Readiness) -> None:
    deployment = {"metadata": {"generation": 2}, "spec": {"replicas": 2}, "status": status}
    assert deployment_readiness(deployment)[0] is readiness


def pod(uid: str, *containers: dict[str, Any], init: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    status = {"containerStatuses": list(containers), "initContainerStatuses": list(init)}
    return {"metadata": {"uid": uid, "name": f"pod-{uid}"}, "status": status}


def test_pod_restarts_count_every_container_of_every_pod() -> None:
    pods = [
        pod("a", {"restartCount": 4}, {"restartCount": 1}, init=({"restartCount": 2},)),
        pod("b", {"restartCount": 0}),
        {"metadata": {"uid": "c"}, "status": {}},  # scheduled, no container status yet
    ]
    assert pod_restarts(pods) == {"a": 7, "b": 0, "c": 0}


def test_pod_trouble_names_the_first_pod_that_cannot_run() -> None:
    crashing = {"restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}
    starting = {"restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}
    assert pod_trouble([pod("a", starting)]) == ""
    assert pod_trouble([pod("a", starting), pod("b", crashing)]) == "pod pod-b: CrashLoopBackOff (back-off 40s)"
    pull = {"state": {"waiting": {"reason": "ImagePullBackOff"}}}
    assert pod_trouble([pod("c", init=(pull,))]) == "pod pod-c: ImagePullBackOff"


# --------------------------------------------------------------------------------------------------- commands


def ids(commands: list[InboxCommand | str]) -> list[tuple[str, str]]:
    return [(c.kind, c.id) if isinstance(c, InboxCommand) else ("invalid", c) for c in commands]


def test_steady_spec_asks_for_nothing() -> None:
    assert spec_commands(obj(), ControllerState(name="fw"), NOW) == []


def test_after_the_first_sight_the_recorded_stable_is_authoritative_not_spec_stable() -> None:
    """`helm upgrade --set model.version=v2` renders spec.stable == spec.candidate == v2 (no model.stable set):
    v1, recorded as serving, stays the stable and v2 is rolled out against it."""
    upgraded = {"stable": {"version": "v2", "image": "img:v2"}, "candidate": {"version": "v2", "image": "img:v2"}}
    spec = obj(upgraded, {"stableVersion": "v1", "stable": {"version": "v1", "image": "img:v1"}})

    (start,) = spec_commands(spec, ControllerState(name="fw"), NOW)
    assert isinstance(start, InboxCommand) and start.candidate == "v2"
    status = compose_status(spec, inputs(None))
    assert (status["stableVersion"], status["stable"]["image"]) == ("v1", "img:v1")


def test_a_new_candidate_starts_a_rollout_once(tmp_path: Path) -> None:
    spec = obj({"candidate": {"version": "v2", "image": "img:v2"}}, generation=7)
    (start,) = spec_commands(spec, ControllerState(name="fw"), NOW)
    assert isinstance(start, InboxCommand)
    assert (start.kind, start.id, start.candidate) == ("start", "v2-g7", "v2")

    progressing = harness_state(tmp_path, "shadow")
    assert spec_commands(spec, progressing, NOW) == []  # the rollout of v2 runs


def test_a_candidate_the_last_rollout_ended_with_is_not_started_again(tmp_path: Path) -> None:
    promoted = harness_state(tmp_path, "Promoted")  # v1 → v2, Promoted: v2 serves
    assert spec_commands(obj({"candidate": {"version": "v2", "image": "i"}}), promoted, NOW) == []
    assert promoted.rollout is not None
    reverted = promoted.model_copy(update={"rollout": promoted.rollout.model_copy(
        update={"phase": "RolledBack"})})  # fmt: skip
    assert spec_commands(obj({"candidate": {"version": "v2", "image": "i"}}), reverted, NOW) == []
    (start,) = spec_commands(obj({"candidate": {"version": "v3", "image": "i"}}), reverted, NOW)
    assert isinstance(start, InboxCommand) and start.candidate == "v3"


def test_manual_commands_come_first_and_invalid_ones_say_why() -> None:
    manual = {"id": "op-1", "kind": "revert", "reason": "drill", "requestedBy": "ana"}
    (command,) = spec_commands(obj({"manualCommand": manual}), ControllerState(name="fw"), NOW)
    assert isinstance(command, InboxCommand)
    assert (command.kind, command.id, command.reason, command.issued_by) == ("revert", "op-1", "drill", "ana")

    (invalid,) = spec_commands(obj({"manualCommand": {"id": "has space", "kind": "abort"}}), ControllerState(name="fw"),
                               NOW)  # fmt: skip
    assert isinstance(invalid, str) and "id" in invalid

    retry = {"id": "op-2", "kind": "retry", "reason": "fixed labels"}  # the controller's own, allowed from the spec
    (again,) = spec_commands(obj({"manualCommand": retry}), ControllerState(name="fw"), NOW)
    assert isinstance(again, InboxCommand) and (again.kind, again.candidate) == ("retry", None)
    (start,) = spec_commands(obj({"manualCommand": {"id": "op-3", "kind": "start"}}), ControllerState(name="fw"), NOW)
    assert isinstance(start, str) and "start command" in start  # a rollout starts when spec.candidate changes


@pytest.mark.parametrize(("wanted", "why"), [("v3", "the new candidate"), ("v1", "the stable again")])
def test_a_changed_candidate_supersedes_the_running_rollout(tmp_path: Path, wanted: str, why: str) -> None:
    """`helm upgrade --set model.version=v3` (or `helm rollback` to v1) while v2 is in canary: the latest spec wins —
    v2's rollout is aborted (reason code `superseded`), then v3's starts; nothing starts when v1 was asked for."""
    harness = Harness(tmp_path / "state")
    start_rollout(harness)
    harness.run_until(lambda: harness.rollout.stage == "canary")
    spec = obj({"candidate": {"version": wanted, "image": "i"}, "paused": True}, generation=9)

    (abort,) = spec_commands(spec, harness.controller.state, NOW)  # no pause of a rollout about to end
    assert isinstance(abort, InboxCommand) and (abort.kind, abort.issued_by) == ("abort", "spec.candidate")
    assert abort.id == f"supersede-{harness.rollout.rollout_id}-g9"
    assert abort.reason == f"superseded: spec.candidate is {wanted} ({why}), not v2"
    harness.command("abort", id=abort.id, reason=abort.reason, issued_by=abort.issued_by)
    harness.tick()

    assert harness.phase() == "Aborted"
    assert reason_code(harness.rollout.history[-1]) == "superseded"
    moved = {"from": "Progressing/canary", "to": "Aborted/canary", "reason": "superseded"}
    assert harness.sample("fraudwatch_rollout_transitions_total", **moved) == 1
    following = spec_commands(spec, harness.controller.state, NOW)
    if wanted == "v1":
        assert following == []  # v1 serves: nothing to roll out
    else:
        (start,) = following
        assert isinstance(start, InboxCommand) and (start.kind, start.candidate) == ("start", "v3")


def test_the_running_rollouts_own_candidate_is_not_superseded(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "shadow")
    assert spec_commands(obj({"candidate": {"version": "v2", "image": "i"}}, generation=11), state, NOW) == []


def of_v2(spec: dict[str, Any]) -> RolloutObject:
    """A spec whose candidate is the harness rollout's own (v2): nothing is superseded."""
    return obj({"candidate": {"version": "v2", "image": "img:v2"}, **spec})


def test_spec_paused_pauses_and_resumes_only_what_it_paused(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "canary")
    assert state.rollout is not None

    (pause,) = spec_commands(of_v2({"paused": True}), state, NOW)
    assert isinstance(pause, InboxCommand) and pause.kind == "pause" and pause.id.startswith("spec-pause-")

    def paused_by(command_id: str) -> ControllerState:
        assert state.rollout is not None
        transition = Transition(at=NOW, trigger="command", from_phase="Progressing", to_phase="Progressing",
                                from_stage="canary", to_stage="canary", paused=True, reason="manual pause",
                                command_id=command_id)  # fmt: skip
        rollout = state.rollout.model_copy(update={"paused": True, "history": (*state.rollout.history, transition)})
        return state.model_copy(update={"rollout": rollout})

    (resume,) = spec_commands(of_v2({"paused": False}), paused_by(pause.id), NOW)
    assert isinstance(resume, InboxCommand) and resume.kind == "resume"
    assert spec_commands(of_v2({"paused": False}), paused_by("op-pause"), NOW) == []  # an operator's pause stays


# --------------------------------------------------------------------------------------------------- policy


def test_spec_policy_is_merged_over_the_controller_policy() -> None:
    base = load_policy()
    merged = effective_policy(base, {"stages": {"canary": {"weight": 2}}, "promotion": {"warm_window_s": 60}})
    assert merged.stages.canary.weight == 2
    assert merged.promotion.warm_window_s == 60
    assert merged.stages.ab.weight == base.stages.ab.weight
    assert merged.gates == base.gates
    only = effective_policy(base, {"gates": [g.model_dump(mode="json") for g in base.gates[:3]]})
    assert only.gates == base.gates[:3]  # a gates list replaces the default one as a whole
    with pytest.raises(ValueError, match="canary"):
        effective_policy(base, {"stages": {"canary": {"weight": 50}}})
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


# --------------------------------------------------------------------------------------------------- status


def inputs(state: ControllerState | None, **kw: Any) -> StatusInputs:
    return StatusInputs(state=state, routing=kw.pop("routing", None), policy=POLICY, now=kw.pop("now", NOW),
                        kept_history=kw.pop("kept", 50), **kw)  # fmt: skip


def test_a_steady_status_names_the_seed_as_stable() -> None:
    table = RoutingTable.model_validate(
        {"generation": 4, "stage": "stable", "stable": {"version": "v1", "url": "http://a"}}
    )
    status = compose_status(obj(), inputs(None, routing=table, available=True))

    assert (status["phase"], status["stage"], status["stableVersion"]) == ("Steady", "stable", "v1")
    assert (status["stableWeight"], status["candidateWeight"], status["routingGeneration"]) == (100, 0, 4)
    assert status["stable"] == {"version": "v1", "image": "img:v1"}
    assert status["observedGeneration"] == 3
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert (available["status"], available["reason"]) == ("True", "RoutingPublished")


def test_a_progressing_status_summarises_the_state(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "canary")
    spec = obj({"candidate": {"version": "v2", "image": "img:v2"}})
    status = compose_status(spec, inputs(state, problems=("routing waits for v2",)))

    assert (status["phase"], status["stage"], status["candidateVersion"]) == ("Progressing", "canary", "v2")
    assert (status["stableWeight"], status["candidateWeight"]) == (95, 5)
    assert status["candidate"]["image"] == "img:v2"
    assert status["message"] == "routing waits for v2"
    gates = {g["name"]: g for g in status["gates"]}
    assert gates["errors"]["result"] == "Successful" and gates["errors"]["threshold"] == 0.01
    assert status["state"]["rollout"]["stage"] == "canary"
    assert [h["toStage"] for h in status["history"]] == ["shadow", "canary"]


def test_a_promoted_status_keeps_the_previous_warm_until_the_window_ends(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "Promoted")
    assert state.rollout is not None and state.rollout.promoted_at is not None
    spec = obj({"candidate": {"version": "v2", "image": "img:v2"}})
    warm = compose_status(spec, inputs(state, now=state.rollout.promoted_at + timedelta(seconds=1)))
    cold = compose_status(spec, inputs(state, now=state.rollout.promoted_at + timedelta(seconds=61)))

    assert (warm["phase"], warm["stableVersion"], warm["previous"]["version"]) == ("Promoted", "v2", "v1")
    assert "previous" not in cold and "warmUntil" not in cold
    assert (warm["stableWeight"], warm["candidateWeight"]) == (100, 0)
    progressing = next(c for c in warm["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Promoted")


def health(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Ready, Stalled, Reconciling: (status, reason) of each."""
    rows = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    return {kind: rows[kind] for kind in ("Ready", "Stalled", "Reconciling")}


def rolled_back_state(tmp_path: Path) -> ControllerState:
    harness = Harness(tmp_path / "state")
    harness.metrics_values.values['tp{model_version="v2"}'] = 200.0  # recall 0.2 against 0.9
    start_rollout(harness)
    harness.run_until(lambda: harness.phase() == "RolledBack")
    return harness.controller.state


def test_ready_stalled_and_reconciling_say_what_gitops_tools_need(tmp_path: Path) -> None:
    """kstatus and Argo CD tell Promoted from RolledBack by Ready/Stalled (Progressing alone was False for both)."""
    v2 = obj({"candidate": {"version": "v2", "image": "img:v2"}})
    steady = compose_status(obj(), inputs(None, available=True))
    assert health(steady) == {"Ready": ("True", "StableServing"), "Stalled": ("False", "NotStalled"),
                              "Reconciling": ("False", "Settled")}  # fmt: skip
    running = compose_status(v2, inputs(harness_state(tmp_path / "a", "canary"), available=True))
    assert health(running) == {"Ready": ("False", "RolloutProgressing"), "Stalled": ("False", "NotStalled"),
                               "Reconciling": ("True", "RolloutProgressing")}  # fmt: skip
    promoted = compose_status(v2, inputs(harness_state(tmp_path / "b", "Promoted"), available=True))
    assert health(promoted)["Ready"] == ("True", "Promoted") and health(promoted)["Stalled"][0] == "False"
    assert health(compose_status(v2, inputs(harness_state(tmp_path / "c", "Promoted"))))["Ready"] == (
        "False", "WaitingForWorkloads"
    )  # fmt: skip

    rolled_back = rolled_back_state(tmp_path / "d")
    stalled = compose_status(v2, inputs(rolled_back, available=True))
    assert health(stalled) == {"Ready": ("False", "RolledBack"), "Stalled": ("True", "RolledBack"),
                               "Reconciling": ("False", "Settled")}  # fmt: skip
    message = next(c["message"] for c in stalled["conditions"] if c["type"] == "Stalled")
    assert message.startswith("v2 was not promoted: ") and "recall" in message
    assert all(c["observedGeneration"] == 3 for c in stalled["conditions"])
    # helm rollback: spec.candidate back on the stable - nothing is stalled, the stable serves as asked
    back = compose_status(obj(), inputs(rolled_back, available=True))
    assert health(back)["Ready"] == ("True", "StableServing") and health(back)["Stalled"][0] == "False"


def test_condition_times_change_only_with_their_status(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "canary")
    first = compose_status(obj(), inputs(state, available=False))
    later = compose_status(obj(status=first), inputs(state, available=False, now=NOW + timedelta(minutes=5)))
    flipped = compose_status(obj(status=first), inputs(state, available=True, now=NOW + timedelta(minutes=5)))

    def since(status: dict[str, Any], kind: str) -> str:
        return str(next(c for c in status["conditions"] if c["type"] == kind)["lastTransitionTime"])

    assert since(later, "Available") == since(first, "Available")
    assert since(flipped, "Available") != since(first, "Available")
    assert since(flipped, "Progressing") == since(first, "Progressing")


def test_history_spans_rollouts_without_doubling_one(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "canary")
    rollout = state.rollout
    assert rollout is not None
    earlier = [{"at": "2025-01-01T00:00:00Z", "rolloutId": "old", "seq": 0, "toStage": "full"}]
    rows = history_rows(earlier, rollout, 50)
    again = history_rows(rows, rollout, 50)

    assert [r["rolloutId"] for r in rows] == ["old", *[rollout.rollout_id] * len(rollout.history)]
    assert again == rows
    assert len(history_rows(rows, rollout, 2)) == 2


def test_event_reasons_of_transitions(tmp_path: Path) -> None:
    state = harness_state(tmp_path, "Promoted")
    assert state.rollout is not None
    reasons = [event_reason(t) for t in state.rollout.history]
    assert reasons[0] == ("StageEntered", "Normal")
    assert reasons[-1] == ("Promoted", "Normal")
    rolled = state.rollout.history[-1].model_copy(update={"to_phase": "RolledBack"})
    assert event_reason(rolled) == ("RolledBack", "Warning")


# --------------------------------------------------------------------------------------------------- the Lease


@pytest.mark.parametrize(
    ("spec", "observed_at", "now", "decision"),
    [
        ({"holderIdentity": "me"}, 0.0, 100.0, "renew"),
        ({"holderIdentity": "other", "leaseDurationSeconds": 15}, 90.0, 100.0, "wait"),
        ({"holderIdentity": "other", "leaseDurationSeconds": 15}, 80.0, 100.0, "acquire"),
        ({"holderIdentity": "", "leaseDurationSeconds": 1}, 99.9, 100.0, "acquire"),
        ({}, 100.0, 100.0, "acquire"),
    ],
)
def test_lease_decisions(spec: dict[str, Any], observed_at: float, now: float, decision: str) -> None:
    assert decide(spec, "me", observed_at, now, 15.0) == decision


def test_the_router_replicas_are_every_serving_endpoint_of_the_control_service_once() -> None:
    """Issue 12: the replicas that must confirm a table before a scale-down — ready or still draining (serving while
    terminating), not those that serve nothing; a pod in two slices counts once; a slice without the port is not a
    router's."""

    def endpoint(name: str, address: str, **conditions: bool) -> dict[str, Any]:
        return {"addresses": [address], "conditions": conditions, "targetRef": {"kind": "Pod", "name": name}}

    slices = [
        {"ports": [{"name": "feedback", "port": 8081}],
         "endpoints": [endpoint("r-a", "10.0.0.1", ready=True, serving=True),
                       endpoint("r-b", "10.0.0.2", ready=False, serving=True, terminating=True),  # draining
                       endpoint("r-c", "10.0.0.3", ready=False, serving=False),  # serves nothing
                       {"addresses": ["10.0.0.4"]}]},  # no conditions (true), no targetRef (named by address)
        {"ports": [{"name": "feedback", "port": 8081}], "endpoints": [endpoint("r-a", "10.0.0.1", ready=True)]},
        {"ports": [{"name": "http", "port": 8080}], "endpoints": [endpoint("r-d", "10.0.0.5", ready=True)]},
        {"ports": [{"name": "feedback", "port": 8081}], "endpoints": [endpoint("r-e", "fd00::7", ready=True)]},
    ]  # fmt: skip
    found = router_endpoints(slices, "feedback")
    assert [(e.name, e.url) for e in found] == [
        ("10.0.0.4", "http://10.0.0.4:8081"),
        ("r-a", "http://10.0.0.1:8081"),
        ("r-b", "http://10.0.0.2:8081"),
        ("r-e", "http://[fd00::7]:8081"),
    ]
    assert router_endpoints([], "feedback") == []


def test_an_older_revision_s_spec_is_kept_and_written_back_into_spec_candidate() -> None:
    """undo --to-revision N on Kubernetes: the status keeps the spec of every kept revision's version (the object
    alone forgets v1 once v2 and v3 have replaced it), and the undo patch writes it back into spec.candidate."""
    v1 = {"version": "v1", "image": "img:v1", "modelUri": "models:/fraud/1", "replicas": 2}
    numbered = enumerate(("v1", "v2", "v3", "v1"), start=1)
    state = ControllerState(name="fw", revisions=tuple(Revision(number=n, version=v) for n, v in numbered))
    v3 = {"version": "v3", "image": "img:v3"}
    earlier = obj(
        spec={"stable": v3, "candidate": v3}, status={"revisionVersions": [v1, {"version": "v2", "image": "i"}]}
    )
    kept = revision_versions(earlier.known_versions(), state)
    assert [v["version"] for v in kept] == ["v1", "v2", "v3"] and kept[0] == v1
    cause = "ops: roll v1 out again (v3 bad)"
    assert undo_patch(earlier, "v1", cause) == {
        "metadata": {"resourceVersion": "42", "annotations": {"kubernetes.io/change-cause": cause}},
        "spec": {"candidate": v1},
    }
    assert undo_patch(earlier, "v0", "x") is None  # never run here: no spec to go back to
    assert spec_start_id("v1", 7) == "v1-g7"  # the id of the start the controller derives from it
