"""The feature store: SQLite build/lookup, and the budgeted lookup's defaults on miss, timeout and error."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.data.feature_store import (
    ERROR,
    MISS,
    TIMEOUT,
    BudgetedLookup,
    DeadlineAwareStore,
    FeatureStore,
    SQLiteFeatureStore,
    build_store,
    lookup_with_budget,
    open_store,
)
from service.data.features import DEFAULT_AGGREGATES, EntityAggregates
from service.serving.metrics import Metrics

AGGREGATES = {
    "acct-a": EntityAggregates(prior_refunds=3.0, avg_refund_amount=42.5, known=True),
    "acct-b": EntityAggregates(prior_refunds=0.0, avg_refund_amount=120.0, known=True),
    "acct-c": EntityAggregates(prior_refunds=17.0, avg_refund_amount=9.99, known=True),
}
#: A slow store sleeps this long: far beyond any budget used here, so "returned early" is unambiguous.
SLOW_S = 2.0
#: The budget of the timeout tests.
BUDGET_S = 0.05
#: The budget of tests about answers, not timing: generous, so a loaded machine cannot turn a hit into a timeout.
ANSWER_BUDGET_S = 10.0


class FallbackCounter:
    """Counts fallbacks in a real Prometheus counter (fresh registry), as the service does."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(registry=self.registry)

    def __call__(self, reason: str, n: int) -> None:
        self.metrics.store_fallbacks.labels("v-test", reason).inc(n)

    def value(self, reason: str) -> float:
        sample = self.registry.get_sample_value(
            "fraudwatch_feature_store_fallback_total", {"model_version": "v-test", "reason": reason}
        )
        return 0.0 if sample is None else sample


class SleepyStore:
    """Wraps a real store and sleeps before answering: a slow disk or remote store, a fault that cannot be
    caused otherwise on this machine. It is not deadline-aware, so the lookup must isolate it in a thread."""

    def __init__(self, inner: FeatureStore, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.calls = 0
        self.lock = threading.Lock()

    def lookup(self, key: str) -> EntityAggregates | None:
        return self.lookup_many([key]).get(key)

    def lookup_many(self, keys: Sequence[str]) -> Mapping[str, EntityAggregates]:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.lookup_many(keys)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "features.sqlite"
    build_store(path, AGGREGATES)
    return path


@pytest.fixture
def store(store_path: Path) -> Iterator[SQLiteFeatureStore]:
    opened = SQLiteFeatureStore(store_path)
    yield opened
    opened.close()


def test_hit_returns_the_stored_aggregates(store: SQLiteFeatureStore) -> None:
    for key, expected in AGGREGATES.items():
        assert store.lookup(key) == expected


def test_miss_returns_none(store: SQLiteFeatureStore) -> None:
    assert store.lookup("acct-unknown") is None
    assert store.lookup_many(["acct-unknown", "acct-a"]) == {"acct-a": AGGREGATES["acct-a"]}


def test_sqlite_store_is_deadline_aware_and_read_only(store: SQLiteFeatureStore) -> None:
    assert isinstance(store, DeadlineAwareStore)
    conn = store._connection()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM entity_aggregates")


def test_each_thread_gets_its_own_connection(store: SQLiteFeatureStore) -> None:
    seen: dict[str, object] = {}

    def look(name: str) -> None:
        assert store.lookup("acct-b") == AGGREGATES["acct-b"]
        seen[name] = store._connection()

    threads = [threading.Thread(target=look, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(conn) for conn in seen.values()}) == 3


def test_build_store_replaces_atomically_and_leaves_no_temporary_files(store_path: Path) -> None:
    reader = SQLiteFeatureStore(store_path)
    assert reader.lookup("acct-a") == AGGREGATES["acct-a"]
    updated = {"acct-a": EntityAggregates(prior_refunds=4.0, avg_refund_amount=40.0, known=True)}
    build_store(store_path, updated)
    assert sorted(os.listdir(store_path.parent)) == [store_path.name]
    fresh = SQLiteFeatureStore(store_path)
    assert fresh.lookup("acct-a") == updated["acct-a"]
    assert fresh.lookup("acct-b") is None
    reader.close()
    fresh.close()


def test_open_store_finds_the_bundle_store_or_none(tmp_path: Path, store_path: Path) -> None:
    found = open_store(store_path.parent)
    assert found is not None
    assert found.lookup("acct-c") == AGGREGATES["acct-c"]
    found.close()
    assert open_store(tmp_path / "empty") is None


def test_budgeted_hit_miss_and_missing_key_per_row(store: SQLiteFeatureStore) -> None:
    counter = FallbackCounter()
    lookups: list[int] = []
    budgeted = BudgetedLookup(store, ANSWER_BUDGET_S, on_fallback=counter, on_lookups=lookups.append)
    assert budgeted.inline
    result = budgeted.lookup(["acct-a", None, "acct-unknown", "acct-a", "acct-c"])
    assert result == [
        AGGREGATES["acct-a"],
        DEFAULT_AGGREGATES,
        DEFAULT_AGGREGATES,
        AGGREGATES["acct-a"],
        AGGREGATES["acct-c"],
    ]
    assert counter.value(MISS) == 1.0
    assert counter.value(TIMEOUT) == 0.0
    assert lookups == [4]


def test_no_keys_means_no_lookup_and_no_fallback(store: SQLiteFeatureStore) -> None:
    counter = FallbackCounter()
    budgeted = BudgetedLookup(store, ANSWER_BUDGET_S, on_fallback=counter)
    assert budgeted.lookup([None, None]) == [DEFAULT_AGGREGATES, DEFAULT_AGGREGATES]
    assert counter.value(MISS) == 0.0


def test_slow_store_times_out_with_defaults_within_budget(store: SQLiteFeatureStore) -> None:
    counter = FallbackCounter()
    slow = SleepyStore(store, SLOW_S)
    budgeted = BudgetedLookup(slow, BUDGET_S, on_fallback=counter)
    assert not budgeted.inline
    started = time.monotonic()
    result = budgeted.lookup(["acct-a", "acct-b", None])
    elapsed = time.monotonic() - started
    assert result == [DEFAULT_AGGREGATES] * 3
    assert elapsed < SLOW_S / 2, f"waited {elapsed:.3f} s for a store that takes {SLOW_S} s"
    assert counter.value(TIMEOUT) == 2.0
    budgeted.close()


def test_slow_store_times_out_from_asyncio_too(store: SQLiteFeatureStore) -> None:
    counter = FallbackCounter()
    budgeted = BudgetedLookup(SleepyStore(store, SLOW_S), BUDGET_S, on_fallback=counter)

    async def run() -> tuple[list[EntityAggregates], float]:
        started = time.monotonic()
        result = await budgeted.alookup(["acct-c"])
        return result, time.monotonic() - started

    result, elapsed = asyncio.run(run())
    assert result == [DEFAULT_AGGREGATES]
    assert elapsed < SLOW_S / 2
    assert counter.value(TIMEOUT) == 1.0
    budgeted.close()


def test_a_fast_enough_isolated_store_answers(store: SQLiteFeatureStore) -> None:
    counter = FallbackCounter()
    budgeted = BudgetedLookup(SleepyStore(store, 0.0), ANSWER_BUDGET_S, on_fallback=counter)
    assert budgeted.lookup(["acct-b"]) == [AGGREGATES["acct-b"]]
    assert asyncio.run(budgeted.alookup(["acct-c"])) == [AGGREGATES["acct-c"]]
    assert counter.value(TIMEOUT) == 0.0
    budgeted.close()


def test_inline_sqlite_lookup_is_interrupted_at_its_deadline(tmp_path: Path) -> None:
    """A real SQLite query stopped by the progress handler: thousands of keys against a deadline already
    reached (budget of 1 ns) cannot finish in time."""
    path = tmp_path / "big.sqlite"
    build_store(path, {f"acct-{i}": AGGREGATES["acct-a"] for i in range(5000)})
    big = SQLiteFeatureStore(path)
    counter = FallbackCounter()
    budgeted = BudgetedLookup(big, 1e-9, on_fallback=counter)
    keys = [f"acct-{i}" for i in range(5000)]
    assert budgeted.lookup(keys) == [DEFAULT_AGGREGATES] * len(keys)
    assert counter.value(TIMEOUT) == float(len(keys))
    big.close()


def test_corrupted_store_is_an_error_with_defaults(store_path: Path) -> None:
    """A real fault: the store file is overwritten in place with garbage after the store was opened."""
    opened = SQLiteFeatureStore(store_path)
    store_path.write_bytes(b"not a sqlite database " * 512)
    counter = FallbackCounter()
    budgeted = BudgetedLookup(opened, ANSWER_BUDGET_S, on_fallback=counter)
    assert budgeted.lookup(["acct-a", "acct-b"]) == [DEFAULT_AGGREGATES, DEFAULT_AGGREGATES]
    assert counter.value(ERROR) == 2.0
    opened.close()


def test_missing_or_foreign_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SQLiteFeatureStore(tmp_path / "absent.sqlite")
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(sqlite3.DatabaseError, match="schema"):
        SQLiteFeatureStore(foreign)


def test_lookup_with_budget_uses_the_settings_budget(
    store: SQLiteFeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import get_settings

    monkeypatch.setenv("FW_SERVE__FEATURE_STORE_TIMEOUT_MS", "30")
    get_settings.cache_clear()
    try:
        counter = FallbackCounter()
        started = time.monotonic()
        result = lookup_with_budget(SleepyStore(store, SLOW_S), ["acct-a"], counter)
        elapsed = time.monotonic() - started
    finally:
        get_settings.cache_clear()
    assert result == [DEFAULT_AGGREGATES]
    assert counter.value(TIMEOUT) == 1.0
    assert elapsed < SLOW_S / 2
    assert lookup_with_budget(store, ["acct-b"], counter, budget_s=ANSWER_BUDGET_S) == [AGGREGATES["acct-b"]]
