"""The CLI's light Kubernetes client (``rollout/backends/kube/http.py``) against the real API server, beside the
official client (``KubeApi``) doing the same calls: the same objects, the same errors, both kinds of credentials
(the admin client certificate by path, a ServiceAccount token from a TokenRequest) and inline PEM data."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rollout.backends.kube.api import KubeApi, KubeError, rollout_path
from rollout.backends.kube.http import HttpKubeApi, light_api, load_credentials
from tests.e2e.cluster import ControlPlane
from tests.e2e.kubekit import admin_api, ensure_crd, namespace, rollout_body, service_account_kubeconfig

pytestmark = pytest.mark.e2e

NAME = "light-client"


@pytest.fixture(scope="module")
def admin(k8s_cluster: ControlPlane) -> Iterator[KubeApi]:
    api = admin_api(k8s_cluster)
    ensure_crd(k8s_cluster, api)
    yield api
    api.close()


@pytest.fixture(scope="module")
def ns(admin: KubeApi) -> Iterator[str]:
    with namespace(admin, "light") as name:
        admin.create(rollout_path(name), rollout_body(NAME))
        yield name


def light(kubeconfig: Path) -> HttpKubeApi:
    made = light_api(kubeconfig, None, 10.0)
    assert made is not None, "the light client should handle this kubeconfig"
    return made[0]


def test_the_light_client_reads_and_patches_like_the_official_one(
    k8s_cluster: ControlPlane, admin: KubeApi, ns: str
) -> None:
    client = light(k8s_cluster.kubeconfig)
    path = rollout_path(ns, NAME)
    try:
        assert client.get(path) == admin.get(path)
        assert client.get(rollout_path(ns, "absent")) is None
        patched = client.merge_patch(path, {"spec": {"paused": True}})
        assert patched["spec"]["paused"] is True
        assert admin.get(path)["spec"]["paused"] is True  # type: ignore[index]
        test = {"op": "test", "path": "/spec/paused", "value": False}
        with pytest.raises(KubeError) as refused:  # a failed JSON-patch test: 422, as with the official client
            client.json_patch(path, [test, {"op": "remove", "path": "/spec/paused"}])
        with pytest.raises(KubeError) as official:
            admin.json_patch(path, [test, {"op": "remove", "path": "/spec/paused"}])
        assert refused.value.status == official.value.status == 422
        client.json_patch(
            path, [{"op": "test", "path": "/spec/paused", "value": True}, {"op": "remove", "path": "/spec/paused"}]
        )
        assert "paused" not in admin.get(path)["spec"]  # type: ignore[index]
    finally:
        client.close()


def test_a_service_account_token_gets_what_rbac_allows_and_a_403_otherwise(
    k8s_cluster: ControlPlane, admin: KubeApi, ns: str, tmp_path: Path
) -> None:
    admin.create(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "nobody"}})
    kubeconfig = service_account_kubeconfig(k8s_cluster, admin, ns, "nobody", tmp_path / "nobody.yaml")
    made = light_api(kubeconfig, None, 10.0)
    assert made is not None
    client, context_namespace = made
    try:
        assert context_namespace == ns
        with pytest.raises(KubeError) as forbidden:
            client.get(rollout_path(ns, NAME))
        assert forbidden.value.status == 403
        assert "forbidden" in str(forbidden.value)
    finally:
        client.close()


def test_inline_certificate_data_works_like_files(
    k8s_cluster: ControlPlane, admin: KubeApi, ns: str, tmp_path: Path
) -> None:
    document = yaml.safe_load(k8s_cluster.kubeconfig.read_text(encoding="utf-8"))
    cluster, user = document["clusters"][0]["cluster"], document["users"][0]["user"]

    def inline(path: str) -> str:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")

    cluster["certificate-authority-data"] = inline(cluster.pop("certificate-authority"))
    user["client-certificate-data"] = inline(user.pop("client-certificate"))
    user["client-key-data"] = inline(user.pop("client-key"))
    inline_config = tmp_path / "inline.yaml"
    inline_config.write_text(yaml.safe_dump(document), encoding="utf-8")
    creds = load_credentials(inline_config, None)
    assert creds is not None and creds.cert_data is not None and creds.ca_file is None
    client = light(inline_config)
    try:
        assert client.get(rollout_path(ns, NAME)) == admin.get(rollout_path(ns, NAME))
    finally:
        client.close()
