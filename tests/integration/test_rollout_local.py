"""The rollout controller on the local backend, end to end, with every component real.

Real processes on 127.0.0.1: the controller (``python -m rollout.controller``), the ``bentoml serve`` model servers
it starts (bundles fetched from an MLflow registry on SQLite), the router (admin endpoint), Prometheus (scraping
the router, the model servers the controller registers through file SD, and the controller; evaluating
deploy/prometheus/rules.yml every second), locust (its CLI, refund traffic plus delayed fraud labels) and
``rolloutctl`` (its console script). The policy is the default policy's shape, time-compressed: stages of a few
seconds, analysis every second (the demo's policy, rollout/demo_policy.yaml, with its stage minimums scaled down).

One trained set per module: v1 and v2 (XGBoost, different tree counts) and v3 — v2's booster with its decision
threshold raised so that it misses most fraud: its score distribution is v2's exactly (no drift gate can see it)
and its ranking is v2's (the regression set's PR-AUC floor passes); only the outcome gates (recall) can catch it.

Scenarios, in order (each leaves the stack as the next expects it):

1. v1 → v2 is promoted through quality, shadow, canary, A/B and full; aliases move; v1 stays warm in shadow.
2. ``rolloutctl revert`` puts every decision back on v1.
3. v1 → v3 is rolled back by an outcome gate in A/B or full.
4. v1 → v2 with Prometheus stopped mid-canary: no promotion, then aborted after the inconclusive timeout.
5. v1 → v2 with the controller SIGKILLed mid-stage and restarted: same stage and stage clock, the same model
   servers (adopted, not restarted), the rollout carries on; the event log has every transition exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rollout.backends.local import WORKLOADS_FILE, stop_group
from rollout.controller import OFFLINE_MESSAGE
from rollout.demo_policy import load_demo_policy
from rollout.events import read_events
from rollout.inbox import EVENTS_FILE, read_heartbeat
from rollout.outcome_settings import OutcomeSettings, PrometheusSettings
from rollout.policy import dump_policy
from rollout.prometheus import PrometheusClient, PrometheusServer, free_port
from rollout.router_process import RouterProcess
from rollout.state import ControllerState, StateStore
from service.datasets.synthetic import SyntheticConfig, generate
from service.evaluate import file_sha256
from service.model import MANIFEST_FILE, load_bundle
from service.registry import ModelRegistry, RunPayload
from service.settings import Settings
from tests.stackkit import (
    ControllerConfig,
    rolloutctl,
    router_ready,
    serving_features,
    start_controller,
    stop_process,
    train_bundle,
    wait_for,
)
from tests.stackkit import controller_env as kit_controller_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
TOKEN = "rollout-integration-token"
NAME = "it"

#: The traffic locust replays is the history the models were trained on, and they were trained on the features
#: serving computes for it (the feature store's latest aggregates), so a good model's served distributions match
#: its training reference and the drift gates see only sampling noise.
STREAM = SyntheticConfig(n_requests=20_000, seed=7, fraud_rate=0.1)
REGRESSION_SET = SyntheticConfig(n_requests=4_000, n_accounts=3_000, seed=99, fraud_rate=0.1)
TREES = {"v1": 40, "v2": 60}
#: v3 catches only this share of the stream's fraud (v2 catches ~95 %).
BAD_RECALL = 0.65
LOAD_ENV = {
    "FW_LOAD_ROWS": str(STREAM.n_requests),
    "FW_LOAD_SEED": str(STREAM.seed),
    "FW_LOAD_FRAUD_RATE": str(STREAM.fraud_rate),
    "FW_LOAD_LABEL_SECONDS_PER_HOUR": "0.001",
    "FW_LOAD_WAIT_MIN": "0.02",
    "FW_LOAD_WAIT_MAX": "0.05",
    "FW_LOAD_LABEL_USERS": "3",
}
LOCUST_USERS = 7
START_TIMEOUT_S = 180.0
ROLLOUT_TIMEOUT_S = 240.0
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"

#: The demo's policy (rollout/demo_policy.yaml: the default policy's gates, time-compressed, with an evidence
#: minimum in every metric gate's query; the file says where it differs from the default and why), its stage
#: minimums scaled down to 3 s: the stages then last as long as their evidence takes.
STAGE_SCALE = 0.15


# --------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Models:
    home: Path
    settings: Settings
    numbers: dict[str, str]  # version name → registry version number
    regression_meta: Path


def with_threshold(source: Path, directory: Path, version: str, recall: float) -> None:
    """A copy of a bundle under another version name whose threshold flags only ``recall`` of the stream's fraud
    (the booster, so every score, unchanged)."""
    shutil.copytree(source, directory)
    model = load_bundle(directory)
    ordered, _, features = serving_features(generate(STREAM))
    fraud_scores = model.scores(features)[ordered["is_fraud"].to_numpy() == 1]
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    manifest["threshold"]["threshold"] = float(np.quantile(fraud_scores, 1.0 - recall))
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_regression_set(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "regression.csv.gz"
    generate(REGRESSION_SET).to_csv(data, index=False)
    meta = directory / "regression.json"
    meta.write_text(json.dumps({"file": data.name, "sha256": file_sha256(data)}))
    return meta


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    home = tmp_path_factory.mktemp("model-home")
    settings = Settings.model_validate({"home": home})
    bundles = home / "bundles"
    history = generate(STREAM)
    for version, trees in TREES.items():
        train_bundle(bundles / version, version, history, trees, STREAM.fraud_rate)
    with_threshold(bundles / "v2", bundles / "v3", "v3", BAD_RECALL)
    registry = ModelRegistry(settings)
    numbers = {}
    for version in ("v1", "v2", "v3"):
        run = registry.log_run(RunPayload(run_name=f"train-{version}", bundle_dir=bundles / version))
        numbers[version] = registry.register(run).version
    registry.promote(settings.registered_model_name, numbers["v1"], "integration baseline")
    return Models(home, settings, numbers, write_regression_set(home / "regression"))


# --------------------------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    models: Models
    workdir: Path
    prometheus: PrometheusServer
    router: RouterProcess
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
            self.router.url + "/admin/routing",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
            trust_env=False,
        )
        response.raise_for_status()
        table: dict[str, Any] = response.json()["table"]
        return table

    def answer(self) -> dict[str, Any]:
        response = httpx.post(
            self.router.url + "/api/v1/refund-predict",
            json={"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2, "accountId": f"probe-{time.monotonic_ns()}"},
            timeout=10,
            trust_env=False,
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def aliases_if(self, **expected: str | None) -> dict[str, str] | None:
        """The registry's aliases when each named alias points at the given version name (None: absent)."""
        settings = self.models.settings
        aliases = ModelRegistry(settings).aliases(settings.registered_model_name)
        for alias, version in expected.items():
            wanted = self.models.numbers[version] if version is not None else None
            if aliases.get(alias) != wanted:
                return None
        return aliases

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
    models: Models, workdir: Path, prometheus: PrometheusServer, router: RouterProcess, port: int
) -> dict[str, str]:
    policy = workdir / "policy.yaml"
    dump_policy(load_demo_policy(STAGE_SCALE), policy)
    config = ControllerConfig(
        name=NAME, model_home=models.home, workdir=workdir, prometheus_url=prometheus.url, router_url=router.url,
        metrics_port=port, policy_yaml=policy.read_text(), admin_token=TOKEN, quality_set=models.regression_meta,
        start_timeout_s=START_TIMEOUT_S,
    )  # fmt: skip
    return kit_controller_env(config)


@pytest.fixture(scope="module")
def stack(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("rollout-local")
    prometheus = PrometheusServer(
        workdir / "prometheus",
        rule_files=[RULES],
        settings=PrometheusSettings(scrape_interval_s=1.0, evaluation_interval_s=1.0, ready_timeout_s=60.0),
    )
    router = RouterProcess(
        log_path=workdir / "router.log",
        admin_token=TOKEN,
        env={
            DSN_ENV: f"sqlite:///{workdir / 'predictions.db'}",
            "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
            "FW_ROLLOUT_ROUTER__CANDIDATE_TIMEOUT_S": "2.0",
            "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": "4.0",
            "FW_ROLLOUT_ROUTER__SHADOW_TIMEOUT_S": "2.0",
        },
    )
    port = free_port(HOST)
    started = time.monotonic()
    router.start()
    router.wait_live()
    prometheus.start()
    built = Stack(models, workdir, prometheus, router, port, controller_env(models, workdir, prometheus, router, port))
    try:
        built.start_controller()
        wait_for(
            lambda: built.answer() if router_ready(router) else None, "the champion behind the router", START_TIMEOUT_S
        )
        built.locust = subprocess.Popen(
            [str(BIN / "locust"), "-f", "loadtests/locustfile.py", "--headless", "-u", str(LOCUST_USERS), "-r",
             str(LOCUST_USERS), "-t", "1800s", "--host", router.url, "--only-summary", "--loglevel", "WARNING"],
            cwd=ROOT, env={**os.environ, **LOAD_ENV}, stdout=(workdir / "locust.log").open("ab"),
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        built.timings["stack_ready_s"] = round(time.monotonic() - started, 1)
        yield built
    finally:
        if built.locust is not None:
            built.locust.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                built.locust.wait(timeout=30)
            if built.locust.poll() is None:
                built.locust.kill()
        built.stop_controller()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            for pid in built.workloads().values():  # a failed test may leave servers a kill orphaned
                stop_group(pid, grace_s=10.0, poll_s=0.1)
        router.stop()
        prometheus.stop()
        print(f"\nrollout integration timings: {json.dumps(built.timings)}")


def stage_timings(rollout: Any) -> dict[str, float]:
    """Seconds spent in each stage, from the transitions."""
    times: dict[str, float] = {}
    history = rollout.history
    for before, after in itertools.pairwise(history):
        times[before.to_stage] = round((after.at - before.at).total_seconds(), 2)
    return times


def failed_gates(transition: Any) -> list[Any]:
    return [g for g in transition.gates if g.status.value == "Failed"]


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
    recall = next(g for g in ab_exit.gates if g.name == "recall")
    assert recall.status.value == "Successful" and recall.labels is not None and recall.labels >= 100

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

    assert rollout.phase == "RolledBack", rollout.history[-1].reason
    last = rollout.history[-1]
    assert last.trigger == "analysis"
    assert last.from_stage in ("ab", "full")
    failed = failed_gates(last)
    assert failed and {g.layer for g in failed} == {"outcome"}
    assert "recall" in {g.name for g in failed}
    # every health and drift gate passed on the way: the bad candidate looked normal until labels arrived
    passed = {g.name for t in rollout.history[:-1] for g in t.gates if g.status.value == "Successful"}
    assert {
        "error-rate",
        "latency-p99",
        "input-psi-max",
        "score-psi",
        "decision-rate-shift",
        "shadow-agreement",
    } <= passed

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


def published_tables(log: Path) -> list[tuple[Any, ...]]:
    """The tables the controller sent to the router, in order (from its JSON log, across restarts)."""
    tables = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "routing_published":
                keys = ("stage", "stable", "candidate", "candidate_weight", "shadow")
                tables.append(tuple(json.dumps(event.get(k)) for k in keys))
    return tables


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
