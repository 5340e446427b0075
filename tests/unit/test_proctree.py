"""service.common.processes with real processes: a child that forks a grandchild into a session of its own (what BentoML
does with its workers), then dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.common import processes as proctree

#: The child: starts a grandchild in its own session (setsid, like a BentoML worker), writes its pid, sleeps.
PARENT = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(120)
"""


def wait_until(predicate: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.02)
    return False


def start_family(tmp_path: Path, tag: str) -> tuple[subprocess.Popen[bytes], int]:
    pid_file = tmp_path / "grandchild.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(pid_file)], env=proctree.tagged_env(os.environ, tag), start_new_session=True
    )
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text() != "")
    return parent, int(pid_file.read_text())


def test_a_grandchild_in_its_own_session_is_stopped_after_its_parent_was_killed(tmp_path: Path) -> None:
    tag = proctree.new_tag()
    parent, grandchild = start_family(tmp_path, tag)
    try:
        assert proctree.process_tree(parent.pid, tag) == {parent.pid, grandchild}
        assert os.getpgid(grandchild) != parent.pid  # out of reach of killpg(parent)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert proctree.alive(grandchild)  # orphaned, still running: what a group signal used to leave
        assert proctree.descendants(parent.pid) == set()  # and no walk of the parent's children finds it
        signalled = proctree.stop_tree(parent.pid, tag, grace_s=5.0)
        assert grandchild in signalled
        assert wait_until(lambda: not proctree.alive(grandchild))
        assert proctree.tagged(tag) == set()
    finally:
        with_kill = [p for p in (parent.pid, grandchild) if proctree.alive(p)]
        for pid in with_kill:
            os.kill(pid, signal.SIGKILL)


def test_the_tree_is_walked_through_parent_links_without_a_tag(tmp_path: Path) -> None:
    parent, grandchild = start_family(tmp_path, proctree.new_tag())
    try:
        assert proctree.descendants(parent.pid) == {grandchild}
        proctree.stop_tree(parent.pid, "", grace_s=5.0, reap=parent.poll)
        assert parent.wait(timeout=5.0) == -signal.SIGTERM
        assert wait_until(lambda: not proctree.alive(grandchild))
    finally:
        for pid in (parent.pid, grandchild):
            if proctree.alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_ignored_means_sigkill_after_the_grace(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
        start_new_session=True,
    )
    time.sleep(0.3)  # let it install the handler
    started = time.monotonic()
    proctree.stop_tree(stubborn.pid, grace_s=0.5, reap=stubborn.poll)
    assert stubborn.wait(timeout=5.0) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 5.0


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: not proctree.alive(child.pid))  # exited, not reaped yet: a zombie
    assert child.poll() == 0
    assert not proctree.alive(child.pid)
    assert not proctree.alive(0)


def test_a_stopped_process_acts_on_sigterm_at_once_instead_of_being_killed_after_the_grace_period() -> None:
    """A SIGSTOPped process (a hung server frozen, a debugger's) holds its SIGTERM pending until continued: stop_tree
    continues it, so it ends by SIGTERM, not by the SIGKILL after ``grace_s``."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        proctree.stop_tree(child.pid, grace_s=30.0, reap=child.poll)
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
