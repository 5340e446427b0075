"""Which kubeconfigs the CLI's light Kubernetes client reads itself, and what it reads from them (no server here:
tests/e2e/test_kube_http.py makes its calls against the real API server)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.backends.kube.http import kubeconfig_path, light_api, load_credentials


def kubeconfig(tmp_path: Path, user: dict[str, Any], *, cluster: dict[str, Any] | None = None) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": cluster or {"server": "https://127.0.0.1:6443/", "certificate-authority": "ca.crt"},
            }
        ],
        "users": [{"name": "u", "user": user}, {"name": "other", "user": {"token": "other-token"}}],
        "contexts": [
            {"name": "main", "context": {"cluster": "c", "user": "u", "namespace": "fraud"}},
            {"name": "second", "context": {"cluster": "c", "user": "other"}},
        ],
        "current-context": "main",
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_paths_resolve_against_the_kubeconfig_directory_like_kubectl(tmp_path: Path) -> None:
    creds = load_credentials(kubeconfig(tmp_path, {"client-certificate": "me.crt", "client-key": "/abs/me.key"}), None)
    assert creds is not None
    assert (creds.server, creds.namespace) == ("https://127.0.0.1:6443", "fraud")
    assert creds.ca_file == str(tmp_path / "ca.crt")
    assert (creds.cert_file, creds.key_file) == (str(tmp_path / "me.crt"), "/abs/me.key")
    assert creds.token is None


def test_tokens_inline_or_from_a_file_and_another_context(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token\n", encoding="utf-8")
    path = kubeconfig(tmp_path, {"tokenFile": "token"})
    creds = load_credentials(path, None)
    assert creds is not None and creds.token == "file-token"
    second = load_credentials(path, "second")
    assert second is not None and (second.token, second.namespace) == ("other-token", None)
    assert load_credentials(path, "no-such-context") is None


def test_inline_data_is_decoded(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    data = base64.b64encode(pem).decode()
    cluster = {"server": "https://k8s.example:443", "certificate-authority-data": data}
    creds = load_credentials(
        kubeconfig(tmp_path, {"client-certificate-data": data, "client-key-data": data}, cluster=cluster), None
    )
    assert creds is not None
    assert creds.ca_data == pem.decode() and creds.cert_data == pem and creds.key_data == pem
    assert creds.ca_file is None


@pytest.mark.parametrize(
    "user", [{"exec": {"command": "aws"}}, {"auth-provider": {"name": "oidc"}}, {"username": "a", "password": "b"}]
)
def test_credential_plugins_and_basic_auth_go_to_the_official_client(tmp_path: Path, user: dict[str, Any]) -> None:
    assert load_credentials(kubeconfig(tmp_path, user), None) is None
    assert light_api(kubeconfig(tmp_path, user), None, 1.0) is None


def test_missing_or_broken_kubeconfigs_are_not_used(tmp_path: Path) -> None:
    assert load_credentials(tmp_path / "absent", None) is None
    broken = tmp_path / "broken"
    broken.write_text("{ not yaml", encoding="utf-8")
    assert load_credentials(broken, None) is None
    plain_http = kubeconfig(tmp_path, {"token": "t"}, cluster={"server": "http://127.0.0.1:8080"})
    assert light_api(plain_http, None, 1.0) is None  # https only


def test_the_kubeconfig_is_found_like_kubectl_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'first'}:{tmp_path / 'second'}")
    assert kubeconfig_path(None) == tmp_path / "first"
    assert kubeconfig_path(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("KUBECONFIG")
    assert kubeconfig_path(None) == Path("~/.kube/config").expanduser()
