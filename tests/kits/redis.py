"""A real ``redis-server`` (Debian's package, installed by scripts/bootstrap.sh's test profile) on loopback for
tests: no persistence, its own directory, an optional password, stopped at the end."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.common.processes import free_port

START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    password: str | None
    process: subprocess.Popen[bytes]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server is not installed: run scripts/bootstrap.sh test")
    return found


@contextlib.contextmanager
def redis_server(directory: Path, password: str | None = None) -> Iterator[RedisServer]:
    """``redis-server`` on 127.0.0.1 (a free port), ready when this yields."""
    port = free_port("127.0.0.1")
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(directory), "--protected-mode", "yes",
    ]  # fmt: skip
    if password is not None:
        command += ["--requirepass", password]
    with (directory / "redis.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield RedisServer(f"redis://127.0.0.1:{port}/0", port, password, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
