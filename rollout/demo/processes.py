"""The rollout demo's child processes: started in their own sessions, stopped with their whole process tree.

:class:`ChildProcess` runs one command with its output in a log file, in its own session (so a terminal's Ctrl-C reaches
only the demo, which then stops its children in order) and stops it with SIGTERM to its process tree
(:func:`service.common.processes.stop_tree`: the group, descendants and tagged processes — the controller's
model-server workers
open sessions of their own), SIGKILL after a grace. :func:`stop_recorded_workloads` stops the model servers the
controller recorded in its ``workloads.json`` that outlived it; :func:`signals_ignored` shields a shutdown from a second
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rollout.backends.local.workloads import WORKLOADS_FILE
from service.common.logging import get_logger, log_event
from service.common.processes import alive, new_tag, stop_tree, tagged, tagged_env

logger = get_logger("rollout.demo")


@dataclass
class ChildProcess:
    """One child in its own session (a terminal's Ctrl-C reaches only the demo, which stops its children in
    order), output to a log file; stopped with SIGTERM to its process tree, SIGKILL after ``stop_timeout_s``."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str]
    stop_timeout_s: float
    cwd: Path | None = None
    tag: str = field(default_factory=new_tag, init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            list(self.argv), env=tagged_env(self.env, self.tag), cwd=self.cwd, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        pid = self._process.pid
        log_event(logger, f"{self.name} started", event="demo_child_started", child=self.name, child_pid=pid)

    def stop(self) -> int | None:
        process, self._process = self._process, None
        code = None
        if process is not None:
            stop_tree(process.pid, self.tag, grace_s=self.stop_timeout_s, reap=process.poll)
            code = process.wait()
            log_event(logger, f"{self.name} stopped", event="demo_child_stopped", child=self.name, returncode=code)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


def stop_recorded_workloads(state_dir: Path, grace_s: float, poll_s: float = 0.1) -> list[int]:
    """Stop every model server the controller recorded that is still alive (its own shutdown normally did)."""
    stopped = []
    for pid, tag in recorded_workloads(state_dir):
        if (pid > 0 and alive(pid)) or (tag and tagged(tag)):
            stop_tree(pid, tag, grace_s=grace_s, poll_s=poll_s)
            stopped.append(pid)
    return stopped


def recorded_workloads(state_dir: Path) -> list[tuple[int, str]]:
    """(pid, process-tree tag) of every model server in the controller's ``workloads.json``."""
    try:
        records = json.loads((state_dir / WORKLOADS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    if not isinstance(records, list):
        return []
    return [(int(r["pid"]), str(r.get("tag", ""))) for r in records if isinstance(r, dict) and "pid" in r]


def recorded_workload_pids(state_dir: Path) -> list[int]:
    return [pid for pid, _tag in recorded_workloads(state_dir)]


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while children are being stopped (a second Ctrl-C must not leave orphans; each
    stop is bounded by its timeout)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
