"""The online feature store: velocity features read within the request budget, written from events off the request
path, shared by every model version of a rollout (so shadow, canary and A/B compare on the same features).

One protocol (:class:`OnlineStore`), two implementations of the state ``service/velocity.py`` defines:

* :class:`RedisOnlineStore` — Redis (on Kubernetes the chart deploys one or takes yours). Per account two hashes of
  bucketed counters (``n<bucket>``/``c<bucket>``: refunds and cents per 5-minute and per 1-hour bucket, PEXPIREd
  after their window), a hash with the latest two refund times and a fraud-label counter; per IP and per device a
  sorted set of accounts scored by their latest refund there (``ZADD GT``, trimmed to 24 h). One Lua script applies
  an event atomically and only once: it first sets the event's marker ``NX`` (a replayed event changes nothing).
  A batch of queries is read in one ``MULTI``/``EXEC`` pipeline: one round trip, atomic against the writers.
* :class:`SQLiteOnlineStore` — the embedded default for one machine: a SQLite file in WAL mode that every model
  server process on the machine opens (readers never wait for the writer), with the same arithmetic in SQL.

:class:`BackgroundWriter` takes events from the request path (a bounded queue, never blocking) and writes them in
batches from a thread; :class:`OnlineFeatures` is what the service calls: a read within the budget that falls back
to :data:`service.velocity.NOTHING_SEEN` and reports why (``timeout``/``error``/``unavailable``), and the writer.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from service import velocity as v
from service.featurestore import ERROR, TIMEOUT, StoreTimeoutError
from service.logging import get_logger, log_event
from service.settings import OnlineStoreSettings, Settings

LOGGER = get_logger("online_store")

#: Fallback reason when no online store is configured (``url = none``) or it could not be opened.
UNAVAILABLE: Final[str] = "unavailable"
ONLINE_FALLBACK_REASONS: Final[tuple[str, ...]] = (TIMEOUT, ERROR, UNAVAILABLE)
#: Writer outcomes (``fraudwatch_online_store_writes_total{outcome}``) and drop reasons.
APPLIED: Final[str] = "applied"
DUPLICATE: Final[str] = "duplicate"
OVERFLOW: Final[str] = "overflow"
DROP_REASONS: Final[tuple[str, ...]] = (OVERFLOW, ERROR)

Event = v.RefundEvent | v.LabelEvent


@dataclass(frozen=True)
class Readings:
    """A store's answer to a batch of queries: one raw reading each, and the newest event time it has applied."""

    readings: list[v.Reading]
    watermark_ms: int | None


@dataclass(frozen=True)
class WriteResult:
    applied: int
    duplicates: int


class OnlineStore(Protocol):
    """Velocity state by entity (see service/velocity.py). ``read`` gives up with :class:`StoreTimeoutError` once
    ``timeout_s`` has passed; ``write`` applies each event once (by its ID) and may take its time."""

    def read(self, queries: Sequence[v.RefundEvent], timeout_s: float) -> Readings: ...

    def write(self, events: Sequence[Event]) -> WriteResult: ...

    def close(self) -> None: ...


def resolve_all(queries: Sequence[v.RefundEvent], readings: Readings) -> list[v.Velocity]:
    return [v.resolve(query, reading) for query, reading in zip(queries, readings.readings, strict=True)]


# ----------------------------------------------------------------------------------------------------- Redis

_WRITE_REFUND: Final[str] = """
-- KEYS: marker, short hash, long hash, last hash, ip zset, device zset, watermark
-- ARGV: t, cents, short bucket, long bucket, short keep, long keep, marker ttl, short ttl, long ttl, last ttl,
--       seen ttl, account ('' = none), event id, has ip, has device
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[7]) then return 0 end
local t = tonumber(ARGV[1])
local wm = tonumber(redis.call('GET', KEYS[7]) or '-1')
if t > wm then redis.call('SET', KEYS[7], ARGV[1]) end
local account = ARGV[12]
if account == '' then return 1 end
local function bump(key, bucket, keep, ttl)
  if redis.call('HINCRBY', key, 'n' .. bucket, 1) == 1 then
    for _, field in ipairs(redis.call('HKEYS', key)) do
      if tonumber(string.sub(field, 2)) <= bucket - keep then redis.call('HDEL', key, field) end
    end
  end
  redis.call('HINCRBY', key, 'c' .. bucket, ARGV[2])
  redis.call('PEXPIRE', key, ttl)
end
bump(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[5]), ARGV[8])
bump(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[6]), ARGV[9])
local last = redis.call('HMGET', KEYS[4], 't', 'p')
local lt, lp = tonumber(last[1]), tonumber(last[2])
if lt == nil or t > lt then
  if lt ~= nil then redis.call('HSET', KEYS[4], 'p', last[1]) end
  redis.call('HSET', KEYS[4], 't', ARGV[1], 'e', ARGV[13])
elseif lp == nil or t > lp then
  redis.call('HSET', KEYS[4], 'p', ARGV[1])
end
redis.call('PEXPIRE', KEYS[4], ARGV[10])
local function seen(key)
  redis.call('ZADD', key, 'GT', t, account)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('(%d', t - tonumber(ARGV[11])))
  redis.call('PEXPIRE', key, ARGV[11])
end
if ARGV[14] == '1' then seen(KEYS[5]) end
if ARGV[15] == '1' then seen(KEYS[6]) end
return 1
"""

_WRITE_LABEL: Final[str] = """
-- KEYS: label marker, the account's fraud-label counter   ARGV: marker ttl, counts (1/0), counter ttl
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
if ARGV[2] == '1' then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""


class RedisKeys:
    """Key names under a prefix. An entity is everything between its kind's tag and a fixed one-letter suffix, so
    no two entities share a key whatever characters they contain."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.watermark = f"{prefix}wm"

    def marker(self, event_id: str) -> str:
        return f"{self.prefix}e:{event_id}"

    def label_marker(self, label_id: str) -> str:
        return f"{self.prefix}l:{label_id}"

    def account(self, account: str, part: str) -> str:
        return f"{self.prefix}a:{account}:{part}"

    def ip(self, ip: str) -> str:
        return f"{self.prefix}i:{ip}"

    def device(self, device: str) -> str:
        return f"{self.prefix}d:{device}"


class RedisOnlineStore:
    """The Redis implementation (see the module docstring). Two clients: the request path's, whose socket timeout
    is the read budget (a read never waits longer than that for Redis), and the writer's, with ``write_timeout_s``."""

    def __init__(self, url: str, settings: OnlineStoreSettings, *, password: str | None = None) -> None:
        import redis

        self._redis_errors: tuple[type[BaseException], ...] = (redis.exceptions.TimeoutError,)
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        budget = settings.timeout_ms / 1000.0
        self._reader = redis.Redis.from_url(
            url, password=password, socket_timeout=budget, socket_connect_timeout=budget, health_check_interval=0
        )
        self._writer = redis.Redis.from_url(
            url,
            password=password,
            socket_timeout=settings.write_timeout_s,
            socket_connect_timeout=settings.write_timeout_s,
        )
        self._refund_script = self._writer.register_script(_WRITE_REFUND)
        self._label_script = self._writer.register_script(_WRITE_LABEL)

    def ping(self) -> bool:
        return bool(self._writer.ping())

    # ------------------------------------------------------------------ reads

    def read(self, queries: Sequence[v.RefundEvent], timeout_s: float) -> Readings:
        pipe = self._reader.pipeline(transaction=True)
        sizes = [self._queue_read(pipe, query) for query in queries]
        pipe.get(self.keys.watermark)
        try:
            replies = pipe.execute()
        except self._redis_errors as exc:
            raise StoreTimeoutError("online store read passed its deadline") from exc
        readings: list[v.Reading] = []
        position = 0
        for query, size in zip(queries, sizes, strict=True):
            readings.append(_parse_reading(query, replies[position : position + size]))
            position += size
        return Readings(readings, _int_or_none(replies[position]))

    def _queue_read(self, pipe: Any, query: v.RefundEvent) -> int:
        """Queue one query's commands; how many replies they give."""
        keys, t = self.keys, query.t_ms
        size = 1
        pipe.get(keys.marker(query.event_id))
        account = query.account
        if account is not None:
            pipe.hmget(keys.account(account, "s"), [f"n{b}" for b in v.short_window(t)])
            window = v.long_window(t)
            pipe.hmget(keys.account(account, "l"), [*(f"n{b}" for b in window), *(f"c{b}" for b in window)])
            pipe.hmget(keys.account(account, "p"), ["t", "e", "p"])
            pipe.get(keys.account(account, "f"))
            size += 4
        if query.ip is not None:
            key = keys.ip(query.ip)
            for window_ms in v.IP_WINDOWS_MS:
                pipe.zcount(key, t - window_ms, "+inf")
            size += 2
            if account is not None:
                pipe.zscore(key, account)
                size += 1
        if query.device is not None:
            key = keys.device(query.device)
            pipe.zcount(key, t - v.DEVICE_WINDOW_MS, "+inf")
            size += 1
            if account is not None:
                pipe.zscore(key, account)
                size += 1
        return size

    # ----------------------------------------------------------------- writes

    def write(self, events: Sequence[Event]) -> WriteResult:
        pipe = self._writer.pipeline(transaction=False)
        for event in events:
            if isinstance(event, v.RefundEvent):
                self._queue_refund(pipe, event)
            else:
                self._queue_label(pipe, event)
        results = pipe.execute()
        applied = sum(int(result) for result in results)
        return WriteResult(applied, len(results) - applied)

    def _queue_refund(self, pipe: Any, event: v.RefundEvent) -> None:
        keys, t = self.keys, event.t_ms
        account = event.account or ""
        self._refund_script(
            keys=[
                keys.marker(event.event_id),
                keys.account(account, "s"),
                keys.account(account, "l"),
                keys.account(account, "p"),
                keys.ip(event.ip or ""),
                keys.device(event.device or ""),
                keys.watermark,
            ],
            args=[
                t,
                event.amount_cents,
                t // v.SHORT_BUCKET_MS,
                t // v.LONG_BUCKET_MS,
                v.SHORT_BUCKETS,
                v.LONG_BUCKETS,
                int(self.settings.event_ttl_s * 1000),
                v.SHORT_TTL_MS,
                v.LONG_TTL_MS,
                v.LAST_TTL_MS,
                v.SEEN_TTL_MS,
                account,
                event.event_id,
                int(event.ip is not None and event.account is not None),
                int(event.device is not None and event.account is not None),
            ],
            client=pipe,
        )

    def _queue_label(self, pipe: Any, label: v.LabelEvent) -> None:
        counts = label.is_fraud and label.account is not None
        self._label_script(
            keys=[self.keys.label_marker(label.label_id), self.keys.account(label.account or "", "f")],
            args=[int(self.settings.event_ttl_s * 1000), int(counts), v.LABEL_TTL_MS],
            client=pipe,
        )

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def _int_or_none(value: object) -> int | None:
    if value is None:
        return None
    return int(float(value.decode() if isinstance(value, bytes) else str(value)))


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _total(values: Sequence[Any]) -> int:
    return sum(int(value) for value in values if value is not None)


def _parse_reading(query: v.RefundEvent, replies: Sequence[Any]) -> v.Reading:
    own = _int_or_none(replies[0])
    position = 1
    account = v.AccountReading(0, 0, 0, None, None, None, 0)
    t = query.t_ms
    if query.account is not None:
        short, long_cells, last, labels = replies[1:5]
        half = len(long_cells) // 2
        account = v.AccountReading(
            refunds_1h=_total(short),
            refunds_24h=_total(long_cells[:half]),
            cents_24h=_total(long_cells[half:]),
            last_ms=_int_or_none(last[0]),
            last_event=_str_or_none(last[1]),
            prev_ms=_int_or_none(last[2]),
            fraud_labels=_int_or_none(labels) or 0,
        )
        position = 5
    ip_counts, ip_self = (0, 0), (False, False)
    if query.ip is not None:
        ip_counts = (int(replies[position]), int(replies[position + 1]))
        position += 2
        if query.account is not None:
            score = replies[position]
            position += 1
            seen_at = None if score is None else int(score)
            ip_self = (
                seen_at is not None and seen_at >= t - v.IP_WINDOWS_MS[0],
                seen_at is not None and seen_at >= t - v.IP_WINDOWS_MS[1],
            )
    device_count, device_self = 0, False
    if query.device is not None:
        device_count = int(replies[position])
        position += 1
        if query.account is not None:
            score = replies[position]
            device_self = score is not None and int(score) >= t - v.DEVICE_WINDOW_MS
    return v.Reading(account, ip_counts, ip_self, device_count, device_self, own)


# ---------------------------------------------------------------------------------------------------- SQLite

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
            try:
                rows = [conn.execute(_READ, _read_params(query)).fetchone() for query in queries]
                (watermark,) = conn.execute("SELECT max(value) FROM meta WHERE key = 'watermark'").fetchone()
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise StoreTimeoutError("online store read interrupted at its deadline") from exc
            raise
        finally:
            self._local.deadline = None
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
        return SQLiteOnlineStore(Path(url.removeprefix("sqlite:///")).resolve(), settings)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        password = None
        if settings.password_file is not None:
            password = settings.password_file.read_text(encoding="utf-8").strip()
        return RedisOnlineStore(url, settings, password=password)
    raise ValueError(f"online store URL {describe(url)!r}: expected none, sqlite:///path, redis:// or rediss://")


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
