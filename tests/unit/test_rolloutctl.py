"""rolloutctl / kubectl-modelrollout: argument parsing, exit codes, and the commands against a running controller.

The controller here is the real reconcile loop (rollout.controller.loop.Controller.run in a thread) on the in-memory
world of tests/kits/doubles.py (pure-logic doubles of processes, routers and the registry); the CLI is the
real one, called in-process, talking to it only through the state directory.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.backends.local.inbox import CommandInbox
from rollout.backends.local.state import StateStore
from rollout.cli.errors import ExitCode
from rollout.cli.main import build_parser, kubectl_main, main
from rollout.core.evidence import gate_evidence
from tests.kits.doubles import POLICY_YAML, SETTINGS, V1, V2, Harness

NAME = SETTINGS.name


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__POLICY_FILE", str(policy))
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__NAME", NAME)
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__COMMAND_WAIT_TIMEOUT_S", "10")
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__WATCH_INTERVAL_S", "0.02")
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
    assert json_out(capsys) == {
        "rollout": None, "controller": {"running": False}, "workloads": [], "health": "NoRollout"
    }  # fmt: skip


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

    assert ctl(state_dir, "--json", "status") == ExitCode.ROLLED_BACK
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

    assert ctl(state_dir, "--json", "status") == ExitCode.ROLLED_BACK
    recall = next(g for g in json_out(capsys)["gates"] if g["name"] == "recall")
    assert recall["unit"] == "fraud labels"
    assert recall["samples"] is not None and recall["samples"] > 0
    assert "fraud labels" in recall["evidence"]
    assert ctl(state_dir, "status") == ExitCode.ROLLED_BACK
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


# --------------------------------------------------------------------------------------------------- status --watch


def watching(running: Harness, state_dir: Path, *args: str, step_s: float = 1.0) -> int:
    """``status --watch ARGS`` in a thread while this one moves the controller's clock on; its exit code."""
    code: list[int] = []
    watcher = threading.Thread(target=lambda: code.append(ctl(state_dir, *args)), daemon=True)
    watcher.start()
    for _ in range(2000):
        watcher.join(0.02)
        if not watcher.is_alive():
            break
        running.clock.advance(step_s)
    assert code, "status --watch did not return"
    return code[0]


def test_status_watch_waits_until_promoted_and_exits_0(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    capsys.readouterr()
    assert watching(running, state_dir, "status", "--watch", "--timeout", "1m") == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{NAME}: Progressing · shadow")
    assert any(" · canary · v1 95 % · v2 5 %" in line for line in lines)
    assert lines[-1].startswith(f"{NAME}: Healthy · full · v1 0 % · v2 100 % — every gate of full passed")
    assert len(lines) == len(set(lines))  # one line per change, not per poll


def test_status_watch_exits_7_when_a_gate_rolls_the_candidate_back(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running.metrics_values.values['tp{model_version="v2"}'] = 200.0  # recall 0.2 against 0.9
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    capsys.readouterr()
    assert watching(running, state_dir, "status", "-w", "-o", "yaml") == ExitCode.ROLLED_BACK
    final = yaml.safe_load(capsys.readouterr().out)  # -o: the final view only, one document
    assert (final["health"], final["rollout"]["phase"], final["rollout"]["stage"]) == ("RolledBack", "RolledBack", "ab")
    assert "recall" in final["rollout"]["last_transition"]["reason"]
    assert ctl(state_dir, "status") == ExitCode.ROLLED_BACK  # the one-shot status says the same


def test_status_watch_exits_8_on_abort_and_5_when_the_timeout_runs_out(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    assert ctl(state_dir, "pause") == ExitCode.OK  # held: it cannot end by itself
    capsys.readouterr()
    assert ctl(state_dir, "status", "--watch", "--timeout", "300ms") == ExitCode.TIMEOUT
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{NAME}: Paused · shadow · v1 100 % · v2 0 %"]
    assert "had not ended after 0.3 s: Paused" in captured.err
    assert ctl(state_dir, "status") == ExitCode.OK  # in progress: the one-shot status is 0

    aborted: list[int] = []
    watcher = threading.Thread(target=lambda: aborted.append(ctl(state_dir, "--json", "status", "--watch")))
    watcher.start()
    assert ctl(state_dir, "abort", "--reason", "unit") == ExitCode.OK
    watcher.join(10)
    assert aborted == [ExitCode.ABORTED]


def test_status_watch_waits_for_a_queued_start_instead_of_reporting_no_rollout(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipeline that queues ``start --no-wait`` and then watches must not read the state before the controller
    took the command (no rollout yet: exit 3 at once): the controller here starts only after the watch began."""
    assert ctl(state_dir, "start", "--candidate", V2, "--no-wait") == ExitCode.OK
    capsys.readouterr()
    code: list[int] = []
    watcher = threading.Thread(target=lambda: code.append(ctl(state_dir, "status", "--watch", "--timeout", "1m")))
    watcher.start()
    watcher.join(0.5)
    assert watcher.is_alive() and not code
    harness = Harness(state_dir)
    stop = threading.Event()
    controller = threading.Thread(target=harness.controller.run, args=(stop,), daemon=True)
    controller.start()
    try:
        for _ in range(2000):
            watcher.join(0.02)
            if not watcher.is_alive():
                break
            harness.clock.advance(1.0)
    finally:
        stop.set()
        controller.join(timeout=10)
    assert code == [ExitCode.OK]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{NAME}: waiting for the controller"
    assert lines[-1].startswith(f"{NAME}: Healthy · full")


def test_status_is_degraded_when_the_promoted_version_s_workload_fails(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = Harness(state_dir)
    harness.tick(n=2)
    harness.command("start", candidate=V2, id="r1")
    harness.run_until(lambda: harness.phase() == "Promoted")
    assert ctl(state_dir, "status", "--watch") == ExitCode.OK
    assert capsys.readouterr().out.startswith(f"{NAME}: Healthy · full")
    harness.workloads.crashing.add(V2)
    harness.tick(n=3)
    assert ctl(state_dir, "--json", "status", "--watch", "--timeout", "5s") == ExitCode.DEGRADED
    view = json_out(capsys)
    assert view["health"] == "Degraded"
    assert {w["version"]: w["readiness"] for w in view["workloads"]}[V2] == "failed"


# --------------------------------------------------------------------------------------------------- list, get -w


def test_list_shows_the_local_rollout(running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(state_dir, "list") == ExitCode.OK
    assert "No rollouts found." in capsys.readouterr().out
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    capsys.readouterr()
    assert ctl(state_dir, "list", "-o", "json") == ExitCode.OK
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["phase"], row["stable"], row["candidate"]) == (NAME, "Progressing", V1, V2)
    assert ctl(state_dir, "list") == ExitCode.OK
    table = capsys.readouterr().out
    for text in ("NAME", "PHASE", NAME, "Progressing", V1, V2):
        assert text in table


def test_get_watch_prints_a_view_per_change_until_the_timeout(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "start", "--candidate", V2) == ExitCode.OK
    capsys.readouterr()
    assert watching(running, state_dir, "get", "-w", "--timeout", "2s", "-o", "json", step_s=0.5) == ExitCode.OK
    views = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # one JSON document a line
    stages = [v["rollout"]["stage"] for v in views]
    assert stages[0] == "shadow" and "canary" in stages and len(views) >= 3
    assert all(a != b for a, b in itertools.pairwise(views))  # only changes
    assert ctl(state_dir, "get", "-o", "yaml") == ExitCode.OK  # get is a viewer: 0 whatever the phase
    assert yaml.safe_load(capsys.readouterr().out)["rollout"]["candidate"] == V2


def test_the_timeout_takes_kubernetes_durations() -> None:
    parser = build_parser(plugin=False)
    assert parser.parse_args(["status", "-w", "--timeout", "1h30m"]).timeout == 5400.0
    assert parser.parse_args(["revert", "--timeout", "2.5"]).timeout == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--timeout", "10 minutes"])


# --------------------------------------------------------------------------------------------------- completion

BIN = Path(sys.executable).parent


def bash_complete(*words: str) -> list[str]:
    """What real bash offers after ``rolloutctl WORDS`` (the last word being typed), with the script that
    ``rolloutctl completion bash`` prints sourced (its function calls the installed ``rolloutctl``)."""
    typed = " ".join(shlex.quote(w) for w in ("rolloutctl", *words))
    script = (f"source <(rolloutctl completion bash) && COMP_WORDS=({typed}) && COMP_CWORD={len(words)} && "
              "_rolloutctl_complete && printf '%s\\n' \"${COMPREPLY[@]}\"")  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=True)
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completion_offers_commands_options_choices_and_the_rollout_name() -> None:
    assert bash_complete("st") == ["start", "status"]
    assert {"--watch", "--timeout", "--output"} <= set(bash_complete("status", "--"))
    assert bash_complete("status", "-o", "") == ["json", "yaml"]
    assert bash_complete("promote", "--to", "") == ["shadow", "canary", "ab", "full"]
    assert bash_complete("completion", "") == ["bash", "zsh"]
    assert bash_complete("--backend", "local", "status", "--watch", "") == []  # rolloutctl takes no NAME


def test_the_completion_scripts_name_their_program(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == ExitCode.OK
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef rolloutctl\n") and "bashcompinit" in zsh
    assert kubectl_main(["completion", "bash"]) == ExitCode.OK
    assert "complete -F _kubectl_modelrollout_complete kubectl-modelrollout" in capsys.readouterr().out


def test_the_plugin_completes_the_local_rollout_s_name(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kubectl_main(["__complete", "--state-dir", str(state_dir), "revert", ""]) == ExitCode.OK
    assert capsys.readouterr().out.splitlines() == [NAME, ":4"]


# --------------------------------------------------------------------------------------------------- retry


def test_retry_rolls_the_rolled_back_candidate_out_again(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "retry") == ExitCode.NOT_FOUND  # no rollout yet
    running.metrics_values.values['tp{model_version="v2"}'] = 200.0  # recall 0.2 against 0.9
    assert ctl(state_dir, "start", "--candidate", V2, "--id", "first") == ExitCode.OK
    assert watching(running, state_dir, "status", "--watch") == ExitCode.ROLLED_BACK
    capsys.readouterr()

    running.metrics_values.values['tp{model_version="v2"}'] = 900.0  # the fixed upstream: recall as the stable's
    assert ctl(state_dir, "--json", "retry", "--id", "again", "--reason", "labels fixed") == ExitCode.OK
    assert json_out(capsys)["detail"] == f"rollout again: {V1} → {V2}"
    rollout = running.controller.state.rollout
    assert rollout is not None
    assert (rollout.rollout_id, rollout.phase, rollout.stable, rollout.candidate) == ("again", "Progressing", V1, V2)
    assert ctl(state_dir, "retry") == ExitCode.REFUSED  # in progress: nothing to retry
    assert watching(running, state_dir, "status", "--watch") == ExitCode.OK  # promoted this time
    capsys.readouterr()
    assert ctl(state_dir, "--json", "retry") == ExitCode.REFUSED
    assert json_out(capsys)["detail"] == "nothing to retry: the rollout is Promoted"


def test_undo_to_revision_reverts_to_the_previous_starts_an_older_one_and_names_what_it_cannot(
    running: Harness, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(state_dir, "undo", "--to-revision", "1") == ExitCode.NOT_FOUND  # no revision recorded yet
    running.registry.digests.update({V1: "1a" * 32, V2: "2b" * 32})  # the registry's bundle digests
    assert ctl(state_dir, "start", "--candidate", V2, "--id", "first") == ExitCode.OK
    assert watching(running, state_dir, "status", "--watch") == ExitCode.OK  # promoted
    capsys.readouterr()
    saved = StateStore(state_dir).load()
    assert saved is not None
    assert [(r.number, r.version, r.rollout_id) for r in saved.revisions] == [(1, V1, None), (2, V2, "first")]
    assert saved.rollout is not None and saved.revisions[1].since == saved.rollout.finished_at

    assert ctl(state_dir, "status", "-o", "json") == ExitCode.OK
    shown = [(r["number"], r["version"], r["digest"]) for r in json_out(capsys)["revisions"]]
    assert shown == [(1, V1, "1a" * 32), (2, V2, "2b" * 32)]
    assert ctl(state_dir, "status") == ExitCode.OK
    assert f"revisions  1 {V1} (sha256:{'1a' * 6}) · 2 {V2} (sha256:{'2b' * 6})" in capsys.readouterr().out
    assert ctl(state_dir, "undo", "--to-revision", "2") == ExitCode.REFUSED  # the serving one
    assert "revision 2 (v2) is the serving version" in capsys.readouterr().err
    assert ctl(state_dir, "undo", "--to-revision", "9") == ExitCode.NOT_FOUND
    assert "revision 9 is no longer in the history (kept: 1-2)" in capsys.readouterr().err

    # the previous revision, warm: a revert (v1's name re-registered meanwhile: revision 3 shows the new bundle)
    running.registry.digests[V1] = "3c" * 32
    assert ctl(state_dir, "--json", "undo", "--to-revision", "1", "--reason", "drill") == ExitCode.OK
    assert json_out(capsys)["kind"] == "revert"
    rollout = running.controller.state.rollout
    assert rollout is not None and rollout.phase == "RolledBack"
    revisions = running.controller.state.revisions
    assert [(r.number, r.version) for r in revisions] == [(1, V1), (2, V2), (3, V1)]
    assert revisions[0].digest != revisions[2].digest == "3c" * 32  # two revisions of v1 told apart
    assert ctl(state_dir, "list", "-o", "json") == ExitCode.OK
    [row] = json.loads(capsys.readouterr().out)
    assert (row["revision"], row["digest"]) == (3, "3c" * 32)
    assert ctl(state_dir, "list") == ExitCode.OK
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[-2:] == ["REVISION", "DIGEST"] and listed[1].split()[-2:] == ["3", f"sha256:{'3c' * 6}"]

    # an older revision than the previous one: rolled out again, through the gates
    assert ctl(state_dir, "--json", "undo", "--to-revision", "2", "--id", "back-to-2") == ExitCode.OK
    assert json_out(capsys)["detail"] == f"rollout back-to-2: {V1} → {V2}"
    rollout = running.controller.state.rollout
    assert rollout is not None and (rollout.phase, rollout.candidate) == ("Progressing", V2)
