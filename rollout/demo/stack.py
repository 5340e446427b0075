"""The demo's stack: the model side's hand-off (a subprocess and its JSON), then Prometheus, the router, the controller,
the UIs and locust, each a child process in its own session with its log under ``logs/``."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from rollout.backends.local.prometheus import PrometheusServer
from rollout.core.policy import RolloutPolicy, dump_policy, load_policy
from rollout.demo.policy import load_demo_policy, time_scaled
from rollout.demo.processes import ChildProcess, recorded_workload_pids, stop_recorded_workloads
from rollout.demo.settings import DemoError, DemoSettings, ExitCode
from rollout.demo.timeline import (
    GateSampler,
    ObservedShare,
)
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.settings import PrometheusSettings
from service.common.processes import free_port, signal_group

BIN: Final[Path] = Path(sys.executable).parent


MARKER_FILE: Final[str] = ".fraudwatch-demo"


VERSIONS_FILE: Final[str] = "versions.json"


ROUTER_READY_PATH: Final[str] = "/readyz"


ROLE_ORDER: Final[tuple[str, ...]] = ("champion", "challenger", "bad")


UI_NAMES: Final[tuple[str, ...]] = ("mlflow", "dashboard")


T = TypeVar("T")


class ModelSide(BaseModel):
    """The model side's JSON (``fraudwatch demo-versions --summary-json``), validated at the boundary."""

    model_config = ConfigDict(extra="ignore")

    model_name: str
    tracking_uri: str
    versions: dict[str, str]
    registry_versions: dict[str, str]
    live_traffic: Path
    regression_set: Path
    #: The model servers' online store (the embedded SQLite file of the model home): the router writes labels there.
    online_store: str = "none"
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
            {
                "FW_SERVE__WORKERS": str(s.server_workers),
                "FW_LOG_LEVEL": "WARNING",
                # the load replays months of a recorded stream in minutes: each event takes its request's own time,
                # or every account would look like a bot-farm burst to the velocity features
                "FW_SERVE__ONLINE_STORE__EVENT_TIME": "request",
            }
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
            # each recorded fraud label counts for its account's velocity features in the models' store
            "FW_ROLLOUT_ROUTER__ONLINE_STORE__URL": side.online_store,
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
