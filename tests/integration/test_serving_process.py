"""``BentoServer`` against real ``bentoml serve`` processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.common.processes import free_port
from service.serving.process import BentoServer, ServerStartError
from service.settings import Settings

pytestmark = pytest.mark.integration

FIXTURE = "tests.integration.bento_fixture"


def settings_for(home: Path, target: str, start_timeout_s: float = 120.0) -> Settings:
    return Settings.model_validate(
        {"home": home, "process": {"bento_target": f"{FIXTURE}:{target}", "start_timeout_s": start_timeout_s}}
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/readyz", timeout=2.0)
    except httpx.ConnectError:
        return True
    return False


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_context_manager_serves_then_stops_the_whole_process_group(tmp_path: Path) -> None:
    model_dir = tmp_path / "bundle"
    model_dir.mkdir()
    server = BentoServer(model_dir=model_dir, settings=settings_for(tmp_path, "EchoService"))
    with server:
        pgid = server.pid
        assert pgid is not None
        response = httpx.post(server.url + "/model_dir", json={}, timeout=10.0)
        assert response.status_code == 200
        assert response.text == str(model_dir.resolve())
    assert not server.running()
    deadline = time.monotonic() + 10.0
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(pgid)
    assert refused(server.url)
    assert server.log_path.is_file()
    assert server.stop() is None  # idempotent


def test_never_ready_server_fails_at_its_deadline_and_is_stopped(tmp_path: Path) -> None:
    server = BentoServer(model_dir=tmp_path, settings=settings_for(tmp_path, "NeverReadyService"))
    server.start()
    try:
        with pytest.raises(ServerStartError, match="not ready after"):
            server.wait_ready(deadline=time.monotonic() + 20.0)
    finally:
        server.stop()
    assert not server.running()


def test_dead_server_fails_before_its_deadline(tmp_path: Path) -> None:
    server = BentoServer(model_dir=tmp_path, settings=settings_for(tmp_path, "DeadService"))
    server.start()
    try:
        with pytest.raises(ServerStartError, match="not alive"):
            server.wait_ready(deadline=time.monotonic() + 100.0)
    finally:
        server.stop()


def test_server_that_cannot_import_fails_fast_with_its_log(tmp_path: Path) -> None:
    server = BentoServer(model_dir=tmp_path, settings=settings_for(tmp_path, "NoSuchService"))
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code") as error:
        server.__enter__()
    assert time.monotonic() - started < 110.0
    assert "NoSuchService" in str(error.value)
    assert not server.running()


SCRIPT = """
import sys, time
from pathlib import Path
from service.serving.process import BentoServer
from tests.integration.test_serving_process import settings_for
home = Path(sys.argv[1])
with BentoServer(model_dir=home, settings=settings_for(home, "EchoService")) as server:
    print(server.pid, server.url, flush=True)
    time.sleep(600)
"""


def test_ctrl_c_in_the_parent_stops_the_server(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert parent.stdout is not None
        pid_text, url = parent.stdout.readline().split()
        assert httpx.get(url + "/readyz", timeout=5.0).status_code == 200
        parent.send_signal(signal.SIGINT)
        parent.wait(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert not group_alive(int(pid_text))
    assert refused(url)


def listening(url: str) -> bool:
    try:
        httpx.get(url + "/readyz", timeout=2.0)
    except httpx.TransportError:
        return False
    return True


def test_a_server_whose_main_process_was_killed_leaves_no_worker_behind_when_stopped(tmp_path: Path) -> None:
    """BentoML's workers open sessions of their own: after a SIGKILL of the server's main process a worker is
    orphaned and still answers on the port; stopping the server reaches it through the process-tree tag."""
    from service.common import processes as proctree

    server = BentoServer(model_dir=tmp_path, settings=settings_for(tmp_path, "EchoService"))
    with server:
        assert server.pid is not None
        workers = server.tree() - {server.pid}
        assert workers, "bentoml serve runs its service in worker processes"
        assert all(os.getsid(w) != server.pid for w in workers)  # their own sessions: a group signal misses them
        os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while server.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.running()
        assert any(proctree.alive(w) for w in workers)  # orphaned, not stopped by the arbiter's death
        assert listening(server.url)  # … and still answering on the version's port
    assert not any(proctree.alive(w) for w in workers)
    assert proctree.tagged(server.tag) == set()
    assert refused(server.url)
