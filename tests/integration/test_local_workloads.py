"""rollout.backends.local.workloads.LocalWorkloads against real ``bentoml serve`` processes: a server whose main
process is
killed is detected as dead, its orphaned workers are stopped (nothing left on its port) and the restart counted; a
bundle changed on disk after the registry check is refused by the real scoring service's workers.

The model registry is a directory double (``DirSource``; ``CheckedSource`` for the real service): the first servers
are the minimal test service (tests/integration/bento_fixture.py), which loads no bundle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from rollout.backends.local.workloads import LocalWorkloads
from rollout.core.workloads import Readiness, WorkloadStatus
from rollout.settings import LocalBackendSettings
from service.artifacts.bundle import MANIFEST_FILE, bundle_digest
from service.common import processes as proctree
from service.data.feature_store import STORE_FILE, TABLE
from service.serving.process import BentoServer
from service.settings import Settings
from tests.sockets import connection_refused

pytestmark = pytest.mark.integration

TIMEOUT_S = 120.0


class DirSource:
    """Versions are empty directories (the test service needs no bundle); aliases are not used here."""

    def resolve(self, ref: str) -> str:
        return ref

    def alias_target(self, alias: str) -> str | None:
        return None

    def fetch(self, version: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        return dest

    def bundle_digest(self, version: str) -> str | None:
        return None

    def ensure_alias(self, alias: str, version: str, reason: str) -> bool:
        return False

    def clear_alias(self, alias: str, version: str, reason: str) -> bool:
        return False


def until(workloads: LocalWorkloads, version: str, wanted: Readiness, restarts: int = 0) -> list[WorkloadStatus]:
    seen = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        status = workloads.ensure_running(version)
        seen.append(status)
        if status.readiness is wanted and status.restarts >= restarts:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"{version} never {wanted}: {seen[-3:]}")


def workloads_with_a_ready_server(tmp_path: Path, **settings: float) -> tuple[LocalWorkloads, BentoServer]:
    """A LocalWorkloads (fast probes, restarts and stops, plus ``settings``) whose v1 server is ready."""
    serve = Settings.model_validate(
        {"home": tmp_path, "process": {"bento_target": "tests.integration.bento_fixture:EchoService"}}
    )
    fast = {"restart_backoff_s": 0.0, "probe_interval_s": 0.1, "health_interval_s": 0.2, "stop_timeout_s": 5.0}
    workloads = LocalWorkloads(LocalBackendSettings.model_validate({**fast, **settings}), serve, DirSource(),
                               tmp_path / "state")  # fmt: skip
    try:
        until(workloads, "v1", Readiness.READY)
    except BaseException:
        workloads.close(stop_servers=True)
        raise
    server = workloads._workloads["v1"].server
    assert server is not None and server.pid is not None
    return workloads, server


def test_a_killed_server_is_dead_its_workers_are_stopped_and_the_restart_is_counted(tmp_path: Path) -> None:
    workloads, server = workloads_with_a_ready_server(tmp_path)
    assert server.pid is not None
    try:
        old_url, tag = workloads._workloads["v1"].url, server.tag
        workers = server.tree() - {server.pid}
        assert workers
        os.kill(server.pid, signal.SIGKILL)  # the worker keeps the port and answers: only the pid is dead
        seen = until(workloads, "v1", Readiness.READY, restarts=1)
        assert any(s.readiness is not Readiness.READY for s in seen)  # never reported ready while it was dead
        assert seen[-1].restarts == 1 and workloads.restarts("v1") == 1
        assert seen[-1].url != old_url
        deadline = time.monotonic() + 10.0
        while proctree.tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proctree.tagged(tag) == set()  # the orphaned workers are gone …
        assert not any(proctree.alive(w) for w in workers)
        assert connection_refused(old_url)  # … and nothing listens on the old port
    finally:
        workloads.close(stop_servers=True)
    assert all(proctree.tagged(w.record.tag) == set() for w in workloads._workloads.values())


class CheckedSource(DirSource):
    """A registry double over one trusted bundle: ``fetch`` copies it (what the registry check verified), then
    ``change_after_check`` writes one file of the copy — the write of someone who can reach the models directory
    between the controller's check and the workers' load. That window cannot be hit on demand with real processes,
    so the double makes the write (the one fake of this test); the digest is the trusted bundle's, as the registry
    records it."""

    def __init__(self, trusted: Path, change_after_check: str | None) -> None:
        self.trusted = trusted
        self.change_after_check = change_after_check

    def fetch(self, version: str, dest: Path) -> Path:
        shutil.copytree(self.trusted, dest)
        if self.change_after_check == MANIFEST_FILE:  # approve everything
            manifest = json.loads((dest / MANIFEST_FILE).read_text(encoding="utf-8"))
            manifest["threshold"]["threshold"] = 1.0
            (dest / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
        elif self.change_after_check == STORE_FILE:  # make every account look long-standing and clean
            with contextlib.closing(sqlite3.connect(dest / STORE_FILE)) as conn, conn:
                conn.execute(f"UPDATE {TABLE} SET prior_refunds = 0")
        return dest

    def bundle_digest(self, version: str) -> str | None:
        return bundle_digest(self.trusted)


def probe(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("changed", [MANIFEST_FILE, STORE_FILE, None])
def test_a_bundle_changed_after_the_registry_check_is_refused_by_the_model_server(
    bundle_dir: Path, tmp_path: Path, changed: str | None
) -> None:
    """Issue 11: the local backend started ``bentoml serve`` on the fetched directory without the registry's digest,
    so a threshold or feature store rewritten after the fetch was served. The workers now get the digest
    (FW_SERVE__MODEL_DIGEST) and refuse such a bundle before parsing it: dead (/livez 503), never ready; the
    unchanged bundle is served."""
    serve = Settings.model_validate({"home": tmp_path / "home"})  # the real service.serving.bento:RefundFraudService
    settings = LocalBackendSettings(server_env={"FW_SERVE__WORKERS": "1"}, start_timeout_s=TIMEOUT_S)
    workloads = LocalWorkloads(settings, serve, CheckedSource(bundle_dir, changed), tmp_path / "state")
    try:
        if changed is None:
            assert until(workloads, "v1", Readiness.READY)[-1].readiness is Readiness.READY
            return
        url = workloads.ensure_running("v1").url
        assert url is not None
        deadline = time.monotonic() + TIMEOUT_S
        while probe(url + "/livez") != httpx.codes.SERVICE_UNAVAILABLE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert probe(url + "/livez") == httpx.codes.SERVICE_UNAVAILABLE
        assert probe(url + "/readyz") == httpx.codes.SERVICE_UNAVAILABLE
        assert workloads.ensure_running("v1").readiness is not Readiness.READY
        server = workloads._workloads["v1"].server
        assert server is not None
        log = server.log_path.read_text(encoding="utf-8", errors="replace")
        assert "bundle digest" in log and "does not match" in log
    finally:
        workloads.close(stop_servers=True)


def test_a_server_whose_endpoint_hangs_while_its_pids_live_is_dead_restarted_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The endpoint-dead-but-pid-alive path: every process of the server is SIGSTOPped (a hung server: its pids
    exist, its port accepts nothing it answers). Detected by the readiness probes, its tree stopped (SIGCONT after
    SIGTERM, so stopped processes get the TERM at once), a new server started, the restart counted."""
    workloads, server = workloads_with_a_ready_server(tmp_path, probe_timeout_s=0.3, unhealthy_after=3)
    try:
        old_url, tag = workloads._workloads["v1"].url, server.tag
        frozen = server.tree()
        assert len(frozen) >= 2  # the server and its worker(s)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        assert all(proctree.alive(pid) for pid in frozen)  # the pids live: only the endpoint says it is dead
        seen = until(workloads, "v1", Readiness.READY, restarts=1)
        assert any(s.readiness is Readiness.FAILED and s.detail == "endpoint not ready" for s in seen)
        assert seen[-1].restarts == 1 and workloads.restarts("v1") == 1
        assert seen[-1].url != old_url
        deadline = time.monotonic() + 10.0
        while (proctree.tagged(tag) or any(proctree.alive(p) for p in frozen)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proctree.tagged(tag) == set() and not any(proctree.alive(p) for p in frozen)
        assert connection_refused(old_url)
        # it acted on SIGTERM (continued), instead of sitting out the grace period frozen until SIGKILL
        assert not [r for r in caplog.records if "ignored SIGTERM" in r.getMessage()]
    finally:
        workloads.close(stop_servers=True)
