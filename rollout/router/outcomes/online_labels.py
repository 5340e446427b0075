"""Labels into the online feature store: each newly recorded fraud label of a prediction counts for its account's
``acct_fraud_labels`` (service/data/velocity.py) in the store every model version reads.

Data plane::

    label source ──POST /api/v1/feedback──▶ OutcomeTracker ──label recorded (first one of its prediction ID)──▶
        OnlineLabelSink.labelled ──queue (never blocks)──▶ background writer ──▶ online store (Redis | SQLite)

Off the request's critical path: the feedback call only enqueues the event (a full queue drops it, counted); the
store's writes happen on the writer's thread. Idempotent on replay twice over: the tracker hands over only the
first label of a prediction ID (a replayed label is a ``duplicate`` and sends nothing), and the store applies each
label ID (``label-<prediction_id>``, as training's history replay names them) once. Legit labels change no feature
and are not written; a prediction without an account changes none either.

This module is the router's one seam to the model side's store code (``service.data.online_store``, allowed by
.importlinter's ``delivery-sees-no-model-code`` for this module only): the same Lua script / SQL the model servers
write with, so a label is counted exactly as training's point-in-time definition counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from rollout.router.outcomes.prediction_log import PredictionRecord
from service.common.logging import get_logger, log_event
from service.settings import OnlineStoreSettings

if TYPE_CHECKING:
    from service.data.online_store import BackgroundWriter
    from service.data.velocity import LabelEvent

logger = get_logger(__name__)

#: Label events' outcomes (``fraudwatch_router_label_events_total{outcome}``): written, already in the store, or
#: dropped (queue full, or the store failed after the writer's retries).
LABEL_EVENT_OUTCOMES: Final[tuple[str, ...]] = ("applied", "duplicate", "overflow", "error")


def label_event(prediction_id: str, records: Sequence[PredictionRecord], label: int, received_at: datetime) -> (
    LabelEvent | None
):  # fmt: skip
    """The store's event of a recorded label: a fraud label of the account the prediction was made for, arrived at
    ``received_at``; None when it changes no feature (a legit label, or no account)."""
    from service.data.online_store import epoch_ms
    from service.data.velocity import LabelEvent

    account = next((record.entity_key for record in records if record.entity_key), None)
    if label != 1 or account is None:
        return None
    return LabelEvent(f"label-{prediction_id}", epoch_ms(received_at), account, True)


class _SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "fraudwatch_router_label_events",
            "Fraud labels handed to the online store, by outcome (applied, duplicate: already there; overflow, "
            "error: dropped).",
            ["outcome"],
            registry=registry,
        )
        for outcome in LABEL_EVENT_OUTCOMES:
            self.events.labels(outcome)
        self.lag = Histogram(
            "fraudwatch_router_label_event_lag_seconds",
            "From a label's recording to its write into the online store being acknowledged.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )

    def counted(self, outcome: str, n: int) -> None:
        if n:
            self.events.labels(outcome).inc(n)


class OnlineLabelSink:
    """Hands recorded fraud labels to a background writer of the online store (see the module docstring)."""

    def __init__(self, writer: BackgroundWriter, description: str) -> None:
        self.writer = writer
        self.description = description

    def labelled(self, prediction_id: str, records: Sequence[PredictionRecord], label: int, at: datetime) -> None:
        event = label_event(prediction_id, records, label, at)
        if event is not None:
            self.writer.submit([event])

    def flush(self, timeout_s: float) -> bool:
        return self.writer.flush(timeout_s)

    def close(self) -> None:
        self.writer.close(self.writer.settings.close_timeout_s)
        self.writer.store.close()


def open_label_sink(settings: OnlineStoreSettings, registry: CollectorRegistry) -> OnlineLabelSink | None:
    """The sink of ``settings.url`` (``none``: no sink — labels then reach no store). A store that cannot be opened
    is logged and replaced by none: labels are still joined and counted as outcomes."""
    from service.data.online_store import NONE, BackgroundWriter, WriterCallbacks, describe, open_online_store

    if settings.url in (NONE, ""):
        log_event(logger, "online store for labels: none (labels change no velocity feature)")
        return None
    try:
        store = open_online_store(settings.url, settings)
    except Exception as exc:
        log_event(logger, "online store for labels unavailable", logging.ERROR, url=describe(settings.url),
                  error=repr(exc))  # fmt: skip
        return None
    if store is None:
        return None
    metrics = _SinkMetrics(registry)
    callbacks = WriterCallbacks(written=metrics.counted, dropped=metrics.counted, lag=metrics.lag.observe)
    writer = BackgroundWriter(store, settings, callbacks, name="labels")
    log_event(logger, "online store for labels", url=describe(settings.url))
    return OnlineLabelSink(writer, describe(settings.url))
