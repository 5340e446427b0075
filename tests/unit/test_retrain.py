"""Retraining: window selection, the combined gate, ids and names, the rollout hand-offs, and whole retrains against a
real MLflow SQLite store scored on the real frozen regression set (tests/quality/data)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rollout.core.commands import InboxCommand
from service.artifacts.registry import CHALLENGER, ModelRegistry
from service.cli.main import ExitCode, main
from service.data.synthetic import SyntheticConfig, generate
from service.retraining.handoff import (
    ANNOTATION_REQUEST,
    Candidate,
    HandoffOutcome,
    RolloutctlHandoff,
    handoff_for,
    kube_error_outcome,
    plan_candidate_patch,
    resolve_command,
    rolloutctl_argv,
    rolloutctl_outcome,
)
from service.retraining.job import (
    RegressionSetMissingError,
    RetrainKind,
    RetrainRequest,
    combined_gate,
    read_stream,
    retrain,
    safe_id,
    select_window,
    unused_version_name,
)
from service.retraining.outcomes import RetrainOutcome, new_retrain_id
from service.retraining.sources import InsufficientDataError
from service.settings import KubeHandoffSettings, RetrainSettings, Settings
from service.training.evaluate import GateReport
from tests.kits.retrain import FROZEN_SET as FROZEN
from tests.kits.retrain import RecordingHandoff

#: A labelled stream with the new bot farm from its middle on; its last 20 days train a model that passes the frozen
#: regression set (PR-AUC ≈ 0.89, recall ≈ 0.98 measured) where one trained before the farm fails it.
STREAM = SyntheticConfig(n_accounts=4_000, n_requests=40_000, days=40, seed=5, fraud_rate=0.1, drift=True)
WINDOW_DAYS = 20.0
CANDIDATE = Candidate(name="v8", model="refund-fraud", number="8")


def stamps(*days: float) -> pd.DataFrame:
    start = pd.Timestamp("2026-03-01")
    return pd.DataFrame(
        {"timestamp": [start + pd.Timedelta(days=d) for d in days], "is_fraud": [i % 2 for i in range(len(days))]}
    )


# ------------------------------------------------------------------------------------------------ window


def test_window_is_the_last_days_up_to_the_newest_labelled_row() -> None:
    frame = stamps(0, 1, 2, 3, 4, 5, 6, 7)
    frame.loc[7, "is_fraud"] = None  # the newest row has no label yet

    window, info = select_window(frame, 3.0)

    # newest labelled row: day 6 → (day 3, day 6]
    assert [ts.day for ts in window["timestamp"]] == [5, 6, 7]
    assert info.rows == 3 and info.unlabelled_dropped == 1
    assert info.end == pd.Timestamp("2026-03-07").isoformat()
    assert window["is_fraud"].dtype.kind == "i"


def test_window_end_can_be_given_and_bounds_are_start_exclusive() -> None:
    frame = stamps(0, 1, 2, 3, 4, 5)

    window, info = select_window(frame, 2.0, end=datetime(2026, 3, 4))

    assert [ts.day for ts in window["timestamp"]] == [3, 4]  # day 1 (=03-02) excluded, day 3 (=03-04) included
    assert (info.rows, info.positives) == (2, 1)
    aware, _ = select_window(frame, 2.0, end=datetime(2026, 3, 4, 1, tzinfo=timezone(timedelta(hours=1))))
    assert aware["timestamp"].equals(window["timestamp"])  # 01:00+01:00 is midnight UTC; a naive stream is UTC


def test_too_little_labelled_data_is_insufficient_not_a_crash() -> None:
    frame = stamps(0, 1, 2, 3)
    with pytest.raises(InsufficientDataError, match=r"2 labelled rows and 1 frauds \(need ≥ 3"):
        select_window(frame, 2.0, min_rows=3)
    with pytest.raises(InsufficientDataError, match="frauds"):
        select_window(frame, 10.0, min_positives=5)
    frame["is_fraud"] = None
    with pytest.raises(InsufficientDataError, match="no labelled row"):
        select_window(frame, 10.0)


def test_a_stream_directory_is_every_csv_in_time_order(tmp_path: Path) -> None:
    frame = generate(SyntheticConfig(n_accounts=200, n_requests=1_200, days=10, seed=3))
    frame.iloc[600:].to_csv(tmp_path / "2026-01-06.csv.gz", index=False)
    frame.iloc[:600].to_csv(tmp_path / "2026-01-01.csv", index=False)
    (tmp_path / "notes.txt").write_text("not data")

    stream = read_stream(tmp_path)

    assert len(stream) == len(frame)
    assert stream["timestamp"].is_monotonic_increasing
    assert list(stream["request_id"]) == list(frame["request_id"])
    with pytest.raises(FileNotFoundError, match="no refund stream"):
        read_stream(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ gates, ids, names


def gate(passed: bool, **values: float) -> GateReport:
    return GateReport(passed, "v9", 10, values, {"pr_auc": 0.8}, [] if passed else ["pr_auc 0.5 < floor 0.8"])


def test_combined_gate_passes_only_when_every_gate_passes() -> None:
    both = combined_gate({"test_window": gate(True, pr_auc=0.9), "regression": gate(True, pr_auc=0.85)})
    one_failed = combined_gate({"test_window": gate(True, pr_auc=0.9), "regression": gate(False, pr_auc=0.5)})

    assert both.passed
    assert both.values == {"test_window_pr_auc": 0.9, "regression_pr_auc": 0.85}
    assert both.floors == {"test_window_pr_auc": 0.8, "regression_pr_auc": 0.8}
    assert not one_failed.passed
    assert one_failed.failures == ["regression: pr_auc 0.5 < floor 0.8"]


def test_retrain_ids_are_valid_rollout_command_ids() -> None:
    at = datetime(2026, 12, 1, 7, 30, tzinfo=UTC)
    ids = {new_retrain_id("alert", at, salt=str(i)) for i in range(5)}

    assert len(ids) == 5
    for rid in ids:
        assert rid.startswith("alert-20261201T073000Z-")
        InboxCommand.model_validate({"id": rid, "kind": "start", "issued_at": at, "candidate": "v2"})
    assert safe_id('group {alertname="X"}/fp 1') == "group-alertname-X-fp-1"
    with pytest.raises(ValueError, match="no usable"):
        safe_id("///")


# ------------------------------------------------------------------------------------------------ rolloutctl hand-off


def test_rolloutctl_exit_codes_map_to_outcomes() -> None:
    applied = json.dumps({"id": "r1", "kind": "start", "outcome": "applied", "detail": ""})
    refused = json.dumps({"outcome": "ignored", "detail": "a rollout of v7 is in progress"})

    assert rolloutctl_outcome(0, applied, "") == (HandoffOutcome.STARTED, "applied")
    assert rolloutctl_outcome(4, refused, "") == (HandoffOutcome.REFUSED, "a rollout of v7 is in progress")
    assert rolloutctl_outcome(5, "", "rolloutctl: did not apply start r1 within 1 s\n")[0] is HandoffOutcome.UNAVAILABLE
    assert rolloutctl_outcome(6, "", "backend 'kube' is not available")[0] is HandoffOutcome.UNAVAILABLE
    assert rolloutctl_outcome(1, "", "boom") == (HandoffOutcome.FAILED, "boom")


def test_rolloutctl_argv_is_an_idempotent_start(tmp_path: Path) -> None:
    argv = rolloutctl_argv(
        ["rolloutctl"], CANDIDATE, request_id="alert-1", reason="drift", timeout_s=30, state_dir=tmp_path
    )

    assert Path(argv[0]).name == "rolloutctl" and Path(argv[0]).is_file()  # the virtualenv's, found beside python
    assert argv[1:] == ["--state-dir", str(tmp_path), "--json", "start", "--candidate", "v8", "--id", "alert-1",
                        "--reason", "drift", "--timeout", "30"]  # fmt: skip
    assert resolve_command(["/bin/true", "-x"]) == ["/bin/true", "-x"]


def test_the_real_rolloutctl_without_a_controller_is_unavailable(tmp_path: Path) -> None:
    """rolloutctl itself, on a state directory no controller serves: it waits, withdraws its command, exits 5."""
    handoff = RolloutctlHandoff(["rolloutctl"], timeout_s=0.5, state_dir=tmp_path / "rollout")

    result = handoff.start(CANDIDATE, request_id="alert-no-controller", reason="unit test")

    assert result.outcome is HandoffOutcome.UNAVAILABLE, result.detail
    assert "did not apply start alert-no-controller" in result.detail
    assert not list((tmp_path / "rollout" / "inbox").glob("*.json"))  # withdrawn: no stale start left behind


def test_a_missing_rolloutctl_is_a_failed_handoff() -> None:
    handoff = RolloutctlHandoff(["/nonexistent/rolloutctl"], timeout_s=1)
    assert handoff.start(CANDIDATE, request_id="x", reason="").outcome is HandoffOutcome.FAILED


def test_handoff_choice_follows_the_settings() -> None:
    assert handoff_for(RetrainSettings(handoff="none")) is None
    assert handoff_for(RetrainSettings()).via == "rolloutctl"  # type: ignore[union-attr]
    kube = RetrainSettings(handoff="kube", kube=KubeHandoffSettings(rollout_name="fw-fraudwatch"))
    assert handoff_for(kube).via == "kube"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="ROLLOUT_NAME"):
        handoff_for(RetrainSettings(handoff="kube"))


# ------------------------------------------------------------------------------------------------ Kubernetes hand-off


def modelrollout(candidate: str = "v7", phase: str = "Promoted", **candidate_fields: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "fw-fraudwatch", "resourceVersion": "4711"},
        "spec": {
            "stable": {"version": "v6", "image": "registry/model:v6"},
            "candidate": {"version": candidate, "image": "registry/model-server:1", **candidate_fields},
        },
        "status": {"phase": phase, "stableVersion": candidate, "candidateVersion": candidate},
    }


def test_kube_patch_sets_the_candidate_by_immutable_uri() -> None:
    plan = plan_candidate_patch(
        modelrollout(registryAlias="challenger", replicas=3), CANDIDATE, KubeHandoffSettings(),
        request_id="alert-1", reason="drift",
    )  # fmt: skip

    assert plan.outcome is HandoffOutcome.STARTED and plan.patch is not None
    assert plan.patch["spec"]["candidate"] == {
        "version": "v8",
        "image": "registry/model-server:1",  # kept: the server image loads the version from the registry
        "modelUri": "models:/refund-fraud/8",
        "registryAlias": None,  # removed by the merge patch: exactly one model source
    }
    assert plan.patch["metadata"]["resourceVersion"] == "4711"  # a concurrent write makes the patch fail (409)
    assert plan.patch["metadata"]["annotations"][ANNOTATION_REQUEST] == "alert-1"


def test_kube_patch_is_idempotent_and_refuses_to_replace_a_running_rollout() -> None:
    settings = KubeHandoffSettings(image="registry/other:2")
    same = plan_candidate_patch(modelrollout("v8"), CANDIDATE, settings, request_id="r", reason="")
    busy = plan_candidate_patch(modelrollout("v7", phase="Progressing"), CANDIDATE, settings, request_id="r", reason="")
    chosen = plan_candidate_patch(modelrollout(), CANDIDATE, settings, request_id="r", reason="")
    no_image = modelrollout()
    no_image["spec"]["candidate"].pop("image")
    no_image["spec"]["stable"].pop("image")

    assert (same.outcome, same.patch) == (HandoffOutcome.STARTED, None)
    assert (busy.outcome, busy.patch) == (HandoffOutcome.REFUSED, None)
    assert "v7 is in progress" in busy.detail
    assert chosen.patch is not None and chosen.patch["spec"]["candidate"]["image"] == "registry/other:2"
    failed = plan_candidate_patch(no_image, CANDIDATE, KubeHandoffSettings(), request_id="r", reason="")
    assert failed.outcome is HandoffOutcome.FAILED


def test_kube_patch_does_not_overwrite_a_candidate_still_waiting_to_start() -> None:
    """Someone's `helm upgrade --set model.version=v9` that the controller has not acted on yet (it is down, or a
    reconcile away): the retrain must not replace it — it would supersede a human's rollout before it began."""
    pending = modelrollout("v9")
    pending["status"] = {"phase": "Promoted", "stableVersion": "v7", "candidateVersion": "v7"}
    fresh = modelrollout("v6")  # a new install: no status yet, spec.candidate is spec.stable
    fresh["status"] = {}
    rolled_back = modelrollout("v7", phase="RolledBack")
    rolled_back["status"]["stableVersion"] = "v6"

    waiting = plan_candidate_patch(pending, CANDIDATE, KubeHandoffSettings(), request_id="r", reason="")
    assert (waiting.outcome, waiting.patch) == (HandoffOutcome.REFUSED, None)
    assert "v9 waits for the controller" in waiting.detail
    for ready in (fresh, rolled_back):
        plan = plan_candidate_patch(ready, CANDIDATE, KubeHandoffSettings(), request_id="r", reason="")
        assert plan.outcome is HandoffOutcome.STARTED and plan.patch is not None, plan.detail


def test_kube_errors_retrying_cannot_fix_are_failures() -> None:
    assert [kube_error_outcome(s) for s in (0, 429, 500, 503)] == [HandoffOutcome.UNAVAILABLE] * 4
    assert [kube_error_outcome(s) for s in (400, 403, 404, 422)] == [HandoffOutcome.FAILED] * 4


# ------------------------------------------------------------------------------------------------ whole retrains


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "refunds.csv.gz"
    generate(STREAM).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retrain-home")


def settings_for(home: Path, stream: Path, **retrain: Any) -> Settings:
    return Settings.model_validate(
        {
            "home": home,
            "retrain": {"data_path": stream, "regression_set": FROZEN, "window_days": WINDOW_DAYS, **retrain},
        }
    )


def request(kind: RetrainKind = RetrainKind.ALERT, **fields: Any) -> RetrainRequest:
    rid = new_retrain_id(kind.value)
    return RetrainRequest(kind=kind, reason="unit test", retrain_id=rid, **fields)


@pytest.fixture(scope="module")
def registry(home: Path, stream_file: Path) -> Iterator[ModelRegistry]:
    yield ModelRegistry(settings_for(home, stream_file))


def test_a_retrain_registers_a_gated_challenger_and_hands_it_over(
    home: Path, stream_file: Path, registry: ModelRegistry
) -> None:
    settings = settings_for(home, stream_file)
    handoff = RecordingHandoff()
    asked = request()

    report = retrain(settings, asked, handoff=handoff, registry=registry)

    assert report.outcome is RetrainOutcome.ROLLOUT_STARTED, report.detail
    assert report.gate is not None and report.gate.passed
    assert report.gate.values["regression_pr_auc"] >= settings.quality.min_pr_auc
    assert report.gate.values["regression_recall_new_bot_farm"] > 0.9  # the window holds the new farm
    assert report.window is not None and report.window.rows > 15_000
    model = settings.registered_model_name
    assert registry.alias_version(model, CHALLENGER) == report.registry_version
    ref = registry.get_version(model, str(report.registry_version))
    assert ref.model_version == report.version
    assert ref.audit[-1]["action"] == "challenger" and asked.retrain_id in ref.audit[-1]["reason"]
    run = registry.client.get_run(str(report.run_id))
    assert run.data.tags["retrain_id"] == asked.retrain_id and run.data.tags["quality_gate"] == "passed"
    assert run.data.metrics["regression_pr_auc"] == pytest.approx(report.gate.values["regression_pr_auc"])
    assert handoff.calls == [(Candidate(str(report.version), model, str(report.registry_version)),
                              asked.retrain_id, "unit test")]  # fmt: skip
    assert unused_version_name(registry, model) != report.version


def test_a_retrain_below_the_floors_is_logged_but_never_registered(
    home: Path, stream_file: Path, registry: ModelRegistry
) -> None:
    settings = settings_for(home, stream_file).model_copy(
        update={"quality": Settings().quality.model_copy(update={"min_pr_auc": 0.999})}
    )
    model = settings.registered_model_name
    before = len(registry.versions(model))
    handoff = RecordingHandoff()

    report = retrain(settings, request(), handoff=handoff, registry=registry)

    assert report.outcome is RetrainOutcome.QUALITY_GATE_FAILED
    assert report.gate is not None and any("pr_auc" in f for f in report.gate.failures)
    assert report.registry_version is None and len(registry.versions(model)) == before
    assert registry.client.get_run(str(report.run_id)).data.tags["quality_gate"] == "failed"
    assert handoff.calls == []


def test_a_refused_handoff_leaves_a_registered_challenger(
    home: Path, stream_file: Path, registry: ModelRegistry
) -> None:
    settings = settings_for(home, stream_file)
    report = retrain(settings, request(), handoff=RecordingHandoff(HandoffOutcome.REFUSED), registry=registry)

    assert report.outcome is RetrainOutcome.ROLLOUT_NOT_STARTED
    assert "rollout not started (refused)" in report.detail
    assert registry.alias_version(settings.registered_model_name, CHALLENGER) == report.registry_version


def test_no_regression_set_no_version(home: Path, stream_file: Path, registry: ModelRegistry) -> None:
    settings = settings_for(home, stream_file, regression_set=None)
    with pytest.raises(RegressionSetMissingError, match="FW_RETRAIN__REGRESSION_SET"):
        retrain(settings, request(window_days=3.0), handoff=None, registry=registry)


def test_cli_retrain_exit_codes_and_summary(home: Path, stream_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FW_RETRAIN__REGRESSION_SET", str(FROZEN))
    monkeypatch.setenv("FW_RETRAIN__MIN_ROWS", "1000000")
    summary = home / "summary.json"

    code = main(["--home", str(home), "retrain", "--data", str(stream_file), "--trigger", "scheduled",
                 "--id", "weekly-1", "--summary-json", str(summary)])  # fmt: skip

    assert code == ExitCode.NOTHING_SHIPPED
    document = json.loads(summary.read_text())
    assert (document["retrain_id"], document["kind"], document["outcome"]) == ("weekly-1", "scheduled",
                                                                              "insufficient_data")  # fmt: skip
    assert re.search(r"need ≥ 1000000", document["detail"])
    done = subprocess.run([str(Path(resolve_command(["fraudwatch"])[0])), "recalibrate", "--help"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0 and "nothing shipped" in done.stdout
