"""The online store embedded in SQLite: one file in WAL mode that every model server process of a machine opens
(readers never wait for the writer), the state of service/data/velocity.py in tables, the same arithmetic in SQL."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from service.data import velocity as v
from service.data.feature_store import StoreTimeoutError
from service.data.online_base import Event, Readings, WriteResult
from service.settings import OnlineStoreSettings

_SCHEMA: Final[tuple[str, ...]] = (
    "CREATE TABLE IF NOT EXISTS applied (event_id TEXT PRIMARY KEY, t_ms INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS labels_applied (label_id TEXT PRIMARY KEY, t_ms INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS buckets (account TEXT NOT NULL, width INTEGER NOT NULL, bucket INTEGER NOT NULL, "
    "n INTEGER NOT NULL, cents INTEGER NOT NULL, PRIMARY KEY (account, width, bucket)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS last_refund (account TEXT PRIMARY KEY, t_ms INTEGER NOT NULL, "
    "event_id TEXT NOT NULL, prev_ms INTEGER) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS seen (kind TEXT NOT NULL, entity TEXT NOT NULL, account TEXT NOT NULL, "
    "t_ms INTEGER NOT NULL, PRIMARY KEY (kind, entity, account)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS fraud_labels (account TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)
_READ: Final[str] = """
SELECT
  (SELECT t_ms FROM applied WHERE event_id = :event),
  (SELECT coalesce(sum(n), 0) FROM buckets WHERE account = :account AND width = :sw AND bucket BETWEEN :slo AND :shi),
  (SELECT coalesce(sum(n), 0) FROM buckets WHERE account = :account AND width = :lw AND bucket BETWEEN :llo AND :lhi),
  (SELECT coalesce(sum(cents), 0) FROM buckets
     WHERE account = :account AND width = :lw AND bucket BETWEEN :llo AND :lhi),
  (SELECT t_ms FROM last_refund WHERE account = :account),
  (SELECT event_id FROM last_refund WHERE account = :account),
  (SELECT prev_ms FROM last_refund WHERE account = :account),
  (SELECT coalesce(max(n), 0) FROM fraud_labels WHERE account = :account),
  (SELECT count(*) FROM seen WHERE kind = 'i' AND entity = :ip AND t_ms >= :ip1),
  (SELECT count(*) FROM seen WHERE kind = 'i' AND entity = :ip AND t_ms >= :ip24),
  (SELECT t_ms FROM seen WHERE kind = 'i' AND entity = :ip AND account = :account),
  (SELECT count(*) FROM seen WHERE kind = 'd' AND entity = :device AND t_ms >= :dev),
  (SELECT t_ms FROM seen WHERE kind = 'd' AND entity = :device AND account = :account)
"""
_UPSERT_BUCKET: Final[str] = (
    "INSERT INTO buckets VALUES (?, ?, ?, 1, ?) "
    "ON CONFLICT (account, width, bucket) DO UPDATE SET n = n + 1, cents = cents + excluded.cents"
)
_UPSERT_LAST: Final[str] = (
    "INSERT INTO last_refund VALUES (?, ?, ?, NULL) ON CONFLICT (account) DO UPDATE SET "
    "prev_ms = CASE WHEN excluded.t_ms > t_ms THEN t_ms "
    "  WHEN prev_ms IS NULL OR excluded.t_ms > prev_ms THEN excluded.t_ms ELSE prev_ms END, "
    "event_id = CASE WHEN excluded.t_ms > t_ms THEN excluded.event_id ELSE event_id END, "
    "t_ms = max(t_ms, excluded.t_ms)"
)
_UPSERT_SEEN: Final[str] = (
    "INSERT INTO seen VALUES (?, ?, ?, ?) "
    "ON CONFLICT (kind, entity, account) DO UPDATE SET t_ms = max(t_ms, excluded.t_ms)"
)
#: SQLite VM instructions between two deadline checks of a read.
_PROGRESS_STEPS: Final[int] = 200


class SQLiteOnlineStore:
    """The embedded implementation: one SQLite file in WAL mode shared by the processes of one machine. Reads use a
    connection per thread whose progress handler stops a query at its deadline; writes one transaction per batch
    (``BEGIN IMMEDIATE``, waiting up to ``write_timeout_s`` for another process's writer)."""

    def __init__(self, path: Path, settings: OnlineStoreSettings) -> None:
        self.path = path
        self.settings = settings
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._writes = 0
        with contextlib.closing(self._open(settings.write_timeout_s)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.commit()

    def _open(self, busy_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=busy_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if conn is None:
            conn = self._open(0.0)
            conn.set_progress_handler(self._past_deadline, _PROGRESS_STEPS)
            self._local.reader = conn
            with self._guard:
                self._all.append(conn)
        return conn

    def _past_deadline(self) -> int:
        deadline: float | None = getattr(self._local, "deadline", None)
        return 1 if deadline is not None and time.monotonic() >= deadline else 0

    def read(self, queries: Sequence[v.RefundEvent], timeout_s: float) -> Readings:
        conn = self._reader()
        deadline = time.monotonic() + timeout_s
        self._local.deadline = deadline
        try:
            conn.execute("BEGIN")
            rows = [conn.execute(_READ, _read_params(query)).fetchone() for query in queries]
            (watermark,) = conn.execute("SELECT max(value) FROM meta WHERE key = 'watermark'").fetchone()
        except sqlite3.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise StoreTimeoutError("online store read interrupted at its deadline") from exc
            raise
        finally:
            # The end of the read transaction is never interrupted: a COMMIT stopped by the progress handler left
            # the connection inside its transaction, and every later read of the process failed on BEGIN
            # ("cannot start a transaction within a transaction") — the store served only defaults.
            self._local.deadline = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        if time.monotonic() >= deadline:
            raise StoreTimeoutError("online store read passed its deadline")
        return Readings([_sqlite_reading(query, row) for query, row in zip(queries, rows, strict=True)], watermark)

    def write(self, events: Sequence[Event]) -> WriteResult:
        conn: sqlite3.Connection | None = getattr(self._local, "writer", None)
        if conn is None:
            conn = self._local.writer = self._open(self.settings.write_timeout_s)
            with self._guard:
                self._all.append(conn)
        applied = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for event in events:
                applied += _sqlite_apply(conn, event, self.settings)
            self._writes += len(events)
            if self._writes >= self.settings.sqlite_trim_every:
                self._writes = 0
                _sqlite_trim(conn, self.settings)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return WriteResult(applied, len(events) - applied)

    def close(self) -> None:
        with self._guard:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


def _read_params(query: v.RefundEvent) -> dict[str, Any]:
    t = query.t_ms
    short, long_ = v.short_window(t), v.long_window(t)
    return {
        "event": query.event_id,
        "account": query.account,
        "sw": v.SHORT_BUCKET_MS,
        "slo": short.start,
        "shi": short.stop - 1,
        "lw": v.LONG_BUCKET_MS,
        "llo": long_.start,
        "lhi": long_.stop - 1,
        "ip": query.ip,
        "ip1": t - v.IP_WINDOWS_MS[0],
        "ip24": t - v.IP_WINDOWS_MS[1],
        "device": query.device,
        "dev": t - v.DEVICE_WINDOW_MS,
    }


def _sqlite_reading(query: v.RefundEvent, row: Sequence[Any]) -> v.Reading:
    own, short, long_n, long_c, last_ms, last_event, prev_ms, labels, ip1, ip24, ip_seen, dev, dev_seen = row
    t = query.t_ms
    ip_self = (
        ip_seen is not None and ip_seen >= t - v.IP_WINDOWS_MS[0],
        ip_seen is not None and ip_seen >= t - v.IP_WINDOWS_MS[1],
    )
    account = v.AccountReading(int(short), int(long_n), int(long_c), last_ms, last_event, prev_ms, int(labels))
    device_self = dev_seen is not None and dev_seen >= t - v.DEVICE_WINDOW_MS
    return v.Reading(account, (int(ip1), int(ip24)), ip_self, int(dev), device_self, own)


def _sqlite_apply(conn: sqlite3.Connection, event: Event, settings: OnlineStoreSettings) -> int:
    if isinstance(event, v.LabelEvent):
        if conn.execute("INSERT OR IGNORE INTO labels_applied VALUES (?, ?)", (event.label_id, event.t_ms)).rowcount:
            if event.is_fraud and event.account is not None:
                conn.execute(
                    "INSERT INTO fraud_labels VALUES (?, 1) ON CONFLICT (account) DO UPDATE SET n = n + 1",
                    (event.account,),
                )
            return 1
        return 0
    t = event.t_ms
    if not conn.execute("INSERT OR IGNORE INTO applied VALUES (?, ?)", (event.event_id, t)).rowcount:
        return 0
    conn.execute(
        "INSERT INTO meta VALUES ('watermark', ?) ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        (t,),
    )
    account = event.account
    if account is None:
        return 1
    for width, keep in ((v.SHORT_BUCKET_MS, v.SHORT_BUCKETS), (v.LONG_BUCKET_MS, v.LONG_BUCKETS)):
        bucket = t // width
        conn.execute(_UPSERT_BUCKET, (account, width, bucket, event.amount_cents))
        conn.execute(
            "DELETE FROM buckets WHERE account = ? AND width = ? AND bucket <= ?", (account, width, bucket - keep)
        )
    conn.execute(_UPSERT_LAST, (account, t, event.event_id))
    for kind, entity in (("i", event.ip), ("d", event.device)):
        if entity is not None:
            conn.execute(_UPSERT_SEEN, (kind, entity, account, t))
    return 1


def _sqlite_trim(conn: sqlite3.Connection, settings: OnlineStoreSettings) -> None:
    """Forget what can no longer change a feature (the Redis keys' TTLs), measured from the watermark."""
    (watermark,) = conn.execute("SELECT max(value) FROM meta WHERE key = 'watermark'").fetchone()
    if watermark is None:
        return
    conn.execute("DELETE FROM seen WHERE t_ms < ?", (watermark - v.SEEN_TTL_MS,))
    conn.execute("DELETE FROM last_refund WHERE t_ms < ?", (watermark - v.LAST_TTL_MS,))
    conn.execute("DELETE FROM applied WHERE t_ms < ?", (watermark - int(settings.event_ttl_s * 1000),))
    conn.execute("DELETE FROM labels_applied WHERE t_ms < ?", (watermark - int(settings.event_ttl_s * 1000),))
    for width, keep in ((v.SHORT_BUCKET_MS, v.SHORT_BUCKETS), (v.LONG_BUCKET_MS, v.LONG_BUCKETS)):
        conn.execute("DELETE FROM buckets WHERE width = ? AND bucket <= ?", (width, watermark // width - keep))
