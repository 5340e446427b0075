"""A real Kubernetes control plane for end-to-end tests, on 127.0.0.1, from binaries built out of Go modules.

``scripts/k8s-binaries.sh`` builds (once, cached outside the repository) etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl, helm and kwok. :class:`ControlPlane` then:

1. generates a PKI with ``cryptography`` (a CA; serving certificates for the apiserver, the controller manager and
   the scheduler; client certificates for the admin (``O=system:masters``), the controller manager and the
   scheduler; an RSA key pair for service-account tokens);
2. starts etcd, kube-apiserver (``--authorization-mode=Node,RBAC``), kube-controller-manager and kube-scheduler
   (``--leader-elect=false``, bound to 127.0.0.1) and kwok (fake kubelets for nodes annotated
   ``kwok.x-k8s.io/node: fake``), each in its own process group, on free ports, logging to files in a temporary
   directory;
3. waits for ``/readyz`` and the components' ``/healthz``, writes an admin kubeconfig and registers one fake Node;
4. on exit stops every process group (SIGTERM, then SIGKILL) and deletes the directory.

Nothing is skipped: missing binaries or a component that does not come up raise :class:`ClusterError` with the
reason and the tail of each component's log. Every knob (timeouts, CIDRs, node size, paths) is a field of
:class:`ClusterSettings` (environment prefix ``FW_E2E_``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.common.logging import get_logger, log_event

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGGER = get_logger("e2e.cluster")

#: The binaries a complete set holds (``scripts/k8s-binaries.sh`` prints the directory).
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "helm")
#: kwok's Stage definitions (copied from its module by the build script), applied in this order.
KWOK_STAGES = ("node-initialize", "node-heartbeat", "pod-ready", "pod-complete", "pod-delete")
#: The annotation kwok is told to manage; nodes without it are left alone.
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_VALUE = "fake"
BLOCKING_TAINT_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
ADMIN_USER = "fraudwatch-e2e-admin"
ADMIN_GROUP = "system:masters"
KCM_USER = "system:kube-controller-manager"
SCHEDULER_USER = "system:kube-scheduler"
FRONT_PROXY_USER = "front-proxy-client"
TLS_CURVES: dict[str, type[ec.EllipticCurve]] = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}
BUILD_HINT = (
    "build them with `scripts/k8s-binaries.sh` (scripts/bootstrap.sh runs it; a cold build takes tens of minutes "
    "on 2 cores, see docs/kubernetes-testing.md) or set FW_E2E_BUILD=true to let the test session build them"
)


class ClusterSettings(BaseSettings):
    """Where the binaries come from, the network layout and every timeout of the test control plane."""

    model_config = SettingsConfigDict(env_prefix="FW_E2E_", extra="ignore")

    host: str = "127.0.0.1"
    #: The build script; it prints the directory of the binaries. ``bin_dir`` bypasses it.
    binaries_script: Path = REPO_ROOT / "scripts" / "k8s-binaries.sh"
    bin_dir: Path | None = None
    #: The release series the tests expect (and ask the build script for): the newest cached patch is used.
    kubernetes_series: str = Field("1.36", pattern=r"^1\.\d+$")
    helm_series: str = Field("3.21", pattern=r"^3\.\d+$")
    #: False: only look for cached binaries (``--check``) and fail with a hint; True: build what is missing.
    build: bool = False
    build_timeout_s: float = Field(5400.0, gt=0.0)
    check_timeout_s: float = Field(60.0, gt=0.0)
    #: Parent of the per-session temporary directory (None: the system's temp dir).
    work_root: Path | None = None
    #: Keep the temporary directory (PKI, data, logs) after the session, for debugging.
    keep_dir: bool = False
    #: Keep it when a test using the cluster failed (or the cluster did not start), so the full logs stay readable.
    keep_dir_on_failure: bool = True

    service_cidr: str = "10.96.0.0/16"
    #: kwok hands out pod IPs from this range; it must not overlap ``service_cidr``.
    pod_cidr: str = "10.244.0.0/16"
    cluster_domain: str = "cluster.local"
    node_name: str = "fw-kwok-node-0"
    node_cpu: str = "32"
    node_memory: str = "256Gi"
    node_pods: int = Field(110, ge=1)
    #: The controller manager marks a node NotReady after this long without a heartbeat. kwok's node-heartbeat
    #: stage posts one every 20-45 s; upstream's 50 s default leaves little slack on a loaded 2-core machine.
    node_monitor_grace_period_s: int = Field(120, ge=1)

    tls_key_curve: Literal["secp256r1", "secp384r1"] = "secp256r1"
    service_account_key_bits: int = Field(2048, ge=2048)
    cert_validity_days: int = Field(2, ge=1)

    start_timeout_s: float = Field(180.0, gt=0.0)
    poll_interval_s: float = Field(0.2, gt=0.0)
    http_timeout_s: float = Field(5.0, gt=0.0)
    stop_timeout_s: float = Field(15.0, gt=0.0)
    #: Budget for Kubernetes state to converge in tests (pods scheduled and ready, garbage collected, …).
    converge_timeout_s: float = Field(120.0, gt=0.0)
    #: Budget for a helm or kubectl command.
    tool_timeout_s: float = Field(300.0, gt=0.0)
    log_tail_lines: int = Field(40, ge=1)
    #: Extra klog verbosity for the Kubernetes components (0: upstream's default).
    component_verbosity: int = Field(0, ge=0, le=10)


class ClusterError(RuntimeError):
    """The control plane is unavailable; the message says why (and quotes the components' logs)."""


# --- binaries -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    """A complete set of binaries and the versions they were built from (``versions.json``)."""

    bin_dir: Path
    versions: Mapping[str, str]

    def path(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def kwok_stages(self) -> tuple[Path, ...]:
        return tuple(self.bin_dir / "kwok-stages" / f"{stage}.yaml" for stage in KWOK_STAGES)


def locate_binaries(settings: ClusterSettings) -> Binaries:
    """The binaries of ``settings.bin_dir``, else of the build script (``--check`` unless ``settings.build``)."""
    bin_dir = settings.bin_dir if settings.bin_dir is not None else _run_build_script(settings)
    return _verified_binaries(bin_dir)


def _run_build_script(settings: ClusterSettings) -> Path:
    argv = [str(settings.binaries_script)] if settings.build else [str(settings.binaries_script), "--check"]
    timeout = settings.build_timeout_s if settings.build else settings.check_timeout_s
    env = {**os.environ, "FW_K8S_SERIES": settings.kubernetes_series, "FW_HELM_SERIES": settings.helm_series}
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{' '.join(argv)} did not complete: {exc}; {BUILD_HINT}") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ClusterError(
            f"the Kubernetes test binaries are missing ({' '.join(argv)} exited {result.returncode}: "
            f"{_last_lines(result.stderr, settings.log_tail_lines)}); {BUILD_HINT}"
        )
    return Path(lines[-1])


def _verified_binaries(bin_dir: Path) -> Binaries:
    missing = [name for name in REQUIRED_BINARIES if not os.access(bin_dir / name, os.X_OK)]
    versions_file = bin_dir / "versions.json"
    if missing or not versions_file.is_file():
        raise ClusterError(f"incomplete binaries in {bin_dir} (missing {missing or ['versions.json']}); {BUILD_HINT}")
    versions = json.loads(versions_file.read_text(encoding="utf-8"))
    binaries = Binaries(bin_dir=bin_dir, versions={str(k): str(v) for k, v in versions.items()})
    absent_stages = [str(stage) for stage in binaries.kwok_stages if not stage.is_file()]
    if absent_stages:
        raise ClusterError(f"kwok stage definitions missing: {absent_stages}; {BUILD_HINT}")
    return binaries


# --- PKI --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    scheduler: CertPair
    #: Serving certificates of the controller manager and the scheduler (so their /healthz is verified too).
    controller_manager_serving: CertPair
    scheduler_serving: CertPair
    #: The aggregation layer's request-header CA and the apiserver's client certificate for aggregated APIs.
    #: (Without them the controller manager and the scheduler log a missing requestheader CA bundle forever.)
    front_proxy_ca: CertPair
    front_proxy_client: CertPair
    service_account_key: Path
    service_account_pub: Path


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _tls_key(settings: ClusterSettings) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(TLS_CURVES[settings.tls_key_curve]())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: _Issuer | None,
    signing_key: ec.EllipticCurvePrivateKey,
    validity: dt.timedelta,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_extensions(
    usage: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName]
) -> list[tuple[x509.ExtensionType, bool]]:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(cert_sign=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]
    if sans:
        extensions.append((x509.SubjectAlternativeName(list(sans)), False))
    return extensions


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertPair:
    pair = CertPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


def _issue_leaf(
    directory: Path,
    stem: str,
    issuer: _Issuer,
    settings: ClusterSettings,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
) -> CertPair:
    key = _tls_key(settings)
    validity = dt.timedelta(days=settings.cert_validity_days)
    extensions = _leaf_extensions(usage, sans)
    cert = _certificate(subject, key.public_key(), issuer, issuer.key, validity, extensions)
    return _write_pair(directory, stem, cert, key)


def kubernetes_service_ip(service_cidr: str) -> str:
    """The ClusterIP of the ``kubernetes`` Service: the first address of the service range."""
    return str(next(ipaddress.ip_network(service_cidr).hosts()))


def apiserver_sans(settings: ClusterSettings) -> list[x509.GeneralName]:
    """What clients call the apiserver: loopback, ``localhost`` and the in-cluster Service names and IP."""
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    dns.append(f"kubernetes.default.svc.{settings.cluster_domain}")
    ips = {settings.host, kubernetes_service_ip(settings.service_cidr)}
    return [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]


def _new_ca(directory: Path, stem: str, common_name: str, settings: ClusterSettings) -> tuple[CertPair, _Issuer]:
    """A self-signed CA written to ``directory`` and the issuer that signs with it."""
    key = _tls_key(settings)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (_key_usage(cert_sign=True), True),
    ]
    validity = dt.timedelta(days=settings.cert_validity_days)
    cert = _certificate(_name(common_name), key.public_key(), None, key, validity, extensions)
    return _write_pair(directory, stem, cert, key), _Issuer(cert=cert, key=key)


def _service_account_keys(directory: Path, settings: ClusterSettings) -> tuple[Path, Path]:
    """The RSA key pair that signs (private) and verifies (public) service-account tokens."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=settings.service_account_key_bits)
    private, public = directory / "sa.key", directory / "sa.pub"
    _write_key(private, key)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def write_pki(directory: Path, settings: ClusterSettings) -> Pki:
    """Create every key and certificate of the control plane in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, issuer = _new_ca(directory, "ca", "fraudwatch-e2e-ca", settings)
    front_proxy_ca, front_proxy_issuer = _new_ca(directory, "front-proxy-ca", "fraudwatch-e2e-front-proxy-ca", settings)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    loopback = [x509.IPAddress(ipaddress.ip_address(settings.host)), x509.DNSName("localhost")]

    def leaf(
        stem: str, subject: x509.Name, usage: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName] = ()
    ) -> CertPair:
        return _issue_leaf(directory, stem, issuer, settings, subject, usage, sans)

    sa_private, sa_public = _service_account_keys(directory, settings)
    return Pki(
        ca=ca,
        apiserver=leaf("apiserver", _name("kube-apiserver"), server, apiserver_sans(settings)),
        admin=leaf("admin", _name(ADMIN_USER, ADMIN_GROUP), client),
        controller_manager=leaf("controller-manager", _name(KCM_USER), client),
        scheduler=leaf("scheduler", _name(SCHEDULER_USER), client),
        controller_manager_serving=leaf(
            "controller-manager-serving", _name("kube-controller-manager"), server, loopback
        ),
        scheduler_serving=leaf("scheduler-serving", _name("kube-scheduler"), server, loopback),
        front_proxy_ca=front_proxy_ca,
        front_proxy_client=_issue_leaf(
            directory, "front-proxy-client", front_proxy_issuer, settings, _name(FRONT_PROXY_USER), client
        ),
        service_account_key=sa_private,
        service_account_pub=sa_public,
    )


def kubeconfig_document(server: str, ca: Path, client: CertPair, user: str) -> dict[str, Any]:
    """A kubeconfig with one cluster, one user (client certificate, by path) and one current context."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fraudwatch-e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "fraudwatch-e2e", "context": {"cluster": "fraudwatch-e2e", "user": user}}],
        "current-context": "fraudwatch-e2e",
        "preferences": {},
    }


def write_kubeconfig(path: Path, server: str, ca: Path, client: CertPair, user: str) -> Path:
    path.write_text(yaml.safe_dump(kubeconfig_document(server, ca, client, user), sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    return path


# --- processes ----------------------------------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Component:
    """One running binary: its own process group, its output in ``log``."""

    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes]

    def exited(self) -> int | None:
        return self.process.poll()


def start_component(name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str]) -> Component:
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
            start_new_session=True,
        )  # fmt: skip
    log_event(LOGGER, "component started", component=name, pid=process.pid, log=str(log))
    return Component(name=name, argv=list(argv), log=log, process=process)


def stop_component(component: Component, timeout_s: float) -> None:
    """SIGTERM the component's process group, SIGKILL it after ``timeout_s``."""
    if component.exited() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(component.process.pid, signal.SIGTERM)
    try:
        component.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(component.process.pid, signal.SIGKILL)
        component.process.wait(timeout=timeout_s)


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


def tail(path: Path, count: int) -> str:
    if not path.is_file():
        return "(no log)"
    return _last_lines(path.read_text(encoding="utf-8", errors="replace"), count)


# --- readiness ----------------------------------------------------------------------------------------------------


def https_client(ca: Path, client: CertPair, timeout_s: float) -> httpx.Client:
    """An HTTPS client that verifies the server against ``ca`` and presents ``client``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    return httpx.Client(verify=context, timeout=timeout_s)


def probe(client: httpx.Client, url: str) -> bool:
    """True when ``url`` answers 200 (connection errors and other statuses are 'not yet')."""
    try:
        return client.get(url).status_code == httpx.codes.OK
    except httpx.HTTPError:
        return False


@dataclass
class ControlPlane:
    """Start with ``with ControlPlane(settings) as cluster:``; see the module docstring."""

    settings: ClusterSettings
    binaries: Binaries | None = None
    workdir: Path = field(init=False)
    components: list[Component] = field(default_factory=list, init=False)
    #: Seconds from the start of :meth:`start` to each milestone (PKI written, etcd healthy, … node ready).
    timings: dict[str, float] = field(default_factory=dict, init=False)
    pki: Pki = field(init=False)
    server: str = field(init=False)
    kubeconfig: Path = field(init=False)
    _api: httpx.Client | None = field(default=None, init=False)
    _failed: bool = field(default=False, init=False)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- public API -------------------------------------------------------------------------------------------

    @property
    def versions(self) -> Mapping[str, str]:
        return self._binaries.versions

    @property
    def bin_dir(self) -> Path:
        return self._binaries.bin_dir

    @property
    def api(self) -> httpx.Client:
        """An HTTPS client of the apiserver, authenticated as the admin (``system:masters``)."""
        if self._api is None:
            raise ClusterError("the control plane is not running")
        return self._api

    @property
    def env(self) -> dict[str, str]:
        """Environment for helm, kubectl and other clients: the admin kubeconfig, the binaries first on PATH and
        HOME/XDG/helm directories inside the session directory (no stray user configuration)."""
        home = self.workdir / "home"
        return {
            **self._base_env(),
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(home / ".cache" / "helm"),
            "HELM_CONFIG_HOME": str(home / ".config" / "helm"),
            "HELM_DATA_HOME": str(home / ".local" / "share" / "helm"),
        }

    def run_tool(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``helm``/``kubectl``/… from the binaries directory against this cluster."""
        argv = [str(self._binaries.path(tool)), *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, timeout=self.settings.tool_timeout_s, check=False
        )
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def mark_failed(self) -> None:
        """Something using the cluster failed: keep the directory (logs, PKI, etcd data) when it stops."""
        self._failed = True

    def log_tails(self) -> str:
        """The last lines of every component's log (for failure reports)."""
        count = self.settings.log_tail_lines
        kept = "" if not self.settings.keep_dir_on_failure else f"full logs (kept): {self.workdir / 'logs'}\n"
        return kept + "\n\n".join(f"--- {c.name} ---\n{tail(c.log, count)}" for c in self.components)

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float | None = None) -> float:
        """Poll ``check`` until it is true; seconds waited. Fails early when a component exits."""
        budget = self.settings.converge_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + budget
        while not check():
            dead = [f"{c.name} (exit {c.exited()})" for c in self.components if c.exited() is not None]
            if dead:
                raise ClusterError(f"waiting for {what}: {', '.join(dead)} stopped\n{self.log_tails()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {budget:.0f}s waiting for {what}\n{self.log_tails()}")
            time.sleep(self.settings.poll_interval_s)
        return time.monotonic() - start

    # --- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        if self.binaries is None:
            self.binaries = locate_binaries(self.settings)
        self._mark("binaries", started)
        root = str(self.settings.work_root) if self.settings.work_root is not None else None
        self.workdir = Path(tempfile.mkdtemp(prefix="fw-k8s-", dir=root))
        try:
            self._start(started)
        except BaseException:
            self.mark_failed()
            self.stop()
            raise

    def _start(self, started: float) -> None:
        settings = self.settings
        self.pki = write_pki(self.workdir / "pki", settings)
        (self.workdir / "logs").mkdir()
        self._mark("pki", started)

        etcd_url = self._start_etcd()
        self.wait_for("etcd /health", lambda: self._etcd_healthy(etcd_url), settings.start_timeout_s)
        self._mark("etcd_healthy", started)

        apiserver_port = free_port(settings.host)
        self.server = f"https://{settings.host}:{apiserver_port}"
        self._start_apiserver(etcd_url, apiserver_port)
        self._api = https_client(self.pki.ca.cert, self.pki.admin, settings.http_timeout_s)
        self.wait_for(
            "kube-apiserver /readyz", lambda: probe(self.api, f"{self.server}/readyz"), settings.start_timeout_s
        )
        self._mark("apiserver_ready", started)
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig", self.server, self.pki.ca.cert, self.pki.admin, ADMIN_USER
        )

        health = [self._start_controller_manager(), self._start_scheduler(), self._start_kwok()]
        for name, url, client in health:
            self.wait_for(f"{name} {url}", functools.partial(probe, client, url), settings.start_timeout_s)
            client.close()
        self._mark("components_healthy", started)

        self._create_fake_node()
        self.wait_for(f"node {settings.node_name} Ready and untainted", self.node_schedulable, settings.start_timeout_s)
        self._mark("node_schedulable", started)
        log_event(LOGGER, "control plane ready", workdir=str(self.workdir), server=self.server, timings=self.timings)

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
        for component in reversed(self.components):
            stop_component(component, self.settings.stop_timeout_s)
        if self.settings.keep_dir or (self._failed and self.settings.keep_dir_on_failure):
            log_event(LOGGER, "control plane stopped; directory kept", workdir=str(self.workdir))
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- components -------------------------------------------------------------------------------------------

    @property
    def _binaries(self) -> Binaries:
        if self.binaries is None:
            raise ClusterError("binaries not located yet")
        return self.binaries

    def _mark(self, milestone: str, started: float) -> None:
        self.timings[milestone] = round(time.monotonic() - started, 3)

    def _base_env(self) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        inherited = {k: v for k, v in os.environ.items() if k in {"PATH", "LANG", "LC_ALL", "TZ", "TMPDIR"}}
        path = f"{self._binaries.bin_dir}{os.pathsep}{inherited.get('PATH', os.defpath)}"
        return {**inherited, "PATH": path, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}

    def _launch(self, name: str, args: Sequence[str]) -> Component:
        component = start_component(
            name, [str(self._binaries.path(name)), *args], self.workdir / "logs", self._base_env()
        )
        self.components.append(component)
        return component

    def _klog(self) -> list[str]:
        return [f"--v={self.settings.component_verbosity}"]

    def _start_etcd(self) -> str:
        host = self.settings.host
        client_url = f"http://{host}:{free_port(host)}"
        peer_url = f"http://{host}:{free_port(host)}"
        self._launch(
            "etcd",
            [
                "--name=fw-e2e",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=fw-e2e={peer_url}",
                "--initial-cluster-state=new",
                # Test data lives for one session: skip fsync (etcd documents this flag for exactly that).
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        return client_url

    def _etcd_healthy(self, client_url: str) -> bool:
        try:
            response = httpx.get(f"{client_url}/health", timeout=self.settings.http_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == httpx.codes.OK and response.json().get("health") == "true"

    def _start_apiserver(self, etcd_url: str, port: int) -> None:
        settings, pki = self.settings, self.pki
        self._launch(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                f"--bind-address={settings.host}",
                f"--advertise-address={settings.host}",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.apiserver.cert}",
                f"--tls-private-key-file={pki.apiserver.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--service-account-issuer=https://kubernetes.default.svc.{settings.cluster_domain}",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={settings.service_cidr}",
                "--authorization-mode=Node,RBAC",
                # As hardened clusters (OpenShift) run it: an owner reference with blockOwnerDeletion needs `update` on
                # the owner's finalizers, so the controller's Role is tested with that check on.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
                f"--requestheader-allowed-names={FRONT_PROXY_USER}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
                f"--proxy-client-key-file={pki.front_proxy_client.key}",
                # The only address is loopback, which an Endpoints object may not hold: do not publish one.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                *self._klog(),
            ],
        )

    def _component_kubeconfig(self, stem: str, client: CertPair, user: str) -> Path:
        return write_kubeconfig(self.workdir / f"{stem}.kubeconfig", self.server, self.pki.ca.cert, client, user)

    def _start_controller_manager(self) -> tuple[str, str, httpx.Client]:
        settings, pki = self.settings, self.pki
        kubeconfig = self._component_kubeconfig("controller-manager", pki.controller_manager, KCM_USER)
        port = free_port(settings.host)
        self._launch(
            "kube-controller-manager",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={settings.host}",
                f"--secure-port={port}",
                f"--tls-cert-file={pki.controller_manager_serving.cert}",
                f"--tls-private-key-file={pki.controller_manager_serving.key}",
                "--leader-elect=false",
                f"--root-ca-file={pki.ca.cert}",
                f"--service-account-private-key-file={pki.service_account_key}",
                "--use-service-account-credentials=true",
                f"--node-monitor-grace-period={settings.node_monitor_grace_period_s}s",
                f"--service-cluster-ip-range={settings.service_cidr}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                *self._klog(),
            ],
        )
        client = https_client(pki.ca.cert, pki.admin, settings.http_timeout_s)
        return "kube-controller-manager", f"https://{settings.host}:{port}/healthz", client

    def _start_scheduler(self) -> tuple[str, str, httpx.Client]:
        settings, pki = self.settings, self.pki
        kubeconfig = self._component_kubeconfig("scheduler", pki.scheduler, SCHEDULER_USER)
        port = free_port(settings.host)
        self._launch(
            "kube-scheduler",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={settings.host}",
                f"--secure-port={port}",
                f"--tls-cert-file={pki.scheduler_serving.cert}",
                f"--tls-private-key-file={pki.scheduler_serving.key}",
                "--leader-elect=false",
                *self._klog(),
            ],
        )
        client = https_client(pki.ca.cert, pki.admin, settings.http_timeout_s)
        return "kube-scheduler", f"https://{settings.host}:{port}/healthz", client

    def _start_kwok(self) -> tuple[str, str, httpx.Client]:
        settings = self.settings
        port = free_port(settings.host)
        configs = [f"--config={stage}" for stage in self._binaries.kwok_stages]
        self._launch(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                *configs,
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}={FAKE_NODE_VALUE}",
                f"--cidr={settings.pod_cidr}",
                f"--node-ip={settings.host}",
                f"--server-address={settings.host}:{port}",
            ],
        )
        return "kwok", f"http://{settings.host}:{port}/healthz", httpx.Client(timeout=settings.http_timeout_s)

    # --- the fake node ----------------------------------------------------------------------------------------

    def _create_fake_node(self) -> None:
        settings = self.settings
        resources = {"cpu": settings.node_cpu, "memory": settings.node_memory, "pods": str(settings.node_pods)}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": settings.node_name,
                "annotations": {FAKE_NODE_ANNOTATION: FAKE_NODE_VALUE},
                "labels": {
                    "kubernetes.io/hostname": settings.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
            },
            "status": {"capacity": resources, "allocatable": resources},
        }
        response = self.api.post(f"{self.server}/api/v1/nodes", json=node)
        if response.status_code != httpx.codes.CREATED:
            raise ClusterError(f"creating node {settings.node_name}: {response.status_code} {response.text}")

    def _node(self) -> dict[str, Any] | None:
        response = self.api.get(f"{self.server}/api/v1/nodes/{self.settings.node_name}")
        return response.json() if response.status_code == httpx.codes.OK else None

    def node_ready(self) -> bool:
        """The fake node's Ready condition is True (kwok's node-initialize and node-heartbeat stages)."""
        node = self._node()
        return node is not None and _is_ready(node)

    def node_schedulable(self) -> bool:
        """Ready and without a NoSchedule/NoExecute taint: the node lifecycle controller taints a new node
        ``node.kubernetes.io/not-ready`` until it has seen it Ready, and removes the taint shortly after."""
        node = self._node()
        if node is None or not _is_ready(node) or node.get("spec", {}).get("unschedulable"):
            return False
        return not [t for t in node.get("spec", {}).get("taints", []) if t.get("effect") in BLOCKING_TAINT_EFFECTS]


def _is_ready(node: Mapping[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


@contextlib.contextmanager
def running_control_plane(settings: ClusterSettings | None = None) -> Iterator[ControlPlane]:
    """Start a control plane, yield it, stop it (also on errors)."""
    with ControlPlane(settings or ClusterSettings()) as cluster:
        yield cluster
