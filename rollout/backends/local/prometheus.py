"""A local Prometheus process (the demo's, the tests', the local backend's scrape targets).

:class:`PrometheusServer` starts ``/usr/bin/prometheus`` (Debian's package) with a generated configuration: one
scrape job whose targets come from a file-SD JSON file (so :meth:`PrometheusServer.set_targets` changes them
without a restart — the local backend rewrites them as model servers come and go), the rule files, optionally the
Alertmanagers to send firing alerts to, its own TSDB directory, and ``--web.listen-address`` on loopback. It waits
for ``/-/ready`` and stops with SIGTERM (SIGKILL after a timeout).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import yaml

from rollout.backends.prometheus import PrometheusClient, PrometheusUnavailableError
from rollout.settings import PrometheusSettings, get_prometheus_settings
from service.common.files import write_atomically
from service.common.processes import free_port

logger = logging.getLogger(__name__)

_LOG_TAIL_CHARS: Final[int] = 3000

JOB_NAME: Final[str] = "fraudwatch"


CONFIG_FILE: Final[str] = "prometheus.yml"


TARGETS_FILE: Final[str] = "targets.json"


LOG_FILE: Final[str] = "prometheus.log"


DATA_DIR: Final[str] = "data"


@dataclass(frozen=True)
class ScrapeTarget:
    """One ``host:port`` to scrape, with extra target labels (e.g. ``{"component": "router"}``)."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """Seconds as a Prometheus duration (milliseconds resolution): 1.0 → ``1000ms``."""
    return f"{max(1, round(seconds * 1000))}ms"


def render_config(
    settings: PrometheusSettings,
    targets_file: Path,
    rule_files: Sequence[Path],
    alertmanagers: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``prometheus.yml`` document: global intervals, rule files, one file-SD scrape job, and the Alertmanagers
    (``host:port``) firing alerts are sent to, if any."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": duration(settings.scrape_interval_s),
            "scrape_timeout": duration(min(settings.scrape_timeout_s, settings.scrape_interval_s)),
            "evaluation_interval": duration(settings.evaluation_interval_s),
        },
        "rule_files": [str(path.resolve()) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB_NAME,
                "file_sd_configs": [
                    {"files": [str(targets_file.resolve())], "refresh_interval": duration(settings.scrape_interval_s)}
                ],
            }
        ],
    }
    if alertmanagers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]}
    return config


def render_targets(targets: Sequence[ScrapeTarget]) -> list[dict[str, Any]]:
    """The file-SD document: one target group per target."""
    return [{"targets": [t.address], "labels": dict(t.labels)} for t in targets]


class PrometheusServer:
    """A Prometheus child process with a generated configuration under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[ScrapeTarget] = (),
        *,
        rule_files: Sequence[Path] | None = None,
        settings: PrometheusSettings | None = None,
        port: int | None = None,
        alertmanagers: Sequence[str] = (),
    ) -> None:
        self._settings = settings or get_prometheus_settings()
        self._alertmanagers = tuple(alertmanagers)
        self._workdir = workdir
        self._targets = list(targets)
        self._rule_files = list(rule_files) if rule_files is not None else [self._settings.rules_file]
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise PrometheusUnavailableError("Prometheus has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._settings.listen_host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._workdir / LOG_FILE

    def client(self) -> PrometheusClient:
        return PrometheusClient(self.url, settings=self._settings)

    def set_targets(self, targets: Sequence[ScrapeTarget]) -> None:
        """Replace the scrape targets (file SD: picked up without a restart)."""
        self._targets = list(targets)
        self._workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(self._workdir / TARGETS_FILE, json.dumps(render_targets(self._targets), indent=2))

    def start(self) -> None:
        """Write the configuration, start the process and wait until ``/-/ready`` answers 200."""
        binary = self._settings.binary
        if not binary.exists():
            raise PrometheusUnavailableError(f"{binary} not found: install Debian's prometheus package")
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.set_targets(self._targets)
        config = render_config(self._settings, self._workdir / TARGETS_FILE, self._rule_files, self._alertmanagers)
        (self._workdir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if self._port is None:
            self._port = free_port(self._settings.listen_host)
        argv = [
            str(binary),
            f"--config.file={self._workdir / CONFIG_FILE}",
            f"--storage.tsdb.path={self._workdir / DATA_DIR}",
            f"--storage.tsdb.retention.time={self._settings.retention}",
            f"--web.listen-address={self._settings.listen_host}:{self._port}",
            "--web.enable-lifecycle",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        logger.info("prometheus starting", extra={"event": "prometheus_start", "url": self.url, "pid": self.pid})
        self._wait_ready()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._settings.ready_timeout_s
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    raise PrometheusUnavailableError(
                        f"prometheus exited with {self._process.returncode}: {self._log_tail()}"
                    )
                if client.is_online():
                    return
                time.sleep(self._settings.poll_interval_s)
        finally:
            client.close()
        self.stop()
        raise PrometheusUnavailableError(
            f"prometheus not ready after {self._settings.ready_timeout_s}s: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "<no log>"

    def reload(self) -> None:
        """Re-read the configuration and rule files (SIGHUP)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``; idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self._settings.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self._settings.stop_timeout_s)
        logger.info("prometheus stopped", extra={"event": "prometheus_stop", "returncode": process.returncode})

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
