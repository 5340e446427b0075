"""The rollout demo's settings (``FW_ROLLOUT_DEMO__…``), exit codes and errors."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Final

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    MODELS = 3
    STACK = 4
    UNEXPECTED = 5
    TIMEOUT = 6
    INTERRUPTED = 130
    TERMINATED = 143


EPILOG: Final[str] = """\
exit codes:
  0    the demo ran as designed: v2 promoted through every stage, v3 rolled back by an outcome gate
  1    failure (unexpected error; the message is printed, logs are under HOME/logs)
  2    usage error (bad arguments or settings; HOME exists and is not a demo directory)
  3    the model side failed (fraudwatch demo-versions; HOME/logs/models.log)
  4    the stack did not come up (Prometheus, router, controller or the champion's model server)
  5    a rollout ended otherwise than designed (the summary and the timeline report say how)
  6    a rollout did not finish within FW_ROLLOUT_DEMO__ROLLOUT_TIMEOUT_S
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM) — every child process is stopped first

configuration: FW_ROLLOUT_DEMO__… (e.g. FW_ROLLOUT_DEMO__HOME=var/demo, FW_ROLLOUT_DEMO__TIME_SCALE=0.5,
  FW_ROLLOUT_DEMO__USERS=7, FW_ROLLOUT_DEMO__MLFLOW_UI=false) and the model side's FW_DEMO__… / FW_…
"""


class DemoSettings(BaseSettings):
    """Every knob of the rollout demo's delivery half (``FW_ROLLOUT_DEMO__…``)."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_DEMO__", extra="ignore")

    #: Everything of one run lives here (model side under ``model/``); a rerun removes the previous run's first
    #: (only a directory this demo created: it holds MARKER_FILE).
    home: Path = Path("var/demo")
    #: Multiplies every stage minimum of rollout/demo/demo_policy.yaml (0.5 → twice as fast; evidence minimums stay).
    time_scale: float = Field(1.0, gt=0.0, le=100.0)
    #: Another policy file instead of the packaged demo policy (its stages are scaled too).
    policy_file: Path | None = None
    host: str = "127.0.0.1"
    controller_name: str = Field("demo", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    rules_file: Path = Path("deploy/prometheus/rules.yml")
    locustfile: Path = Path("loadtests/locustfile.py")
    scrape_interval_s: float = Field(1.0, gt=0.0)
    evaluation_interval_s: float = Field(1.0, gt=0.0)
    #: locust: refund users plus label-feed users, spawned at once; think time per refund user.
    users: int = Field(7, ge=2)
    label_users: int = Field(3, ge=1)
    spawn_rate: float = Field(7.0, gt=0.0)
    wait_min_s: float = Field(0.02, ge=0.0)
    wait_max_s: float = Field(0.05, ge=0.0)
    #: Label delay compression: seconds per real hour (chargebacks take days: ~0.15 s here).
    label_seconds_per_hour: float = Field(0.001, gt=0.0)
    #: The router's budgets (generous: two cores run everything).
    candidate_timeout_s: float = Field(2.0, gt=0.0)
    stable_timeout_s: float = Field(4.0, gt=0.0)
    shadow_timeout_s: float = Field(2.0, gt=0.0)
    server_workers: int = Field(1, ge=1)
    models_timeout_s: float = Field(900.0, gt=0.0)
    #: Until the champion answers behind the router (its bentoml serve included).
    stack_timeout_s: float = Field(300.0, gt=0.0)
    server_start_timeout_s: float = Field(240.0, gt=0.0)
    rollout_timeout_s: float = Field(360.0, gt=0.0)
    command_timeout_s: float = Field(60.0, gt=0.0)
    stop_timeout_s: float = Field(30.0, gt=0.0)
    #: The progress view (and the gate sampling behind the timeline) refreshes this often …
    refresh_s: float = Field(0.5, gt=0.0)
    #: … and prints a status line this often when the output is not a terminal.
    plain_status_s: float = Field(10.0, gt=0.0)
    mlflow_ui: bool = True
    dashboard: bool = True
    #: After the report, keep everything serving until Ctrl-C (to explore the dashboard and the MLflow UI).
    hold: bool = False
    #: The measured decision shares in the timeline: the router's counters over this range step.
    measured_step_s: float = Field(2.0, gt=0.0)
    log_level: str = "INFO"


class DemoError(Exception):
    """A step of the demo failed; ``code`` is the exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class TerminatedError(BaseException):
    """SIGTERM, raised in the main thread so every child is stopped on the way out."""
