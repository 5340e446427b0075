"""The Helm chart on a real control plane: every manifest passes the API server's validation, the ModelRollout CRD
validates (and refuses) objects, RBAC grants exactly what the components need, and ``helm install --wait`` /
``helm upgrade --set model.version=…`` behave as documented next to the controller's status and operators' edits.

Images are never pulled (kwok fakes the containers); the test values use no PVC and no LoadBalancer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException as DynamicApiException

from rollout.backends.kube.resource import deprecated_policy_fields, effective_policy
from rollout.core.policy import load_policy, policy_from_mapping
from tests.kits.chart import (
    CHART_DIR,
    DEFAULT_POLICY_FILE,
    STANDARD_LABELS,
    values_file,
)
from tests.kits.cluster import ControlPlane
from tests.kits.release import (
    BASE_VALUES,
    GROUP,
    PLURAL,
    RELEASE,
    ROLLOUT,
    VERSION,
    get_rollout,
    modelrollouts,
    render,
    wait_established,
)

pytestmark = pytest.mark.e2e

#: The Prometheus Operator kinds the chart renders; the test registers stand-in CRDs for them (kind only, any
#: content) so the chart's capability detection and the API server's routing can be exercised without the Operator.
OPERATOR_KINDS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}
DRY_RUN_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "existing-secrets": {
        "predictionLog": {"existingSecret": "pg-dsn", "existingSecretKey": "url"},
        "router": {"adminToken": {"existingSecret": "router-admin", "existingSecretKey": "token"}},
    },
    "ha-controller": {"controller": {"replicaCount": 2}},
    "retraining-rbac": {
        "retraining": {"enabled": True, "webhook": {"enabled": True}},
        "rbac": {"aggregateToDefaultRoles": True},
    },
    "rollout-v2": {"model": {"version": "v2", "stable": {"version": "v1"}, "modelUri": "models:/refund-fraud/2"}},
    "static-router": {"router": {"autoscaling": {"enabled": False}}, "networkPolicy": {"enabled": False}},
    "default-policy": {"rollout": {"policy": yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))}},
}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def operator_kinds(k8s_cluster: ControlPlane, k8s_client: Any, dynamic: DynamicClient) -> Iterator[None]:
    """Stand-in CRDs for monitoring.coreos.com/v1 (the kinds only: any content is accepted)."""
    api = k8s.ApiextensionsV1Api(k8s_client)
    names = []
    for kind, plural in OPERATOR_KINDS.items():
        name = f"{plural}.monitoring.coreos.com"
        names.append(name)
        body = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List", "singular": kind.lower()},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    }
                ],
            },
        }
        api.create_custom_resource_definition(body)
    for name in names:
        wait_established(k8s_cluster, k8s_client, name)
    dynamic.resources.invalidate_cache()
    try:
        yield
    finally:
        for name in names:
            api.delete_custom_resource_definition(name)
        dynamic.resources.invalidate_cache()


def helm(k8s_cluster: ControlPlane, *args: str, check: bool = True) -> str:
    result = k8s_cluster.run_tool("helm", *args, check=check)
    return result.stdout + result.stderr


GENERATED_SECRETS = ("router-admin", "router-feedback", "router-sticky")


def generated_credentials(k8s_client: Any, namespace: str) -> dict[str, dict[str, str]]:
    """The data of the Secrets the chart generates (admin and feedback tokens, the sticky key)."""
    core = k8s.CoreV1Api(k8s_client)
    return {
        name: dict(core.read_namespaced_secret(f"{RELEASE}-fraudwatch-{name}", namespace).data)
        for name in GENERATED_SECRETS
    }


def rollout_body(name: str, spec_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "modelName": "refund-fraud",
        "stable": {"version": "v1", "image": "registry.invalid/fraudwatch/model:v1", "registryAlias": "champion"},
        "candidate": {"version": "v2", "image": "registry.invalid/fraudwatch/model:v2", "modelUri": "models:/m/2"},
    }
    spec.update(spec_overrides or {})
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout", "metadata": {"name": name}, "spec": spec}


def create_rollout(k8s_client: Any, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    created = modelrollouts(k8s_client).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(body))
    assert isinstance(created, dict)
    return created


def rejection(k8s_client: Any, namespace: str, body: Mapping[str, Any]) -> str:
    """The API server's message for an object it must refuse (fails when it accepts it)."""
    with pytest.raises(ApiException) as caught:
        create_rollout(k8s_client, namespace, body)
    assert caught.value.status == 422, caught.value.body
    return str(caught.value.body)


# ------------------------------------------------------------------------------------------------ manifests


@pytest.mark.parametrize("case", sorted(DRY_RUN_CASES))
def test_every_rendered_manifest_passes_server_side_dry_run(
    k8s_cluster: ControlPlane,
    dynamic: DynamicClient,
    crd: Mapping[str, Any],
    namespace: str,
    tmp_path: Path,
    case: str,
) -> None:
    objects = render(k8s_cluster, DRY_RUN_CASES[case], tmp_path, namespace)
    assert objects
    refused = []
    for obj in objects:
        resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        target = namespace if resource.namespaced else None
        try:
            resource.create(body=obj, namespace=target, dry_run="All", field_manager="fraudwatch-e2e")
        except DynamicApiException as exc:
            refused.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.status} {exc.body}")
    assert refused == []


def test_operator_objects_are_rendered_when_the_cluster_serves_the_api(
    k8s_cluster: ControlPlane,
    dynamic: DynamicClient,
    crd: Mapping[str, Any],
    operator_kinds: None,
    namespace: str,
    tmp_path: Path,
) -> None:
    objects = render(k8s_cluster, {}, tmp_path, namespace)
    operator_objects = [o for o in objects if o["apiVersion"] == "monitoring.coreos.com/v1"]

    # every monitor is a PodMonitor: the routers' metrics are on their control port, which no Service exposes
    assert {o["kind"] for o in operator_objects} == {"PodMonitor", "PrometheusRule"}
    for obj in operator_objects:
        resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        resource.create(body=obj, namespace=namespace, dry_run="All")


# ------------------------------------------------------------------------------------------------ the CRD


def test_crd_accepts_a_rollout_and_its_printer_columns_read_it(
    k8s_client: Any, crd: Mapping[str, Any], namespace: str
) -> None:
    created = create_rollout(k8s_client, namespace, rollout_body("valid", {"paused": True}))
    status = {"phase": "Progressing", "stage": "canary", "stableVersion": "v1", "candidateWeight": 5}
    modelrollouts(k8s_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "valid", {"status": status}
    )
    table = k8s_client.call_api(
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
        "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        response_type="object",
        _return_http_data_only=True,
    )

    assert created["spec"]["paused"] is True
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert (row["Stage"], row["Weight"], row["Stable"], row["Candidate"], row["Phase"]) == (
        "canary",
        5,
        "v1",
        "v2",
        "Progressing",
    )


def test_crd_keeps_the_default_policy_unpruned(k8s_client: Any, crd: Mapping[str, Any], namespace: str) -> None:
    """rollout/core/default_policy.yaml stored in a ModelRollout comes back whole: the schema prunes none of its fields
    and the policy code reads it back equal."""
    policy = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    created = create_rollout(k8s_client, namespace, rollout_body("policy", {"policy": policy}))

    assert created["spec"]["policy"] == policy
    assert policy_from_mapping(created["spec"]["policy"]) == load_policy()


def test_crd_takes_the_policy_in_api_conventions_and_the_deprecated_form(
    k8s_client: Any, crd: Mapping[str, Any], namespace: str
) -> None:
    """camelCase fields with durations (issue 17) and the snake_case ``*_s`` form both pass the CRD's schema and
    come back unpruned; the controller's reading of them (effective_policy) is the same policy."""
    camel = {
        "stages": {"canary": {"minDuration": "10m", "minRequests": 200}, "steps": [1, 5, 25, 50]},
        "analysis": {"interval": "30s", "inconclusiveTimeout": "1h30m", "notReadyTimeout": "500ms"},
        "promotion": {"warmWindow": "15m", "scaleDownDelay": "2m"},
    }
    snake = {
        "stages": {"canary": {"min_duration_s": 600, "min_requests": 200}, "steps": [1, 5, 25, 50]},
        "analysis": {"interval_s": 30, "inconclusive_timeout_s": 5400, "not_ready_timeout_s": 0.5},
        "promotion": {"warm_window_s": 900, "scale_down_delay_s": 120},
    }
    stored = [
        create_rollout(k8s_client, namespace, rollout_body(name, {"policy": policy}))["spec"]["policy"]
        for name, policy in (("camel", camel), ("snake", snake))
    ]
    assert stored == [camel, snake]
    assert effective_policy(load_policy(), stored[0]) == effective_policy(load_policy(), stored[1])
    assert deprecated_policy_fields(stored[0]) == () and "stages.canary.min_duration_s" in deprecated_policy_fields(
        stored[1]
    )


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"policy": {"stages": {"canary": {"weight": 7}}}}, "spec.policy.stages.canary.weight"),
        ({"policy": {"stages": {"canary": {"weight": 5}, "ab": {"weight": 4}}}}, "A/B weight must exceed"),
        ({"policy": {"gates": [{"name": "x", "layer": "vibes"}]}}, "spec.policy.gates[0].layer"),
        ({"policy": {"analysis": {"confidence": 1.0}}}, "spec.policy.analysis.confidence"),
        ({"policy": {"stages": {"canary": {"minDuration": "10x"}}}}, "spec.policy.stages.canary.minDuration"),
        ({"policy": {"stages": {"canary": {"minDuration": 600}}}}, "spec.policy.stages.canary.minDuration"),
        ({"policy": {"promotion": {"warmWindow": "1m", "warm_window_s": 60}}}, "give warmWindow or the deprecated"),
        ({"policy": {"analysis": {"interval": "1s", "interval_s": 1}}}, "give interval or the deprecated"),
        ({"policy": {"stages": {"steps": [5, 1, 50]}}}, "the steps must grow strictly"),
        ({"policy": {"stages": {"steps": [5, 5, 50]}}}, "Duplicate value: 5"),
        ({"policy": {"stages": {"steps": [1, 2, 5]}}}, "need a canary weight"),
        ({"policy": {"stages": {"steps": [1, 50, 100]}}}, "spec.policy.stages.steps[2]"),
        (
            {"candidate": {"version": "v2", "image": "i:2", "modelUri": "models:/m/2", "registryAlias": "challenger"}},
            "at most one of modelUri and registryAlias",
        ),
        ({"candidate": {"version": "v 2", "image": "i:2"}}, "spec.candidate.version"),
        ({"candidate": {"version": "v2"}}, "spec.candidate.image"),
        ({"manualCommand": {"id": "c1", "kind": "abort", "to": "full"}}, "only a promote command takes a target"),
        ({"manualCommand": {"id": "c1", "kind": "explode"}}, "spec.manualCommand.kind"),
    ],
)
def test_crd_refuses_invalid_rollouts(
    k8s_client: Any, crd: Mapping[str, Any], namespace: str, overrides: dict[str, Any], complaint: str
) -> None:
    message = rejection(k8s_client, namespace, rollout_body("invalid", overrides))

    assert complaint in message


def test_status_is_written_only_through_the_status_subresource(
    k8s_client: Any, crd: Mapping[str, Any], namespace: str
) -> None:
    api = modelrollouts(k8s_client)
    create_rollout(k8s_client, namespace, rollout_body("sub"))

    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "sub", {"status": {"phase": "Sneaky"}})
    assert "status" not in get_rollout(k8s_client, namespace, "sub")
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "sub", {"status": {"phase": "Progressing"}, "spec": {"paused": True}}
    )
    stored = get_rollout(k8s_client, namespace, "sub")
    assert stored["status"]["phase"] == "Progressing"
    assert "paused" not in stored["spec"]
    assert stored["metadata"]["generation"] == 1


# ------------------------------------------------------------------------------------------------ RBAC


def can(k8s_client: Any, user: str, verb: str, resource: str, namespace: str, name: str | None = None) -> bool:
    """The API server's RBAC answer for a service account; ``resource`` is ``group:plural[/subresource]``
    (group empty for the core API)."""
    group, _, rest = resource.partition(":")
    plural, _, subresource = rest.partition("/")
    service_account_groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
    review = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=user,
            groups=service_account_groups,
            resource_attributes=k8s.V1ResourceAttributes(
                group=group, resource=plural, subresource=subresource or None, verb=verb, namespace=namespace, name=name
            ),
        )
    )
    result = k8s.AuthorizationV1Api(k8s_client).create_subject_access_review(review)
    return bool(result.status.allowed)


# ------------------------------------------------------------------------------------------------ install + upgrade


def deployments_ready(k8s_client: Any, namespace: str) -> dict[str, tuple[int, int]]:
    apps = k8s.AppsV1Api(k8s_client)
    return {
        d.metadata.name: (d.status.ready_replicas or 0, d.spec.replicas or 0)
        for d in apps.list_namespaced_deployment(namespace).items
    }


@pytest.fixture
def api_server_slice(k8s_client: Any) -> Iterator[str]:
    """The `kubernetes` EndpointSlice in `default`, as the API server's endpoint reconciler publishes it on a real
    cluster. This control plane listens on loopback only, which an EndpointSlice may not hold, so its reconciler is
    off (tests/kits/cluster.py) and the test publishes a documentation address (TEST-NET-1) in its place."""
    discovery = k8s.DiscoveryV1Api(k8s_client)
    address = "192.0.2.10"
    body = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "kubernetes", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "endpoints": [{"addresses": [address]}], "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }  # fmt: skip
    discovery.create_namespaced_endpoint_slice("default", body)
    try:
        yield address
    finally:
        discovery.delete_namespaced_endpoint_slice("kubernetes", "default")


def test_install_wait_upgrade_and_ownership_of_fields(
    k8s_cluster: ControlPlane,
    k8s_client: Any,
    crd: Mapping[str, Any],
    namespace: str,
    tmp_path: Path,
    api_server_slice: str,
) -> None:
    """helm install --wait succeeds; RBAC is what the components need; `helm upgrade --set model.version=v2`
    changes the candidate while the controller's status and an operator's pause/command survive."""
    values = values_file(BASE_VALUES, tmp_path)
    installed = helm(
        k8s_cluster, "install", RELEASE, str(CHART_DIR), "--namespace", namespace, "-f", str(values),
        "--wait", "--timeout", "180s",
    )  # fmt: skip

    assert f"kubectl -n {namespace} get modelrollouts" in installed
    ready = deployments_ready(k8s_client, namespace)
    # the online feature store's Redis too (onlineStore.mode: deploy, the default)
    assert set(ready) == {"fw-fraudwatch-controller", "fw-fraudwatch-router", "fw-fraudwatch-online-store"}
    # --wait returned: every Deployment has ready pods (the router's HPA may be scaling it to minReplicas now).
    assert all(r >= 1 for r, _ in ready.values()), ready
    rollout = get_rollout(k8s_client, namespace)
    assert rollout["spec"]["candidate"]["version"] == rollout["spec"]["stable"]["version"] == "v1"
    assert all(label in rollout["metadata"]["labels"] for label in STANDARD_LABELS)

    controller = f"system:serviceaccount:{namespace}:fw-fraudwatch-controller"
    router = f"system:serviceaccount:{namespace}:fw-fraudwatch-router"
    assert can(k8s_client, router, "watch", "fraudwatch.io:modelrollouts", namespace, name=ROLLOUT)
    assert not can(k8s_client, router, "watch", "fraudwatch.io:modelrollouts", namespace)  # not every ModelRollout
    assert not can(k8s_client, router, "patch", "fraudwatch.io:modelrollouts", namespace)
    assert not can(k8s_client, router, "get", ":secrets", namespace)
    assert can(k8s_client, controller, "update", "fraudwatch.io:modelrollouts/status", namespace, name=ROLLOUT)
    assert not can(k8s_client, controller, "update", "fraudwatch.io:modelrollouts/status", namespace, name="other")
    assert can(k8s_client, controller, "create", "apps:deployments", namespace)
    assert can(k8s_client, controller, "delete", ":services", namespace)
    assert can(k8s_client, controller, "update", "coordination.k8s.io:leases", namespace, name=ROLLOUT + "-controller")
    assert not can(k8s_client, controller, "update", "coordination.k8s.io:leases", namespace, name="someone-else")
    assert can(k8s_client, controller, "get", ":configmaps", namespace, name="fw-fraudwatch-model-server")
    assert not can(k8s_client, controller, "get", ":configmaps", namespace, name="anything-else")
    assert not can(k8s_client, controller, "list", ":secrets", namespace)
    assert not can(k8s_client, controller, "create", ":pods", namespace)
    assert not can(k8s_client, controller, "list", "fraudwatch.io:modelrollouts", "kube-system")

    # The controller records its status; an operator pauses and sends a one-shot command.
    api = modelrollouts(k8s_client)
    status = {"phase": "Steady", "stage": "stable", "stableVersion": "v1", "stableWeight": 100, "candidateWeight": 0}
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, ROLLOUT, {"status": status})
    command = {"id": "op-1", "kind": "pause", "reason": "e2e"}
    api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, ROLLOUT, {"spec": {"paused": True, "manualCommand": command}}
    )

    # the API server egress is the `kubernetes` EndpointSlice's addresses, looked up at install (not 0.0.0.0/0)
    policy = k8s.NetworkingV1Api(k8s_client).read_namespaced_network_policy(
        f"{RELEASE}-fraudwatch-controller", namespace
    )
    blocks = {p.ip_block.cidr for rule in policy.spec.egress for p in (rule.to or []) if p.ip_block is not None}
    assert blocks == {f"{api_server_slice}/32"}, blocks

    generated = generated_credentials(k8s_client, namespace)
    helm(
        k8s_cluster, "upgrade", RELEASE, str(CHART_DIR), "--namespace", namespace, "--reuse-values",
        "--set", "model.version=v2", "--wait", "--timeout", "180s",
    )  # fmt: skip

    # lookup keeps every generated token and key across the upgrade (a new sticky key would reshuffle accounts)
    assert generated_credentials(k8s_client, namespace) == generated
    upgraded = get_rollout(k8s_client, namespace)
    assert upgraded["spec"]["candidate"]["version"] == "v2"
    assert upgraded["spec"]["candidate"]["image"].endswith(":v2")
    assert upgraded["status"] == status
    assert upgraded["spec"]["paused"] is True
    assert upgraded["spec"]["manualCommand"] == command
    history = json.loads(
        k8s_cluster.run_tool("helm", "history", RELEASE, "--namespace", namespace, "-o", "json").stdout
    )
    assert [h["status"] for h in history] == ["superseded", "deployed"]
