"""The local walk's stack and the scenarios it shares with the podman walk (tests/integration/test_rollout_local.py,
tests/integration/test_rollout_podman.py): a controller, a router, Prometheus, locust and the model servers as
real processes on loopback, and the checks each scenario makes of them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rollout.backends.local.prometheus import PrometheusServer
from rollout.backends.local.state import StateStore
from rollout.backends.local.workloads import WORKLOADS_FILE
from rollout.backends.prometheus import PrometheusClient
from rollout.core.policy import dumps_policy, loads_policy
from rollout.core.state import ControllerState
from tests.kits.rollout import (
    HOST,
    POLICY_YAML,
    ROLLOUT_TIMEOUT_S,
    START_TIMEOUT_S,
    Models,
    RouterEndpoints,
    aliases_if,
    answer,
    check_good_ab_exit,
    check_outcome_rollback,
    router_ready,
    stage_timings,
    start_locust,
    stop_locust,
    wait_for,
)
from tests.kits.stack import ControllerConfig, rolloutctl, start_controller, stop_process
from tests.kits.stack import controller_env as kit_controller_env

TOKEN = "rollout-integration-token"
NAME = "it"
#: The previous version stays warm this long after a promotion: long enough for the revert scenarios right after one
#: (the registry-outage one holds SQLite's lock for its 20 s busy timeout), short enough to watch it end.
WARM_WINDOW_S = 75.0


def local_policy_yaml() -> str:
    """The shared time-compressed policy with this module's warm window."""
    policy = loads_policy(POLICY_YAML)
    promotion = policy.promotion.model_copy(update={"warm_window_s": WARM_WINDOW_S})
    return dumps_policy(policy.model_copy(update={"promotion": promotion}))


LOCAL_POLICY_YAML = local_policy_yaml()


# --------------------------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    models: Models
    workdir: Path
    prometheus: PrometheusServer
    router: RouterEndpoints
    controller_port: int
    env: dict[str, str]
    controller: subprocess.Popen[bytes] | None = None
    locust: subprocess.Popen[bytes] | None = None
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "rollout"

    def start_controller(self) -> None:
        self.controller = start_controller(self.env, self.workdir / "controller.log")

    def stop_controller(self, sig: signal.Signals = signal.SIGTERM) -> None:
        process, self.controller = self.controller, None
        stop_process(process, sig)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return rolloutctl(self.env, *args)

    def state(self) -> ControllerState:
        saved = StateStore(self.state_dir).load()
        assert saved is not None
        return saved

    def rollout(self) -> Any:
        rollout = self.state().rollout
        assert rollout is not None
        return rollout

    def routing(self) -> dict[str, Any]:
        response = httpx.get(
            self.router.control_url + "/admin/routing",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
            trust_env=False,
        )
        response.raise_for_status()
        table: dict[str, Any] = response.json()["table"]
        return table

    def answer(self) -> dict[str, Any]:
        return answer(self.router.url)

    def aliases_if(self, **expected: str | None) -> dict[str, str] | None:
        return aliases_if(self.models, **expected)

    def workloads(self) -> dict[str, int]:
        records = json.loads((self.state_dir / WORKLOADS_FILE).read_text())
        return {r["version"]: r["pid"] for r in records}

    def finished(self, rollout_id: str) -> Any:
        def done() -> Any:
            rollout = self.state().rollout
            if rollout is not None and rollout.rollout_id == rollout_id and rollout.phase != "Progressing":
                return rollout
            return None

        return wait_for(done, f"rollout {rollout_id} to finish", ROLLOUT_TIMEOUT_S)

    def at_stage(self, rollout_id: str, stage: str) -> Any:
        def there() -> Any:
            rollout = self.state().rollout
            if rollout is None or rollout.rollout_id != rollout_id:
                return None
            assert rollout.phase == "Progressing", f"{rollout.phase}: {rollout.history[-1].reason}"
            return rollout if rollout.stage == stage else None

        return wait_for(there, f"rollout {rollout_id} at {stage}", ROLLOUT_TIMEOUT_S)

    def start(self, candidate: str, rollout_id: str) -> None:
        done = self.ctl("start", "--candidate", candidate, "--id", rollout_id, "--reason", "integration")
        assert done.returncode == 0, done.stdout + done.stderr


def controller_env(
    models: Models, workdir: Path, prometheus: PrometheusServer, router: RouterEndpoints, port: int
) -> dict[str, str]:
    config = ControllerConfig(
        name=NAME, model_home=models.home, workdir=workdir, prometheus_url=prometheus.url,
        router_control_url=router.control_url,
        metrics_port=port, policy_yaml=LOCAL_POLICY_YAML, admin_token=TOKEN, quality_set=models.regression_meta,
        start_timeout_s=START_TIMEOUT_S,
    )  # fmt: skip
    return kit_controller_env(config)


def serve_traffic(stack: Stack, started: float) -> None:
    """Start the controller, wait until the champion answers through the router, start locust."""
    stack.start_controller()
    wait_for(
        lambda: stack.answer() if router_ready(stack.router.url) else None,
        "the champion behind the router",
        START_TIMEOUT_S,
    )
    stack.locust = start_locust(stack.router, stack.workdir / "locust.log")
    stack.timings["stack_ready_s"] = round(time.monotonic() - started, 1)


def stop_traffic(stack: Stack) -> None:
    stop_locust(stack.locust)
    stack.stop_controller()


# --------------------------------------------------------------------------------------------------- scenarios


def walk_good_candidate(stack: Stack) -> None:
    started = time.monotonic()
    stack.start("v2", "good-v2")
    rollout = stack.finished("good-v2")
    stack.timings["promotion_s"] = round(time.monotonic() - started, 1)
    stack.timings["good_stage_s"] = stage_timings(rollout)

    assert rollout.phase == "Promoted", rollout.history[-1].reason
    assert [(t.from_stage, t.to_stage) for t in rollout.history] == [
        ("quality", "shadow"), ("shadow", "canary"), ("canary", "ab"), ("ab", "full"), ("full", "full"),
    ]  # fmt: skip
    assert {t.trigger for t in rollout.history} == {"analysis"}
    ab_exit = rollout.history[3]
    check_good_ab_exit(ab_exit)

    # the state is saved before the controller acts on it: the alias moves a moment after Promoted is visible
    aliases = wait_for(lambda: stack.aliases_if(champion="v2"), "the champion alias on v2", 30)
    assert aliases["previous"] == stack.models.numbers["v1"]
    table = stack.routing()
    assert (table["stage"], table["stable"]["version"], table["candidate"]) == ("stable", "v2", None)
    assert [e["version"] for e in table["shadow"]] == ["v1"]  # warm for a one-step revert
    assert stack.answer()["model_version"] == "v2"


def walk_revert(stack: Stack) -> None:
    issued = time.monotonic()
    done = stack.ctl("revert", "--reason", "integration drill")
    returned = time.monotonic() - issued
    assert done.returncode == 0, done.stdout + done.stderr
    answered = stack.answer()
    stack.timings["revert_cli_s"] = round(returned, 3)

    assert answered["model_version"] == "v1"
    table = stack.routing()
    assert (table["stable"]["version"], table["candidate"], table["shadow"]) == ("v1", None, [])
    rollout = stack.rollout()
    assert rollout.phase == "RolledBack"
    assert rollout.history[-1].trigger == "command"
    wait_for(lambda: stack.aliases_if(champion="v1"), "the champion alias back on v1", 30)


def walk_bad_candidate(stack: Stack) -> None:
    started = time.monotonic()
    stack.start("v3", "bad-v3")
    rollout = stack.finished("bad-v3")
    stack.timings["rollback_s"] = round(time.monotonic() - started, 1)
    stack.timings["bad_stage_s"] = stage_timings(rollout)

    check_outcome_rollback(rollout)

    wait_for(lambda: stack.routing()["candidate"] is None or None, "the stable-only table", 30)
    assert stack.routing()["stable"]["version"] == "v1"
    assert stack.answer()["model_version"] == "v1"
    aliases = wait_for(lambda: stack.aliases_if(champion="v1", challenger=None), "v3's challenger alias cleared", 30)
    assert "challenger" not in aliases


def walk_prometheus_scrapes(stack: Stack) -> None:
    with PrometheusClient(stack.prometheus.url) as client:
        phases = wait_for(
            lambda: client.query_vector(f'fraudwatch_rollout_phase{{rollout="{NAME}"}} == 1') or None,
            "the controller's phase series", 30,
        )  # fmt: skip
        servers = wait_for(lambda: client.query('count(up{component="model-server"} == 1)'), "model servers up", 30)
    assert len(phases) == 1
    assert servers >= 1
    metrics = httpx.get(f"http://{HOST}:{stack.controller_port}/metrics", timeout=10, trust_env=False).text
    assert 'fraudwatch_rollout_transitions_total{from="Progressing/canary",reason="gates_passed"' in metrics
    assert "fraudwatch_rollout_reconcile_duration_seconds_bucket" in metrics
