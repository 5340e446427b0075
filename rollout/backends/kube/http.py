"""A light Kubernetes API client for ``rolloutctl --backend kube`` / ``kubectl modelrollout``: the standard library's
``http.client`` and ``ssl`` with the credentials of a kubeconfig (or a pod's service account).

Why not the official client here: importing ``kubernetes`` costs ~0.4 s of CPU before the first request, which is
most of the time an operator waits for ``kubectl modelrollout revert`` (the controller needs ~0.15 s from the
patch to the routers' new table). The controller and the router, long-running, keep using the official client
(:mod:`rollout.backends.kube.api`); this covers the kubeconfigs people use from a shell — a client certificate, a
bearer token or token file, a CA, by path or inline — and :func:`light_api` returns None for anything else
(``exec`` credential plugins, ``auth-provider``, basic auth), so the caller falls back to the official client.

It answers the same calls as :class:`~rollout.backends.kube.api.KubeApi` that the CLI makes (``get``,
``merge_patch``, ``json_patch``) with the same errors (:class:`~rollout.backends.kube.api.KubeError`).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import yaml

from rollout.backends.kube.api import HTTP_NOT_FOUND, IN_CLUSTER_ENV, SERVICE_ACCOUNT_NAMESPACE, Json, KubeError

DEFAULT_KUBECONFIG: Final[Path] = Path("~/.kube/config")
SERVICE_ACCOUNT_DIR: Final[Path] = SERVICE_ACCOUNT_NAMESPACE.parent
#: User fields this client cannot honour: their kubeconfigs go to the official client.
UNSUPPORTED_USER_FIELDS: Final[frozenset[str]] = frozenset({"exec", "auth-provider", "username", "password"})
_JSON: Final[str] = "application/json"
_MERGE: Final[str] = "application/merge-patch+json"
_JSON_PATCH: Final[str] = "application/json-patch+json"


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to authenticate to it (paths or inline PEM; a token)."""

    server: str
    namespace: str | None = None
    ca_file: str | None = None
    ca_data: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    insecure: bool = False


def kubeconfig_path(kubeconfig: Path | None) -> Path:
    """The kubeconfig kubectl would read: the given one, the first of ``$KUBECONFIG``, else ``~/.kube/config``."""
    if kubeconfig is not None:
        return kubeconfig
    configured = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return Path(configured[0]) if configured else DEFAULT_KUBECONFIG.expanduser()


def _named(items: object, name: str | None) -> Mapping[str, Any] | None:
    if not isinstance(items, list):
        return None
    return next((i for i in items if isinstance(i, dict) and i.get("name") == name), None)


def _relative(base: Path, value: object) -> str | None:
    """A path field of a kubeconfig, relative to the file's directory like kubectl resolves it."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base.parent / path)


def _decoded(value: object) -> bytes | None:
    return base64.b64decode(value) if isinstance(value, str) and value else None


def credentials_from_kubeconfig(document: Mapping[str, Any], path: Path, context: str | None) -> Credentials | None:
    """The credentials of ``context`` (default: the current one), or None when this client cannot use them."""
    ctx = _named(document.get("contexts"), context or document.get("current-context"))
    spec = ctx.get("context") if ctx is not None else None
    if not isinstance(spec, dict):
        return None
    cluster_entry = _named(document.get("clusters"), spec.get("cluster"))
    user_entry = _named(document.get("users"), spec.get("user"))
    cluster = cluster_entry.get("cluster") if cluster_entry is not None else None
    user = (user_entry.get("user") if user_entry is not None else None) or {}
    if not isinstance(cluster, dict) or not isinstance(user, dict) or not isinstance(cluster.get("server"), str):
        return None
    if UNSUPPORTED_USER_FIELDS & set(user):
        return None
    token = user.get("token") if isinstance(user.get("token"), str) else None
    token_file = _relative(path, user.get("tokenFile"))
    if token is None and token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    ca_data = _decoded(cluster.get("certificate-authority-data"))
    namespace = spec.get("namespace")
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        namespace=str(namespace) if namespace else None,
        ca_file=_relative(path, cluster.get("certificate-authority")),
        ca_data=ca_data.decode("ascii") if ca_data is not None else None,
        cert_file=_relative(path, user.get("client-certificate")),
        key_file=_relative(path, user.get("client-key")),
        cert_data=_decoded(user.get("client-certificate-data")),
        key_data=_decoded(user.get("client-key-data")),
        token=token,
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
    )


def in_cluster_credentials() -> Credentials | None:
    """A pod's service account (the kubelet's environment and mounted token), or None outside a pod."""
    host, port = os.environ.get(IN_CLUSTER_ENV), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = SERVICE_ACCOUNT_DIR / "token"
    if not host or not token.is_file():
        return None
    namespace = (
        SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() if SERVICE_ACCOUNT_NAMESPACE.is_file() else None
    )
    server_host = f"[{host}]" if ":" in host else host
    return Credentials(
        server=f"https://{server_host}:{port}",
        namespace=namespace or None,
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        token=token.read_text(encoding="utf-8").strip(),
    )


def load_credentials(kubeconfig: Path | None, context: str | None) -> Credentials | None:
    """What kubectl would use (the given kubeconfig; else in a pod its service account; else ``$KUBECONFIG`` /
    ``~/.kube/config``), or None when this client cannot use it (missing, unreadable, or an unsupported user)."""
    if kubeconfig is None and os.environ.get(IN_CLUSTER_ENV):
        return in_cluster_credentials()
    path = kubeconfig_path(kubeconfig)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        return credentials_from_kubeconfig(document, path, context) if isinstance(document, dict) else None
    except (OSError, yaml.YAMLError, ValueError):
        return None


@contextlib.contextmanager
def _pem_files(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """Inline client certificate and key as private temporary files (``ssl`` loads a chain from files only)."""
    with tempfile.TemporaryDirectory(prefix="fw-kube-") as directory:
        paths = []
        for name, data in (("client.crt", cert), ("client.key", key)):
            target = Path(directory) / name
            target.touch(mode=0o600)
            target.write_bytes(data)
            paths.append(str(target))
        yield paths[0], paths[1]


def ssl_context(creds: Credentials) -> ssl.SSLContext:
    """TLS to the API server: its CA (or the system's), the client certificate when there is one."""
    context = ssl.create_default_context(cafile=creds.ca_file, cadata=creds.ca_data)
    if creds.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if creds.cert_file and creds.key_file:
        context.load_cert_chain(creds.cert_file, creds.key_file)
    elif creds.cert_data and creds.key_data:
        with _pem_files(creds.cert_data, creds.key_data) as (cert, key):
            context.load_cert_chain(cert, key)
    return context


class KubeCalls(Protocol):
    """The calls the CLI makes: answered by this module's client and by the official one (``KubeApi``)."""

    def get(self, path: str) -> Json | None: ...

    def merge_patch(self, path: str, patch: Mapping[str, Any], query: Sequence[tuple[str, str]] = ()) -> Json: ...

    def json_patch(self, path: str, operations: Sequence[Mapping[str, Any]]) -> Json: ...

    def close(self) -> None: ...


class HttpKubeApi:
    """JSON calls on one keep-alive HTTPS connection to the API server (re-opened after an error)."""

    def __init__(self, creds: Credentials, request_timeout_s: float) -> None:
        parts = urlsplit(creds.server)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"unsupported API server URL {creds.server!r} (https only)")
        self._host, self._port = parts.hostname, parts.port or 443
        self._prefix = parts.path.rstrip("/")
        self._context = ssl_context(creds)
        self._token = creds.token
        self._timeout_s = request_timeout_s
        self._connection: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> http.client.HTTPSConnection:
        if self._connection is None:
            self._connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout_s, context=self._context
            )
        return self._connection

    def call(
        self,
        method: str,
        path: str,
        *,
        body: object | None = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = _JSON,
    ) -> Json:
        url = self._prefix + path + (f"?{urlencode(list(query))}" if query else "")
        headers = {"Accept": _JSON, "Content-Type": content_type, "User-Agent": "rolloutctl"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        payload = json.dumps(body).encode("utf-8") if body is not None else None
        try:
            connection = self._connect()
            connection.request(method, url, body=payload, headers=headers)
            response = connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise KubeError(0, f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status >= 400:
            raise KubeError(response.status, f"{method} {path}: {response.status} {_reason(content, response.reason)}")
        try:
            result = json.loads(content) if content else {}
        except ValueError as exc:
            raise KubeError(response.status, f"{method} {path}: not JSON") from exc
        return result if isinstance(result, dict) else {}

    def get(self, path: str) -> Json | None:
        """The object, or None when it does not exist."""
        try:
            return self.call("GET", path)
        except KubeError as exc:
            if exc.status == HTTP_NOT_FOUND:
                return None
            raise

    def merge_patch(self, path: str, patch: Mapping[str, Any], query: Sequence[tuple[str, str]] = ()) -> Json:
        return self.call("PATCH", path, body=dict(patch), query=query, content_type=_MERGE)

    def json_patch(self, path: str, operations: Sequence[Mapping[str, Any]]) -> Json:
        return self.call("PATCH", path, body=[dict(o) for o in operations], content_type=_JSON_PATCH)


def _reason(content: bytes, fallback: str) -> str:
    """The ``Status`` message the API server sent, else the HTTP reason phrase."""
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(content).get("message")
        if message:
            return str(message)
    return fallback


def light_api(
    kubeconfig: Path | None, context: str | None, request_timeout_s: float
) -> tuple[HttpKubeApi, str | None] | None:
    """The light client and the context's namespace, or None when the configuration needs the official client."""
    creds = load_credentials(kubeconfig, context)
    if creds is None:
        return None
    try:
        return HttpKubeApi(creds, request_timeout_s), creds.namespace
    except (ValueError, OSError, ssl.SSLError):
        return None
