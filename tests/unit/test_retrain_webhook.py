"""The retraining webhook: Alertmanager payload validation (4xx naming the field), trigger filtering, idempotency per
alert episode, the cooldown, the durable ledger, metrics and OpenAPI.

The HTTP side runs in process (Starlette's test client); retrains are real subprocesses — a stand-in script that
writes the summary ``fraudwatch retrain --summary-json`` would, and waits for a release file so a test can hold a
retrain "running". The real retrain behind the real receiver, fed by a real Alertmanager, is
tests/integration/test_retrain_e2e.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from service.retraining.triggers import (
    AlertmanagerPayload,
    Decision,
    LedgerState,
    LedgerStore,
    RunRecord,
    Verdict,
    parse_payload,
    remember,
    triage,
)
from service.retraining.webhook import (
    HOOK_PATH,
    NoTokenError,
    RetrainService,
    WebhookApp,
    bearer_ok,
    openapi_document,
    retrain_command,
)
from service.settings import RetrainWebhookSettings, Settings
from tests.routerkit import metric_value

TOKEN = "webhook-unit-token"
LAYERS = RetrainWebhookSettings().trigger_layers
IGNORED = RetrainWebhookSettings().ignored_alerts
#: Stands in for ``fraudwatch retrain``: waits for ``<summary>.release`` (if ``hold`` exists), writes the summary.
STAND_IN = """
import json, pathlib, sys, time
summary = pathlib.Path(sys.argv[1])
hold, release = summary.parent / "hold", summary.with_suffix(".release")
while hold.exists() and not release.exists():
    time.sleep(0.02)
summary.write_text(json.dumps({"outcome": "rollout_started", "version": "v9", "registry_version": "9",
                               "detail": "stand-in", "retrain_id": sys.argv[2]}))
"""


def alert(name: str = "FraudwatchFeatureDriftHigh", layer: str = "input_drift", fingerprint: str = "a1b2c3",
          status: str = "firing", starts: str = "2026-12-01T07:00:00Z", **labels: str) -> dict[str, Any]:  # fmt: skip
    return {
        "status": status,
        "labels": {"alertname": name, "layer": layer, "severity": "warning", **labels},
        "annotations": {"summary": "drift", "runbook_url": f"runbooks/{name}.md"},
        "startsAt": starts,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
        "fingerprint": fingerprint,
    }


def notification(*alerts: dict[str, Any], group_key: str = '{}/{layer=~"drift"}:{alertname="X"}') -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": "retrain-webhook",
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": {"layer": alerts[0]["labels"]["layer"]},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def parsed(*alerts: dict[str, Any]) -> AlertmanagerPayload:
    return parse_payload(json.dumps(notification(*alerts)).encode())


# ------------------------------------------------------------------------------------------------ triage (pure)


def test_only_new_firing_alerts_of_trigger_layers_trigger() -> None:
    payload = parsed(
        alert(fingerprint="f1"),
        alert(fingerprint="f2", status="resolved"),
        alert("FraudwatchModelLatencyHigh", "health", fingerprint="f3"),
        alert("FraudwatchRolloutStuck", "rollout", fingerprint="f4"),
        alert("FraudwatchRecallBelowFloor", "outcome", fingerprint="f5"),
        alert(fingerprint="f6", starts="2026-11-30T07:00:00Z"),
        alert(fingerprint="f1"),  # the same episode twice in one notification counts once
        alert("FraudwatchLabelsStalled", "outcome", fingerprint="f8"),
    )
    seen = {payload.alerts[5].key: 1.0}

    result = triage(payload, layers=LAYERS, ignored=IGNORED, seen=seen, last_started_at=None, running=False,
                    now=10.0, cooldown_s=60)  # fmt: skip

    assert [v for _, v in result.verdicts] == [
        Verdict.TRIGGER, Verdict.RESOLVED, Verdict.OTHER_LAYER, Verdict.OTHER_LAYER, Verdict.TRIGGER,
        Verdict.DUPLICATE, Verdict.DUPLICATE, Verdict.IGNORED,
    ]  # fmt: skip
    assert result.decision is Decision.STARTED
    assert [a.fingerprint for a in result.triggers] == ["f1", "f5"]


def test_running_retrain_and_cooldown_start_nothing_new() -> None:
    payload = parsed(alert(fingerprint="new"))
    common: dict[str, Any] = {"layers": LAYERS, "seen": {}, "cooldown_s": 3600.0}

    assert triage(payload, last_started_at=None, running=True, now=0.0, **common).decision is Decision.BUSY
    cooling = triage(payload, last_started_at=1000.0, running=False, now=1600.0, **common)
    assert cooling.decision is Decision.COOLDOWN and "3000 s left" in cooling.reason
    assert triage(payload, last_started_at=1000.0, running=False, now=4601.0, **common).decision is Decision.STARTED
    quiet = triage(parsed(alert(status="resolved")), last_started_at=None, running=False, now=0.0, **common)
    assert quiet.decision is Decision.NONE


def test_a_new_episode_of_the_same_alert_is_a_new_trigger_and_old_episodes_expire() -> None:
    first = parsed(alert(starts="2026-12-01T07:00:00Z"))
    again = parsed(alert(starts="2026-12-02T07:00:00Z"))  # resolved in between, fired again: new startsAt
    state = remember(LedgerState(), triage(first, layers=LAYERS, seen={}, last_started_at=None, running=False,
                                           now=100.0, cooldown_s=0), now=100.0, ttl_s=50.0)  # fmt: skip

    assert list(state.seen) == [first.alerts[0].key]
    second = triage(again, layers=LAYERS, seen=state.seen, last_started_at=None, running=False, now=120, cooldown_s=0)
    assert second.triggers == list(again.alerts)
    assert remember(state, second, now=160.0, ttl_s=50.0).seen == {again.alerts[0].key: 160.0}


# ------------------------------------------------------------------------------------------------ HTTP + service


@dataclass
class Receiver:
    client: TestClient
    service: RetrainService
    home: Path
    clock: list[float]

    def post(self, body: Any, token: str | None = TOKEN, **headers: str) -> Any:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(HOOK_PATH, content=content, headers={"Content-Type": "application/json", **headers})

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.client.get("/metrics").text, name, **labels)


def make_receiver(home: Path, clock: list[float], cooldown_s: float = 3600.0, python: str = sys.executable) -> Receiver:
    token_file = home / "token"
    token_file.write_text(TOKEN + "\n")
    settings = Settings.model_validate(
        {"home": home, "retrain": {"webhook": {"token_file": token_file, "cooldown_s": cooldown_s,
                                               "max_body_bytes": 4096}}}
    )  # fmt: skip

    def command(run: RunRecord, summary: Path, reason: str) -> list[str]:
        assert retrain_command(run, summary, reason)[1:4] == ["-m", "service.cli.main", "retrain"]
        return [python, "-c", STAND_IN, str(summary), run.retrain_id]

    service = RetrainService(settings, registry=CollectorRegistry(), clock=lambda: clock[0], command=command)
    return Receiver(TestClient(WebhookApp(service).app()), service, home, clock)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    made = make_receiver(tmp_path, [1_000.0])
    with made.client:
        yield made
    made.service.close()


def test_bad_payloads_get_a_4xx_naming_the_field(receiver: Receiver) -> None:
    no_fingerprint = notification(alert())
    del no_fingerprint["alerts"][0]["fingerprint"]
    wrong_version = {**notification(alert()), "version": "3"}
    bad_time = notification(alert(starts="yesterday"))
    labels_not_strings = copy.deepcopy(notification(alert()))
    labels_not_strings["alerts"][0]["labels"]["layer"] = 7

    cases = {
        "alerts.0.fingerprint": no_fingerprint,
        "version": wrong_version,
        "alerts.0.startsAt": bad_time,
        "alerts.0.labels.layer": labels_not_strings,
    }
    for field, body in cases.items():
        response = receiver.post(body)
        assert response.status_code == 422, response.text
        assert field in [d["field"] for d in response.json()["details"]], response.text
    assert receiver.post(b"{not json").status_code == 400
    assert receiver.post(b"x" * 5000).status_code == 413
    unauthorized = receiver.post(notification(alert()), token="wrong")
    assert unauthorized.status_code == 401 and "Bearer" in unauthorized.headers["WWW-Authenticate"]
    assert receiver.post(notification(alert()), token=None).status_code == 401
    assert receiver.service.view().runs == []  # nothing got through
    assert receiver.metric("fraudwatch_retrain_webhook_requests_total", code="422") == 4


def test_an_alert_storm_starts_one_retrain(receiver: Receiver) -> None:
    (receiver.home / "retrain" / "runs").mkdir(parents=True)
    (receiver.home / "retrain" / "runs" / "hold").touch()  # keep the retrain running
    storm = [alert(fingerprint=f"feature-{i}", feature=f"f{i}") for i in range(5)]
    storm.append(alert("FraudwatchScoreDriftHigh", "output_drift", fingerprint="score"))

    first = receiver.post(notification(*storm[:3]), **{"X-Correlation-ID": "storm-1"})
    later = receiver.post(notification(*storm[3:]))
    repeated = receiver.post(notification(*storm[:3]))

    assert first.status_code == 202 and first.json()["decision"] == "started"
    assert first.headers["X-Correlation-ID"] == "storm-1"
    retrain_id = first.json()["retrain_id"]
    assert (later.status_code, later.json()["decision"]) == (200, "busy")
    assert repeated.json()["decision"] == "none"
    assert {a["verdict"] for a in repeated.json()["alerts"]} == {"duplicate"}
    view = receiver.client.get("/retrains").json()
    assert view["running"] == retrain_id and len(view["runs"]) == 1
    assert {t["fingerprint"] for t in view["runs"][0]["triggers"]} == {"feature-0", "feature-1", "feature-2"}
    assert view["runs"][0]["correlation_id"] == "storm-1"

    (receiver.home / "retrain" / "runs" / f"{retrain_id}.release").touch()
    assert receiver.service.wait_idle(30)
    run = receiver.client.get("/retrains").json()["runs"][0]
    assert (run["outcome"], run["version"], run["exit_code"]) == ("rollout_started", "v9", 0)
    assert receiver.metric("fraudwatch_retrain_runs_total", trigger="alert", outcome="rollout_started") == 1
    assert receiver.metric("fraudwatch_retrain_triggers_total", decision="started") == 3
    assert receiver.metric("fraudwatch_retrain_triggers_total", decision="busy") == 3
    assert receiver.metric("fraudwatch_retrain_alerts_received_total", verdict="duplicate") == 3
    assert receiver.metric("fraudwatch_retrain_in_progress") == 0
    assert receiver.metric("fraudwatch_retrain_last_run_succeeded") == 1

    # after the run, within the cooldown: a new episode is remembered but starts nothing
    receiver.clock[0] += 60
    cooling = receiver.post(notification(alert(fingerprint="late")))
    assert cooling.json()["decision"] == "cooldown"
    receiver.clock[0] += 3600
    assert receiver.post(notification(alert(fingerprint="late"))).json()["decision"] == "none"  # covered already
    assert receiver.post(notification(alert(fingerprint="next-week"))).status_code == 202


def test_a_retrain_that_cannot_start_is_recorded_as_failed(tmp_path: Path) -> None:
    receiver = make_receiver(tmp_path, [2_000.0], python=str(tmp_path / "no-such-python"))
    with receiver.client:
        started = receiver.post(notification(alert(fingerprint="broken")))
        later = receiver.post(notification(alert(fingerprint="after")))
        (run,) = receiver.client.get("/retrains").json()["runs"]
        failed = receiver.metric("fraudwatch_retrain_runs_total", trigger="alert", outcome="failed")
        succeeded = receiver.metric("fraudwatch_retrain_last_run_succeeded")
    receiver.service.close()

    assert started.status_code == 202
    assert (run["outcome"], run["exit_code"]) == ("failed", -1) and "not started" in run["detail"]
    assert failed == 1 and succeeded == 0
    assert later.json()["decision"] == "cooldown"  # a failed start still counts: no retry storm


def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    clock = [5_000.0]
    first = make_receiver(tmp_path, clock)
    (tmp_path / "retrain" / "runs").mkdir(parents=True)
    (tmp_path / "retrain" / "runs" / "hold").touch()
    with first.client:
        started = first.post(notification(alert(fingerprint="persisted")))
    assert started.status_code == 202
    first.service.close()  # the receiver stops while the retrain runs: the run is stopped and recorded

    restarted = make_receiver(tmp_path, clock)
    with restarted.client:
        again = restarted.post(notification(alert(fingerprint="persisted")))
        cooling = restarted.post(notification(alert(fingerprint="other")))
        runs = restarted.client.get("/retrains").json()["runs"]
        succeeded = restarted.client.get("/metrics").text.count("\nfraudwatch_retrain_last_run_succeeded 0.0\n")
        failed_at = restarted.metric("fraudwatch_retrain_last_run_timestamp_seconds", outcome="failed")
    restarted.service.close()

    assert again.json()["alerts"][0]["verdict"] == "duplicate"
    assert cooling.json()["decision"] == "cooldown"
    assert len(runs) == 1 and runs[0]["finished_at"] is not None and runs[0]["outcome"] == "failed"
    assert (succeeded, failed_at) == (1, runs[0]["finished_at"])  # restored from the ledger: the alert keeps firing
    state = LedgerStore(tmp_path / "retrain" / "webhook.json").load()
    assert state.last_started_at == 5_000.0 and len(state.seen) == 2


def left_running(home: Path, retrain_id: str, pid: int | None) -> None:
    """The ledger a killed receiver leaves behind: its retrain started at 5 000 s and not seen finish."""
    trigger = {"alertname": "FraudwatchFeatureDriftHigh", "layer": "input_drift"}
    run = RunRecord(retrain_id=retrain_id, correlation_id="corr-killed", group_key="{}:{}", started_at=5_000.0,
                    triggers=[trigger], pid=pid)  # fmt: skip
    LedgerStore(home / "retrain" / "webhook.json").save(LedgerState(last_started_at=5_000.0, runs=[run]))


def test_a_killed_receivers_retrain_that_still_runs_is_adopted_and_recorded_from_its_summary(tmp_path: Path) -> None:
    """The retrain runs in a session of its own, so it outlives a SIGKILLed receiver (the real kill:
    tests/integration/test_retrain_e2e.py). The next receiver waits for it — starting no second retrain — and
    records what it reported."""
    runs_dir = tmp_path / "retrain" / "runs"
    runs_dir.mkdir(parents=True)
    (runs_dir / "hold").touch()
    summary = runs_dir / "alert-orphan.json"
    orphan = subprocess.Popen([sys.executable, "-c", STAND_IN, str(summary), "alert-orphan"], start_new_session=True)
    left_running(tmp_path, "alert-orphan", orphan.pid)

    receiver = make_receiver(tmp_path, [5_100.0], cooldown_s=60.0)
    with receiver.client:
        running = receiver.client.get("/retrains").json()["running"]
        in_progress = receiver.metric("fraudwatch_retrain_in_progress")
        busy = receiver.post(notification(alert(fingerprint="while-adopted"))).json()["decision"]
        summary.with_suffix(".release").touch()
        assert receiver.service.wait_idle(30)
        orphan.wait(10)
        (run,) = receiver.client.get("/retrains").json()["runs"]
        succeeded = receiver.metric("fraudwatch_retrain_last_run_succeeded")
        counted = receiver.metric("fraudwatch_retrain_runs_total", trigger="alert", outcome="rollout_started")
    receiver.service.close()

    assert (running, in_progress, busy) == ("alert-orphan", 1, "busy")
    assert (run["outcome"], run["version"], run["adopted"], run["exit_code"]) == ("rollout_started", "v9", True, None)
    assert run["finished_at"] == 5_100.0 and (succeeded, counted) == (1, 1)


@pytest.mark.parametrize("wrote_summary", [True, False])
def test_a_killed_receivers_retrain_that_ended_meanwhile_is_recorded_at_the_next_start(
    tmp_path: Path, wrote_summary: bool
) -> None:
    runs_dir = tmp_path / "retrain" / "runs"
    runs_dir.mkdir(parents=True)
    ended = subprocess.run([sys.executable, "-c", STAND_IN, str(runs_dir / "alert-gone.json"), "alert-gone"],
                           check=True)  # fmt: skip
    assert ended.returncode == 0
    if not wrote_summary:
        (runs_dir / "alert-gone.json").unlink()  # e.g. the whole pod was killed mid-retrain
    left_running(tmp_path, "alert-gone", 4_194_305)  # above pid_max: no such process

    receiver = make_receiver(tmp_path, [5_100.0])
    with receiver.client:
        view = receiver.client.get("/retrains").json()
        succeeded = receiver.metric("fraudwatch_retrain_last_run_succeeded")
    receiver.service.close()

    (run,) = view["runs"]
    assert view["running"] is None and run["finished_at"] == 5_100.0
    if wrote_summary:
        assert (run["outcome"], run["version"], run["adopted"], succeeded) == ("rollout_started", "v9", True, 1)
    else:
        assert (run["outcome"], run["adopted"], succeeded) == ("failed", False, 0)
        assert "its process is gone" in run["detail"]


def test_openapi_describes_the_hook_and_every_reference_resolves(receiver: Receiver) -> None:
    document = receiver.client.get("/openapi.json").json()
    assert document == json.loads(json.dumps(openapi_document()))
    assert document["openapi"].startswith("3.1")
    responses = document["paths"][HOOK_PATH]["post"]["responses"]
    assert set(responses) == {"200", "202", "400", "401", "413", "422"}
    schemas = document["components"]["schemas"]
    assert {"AlertmanagerPayload", "WebhookAlert", "NotificationAnswer", "ErrorResponse"} <= set(schemas)
    assert "fingerprint" in schemas["WebhookAlert"]["required"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert receiver.client.get("/livez").json() == {"status": "alive"}
    assert receiver.client.get("/readyz").status_code == 200


def test_without_a_token_file_the_receiver_refuses_to_start(tmp_path: Path) -> None:
    """Issue 11 (5): no token file used to mean an open receiver (any caller could start retrains whose challenger
    is handed to a rollout). Now the real process exits 1 at start-up, naming the setting — it never listens."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FW_RETRAIN__", "FW_HOME"))}
    env.update({"FW_HOME": str(tmp_path), "FW_RETRAIN__WEBHOOK__PORT": "1"})  # never bound: it exits first
    done = subprocess.run(
        [sys.executable, "-m", "service.retraining.webhook"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "FW_RETRAIN__WEBHOOK__TOKEN_FILE" in done.stderr and "INSECURE_NO_AUTH" in done.stderr
    with pytest.raises(NoTokenError, match="does not run unauthenticated"):
        RetrainService(Settings.model_validate({"home": tmp_path}), registry=CollectorRegistry())
    assert not bearer_ok(None, None) and not bearer_ok("Bearer anything", None)


def test_the_insecure_development_mode_must_be_explicit(tmp_path: Path) -> None:
    settings = Settings.model_validate({"home": tmp_path, "retrain": {"webhook": {"insecure_no_auth": True}}})
    service = RetrainService(settings, registry=CollectorRegistry())
    try:
        with TestClient(WebhookApp(service).app()) as client:
            answer = client.post(HOOK_PATH, content=b"{not json", headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text  # past authentication, refused as a bad body
    finally:
        service.close()
    assert bearer_ok(None, None, insecure_no_auth=True)
    assert not bearer_ok("Bearer wrong", TOKEN, insecure_no_auth=True)  # a configured token always applies
