"""Which Alertmanager notifications start a retrain: the webhook payload (version 4), the triage, the ledger.

Pure, apart from :class:`LedgerStore` (one JSON file, written atomically). :mod:`service.retraining.webhook` is the
HTTP side.

**Payload** — Alertmanager's webhook JSON, version 4 (https://prometheus.io/docs/alerting/latest/configuration/
#webhook_config): ``version``, ``groupKey``, ``status``, ``receiver``, ``groupLabels``, ``commonLabels``,
``commonAnnotations``, ``externalURL``, ``truncatedAlerts`` and ``alerts[]`` with ``status``, ``labels``,
``annotations``, ``startsAt``, ``endsAt``, ``generatorURL``, ``fingerprint``. Validated strictly where the receiver
relies on a field (a wrong one is a 422 naming it); fields Alertmanager may add later are ignored.

**Triage** of each alert:

* ``resolved`` — not firing: nothing to do;
* ``other_layer`` — its ``layer`` label is not a trigger layer (``input_drift``, ``output_drift``, ``outcome`` by
  default; health and rollout alerts are for people, not for retraining);
* ``ignored`` — an alert of a trigger layer that is named in ``ignored_alerts``: labels stalled (a retrain cannot
  help without labels), a candidate compared with the stable (the rollout's own gates act on those);
* ``duplicate`` — this alert (``fingerprint`` + ``startsAt``: one firing episode) was seen before; Alertmanager
  re-sends a group's notification every ``group_interval``/``repeat_interval``, so a notification is idempotent;
* ``trigger`` — a new firing episode of a trigger layer.

Then the notification's **decision**: no trigger → ``none``; a retrain still running → ``busy``; the last one
started less than ``cooldown_s`` ago → ``cooldown``; else ``started``. Triggers are remembered whatever the
decision, so an alert storm (many features drifting at once, then the score, then the outcomes) starts one retrain,
and the same episode never starts a second one once the cooldown is over: the retrain it joined covered it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

#: Labels of a trigger kept in the ledger and the retrain's audit reason.
TRIGGER_LABELS: Final[tuple[str, ...]] = ("alertname", "layer", "severity", "model_version", "feature", "role")
LEDGER_SCHEMA: Final[int] = 1
_LABEL_MAX: Final[int] = 256

AlertStatus = Literal["firing", "resolved"]


class WebhookAlert(BaseModel):
    """One alert of a notification."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: AwareDatetime
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = Field(..., min_length=1, max_length=64)

    @property
    def key(self) -> str:
        """One firing episode of this alert: Alertmanager's fingerprint (its label set) and its start."""
        return f"{self.fingerprint}@{self.startsAt.isoformat()}"

    def summary(self) -> dict[str, str]:
        kept = {name: self.labels[name][:_LABEL_MAX] for name in TRIGGER_LABELS if name in self.labels}
        return {**kept, "fingerprint": self.fingerprint, "startsAt": self.startsAt.isoformat()}


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook notification, version 4."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal["4"]
    groupKey: str = Field(..., min_length=1)
    truncatedAlerts: int = Field(0, ge=0)
    status: AlertStatus
    receiver: str
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[WebhookAlert]


def parse_payload(body: bytes) -> AlertmanagerPayload:
    """The validated notification; raises :class:`pydantic.ValidationError` (bad JSON included)."""
    return AlertmanagerPayload.model_validate_json(body)


def error_fields(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted field path, message) per error, e.g. ``("alerts.0.fingerprint", "Field required")``."""
    return [
        (".".join(str(part) for part in err["loc"]) or "body", str(err["msg"]))
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


# ------------------------------------------------------------------------------------------------ triage


class Verdict(StrEnum):
    TRIGGER = "trigger"
    DUPLICATE = "duplicate"
    RESOLVED = "resolved"
    OTHER_LAYER = "other_layer"
    IGNORED = "ignored"


class Decision(StrEnum):
    STARTED = "started"
    COOLDOWN = "cooldown"
    BUSY = "busy"
    NONE = "none"


def classify(
    alert: WebhookAlert, layers: Sequence[str], seen: Mapping[str, float], ignored: Sequence[str] = ()
) -> Verdict:
    if alert.status != "firing":
        return Verdict.RESOLVED
    if alert.labels.get("layer") not in layers:
        return Verdict.OTHER_LAYER
    if alert.labels.get("alertname") in ignored:
        return Verdict.IGNORED
    if alert.key in seen:
        return Verdict.DUPLICATE
    return Verdict.TRIGGER


@dataclass(frozen=True)
class Triage:
    """Each alert's verdict and the notification's decision (``reason`` says why, for the log and the answer)."""

    verdicts: tuple[tuple[WebhookAlert, Verdict], ...]
    decision: Decision
    reason: str

    @property
    def triggers(self) -> list[WebhookAlert]:
        return [alert for alert, verdict in self.verdicts if verdict is Verdict.TRIGGER]


def triage(
    payload: AlertmanagerPayload,
    *,
    layers: Sequence[str],
    ignored: Sequence[str] = (),
    seen: Mapping[str, float],
    last_started_at: float | None,
    running: bool,
    now: float,
    cooldown_s: float,
) -> Triage:
    """Classify every alert, then decide (see the module docstring). Alerts repeated within one notification
    count once."""
    verdicts: list[tuple[WebhookAlert, Verdict]] = []
    keys = dict(seen)
    for alert in payload.alerts:
        verdict = classify(alert, layers, keys, ignored)
        if verdict is Verdict.TRIGGER:
            keys[alert.key] = now
        verdicts.append((alert, verdict))
    result = tuple(verdicts)
    if not any(v is Verdict.TRIGGER for _, v in result):
        return Triage(result, Decision.NONE, "no new firing alert of a trigger layer")
    if running:
        return Triage(result, Decision.BUSY, "a retrain is running; these alerts are covered by it")
    if last_started_at is not None and now - last_started_at < cooldown_s:
        remaining = cooldown_s - (now - last_started_at)
        return Triage(result, Decision.COOLDOWN, f"cooldown: the last retrain started {now - last_started_at:.0f} s "
                      f"ago ({remaining:.0f} s left)")  # fmt: skip
    return Triage(result, Decision.STARTED, f"{len([1 for _, v in result if v is Verdict.TRIGGER])} new trigger(s)")


# ------------------------------------------------------------------------------------------------ ledger


class RunRecord(BaseModel):
    """One retrain the receiver started."""

    model_config = ConfigDict(extra="forbid")

    retrain_id: str
    correlation_id: str
    group_key: str
    started_at: float
    triggers: list[dict[str, str]]
    finished_at: float | None = None
    outcome: str | None = None
    exit_code: int | None = None
    version: str | None = None
    registry_version: str | None = None
    detail: str = ""
    #: The retrain subprocess (its process group: it runs in a session of its own).
    pid: int | None = None
    #: Finished under a later receiver process than the one that started it (that one was killed meanwhile).
    adopted: bool = False


class LedgerState(BaseModel):
    """The receiver's durable state: alert episodes seen (key → first seen, epoch s), the last start, recent runs."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = LEDGER_SCHEMA
    seen: dict[str, float] = Field(default_factory=dict)
    last_started_at: float | None = None
    runs: list[RunRecord] = Field(default_factory=list)

    def running(self) -> RunRecord | None:
        return next((run for run in reversed(self.runs) if run.finished_at is None), None)


def remember(state: LedgerState, triage_result: Triage, now: float, ttl_s: float) -> LedgerState:
    """``state`` with this notification's triggers remembered and episodes older than ``ttl_s`` forgotten."""
    seen = {key: at for key, at in state.seen.items() if now - at < ttl_s}
    for alert in triage_result.triggers:
        seen.setdefault(alert.key, now)
    return state.model_copy(update={"seen": seen})


def with_run(state: LedgerState, run: RunRecord, keep: int) -> LedgerState:
    """``state`` with ``run`` appended (the newest ``keep`` runs kept) and the last start moved to it."""
    runs = [*state.runs, run][-keep:]
    return state.model_copy(update={"runs": runs, "last_started_at": run.started_at})


def finished(state: LedgerState, retrain_id: str, **fields: Any) -> LedgerState:
    """``state`` with run ``retrain_id`` updated by ``fields`` (``finished_at``, ``outcome``, …)."""
    runs = [run.model_copy(update=fields) if run.retrain_id == retrain_id else run for run in state.runs]
    return state.model_copy(update={"runs": runs})


class LedgerStore:
    """The ledger in one JSON file, replaced atomically on every change (saved before the retrain starts)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> LedgerState:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return LedgerState()
        state = LedgerState.model_validate_json(text)
        if state.schema_version != LEDGER_SCHEMA:
            raise ValueError(f"{self.path}: ledger schema {state.schema_version}, expected {LEDGER_SCHEMA}")
        return state

    def save(self, state: LedgerState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(state.model_dump(mode="json"), indent=2, sort_keys=True))
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
