"""Stop a process with every descendant it has, whatever sessions they opened — the one helper every child process
of the project is stopped with (model servers, routers, the demo's children, retrains, Prometheus).

Signalling a process group is not enough: BentoML starts each worker with ``setsid``, so a worker leaves its
arbiter's group, and once the arbiter dies it is reparented to init — out of reach of the group and of a walk of
the arbiter's children. Two handles are combined so nothing escapes:

* a **tag** in the environment (:data:`TAG_ENV`): every process the child starts inherits it (a worker that opens a
  session of its own keeps its environment), and a scan of ``/proc/*/environ`` finds them all, also after their
  parent died and also from a controller restarted since (the tag is recorded beside the pid);
* the **tree** of ``/proc`` parent links, walked recursively from the root: what is still attached is found even
  when it cleared its environment.

:func:`stop_tree` SIGTERMs all of them (then SIGCONTs them, so a stopped process acts on it at once), waits for
the grace period (rescanning: a process forked meanwhile is caught too), SIGKILLs what is left and returns once
none is alive. Zombies count as gone (they hold no port, no memory). Linux only (``/proc``); elsewhere only the
root's process group is signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final

#: The environment variable carrying a child's tree tag.
TAG_ENV: Final[str] = "FW_PROCESS_TREE"
PROC: Final[Path] = Path("/proc")
#: SIGKILL rounds after the grace period (a process forked between scan and signal is caught by the next round).
_KILL_ROUNDS: Final[int] = 20


def new_tag() -> str:
    """A fresh tag naming one child's process tree."""
    return uuid.uuid4().hex


def tagged_env(env: Mapping[str, str], tag: str) -> dict[str, str]:
    """``env`` with the tree tag set (give it to ``subprocess.Popen(env=…)``)."""
    return {**env, TAG_ENV: tag}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from ``/proc/<pid>/stat``, None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    if PROC.is_dir():
        stat = _stat(pid)
        return stat is not None and stat[0] not in ("Z", "X", "x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids() -> list[int]:
    try:
        return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]
    except OSError:
        return []


def carries_tag(pid: int, tag: str) -> bool:
    """True when the process' environment holds ``TAG_ENV=tag``."""
    if not tag:
        return False
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"{TAG_ENV}={tag}".encode() in environ.split(b"\0")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` in the parent links (children, grandchildren, …)."""
    children: dict[int, list[int]] = {}
    for candidate in _pids():
        stat = _stat(candidate)
        if stat is not None and stat[0] not in ("Z", "X", "x"):
            children.setdefault(stat[1], []).append(candidate)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tagged(tag: str) -> set[int]:
    """Every live process whose environment carries ``tag``."""
    if not tag:
        return set()
    me = os.getpid()
    return {pid for pid in _pids() if pid != me and carries_tag(pid, tag) and alive(pid)}


def process_tree(pid: int, tag: str = "") -> set[int]:
    """The live processes of one child: ``pid`` itself, its descendants and every process carrying ``tag``."""
    members = descendants(pid) | tagged(tag) if pid > 0 else tagged(tag)
    if alive(pid):
        members.add(pid)
    members.discard(os.getpid())
    return members


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal one process group (not this process's own): a short-lived child with no workers; stop others with
    :func:`stop_tree`."""
    if pgid <= 0 or pgid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _terminate(pgid: int, pids: Iterable[int]) -> None:
    """SIGTERM, then SIGCONT: a stopped process (SIGSTOP, a debugger's, a hung server frozen on purpose) only acts
    on its pending SIGTERM once continued — without this it would sit out the whole grace period."""
    signal_group(pgid, signal.SIGTERM)
    _signal(pids, signal.SIGTERM)
    signal_group(pgid, signal.SIGCONT)
    _signal(pids, signal.SIGCONT)


def stop_tree(
    pid: int,
    tag: str = "",
    *,
    grace_s: float,
    poll_s: float = 0.05,
    reap: Callable[[], object] | None = None,
) -> set[int]:
    """Stop ``pid``, its descendants and every process carrying ``tag``: SIGTERM (the group too), wait up to
    ``grace_s`` for all of them, then SIGKILL until none is left. ``reap`` (e.g. ``Popen.poll``) is called while
    waiting so a child of ours does not linger as a zombie. Returns every pid that was signalled."""
    members = process_tree(pid, tag)
    signalled = set(members)
    _terminate(pid, members)
    deadline = time.monotonic() + grace_s
    while members and time.monotonic() < deadline:
        time.sleep(poll_s)
        if reap is not None:
            reap()
        fresh = process_tree(pid, tag) - signalled  # forked meanwhile (e.g. a worker restarted by its arbiter)
        _terminate(0, fresh)
        signalled |= fresh
        members = {p for p in members | fresh if alive(p)}
    for _ in range(_KILL_ROUNDS):
        members = process_tree(pid, tag) | {p for p in signalled if alive(p) and (carries_tag(p, tag) or p == pid)}
        if reap is not None:
            reap()
        signal_group(pid, signal.SIGKILL)
        if not members:
            break
        signalled |= members
        _signal(members, signal.SIGKILL)
        time.sleep(poll_s)
    if reap is not None:
        reap()
    return signalled


def free_port(host: str) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
