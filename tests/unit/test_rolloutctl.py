"""rolloutctl / kubectl-modelrollout: argument parsing, exit codes, and the commands against a running controller.

The controller here is the real reconcile loop (rollout.controller.loop.Controller.run in a thread) on the in-memory
world of tests/unit/test_controller.py (pure-logic doubles of processes, routers and the registry); the CLI is the
real one, called in-process, talking to it only through the state directory.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollout.backends.local.inbox import CommandInbox
from rollout.backends.local.state import StateStore
from rollout.cli.errors import ExitCode
from rollout.cli.main import build_parser, kubectl_main, main
from rollout.core.evidence import gate_evidence
from tests.unit.test_controller import POLICY_YAML, SETTINGS, V1, V2, Harness

NAME = SETTINGS.name


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__POLICY_FILE", str(policy))
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__NAME", NAME)
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__COMMAND_WAIT_TIMEOUT_S", "10")
    monkeypatch.setenv("COLUMNS", "200")  # rich: one line per table row


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def running(state_dir: Path) -> Iterator[Harness]:
    """A controller loop serving the state directory (in-memory world), stopped after the test."""
    harness = Harness(state_dir)
    stop = threading.Event()
    thread = threading.Thread(target=harness.controller.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield harness
    finally:
        stop.set()
        thread.join(timeout=10)


def ctl(state_dir: Path, *args: str) -> int:
    return main(["--state-dir", str(state_dir), *args])


def measured(state_dir: Path) -> bool:
    """True once the saved state holds a measurement of the current stage (what the CLI reads)."""
    saved = StateStore(state_dir).load()
    return saved is not None and saved.rollout is not None and bool(saved.rollout.gates)


def json_out(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("entry", [main, kubectl_main])
def test_help_exits_zero_and_lists_every_command(entry: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert entry(["--help"]) == ExitCode.OK
    out = capsys.readouterr().out
    for command in ("start", "status", "promote", "pause", "resume", "abort", "revert", "history", "exit codes"):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["start"],  # --candidate is required
        ["promote", "--to", "nowhere"],
        ["history", "--limit", "0"],
        ["revert", "--timeout", "-1"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], state_dir: Path) -> None:
    assert ctl(state_dir, *argv) == ExitCode.USAGE


def test_the_kubectl_plugin_takes_the_rollout_name() -> None:
    args = build_parser(plugin=True).parse_args(["promote", "fraudwatch", "--to", "ab"])
    assert (args.command, args.name, args.to) == ("promote", "fraudwatch", "ab")
    with pytest.raises(SystemExit):
        build_parser(plugin=True).parse_args(["status"])


# --------------------------------------------------------------------------------------------------- exit codes


def test_status_without_a_rollout_exits_not_found(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(state_dir, "--json", "status") == ExitCode.NOT_FOUND
    assert json_out(capsys) == {"rollout": None, "controller": {"running": False}, "workloads": []}


def test_a_command_without_a_rollout_is_not_queued(state_dir: Path) -> None:
    assert ctl(state_dir, "promote") == ExitCode.NOT_FOUND
    assert not CommandInbox(state_dir).has_pending()


def test_the_kube_backend_without_a_kubeconfig_is_unavailable(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing.kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert ctl(state_dir, "--backend", "kube", "status") == ExitCode.UNAVAILABLE
    assert kubectl_main(["status", NAME]) == ExitCode.UNAVAILABLE  # the plugin's default backend is kube
    assert "no usable Kubernetes configuration" in capsys.readouterr().err


def test_the_plugin_takes_kubectl_style_namespace_flags() -> None:
    before = build_parser(plugin=True).parse_args(["-n", "fraud", "revert", "fw"])
    after = build_parser(plugin=True).parse_args(["revert", "fw", "-n", "fraud"])
    assert before.namespace == after.namespace == "fraud"
    assert build_parser(plugin=True).parse_args(["status", "fw"]).namespace is None


def test_no_controller_means_timeout_and_the_command_is_withdrawn(state_dir: Path) -> None:
    assert ctl(state_dir, "start", "--candidate", V2, "--timeout", "0.3") == ExitCode.TIMEOUT
    assert not CommandInbox(state_dir).has_pending()


def test_no_wait_only_queues(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(state_dir, "--json", "start", "--candidate", V2, "--no-wait", "--id", "r-queued") == ExitCode.OK
    assert json_out(capsys)["outcome"] == "queued"
    [(_, command)] = CommandInbox(state_dir).pending()
    assert not isinstance(command, str)
    assert (command.id, command.kind, command.candidate) == ("r-queued", "start", V2)


# --------------------------------------------------------------------------------------------------- with a controller


def test_start_status_pause_and_history_against_a_running_controller(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "--json", "start", "--candidate", V2, "--reason", "unit") == ExitCode.OK
    started = json_out(capsys)
    assert started["outcome"] == "applied"
    assert started["detail"].endswith(f"{V1} → {V2}")

    assert ctl(state_dir, "--json", "start", "--candidate", V2) == ExitCode.REFUSED
    assert "in progress" in json_out(capsys)["detail"]
    assert ctl(state_dir, "resume") == ExitCode.REFUSED  # not paused
    capsys.readouterr()

    assert ctl(state_dir, "pause") == ExitCode.OK
    assert "applied" in capsys.readouterr().out
    assert ctl(state_dir, "--json", "status") == ExitCode.OK
    status = json_out(capsys)
    rollout = status["rollout"]
    assert (rollout["stable"], rollout["candidate"], rollout["paused"]) == (V1, V2, True)
    assert sum(rollout["weights"].values()) == 100
    assert status["controller"] == {"running": False}  # the loop in this test writes no heartbeat
    gates = {g["name"]: g for g in status["gates"]}
    assert rollout["stage"] == "shadow"  # the quality stage passed at once; the test's clock stands still
    assert set(gates) == {"min-requests", "errors"}

    assert ctl(state_dir, "--json", "history") == ExitCode.OK
    events = json_out(capsys)
    assert any(e["kind"] == "transition" and e["command_id"] for e in events)
    assert events[0]["kind"] == "note" and "started" in events[0]["reason"]


def test_status_shows_every_gate_with_value_threshold_and_verdict(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    assert ctl(state_dir, "promote", "--to", "canary") == ExitCode.OK
    assert ctl(state_dir, "pause") == ExitCode.OK  # measured, never promoted, while the test looks
    deadline = 200
    while deadline and not measured(state_dir):
        deadline -= 1
        running.clock.advance(1.0)
        threading.Event().wait(0.05)
    capsys.readouterr()
    assert ctl(state_dir, "--json", "status") == ExitCode.OK
    gates = {g["name"]: g for g in json_out(capsys)["gates"]}
    assert gates["errors"]["verdict"] == "Successful"
    assert gates["errors"]["threshold"] == 0.01
    assert gates["errors"]["candidate"] == 0.0
    assert gates["errors"]["condition"] == "value <= 0.01"

    assert ctl(state_dir, "status") == ExitCode.OK
    table = capsys.readouterr().out
    for text in ("canary", "errors", "Successful", "0.01", "v1 95 %", "v2 5 %", "time in stage"):
        assert text in table


def test_status_shows_each_running_version_s_readiness_and_restarts_before_any_analysis(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12: restarts were visible only in the candidate-workload gate's row, once a report existed; a crash
    loop's restarts show from the first restart, while no gate has been measured (routing waits for the candidate)."""
    harness = Harness(state_dir)
    harness.workloads.crashing.add(V2)
    harness.tick(n=2)
    assert ctl(state_dir, "--json", "status") == ExitCode.NOT_FOUND  # no rollout yet: the serving version shows
    assert [(w["version"], w["role"], w["readiness"]) for w in json_out(capsys)["workloads"]] == [
        (V1, "serving", "ready")
    ]
    harness.command("start", candidate=V2, id="r1")
    harness.tick(n=3)
    assert harness.phase() == "Progressing" and not harness.rollout.gates  # nothing measured yet

    assert ctl(state_dir, "--json", "status") == ExitCode.OK
    view = json_out(capsys)
    assert {g["verdict"] for g in view["gates"]} == {"not measured"}
    workloads = {w["version"]: w for w in view["workloads"]}
    assert (workloads[V1]["role"], workloads[V1]["readiness"], workloads[V1]["restarts"]) == ("stable", "ready", 0)
    candidate = workloads[V2]
    assert (candidate["role"], candidate["readiness"], candidate["detail"]) == ("candidate", "failed", "process exited")
    assert candidate["restarts"] == harness.workloads.restarts[V2] >= 2

    assert ctl(state_dir, "status") == ExitCode.OK
    out = capsys.readouterr().out
    assert f"{V1} (stable) ready, 0 restarts" in out
    assert f"{V2} (candidate) failed (process exited), {candidate['restarts']} restarts" in out


def test_revert_and_the_kubectl_plugin(running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    assert kubectl_main(["--state-dir", str(state_dir), "status", "someone-else"]) == ExitCode.NOT_FOUND
    assert kubectl_main(["--state-dir", str(state_dir), "revert", NAME, "--reason", "drill"]) == ExitCode.OK
    assert running.controller.state.rollout is not None
    assert running.controller.state.rollout.phase == "RolledBack"
    assert "manual revert: drill" in running.controller.state.rollout.history[-1].reason
    assert ctl(state_dir, "abort") == ExitCode.REFUSED  # already rolled back
    capsys.readouterr()


def test_status_of_a_rolled_back_rollout_shows_the_gate_that_ended_it(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = Harness(state_dir)
    harness.metrics_values.values['tp{model_version="v2"}'] = 200.0  # recall 0.2 against 0.9
    harness.tick(n=2)
    harness.command("start", candidate=V2, id="r1")
    harness.run_until(lambda: harness.phase() == "RolledBack")

    assert ctl(state_dir, "--json", "status") == ExitCode.OK
    view = json_out(capsys)
    assert (view["rollout"]["phase"], view["rollout"]["stage"]) == ("RolledBack", "ab")
    assert view["rollout"]["weights"] == {V1: 100, V2: 0}
    recall = next(g for g in view["gates"] if g["name"] == "recall")
    assert recall["verdict"] == "Failed"
    assert recall["candidate"] == pytest.approx(0.2)
    assert recall["stable"] == pytest.approx(0.9)
    assert recall["bound"] is not None and recall["bound"] < 0.9 - 0.2


def test_status_shows_each_gate_s_evidence_estimate_interval_samples_and_what_it_still_needs(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = Harness(state_dir)
    harness.metrics_values.values['tp{model_version="v2"}'] = 200.0  # recall 0.2 against 0.9
    harness.tick(n=2)
    harness.command("start", candidate=V2, id="r1")
    harness.run_until(lambda: harness.phase() == "RolledBack")

    assert ctl(state_dir, "--json", "status") == ExitCode.OK
    recall = next(g for g in json_out(capsys)["gates"] if g["name"] == "recall")
    assert recall["unit"] == "fraud labels"
    assert recall["samples"] is not None and recall["samples"] > 0
    assert "fraud labels" in recall["evidence"]
    assert ctl(state_dir, "status") == ExitCode.OK
    table = capsys.readouterr().out
    assert "evidence" in table and "fraud labels" in table


@pytest.mark.parametrize(
    ("result", "text"),
    [
        (
            {"name": "recall", "layer": "outcome", "status": "Inconclusive", "stable_value": 0.8, "estimate": -0.0214,
             "interval": [-0.0642, 0.0191], "samples": 412, "samples_needed": 179.2, "method": "sprt-paired"},
            "Δ -0.021 [-0.064, +0.019] · 412 fraud labels · needs about 180 more fraud labels · sprt-paired",
        ),
        (
            {"name": "precision", "layer": "outcome", "status": "Failed", "stable_value": 0.6, "estimate": -0.2,
             "interval": [-0.3, -0.1], "samples": 90, "samples_needed": None, "method": "sprt-two-sample"},
            "Δ -0.200 [-0.300, -0.100] · 90 flagged labels · decided · sprt-two-sample",
        ),
        (
            {"name": "error-rate", "layer": "health", "status": "Successful", "estimate": 0.001,
             "interval": [0.0, 0.004], "samples": 12353, "method": "cs-binomial"},
            "0.001 [0.000, 0.004] · 12,353 requests · decided · cs-binomial",
        ),
        ({"name": "latency", "layer": "health", "status": "Inconclusive"}, ""),
    ],
)  # fmt: skip
def test_gate_evidence_reads_as_a_sentence(result: dict[str, Any], text: str) -> None:
    assert gate_evidence(result)["evidence"] == text
