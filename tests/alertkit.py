"""A real Alertmanager for tests (Debian's ``prometheus-alertmanager``), and test-time variants of the shipped
deploy/prometheus/rules.yml and deploy/alertmanager/alertmanager.yml.

The variants keep every expression, label, matcher, route and receiver of the shipped files; they only shorten
durations (an alert's ``for:``, the routes' ``group_wait``/``group_interval``/``repeat_interval``), point the
retraining webhook receiver at the test's receiver, and turn the other receivers (pager, chat) into null receivers
— so a test shows the shipped routing delivering the shipped alerts, minutes compressed into seconds.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import httpx
import yaml

from rollout.backends.local.prometheus import duration
from service.common.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE: Final[Path] = ROOT / "deploy" / "prometheus" / "rules.yml"
ALERTMANAGER_FILE: Final[Path] = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_BINARY: Final[Path] = Path("/usr/bin/prometheus-alertmanager")
WEBHOOK_PATH: Final[str] = "/hooks/alertmanager"
_INTERVALS: Final[tuple[str, ...]] = ("group_wait", "group_interval", "repeat_interval")
_RECEIVER_CONFIGS: Final[tuple[str, ...]] = (
    "webhook_configs", "pagerduty_configs", "email_configs", "slack_configs", "opsgenie_configs",
)  # fmt: skip


def fast_rules(dest: Path, for_s: float, source: Path = RULES_FILE) -> Path:
    """``source`` with every alert's ``for:`` shortened to at most ``for_s`` seconds (nothing else changed)."""
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                rule["for"] = duration(for_s)
    dest.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return dest


def _shorten(route: dict[str, Any], intervals_s: dict[str, float]) -> None:
    for key in _INTERVALS:
        route[key] = duration(intervals_s[key])
    for child in route.get("routes", []):
        _shorten(child, intervals_s)


def retrain_receiver_name(config: dict[str, Any]) -> str:
    """The receiver whose webhook is the retraining service's ``/hooks/alertmanager``."""
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            if str(hook["url"]).endswith(WEBHOOK_PATH):
                return str(receiver["name"])
    raise LookupError(f"no receiver posts to {WEBHOOK_PATH}")


def fast_routing(
    *,
    webhook_url: str,
    token_file: Path,
    group_wait_s: float,
    group_interval_s: float,
    repeat_interval_s: float,
    source: Path = ALERTMANAGER_FILE,
) -> dict[str, Any]:
    """The shipped routing with short intervals, the retrain webhook at ``webhook_url`` (bearer token from
    ``token_file``) and every other receiver silenced."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(source.read_text(encoding="utf-8")))
    _shorten(config["route"], {"group_wait": group_wait_s, "group_interval": group_interval_s,
                               "repeat_interval": repeat_interval_s})  # fmt: skip
    retrain = retrain_receiver_name(config)
    for receiver in config["receivers"]:
        if receiver["name"] == retrain:
            (hook,) = receiver["webhook_configs"]
            hook["url"] = webhook_url
            hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
        else:
            for key in _RECEIVER_CONFIGS:
                receiver.pop(key, None)
    return config


class AlertmanagerServer:
    """An Alertmanager process on loopback with a given configuration (clustering off)."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, host: str = "127.0.0.1", ready_timeout_s: float = 60):
        self.workdir = workdir
        self.config = config
        self.host = host
        self.port = 0
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "alertmanager.log"

    def start(self) -> None:
        if not ALERTMANAGER_BINARY.exists():
            raise FileNotFoundError(f"{ALERTMANAGER_BINARY}: install Debian's prometheus-alertmanager")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        self.port = free_port(self.host)
        argv = [
            str(ALERTMANAGER_BINARY),
            f"--config.file={config_file}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address={self.address}",
            "--cluster.listen-address=",  # no gossip port (and no clash with anyone else's Alertmanager)
            "--log.level=info",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"alertmanager exited with {self._process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"alertmanager not ready after {self.ready_timeout_s} s: {self.log_tail()}")

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts it holds (API v2)."""
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=10, trust_env=False)
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return alerts

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
