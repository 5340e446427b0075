"""The online feature store: velocity features read within the request budget, written from events off the request
path, shared by every model version of a rollout (so shadow, canary and A/B compare on the same features).

One protocol (:class:`OnlineStore`), two implementations of the state ``service/data/velocity.py`` defines:

* ``service.data.online_redis.RedisOnlineStore`` — Redis (on Kubernetes the chart deploys one or takes yours):
  bucketed counters with TTLs and sorted sets, one idempotent Lua script per event, reads in one ``MULTI``/``EXEC``
  round trip;
* ``service.data.online_sqlite.SQLiteOnlineStore`` — the embedded default for one machine: a SQLite file in WAL mode
  that every model server process on the machine opens, with the same arithmetic in SQL.

:class:`BackgroundWriter` takes events from the request path (a bounded queue, never blocking) and writes them in
batches from a thread; :class:`OnlineFeatures` is what the service calls: a read within the budget that falls back
to :data:`service.data.velocity.NOTHING_SEEN` and reports why (``timeout``/``error``/``unavailable``), and the writer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from service.api.schema import RefundRequest
from service.common.logging import get_logger, log_event
from service.data import velocity as v
from service.data.feature_store import ERROR, TIMEOUT, StoreTimeoutError
from service.data.online_base import Event, OnlineStore, Readings, WriteResult
from service.settings import OnlineStoreSettings, Settings

LOGGER = get_logger("online_store")

#: Fallback reason when no online store is configured (``url = none``) or it could not be opened.
UNAVAILABLE: Final[str] = "unavailable"
ONLINE_FALLBACK_REASONS: Final[tuple[str, ...]] = (TIMEOUT, ERROR, UNAVAILABLE)
#: Writer outcomes (``fraudwatch_online_store_writes_total{outcome}``) and drop reasons.
APPLIED: Final[str] = "applied"
DUPLICATE: Final[str] = "duplicate"
OVERFLOW: Final[str] = "overflow"
WRITE_OUTCOMES: Final[tuple[str, ...]] = (APPLIED, DUPLICATE)
DROP_REASONS: Final[tuple[str, ...]] = (OVERFLOW, ERROR)


def resolve_all(queries: Sequence[v.RefundEvent], readings: Readings) -> list[v.Velocity]:
    return [v.resolve(query, reading) for query, reading in zip(queries, readings.readings, strict=True)]


# ---------------------------------------------------------------------------------------------- opening one

#: ``url`` values: the embedded default (a file under ``FW_HOME``), none, or an explicit store.
EMBEDDED: Final[str] = ""
NONE: Final[str] = "none"
EMBEDDED_FILE: Final[str] = "online/velocity.sqlite"


def describe(url: str) -> str:
    """The store's URL without a password (for logs)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def store_url(settings: Settings) -> str:
    """The configured store as a URL: ``serve.online_store.url``, the embedded file under ``home`` when empty."""
    url = settings.serve.online_store.url
    if url == EMBEDDED:
        return f"sqlite:///{(settings.home / EMBEDDED_FILE).resolve()}"
    return url


def open_online_store(url: str, settings: OnlineStoreSettings) -> OnlineStore | None:
    """The store at ``url`` (``redis://``, ``rediss://``, ``unix://``, ``sqlite:///path``), None for ``none``.
    A Redis password comes from ``settings.password_file`` (a mounted Secret), never from the URL's environment."""
    if url == NONE:
        return None
    if url.startswith("sqlite:///"):
        from service.data.online_sqlite import SQLiteOnlineStore

        return SQLiteOnlineStore(Path(url.removeprefix("sqlite:///")).resolve(), settings)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        from service.data.online_redis import RedisOnlineStore

        password = None
        if settings.password_file is not None:
            password = settings.password_file.read_text(encoding="utf-8").strip()
        return RedisOnlineStore(url, settings, password=password)
    raise ValueError(f"online store URL {describe(url)!r}: expected none, sqlite:///path, redis:// or rediss://")


# ------------------------------------------------------------------------------------------------ backfill


def history_events(frame: Any, until_ms: int) -> list[Event]:
    """What a store that had been written since the start of a time-ordered history ``frame`` holds at
    ``until_ms``: its refunds and the labels that had arrived, before then (the events training's
    :func:`service.data.velocity.point_in_time` replays, with the same IDs; a store's state does not depend on the
    order they are written in)."""
    refunds: list[Event] = [event for event in v.refund_events(frame) if event.t_ms < until_ms]
    return refunds + [label for label in v.label_events(frame) if label.t_ms < until_ms]


def backfill(store: OnlineStore, events: Sequence[Event], batch: int) -> WriteResult:
    """Write ``events`` into ``store`` in batches of ``batch``: a new store filled from the event history, so that
    its first day of traffic is not read as accounts with no past. Idempotent: each event applies once (its ID)."""
    applied = duplicates = 0
    for start in range(0, len(events), batch):
        result = store.write(events[start : start + batch])
        applied += result.applied
        duplicates += result.duplicates
    return WriteResult(applied, duplicates)


# --------------------------------------------------------------------------------------------- the writer


@dataclass
class WriterCallbacks:
    """Where the writer reports (the service's Prometheus metrics)."""

    written: Callable[[str, int], None]  # (applied | duplicate, n)
    dropped: Callable[[str, int], None]  # (overflow | error, n)
    lag: Callable[[float], None]  # seconds from an event's scoring to its write being acknowledged


class BackgroundWriter:
    """Events from the request path, written in batches by one thread: :meth:`submit` never blocks (a full queue
    drops the newest events, counted ``overflow``); a failed batch is retried ``write_retries`` times with a short
    pause, then dropped (counted ``error``). Replays are harmless: the store applies each event ID once."""

    def __init__(
        self, store: OnlineStore, settings: OnlineStoreSettings, callbacks: WriterCallbacks, name: str = "online"
    ) -> None:
        self.store = store
        self.settings = settings
        self.callbacks = callbacks
        self._queue: deque[tuple[Event, float]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"fraudwatch-{name}-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, events: Sequence[Event]) -> None:
        now = time.monotonic()
        with self._wake:
            room = self.settings.write_queue_max - len(self._queue)
            accepted = events[: max(room, 0)]
            self._queue.extend((event, now) for event in accepted)
            self._wake.notify()
        if len(accepted) < len(events):
            self.callbacks.dropped(OVERFLOW, len(events) - len(accepted))

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._wake:
                if not self._queue and not self._busy:
                    return True
            time.sleep(0.001)
        return False

    def close(self, timeout_s: float = 2.0) -> None:
        self.flush(timeout_s)
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _take(self) -> list[tuple[Event, float]] | None:
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            if not self._queue:
                return None
            n = min(len(self._queue), self.settings.write_batch_max)
            self._busy = True
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._write(batch)
            finally:
                with self._wake:
                    self._busy = False

    def _write(self, batch: list[tuple[Event, float]]) -> None:
        events = [event for event, _ in batch]
        for attempt in range(self.settings.write_retries + 1):
            try:
                result = self.store.write(events)
            except Exception as exc:
                if attempt == self.settings.write_retries:
                    self.callbacks.dropped(ERROR, len(events))
                    log_event(LOGGER, "online store write failed", 30, events=len(events), error=repr(exc))
                    return
                time.sleep(self.settings.write_retry_pause_s)
                continue
            done = time.monotonic()
            self.callbacks.written(APPLIED, result.applied)
            self.callbacks.written(DUPLICATE, result.duplicates)
            for _, enqueued in batch:
                self.callbacks.lag(done - enqueued)
            return


# ----------------------------------------------------------------------------------------- what serving calls


@dataclass
class ReadCallbacks:
    reads: Callable[[int], None]  # requests read
    fallback: Callable[[str, int], None]  # (timeout | error | unavailable, requests)
    age: Callable[[float], None]  # seconds between the newest request read and the store's watermark


class OnlineFeatures:
    """The service's view of the online store: :meth:`read` within ``timeout_ms`` (else :data:`NOTHING_SEEN`, the
    reason counted), :meth:`record` hands the scored requests to the writer. ``store`` None: every read falls back
    with reason ``unavailable``."""

    def __init__(
        self,
        store: OnlineStore | None,
        settings: OnlineStoreSettings,
        callbacks: ReadCallbacks,
        writer: BackgroundWriter | None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.budget_s = settings.timeout_ms / 1000.0
        self.callbacks = callbacks
        self.writer = writer

    def read(self, queries: Sequence[v.RefundEvent]) -> list[v.Velocity]:
        if not queries:
            return []
        self.callbacks.reads(len(queries))
        if self.store is None:
            return self._fallback(UNAVAILABLE, len(queries))
        try:
            readings = self.store.read(queries, self.budget_s)
        except StoreTimeoutError:
            return self._fallback(TIMEOUT, len(queries))
        except Exception:
            return self._fallback(ERROR, len(queries))
        if readings.watermark_ms is not None:
            newest = max(query.t_ms for query in queries)
            self.callbacks.age(max(newest - readings.watermark_ms, 0) / 1000.0)
        return resolve_all(queries, readings)

    def _fallback(self, reason: str, n: int) -> list[v.Velocity]:
        self.callbacks.fallback(reason, n)
        return [v.NOTHING_SEEN] * n

    def record(self, events: Sequence[Event]) -> None:
        if self.writer is not None and events:
            self.writer.submit(events)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close(self.settings.close_timeout_s)
        if self.store is not None:
            self.store.close()


class ServingMetrics(Protocol):
    """The service's online-store series (``service.serving.metrics.OnlineStoreMetrics``)."""

    def reads(self, n: int) -> None: ...

    def fallback(self, reason: str, n: int) -> None: ...

    def age(self, seconds: float) -> None: ...

    def lag(self, seconds: float) -> None: ...

    def written(self, outcome: str, n: int) -> None: ...

    def dropped(self, reason: str, n: int) -> None: ...


def open_online_features(settings: Settings, metrics: ServingMetrics) -> OnlineFeatures:
    """The service's online store from its settings, with a writer. A store that cannot be opened is logged and
    replaced by none: every read then falls back (``unavailable``, counted) — the model still serves."""
    config = settings.serve.online_store
    url = store_url(settings)
    store: OnlineStore | None
    try:
        store = open_online_store(url, config)
    except Exception as exc:
        log_event(LOGGER, "online store unavailable", 30, url=describe(url), error=repr(exc))
        store = None
    writer = None
    if store is not None:
        writer = BackgroundWriter(store, config, WriterCallbacks(metrics.written, metrics.dropped, metrics.lag))
    log_event(LOGGER, "online store", url=describe(url), event_time=config.event_time, opened=store is not None)
    return OnlineFeatures(store, config, ReadCallbacks(metrics.reads, metrics.fallback, metrics.age), writer)


def epoch_ms(moment: datetime) -> int:
    """A datetime as Unix milliseconds (no zone = UTC)."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1000)


def request_events(
    requests: Sequence[RefundRequest], request_ids: Sequence[str], settings: OnlineStoreSettings, now_ms: int
) -> list[v.RefundEvent]:
    """The events of scored requests: each one's ID from its correlation ID (what every version scoring it gets) and
    what it writes; its time ``now_ms``, or its ``eventTime`` when the service trusts request times."""
    trust = settings.event_time == "request"
    events = []
    for request, request_id in zip(requests, request_ids, strict=True):
        t = epoch_ms(request.eventTime) if trust and request.eventTime is not None else now_ms
        amount = v.cents(request.amount)
        account, ip, device = request.accountId, request.ipAddress, request.deviceId
        events.append(
            v.RefundEvent(v.event_id(request_id, account, ip, device, amount), t, account, amount, ip, device)
        )
    return events
