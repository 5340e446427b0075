"""``fraudwatch-demo`` (``make demo``): the product on one machine — a model rollout from training to rollback.

1. **Model side** — ``fraudwatch demo-versions`` as a subprocess (the hand-off is its JSON; this package never
   imports training code): v1 (champion, trained before a new bot farm appeared), v2 (trained after it), v3 (v2's
   booster with its threshold raised: a deliberately bad version whose scores look exactly like v2's), all logged
   and registered in MLflow (SQLite), plus the live traffic and the regression set.
2. **Stack** — Prometheus (Debian's binary, ``deploy/prometheus/rules.yml``), the router, the rollout controller
   (``python -m rollout.controller``; it starts ``bentoml serve`` for the champion and every candidate), the MLflow
   UI and the dashboard (``fraudwatch-dashboard``), then locust headless (its CLI, its own process) replaying the
   live traffic and posting each answer's fraud label after its (time-compressed) delay.
3. **Rollouts** — ``rolloutctl start --candidate v2``: the controller walks v2 through quality → shadow → canary →
   A/B → full on Prometheus evidence while the progress is shown live; then ``rolloutctl start --candidate v3``:
   health and drift gates pass, the outcome gates (recall) fail once labels arrive, v3 is rolled back.
4. **Report** — a summary, ``report/timeline.png`` and ``report/timeline.html`` (decisions per version over time,
   gate values per monitoring layer, every transition with its gate values), ``report/summary.json``.

Every child runs in its own session and is stopped on the way out — also on Ctrl-C or SIGTERM (the controller
stops the model servers it started; the ones it recorded are stopped again in case it could not). Settings:
``FW_ROLLOUT_DEMO__…`` (:class:`DemoSettings`), the model side's ``FW_DEMO__…`` (``service/demo.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.live import Live

from rollout.demo_policy import load_demo_policy, time_scaled
from rollout.demo_processes import (
    ChildProcess,
    recorded_workload_pids,
    signal_group,
    signals_ignored,
    stop_recorded_workloads,
)
from rollout.demo_view import rollout_view, status_line, summary_table, transition_line
from rollout.events import read_events
from rollout.inbox import EVENTS_FILE
from rollout.machine import RolloutState
from rollout.outcome_settings import OutcomeSettings, PrometheusSettings
from rollout.policy import RolloutPolicy, dump_policy, load_policy
from rollout.prometheus import PrometheusServer, free_port
from rollout.router_process import RouterProcess
from rollout.state import ControllerState, StateError, StateStore
from rollout.timeline import (
    FINISHED,
    GateSampler,
    ObservedShare,
    RolloutSummary,
    Timeline,
    build_timeline,
    render_html,
    render_png,
    summarize,
    write_points,
)
from service.logging import configure_logging, get_logger, log_event

logger = get_logger("rollout.demo")

BIN: Final[Path] = Path(sys.executable).parent
MARKER_FILE: Final[str] = ".fraudwatch-demo"
VERSIONS_FILE: Final[str] = "versions.json"
SUMMARY_FILE: Final[str] = "summary.json"
GATES_FILE: Final[str] = "gates.jsonl"
ROUTER_READY_PATH: Final[str] = "/readyz"
ROLE_ORDER: Final[tuple[str, ...]] = ("champion", "challenger", "bad")
UI_NAMES: Final[tuple[str, ...]] = ("mlflow", "dashboard")
T = TypeVar("T")


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
    #: Multiplies every stage minimum of rollout/demo_policy.yaml (0.5 → twice as fast; evidence minimums stay).
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
    rollout_timeout_s: float = Field(900.0, gt=0.0)
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


# --------------------------------------------------------------------------------------------------- hand-off


class ModelSide(BaseModel):
    """The model side's JSON (``fraudwatch demo-versions --summary-json``), validated at the boundary."""

    model_config = ConfigDict(extra="ignore")

    model_name: str
    tracking_uri: str
    versions: dict[str, str]
    registry_versions: dict[str, str]
    live_traffic: Path
    regression_set: Path
    stream: dict[str, Any] = Field(default_factory=dict)
    regression_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)

    @property
    def champion(self) -> str:
        return self.versions["champion"]

    @property
    def challenger(self) -> str:
        return self.versions["challenger"]

    @property
    def bad(self) -> str:
        return self.versions["bad"]


def load_model_side(path: Path) -> ModelSide:
    try:
        side = ModelSide.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise DemoError(ExitCode.MODELS, f"the model side's result {path} is unusable: {exc}") from exc
    missing = set(ROLE_ORDER) - set(side.versions)
    if missing:
        raise DemoError(ExitCode.MODELS, f"the model side named no {', '.join(sorted(missing))} version")
    return side


# --------------------------------------------------------------------------------------------------- waiting


def wait_until(probe: Callable[[], T | None], timeout_s: float, what: str, *, poll_s: float = 0.25,
               alive: Callable[[], str | None] | None = None, code: ExitCode = ExitCode.STACK) -> T:  # fmt: skip
    """``probe()`` once it is not None; ``alive()`` names a dead dependency (→ fail at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        dead = alive() if alive is not None else None
        if dead is not None:
            raise DemoError(code, f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise DemoError(code, f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s, trust_env=False).status_code == httpx.codes.OK
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One demo run: its directories, the processes it started, what it measured."""

    settings: DemoSettings
    console: Console
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.monotonic)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    children: list[dict[str, Any]] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    sampler: GateSampler = field(default_factory=GateSampler)
    model_side: ModelSide | None = None
    policy: RolloutPolicy | None = None
    controller: ChildProcess | None = None
    prometheus: PrometheusServer | None = None
    router: RouterProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    workload_pids: list[int] = field(default_factory=list)
    observed: list[ObservedShare] = field(default_factory=list)
    log_file: IO[str] | None = None
    #: Whether each UI answered its page at the end of the rollouts.
    answered: dict[str, bool] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.settings.home.resolve()

    @property
    def model_home(self) -> Path:
        return self.home / "model"

    @property
    def state_dir(self) -> Path:
        return self.home / "rollout"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def report_dir(self) -> Path:
        return self.home / "report"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def lap(self, key: str, since: float) -> None:
        self.timings_s[key] = round(time.monotonic() - since, 2)

    def say(self, text: str) -> None:
        self.console.print(f"[dim][{self.elapsed():7.1f} s][/] {text}", soft_wrap=True, highlight=False)

    def track(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.children.append({"name": name, "pid": pid})


def prepare_home(settings: DemoSettings) -> Path:
    """A fresh run directory: the previous run's removed when it is one (marker file), refused otherwise."""
    home = settings.home.resolve()
    if home.exists():
        if not (home / MARKER_FILE).exists() and any(home.iterdir()):
            raise DemoError(ExitCode.USAGE, f"{home} exists and is not a demo directory (no {MARKER_FILE}); "
                            "choose another FW_ROLLOUT_DEMO__HOME")  # fmt: skip
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER_FILE).write_text("created by fraudwatch-demo; removed by its next run\n", encoding="utf-8")
    return home


def run_model_side(run: Run) -> ModelSide:
    """``fraudwatch demo-versions``: its human output to the console, its JSON logs to ``logs/models.log``."""
    started = time.monotonic()
    out = run.home / VERSIONS_FILE
    run.logs.mkdir(parents=True, exist_ok=True)
    run.say("[bold]model side[/]: fraudwatch demo-versions (train v1, v2; derive v3; register in MLflow)")
    argv = [str(BIN / "fraudwatch"), "--home", str(run.model_home), "demo-versions", "--summary-json", str(out)]
    with (run.logs / "models.log").open("ab") as log:
        sys.stdout.flush()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True)
        run.track("fraudwatch demo-versions", process.pid)
        try:
            code = process.wait(timeout=run.settings.models_timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(
                ExitCode.MODELS, f"the model side did not finish in {run.settings.models_timeout_s:.0f} s"
            ) from exc
        finally:
            if process.poll() is None:
                signal_group(process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=run.settings.stop_timeout_s)
                signal_group(process.pid, signal.SIGKILL)
                process.wait()
    if code != 0:
        raise DemoError(ExitCode.MODELS, f"fraudwatch demo-versions exited with {code} (see {run.logs / 'models.log'})")
    run.lap("model_side", started)
    return load_model_side(out)


def controller_env(run: Run, side: ModelSide, policy_path: Path, router: RouterProcess, port: int, token: str,
                   prometheus: PrometheusServer) -> dict[str, str]:  # fmt: skip
    s = run.settings
    prefix = "FW_ROLLOUT_CONTROLLER__"
    return {
        **os.environ,
        "FW_HOME": str(run.model_home),
        "FW_LOG_LEVEL": s.log_level,
        "FW_PROCESS__START_TIMEOUT_S": str(s.server_start_timeout_s),
        "FW_ROLLOUT_HOME": str(run.home),
        "FW_ROLLOUT_LOG_LEVEL": s.log_level,
        "FW_ROLLOUT_ROUTER__ADMIN_TOKEN": token,
        f"{prefix}NAME": s.controller_name,
        f"{prefix}STATE_DIR": str(run.state_dir),
        f"{prefix}POLICY_FILE": str(policy_path),
        f"{prefix}PROMETHEUS_URL": prometheus.url,
        f"{prefix}QUALITY_SET": str(side.regression_set),
        f"{prefix}HOST": s.host,
        f"{prefix}METRICS_PORT": str(port),
        f"{prefix}COMMAND_WAIT_TIMEOUT_S": str(s.command_timeout_s),
        f"{prefix}LOCAL__ROUTER_URLS": json.dumps([router.control_url]),  # admin and metrics: the control port
        f"{prefix}LOCAL__PROMETHEUS_TARGETS_FILE": str(run.home / "prometheus" / "targets.json"),
        f"{prefix}LOCAL__SCRAPE_TARGETS": json.dumps([router.control_url.removeprefix("http://"), f"{s.host}:{port}"]),
        f"{prefix}LOCAL__START_TIMEOUT_S": str(s.server_start_timeout_s),
        f"{prefix}LOCAL__SERVER_ENV": json.dumps(
            {"FW_SERVE__WORKERS": str(s.server_workers), "FW_LOG_LEVEL": "WARNING"}
        ),
    }


def start_stack(run: Run, side: ModelSide) -> None:
    """Prometheus, the router, the controller (→ the champion's model server), then the UIs and the load."""
    s = run.settings
    started = time.monotonic()
    policy = demo_policy(s)
    run.policy = policy
    policy_path = run.home / "policy.yaml"
    dump_policy(policy, policy_path)
    token = secrets.token_urlsafe(24)

    prometheus = PrometheusServer(
        run.home / "prometheus",
        rule_files=[s.rules_file],
        settings=PrometheusSettings(
            scrape_interval_s=s.scrape_interval_s,
            evaluation_interval_s=s.evaluation_interval_s,
            ready_timeout_s=s.stack_timeout_s,
            stop_timeout_s=s.stop_timeout_s,
            listen_host=s.host,
        ),
    )
    run.stack.callback(prometheus.stop)  # before start: an interrupted start is stopped too
    try:
        prometheus.start()
    except Exception as exc:
        raise DemoError(ExitCode.STACK, f"Prometheus did not start: {exc}") from exc
    run.prometheus = prometheus
    run.track("prometheus", prometheus.pid)
    run.urls["prometheus"] = prometheus.url
    run.say(f"Prometheus (rules {s.rules_file}) at [bold]{prometheus.url}[/]")

    dsn_env = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
    router = RouterProcess(
        log_path=run.logs / "router.log",
        admin_token=token,
        # the demo explains itself: each answer names its deciding version, stage and score (off in production)
        expose_decision_details=True,
        env={
            dsn_env: f"sqlite:///{run.home / 'predictions.db'}",
            "FW_ROLLOUT_ROUTER__HOST": s.host,
            "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
            "FW_ROLLOUT_ROUTER__CANDIDATE_TIMEOUT_S": str(s.candidate_timeout_s),
            "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": str(s.stable_timeout_s),
            "FW_ROLLOUT_ROUTER__SHADOW_TIMEOUT_S": str(s.shadow_timeout_s),
        },
    )
    run.stack.callback(router.stop)
    router.start()
    run.router = router
    run.track("router", router.pid)
    try:
        router.wait_live()
    except Exception as exc:
        raise DemoError(ExitCode.STACK, f"the router did not come up: {exc} (see {run.logs / 'router.log'})") from exc
    run.urls["router"] = router.url

    port = free_port(s.host)
    run.env = controller_env(run, side, policy_path, router, port, token, prometheus)
    controller = ChildProcess("controller", [sys.executable, "-m", "rollout.controller", "--stop-workloads-on-exit"],
                              run.logs / "controller.log", run.env, s.stop_timeout_s)  # fmt: skip
    # stopped in reverse: note the model servers it runs, stop it (it stops them), stop what it could not
    run.stack.callback(lambda: stop_recorded_workloads(run.state_dir, s.stop_timeout_s))
    run.stack.callback(controller.stop)
    run.stack.callback(lambda: run.workload_pids.extend(recorded_workload_pids(run.state_dir)))
    controller.start()
    run.controller = controller
    run.track("controller", controller.pid)
    run.urls["controller_metrics"] = f"http://{s.host}:{port}/metrics"
    run.say(f"router at [bold]{router.url}[/]; controller started — waiting for the champion {side.champion} "
            "(bentoml serve) behind the router")  # fmt: skip
    wait_until(
        lambda: True if http_ok(router.url + ROUTER_READY_PATH) else None,
        s.stack_timeout_s,
        f"the champion {side.champion} behind the router",
        alive=lambda: None if controller.running() else f"the controller exited: {controller.log_tail()}",
    )
    run.lap("stack", started)
    run.say(f"{side.champion} serves every decision ({run.timings_s['stack']:.0f} s to bring the stack up)")
    start_extras(run, side)
    start_load(run, side)


def demo_policy(settings: DemoSettings) -> RolloutPolicy:
    """The packaged demo policy (or ``policy_file``), its stage minimums scaled by ``time_scale``."""
    if settings.policy_file is None:
        return load_demo_policy(settings.time_scale)
    return time_scaled(load_policy(settings.policy_file), settings.time_scale)


def start_extras(run: Run, side: ModelSide) -> None:
    """The MLflow UI and the dashboard (not waited for: they come up while the rollout runs)."""
    s = run.settings
    assert run.prometheus is not None
    if s.mlflow_ui:
        port = free_port(s.host)
        artifacts = (run.model_home / "mlruns").resolve().as_uri()
        mlflow = ChildProcess("mlflow ui", [str(BIN / "mlflow"), "server", "--backend-store-uri", side.tracking_uri,
                                            "--default-artifact-root", artifacts, "--host", s.host, "--port",
                                            str(port), "--workers", "1"],
                              run.logs / "mlflow.log", dict(os.environ), s.stop_timeout_s)  # fmt: skip
        run.stack.callback(mlflow.stop)
        mlflow.start()
        run.track("mlflow ui", mlflow.pid)
        run.urls["mlflow"] = f"http://{s.host}:{port}"
    if s.dashboard:
        port = free_port(s.host)
        dashboard = ChildProcess("dashboard", [str(BIN / "fraudwatch-dashboard"), "--prometheus", run.prometheus.url,
                                               "--host", s.host, "--port", str(port)],
                                 run.logs / "dashboard.log", dict(os.environ), s.stop_timeout_s)  # fmt: skip
        run.stack.callback(dashboard.stop)
        dashboard.start()
        run.track("dashboard", dashboard.pid)
        run.urls["dashboard"] = f"http://{s.host}:{port}"
    for name in UI_NAMES:
        if name in run.urls:
            run.say(f"{name}: [bold]{run.urls[name]}[/]")


def start_load(run: Run, side: ModelSide) -> None:
    s = run.settings
    assert run.router is not None
    env = {
        **os.environ,
        "FW_LOAD_DATA": str(side.live_traffic),
        "FW_LOAD_LABEL_SECONDS_PER_HOUR": str(s.label_seconds_per_hour),
        "FW_LOAD_WAIT_MIN": str(s.wait_min_s),
        "FW_LOAD_WAIT_MAX": str(s.wait_max_s),
        "FW_LOAD_LABEL_USERS": str(s.label_users),
        # labels go to the router's feedback listener with the label feed's token, never the public port
        "FW_LOAD_FEEDBACK_URL": run.router.control_url,
        "FW_LOAD_FEEDBACK_TOKEN": run.router.feedback_token,
    }
    argv = [str(BIN / "locust"), "-f", str(s.locustfile), "--headless", "-u", str(s.users), "-r", str(s.spawn_rate),
            "-t", "24h", "--host", run.router.url, "--only-summary", "--loglevel", "WARNING",
            "--csv", str(run.logs / "locust")]  # fmt: skip
    locust = ChildProcess("locust", argv, run.logs / "locust.log", env, s.stop_timeout_s)
    run.stack.callback(locust.stop)
    locust.start()
    run.track("locust", locust.pid)
    day = s.label_seconds_per_hour * 24
    rows = side.stream.get("live_rows", "?")
    run.say(f"locust: {s.users - s.label_users} refund users replaying {rows} live requests, "
            f"{s.label_users} label users posting labels once due ({day:.3g} s per day of delay)")  # fmt: skip


# --------------------------------------------------------------------------------------------------- rollouts


def read_state(state_dir: Path) -> ControllerState | None:
    try:
        return StateStore(state_dir).load()
    except (StateError, OSError):
        return None


def ctl(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rolloutctl"), *args], env=run.env, capture_output=True, text=True,
                          timeout=run.settings.command_timeout_s + 30, check=False)  # fmt: skip


def start_rollout(run: Run, candidate: str, rollout_id: str, reason: str) -> None:
    done = ctl(run, "start", "--candidate", candidate, "--id", rollout_id, "--reason", reason)
    if done.returncode != 0:
        raise DemoError(ExitCode.UNEXPECTED, f"rolloutctl start {candidate} exited {done.returncode}: "
                        f"{(done.stdout + done.stderr).strip()}")  # fmt: skip
    run.say(f"$ rolloutctl start --candidate {candidate} --id {rollout_id} → {done.stdout.strip()}")


def watch(run: Run, rollout_id: str) -> RolloutState:
    """Show the rollout live until it is Promoted, RolledBack or Aborted; sample its gates for the timeline."""
    s = run.settings
    assert run.policy is not None and run.controller is not None
    policy = run.policy
    deadline = time.monotonic() + s.rollout_timeout_s
    seen = 0
    last_plain = -float("inf")
    live = Live(console=run.console, refresh_per_second=4, transient=False) if run.console.is_terminal else None
    with live if live is not None else contextlib.nullcontext():
        while True:
            state = read_state(run.state_dir)
            run.sampler.observe(state)
            rollout = state.rollout if state is not None else None
            now = datetime.now(UTC)
            if rollout is not None and rollout.rollout_id == rollout_id:
                for transition in rollout.history[seen:]:
                    line = transition_line(rollout, transition, (transition.at - run.started_at).total_seconds())
                    if live is not None:
                        live.console.print(line, soft_wrap=True, highlight=False)
                    else:
                        run.console.print(line, soft_wrap=True, highlight=False)
                seen = len(rollout.history)
                started_at = state.rollout_started_at if state is not None else None
                if live is not None:
                    live.update(rollout_view(rollout, policy, now, started_at=started_at, footer=_footer(run)))
                elif time.monotonic() - last_plain >= s.plain_status_s:
                    last_plain = time.monotonic()
                    run.console.print(status_line(rollout, policy, now, run.elapsed()), soft_wrap=True, highlight=False)
                if rollout.phase in FINISHED:
                    return rollout
            if not run.controller.running():
                raise DemoError(ExitCode.FAILURE, f"the controller exited: {run.controller.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(ExitCode.TIMEOUT, f"rollout {rollout_id} did not finish in {s.rollout_timeout_s:.0f} s")
            time.sleep(s.refresh_s)


def _footer(run: Run) -> str:
    urls = "  ".join(f"{k} {v}" for k, v in run.urls.items() if k in ("dashboard", "mlflow", "prometheus"))
    return f"{run.elapsed():.0f} s since start   {urls}   (Ctrl-C stops everything)"


def check_outcomes(summaries: Sequence[RolloutSummary], side: ModelSide) -> list[str]:
    """What differs from the designed run: v2 promoted through every stage; v3 rolled back by outcome gates only,
    a recall gate among them (the paired one in shadow when its fraud labels arrive in time), after its health and
    drift gates had passed."""
    problems = []
    good = next((r for r in summaries if r.candidate == side.challenger), None)
    bad = next((r for r in summaries if r.candidate == side.bad), None)
    if good is None:
        problems.append(f"no rollout of {side.challenger}")
    else:
        if good.phase != "Promoted":
            problems.append(f"{side.challenger} ended {good.phase}: {good.reason}")
        if good.path != ("quality", "shadow", "canary", "ab", "full"):
            problems.append(f"{side.challenger} went through {' → '.join(good.path)}")
    if bad is None:
        problems.append(f"no rollout of {side.bad}")
    else:
        if bad.phase != "RolledBack" or not bad.ended_by.startswith("analysis"):
            problems.append(f"{side.bad} ended {bad.phase} ({bad.ended_by}): {bad.reason}")
        if bad.failed_layers != {"outcome"}:
            problems.append(f"{side.bad} failed gates of {sorted(bad.failed_layers)}, not the outcome layer alone")
        if not {"recall", "recall-paired"} & {g.get("name") for g in bad.failed_gates}:
            problems.append(f"{side.bad} was not caught by a recall gate (paired in shadow, or in A/B and full)")
        drift_and_health = {"error-rate", "latency", "input-psi-max", "score-psi", "decision-rate-shift"}
        missing = drift_and_health - set(bad.passed_gates)
        # Caught in shadow by a paired gate, v3 may be rolled back before the drift gates' evidence minimums are
        # met: that none of them failed is checked above (the outcome layer alone failed).
        if missing and bad.path[-1] != "shadow":
            problems.append(f"{side.bad}'s {', '.join(sorted(missing))} never passed before the rollback")
    return problems


def measured_shares(prometheus_url: str, started_at: datetime, now: datetime, step_s: float) -> list[ObservedShare]:
    """Each version's share of the router's deciding calls over the run (range query on its counters)."""
    query = 'sum by (model_version) (rate(fraudwatch_router_requests_total{role="decider"}[5s]))'
    params: dict[str, str | float] = {"query": query, "start": started_at.timestamp(), "end": now.timestamp(),
                                      "step": step_s}  # fmt: skip
    try:
        response = httpx.get(prometheus_url + "/api/v1/query_range", params=params, timeout=10.0, trust_env=False)
        response.raise_for_status()
        result = response.json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log_event(logger, "measured shares unavailable", event="demo_measured_failed", error=str(exc))
        return []
    return shares_of(result, started_at.timestamp())


def shares_of(result: Sequence[Mapping[str, Any]], origin: float) -> list[ObservedShare]:
    """A range query's series (one per version) as each version's share of their sum at every step, in seconds
    since ``origin`` (a UNIX time)."""
    totals: dict[float, float] = {}
    for series in result:
        for at, value in series["values"]:
            totals[float(at)] = totals.get(float(at), 0.0) + float(value)
    shares = []
    for series in result:
        version = str(series["metric"].get("model_version", ""))
        for at, value in series["values"]:
            total = totals[float(at)]
            if total > 0:
                shares.append(ObservedShare(float(at) - origin, version, 100.0 * float(value) / total))
    return shares


def locust_stats(prefix: Path) -> dict[str, dict[str, float]]:
    """Requests, failures and throughput per request name from locust's ``--csv`` stats file."""
    path = prefix.with_name(prefix.name + "_stats.csv")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    out = {}
    for row in rows:
        with contextlib.suppress(KeyError, ValueError):
            out[row["Name"]] = {
                "requests": float(row["Request Count"]),
                "failures": float(row["Failure Count"]),
                "rps": round(float(row["Requests/s"]), 2),
                "p50_ms": float(row["50%"]),
                "p99_ms": float(row["99%"]),
            }
    return out


# --------------------------------------------------------------------------------------------------- main flow


@dataclass
class Outcome:
    code: ExitCode
    message: str = ""
    summaries: list[RolloutSummary] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)


def rollouts(run: Run, side: ModelSide) -> None:
    for candidate, role in ((side.challenger, "trained after the new bot farm appeared"),
                            (side.bad, "deliberately bad: v2's booster, threshold raised")):  # fmt: skip
        started = time.monotonic()
        rollout_id = f"demo-{candidate}"
        run.console.rule(f"rollout of {candidate} ({role})")
        start_rollout(run, candidate, rollout_id, f"fraudwatch-demo: {role}")
        finished = watch(run, rollout_id)
        run.lap(f"rollout_{candidate}", started)
        run.say(f"rollout {rollout_id}: [bold]{finished.phase}[/] after {run.timings_s[f'rollout_{candidate}']:.0f} s "
                f"— {finished.history[-1].reason}")  # fmt: skip
        if candidate == side.challenger and finished.phase != "Promoted":
            # v3 is meant to be measured against the promoted v2: without it the second act would show nothing
            raise DemoError(ExitCode.UNEXPECTED, f"{candidate} ended {finished.phase}: {finished.history[-1].reason}")


def build_report(run: Run, side: ModelSide | None) -> tuple[Timeline, list[RolloutSummary], dict[str, str]]:
    now = datetime.now(UTC)
    policy = run.policy or load_demo_policy(run.settings.time_scale)
    timeline = build_timeline(read_events(run.state_dir / EVENTS_FILE), run.sampler.points, policy, run.started_at)
    summaries = summarize(timeline, now)
    write_points(run.sampler.points, run.report_dir / GATES_FILE)
    serving = run.timings_s.get("model_side", 0.0) + run.timings_s.get("stack", 0.0)
    png = render_png(timeline, run.report_dir / "timeline.png", now, run.observed, serving_since=serving)
    facts: dict[str, Any] = {
        "wall time (s)": round(run.elapsed(), 1),
        **{f"{k} (s)": v for k, v in run.timings_s.items()},
    }
    if side is not None:
        facts |= {f"{role} version": version for role, version in side.versions.items()}
        facts |= {
            f"{version} on the regression set": ", ".join(f"{key} {value:.3f}" for key, value in metrics.items())
            for version, metrics in side.regression_metrics.items()
        }
    html_path = render_html(timeline, summaries, run.report_dir / "timeline.html", png=png, facts=facts)
    return timeline, summaries, {"html": str(html_path), "png": str(png)}


def execute(run: Run) -> Outcome:
    """The whole demo; every child is stopped before this returns or raises."""
    prepare_home(run.settings)
    run.logs.mkdir(parents=True, exist_ok=True)
    run.log_file = (run.logs / "demo.log").open("a", encoding="utf-8")
    configure_logging(run.settings.log_level, stream=run.log_file)  # JSON logs to a file: the terminal is rich's
    intro(run)
    side: ModelSide | None = None
    outcome: Outcome | None = None
    try:
        try:
            side = run_model_side(run)
            run.model_side = side
            start_stack(run, side)
            rollouts(run, side)
            if run.prometheus is not None:
                run.observed = measured_shares(run.prometheus.url, run.started_at, datetime.now(UTC),
                                               run.settings.measured_step_s)  # fmt: skip
            run.answered = {name: http_ok(run.urls[name] + "/") for name in UI_NAMES if name in run.urls}
            outcome = judged(run, side, Outcome(ExitCode.OK))  # while the stack is up, so --hold can show it
            if run.settings.hold:
                hold(run, outcome)
        finally:
            with signals_ignored():
                run.say("stopping every process of the demo")
                stopping = time.monotonic()
                run.stack.close()
                run.lap("shutdown", stopping)
    except DemoError as error:
        outcome = judged(run, side, Outcome(error.code, str(error)))
    assert outcome is not None
    return outcome


def judged(run: Run, side: ModelSide | None, outcome: Outcome) -> Outcome:
    """``outcome`` with the report written and, for a run that went through, its rollouts checked."""
    _, outcome.summaries, outcome.report = build_report(run, side)
    if outcome.code == ExitCode.OK and side is not None:
        problems = check_outcomes(outcome.summaries, side)
        if problems:
            outcome.code, outcome.message = ExitCode.UNEXPECTED, "; ".join(problems)
    return outcome


def intro(run: Run) -> None:
    s = run.settings
    run.console.rule("fraudwatch rollout demo")
    run.console.print(
        "v1 (trained before a new bot farm appeared) serves; v2 (trained after it) is rolled out through quality → "
        "shadow → canary → A/B → full on Prometheus evidence; then v3 — v2's scores with a raised threshold, so it "
        f"looks normal but misses fraud — must be rolled back by the outcome gates. Stages of at least "
        f"{demo_policy(s).stages.shadow.min_duration_s:.0f} s; everything under {run.home}.",
        soft_wrap=False,
    )


def hold(run: Run, outcome: Outcome) -> None:
    """Keep the stack serving (UIs included) until Ctrl-C, which then ends the demo normally."""
    urls = ", ".join(f"{name} {url}" for name, url in run.urls.items())
    run.say(f"[bold]--hold[/]: the stack keeps serving ({urls}); report {outcome.report.get('html', '')}. "
            "Ctrl-C stops everything.")  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1.0)


def summary_document(run: Run, outcome: Outcome) -> dict[str, Any]:
    side = run.model_side
    return {
        "exit_code": int(outcome.code),
        "message": outcome.message,
        "wall_s": round(run.elapsed(), 2),
        "timings_s": run.timings_s,
        "versions": side.versions if side else {},
        "registry_versions": side.registry_versions if side else {},
        "regression_metrics": side.regression_metrics if side else {},
        "stream": side.stream if side else {},
        "rollouts": [s.to_dict() for s in outcome.summaries],
        "report": outcome.report,
        "urls": run.urls,
        "ui_answered": run.answered,
        "children": run.children,
        "workload_pids": sorted(set(run.workload_pids)),
        "traffic": locust_stats(run.logs / "locust"),
        "home": str(run.home),
    }


def print_summary(run: Run, outcome: Outcome, document: Mapping[str, Any]) -> None:
    console = run.console
    console.rule("summary")
    side = run.model_side
    if side is not None:
        for role, version in sorted(side.versions.items(), key=lambda item: ROLE_ORDER.index(item[0])):
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in side.regression_metrics.get(version, {}).items())
            console.print(f"{role:>10} {version}: regression set {metrics}", soft_wrap=True, highlight=False)
    if outcome.summaries:
        console.print(summary_table(outcome.summaries))
    traffic = document.get("traffic", {}).get("Aggregated")
    if traffic:
        calls = f"{traffic['requests']:.0f} calls through the router ({traffic['failures']:.0f} failed)"
        console.print(f"traffic: {calls}, {traffic['rps']:.0f}/s, p99 {traffic['p99_ms']:.0f} ms", soft_wrap=True)
    for key, value in outcome.report.items():
        console.print(f"timeline report ({key}): {value}", soft_wrap=True, highlight=False)
    verdict = "[bold green]as designed[/]" if outcome.code == ExitCode.OK else f"[bold red]{outcome.message}[/]"
    console.print(f"demo finished in {run.elapsed():.0f} s wall (exit {int(outcome.code)}): {verdict}", soft_wrap=True)


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudwatch-demo",
        description="The rollout demo on one machine: train v1/v2/v3, serve them through the router and the rollout "
        "controller under locust load, watch v2 promoted and the deliberately bad v3 rolled back, write a timeline "
        "report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", type=Path, help="run directory (default: FW_ROLLOUT_DEMO__HOME, else var/demo)")
    parser.add_argument(
        "--time-scale", type=float, help="stage minimum multiplier (default: FW_ROLLOUT_DEMO__TIME_SCALE)"
    )
    parser.add_argument("--no-ui", action="store_true", help="start neither the MLflow UI nor the dashboard")
    parser.add_argument(
        "--hold", action="store_true", help="after the report keep everything serving until Ctrl-C (exit 0 then)"
    )
    parser.add_argument("--summary-json", type=Path, help="also write the summary here (always in HOME/report)")
    return parser


def settings_from(args: argparse.Namespace) -> DemoSettings:
    overrides: dict[str, Any] = {}
    if args.home is not None:
        overrides["home"] = args.home
    if args.time_scale is not None:
        overrides["time_scale"] = args.time_scale
    if args.no_ui:
        overrides |= {"mlflow_ui": False, "dashboard": False}
    if args.hold:
        overrides["hold"] = True
    return DemoSettings.model_validate({**DemoSettings().model_dump(), **overrides})


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise TerminatedError(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else int(ExitCode.USAGE)
    console = Console()
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        console.print(f"fraudwatch-demo: invalid settings: {exc}", soft_wrap=True)
        return int(ExitCode.USAGE)
    run = Run(settings=settings, console=console)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        outcome = execute(run)
    except KeyboardInterrupt:
        outcome = Outcome(ExitCode.INTERRUPTED, "interrupted")
    except TerminatedError:
        outcome = Outcome(ExitCode.TERMINATED, "terminated")
    except Exception as exc:  # a bug or an unforeseen failure: still a summary
        outcome = Outcome(ExitCode.FAILURE, f"{type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    document = summary_document(run, outcome)
    with contextlib.suppress(OSError):
        run.report_dir.mkdir(parents=True, exist_ok=True)
        (run.report_dir / SUMMARY_FILE).write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
        if args.summary_json is not None:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    print_summary(run, outcome, document)
    if run.log_file is not None:
        run.log_file.close()
    return int(outcome.code)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
