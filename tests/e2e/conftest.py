"""Session fixtures of the end-to-end tests: one real Kubernetes control plane (see :mod:`tests.kits.cluster`).

The binaries come from ``scripts/k8s-binaries.sh`` (run by ``scripts/bootstrap.sh``, so ``make test`` builds them
first). When they are missing the tests fail with the command to run; they are never skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.dynamic import DynamicClient

from tests.kits.chart import CRD_FILE
from tests.kits.cluster import ClusterError, ClusterSettings, ControlPlane, locate_binaries
from tests.kits.release import CRD_NAME, wait_established

CLUSTER_FIXTURE = "k8s_cluster"
E2E_MARKER = "e2e"
#: Seconds from the start to each milestone of the session's control plane, printed in the terminal summary.
STARTUP_TIMINGS = pytest.StashKey[dict[str, float]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``FW_E2E_BUILD=true``, build missing binaries once e2e tests are selected - before any test runs, so the
    build is not charged to a test's timeout (a cold build takes far longer than pytest-timeout allows)."""
    settings = ClusterSettings()
    selected = any(item.get_closest_marker(E2E_MARKER) for item in items)
    if not settings.build or not selected or config.option.collectonly:
        return
    try:
        locate_binaries(settings)
    except ClusterError as exc:
        raise pytest.UsageError(f"building the Kubernetes test binaries failed: {exc}") from exc


@pytest.fixture(scope="session")
def k8s_settings() -> ClusterSettings:
    return ClusterSettings()


@pytest.fixture(scope="session")
def k8s_cluster(k8s_settings: ClusterSettings, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A running control plane (etcd, apiserver, controller manager, scheduler, kwok, one fake node)."""
    cluster = ControlPlane(k8s_settings)
    failure: str | None = None
    try:
        cluster.start()
    except ClusterError as exc:
        failure = str(exc)
    if failure is not None:  # outside the except block: the report shows the reason once, without a traceback
        pytest.fail(f"the Kubernetes test control plane did not start: {failure}", pytrace=False)
    request.config.stash[STARTUP_TIMINGS] = dict(cluster.timings)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def k8s_client(k8s_cluster: ControlPlane) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` authenticated as the admin, from the cluster's kubeconfig."""
    client = kubernetes.config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failed end-to-end test, append the tail of every component's log to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    cluster = getattr(item, "funcargs", {}).get(CLUSTER_FIXTURE)
    if isinstance(cluster, ControlPlane):
        cluster.mark_failed()
        report.sections.append(("Kubernetes control plane logs", cluster.log_tails()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """One line with the control plane's startup milestones (seconds since the start), when one was started."""
    timings = config.stash.get(STARTUP_TIMINGS, None)
    if timings:
        milestones = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        terminalreporter.write_line(f"Kubernetes control plane startup: {milestones}")


# ------------------------------------------------------------- the chart's CRD and a namespace (tests/kits/release.py)


@pytest.fixture(scope="module")
def dynamic(k8s_client: Any, tmp_path_factory: pytest.TempPathFactory) -> DynamicClient:
    cache = tmp_path_factory.mktemp("discovery") / "discovery.json"
    return DynamicClient(k8s_client, cache_file=str(cache))


@pytest.fixture(scope="module")
def crd(k8s_cluster: ControlPlane, k8s_client: Any, dynamic: DynamicClient) -> Mapping[str, Any]:
    """The chart's CRD, applied server-side (what `kubectl apply --server-side -f crds/` does) and Established."""
    document = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    resource = dynamic.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    resource.server_side_apply(body=document, name=CRD_NAME, field_manager="fraudwatch-e2e", force_conflicts=True)
    wait_established(k8s_cluster, k8s_client, CRD_NAME)
    dynamic.resources.invalidate_cache()
    assert isinstance(document, dict)
    return document


@pytest.fixture
def namespace(k8s_client: Any) -> Iterator[str]:
    name = f"fw-chart-{uuid.uuid4().hex[:8]}"
    core = k8s.CoreV1Api(k8s_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)
