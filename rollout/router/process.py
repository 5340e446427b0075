"""The router as a child process on loopback (``python -m rollout.router``): start, wait until live, stop.

Used by the integration tests, the router benchmark and local runs. The child leads its own session; ``stop`` sends
SIGTERM to its whole process tree (:func:`service.common.processes.stop_tree`; the router then finishes in-flight
requests,
drains shadow work and flushes the prediction log) and SIGKILL only after ``process_stop_timeout_s``. Output goes to a
log file, never to an unread pipe.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

import httpx

from rollout.settings import RouterSettings
from service.common.processes import free_port, new_tag, stop_tree, tagged_env

LIVE_PATH: Final[str] = "/livez"
_ENV_PREFIX: Final[str] = "FW_ROLLOUT_ROUTER__"


class RouterStartError(RuntimeError):
    """The router exited or did not answer ``/livez`` before its deadline."""


@dataclass
class RouterProcess:
    """One ``python -m rollout.router`` child; ``env`` adds or overrides environment variables."""

    log_path: Path
    settings: RouterSettings = field(default_factory=RouterSettings)
    routing_file: Path | None = None
    admin_token: str | None = None
    #: The label feed's bearer token on the control listener (generated per process unless given).
    feedback_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    #: The secret key of sticky assignment (generated per process unless given; see RouterSettings.sticky_key).
    sticky_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    #: ``FW_ROLLOUT_ROUTER__EXPOSE_DECISION_DETAILS`` of the child: on for the demo, tests and benchmarks, which read
    #: the deciding version and score from each answer; None leaves the router's default (off: the contract only).
    expose_decision_details: bool | None = True
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None
    control_port: int | None = None
    #: The tag of the router's process tree (service.common.processes).
    tag: str = field(default_factory=new_tag, init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the router has no port until it is started")
        return f"http://{self.settings.host}:{self.port}"

    @property
    def control_url(self) -> str:
        """The control listener (``POST /api/v1/feedback[/batch]`` with :attr:`feedback_token`)."""
        if self.control_port is None:
            raise RuntimeError("the router has no control port until it is started")
        return f"http://{self.settings.host}:{self.control_port}"

    def feedback_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.feedback_token}"}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def child_env(self) -> dict[str, str]:
        env = {
            **os.environ,
            f"{_ENV_PREFIX}HOST": self.settings.host,
            f"{_ENV_PREFIX}PORT": str(self.port),
            f"{_ENV_PREFIX}CONTROL_PORT": str(self.control_port),
            f"{_ENV_PREFIX}FEEDBACK_TOKEN": self.feedback_token,
            f"{_ENV_PREFIX}STICKY_KEY": self.sticky_key,
        }
        if self.expose_decision_details is not None:
            env[f"{_ENV_PREFIX}EXPOSE_DECISION_DETAILS"] = str(self.expose_decision_details).lower()
        if self.routing_file is not None:
            env[f"{_ENV_PREFIX}ROUTING_FILE"] = str(self.routing_file)
        if self.admin_token is not None:
            env[f"{_ENV_PREFIX}ADMIN_TOKEN"] = self.admin_token
        env.update(self.env)
        return env

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"router already started (pid {self._process.pid})")
        if self.port is None:
            self.port = free_port(self.settings.host)
        if self.control_port is None:
            self.control_port = free_port(self.settings.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rollout.router"],
            env=tagged_env(self.child_env(), self.tag),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_live(self) -> float:
        """Poll ``/livez`` until it answers 200; return the seconds waited."""
        started = time.monotonic()
        deadline = started + self.settings.process_start_timeout_s
        with httpx.Client(timeout=self.settings.process_poll_interval_s * 20, trust_env=False) as client:
            while True:
                if self._process is not None and self._process.poll() is not None:
                    raise RouterStartError(f"router exited with {self._process.returncode}; log {self.log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.url + LIVE_PATH).status_code == httpx.codes.OK:
                        return time.monotonic() - started
                if time.monotonic() > deadline:
                    raise RouterStartError(f"router not live after {time.monotonic() - started:.1f} s")
                time.sleep(self.settings.process_poll_interval_s)

    def stop(self) -> int | None:
        """SIGTERM the router's process tree, wait, SIGKILL what is left; return the exit code."""
        process, self._process = self._process, None
        code: int | None = None
        if process is not None:
            stop_tree(process.pid, self.tag, grace_s=self.settings.process_stop_timeout_s, reap=process.poll)
            code = process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_live()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
