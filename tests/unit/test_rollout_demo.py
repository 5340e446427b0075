"""rollout.demo.main, rollout.demo.policy and rollout.demo.processes: the policy and its time scale, settings, the run
directory, the hand-off, locust's stats, and stopping children (real short-lived processes: a stop must leave
nothing behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from rollout.backends.prometheus import RangeSeries
from rollout.core.policy import TRAFFIC_STAGES, dumps_policy, load_policy, loads_policy
from rollout.demo.main import Outcome, build_parser, hold, locust_stats, main, settings_from, shares_of
from rollout.demo.policy import load_demo_policy, time_scaled
from rollout.demo.processes import ChildProcess, stop_recorded_workloads
from rollout.demo.settings import DemoError, ExitCode
from rollout.demo.settings import DemoSettings as RolloutDemoSettings
from rollout.demo.stack import MARKER_FILE, Run, load_model_side, prepare_home
from service.common.processes import alive

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------- policy


def test_the_demo_policy_watches_every_layer_and_starts_with_the_regression_set() -> None:
    policy = load_demo_policy()
    layers = {g.layer for g in policy.gates}
    assert layers == {"quality", "health", "input_drift", "output_drift", "outcome"}
    assert [g.name for g in policy.quality_gates()] == ["regression-set"]
    outcome = [g for g in policy.gates if g.layer == "outcome"]
    assert {g.name for g in outcome} >= {"recall", "precision", "recall-paired", "roc-auc-paired"}
    assert all(g.min_labels is not None and g.min_labels > 0 for g in outcome)  # a label minimum …
    assert all(g.sequential for g in outcome)  # … and a sequential test with declared error rates, not a point
    assert policy.analysis.false_rollback <= 0.01 and policy.analysis.false_promotion <= 0.01
    assert 1 <= policy.stages.canary.weight <= 5 and policy.stages.ab.weight == 50


def test_time_scale_changes_the_stage_minimums_and_nothing_else() -> None:
    policy = load_demo_policy()
    fast = time_scaled(policy, 0.15)
    for stage in TRAFFIC_STAGES:
        assert fast.stages.of(stage).min_duration_s == pytest.approx(policy.stages.of(stage).min_duration_s * 0.15)
        assert fast.stages.of(stage).min_requests == policy.stages.of(stage).min_requests
        assert fast.stages.of(stage).min_labels == policy.stages.of(stage).min_labels
    assert fast.gates == policy.gates and fast.analysis == policy.analysis
    assert loads_policy(dumps_policy(fast)) == fast
    assert load_demo_policy(0.15) == fast
    with pytest.raises(ValueError, match="time scale"):
        time_scaled(policy, 0.0)


def test_the_packaged_demo_policy_is_the_file_in_the_source_tree() -> None:
    assert load_demo_policy() == load_policy(ROOT / "rollout" / "demo" / "demo_policy.yaml")


# --------------------------------------------------------------------------------------------------- CLI, settings


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in ExitCode:
        assert f"  {int(code)} " in out or f"; {int(code)} " in out
    assert main(["--no-such-flag"]) == 2


def test_arguments_override_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FW_ROLLOUT_DEMO__USERS", "9")
    args = build_parser().parse_args(["--home", str(tmp_path), "--time-scale", "0.25", "--no-ui"])
    settings = settings_from(args)
    assert (settings.home, settings.time_scale, settings.users) == (tmp_path, 0.25, 9)
    assert not settings.mlflow_ui and not settings.dashboard
    assert RolloutDemoSettings().mlflow_ui  # the default starts the UIs


def test_invalid_settings_are_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FW_ROLLOUT_DEMO__TIME_SCALE", "-1")
    assert main([]) == ExitCode.USAGE


def test_a_rerun_replaces_its_own_directory_only(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    prepare_home(RolloutDemoSettings(home=home))
    (home / "old-run.txt").write_text("x")
    prepare_home(RolloutDemoSettings(home=home))
    assert (home / MARKER_FILE).exists() and not (home / "old-run.txt").exists()
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "data.csv").write_text("keep me")
    with pytest.raises(DemoError) as raised:
        prepare_home(RolloutDemoSettings(home=foreign))
    assert raised.value.code == ExitCode.USAGE
    assert (foreign / "data.csv").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- hand-off


def test_the_model_sides_json_is_validated(tmp_path: Path) -> None:
    good = {
        "model_name": "refund-fraud",
        "tracking_uri": "sqlite:///m.db",
        "versions": {"champion": "v1", "challenger": "v2", "bad": "v3"},
        "registry_versions": {"v1": "1", "v2": "2", "v3": "3"},
        "live_traffic": str(tmp_path / "live.csv.gz"),
        "regression_set": str(tmp_path / "regression.json"),
        "unknown_field": "ignored",
    }
    path = tmp_path / "versions.json"
    path.write_text(json.dumps(good))
    side = load_model_side(path)
    assert (side.champion, side.challenger, side.bad) == ("v1", "v2", "v3")
    path.write_text(json.dumps({**good, "versions": {"champion": "v1"}}))
    with pytest.raises(DemoError, match="challenger") as raised:
        load_model_side(path)
    assert raised.value.code == ExitCode.MODELS
    path.write_text("{not json")
    with pytest.raises(DemoError):
        load_model_side(path)


def test_measured_shares_are_each_versions_part_of_the_deciding_calls() -> None:
    result: list[RangeSeries] = [
        ({"model_version": "v1"}, [(100.0, 30.0), (102.0, 15.0), (104.0, 0.0)]),
        ({"model_version": "v2"}, [(102.0, 15.0), (104.0, 0.0)]),
    ]
    shares = {(s.seconds, s.version): s.share for s in shares_of(result, origin=90.0)}
    assert shares == {(10.0, "v1"): 100.0, (12.0, "v1"): 50.0, (12.0, "v2"): 50.0}  # no calls at 104: no share


def test_locust_stats_are_read_from_its_csv(tmp_path: Path) -> None:
    header = "Type,Name,Request Count,Failure Count,Median Response Time,Requests/s,50%,99%\n"
    rows = "POST,refund-predict,1200,3,9,60.123,9,40\n,Aggregated,1500,3,9,75.5,9,45\n"
    (tmp_path / "locust_stats.csv").write_text(header + rows)
    stats = locust_stats(tmp_path / "locust")
    assert stats["Aggregated"] == {"requests": 1500.0, "failures": 3.0, "rps": 75.5, "p50_ms": 9.0, "p99_ms": 45.0}
    assert stats["refund-predict"]["requests"] == 1200.0
    assert locust_stats(tmp_path / "missing") == {}


# --------------------------------------------------------------------------------------------------- children

#: A process that ignores SIGTERM and has a child of its own (same process group).
STUBBORN = "trap '' TERM; sleep 60 & echo $! > {child}; wait"


def wait_for_file(path: Path, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_a_child_that_ignores_sigterm_is_killed_with_its_group(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    child = ChildProcess("stubborn", ["sh", "-c", STUBBORN.format(child=marker)], tmp_path / "log.txt",
                         dict(os.environ), stop_timeout_s=0.5)  # fmt: skip
    child.start()
    grandchild = int(wait_for_file(marker))
    assert child.running() and child.pid is not None and os.getpgid(child.pid) == child.pid  # its own session
    started = time.monotonic()
    child.stop()
    assert time.monotonic() - started < 5
    assert not child.running()
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(grandchild)
    child.stop()  # idempotent


def test_recorded_workloads_left_behind_are_stopped(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    reaper = threading.Thread(target=server.wait, daemon=True)  # as the server's parent (the controller) would
    reaper.start()
    try:
        (tmp_path / "workloads.json").write_text(json.dumps([{"version": "v1", "pid": server.pid, "port": 1}]))
        assert stop_recorded_workloads(tmp_path, grace_s=5.0) == [server.pid]
        assert server.wait(timeout=5) is not None
        assert stop_recorded_workloads(tmp_path, grace_s=5.0) == []  # nothing alive any more
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_hold_serves_until_ctrl_c_which_ends_it_normally(tmp_path: Path) -> None:
    run = Run(settings=RolloutDemoSettings(home=tmp_path), console=Console(width=200, record=True))
    run.urls["dashboard"] = "http://127.0.0.1:1"
    timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    hold(run, Outcome(ExitCode.OK, report={"html": "report.html"}))  # returns, does not raise
    assert 0.25 < time.monotonic() - started < 5
    assert "dashboard http://127.0.0.1:1" in run.console.export_text()
