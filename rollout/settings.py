"""Every path, timeout, limit and port of the rollout side (router, outcomes, controller), from the environment.

The prefix is ``FW_ROLLOUT_`` and nested groups use ``__``, e.g. ``FW_ROLLOUT_ROUTER__PORT=8080``,
``FW_ROLLOUT_ROUTER__ROUTING_FILE=var/routing.json`` or ``FW_ROLLOUT_ROUTER__ADMIN_TOKEN=…``. The model side keeps
its own ``FW_`` settings in :mod:`service.settings`; the two never share a field.

Each component owns one nested group (``router`` here); new components add their own group beside it, so the file
stays additive: adding a group or a field never changes an existing one.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rollout.core.buckets import DEFAULT_LATENCY_BUCKETS_S, DEFAULT_SCORE_DELTA_BUCKETS
from service.settings import OnlineStoreSettings

#: A label source's name: the ``source`` of its labels, the key of its token in a Secret (a file name).
SOURCE_NAME_PATTERN: Final[str] = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class RouterKubeSettings(BaseModel):
    """The router's Kubernetes table source (``FW_ROLLOUT_ROUTER__KUBE__…``): it watches one ModelRollout and applies
    its ``status.routing``. Off while ``rollout_name`` is unset."""

    #: The ModelRollout whose ``status.routing`` the router applies; None → no Kubernetes source.
    rollout_name: str | None = Field(None, min_length=1, max_length=253)
    #: Its namespace; None → the pod's own namespace (the service-account mount), else ``default``.
    namespace: str | None = Field(None, min_length=1, max_length=63)
    #: A kubeconfig file; None → in-cluster configuration inside a pod, else ``$KUBECONFIG`` / ``~/.kube/config``.
    kubeconfig: Path | None = None
    context: str | None = None
    #: Server-side timeout of one watch request (the watch is then resumed from the last resourceVersion).
    watch_timeout_s: int = Field(300, ge=1)
    #: Budget of the initial read and of each API request (a watch's read timeout is this plus the watch timeout).
    request_timeout_s: float = Field(10.0, gt=0.0)
    #: Wait after a failed watch (API server unreachable, RBAC refusal) before trying again.
    retry_backoff_s: float = Field(1.0, gt=0.0)


class RouterSettings(BaseModel):
    """The traffic router: where its routing table comes from, upstream budgets, shadow limits, the admin token."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Local routing-table source (JSON or YAML); polled by mtime, off the request path. None → no file source.
    routing_file: Path | None = None
    poll_interval_s: float = Field(0.2, gt=0.0, le=5.0)
    #: Bearer token of ``PUT/GET /admin/routing``; unset → the admin endpoint refuses every call (401).
    admin_token: SecretStr | None = None
    #: Alternative to ``admin_token`` for mounted secrets: the token is the file's stripped content.
    admin_token_file: Path | None = None
    #: The feedback (label) listener: its own port in the router process, never the public one. None → the public
    #: port + 1. Label feeds reach it with ``feedback_token``; the public port serves no feedback route.
    control_host: str | None = None
    control_port: int | None = Field(None, ge=0, le=65535)
    #: Bearer token of ``POST /api/v1/feedback[/batch]`` on the control listener (or ``feedback_token_file``, a
    #: mounted Secret): the token of the label source ``feedback_source``. Without any token (this or
    #: ``feedback_tokens_dir``) the router refuses to start, unless ``feedback_insecure_dev`` is set.
    feedback_token: SecretStr | None = None
    feedback_token_file: Path | None = None
    #: The label source that ``feedback_token`` authenticates: its labels are stored and rate-limited under this name.
    feedback_source: str = Field("default", pattern=SOURCE_NAME_PATTERN)
    #: One token per label source: a directory (a Kubernetes Secret mounted as a volume, one key per source) whose
    #: every file is named after a source and holds that source's token. A label's ``source`` is the one its token
    #: authenticates (a body naming another is refused with 403), and each source has its own quota.
    feedback_tokens_dir: Path | None = None
    #: Development only: run the feedback listener without a token, accepting unauthenticated labels (logged as a
    #: warning at start). Labels decide rollouts: never in a deployment.
    feedback_insecure_dev: bool = False
    #: The online feature store the model servers read (service/settings.py OnlineStoreSettings): each recorded fraud
    #: label is written there for its account (rollout/router/outcomes/online_labels.py). ``none`` (the default) →
    #: labels change no velocity feature; ``redis://…`` with ``password_file``, or the model servers' SQLite file
    #: (``sqlite:///path``) on one machine.
    online_store: OnlineStoreSettings = OnlineStoreSettings(url="none")
    #: The key of sticky assignment (or ``sticky_key_file``, a mounted Secret): each table's salt (the version pair,
    #: or the ModelRollout's ``spec.routingSalt``) is hashed with it (keyed BLAKE2b), so every rollout gets its own
    #: salt and no client can compute which accounts reach the candidate. Every replica must share it (the chart's
    #: Secret); unset → a random key per process (logged: stickiness then holds within one router process only).
    sticky_key: SecretStr | None = None
    sticky_key_file: Path | None = None

    #: The HTTP client library of upstream calls (both pooled, keep-alive, HTTP/1.1); see rollout/router/upstream.py.
    #: aiohttp by default: half httpx's router CPU per request in benchmarks/router_benchmark.py (0.67 vs 1.32 ms
    #: at concurrency 1, 2026-12-01), which is what keeps the router's added p50 inside its 1 ms budget.
    upstream_client: Literal["httpx", "aiohttp"] = "aiohttp"
    predict_path: str = "/api/v1/refund-predict"
    #: The model services' batch endpoint (shadow calls are batched through it).
    batch_path: str = "/api/v1/refund-predict-batch"
    upstream_ready_path: str = "/readyz"
    #: Budget of a deciding call to a candidate; past it the request falls back to stable.
    candidate_timeout_s: float = Field(0.25, gt=0.0)
    #: Budget of a deciding call to stable (also the fallback call); past it the client gets a 503.
    stable_timeout_s: float = Field(2.0, gt=0.0)
    #: Establishing a connection (capped by the call's budget); loopback and in-cluster connects take well under a
    #: millisecond, but a busy node's accept queue can hold one for tens of ms: 0.1 s cut healthy calls (issue 12).
    connect_timeout_s: float = Field(1.0, gt=0.0)
    shadow_timeout_s: float = Field(0.5, gt=0.0)
    #: Connection pool of each upstream (one ``httpx.AsyncClient`` per upstream URL, HTTP/1.1 keep-alive).
    max_connections: int = Field(100, ge=1)
    max_keepalive_connections: int = Field(50, ge=0)
    keepalive_expiry_s: float = Field(30.0, gt=0.0)
    #: A client of an upstream that left the routing table is closed after this grace (in-flight calls finish).
    retired_client_grace_s: float = Field(10.0, ge=0.0)

    #: Shadow work waits in a bounded queue served by a bounded number of workers; overflow is dropped and counted.
    shadow_queue_size: int = Field(512, ge=1)
    shadow_concurrency: int = Field(4, ge=1)
    #: A shadow worker sends the jobs queued for one version as one call to its batch endpoint (at most this many;
    #: 1 = one call per job), waiting at most ``shadow_batch_linger_ms`` for more after the first: shadow work is
    #: off the response path, so a few milliseconds buy a batch whose per-request CPU is a fraction of single
    #: calls' (benchmarks/router_benchmark.py, stage shadow vs stable).
    shadow_batch_max: int = Field(32, ge=1, le=1000)
    shadow_batch_linger_ms: float = Field(5.0, ge=0.0, le=1000.0)
    #: Load shedding: while more deciding calls than this are in flight, new shadow work is dropped ("overload").
    shadow_shed_inflight: int = Field(32, ge=1)
    #: On shutdown queued shadow work may finish within this budget; what is left is dropped ("shutdown").
    shadow_drain_timeout_s: float = Field(2.0, ge=0.0)
    #: uvicorn's budget for in-flight requests after SIGTERM.
    graceful_shutdown_s: float = Field(10.0, ge=0.0)

    #: The public answer's fields beyond the scoring contract (``prediction``, ``confidence``, ``decision``,
    #: ``prediction_id``, ``correlation_id``): ``score``, ``threshold``, ``model_version``, ``stage``, ``role``,
    #: ``routed_to`` and the ``X-Model-Version`` header. They let a client probe the score and threshold and tell
    #: which version decided (then pick the more lenient one): off by default (and in the chart, values
    #: ``router.exposeDecisionDetails``); the demo, tests and benchmarks turn it on explicitly (RouterProcess).
    expose_decision_details: bool = False
    #: Readiness needs one successful answer from stable; it is probed at this interval until it answers.
    ready_probe_interval_s: float = Field(0.25, gt=0.0)
    max_body_bytes: int = Field(65_536, ge=1024)
    max_correlation_id_chars: int = Field(128, ge=8)
    #: One structured JSON log line per routing decision.
    log_decisions: bool = True
    #: W3C Trace Context: each request becomes a span of the client's trace (``traceparent``; a new trace when the
    #: client sent none), passed to the model service with the client's ``tracestate`` (service/common/tracing.py).
    trace_context: bool = True
    #: With ``trace_context``: record each request as an OpenTelemetry span exported over OTLP/HTTP to this URL
    #: (e.g. ``http://otel-collector:4318/v1/traces``; in the ``[router]`` extra). None: IDs only, no SDK.
    otlp_endpoint: str | None = None
    latency_buckets_s: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_S
    #: Running the router as a child process (rollout.router.process): readiness deadline, poll, SIGTERM grace.
    process_start_timeout_s: float = Field(60.0, gt=0.0)
    process_poll_interval_s: float = Field(0.05, gt=0.0)
    process_stop_timeout_s: float = Field(20.0, gt=0.0)
    score_delta_buckets: tuple[float, ...] = DEFAULT_SCORE_DELTA_BUCKETS
    kube: RouterKubeSettings = RouterKubeSettings()

    def admin_secret(self) -> str | None:
        """The admin bearer token (``admin_token`` first, else the content of ``admin_token_file``), or None."""
        return read_secret(self.admin_token, self.admin_token_file)

    def feedback_secret(self) -> str | None:
        """The feedback bearer token (``feedback_token`` first, else the content of ``feedback_token_file``)."""
        return read_secret(self.feedback_token, self.feedback_token_file)

    def feedback_credentials(self) -> dict[str, str]:
        """Label source → its bearer token: ``feedback_token`` (or its file) as ``feedback_source``, and one per file
        of ``feedback_tokens_dir``. Empty when none is configured. Raises :class:`FeedbackCredentialsError` for a
        source named twice, two sources sharing a token, a bad file name or an empty token file."""
        credentials: dict[str, str] = {}
        single = self.feedback_secret()
        if single is not None:
            credentials[self.feedback_source] = single
        if self.feedback_tokens_dir is not None:
            for source, token in read_token_dir(self.feedback_tokens_dir).items():
                if source in credentials:
                    raise FeedbackCredentialsError(
                        f"label source {source!r} has a token in {self.feedback_tokens_dir} and is feedback_source"
                    )
                credentials[source] = token
        if len(set(credentials.values())) != len(credentials):
            raise FeedbackCredentialsError("two label sources share one token: each source needs its own")
        return credentials

    def sticky_secret(self) -> str | None:
        """The sticky-assignment key (``sticky_key`` first, else the content of ``sticky_key_file``), or None."""
        return read_secret(self.sticky_key, self.sticky_key_file)


class FeedbackCredentialsError(ValueError):
    """The label sources' tokens are inconsistent (the router refuses to start, naming the problem)."""


def read_token_dir(directory: Path) -> dict[str, str]:
    """Source → token from a directory of token files (a mounted Secret: one file per key). Hidden entries (the
    kubelet's ``..data`` links) are skipped; every other entry must be a file named like a source with a token."""
    tokens: dict[str, str] = {}
    if not directory.is_dir():
        raise FeedbackCredentialsError(f"feedback_tokens_dir {directory} is not a directory")
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        if re.fullmatch(SOURCE_NAME_PATTERN, entry.name) is None:
            raise FeedbackCredentialsError(
                f"{entry}: a label source's name is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or"
                " digit)"
            )
        token = entry.read_text(encoding="utf-8").strip()
        if not token:
            raise FeedbackCredentialsError(f"{entry}: the token of label source {entry.name!r} is empty")
        tokens[entry.name] = token
    return tokens


def read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    """A secret given inline (first) or as a mounted file (its stripped content); None when neither is set."""
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    if path is not None:
        return path.read_text(encoding="utf-8").strip() or None
    return None


class LocalBackendSettings(BaseModel):
    """The controller's local-process backend: model servers as ``bentoml serve`` children, routers reached through
    their admin endpoint, scrape targets in a Prometheus file-SD file (``FW_ROLLOUT_CONTROLLER__LOCAL__…``)."""

    #: Base URLs of the routers' control listeners the routing table is published to (``PUT /admin/routing``,
    #: bearer token from ``router.admin_token`` / ``router.admin_token_file``; the public port has no admin route).
    router_urls: tuple[str, ...] = ("http://127.0.0.1:8081",)
    #: Where fetched model bundles live (one directory per version); None → ``<state_dir>/models``.
    models_dir: Path | None = None
    #: The file-SD targets file of a local Prometheus (``PrometheusServer``'s ``targets.json``); None → not managed.
    prometheus_targets_file: Path | None = None
    #: Other ``host:port`` targets written into that file beside the model servers (routers, the controller).
    scrape_targets: tuple[str, ...] = ()
    #: Extra environment of each model server (e.g. ``FW_SERVE__WORKERS``).
    server_env: dict[str, str] = Field(default_factory=dict)
    #: Budget of one readiness probe (``/readyz``) and of one admin call to a router.
    probe_timeout_s: float = Field(0.5, gt=0.0)
    admin_timeout_s: float = Field(2.0, gt=0.0)
    #: A model server not ready this long after its start is stopped and started again.
    start_timeout_s: float = Field(180.0, gt=0.0)
    #: Not-ready servers are probed at most this often.
    probe_interval_s: float = Field(0.25, gt=0.0)
    #: A ready server's ``/readyz`` is probed this often; ``unhealthy_after`` failed probes in a row make it dead
    #: (stopped with its whole process tree and started again, counted as a restart).
    health_interval_s: float = Field(1.0, gt=0.0)
    unhealthy_after: int = Field(3, ge=1)
    #: A server that exited is started again no sooner than this after its last start.
    restart_backoff_s: float = Field(5.0, ge=0.0)
    #: A published table is read back from the routers at least this often (a restarted router gets it again).
    routing_resync_interval_s: float = Field(5.0, gt=0.0)
    #: Grace of a stopped adopted server (one this controller did not start) before SIGKILL.
    stop_timeout_s: float = Field(20.0, gt=0.0)


class KubeBackendSettings(BaseModel):
    """The controller's Kubernetes backend (``FW_ROLLOUT_CONTROLLER__KUBE__…``): the ModelRollout ``controller.name``
    in ``namespace`` is its desired state and its status the durable state; one Deployment + Service per model
    version from the chart's model-server templates; a Lease for leader election. The chart sets these
    (deploy/helm/fraudwatch/templates/_env.tpl)."""

    #: The namespace of the ModelRollout and of everything the controller creates.
    namespace: str = Field("default", min_length=1, max_length=63)
    #: A kubeconfig file; None → in-cluster configuration inside a pod, else ``$KUBECONFIG`` / ``~/.kube/config``.
    kubeconfig: Path | None = None
    context: str | None = None
    #: The chart's ConfigMap with the model servers' pod and Service templates.
    model_server_configmap: str = Field("fraudwatch-model-server", min_length=1, max_length=253)
    #: Leader election through a coordination.k8s.io Lease: only the holder reconciles.
    leader_election: bool = True
    lease_name: str = Field("fraudwatch-controller", min_length=1, max_length=253)
    #: A standby takes over once the holder has not renewed for this long …
    lease_duration_s: float = Field(15.0, gt=0.0)
    #: … the holder stops acting when it could not renew for this long (must be shorter) …
    renew_deadline_s: float = Field(10.0, gt=0.0)
    #: … and everybody retries (renews, or tries to acquire) this often.
    retry_period_s: float = Field(2.0, gt=0.0)
    #: This replica's name in the Lease (the pod's name); empty → ``<hostname>-<pid>``.
    identity: str = Field("", max_length=253)
    #: The field manager of the controller's writes (server-side apply of the workloads, status updates).
    field_manager: str = Field("fraudwatch-controller", min_length=1, max_length=128)
    #: The Kubernetes Events' ``source.component`` / ``reportingComponent``.
    event_component: str = Field("fraudwatch-controller", min_length=1, max_length=128)
    #: Server-side timeout of one watch request; each watch is then resumed from its last resourceVersion, and
    #: re-listed (a full resync of the cache) at least every ``resync_interval_s``.
    watch_timeout_s: int = Field(60, ge=1)
    resync_interval_s: float = Field(300.0, gt=0.0)
    #: Budget of one API request, and the wait after a failed watch before it is tried again.
    request_timeout_s: float = Field(10.0, gt=0.0)
    retry_backoff_s: float = Field(1.0, gt=0.0)
    #: Attempts of one status write that meets a newer resourceVersion (409 Conflict) before the reconcile fails.
    conflict_retries: int = Field(8, ge=1)
    #: The URL the routing table names for a version: ``{service}``, ``{namespace}`` and ``{port}`` are filled in
    #: (default: the Service's cluster DNS name) …
    service_url_template: str = "http://{service}.{namespace}.svc:{port}"
    #: … unless the version is listed here (version → base URL). The seam of the end-to-end tests, whose fake
    #: (kwok) pods run no process: the versions are served by real local ``bentoml serve`` processes.
    version_urls: dict[str, str] = Field(default_factory=dict)
    #: A version dropped from the routing table is scaled down only once every router replica confirms it holds a
    #: table without it: each serving endpoint of this Service (the routers' control Service, found through its
    #: EndpointSlices) is asked ``GET /admin/routing`` on the port named ``router_port_name``, with the router
    #: admin token (``FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE``). Empty → only the controller's own ``status.routing``
    #: is read (no replica confirms; the chart sets it).
    router_service: str = Field("", max_length=253)
    router_port_name: str = Field("feedback", min_length=1, max_length=63)
    #: Budget of one router's answer; a replica that does not answer holds the scale-down back (retried).
    router_timeout_s: float = Field(2.0, gt=0.0)
    #: … unless the router pod is listed here (pod name → base URL of its control listener): the seam of the
    #: end-to-end tests, whose fake (kwok) router pods run no process.
    router_urls: dict[str, str] = Field(default_factory=dict)
    #: Registry aliases, bundles (the quality stage) through the MLflow registry (``FW_MLFLOW_TRACKING_URI``);
    #: False → versions are only what the ModelRollout names and aliases are not moved.
    use_registry: bool = False
    #: Transitions kept in ``status.history`` (across rollouts; the CRD allows at most 100).
    kept_history: int = Field(50, ge=1, le=100)
    #: A controller that lost its Lease exits with this code (its pod restarts and becomes a standby).
    lost_leadership_exit_code: int = Field(3, ge=1, le=125)

    @model_validator(mode="after")
    def _deadline_inside_lease(self) -> KubeBackendSettings:
        if not self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("leader election needs retry_period_s < renew_deadline_s < lease_duration_s")
        return self


class PodmanBackendSettings(BaseModel):
    """The controller's podman backend (``FW_ROLLOUT_CONTROLLER__PODMAN__…``): the local backend's routing, registry
    and Prometheus file SD, with each model version in a container of the model-server image started through the
    libpod REST API, with the chart's security context and environment (rollout/backends/podman.py). Fetched
    bundles (``local.models_dir``) are bind-mounted read-only: that directory must have the same path for the
    controller and for podman (the controller in a container mounts it at its host path)."""

    #: The libpod API socket (``podman system service unix://…``). Access to it is root on that host: for a
    #: single-machine deployment or a test, never shared.
    socket: Path = Path("/run/podman/podman.sock")
    #: The model-server image (scripts/images.sh serve).
    image: str = Field("localhost/fraudwatch/refund-fraud-model:latest", min_length=1)
    #: The address the containers' ports are published on; the routers and Prometheus reach them there.
    host_ip: str = "127.0.0.1"
    #: The model server's port inside the container (the chart's modelServer.port).
    container_port: int = Field(3000, ge=1, le=65535)
    #: The chart's security context: modelServer.runAsUser / runAsGroup, read-only root, no capabilities.
    user: str = Field("1034:1034", pattern=r"^[1-9][0-9]*:[0-9]+$")
    #: The chart's writable emptyDirs: /tmp and the data dir (FW_HOME).
    scratch_dirs: tuple[str, ...] = ("/tmp", "/var/lib/fraudwatch")  # noqa: S108 - paths inside the container
    #: Where a version's bundle is mounted (``FW_SERVE__MODEL_DIR``): ``<models_mount>/<version>``.
    models_mount: str = "/models"
    #: The chart's model-server environment (``fraudwatch.env.modelServer``) besides what the controller sets per
    #: version (FW_SERVE__MODEL_DIR, FW_SERVE__MODEL_VERSION).
    env: dict[str, str] = Field(default_factory=dict)
    #: Open-file and process limits of each container (runc applies the rlimits it is given).
    nofile: int = Field(1024, ge=64)
    nproc: int = Field(1024, ge=64)
    #: Budget of one libpod API call (a container create or start takes a second or two on a busy machine).
    api_timeout_s: float = Field(60.0, gt=0.0)
    #: Prefix of the containers' names: ``<prefix>-<rollout>-<version>``.
    name_prefix: str = Field("fw", pattern=r"^[a-z0-9][a-z0-9-]*$")


#: A header's name (RFC 9110 token), and the headers that carry credentials: those come from the credential fields.
HEADER_NAME_PATTERN: Final[str] = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
CREDENTIAL_HEADERS: Final[frozenset[str]] = frozenset({"authorization", "proxy-authorization", "cookie"})


class SigV4Settings(BaseModel):
    """AWS Signature Version 4 on every query (``FW_ROLLOUT_CONTROLLER__PROVIDER__SIGV4__…``): Amazon Managed
    Service for Prometheus (``prometheus_url`` = ``https://aps-workspaces.<region>.amazonaws.com/workspaces/<id>``).

    The access key comes from files (a mounted Secret's keys), read at each request so a rotated key is used
    without a restart; without files, from the standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN`` variables, also read at each request. Web-identity roles (EKS IRSA, Pod Identity) are
    not exchanged for keys here: their keys must be given one of these ways."""

    #: The workspace's region, e.g. ``eu-west-1``.
    region: str = Field(..., pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    #: The signing name of the service: ``aps`` for Amazon Managed Prometheus.
    service: str = Field("aps", pattern=r"^[a-z0-9][a-z0-9-]*$")
    access_key_id_file: Path | None = None
    secret_access_key_file: Path | None = None
    #: Temporary credentials' session token (with the two above).
    session_token_file: Path | None = None

    @model_validator(mode="after")
    def _a_whole_key(self) -> SigV4Settings:
        if (self.access_key_id_file is None) != (self.secret_access_key_file is None):
            raise ValueError("provider.sigv4: set access_key_id_file and secret_access_key_file together")
        if self.session_token_file is not None and self.access_key_id_file is None:
            raise ValueError("provider.sigv4: session_token_file needs access_key_id_file and secret_access_key_file")
        return self


class MetricsProviderSettings(BaseModel):
    """How the controller's gates reach the metrics store at ``prometheus_url``
    (``FW_ROLLOUT_CONTROLLER__PROVIDER__…``): any Prometheus-compatible query API (Prometheus, Thanos Query,
    Grafana Mimir, Cortex, VictoriaMetrics) with the headers and the authentication it demands (Argo's
    ``prometheus.headers``, Flagger's provider ``secretRef``).

    Credentials are given as files (a mounted Secret; inline values for local runs) and read at each request, so a
    rotated token is used without a restart; they are never logged, and an error text that echoes one is redacted.
    SigV4 (Amazon Managed Prometheus) is built in (``sigv4``); Google's OAuth is not: run its signing proxy beside
    the controller and point ``prometheus_url`` at it."""

    #: Extra headers on every query, e.g. ``{"X-Scope-OrgID": "tenant-a"}`` (Mimir, Cortex and Thanos tenants).
    #: Not for credentials: ``Authorization``, ``Proxy-Authorization`` and ``Cookie`` are refused here.
    headers: dict[str, str] = Field(default_factory=dict)
    #: ``Authorization: Bearer <token>``: the token inline, or (better) a file holding it.
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    #: ``Authorization: Basic``: the user name, and the password inline or in a file.
    basic_auth_username: str | None = Field(None, min_length=1, pattern=r"^[^:\r\n]+$")
    basic_auth_password: SecretStr | None = None
    basic_auth_password_file: Path | None = None
    #: Every query signed with AWS SigV4 (Amazon Managed Prometheus); exclusive with bearer and basic auth.
    sigv4: SigV4Settings | None = None
    #: A CA bundle (PEM) that signs the provider's TLS certificate; None → the system's.
    ca_file: Path | None = None
    #: The path that answers 200 when the store can be queried (Prometheus, Thanos: ``/-/ready``; Mimir behind
    #: ``/prometheus``: ``/api/v1/status/buildinfo``).
    ready_path: str = Field("/-/ready", pattern=r"^/[^?#\s]*$")

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> MetricsProviderSettings:
        for name, value in self.headers.items():
            if re.fullmatch(HEADER_NAME_PATTERN, name) is None:
                raise ValueError(f"provider.headers: {name!r} is not a header name")
            if name.lower() in CREDENTIAL_HEADERS:
                raise ValueError(
                    f"provider.headers: {name} carries credentials; use bearer_token_file or basic_auth_* (read from a "
                    "Secret, never logged)"
                )
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"provider.headers: the value of {name} contains a line break or NUL")
        bearer = self.bearer_token is not None or self.bearer_token_file is not None
        password = self.basic_auth_password is not None or self.basic_auth_password_file is not None
        if (self.basic_auth_username is None) != (not password):
            raise ValueError("provider: basic auth needs basic_auth_username and a password (…_password[_file])")
        if bearer + password + (self.sigv4 is not None) > 1:
            raise ValueError("provider: bearer token, basic auth and sigv4 are exclusive; set one")
        return self

    @property
    def authenticated(self) -> bool:
        return (
            self.basic_auth_username is not None
            or (self.bearer_token, self.bearer_token_file) != (None, None)
            or self.sigv4 is not None
        )


class ControllerSettings(BaseModel):
    """The rollout controller (``FW_ROLLOUT_CONTROLLER__…``): its files, loop timings, metrics port, backend."""

    backend: Literal["local", "podman", "kube"] = "local"
    #: The rollout's name (``kubectl modelrollout status NAME``; a label of the controller's metrics).
    name: str = Field("fraudwatch", min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    #: The rollout policy (YAML); None → the packaged default policy.
    policy_file: Path | None = None
    #: State file, event log and command inbox; None → ``<home>/rollout``.
    state_dir: Path | None = None
    #: The metrics store's query API (the gates' provider); its headers and credentials: ``provider``. No user
    #: info in the URL (``http://user:pass@…``): a URL is logged, a credential goes in ``provider``.
    prometheus_url: str = Field("http://127.0.0.1:9090", pattern=r"^https?://[^@/\s]+(/\S*)?$")
    provider: MetricsProviderSettings = MetricsProviderSettings()
    #: The frozen labelled regression set of the ``quality`` stage (JSON meta file with ``file`` and ``sha256``).
    quality_set: Path | None = None
    host: str = "127.0.0.1"
    metrics_port: int = Field(9091, ge=0, le=65535)
    #: The loop looks at its command inbox this often (a revert waits at most this long to be seen) …
    tick_interval_s: float = Field(0.05, gt=0.0, le=5.0)
    #: … and reconciles workloads and routing at least this often.
    reconcile_interval_s: float = Field(0.5, gt=0.0)
    #: The controller's liveness record (``controller.json``) is rewritten this often; ``rolloutctl status``
    #: warns when it is older than ``stale_after_s``.
    heartbeat_interval_s: float = Field(1.0, gt=0.0)
    stale_after_s: float = Field(10.0, gt=0.0)
    #: ``rolloutctl`` waits this long for the controller to apply a command (exit code 5 after it).
    command_wait_timeout_s: float = Field(10.0, gt=0.0)
    command_poll_interval_s: float = Field(0.02, gt=0.0)
    #: ``rolloutctl status --watch`` / ``get --watch`` read the rollout this often.
    watch_interval_s: float = Field(1.0, gt=0.0)
    #: The registry alias of a rollout's candidate while it runs (the serving alias is the policy's).
    challenger_alias: str = "challenger"
    #: Without a rollout the controller serves the serving alias' version; it looks the alias up this often.
    champion_refresh_s: float = Field(10.0, gt=0.0)
    #: Bounded memory of the state file: command results and finished rollouts kept.
    kept_command_results: int = Field(200, ge=1)
    kept_past_rollouts: int = Field(50, ge=1)
    #: Serving versions remembered for ``rolloutctl undo --to-revision N`` (status.state.revisions).
    kept_revisions: int = Field(10, ge=2)
    #: Back-off after a failed reconcile (the loop keeps going; errors are counted and logged).
    error_backoff_s: float = Field(1.0, ge=0.0)
    reconcile_duration_buckets_s: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    local: LocalBackendSettings = LocalBackendSettings()
    podman: PodmanBackendSettings = PodmanBackendSettings()
    kube: KubeBackendSettings = KubeBackendSettings()

    def resolved_state_dir(self, home: Path) -> Path:
        return self.state_dir if self.state_dir is not None else home / "rollout"


class RolloutSettings(BaseSettings):
    """The root of fraudwatch's rollout-side configuration (``FW_ROLLOUT_…``)."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_", env_nested_delimiter="__", extra="ignore")

    home: Path = Path("var")
    log_level: str = "INFO"
    router: RouterSettings = RouterSettings()
    controller: ControllerSettings = ControllerSettings()


@lru_cache(maxsize=1)
def get_rollout_settings() -> RolloutSettings:
    """The process-wide rollout settings, read once from the environment."""
    return RolloutSettings()


class PrometheusSettings(BaseSettings):
    """A local Prometheus process (tests, the local backend) and the query client."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_PROMETHEUS__", extra="ignore")

    binary: Path = Path("/usr/bin/prometheus")
    promtool: Path = Path("/usr/bin/promtool")
    rules_file: Path = Path("deploy/prometheus/rules.yml")
    listen_host: str = "127.0.0.1"
    scrape_interval_s: float = Field(15.0, gt=0.0)
    evaluation_interval_s: float = Field(15.0, gt=0.0)
    scrape_timeout_s: float = Field(5.0, gt=0.0)
    ready_timeout_s: float = Field(30.0, gt=0.0)
    stop_timeout_s: float = Field(10.0, gt=0.0)
    poll_interval_s: float = Field(0.1, gt=0.0)
    query_timeout_s: float = Field(5.0, gt=0.0)
    #: Retention of the local TSDB.
    retention: str = "1d"


@lru_cache(maxsize=1)
def get_prometheus_settings() -> PrometheusSettings:
    return PrometheusSettings()
