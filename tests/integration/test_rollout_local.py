"""The rollout controller on the local backend, end to end, with every component real.

Real processes on 127.0.0.1: the controller (``python -m rollout.controller``), the ``bentoml serve`` model servers
it starts (bundles fetched from an MLflow registry on SQLite), the router (admin endpoint), Prometheus (scraping
the router, the model servers the controller registers through file SD, and the controller; evaluating
deploy/prometheus/rules.yml every second), locust (its CLI, refund traffic plus delayed fraud labels) and
``rolloutctl`` (its console script). The policy is the default policy's shape, time-compressed: stages of a few
seconds, analysis every second (the demo's policy, rollout/demo/demo_policy.yaml, with its stage minimums scaled down).

The models (v1, v2 and the subtly bad v3), the policy, the traffic and Prometheus come from tests/rolloutkit.py,
shared with the same walk on Kubernetes (tests/e2e/test_rollout_kube.py).

Scenarios, in order (each leaves the stack as the next expects it):

1. v1 → v2 is promoted through quality, shadow, canary, A/B and full; aliases move; v1 stays warm in shadow.
2. ``rolloutctl revert`` puts every decision back on v1.
3. v1 → v3 is rolled back by an outcome gate in A/B or full.
4. v1 → v2 with Prometheus stopped mid-canary: no promotion, then aborted after the inconclusive timeout.
5. v1 → v2 with the controller SIGKILLed mid-stage and restarted: same stage and stage clock, the same model
   servers (adopted, not restarted), the rollout carries on; the event log has every transition exactly once.
6. An identical candidate (the stable's bundle under a new version name) is promoted (issue 10's A/A test).
7. A registry outage (its SQLite store locked) while ``rolloutctl start`` runs: the start fails (exit 1, the reason
   printed) and the ``rolloutctl revert`` queued behind it is applied (issue 12, point 6).
8. The candidate's bentoml main process alone is SIGKILLed mid-canary (its workers, in sessions of their own, keep
   the port): the workers are stopped, the old port refuses, the restart is counted (``rolloutctl status``), and
   with every later start killed the same way the ``candidate-workload`` gate rolls back past the restart bound.
9. A candidate whose model server is killed (its whole process tree, SIGKILL) on every start is rolled back by
   the ``candidate-workload`` gate within the policy's bound, while routing never waited on it (issue 12, point 2).
10. No shadow call fails, and none is dropped, across a promotion and the old version's scale-down at the end of
    its warm window (issue 12, point 3).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.backends.local.events import read_events
from rollout.backends.local.inbox import EVENTS_FILE, CommandInbox, read_heartbeat
from rollout.backends.local.prometheus import PrometheusServer
from rollout.backends.local.state import StateStore
from rollout.backends.local.workloads import WORKLOADS_FILE
from rollout.backends.prometheus import PrometheusClient
from rollout.controller.runners import OFFLINE_MESSAGE
from rollout.core.policy import dumps_policy, loads_policy
from rollout.core.state import ControllerState
from rollout.router.process import RouterProcess
from service.common.processes import alive, free_port, process_tree, stop_tree, tagged
from tests.rolloutkit import (
    BIN,
    HOST,
    IDENTICAL,
    POLICY_YAML,
    ROLLOUT_TIMEOUT_S,
    START_TIMEOUT_S,
    Models,
    RouterEndpoints,
    aliases_if,
    answer,
    build_models,
    check_good_ab_exit,
    check_outcome_rollback,
    failed_gates,
    prometheus_server,
    published_tables,
    router_env,
    router_ready,
    stage_timings,
    start_locust,
    stop_locust,
    wait_for,
)
from tests.routerkit import metric_value
from tests.sockets import connection_refused
from tests.stackkit import ControllerConfig, rolloutctl, start_controller, stop_process
from tests.stackkit import controller_env as kit_controller_env

pytestmark = pytest.mark.integration

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


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("model-home"))


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


@pytest.fixture(scope="module")
def stack(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("rollout-local")
    prometheus = prometheus_server(workdir / "prometheus")
    router = RouterProcess(log_path=workdir / "router.log", admin_token=TOKEN, env=router_env(workdir))
    port = free_port(HOST)
    started = time.monotonic()
    router.start()
    router.wait_live()
    prometheus.start()
    built = Stack(models, workdir, prometheus, router, port, controller_env(models, workdir, prometheus, router, port))
    try:
        serve_traffic(built, started)
        yield built
    finally:
        stop_traffic(built)
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            for pid in built.workloads().values():  # a failed test may leave servers a kill orphaned
                stop_tree(pid, grace_s=10.0, poll_s=0.1)
        router.stop()
        prometheus.stop()
        print(f"\nrollout integration timings: {json.dumps(built.timings)}")


# --------------------------------------------------------------------------------------------------- scenarios


def test_a_good_candidate_is_promoted_through_every_stage(stack: Stack) -> None:
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


def test_revert_puts_every_decision_back_on_the_previous_version(stack: Stack) -> None:
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


def test_a_bad_candidate_is_rolled_back_by_an_outcome_gate(stack: Stack) -> None:
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


def test_prometheus_down_mid_canary_blocks_promotion_then_aborts(stack: Stack) -> None:
    stack.start("v2", "blind-v2")
    stack.at_stage("blind-v2", "canary")
    stack.prometheus.stop()
    stopped = time.monotonic()
    try:
        rollout = stack.finished("blind-v2")
        stack.timings["abort_after_prometheus_stop_s"] = round(time.monotonic() - stopped, 1)
    finally:
        stack.prometheus.start()

    assert rollout.phase == "Aborted", rollout.history[-1].reason
    last = rollout.history[-1]
    assert (last.from_stage, last.to_stage, last.trigger) == ("canary", "canary", "timeout")
    assert "inconclusive beyond the timeout" in last.reason
    assert OFFLINE_MESSAGE in {g.message for g in last.gates}
    wait_for(lambda: stack.routing()["candidate"] is None or None, "the stable-only table", 30)
    assert stack.routing()["stable"]["version"] == "v1"


def test_a_controller_killed_mid_stage_resumes_where_it_was(stack: Stack) -> None:
    stack.start("v2", "resume-v2")
    before = stack.at_stage("resume-v2", "canary")
    servers = stack.workloads()
    stack.stop_controller(signal.SIGKILL)

    assert stack.answer()["model_version"] in ("v1", "v2")  # the data plane does not need the controller
    stack.start_controller()
    restarted = time.monotonic()
    wait_for(lambda: (beat := read_heartbeat(stack.state_dir)) is not None and beat.pid == stack.controller.pid,  # type: ignore[union-attr]
             "the restarted controller's heartbeat", 60)  # fmt: skip
    after = stack.rollout()
    assert after.history[: len(before.history)] == before.history  # nothing lost, nothing redone
    assert next(t.at for t in after.history if t.to_stage == "canary") == before.stage_entered_at
    assert stack.workloads() == servers  # adopted, not started again

    def past_canary() -> Any:
        rollout = stack.rollout()
        return rollout if rollout.stage in ("ab", "full") or rollout.phase != "Progressing" else None

    moved = wait_for(past_canary, "the rollout to move past canary", ROLLOUT_TIMEOUT_S)
    stack.timings["resume_to_next_stage_s"] = round(time.monotonic() - restarted, 1)
    assert moved.phase in ("Progressing", "Promoted"), moved.history[-1].reason
    stages = [(t.from_stage, t.to_stage) for t in moved.history]
    assert stages[:3] == [("quality", "shadow"), ("shadow", "canary"), ("canary", "ab")]

    done = stack.ctl("abort", "--reason", "end of test")
    assert done.returncode in (0, 4), done.stdout + done.stderr  # 4: it finished on its own first
    final = stack.finished("resume-v2")
    transitions = [e for e in read_events(stack.state_dir / EVENTS_FILE)
                   if e["kind"] == "transition" and e["rollout_id"] == "resume-v2"]  # fmt: skip
    assert [e["seq"] for e in transitions] == list(range(len(final.history)))
    tables = published_tables(stack.workdir / "controller.log")
    assert all(a != b for a, b in itertools.pairwise(tables))  # no table sent twice in a row, kill or not


def test_an_identical_candidate_is_promoted(stack: Stack) -> None:
    """Issue 10's A/A test through the real stack: a new version with the stable's model bits (booster and threshold)
    under the demo policy, labels flowing. Every gate compares equal things, so it must be promoted — a rollback
    here is a false rollback."""
    stable = stack.routing()["stable"]["version"]
    candidate = IDENTICAL[stable]
    started = time.monotonic()
    stack.start(candidate, f"same-{stable}")
    rollout = stack.finished(f"same-{stable}")
    stack.timings["identical_promotion_s"] = round(time.monotonic() - started, 1)
    failed = [f"{g.name}: {g.message}" for t in rollout.history for g in failed_gates(t)]
    assert rollout.phase == "Promoted", (rollout.history[-1].reason, failed)
    assert failed == []
    assert [t.to_stage for t in rollout.history][-1] == "full"


@contextlib.contextmanager
def registry_locked(models: Models) -> Iterator[None]:
    """A registry outage: another connection holds an exclusive lock on the registry's SQLite store, so every
    registry call fails with 'database is locked' once SQLite's busy timeout (MLflow's 20 s) has passed."""
    db = sqlite3.connect(models.home / "mlflow.db", isolation_level=None, timeout=60)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


def rolloutctl_async(stack: Stack, *args: str) -> subprocess.Popen[str]:
    """``rolloutctl`` (its console script) running in the background."""
    return subprocess.Popen(
        [str(BIN / "rolloutctl"), "--json", *args], env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_a_registry_outage_fails_a_start_and_the_revert_queued_behind_it_runs(stack: Stack) -> None:
    """Issue 12, point 6, through the real processes: the retraining hand-off's ``start`` arriving during a registry
    outage must not block the on-call's ``revert`` queued behind it, and the failed start exits non-zero with the
    reason (the command line's contract)."""
    rollout = stack.rollout()
    assert rollout.phase == "Promoted", rollout.history[-1].reason  # the identical candidate's, just before
    previous, current = rollout.stable, rollout.candidate
    candidate = "v2" if previous != "v2" else "v1"
    with registry_locked(stack.models):
        start = rolloutctl_async(stack, "start", "--candidate", candidate, "--id", "start-in-outage")
        inbox = CommandInbox(stack.state_dir)
        queued = lambda: any(not isinstance(c, str) and c.id == "start-in-outage" for _, c in inbox.pending())  # noqa: E731
        wait_for(queued, "the start in the inbox", 30)
        revert = rolloutctl_async(stack, "revert", "--id", "revert-behind", "--reason", "on-call reverts")
        start_out, start_err = start.communicate(timeout=120)
        revert_out, revert_err = revert.communicate(timeout=120)

    assert start.returncode == 1, start_out + start_err
    failed = json.loads(start_out)
    assert (failed["kind"], failed["outcome"]) == ("start", "failed")
    assert "the model registry failed" in failed["detail"] and "database is locked" in failed["detail"]
    assert revert.returncode == 0, revert_out + revert_err
    assert json.loads(revert_out)["outcome"] == "applied"
    assert stack.answer()["model_version"] == previous
    table = stack.routing()
    assert (table["stable"]["version"], table["candidate"]) == (previous, None)
    assert stack.rollout().phase == "RolledBack" and stack.rollout().candidate == current
    notes = [e for e in read_events(stack.state_dir / EVENTS_FILE) if e.get("kind") == "note"]
    assert any("command start failed: the model registry failed" in str(e.get("reason")) for e in notes)
    assert stack.state().result_of("start-in-outage").outcome == "failed"  # type: ignore[union-attr]


@contextlib.contextmanager
def killing_each_start(stack: Stack, version: str, *, whole_tree: bool) -> Iterator[list[dict[str, Any]]]:
    """SIGKILL each model server of ``version`` as soon as the controller records one (a crash loop): its whole
    process tree, or only its recorded bentoml main process (its workers, each in a session of its own, are left
    for the controller to find). Yields the records killed."""
    killed: list[dict[str, Any]] = []
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.05):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
                for record in json.loads((stack.state_dir / WORKLOADS_FILE).read_text()):
                    if record["version"] != version or record["pid"] in {k["pid"] for k in killed}:
                        continue
                    pid = int(record["pid"])
                    for target in process_tree(pid, str(record.get("tag", ""))) if whole_tree else {pid}:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(target, signal.SIGKILL)
                    killed.append(record)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


def router_counter(stack: Stack, name: str, **labels: str) -> float:
    """The sum of the router's samples of ``name`` (a counter's ``_total``) whose labels include ``labels``."""
    return metric_value(
        httpx.get(stack.router.control_url + "/metrics", timeout=10, trust_env=False).text, name, **labels
    )


def workload_of(stack: Stack, version: str) -> dict[str, Any]:
    """``version``'s workload as the real ``rolloutctl status --json`` shows it."""
    done = stack.ctl("--json", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    return next(w for w in json.loads(done.stdout)["workloads"] if w["version"] == version)


def test_a_candidate_whose_main_process_is_killed_mid_stage_is_restarted_counted_and_rolled_back(stack: Stack) -> None:
    """Issue 12, point 1: killing only the recorded main pid of the candidate's server left its workers serving the
    old port, and the candidate was promoted. Held in canary (paused) while it decides for its share, its main pid
    is SIGKILLed, then every later start's too (a crash loop that leaves workers behind each time)."""
    stable = stack.routing()["stable"]["version"]
    bound = loads_policy(LOCAL_POLICY_YAML).analysis.max_restarts
    stack.start("v2", "killed-v2")
    stack.at_stage("killed-v2", "canary")
    paused = stack.ctl("pause", "--reason", "hold canary for the kill")
    assert paused.returncode == 0, paused.stdout + paused.stderr

    def measured_ready() -> bool:
        gate = stack.rollout().gates.get("candidate-workload")
        table = stack.routing()
        routed = table["candidate"] is not None and table["candidate"]["version"] == "v2" and table["stage"] == "canary"
        return routed and gate is not None and gate.last is not None and gate.last.status.value == "Successful"

    wait_for(measured_ready, "the canary routed and the candidate's workload judged ready", 60)
    decided = router_counter(stack, "fraudwatch_router_requests_total", model_version="v2", role="decider",
                             stage="canary", outcome="2xx")  # fmt: skip
    wait_for(lambda: router_counter(stack, "fraudwatch_router_requests_total", model_version="v2", role="decider",
                                    stage="canary", outcome="2xx") >= decided + 100,
             "the candidate deciding 100 more canary calls", 120)  # fmt: skip
    before = workload_of(stack, "v2")
    assert (before["role"], before["readiness"]) == ("candidate", "ready")
    [first] = [r for r in json.loads((stack.state_dir / WORKLOADS_FILE).read_text()) if r["version"] == "v2"]
    workers = process_tree(int(first["pid"]), first["tag"]) - {int(first["pid"])}
    assert workers  # BentoML's worker(s), in sessions of their own
    old_url = f"http://{HOST}:{first['port']}"

    with killing_each_start(stack, "v2", whole_tree=False) as killed:
        wait_for(lambda: any(k["pid"] == first["pid"] for k in killed), "the first kill", 10)
        wait_for(lambda: not tagged(first["tag"]) and not any(alive(w) for w in workers),
                 "the killed server's workers stopped", 60)  # fmt: skip
        assert connection_refused(old_url)  # nothing answers on the old port any more
        counted = wait_for(lambda: (w := workload_of(stack, "v2"))["restarts"] > before["restarts"] and w,
                           "the restart in rolloutctl status", 30)  # fmt: skip
        assert counted["role"] == "candidate"
        rollout = stack.finished("killed-v2")

    last = rollout.history[-1]
    assert last.to_phase == "RolledBack", last.reason
    assert "candidate-workload" in last.reason and f"restarted {bound + 1} times" in last.reason, last.reason
    gate = next(g for g in last.gates if g.name == "candidate-workload")
    assert gate.status.value == "Failed" and gate.candidate_value == bound + 1
    assert len(killed) >= bound + 1
    for record in killed:  # no server of any kill left a worker behind
        wait_for(lambda r=record: not tagged(r["tag"]), f"server {record['pid']}'s tree gone", 60)  # type: ignore[misc]
        assert connection_refused(f"http://{HOST}:{record['port']}")
    assert stack.routing()["stable"]["version"] == stable and stack.routing()["candidate"] is None
    assert stack.answer()["model_version"] == stable


def test_a_crash_looping_candidate_is_rolled_back_within_the_bound(stack: Stack) -> None:
    stable = stack.routing()["stable"]["version"]
    policy = loads_policy(LOCAL_POLICY_YAML).analysis
    with killing_each_start(stack, "v2", whole_tree=True) as killed:
        started = time.monotonic()
        stack.start("v2", "crash-v2")
        rollout = stack.finished("crash-v2")
        took = time.monotonic() - started
    stack.timings["crash_loop_rollback_s"] = round(took, 1)
    last = rollout.history[-1]
    assert last.to_phase == "RolledBack", last.reason
    assert "candidate-workload" in last.reason, last.reason
    assert f"restarted {policy.max_restarts + 1} times" in last.reason or "not ready for" in last.reason, last.reason
    assert len(killed) >= policy.max_restarts or took > policy.not_ready_timeout_s, (killed, took)
    assert took <= policy.not_ready_timeout_s + START_TIMEOUT_S  # the bound, plus one quality check and reconcile
    assert stack.routing()["stable"]["version"] == stable and stack.routing()["candidate"] is None
    assert stack.answer()["model_version"] == stable  # the customers never waited on the candidate
    metrics = httpx.get(f"http://{HOST}:{stack.controller_port}/metrics", timeout=10, trust_env=False).text
    assert f'fraudwatch_rollout_workload_ready{{rollout="{NAME}",version="{stable}"}} 1.0' in metrics


def test_prometheus_scrapes_the_controller_and_the_model_servers_it_registered(stack: Stack) -> None:
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


def test_no_shadow_call_fails_across_a_promotion_and_the_old_version_s_scale_down(stack: Stack) -> None:
    """Issue 12, point 3: the previous version was stopped 21 s before the routers stopped shadowing it (1,506 failed
    shadow calls). Across a whole promotion and the end of the old version's warm window no shadow call fails and
    none is dropped; the old version is stopped only once the table without it is in force."""
    stable = stack.routing()["stable"]["version"]
    candidate = IDENTICAL[stable]
    errors = router_counter(stack, "fraudwatch_router_upstream_errors_total", role="shadow")
    drops = router_counter(stack, "fraudwatch_shadow_dropped_total")
    stack.start(candidate, f"handover-{stable}")
    rollout = stack.finished(f"handover-{stable}")
    assert rollout.phase == "Promoted", rollout.history[-1].reason
    assert [e["version"] for e in stack.routing()["shadow"]] == [stable]  # warm, shadowing the new stable
    wait_for(lambda: stable not in stack.workloads(), f"{stable} scaled down after its warm window", WARM_WINDOW_S + 60)
    assert stack.routing()["shadow"] == []
    time.sleep(3.0)  # calls in flight when it stopped have failed by now, if any did
    assert router_counter(stack, "fraudwatch_router_upstream_errors_total", role="shadow") == errors
    assert router_counter(stack, "fraudwatch_shadow_dropped_total") == drops
