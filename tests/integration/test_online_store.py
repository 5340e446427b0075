"""The online store against training's definition: a stream replayed through a real ``redis-server`` and through the
embedded SQLite store gives, value for value, the point-in-time velocity features training computes
(``service.data.velocity.point_in_time``); replays are no-ops; a request read after its own event was written reads the
same; the background writer's path ends in the same state; the read budget holds against a frozen Redis."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.data import velocity as v
from service.data.feature_store import StoreTimeoutError
from service.data.online_base import OnlineStore
from service.data.online_redis import RedisOnlineStore
from service.data.online_sqlite import SQLiteOnlineStore
from service.data.online_store import (
    BackgroundWriter,
    WriterCallbacks,
    backfill,
    history_events,
    open_online_store,
    resolve_all,
)
from service.data.synthetic import SyntheticConfig, generate
from service.settings import OnlineStoreSettings
from service.training.evaluate import time_ordered
from tests.kits.redis import RedisServer, redis_server

pytestmark = pytest.mark.integration

#: Three weeks at 4 % fraud: a dozen bot-farm bursts, serial refunders with labels arriving, NAT addresses.
STREAM = SyntheticConfig(n_accounts=1_500, n_requests=6_000, days=21, fraud_rate=0.04, seed=5, drift=True)
#: Generous: these tests compare values; the budget itself is tested below against a frozen server.
SETTINGS = OnlineStoreSettings(timeout_ms=5_000.0)


@pytest.fixture(scope="module")
def stream() -> pd.DataFrame:
    return time_ordered(generate(STREAM))


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def replay_through(store: OnlineStore, frame: pd.DataFrame) -> list[v.Velocity]:
    """Each refund read from the store as of its time, then written (twice: a replay); labels written as they
    arrive — the live store's view of the stream."""
    refunds = v.refund_events(frame)
    out: list[v.Velocity] = [v.NOTHING_SEEN] * len(refunds)
    for index, event in v.replay(refunds, v.label_events(frame)):
        if isinstance(event, v.RefundEvent):
            out[index] = resolve_all([event], store.read([event], SETTINGS.timeout_ms / 1000.0))[0]
        assert store.write([event]).applied == 1
        assert store.write([event]).duplicates == 1
    return out


def assert_same(served: list[v.Velocity], trained: list[v.Velocity]) -> None:
    served_m, trained_m = v.matrix(served), v.matrix(trained)
    mismatched = np.flatnonzero(~np.all(served_m == trained_m, axis=1))
    assert mismatched.size == 0, (
        f"{mismatched.size} rows differ; first: {served[mismatched[0]]} vs {trained[mismatched[0]]}"
    )


def test_redis_store_serves_trainings_point_in_time_features(stream: pd.DataFrame, redis: RedisServer) -> None:
    store = RedisOnlineStore(redis.url, SETTINGS.model_copy(update={"key_prefix": "parity:"}))
    try:
        served = replay_through(store, stream)
    finally:
        store.close()
    trained = v.point_in_time(stream)
    assert_same(served, trained)
    values = v.matrix(trained)
    names = list(v.VELOCITY_FEATURES)
    # the stream exercises every feature: bursts put many accounts on one IP within the hour, labels arrive
    assert values[:, names.index("ip_accounts_1h")].max() >= 8
    assert values[:, names.index("device_accounts_24h")].max() >= 5
    assert values[:, names.index("acct_refunds_1h")].max() >= 2
    assert values[:, names.index("acct_fraud_labels")].max() >= 1
    assert (values[:, names.index("acct_secs_since_prev")] < v.PREVIOUS_CAP_S).mean() > 0.2


def test_embedded_store_serves_the_same(stream: pd.DataFrame, tmp_path: Path) -> None:
    store = SQLiteOnlineStore(tmp_path / "velocity.sqlite", SETTINGS.model_copy(update={"sqlite_trim_every": 500}))
    try:
        served = replay_through(store, stream)
    finally:
        store.close()
    assert_same(served, v.point_in_time(stream))


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_request_read_after_its_own_event_reads_the_same(
    kind: str, stream: pd.DataFrame, redis: RedisServer, tmp_path: Path
) -> None:
    """A shadow version scores a request after the decider's writer has recorded it: its own event is taken out."""
    url = redis.url if kind == "redis" else f"sqlite:///{tmp_path / 'own.sqlite'}"
    store = open_online_store(url, SETTINGS.model_copy(update={"key_prefix": "own:"}))
    assert store is not None
    try:
        refunds = v.refund_events(stream.iloc[:3000])
        store.write(refunds[:-200])
        for event in refunds[-200:]:
            before = resolve_all([event], store.read([event], 5.0))[0]
            store.write([event])
            after = resolve_all([event], store.read([event], 5.0))[0]
            assert after == before, event
    finally:
        store.close()


def test_the_background_writer_ends_in_the_same_state(stream: pd.DataFrame, redis: RedisServer) -> None:
    """Events handed to the writer (batches, from its thread; every event twice) leave the store where applying
    them one by one does: probe reads at the end agree with the definition's state."""
    store = RedisOnlineStore(redis.url, SETTINGS.model_copy(update={"key_prefix": "writer:", "write_batch_max": 64}))
    written: dict[str, int] = {"applied": 0, "duplicate": 0}
    lags: list[float] = []
    writer = BackgroundWriter(
        store,
        store.settings,
        WriterCallbacks(written=lambda outcome, n: written.__setitem__(outcome, written[outcome] + n),
                        dropped=lambda reason, n: pytest.fail(f"dropped {n}: {reason}"), lag=lags.append),
    )  # fmt: skip
    refunds = v.refund_events(stream)
    try:
        for start in range(0, len(refunds), 100):
            writer.submit(refunds[start : start + 100])
            writer.submit(refunds[start : start + 100])
        assert writer.flush(60.0)
        state = v.VelocityState()
        for event in refunds:
            state.apply(event)
        end = refunds[-1].t_ms + 1  # reads are as of now: the newest event's time or later
        probes = [v.RefundEvent(f"probe-{i}", end + i, e.account, 100, e.ip, e.device) for i, e in
                  enumerate(refunds[-500:])]  # fmt: skip
        assert_same(resolve_all(probes, store.read(probes, 5.0)), [state.read(p) for p in probes])
    finally:
        writer.close()
        store.close()
    assert written == {"applied": len(refunds), "duplicate": len(refunds)}
    assert len(lags) == 2 * len(refunds) and max(lags) < 60.0


def test_a_frozen_redis_costs_a_read_its_budget_not_more(redis: RedisServer, tmp_path: Path) -> None:
    """SIGSTOP the real server (a stalled Redis): the read gives up at its socket timeout with StoreTimeoutError."""
    settings = OnlineStoreSettings(timeout_ms=20.0, key_prefix="frozen:")
    with redis_server(tmp_path / "frozen") as frozen:
        store = RedisOnlineStore(frozen.url, settings)
        query = v.RefundEvent("e", 1_700_000_000_000, "acct-1", 1000, "ip-1", "dev-1")
        store.read([query], 1.0)  # connected and answered
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            started = time.perf_counter()
            with pytest.raises(StoreTimeoutError):
                store.read([query], 1.0)
            elapsed = time.perf_counter() - started
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
            store.close()
    assert elapsed < 0.5  # 20 ms budget; generous for a loaded machine


def test_password_from_a_file(tmp_path: Path) -> None:
    """A Redis with a password: the store reads it from its file; without it every call fails (an error, which the
    service counts as a fallback — never an unauthenticated write)."""
    secret = tmp_path / "password"
    secret.write_text("s3cret-value\n")
    with redis_server(tmp_path / "auth", password="s3cret-value") as server:
        store = open_online_store(server.url, OnlineStoreSettings(password_file=secret, key_prefix="auth:"))
        assert isinstance(store, RedisOnlineStore) and store.ping()
        store.close()
        bare = open_online_store(server.url, OnlineStoreSettings(key_prefix="auth:"))
        assert bare is not None
        with pytest.raises(Exception, match=r"(?i)auth"):
            bare.write([v.RefundEvent("e", 1, "a", 1)])
        bare.close()


def test_a_read_interrupted_at_its_deadline_leaves_the_embedded_store_usable(
    stream: pd.DataFrame, tmp_path: Path
) -> None:
    """Reads past their budget are interrupted by SQLite's progress handler; the next read within its budget answers.
    (An interrupted COMMIT once left the connection inside its read transaction: every later read of the process
    failed on BEGIN and the service served only defaults — the demo's v2 was aborted on that.)"""
    store = SQLiteOnlineStore(tmp_path / "velocity.sqlite", SETTINGS)
    try:
        refunds = v.refund_events(stream.iloc[:2000])
        store.write(refunds)
        timeouts = 0
        for event in refunds[:300]:
            try:
                store.read([event], 1e-6)  # always past its deadline: interrupted somewhere in the transaction
            except StoreTimeoutError:
                timeouts += 1
        served = resolve_all(refunds[-50:], store.read(refunds[-50:], 5.0))
    finally:
        store.close()
    assert timeouts == 300
    state = v.VelocityState()
    for event in refunds:
        state.apply(event)
    assert served == [state.read(event) for event in refunds[-50:]]


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_backfilled_store_serves_the_point_in_time_features_after_the_cut(
    kind: str, stream: pd.DataFrame, redis: RedisServer, tmp_path: Path
) -> None:
    """online_store.backfill of the history before a cut, then the requests after it read and written as live: the
    values training's point_in_time gives those requests (refunds and labels arrived before the cut included)."""
    ordered = time_ordered(stream)
    cut = len(ordered) * 2 // 3
    history, live = ordered.iloc[:cut], ordered.iloc[cut:]
    until_ms = int(pd.Timestamp(live["timestamp"].iloc[0]).value // 1_000_000)
    url = redis.url if kind == "redis" else f"sqlite:///{tmp_path / 'backfill.sqlite'}"
    store = open_online_store(url, SETTINGS.model_copy(update={"key_prefix": "backfill:"}))
    assert store is not None
    try:
        events = history_events(history, until_ms)
        written = backfill(store, events, 256)
        served = []
        for event in v.refund_events(live):
            served.extend(resolve_all([event], store.read([event], 5.0)))
            store.write([event])
    finally:
        store.close()
    assert written.applied == len(events) and written.duplicates == 0
    labels_before_cut = [label for label in v.label_events(history) if label.t_ms < until_ms]
    trained = v.point_in_time(ordered)[cut:]
    # training's live rows also count labels arriving after the cut; the backfilled store has only those before it
    state = v.VelocityState()
    expected = v.replay_reads(state, [*v.refund_events(history), *v.refund_events(live)], labels_before_cut)[cut:]
    assert_same(served, expected)
    assert any(a != b for a, b in zip(trained, expected, strict=True))  # the labels after the cut do count there
