"""The chart on the session's real control plane: its release's names, the CRD applied and Established, a
throwaway namespace, ``helm template --validate`` against the API server, and the ModelRollout read back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from tests.kits.chart import CHART_DIR, DRY_RENDER_VALUES, parse_manifests, values_file
from tests.kits.cluster import ControlPlane

GROUP = "fraudwatch.io"
VERSION = "v1alpha1"
PLURAL = "modelrollouts"
CRD_NAME = f"{PLURAL}.{GROUP}"
RELEASE = "fw"
ROLLOUT = "fw-fraudwatch"
#: Test values: nothing waits on storage or load balancers; a fixed admin token keeps renders deterministic.
BASE_VALUES: dict[str, Any] = {"router": {"adminToken": {"value": "e2e-admin-token"}}}


def wait_established(k8s_cluster: ControlPlane, k8s_client: Any, name: str) -> None:
    api = k8s.ApiextensionsV1Api(k8s_client)

    def established() -> bool:
        conditions = api.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    k8s_cluster.wait_for(f"CRD {name} Established", established)


def render(
    k8s_cluster: ControlPlane, values: Mapping[str, Any], directory: Path, namespace: str
) -> list[dict[str, Any]]:
    """``helm template`` with the cluster's capabilities (``--validate`` asks the API server which APIs it serves)."""
    out = k8s_cluster.run_tool(
        "helm", "template", RELEASE, str(CHART_DIR), "--namespace", namespace, "--validate",
        "-f", str(values_file({**BASE_VALUES, **DRY_RENDER_VALUES, **values}, directory)),
    ).stdout  # fmt: skip
    return parse_manifests(out)


def modelrollouts(k8s_client: Any) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(k8s_client)


def get_rollout(k8s_client: Any, namespace: str, name: str = ROLLOUT) -> dict[str, Any]:
    obj = modelrollouts(k8s_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert isinstance(obj, dict)
    return obj
