"""A real ``bentoml serve`` child process on loopback: start, wait until ready, stop — reusable by the demo, the
CLI and the rollout's local-process backend.

The server runs in its own session (process group), so a Ctrl-C in the terminal reaches only the parent, which then
stops the server's whole process tree in order (SIGTERM, a grace period, SIGKILL) with
:func:`service.common.processes.stop_tree`: BentoML's workers open sessions of their own, so the group alone would
leave them
running; the tree tag in the server's environment finds them even after their arbiter died. Its output goes to a log
file (a pipe nobody reads would eventually block it); the log's tail is quoted when the server fails to start.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

import httpx

import service
from service.common.logging import get_logger, log_event
from service.common.processes import free_port, new_tag, process_tree, stop_tree, tagged_env
from service.settings import Settings

logger = get_logger(__name__)

#: The service reads its model directory from this variable (``ServeSettings.model_dir``).
MODEL_DIR_ENV: Final[str] = "FW_SERVE__MODEL_DIR"
MODEL_DIGEST_ENV: Final[str] = "FW_SERVE__MODEL_DIGEST"
READY_PATH: Final[str] = "/readyz"
LIVE_PATH: Final[str] = "/livez"
#: The directory holding the ``service`` package: ``bentoml serve --working-dir``.
SOURCE_ROOT: Final[Path] = Path(service.__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The server exited or did not become ready before its deadline."""


def serve_command(target: str, host: str, port: int) -> list[str]:
    """``bentoml serve`` through this interpreter, so the child uses the same environment."""
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        target,
        "--host",
        host,
        "--port",
        str(port),
        "--working-dir",
        str(SOURCE_ROOT),
    ]


def server_env(
    model_dir: Path | None,
    settings: Settings,
    extra: Mapping[str, str] | None = None,
    model_digest: str | None = None,
) -> dict[str, str]:
    """The child's environment: ours, plus the model directory (None: the service resolves its model from the
    registry settings in ``extra``, see service/artifacts/source.py) and the digest it must have (``model_digest``:
    the workers refuse a bundle that does not match it), a BentoML home under ``settings.home`` and no usage
    tracking (the machine may have no internet)."""
    env = dict(os.environ)
    env.update(
        {
            "BENTOML_HOME": str((settings.home / "bentoml").resolve()),
            "BENTOML_DO_NOT_TRACK": "True",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if model_dir is not None:
        env[MODEL_DIR_ENV] = str(model_dir.resolve())
    else:
        env.pop(MODEL_DIR_ENV, None)
    if model_digest is not None:
        env[MODEL_DIGEST_ENV] = model_digest
    else:
        env.pop(MODEL_DIGEST_ENV, None)
    env.update(extra or {})
    return env


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@dataclass
class BentoServer:
    """One ``bentoml serve`` process for one model directory.

    Use as a context manager (start, wait until ready, always stop) or call :meth:`start`, :meth:`wait_ready`
    and :meth:`stop` yourself. ``port=None`` picks a free port.
    """

    #: The bundle directory; None → the model comes from the registry (``FW_SERVE__MODEL_URI`` / ``…_ALIAS`` in
    #: ``extra_env``).
    model_dir: Path | None
    settings: Settings
    port: int | None = None
    #: The digest over every file ``model_dir`` must have (``FW_SERVE__MODEL_DIGEST``); None → not checked.
    model_digest: str | None = None
    name: str = "bento"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: The tag of the server's process tree (:mod:`service.common.processes`), set by :meth:`start`.
    tag: str = field(default="", init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_handle: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def host(self) -> str:
        return self.settings.process.host

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port until it is started")
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.settings.logs_dir / f"{self.name}-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        """True while the server's main process runs (its endpoint may still be dead: probe ``/readyz``)."""
        return self._process is not None and self._process.poll() is None

    def tree(self) -> set[int]:
        """The live processes of the server: its main process, its workers and whatever they started."""
        if self._process is None:
            return set()
        return process_tree(self._process.pid, self.tag)

    def start(self) -> None:
        """Launch the server (returns at once; see :meth:`wait_ready`)."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} already started (pid {self._process.pid})")
        if self.port is None:
            self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = self.log_path.open("ab")
        command = serve_command(self.settings.process.bento_target, self.host, self.port)
        self.tag = new_tag()
        self._process = subprocess.Popen(
            command,
            cwd=SOURCE_ROOT,
            env=tagged_env(server_env(self.model_dir, self.settings, self.extra_env, self.model_digest), self.tag),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_event(
            logger,
            "server starting",
            server=self.name,
            server_pid=self._process.pid,
            url=self.url,
            log=str(self.log_path),
        )

    def wait_ready(self, deadline: float | None = None) -> float:
        """Poll ``/readyz`` until it answers 200; return the seconds waited. ``deadline`` is a
        ``time.monotonic()`` instant (default: now + ``process.start_timeout_s``). Raises
        :class:`ServerStartError` if the process exits or the deadline passes."""
        started = time.monotonic()
        limit = deadline if deadline is not None else started + self.settings.process.start_timeout_s
        with httpx.Client(timeout=self.settings.process.http_timeout_s) as client:
            while True:
                self._raise_if_exited()
                if self._ready(client):
                    waited = time.monotonic() - started
                    log_event(logger, "server ready", server=self.name, url=self.url, waited_s=waited)
                    return waited
                if time.monotonic() >= limit:
                    raise ServerStartError(self._failure(f"not ready after {time.monotonic() - started:.1f} s"))
                time.sleep(self.settings.process.poll_interval_s)

    def _ready(self, client: httpx.Client) -> bool:
        """True once ``/readyz`` answers 200; raises if ``/livez`` says the service is dead (e.g. its model
        failed to load), since waiting longer would not help."""
        try:
            if client.get(self.url + READY_PATH).status_code == httpx.codes.OK:
                return True
            live = client.get(self.url + LIVE_PATH)
        except httpx.TransportError:
            return False
        if live.status_code == httpx.codes.SERVICE_UNAVAILABLE:
            raise ServerStartError(self._failure(f"reports not alive: {live.text.strip()}"))
        return False

    def _raise_if_exited(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise ServerStartError(self._failure(f"exited with code {self._process.returncode}"))

    def _failure(self, what: str) -> str:
        log_tail = tail(self.log_path, self.settings.process.log_tail_lines)
        return f"{self.name} at {self.url} {what}; log {self.log_path}:\n{log_tail}"

    def stop(self) -> int | None:
        """Stop the server's process tree (SIGTERM, then SIGKILL after ``process.stop_timeout_s``); return its main
        process' exit code. Safe to call more than once."""
        process, self._process = self._process, None
        code: int | None = None
        if process is not None:
            code = _terminate_tree(process, self.tag, self.settings.process.stop_timeout_s)
            log_event(logger, "server stopped", server=self.name, server_pid=process.pid, exit_code=code)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _terminate_tree(process: subprocess.Popen[bytes], tag: str, grace_s: float) -> int:
    """SIGTERM the child's whole tree (group, descendants, tagged processes), wait, then SIGKILL what is left."""
    started = time.monotonic()
    stop_tree(process.pid, tag, grace_s=grace_s, reap=process.poll)
    if time.monotonic() - started > grace_s:
        log_event(
            logger, "server ignored SIGTERM, killed", level=logging.WARNING, server_pid=process.pid, grace_s=grace_s
        )
    return process.wait()
