"""Session fixtures of the end-to-end tests: one real Kubernetes control plane (see :mod:`tests.e2e.cluster`).

The binaries come from ``scripts/k8s-binaries.sh`` (run by ``scripts/bootstrap.sh``, so ``make test`` builds them
first). When they are missing the tests fail with the command to run; they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from tests.e2e.cluster import ClusterError, ClusterSettings, ControlPlane

CLUSTER_FIXTURE = "k8s_cluster"


@pytest.fixture(scope="session")
def k8s_settings() -> ClusterSettings:
    return ClusterSettings()


@pytest.fixture(scope="session")
def k8s_cluster(k8s_settings: ClusterSettings) -> Iterator[ControlPlane]:
    """A running control plane (etcd, apiserver, controller manager, scheduler, kwok, one fake node)."""
    cluster = ControlPlane(k8s_settings)
    failure: str | None = None
    try:
        cluster.start()
    except ClusterError as exc:
        failure = str(exc)
    if failure is not None:  # outside the except block: the report shows the reason once, without a traceback
        pytest.fail(f"the Kubernetes test control plane did not start: {failure}", pytrace=False)
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
