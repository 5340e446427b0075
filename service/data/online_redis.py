"""The online store in Redis (see service/data/online_store.py for the protocol, service/data/velocity.py for
the state).

Per account two hashes of bucketed counters (``n<bucket>``/``c<bucket>``: refunds and cents per 5-minute and per
1-hour bucket; PEXPIREd after their window; a new bucket drops the ones that fell out of every window), a hash with
the latest two refund times and the latest event's ID, and a fraud-label counter; per IP and per device a sorted set
of accounts scored by their latest refund there (``ZADD GT``, trimmed to 24 h). One Lua script applies an event
atomically and only once: it first sets the event's marker ``NX`` (a replayed event changes nothing). A batch of
queries is read in one ``MULTI``/``EXEC`` pipeline: one round trip, atomic against the writers' scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from service.data import velocity as v
from service.data.feature_store import StoreTimeoutError
from service.data.online_base import Event, Readings, WriteResult
from service.settings import OnlineStoreSettings

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
