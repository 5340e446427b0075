"""The Kubernetes API as the rollout side uses it: plain JSON objects over the official client's ``ApiClient``.

Everything goes through :class:`KubeApi` — the official ``kubernetes`` client's configuration (kubeconfig or
in-cluster service account), authentication, TLS and ``ApiClient.call_api``, with dicts in and out (the
ModelRollout is a custom resource; typed models would only be converted back and forth). Writes that must not
fight use the API server's own mechanisms: server-side apply for the workloads (one field manager), the status
subresource with ``resourceVersion`` preconditions for the ModelRollout's status (409 → re-read and retry).

:class:`Informer` keeps a local copy of a set of objects (a list or one named object, then a watch from its
``resourceVersion``; re-listed after 410 Gone, after an error and every ``resync_interval_s``) and calls back on
every change — the level-triggered controller reads the copy instead of asking the API server on each reconcile.

Imported lazily by the router (its startup must stay light) and by ``rolloutctl --backend kube``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

GROUP: Final[str] = "fraudwatch.io"
VERSION: Final[str] = "v1alpha1"
API_VERSION: Final[str] = f"{GROUP}/{VERSION}"
KIND: Final[str] = "ModelRollout"
PLURAL: Final[str] = "modelrollouts"
#: Set inside a pod (the kubelet's service environment): use the mounted service-account token.
IN_CLUSTER_ENV: Final[str] = "KUBERNETES_SERVICE_HOST"
SERVICE_ACCOUNT_NAMESPACE: Final[Path] = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HTTP_NOT_FOUND: Final[int] = 404
HTTP_CONFLICT: Final[int] = 409
HTTP_GONE: Final[int] = 410
HTTP_UNPROCESSABLE: Final[int] = 422
_JSON: Final[str] = "application/json"
_APPLY: Final[str] = "application/apply-patch+yaml"
_MERGE: Final[str] = "application/merge-patch+json"
_JSON_PATCH: Final[str] = "application/json-patch+json"
#: A watch's read timeout is its server-side timeout plus this (the server ends the watch first).
_WATCH_READ_MARGIN_S: Final[float] = 15.0

Json = dict[str, Any]
WatchType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]


class KubeError(RuntimeError):
    """A refused or failed API call; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def conflict(self) -> bool:
        return self.status == HTTP_CONFLICT

    @property
    def not_found(self) -> bool:
        return self.status == HTTP_NOT_FOUND


class KubeUnavailableError(RuntimeError):
    """No usable Kubernetes configuration (no kubeconfig, not in a pod)."""


# --------------------------------------------------------------------------------------------------- paths


def rollout_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    if name is not None:
        path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
    return path


def core_path(namespace: str, plural: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/{plural}" + (f"/{name}" if name is not None else "")


def group_path(group_version: str, namespace: str, plural: str, name: str | None = None) -> str:
    return f"/apis/{group_version}/namespaces/{namespace}/{plural}" + (f"/{name}" if name is not None else "")


def deployments_path(namespace: str, name: str | None = None) -> str:
    return group_path("apps/v1", namespace, "deployments", name)


def lease_path(namespace: str, name: str | None = None) -> str:
    return group_path("coordination.k8s.io/v1", namespace, "leases", name)


def name_selector(name: str) -> str:
    return f"metadata.name={name}"


def label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# --------------------------------------------------------------------------------------------------- the client


def pod_namespace() -> str | None:
    """The namespace of the pod this runs in (the service-account mount), else None."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def context_namespace(kubeconfig: Path | None, context: str | None) -> str | None:
    """The namespace of the kubeconfig's (current or given) context, like kubectl's default; None without one."""
    if kubeconfig is None and os.environ.get(IN_CLUSTER_ENV):
        return pod_namespace()
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    config_file = str(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG") or None
    try:
        contexts, current = config.list_kube_config_contexts(config_file)
    except (ConfigException, OSError, TypeError):
        return None
    chosen = next((c for c in contexts if c.get("name") == context), current) if context else current
    namespace = (chosen or {}).get("context", {}).get("namespace")
    return str(namespace) if namespace else None


def new_api_client(kubeconfig: Path | None, context: str | None) -> Any:
    """An ``ApiClient``: the given kubeconfig; else in-cluster in a pod; else ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is None and os.environ.get(IN_CLUSTER_ENV):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        # $KUBECONFIG read now (the client reads it once, at import)
        config_file = str(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG") or None
        return config.new_client_from_config(config_file=config_file, context=context, persist_config=False)
    except (ConfigException, OSError, TypeError) as exc:
        where = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG", "~/.kube/config")
        raise KubeUnavailableError(f"no usable Kubernetes configuration ({where}): {exc}") from exc


@dataclass
class KubeApi:
    """JSON calls through the official client's ``ApiClient`` (auth, TLS, retries of its connection pool)."""

    client: Any
    request_timeout_s: float = 10.0

    @classmethod
    def connect(cls, kubeconfig: Path | None, context: str | None, request_timeout_s: float) -> KubeApi:
        return cls(new_api_client(kubeconfig, context), request_timeout_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    # ---- verbs

    def call(
        self,
        method: str,
        path: str,
        *,
        body: object | None = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = _JSON,
        timeout_s: float | None = None,
    ) -> Json:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            result = self.client.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": _JSON, "Content-Type": content_type},
                body=body,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=timeout_s if timeout_s is not None else self.request_timeout_s,
            )
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), f"{method} {path}: {exc.status} {_reason(exc)}") from exc
        except (HTTPError, OSError) as exc:
            raise KubeError(0, f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        return result if isinstance(result, dict) else {}

    def get(self, path: str) -> Json | None:
        """The object, or None when it does not exist."""
        try:
            return self.call("GET", path)
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    def list(self, path: str, query: Sequence[tuple[str, str]] = ()) -> Json:
        return self.call("GET", path, query=query)

    def create(self, path: str, body: Mapping[str, Any], query: Sequence[tuple[str, str]] = ()) -> Json:
        return self.call("POST", path, body=dict(body), query=query)

    def replace(self, path: str, body: Mapping[str, Any], query: Sequence[tuple[str, str]] = ()) -> Json:
        return self.call("PUT", path, body=dict(body), query=query)

    def merge_patch(self, path: str, patch: Mapping[str, Any], query: Sequence[tuple[str, str]] = ()) -> Json:
        return self.call("PATCH", path, body=dict(patch), query=query, content_type=_MERGE)

    def json_patch(self, path: str, operations: Sequence[Mapping[str, Any]]) -> Json:
        return self.call("PATCH", path, body=[dict(o) for o in operations], content_type=_JSON_PATCH)

    def apply(self, path: str, body: Mapping[str, Any], field_manager: str) -> Json:
        """Server-side apply (force: this field manager owns what it sends)."""
        query = [("fieldManager", field_manager), ("force", "true")]
        return self.call("PATCH", path, body=dict(body), query=query, content_type=_APPLY)

    def delete(self, path: str, propagation: str = "Background") -> bool:
        """Delete; False when it did not exist."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        try:
            self.call("DELETE", path, body=body)
        except KubeError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def watch(self, path: str, query: Sequence[tuple[str, str]], timeout_s: int) -> Iterator[Json]:
        """The watch events (``{"type", "object"}``) of one watch request, until the server ends it."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        params = [*query, ("watch", "true"), ("timeoutSeconds", str(timeout_s)), ("allowWatchBookmarks", "true")]
        try:
            response = self.client.call_api(
                path,
                "GET",
                query_params=params,
                header_params={"Accept": _JSON},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=False,
                _request_timeout=(self.request_timeout_s, timeout_s + _WATCH_READ_MARGIN_S),
            )
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), f"WATCH {path}: {exc.status} {_reason(exc)}") from exc
        try:
            for line in iter_resp_lines(response):
                if line:
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        finally:
            response.close()
            response.release_conn()


def _reason(exc: Any) -> str:
    """The API server's message from an ApiException (its Status body), else its reason."""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        body = json.loads(exc.body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "reason", "") or "")


def path_query(path: str, query: Sequence[tuple[str, str]]) -> str:
    """A path with its query (for log lines)."""
    return path + ("?" + "&".join(f"{k}={quote(v)}" for k, v in query) if query else "")


# --------------------------------------------------------------------------------------------------- informer


@dataclass
class Informer:
    """A local copy of the objects at ``path`` (a collection, or with ``name``: that one object), kept by a watch.

    ``on_change(event_type, object)`` runs in the informer's thread after every change of the copy (also for the
    objects of a re-list). Readers take :meth:`items` / :meth:`get` (copies are never mutated in place)."""

    api: KubeApi
    path: str
    what: str
    query: tuple[tuple[str, str], ...] = ()
    name: str | None = None
    watch_timeout_s: int = 60
    resync_interval_s: float = 300.0
    retry_backoff_s: float = 1.0
    on_change: Callable[[str, Json], None] | None = None
    _items: dict[str, Json] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _synced: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    errors: int = field(default=0, init=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.what}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def wait_synced(self, timeout_s: float) -> bool:
        return self._synced.wait(timeout_s)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def items(self) -> list[Json]:
        with self._lock:
            return list(self._items.values())

    def get(self, name: str) -> Json | None:
        with self._lock:
            return self._items.get(name)

    def put(self, obj: Json) -> None:
        """Record an object this process just wrote (newer than the watch may have delivered yet)."""
        self._store("MODIFIED", obj)

    def forget(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    # ---- the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._relist()
                listed_at = time.monotonic()
                while not self._stop.is_set() and time.monotonic() - listed_at < self.resync_interval_s:
                    version = self._watch_once(version)
            except KubeError as exc:
                self.errors += 1
                level = "watch gone, re-listing" if exc.status == HTTP_GONE else "watch failed"
                log_event(logger, level, event="informer_error", what=self.what, status=exc.status, error=str(exc))
                if exc.status != HTTP_GONE:
                    self._stop.wait(self.retry_backoff_s)
            except Exception as exc:  # a broken connection mid-stream, a bad line: re-list after a pause
                self.errors += 1
                log_event(logger, "watch failed", event="informer_error", what=self.what,
                          error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                self._stop.wait(self.retry_backoff_s)

    def _relist(self) -> str:
        if self.name is not None:
            obj = self.api.get(f"{self.path}/{self.name}")
            objects = [obj] if obj is not None else []
            version = str(obj["metadata"]["resourceVersion"]) if obj is not None else ""
        else:
            listed = self.api.list(self.path, self.query)
            objects = [o for o in listed.get("items", []) if isinstance(o, dict)]
            version = str(listed.get("metadata", {}).get("resourceVersion", ""))
        names = {str(o["metadata"]["name"]) for o in objects}
        with self._lock:
            gone = [o for n, o in self._items.items() if n not in names]
            for obj in gone:
                self._items.pop(str(obj["metadata"]["name"]), None)
        for obj in gone:
            self._notify("DELETED", obj)
        for obj in objects:
            self._store("ADDED", obj)
        self._synced.set()
        return version

    def _watch_once(self, version: str) -> str:
        query = list(self.query)
        if self.name is not None:
            query.append(("fieldSelector", name_selector(self.name)))
        if version:
            query.append(("resourceVersion", version))
        for event in self.api.watch(self.path, query, self.watch_timeout_s):
            kind: str = str(event.get("type", ""))
            obj = event.get("object")
            if not isinstance(obj, dict):
                continue
            if kind == "ERROR":
                raise KubeError(int(obj.get("code", 0)), f"watch {self.what}: {obj.get('message', obj)}")
            version = str(obj.get("metadata", {}).get("resourceVersion", version))
            if kind == "BOOKMARK":
                continue
            if kind == "DELETED":
                self.forget(str(obj["metadata"]["name"]))
                self._notify(kind, obj)
            else:
                self._store(kind, obj)
            if self._stop.is_set():
                break
        return version

    def _store(self, kind: str, obj: Json) -> None:
        name = str(obj["metadata"]["name"])
        with self._lock:
            held = self._items.get(name)
            if held is not None and _older(obj, held):
                return  # a write of ours the watch has not caught up with
            self._items[name] = obj
        self._notify(kind, obj)

    def _notify(self, kind: str, obj: Json) -> None:
        if self.on_change is not None:
            self.on_change(kind, obj)


def _older(candidate: Json, held: Json) -> bool:
    """True when ``candidate`` is an older version of ``held`` (resourceVersions compared as integers: etcd's
    revisions; opaque strings by contract, so anything that is not an integer counts as newer)."""
    try:
        return int(candidate["metadata"]["resourceVersion"]) < int(held["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return False
