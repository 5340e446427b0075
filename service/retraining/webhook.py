"""The retraining service: Alertmanager's webhook receiver that starts ``fraudwatch retrain`` in the background.

Why here, in ``service/``: it runs training (the model side), which ``rollout/`` must never import; and it knows
nothing of stages — the retrain it starts hands its challenger to delivery through
:mod:`service.retraining.handoff` (``rolloutctl start`` / the ModelRollout's ``spec.candidate``).

Endpoints (OpenAPI 3.1 at ``GET /openapi.json``):

* ``POST /hooks/alertmanager`` — an Alertmanager webhook notification (version 4), with the bearer token of
  ``FW_RETRAIN__WEBHOOK__TOKEN_FILE``. Fail closed: without a token file the receiver refuses to start (exit 1),
  unless ``FW_RETRAIN__WEBHOOK__INSECURE_NO_AUTH=true`` (local development only) opens it explicitly.
  Triage (:mod:`service.retraining.triggers`): firing alerts of the trigger layers start one retrain; repeats, other
  layers, resolved alerts, a running retrain or the cooldown start none.
  ``202`` when a retrain started, ``200`` otherwise (both tell Alertmanager the notification was delivered);
  ``401`` wrong token, ``413`` too large, ``400``/``422`` not a valid payload — each error names the field, and
  Alertmanager does not retry a 4xx.
* ``GET /retrains`` — the running retrain, the cooldown, the recent runs with their outcomes.
* ``GET /livez``, ``GET /readyz``, ``GET /metrics`` (``fraudwatch_retrain_*``).

A retrain is a subprocess, ``python -m service.cli.main retrain --trigger alert --id ID --summary-json …`` (the same
command as the weekly schedule), so a crash or a memory peak of training never takes the receiver down; its output
goes to ``HOME/retrain/runs/ID.log``, its JSON logs carry the notification's correlation ID. The ledger
(``FW_RETRAIN__WEBHOOK__STATE_FILE``) is saved before the subprocess starts and again with its pid. The subprocess
runs in a session of its own, so a receiver that is killed (not stopped) leaves it running: the next receiver
process adopts it — waits for it and records the outcome from its summary (``adopted``), starting no second
retrain meanwhile — or, if it finished in between, records it from the summary; only a run whose process is gone
without a summary (e.g. the whole pod was killed) is recorded as failed. The cooldown counts from the start either
way. A receiver that is stopped (SIGTERM) stops the running retrain and records it.

Run: ``python -m service.retraining.webhook [--host H] [--port P]`` (settings ``FW_RETRAIN__*``, ``FW_HOME``, …).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.api.schema import ErrorDetail, ErrorResponse
from service.common.http import bearer_matches, read_limited
from service.common.logging import (
    CORRELATION_HEADER,
    configure_logging,
    correlation_id_from_header,
    correlation_scope,
    get_logger,
    log_event,
)
from service.common.processes import stop_tree
from service.retraining.outcomes import SUCCESSFUL_OUTCOMES, RetrainOutcome, new_retrain_id, trigger_reason
from service.retraining.triggers import (
    AlertmanagerPayload,
    Decision,
    LedgerState,
    LedgerStore,
    RunRecord,
    Triage,
    Verdict,
    error_fields,
    finished,
    parse_payload,
    remember,
    triage,
    with_run,
)
from service.settings import RetrainWebhookSettings, Settings, get_settings

logger = get_logger("retrain_webhook")

HOOK_PATH: Final[str] = "/hooks/alertmanager"
RETRAIN_TRIGGER: Final[str] = "alert"
STATE_FILE: Final[str] = "webhook.json"
RUNS_DIR: Final[str] = "runs"
#: Exit codes of ``fraudwatch retrain`` (service/cli/main.py) → outcome, when the summary file is missing.
_EXIT_OUTCOMES: Final[dict[int, RetrainOutcome]] = {
    0: RetrainOutcome.ROLLOUT_STARTED,
    3: RetrainOutcome.QUALITY_GATE_FAILED,
    6: RetrainOutcome.ROLLOUT_NOT_STARTED,
    7: RetrainOutcome.INSUFFICIENT_DATA,
}
_KNOWN_LAYERS: Final[frozenset[str]] = frozenset(
    {"health", "input_drift", "output_drift", "outcome", "rollout", "retraining"}
)
_DURATION_BUCKETS: Final[tuple[float, ...]] = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
_STOP_GRACE_S: Final[float] = 10.0
_ADOPTED_POLL_S: Final[float] = 0.5
_JSON: Final[str] = "application/json"


# ------------------------------------------------------------------------------------------------ answers


class AlertVerdict(BaseModel):
    fingerprint: str
    alertname: str
    layer: str
    verdict: Verdict


class NotificationAnswer(BaseModel):
    """``POST /hooks/alertmanager``'s answer."""

    decision: Decision
    reason: str
    retrain_id: str | None
    correlation_id: str
    alerts: list[AlertVerdict]


class RetrainsView(BaseModel):
    """``GET /retrains``."""

    running: str | None
    last_started_at: float | None
    cooldown_until: float | None
    runs: list[RunRecord]


def error_response(
    status: int, message: str, correlation_id: str | None, details: Sequence[ErrorDetail] = ()
) -> Response:
    body = ErrorResponse(error=message, details=list(details), correlation_id=correlation_id)
    headers = {CORRELATION_HEADER: correlation_id} if correlation_id else None
    return Response(body.model_dump_json(), status_code=status, media_type=_JSON, headers=headers)


def rejection(exc: ValidationError, correlation_id: str) -> Response:
    """400 for a body that is not JSON, else 422 with one detail per invalid field (as the scoring API answers)."""
    fields = error_fields(exc)
    if any(err["type"] == "json_invalid" for err in exc.errors(include_url=False)):
        return error_response(400, "invalid_json", correlation_id, [ErrorDetail(field="body", message=fields[0][1])])
    details = [ErrorDetail(field=field, message=message) for field, message in fields]
    return error_response(422, "invalid Alertmanager webhook payload", correlation_id, details)


class NoTokenError(ValueError):
    """No token file is configured and the insecure development mode is not set."""


def bearer_ok(authorization: str | None, token: str | None, insecure_no_auth: bool = False) -> bool:
    """A constant-time match of ``Authorization: Bearer <token>``; no token configured → refused, unless the
    explicit insecure development mode is set."""
    if token is None:
        return insecure_no_auth
    return bearer_matches(authorization, token)


def openapi_document() -> dict[str, Any]:
    """The receiver's OpenAPI 3.1 document, its schemas generated from the pydantic models it validates with."""
    _, defs = models_json_schema(
        [
            (AlertmanagerPayload, "validation"),
            (NotificationAnswer, "serialization"),
            (RetrainsView, "serialization"),
            (ErrorResponse, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )

    def ref(name: str) -> dict[str, Any]:
        return {"content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    error = {**ref("ErrorResponse")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fraudwatch retraining service", "version": "1"},
        "paths": {
            HOOK_PATH: {
                "post": {
                    "summary": "Alertmanager webhook (version 4): firing drift/outcome alerts start a retrain",
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, **ref("AlertmanagerPayload")},
                    "responses": {
                        "202": {"description": "a retrain started", **ref("NotificationAnswer")},
                        "200": {
                            "description": "delivered; no retrain started (see decision)",
                            **ref("NotificationAnswer"),
                        },
                        "400": {"description": "not JSON", **error},
                        "401": {"description": "missing or wrong bearer token", **error},
                        "413": {"description": "body too large", **error},
                        "422": {"description": "not a valid payload; details name each field", **error},
                    },
                }
            },
            "/retrains": {
                "get": {
                    "summary": "recent retrains",
                    "responses": {"200": {"description": "ok", **ref("RetrainsView")}},
                }
            },
            "/livez": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "readiness", "responses": {"200": {"description": "ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        },
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# ------------------------------------------------------------------------------------------------ metrics


class WebhookMetrics:
    """The receiver's own series (``fraudwatch_retrain_*``) on its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "fraudwatch_retrain_webhook_requests", "Webhook requests by HTTP status code", ["code"], registry=registry
        )
        self.alerts = Counter(
            "fraudwatch_retrain_alerts_received",
            "Alerts received, by layer and verdict (trigger, duplicate, resolved, other_layer, ignored)",
            ["layer", "verdict"],
            registry=registry,
        )
        self.triggers = Counter(
            "fraudwatch_retrain_triggers",
            "New firing alerts of a trigger layer, by what they led to (started, cooldown, busy)",
            ["alertname", "layer", "decision"],
            registry=registry,
        )
        self.runs = Counter(
            "fraudwatch_retrain_runs", "Finished retrains by trigger and outcome", ["trigger", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.in_progress = Gauge("fraudwatch_retrain_in_progress", "1 while a retrain runs", registry=registry)
        self.last_run = Gauge(
            "fraudwatch_retrain_last_run_timestamp_seconds", "When a retrain last finished, by outcome", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.last_run_succeeded = Gauge(
            "fraudwatch_retrain_last_run_succeeded",
            "1 when the newest finished retrain made a challenger (or rightly made none), 0 when it failed;"
            " absent before the first run",
            registry=registry,
        )
        self.cooldown_until = Gauge(
            "fraudwatch_retrain_cooldown_until_timestamp_seconds",
            "Until when triggers start no retrain (0: no cooldown yet)",
            registry=registry,
        )
        self.duration = Histogram(
            "fraudwatch_retrain_run_duration_seconds", "Wall time of a retrain", buckets=_DURATION_BUCKETS,
            registry=registry,
        )  # fmt: skip

    def record_run(self, outcome: str, ended_at: float) -> None:
        """The gauges of one finished run (``runs_total`` and the duration are the caller's: not restored)."""
        self.last_run.labels(outcome).set(ended_at)
        self.last_run_succeeded.set(1.0 if outcome in SUCCESSFUL_OUTCOMES else 0.0)

    def restore(self, state: LedgerState) -> None:
        """The gauges as the ledger left them, so a restarted receiver still reports its last failure."""
        done = sorted((run for run in state.runs if run.finished_at is not None), key=lambda run: run.finished_at or 0)
        for run in done:
            self.record_run(run.outcome or RetrainOutcome.FAILED.value, run.finished_at or 0.0)

    def count_triage(self, result: Triage) -> None:
        for alert, verdict in result.verdicts:
            layer = alert.labels.get("layer", "")
            self.alerts.labels(layer if layer in _KNOWN_LAYERS else "other", verdict.value).inc()
            if verdict is Verdict.TRIGGER:
                self.triggers.labels(alert.labels.get("alertname", "")[:128], layer, result.decision.value).inc()


# ------------------------------------------------------------------------------------------------ the service


def retrain_command(run: RunRecord, summary: Path, reason: str) -> list[str]:
    """The subprocess: the same ``fraudwatch retrain`` as the schedule, with this run's id and correlation ID."""
    return [
        sys.executable, "-m", "service.cli.main", "retrain", "--trigger", RETRAIN_TRIGGER, "--id", run.retrain_id,
        "--reason", reason, "--summary-json", str(summary), "--correlation-id", run.correlation_id,
    ]  # fmt: skip


def run_result(returncode: int | None, summary: Path) -> dict[str, Any]:
    """What a finished subprocess reports: its summary when it wrote one, else what the exit code says (``None``:
    not known — the process was not this receiver's child)."""
    try:
        document = json.loads(summary.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        if returncode is None:
            return {"outcome": RetrainOutcome.FAILED.value, "detail": "the process ended without a summary"}
        outcome = _EXIT_OUTCOMES.get(returncode, RetrainOutcome.FAILED)
        return {"outcome": outcome.value, "detail": f"exit code {returncode}, no summary"}
    return {
        "outcome": str(document.get("outcome", RetrainOutcome.FAILED.value)),
        "detail": str(document.get("detail", ""))[:1000],
        "version": document.get("version"),
        "registry_version": document.get("registry_version"),
    }


def live_pid(run: RunRecord) -> int | None:
    """The pid of ``run``'s retrain while that process runs — its command line names the run, so a reused pid is not
    mistaken for it (Linux ``/proc``) — else None."""
    if run.pid is None:
        return None
    try:
        argv = Path(f"/proc/{run.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return run.pid if run.retrain_id.encode() in argv else None


class RetrainService:
    """Triage, the ledger and the one background retrain at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        command: Callable[[RunRecord, Path, str], list[str]] = retrain_command,
    ) -> None:
        self.settings = settings
        self.config: RetrainWebhookSettings = settings.retrain.webhook
        self.metrics = WebhookMetrics(registry or CollectorRegistry())
        self.clock = clock
        self.command = command
        self.runs_dir = settings.home / "retrain" / RUNS_DIR
        self.store = LedgerStore(self.config.state_file or settings.home / "retrain" / STATE_FILE)
        self.token = self._read_token()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted: RunRecord | None = None
        self._thread: threading.Thread | None = None
        self.state = self._recover(self.store.load())
        self.metrics.restore(self.state)
        self.metrics.cooldown_until.set(self._cooldown_until(self.state) or 0.0)
        if self._adopted is not None:
            self._watch(self._adopted, self._wait_adopted, self._adopted)

    def _read_token(self) -> str | None:
        path = self.config.token_file
        if path is None:
            if not self.config.insecure_no_auth:
                raise NoTokenError(
                    "no FW_RETRAIN__WEBHOOK__TOKEN_FILE: the retraining webhook does not run unauthenticated (set "
                    "a token file; FW_RETRAIN__WEBHOOK__INSECURE_NO_AUTH=true opens it, for local development only)"
                )
            log_event(logger, "INSECURE: webhook without authentication (FW_RETRAIN__WEBHOOK__INSECURE_NO_AUTH)")
            return None
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token

    def _summary(self, run: RunRecord) -> Path:
        return self.runs_dir / f"{run.retrain_id}.json"

    def _recover(self, state: LedgerState) -> LedgerState:
        """A run the previous process did not see finish: adopted while its process still runs, recorded from its
        summary when it finished meanwhile, else recorded as failed."""
        interrupted = state.running()
        if interrupted is None:
            return state
        run_id, pid = interrupted.retrain_id, live_pid(interrupted)
        if pid is not None:
            log_event(logger, "retrain adopted after a restart", retrain_id=run_id, retrain_pid=pid)
            state = finished(state, run_id, adopted=True)
            self._adopted = interrupted.model_copy(update={"adopted": True})
        elif self._summary(interrupted).exists():
            log_event(logger, "retrain finished while the receiver was down", retrain_id=run_id)
            state = finished(state, run_id, finished_at=self.clock(), adopted=True,
                             **run_result(None, self._summary(interrupted)))  # fmt: skip
        else:
            log_event(logger, "retrain interrupted by a restart", retrain_id=run_id)
            state = finished(state, run_id, finished_at=self.clock(), outcome=RetrainOutcome.FAILED.value,
                             detail="the receiver restarted while the retrain ran (its process is gone)")  # fmt: skip
        self.store.save(state)
        return state

    def _cooldown_until(self, state: LedgerState) -> float | None:
        if state.last_started_at is None:
            return None
        return state.last_started_at + self.config.cooldown_s

    # ---- notifications

    def notify(self, payload: AlertmanagerPayload, correlation_id: str) -> tuple[Triage, RunRecord | None]:
        """Triage one notification, remember its triggers, and start a retrain when the decision says so — the
        ledger is saved before the subprocess starts."""
        with self._lock:
            now = self.clock()
            result = triage(
                payload,
                layers=self.config.trigger_layers,
                ignored=self.config.ignored_alerts,
                seen=self.state.seen,
                last_started_at=self.state.last_started_at,
                running=self._thread is not None and self._thread.is_alive(),
                now=now,
                cooldown_s=self.config.cooldown_s,
            )
            state = remember(self.state, result, now, self.config.dedupe_ttl_s)
            run = None
            if result.decision is Decision.STARTED:
                run = RunRecord(
                    retrain_id=new_retrain_id(RETRAIN_TRIGGER),
                    correlation_id=correlation_id,
                    group_key=payload.groupKey[:512],
                    started_at=now,
                    triggers=[alert.summary() for alert in result.triggers],
                )
                state = with_run(state, run, self.config.keep_runs)
            self.store.save(state)
            self.state = state
            self.metrics.count_triage(result)
            if run is not None:
                self._start(run)
        log_event(
            logger,
            "alertmanager notification",
            group_key=payload.groupKey[:512],
            status=payload.status,
            alerts=len(payload.alerts),
            truncated=payload.truncatedAlerts,
            decision=result.decision.value,
            reason=result.reason,
            retrain_id=run.retrain_id if run else None,
            verdicts=[{"alertname": a.labels.get("alertname"), "verdict": v.value} for a, v in result.verdicts],
        )
        return result, run

    def _start(self, run: RunRecord) -> None:
        """Start the retrain subprocess (the lock is held); a start that fails is recorded as a failed run."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        summary = self._summary(run)
        argv = self.command(run, summary, trigger_reason(run.triggers))
        self.metrics.cooldown_until.set(run.started_at + self.config.cooldown_s)
        try:
            with (self.runs_dir / f"{run.retrain_id}.log").open("ab") as log:
                self._process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    env={**os.environ, "FW_LOG_LEVEL": self.settings.log_level},
                )  # fmt: skip
        except OSError as exc:
            self._finish_locked(run, -1, {"outcome": RetrainOutcome.FAILED.value, "detail": f"not started: {exc}"})
            return
        # with its pid in the ledger, the successor of a receiver killed from here on adopts the retrain
        self.state = finished(self.state, run.retrain_id, pid=self._process.pid)
        self.store.save(self.state)
        log_event(logger, "retrain started", retrain_id=run.retrain_id, retrain_pid=self._process.pid, argv=argv)
        self._watch(run, self._wait, run, self._process, summary)

    def _watch(self, run: RunRecord, target: Callable[..., None], *args: Any) -> None:
        """The one background thread that waits for the running retrain and records it."""
        self.metrics.in_progress.set(1)
        self._thread = threading.Thread(target=target, args=args, name=f"retrain-{run.retrain_id}", daemon=True)
        self._thread.start()

    def _wait(self, run: RunRecord, process: subprocess.Popen[bytes], summary: Path) -> None:
        try:
            returncode = process.wait(timeout=self.config.run_timeout_s)
            result = run_result(returncode, summary)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            returncode = process.returncode if process.returncode is not None else -1
            result = {"outcome": RetrainOutcome.FAILED.value, "detail": f"killed after {self.config.run_timeout_s} s"}
        with self._lock:
            self._finish_locked(run, returncode, result)

    def _wait_adopted(self, run: RunRecord) -> None:
        """Wait for an adopted retrain (not this process's child: polled), stopped at the same run timeout."""
        deadline = run.started_at + self.config.run_timeout_s
        while (pid := live_pid(run)) is not None and self.clock() < deadline:
            time.sleep(_ADOPTED_POLL_S)
        if pid is not None:
            _stop_pid_group(pid)
            result = {"outcome": RetrainOutcome.FAILED.value, "detail": f"killed after {self.config.run_timeout_s} s"}
        else:
            result = run_result(None, self._summary(run))
        with self._lock:
            self._finish_locked(run, None, result)

    def _finish_locked(self, run: RunRecord, returncode: int | None, result: dict[str, Any]) -> None:
        """Record a finished run in the ledger (saved) and the metrics; the caller holds the lock."""
        ended = self.clock()
        self.state = finished(self.state, run.retrain_id, finished_at=ended, exit_code=returncode, **result)
        self.store.save(self.state)
        self.metrics.in_progress.set(0)
        self.metrics.runs.labels(RETRAIN_TRIGGER, result["outcome"]).inc()
        self.metrics.record_run(result["outcome"], ended)
        self.metrics.duration.observe(max(0.0, ended - run.started_at))
        with correlation_scope(run.correlation_id):
            log_event(logger, "retrain finished", retrain_id=run.retrain_id, exit_code=returncode, **result)

    def view(self) -> RetrainsView:
        with self._lock:
            running = self.state.running()
            return RetrainsView(
                running=running.retrain_id if running else None,
                last_started_at=self.state.last_started_at,
                cooldown_until=self._cooldown_until(self.state),
                runs=list(reversed(self.state.runs)),
            )

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for the running retrain (tests, shutdown); True when none runs."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    def close(self) -> None:
        """Stop a running retrain (its process group) and record it; called on shutdown."""
        process = self._process
        if process is not None and process.poll() is None:
            log_event(logger, "stopping the running retrain", retrain_pid=process.pid)
            _stop_group(process)
        adopted = self._adopted
        if adopted is not None and (pid := live_pid(adopted)) is not None:
            log_event(logger, "stopping the adopted retrain", retrain_pid=pid)
            _stop_pid_group(pid)
        self.wait_idle(_STOP_GRACE_S)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the retrain's process tree (service.common.processes), SIGKILL after a grace period."""
    stop_tree(process.pid, grace_s=_STOP_GRACE_S, reap=process.poll)
    process.wait()


def _stop_pid_group(pid: int) -> None:
    """The same for an adopted retrain (not our child: nothing to reap)."""
    stop_tree(pid, grace_s=_STOP_GRACE_S)


# ------------------------------------------------------------------------------------------------ HTTP


class WebhookApp:
    def __init__(self, service: RetrainService) -> None:
        self.service = service
        self.limit = service.config.max_body_bytes

    def _answer(self, response: Response) -> Response:
        self.service.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def hook(self, request: Request) -> Response:
        correlation_id = correlation_id_from_header(request.headers.get(CORRELATION_HEADER))
        with correlation_scope(correlation_id):
            if not bearer_ok(
                request.headers.get("authorization"), self.service.token, self.service.config.insecure_no_auth
            ):
                response = error_response(401, "missing or wrong bearer token", correlation_id)
                response.headers["WWW-Authenticate"] = 'Bearer realm="fraudwatch-retrain"'
                return self._answer(response)
            body = await read_limited(request, self.limit)
            if body is None:
                details = [ErrorDetail(field="body", message=f"larger than {self.limit} bytes")]
                return self._answer(error_response(413, "body too large", correlation_id, details))
            try:
                payload = parse_payload(body)
            except ValidationError as exc:
                log_event(logger, "invalid notification", errors=error_fields(exc)[:10])
                return self._answer(rejection(exc, correlation_id))
            result, run = self.service.notify(payload, correlation_id)
            answer = NotificationAnswer(
                decision=result.decision,
                reason=result.reason,
                retrain_id=run.retrain_id if run else None,
                correlation_id=correlation_id,
                alerts=[
                    AlertVerdict(fingerprint=a.fingerprint, alertname=a.labels.get("alertname", ""),
                                 layer=a.labels.get("layer", ""), verdict=v)
                    for a, v in result.verdicts
                ],
            )  # fmt: skip
            status = 202 if run is not None else 200
            return self._answer(
                Response(answer.model_dump_json(), status_code=status, media_type=_JSON,
                         headers={CORRELATION_HEADER: correlation_id})
            )  # fmt: skip

    async def retrains(self, _request: Request) -> Response:
        return Response(self.service.view().model_dump_json(), media_type=_JSON)

    async def livez(self, _request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ready", "ledger": str(self.service.store.path)})

    async def metrics(self, _request: Request) -> Response:
        return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document())

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.service.close()

    def app(self) -> Starlette:
        routes = [
            Route(HOOK_PATH, self.hook, methods=["POST"]),
            Route("/retrains", self.retrains, methods=["GET"]),
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=self.lifespan)


def create_app(settings: Settings | None = None, service: RetrainService | None = None) -> Starlette:
    return WebhookApp(service or RetrainService(settings or get_settings())).app()


EPILOG: Final[str] = """\
exit codes: 0 stopped normally (SIGTERM/SIGINT: a running retrain is stopped and recorded), 1 failed to start
(no token file configured, or an empty one), 2 usage error.

configuration (prefix FW_RETRAIN__WEBHOOK__): HOST, PORT, TOKEN_FILE (required; INSECURE_NO_AUTH=true runs without
one, for local development only), TRIGGER_LAYERS, COOLDOWN_S, DEDUPE_TTL_S,
STATE_FILE; the retrain itself reads FW_RETRAIN__* (DATA_PATH, WINDOW_DAYS, REGRESSION_SET, HANDOFF, …) and FW_HOME.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.retraining.webhook",
        description="Alertmanager webhook receiver: drift and outcome alerts start a gated retrain and a rollout.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="bind address (default: FW_RETRAIN__WEBHOOK__HOST)")
    parser.add_argument("--port", type=int, help="port (default: FW_RETRAIN__WEBHOOK__PORT)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    settings = get_settings()
    configure_logging(settings.log_level)
    config = settings.retrain.webhook
    try:
        service = RetrainService(settings)
    except (OSError, ValueError) as exc:
        log_event(logger, "retrain webhook failed to start", error=repr(exc))
        print(f"retrain webhook: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(
        create_app(service=service),
        host=args.host or config.host,
        port=args.port or config.port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(config.graceful_shutdown_s),
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
