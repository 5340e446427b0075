"""The Kubernetes hand-off of retraining on a real API server: the chart's retraining ServiceAccount, with the Role
the chart renders for it, starts a rollout by a merge patch of its release's ModelRollout ``spec.candidate`` — and
can do nothing else.

The chart is rendered with ``retraining.enabled`` (``helm template --validate`` against this API server); its
ModelRollout, ServiceAccount, Role and RoleBinding are created as Helm would; the hand-off
(:class:`service.retraining.handoff.ModelRolloutPatchHandoff`) then runs with the ServiceAccount's identity (the admin
impersonates ``system:serviceaccount:<namespace>:<name>``, so RBAC decides exactly as for the pod).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from service.retraining.handoff import ANNOTATION_REQUEST, Candidate, HandoffOutcome, ModelRolloutPatchHandoff
from service.settings import KubeHandoffSettings
from tests.e2e.cluster import ControlPlane
from tests.e2e.test_chart import (
    CRD_NAME,
    GROUP,
    PLURAL,
    ROLLOUT,
    VERSION,
    crd,
    dynamic,
    get_rollout,
    namespace,
    render,
    wait_established,
)

pytestmark = pytest.mark.e2e

__all__ = ["crd", "dynamic", "namespace"]  # fixtures of tests/e2e/test_chart.py used here
SERVICE_ACCOUNT = "fw-fraudwatch-retraining"
CANDIDATE = Candidate(name="v8", model="refund-fraud", number="8")


ADMISSION_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
#: A spec field the CRD gains in this test only: one the admission policy has never heard of.
LATER_FIELD = "laterField"


@pytest.fixture
def crd_with_a_later_field(
    k8s_cluster: ControlPlane, k8s_client: Any, dynamic: DynamicClient, crd: Mapping[str, Any]
) -> Iterator[None]:
    """The chart's CRD with one more spec property (as a later release of the CRD would add), restored after."""
    later = copy.deepcopy(dict(crd))
    for version in later["spec"]["versions"]:
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][LATER_FIELD] = {"type": "string"}
    resource = dynamic.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    resource.server_side_apply(body=later, name=CRD_NAME, field_manager="fraudwatch-e2e", force_conflicts=True)
    wait_established(k8s_cluster, k8s_client, CRD_NAME)
    try:
        yield
    finally:
        resource.server_side_apply(body=dict(crd), name=CRD_NAME, field_manager="fraudwatch-e2e", force_conflicts=True)
        wait_established(k8s_cluster, k8s_client, CRD_NAME)


@pytest.fixture
def installed(
    k8s_cluster: ControlPlane, dynamic: DynamicClient, crd: Mapping[str, Any], namespace: str, tmp_path: Path
) -> Iterator[str]:
    """The release's ModelRollout, the retraining RBAC and its admission policy (cluster-scoped: removed after the
    test), created from the rendered chart; yields the namespace."""
    objects = render(k8s_cluster, {"retraining": {"enabled": True}}, tmp_path, namespace)
    wanted = [
        o for o in objects
        if o["kind"] == "ModelRollout"
        or (o["kind"] in ("ServiceAccount", "Role", "RoleBinding") and o["metadata"]["name"] == SERVICE_ACCOUNT)
    ]  # fmt: skip
    assert sorted(o["kind"] for o in wanted) == ["ModelRollout", "Role", "RoleBinding", "ServiceAccount"]
    admission = [o for o in objects if o["kind"] in ADMISSION_KINDS]
    assert sorted(o["kind"] for o in admission) == list(ADMISSION_KINDS)
    for obj in wanted:
        dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).create(body=obj, namespace=namespace)
    other = next(o for o in wanted if o["kind"] == "ModelRollout")
    other = {**other, "metadata": {"name": "another-model"}}
    dynamic.resources.get(api_version=other["apiVersion"], kind="ModelRollout").create(body=other, namespace=namespace)
    for obj in admission:
        dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).create(body=obj)
    try:
        yield namespace
    finally:
        for obj in reversed(admission):
            dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).delete(name=obj["metadata"]["name"])


@pytest.fixture
def as_retraining(k8s_cluster: ControlPlane, installed: str) -> Iterator[k8s.CustomObjectsApi]:
    """The custom-objects API as the retraining ServiceAccount."""
    configuration = k8s.Configuration()
    kubernetes.config.load_kube_config(config_file=str(k8s_cluster.kubeconfig), client_configuration=configuration)
    user = f"system:serviceaccount:{installed}:{SERVICE_ACCOUNT}"
    api_client = k8s.ApiClient(configuration, header_name="Impersonate-User", header_value=user)
    try:
        yield k8s.CustomObjectsApi(api_client)
    finally:
        api_client.close()


def handoff(namespace: str, api: k8s.CustomObjectsApi, rollout: str = ROLLOUT) -> ModelRolloutPatchHandoff:
    return ModelRolloutPatchHandoff(KubeHandoffSettings(namespace=namespace, rollout_name=rollout), api=api)


def test_the_service_account_starts_a_rollout_by_patching_spec_candidate(
    k8s_client: Any, installed: str, as_retraining: k8s.CustomObjectsApi
) -> None:
    before = get_rollout(k8s_client, installed)

    result = handoff(installed, as_retraining).start(CANDIDATE, request_id="alert-e2e-1", reason="feature drift")
    after = get_rollout(k8s_client, installed)
    again = handoff(installed, as_retraining).start(CANDIDATE, request_id="alert-e2e-1", reason="feature drift")

    assert result.outcome is HandoffOutcome.STARTED, result.detail
    assert after["spec"]["candidate"] == {
        **before["spec"]["candidate"],
        "version": "v8",
        "modelUri": "models:/refund-fraud/8",
    }  # the image, pull policy and replicas the chart rendered are kept
    assert "registryAlias" not in after["spec"]["candidate"]
    assert after["spec"]["stable"] == before["spec"]["stable"]
    assert after["metadata"]["annotations"][ANNOTATION_REQUEST] == "alert-e2e-1"
    assert again.outcome is HandoffOutcome.STARTED and "already is the desired candidate" in again.detail
    assert get_rollout(k8s_client, installed)["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]


def test_a_progressing_rollout_is_not_replaced(
    k8s_client: Any, installed: str, as_retraining: k8s.CustomObjectsApi
) -> None:
    status = {"phase": "Progressing", "stage": "canary", "stableVersion": "v1", "candidateVersion": "v1-hotfix"}
    k8s.CustomObjectsApi(k8s_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, installed, PLURAL, ROLLOUT, {"status": status}
    )

    result = handoff(installed, as_retraining).start(CANDIDATE, request_id="alert-e2e-2", reason="drift")

    assert result.outcome is HandoffOutcome.REFUSED
    assert "v1-hotfix is in progress" in result.detail
    assert get_rollout(k8s_client, installed)["spec"]["candidate"]["version"] != "v8"


def test_the_service_account_can_do_nothing_else(installed: str, as_retraining: k8s.CustomObjectsApi) -> None:
    elsewhere = handoff(installed, as_retraining, rollout="another-model").start(
        CANDIDATE, request_id="alert-e2e-3", reason="drift"
    )
    assert elsewhere.outcome is HandoffOutcome.FAILED and "403" in elsewhere.detail

    with pytest.raises(ApiException) as status:
        as_retraining.patch_namespaced_custom_object_status(
            GROUP, VERSION, installed, PLURAL, ROLLOUT, {"status": {"phase": "Promoted"}}
        )
    with pytest.raises(ApiException) as listing:
        as_retraining.list_namespaced_custom_object(GROUP, VERSION, installed, PLURAL)
    with pytest.raises(ApiException) as deletion:
        as_retraining.delete_namespaced_custom_object(GROUP, VERSION, installed, PLURAL, ROLLOUT)
    assert (status.value.status, listing.value.status, deletion.value.status) == (403, 403, 403)


def refused(api: k8s.CustomObjectsApi, namespace: str, patch: Mapping[str, Any]) -> str:
    """The admission message of a merge patch of the release's ModelRollout that the API server refused ("" when
    it was accepted)."""
    try:
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ROLLOUT, patch)
    except ApiException as exc:
        assert exc.status in (403, 422), exc
        return str(exc.body)
    return ""


def wait_until_stored(k8s_client: Any, namespace: str, field: str, timeout_s: float = 30.0) -> None:
    """The API server stores ``spec.<field>`` (a schema change reaches its decoders a moment after Established):
    set it as the admin until it sticks, then remove it again."""
    admin = k8s.CustomObjectsApi(k8s_client)
    deadline = time.monotonic() + timeout_s
    while True:
        admin.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ROLLOUT, {"spec": {field: "probe"}})
        if field in get_rollout(k8s_client, namespace)["spec"]:
            break
        assert time.monotonic() < deadline, f"spec.{field} is pruned: the CRD change did not take effect"
        time.sleep(0.5)
    admin.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ROLLOUT, {"spec": {field: None}})


def test_the_admission_policy_lets_retraining_change_the_candidate_only(
    k8s_client: Any, installed: str, as_retraining: k8s.CustomObjectsApi, crd_with_a_later_field: None
) -> None:
    """Issue 11, point 5: RBAC let the retraining ServiceAccount patch the whole ModelRollout — always-true gates in
    spec.policy, a manual command, any image. The chart's ValidatingAdmissionPolicy, on the real API server, refuses
    each of those and still admits the hand-off's own patch (the test above runs with it in place). It is an
    allowlist (issue 11, audit point 7): a spec field the CRD gained after the policy was written, another field of
    spec.candidate, an annotation, a label or a finalizer are refused too, though the policy names none of them."""
    wait_until_stored(k8s_client, installed, LATER_FIELD)
    before = get_rollout(k8s_client, installed)
    evil: dict[str, dict[str, Any]] = {
        "spec.policy": {"spec": {"policy": {"gates": []}}},
        "spec.manualCommand": {"spec": {"manualCommand": {"id": "x", "kind": "promote"}}},
        "spec.paused": {"spec": {"paused": True}},
        "spec.stable": {"spec": {"stable": {**before["spec"]["stable"], "version": "v0"}}},
        "an image": {"spec": {"candidate": {"version": "v9", "image": "attacker/backdoor:latest"}}},
        "spec.candidate.replicas": {"spec": {"candidate": {"replicas": 50}}},
        "spec.candidate.imagePullPolicy": {"spec": {"candidate": {"imagePullPolicy": "Never"}}},
        f"spec.{LATER_FIELD}": {"spec": {LATER_FIELD: "on"}},
        "an annotation": {"metadata": {"annotations": {"fraudwatch.io/skip-gates": "true"}}},
        "a label": {"metadata": {"labels": {"fraudwatch.io/tier": "free"}}},
        "a finalizer": {"metadata": {"finalizers": ["attacker.example/keep"]}},
    }
    # the policy takes effect once the API server has loaded it (its informer): wait for the first refusal
    deadline = time.monotonic() + 30.0
    probe = {"spec": {"routingSalt": "probe"}}
    while not refused(as_retraining, installed, probe) and time.monotonic() < deadline:
        restore = {"spec": {"routingSalt": before["spec"].get("routingSalt")}}  # None removes it
        k8s.CustomObjectsApi(k8s_client).patch_namespaced_custom_object(
            GROUP, VERSION, installed, PLURAL, ROLLOUT, restore
        )
        time.sleep(0.5)
    messages = {what: refused(as_retraining, installed, patch) for what, patch in evil.items()}
    assert all(messages.values()), {k: v for k, v in messages.items() if not v}
    assert "not spec.policy" in messages["spec.policy"] and "may not choose an image" in messages["an image"]
    assert f"not spec.{LATER_FIELD}" in messages[f"spec.{LATER_FIELD}"]
    assert "not spec.candidate.imagePullPolicy" in messages["spec.candidate.imagePullPolicy"]
    assert "fraudwatch.io/skip-gates" in messages["an annotation"]
    assert "metadata.finalizers" in messages["a finalizer"] and "metadata.labels" in messages["a label"]
    after = get_rollout(k8s_client, installed)
    assert after["spec"] == before["spec"]  # nothing of it landed
    for key in ("annotations", "labels", "finalizers"):
        assert after["metadata"].get(key) == before["metadata"].get(key), key

    result = handoff(installed, as_retraining).start(CANDIDATE, request_id="alert-e2e-4", reason="drift")
    assert result.outcome is HandoffOutcome.STARTED, result.detail
    landed = get_rollout(k8s_client, installed)
    assert landed["spec"]["candidate"]["version"] == "v8"
    assert landed["metadata"]["annotations"][ANNOTATION_REQUEST] == "alert-e2e-4"  # the hand-off's own annotations
