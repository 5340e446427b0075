"""Durable marks of the prediction log: what a killed router answered for and never wrote is counted at the next start.

The prediction log buffers rows in memory and writes them every flush interval, so a SIGKILL (OOM kill, a grace
period exceeded) loses the rows of the last interval and the batch being written. They cannot be recovered from
memory, but they can be counted: each log owns a *mark* in ``OutcomeSettings.mark_dir``, a 40-byte file mapped
into memory (``MAP_SHARED``) holding

    magic (8 bytes) · recorded (u64) · settled (u64) · pid (u64) · started_at (f64, Unix seconds)

``recorded`` is bumped for every row the log accepts (a store into the mapping: its page belongs to the kernel's
page cache, so it outlives the process however it dies, at the cost of a few hundred nanoseconds on the request
path and no system call); ``settled`` for every row that left memory for good — written (right after its
transaction committed) or dropped with a counted reason (rejected, failed, lost). An exclusive ``flock`` on the
file says its owner lives: the kernel releases it when the process ends, however it ends.

When a log starts it claims every mark in the directory it can lock (its owner is gone): ``recorded - settled``
rows were answered for and never written; the log counts them as ``fraudwatch_prediction_log_dropped_total{reason=
"killed"}``, logs them and removes the mark. A clean close settles every row and removes its own mark.

Exact for a process kill. What it cannot see: a machine crash (the page cache goes with it), a mark directory that
does not outlive the process (on Kubernetes the chart's ``emptyDir`` survives container restarts, not a replaced
pod), and a kill in the microseconds between a batch's commit and its ``settled`` update (that batch is then counted
as killed though written: an over-count of at most one batch).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

MAGIC: Final[bytes] = b"FWPLMK01"
SUFFIX: Final[str] = ".mark"
_STAGING: Final[str] = ".tmp"
_LAYOUT: Final[struct.Struct] = struct.Struct("<8sQQQd")
_RECORDED: Final[int] = 8
_SETTLED: Final[int] = 16
_COUNTER: Final[struct.Struct] = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class OrphanMark:
    """The mark of a log whose process is gone."""

    path: Path
    recorded: int
    settled: int
    pid: int
    started_at: float

    @property
    def lost(self) -> int:
        """Rows the process accepted and never wrote nor counted as dropped."""
        return max(self.recorded - self.settled, 0)


class RunMark:
    """The mark of this process' prediction log: create with :meth:`create`, bump, :meth:`close` at a clean end."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self._recorded = 0
        self._settled = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, directory: Path) -> Self:
        """A new locked mark in ``directory``: written and locked under a temporary name, then renamed into view, so
        no other log can claim it before it is owned."""
        directory.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        staging = directory / f".{name}{_STAGING}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, _LAYOUT.size)
            mapping = mmap.mmap(fd, _LAYOUT.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _LAYOUT.pack_into(mapping, 0, MAGIC, 0, 0, os.getpid(), time.time())
            path = directory / f"{name}{SUFFIX}"
            staging.rename(path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            raise
        return cls(path, fd, mapping)

    @property
    def recorded(self) -> int:
        return self._recorded

    @property
    def settled(self) -> int:
        return self._settled

    def record(self) -> None:
        """One row accepted (the event loop's thread only: the request path)."""
        self._recorded += 1
        _COUNTER.pack_into(self._map, _RECORDED, self._recorded)

    def settle(self, rows: int) -> None:
        """``rows`` left memory for good: written, or dropped with a counted reason (any thread)."""
        if rows <= 0:
            return
        with self._lock:
            self._settled += rows
            _COUNTER.pack_into(self._map, _SETTLED, self._settled)

    def close(self, *, remove: bool) -> None:
        """Release the mark; ``remove`` it when every row is settled (a later start then has nothing to count)."""
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._map.close()
        os.close(self._fd)


def _read(fd: int, path: Path) -> OrphanMark | None:
    data = os.pread(fd, _LAYOUT.size, 0)
    if len(data) != _LAYOUT.size:
        return None
    magic, recorded, settled, pid, started_at = _LAYOUT.unpack(data)
    if magic != MAGIC:
        return None
    return OrphanMark(path, recorded, settled, pid, started_at)


def _remove_if_unowned(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    except BlockingIOError:
        return  # being created right now
    finally:
        os.close(fd)


def claim_orphans(directory: Path) -> list[OrphanMark]:
    """Every mark in ``directory`` whose owner is gone, removed from it (each claimed by exactly one log: a mark is
    read under its lock and unlinked before the lock is released). Unreadable marks are removed and not counted."""
    if not directory.is_dir():
        return []
    for staging in directory.glob(f".*{_STAGING}"):  # a log killed while creating its mark: nothing recorded yet
        _remove_if_unowned(staging)
    claimed: list[OrphanMark] = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # claimed by another log meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner lives
            if os.fstat(fd).st_nlink == 0:
                continue  # claimed and removed by another log while we waited for the lock
            mark = _read(fd, path)
            path.unlink()
            if mark is not None:
                claimed.append(mark)
        finally:
            os.close(fd)
    return claimed
