"""The test control plane works like a cluster: versions, scheduling onto the fake node, garbage collection, RBAC,
service-account tokens and helm.

Each test works in its own namespace; nothing here depends on another test's objects.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client as k8s

from tests.kits.cluster import ControlPlane
from tests.kits.waiting import wait_for

pytestmark = pytest.mark.e2e

APP_LABEL = "app.kubernetes.io/name"
#: Any image name: kwok fakes the containers, nothing is pulled.
FAKE_IMAGE = "registry.invalid/fraudwatch/fake:0"


def series_pattern(series: str) -> str:
    return rf"v{re.escape(series)}\.\d+"


@pytest.fixture
def namespace(k8s_client: Any, k8s_cluster: ControlPlane) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    name = f"fw-smoke-{uuid.uuid4().hex[:8]}"
    core = k8s.CoreV1Api(k8s_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


def test_server_reports_the_built_kubernetes_version(k8s_cluster: ControlPlane, k8s_client: Any) -> None:
    info = k8s.VersionApi(k8s_client).get_code()

    assert info.git_version == k8s_cluster.versions["kubernetes"]
    assert re.fullmatch(series_pattern(k8s_cluster.settings.kubernetes_series), info.git_version)
    assert (info.major, info.minor) == tuple(k8s_cluster.settings.kubernetes_series.split("."))


def test_fake_node_is_registered_ready_and_schedulable(k8s_cluster: ControlPlane, k8s_client: Any) -> None:
    node = k8s.CoreV1Api(k8s_client).read_node(k8s_cluster.settings.node_name)

    ready = {c.type: c.status for c in node.status.conditions}["Ready"]
    assert ready == "True"
    assert not node.spec.unschedulable
    assert not [t for t in node.spec.taints or [] if t.effect in {"NoSchedule", "NoExecute"}]
    assert node.status.allocatable["pods"] == str(k8s_cluster.settings.node_pods)


def deployment(name: str, replicas: int) -> k8s.V1Deployment:
    labels = {APP_LABEL: name}
    container = k8s.V1Container(
        name="app", image=FAKE_IMAGE, resources=k8s.V1ResourceRequirements(requests={"cpu": "10m", "memory": "16Mi"})
    )
    return k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name=name, labels=labels),
        spec=k8s.V1DeploymentSpec(
            replicas=replicas,
            selector=k8s.V1LabelSelector(match_labels=labels),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels), spec=k8s.V1PodSpec(containers=[container])
            ),
        ),
    )


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def deployment_available(apps: k8s.AppsV1Api, namespace: str, name: str, replicas: int) -> bool:
    status = apps.read_namespaced_deployment_status(name, namespace).status
    available = any(c.type == "Available" and c.status == "True" for c in status.conditions or [])
    return available and status.available_replicas == replicas


def test_deployment_pods_are_scheduled_on_the_fake_node_become_ready_and_are_garbage_collected(
    k8s_cluster: ControlPlane, k8s_client: Any, namespace: str
) -> None:
    apps, core = k8s.AppsV1Api(k8s_client), k8s.CoreV1Api(k8s_client)
    name, replicas = "smoke", 3
    selector = f"{APP_LABEL}={name}"
    apps.create_namespaced_deployment(namespace, deployment(name, replicas))

    k8s_cluster.wait_for("deployment Available", lambda: deployment_available(apps, namespace, name, replicas))
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    assert len(pods) == replicas
    assert {p.spec.node_name for p in pods} == {k8s_cluster.settings.node_name}
    assert all(pod_ready(p) and p.status.phase == "Running" for p in pods)
    assert all(p.status.pod_ip for p in pods)

    apps.delete_namespaced_deployment(name, namespace, propagation_policy="Background")
    k8s_cluster.wait_for(
        "pods garbage-collected", lambda: not core.list_namespaced_pod(namespace, label_selector=selector).items
    )
    assert not apps.list_namespaced_replica_set(namespace, label_selector=selector).items


def access_review(k8s_client: Any, user: str, groups: list[str], namespace: str, verb: str, resource: str) -> bool:
    review = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=user,
            groups=groups,
            resource_attributes=k8s.V1ResourceAttributes(namespace=namespace, verb=verb, resource=resource),
        )
    )
    return bool(k8s.AuthorizationV1Api(k8s_client).create_subject_access_review(review).status.allowed)


def grant_pod_reader(k8s_client: Any, namespace: str, account: str) -> None:
    core, rbac = k8s.CoreV1Api(k8s_client), k8s.RbacAuthorizationV1Api(k8s_client)
    core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=account)))
    rule = k8s.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list", "watch"])
    rbac.create_namespaced_role(namespace, k8s.V1Role(metadata=k8s.V1ObjectMeta(name="pod-reader"), rules=[rule]))
    binding = k8s.V1RoleBinding(
        metadata=k8s.V1ObjectMeta(name="pod-reader"),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=account, namespace=namespace)],
    )
    rbac.create_namespaced_role_binding(namespace, binding)


def test_rbac_grants_exactly_what_a_role_binding_says(k8s_client: Any, namespace: str) -> None:
    account = "reader"
    grant_pod_reader(k8s_client, namespace, account)
    user = f"system:serviceaccount:{namespace}:{account}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]

    def allowed(verb: str, resource: str, where: str = namespace) -> bool:
        return access_review(k8s_client, user, groups, where, verb, resource)

    # the authorizer reads RBAC from an informer cache: a binding created a moment ago may not be in it yet (a
    # whole-suite run's first review said no); once it grants, the cache holds the binding and every answer counts
    assert wait_for(lambda: allowed("list", "pods"), "the new RoleBinding in the authorizer's cache", 30.0)
    assert allowed("watch", "pods")
    assert not allowed("delete", "pods")
    assert not allowed("list", "secrets")
    assert not allowed("list", "pods", where="kube-system")


def test_service_account_token_authenticates_against_the_apiserver(
    k8s_cluster: ControlPlane, k8s_client: Any, namespace: str
) -> None:
    account = "reader"
    grant_pod_reader(k8s_client, namespace, account)
    token_request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[]))
    core = k8s.CoreV1Api(k8s_client)
    token = core.create_namespaced_service_account_token(account, namespace, token_request).status.token
    headers = {"Authorization": f"Bearer {token}"}
    ca = str(k8s_cluster.pki.ca.cert)

    with httpx.Client(base_url=k8s_cluster.server, verify=ca, headers=headers) as as_account:
        pods = as_account.get(f"/api/v1/namespaces/{namespace}/pods")
        secrets = as_account.get(f"/api/v1/namespaces/{namespace}/secrets")
        whoami = as_account.post(
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )

    assert pods.status_code == httpx.codes.OK
    assert secrets.status_code == httpx.codes.FORBIDDEN
    assert whoami.json()["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:{account}"


def test_helm_reports_its_version(k8s_cluster: ControlPlane) -> None:
    version = k8s_cluster.run_tool("helm", "version", "--template", "{{.Version}}").stdout.strip()

    assert version == k8s_cluster.versions["helm"]
    assert re.fullmatch(series_pattern(k8s_cluster.settings.helm_series), version)


def test_kubectl_uses_the_admin_kubeconfig(k8s_cluster: ControlPlane) -> None:
    versions = json.loads(k8s_cluster.run_tool("kubectl", "version", "--output=json").stdout)
    nodes = k8s_cluster.run_tool("kubectl", "get", "nodes", "--output=name").stdout.split()

    assert versions["clientVersion"]["gitVersion"] == k8s_cluster.versions["kubernetes"]
    assert versions["serverVersion"]["gitVersion"] == k8s_cluster.versions["kubernetes"]
    assert nodes == [f"node/{k8s_cluster.settings.node_name}"]


def write_chart(directory: Path, kube_version: str) -> Path:
    """A minimal chart (one ConfigMap) that only installs on ``kube_version`` clusters."""
    chart = directory / "smoke-chart"
    (chart / "templates").mkdir(parents=True)
    metadata = {"apiVersion": "v2", "name": "smoke", "version": "0.1.0", "kubeVersion": kube_version}
    (chart / "Chart.yaml").write_text(yaml.safe_dump(metadata), encoding="utf-8")
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "{{ .Release.Name }}-settings"},
        "data": {"kubeVersion": "{{ .Capabilities.KubeVersion.Version }}"},
    }
    (chart / "templates" / "configmap.yaml").write_text(yaml.safe_dump(config_map), encoding="utf-8")
    return chart


def test_helm_installs_a_chart_that_requires_this_kubernetes_minor(
    k8s_cluster: ControlPlane, k8s_client: Any, namespace: str, tmp_path: Path
) -> None:
    series = k8s_cluster.settings.kubernetes_series
    chart = write_chart(tmp_path, f"~{series}.0-0")

    k8s_cluster.run_tool("helm", "install", "smoke", str(chart), "--namespace", namespace, "--wait")

    data = k8s.CoreV1Api(k8s_client).read_namespaced_config_map("smoke-settings", namespace).data
    assert data["kubeVersion"] == k8s_cluster.versions["kubernetes"]
    releases = k8s_cluster.run_tool("helm", "list", "--namespace", namespace, "--output", "json").stdout
    assert [(r["name"], r["status"]) for r in yaml.safe_load(releases)] == [("smoke", "deployed")]
