"""Precomputed per-entity aggregates, looked up within a hard latency budget with a conservative default.

The store is a SQLite file (``features.sqlite``, usually inside the model bundle) with one row per account,
written by :func:`build_store` atomically (temporary file + rename), so readers never see a half-written store.

:class:`BudgetedLookup` is what the service calls. It never lets a request wait longer than the budget: on a
miss, a timeout or an error it returns :data:`service.data.features.DEFAULT_AGGREGATES` for the key and reports the
fallback (reason ``miss``/``timeout``/``error``) to a callback (the service counts it in Prometheus).

Two execution paths, chosen per store (measured on this machine, see ``benchmarks/serving_benchmark.py``):

* *inline* for stores that enforce a deadline themselves (:class:`DeadlineAwareStore`, e.g. SQLite through its
  progress handler): a primary-key lookup costs ≈ 10 µs and needs no thread hop;
* *isolated* in a small thread pool for any other store (≈ 90 µs sync / ≈ 170 µs from asyncio per hop): the
  caller waits at most the budget, then abandons (and cancels, if not yet started) the lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from service.data.features import DEFAULT_AGGREGATES, EntityAggregates
from service.settings import Settings, get_settings

#: The store's file name inside a model bundle directory.
STORE_FILE: Final[str] = "features.sqlite"
TABLE: Final[str] = "entity_aggregates"
SCHEMA_VERSION: Final[int] = 1
#: Keys per ``IN (...)`` query (well under SQLite's host-parameter limit).
_KEYS_PER_QUERY: Final[int] = 500
#: SQLite VM instructions between two deadline checks of the progress handler.
_PROGRESS_STEPS: Final[int] = 200

MISS: Final[str] = "miss"
TIMEOUT: Final[str] = "timeout"
ERROR: Final[str] = "error"
FALLBACK_REASONS: Final[tuple[str, ...]] = (MISS, TIMEOUT, ERROR)

FallbackCallback = Callable[[str, int], None]


class StoreTimeoutError(TimeoutError):
    """A deadline-aware store gave up because the deadline passed."""


@runtime_checkable
class FeatureStore(Protocol):
    """Per-entity aggregates by key; ``None`` (or absence from the mapping) is a miss."""

    def lookup(self, key: str) -> EntityAggregates | None: ...

    def lookup_many(self, keys: Sequence[str]) -> Mapping[str, EntityAggregates]: ...


@runtime_checkable
class DeadlineAwareStore(FeatureStore, Protocol):
    """A store that stops by itself at ``deadline`` (``time.monotonic()``) with :class:`StoreTimeoutError`;
    such stores are called inline, without a thread hop."""

    def lookup_many_until(self, keys: Sequence[str], deadline: float) -> Mapping[str, EntityAggregates]: ...


def build_store(path: Path, aggregates: Mapping[str, EntityAggregates]) -> None:
    """Write ``aggregates`` to a new SQLite store at ``path``, replacing any previous one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as conn:
            conn.execute(
                f"CREATE TABLE {TABLE} (account_id TEXT PRIMARY KEY NOT NULL, "
                "prior_refunds REAL NOT NULL, avg_refund_amount REAL NOT NULL) WITHOUT ROWID"
            )
            conn.executemany(
                f"INSERT INTO {TABLE} VALUES (?, ?, ?)",  # noqa: S608 - the table name is a module constant
                ((key, agg.prior_refunds, agg.avg_refund_amount) for key, agg in sorted(aggregates.items())),
            )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.commit()
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class SQLiteFeatureStore:
    """Read-only SQLite store: one connection per thread (``mode=ro`` URI), deadline via the progress handler."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(path)
        self.path = path
        self._uri = f"{path.resolve().as_uri()}?mode=ro"
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._check_schema(self._connection())

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so that close() may close every thread's connection; each connection
            # is otherwise used by the one thread that opened it.
            conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False, timeout=0.0)
            self._local.conn = conn
            self._local.deadline = None
            conn.set_progress_handler(self._past_deadline, _PROGRESS_STEPS)
            with self._guard:
                self._all.append(conn)
        return conn

    def _past_deadline(self) -> int:
        deadline: float | None = getattr(self._local, "deadline", None)
        return 1 if deadline is not None and time.monotonic() >= deadline else 0

    @staticmethod
    def _check_schema(conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"feature store schema {version}, expected {SCHEMA_VERSION}")

    def lookup(self, key: str) -> EntityAggregates | None:
        return self.lookup_many([key]).get(key)

    def lookup_many(self, keys: Sequence[str]) -> Mapping[str, EntityAggregates]:
        return self._query(keys, deadline=None)

    def lookup_many_until(self, keys: Sequence[str], deadline: float) -> Mapping[str, EntityAggregates]:
        return self._query(keys, deadline=deadline)

    def _query(self, keys: Sequence[str], deadline: float | None) -> dict[str, EntityAggregates]:
        conn = self._connection()
        unique = list(dict.fromkeys(keys))
        found: dict[str, EntityAggregates] = {}
        self._local.deadline = deadline
        try:
            for start in range(0, len(unique), _KEYS_PER_QUERY):
                chunk = unique[start : start + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT account_id, prior_refunds, avg_refund_amount FROM {TABLE} "  # noqa: S608 - constants
                    f"WHERE account_id IN ({marks})",
                    chunk,
                ).fetchall()
                for key, prior, avg in rows:
                    found[key] = EntityAggregates(prior_refunds=float(prior), avg_refund_amount=float(avg), known=True)
                if deadline is not None and time.monotonic() >= deadline:
                    raise StoreTimeoutError(f"feature store lookup passed its deadline after {len(found)} keys")
        except sqlite3.OperationalError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreTimeoutError("feature store lookup interrupted at its deadline") from exc
            raise
        finally:
            self._local.deadline = None
        return found

    def close(self) -> None:
        with self._guard:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


class BudgetedLookup:
    """Looks entity keys up within ``budget_s``; every key it cannot answer gets the default aggregates.

    ``on_lookups(n)`` is told how many keys were looked up, ``on_fallback(reason, n)`` how many fell back and why.
    """

    def __init__(
        self,
        store: FeatureStore,
        budget_s: float,
        *,
        on_fallback: FallbackCallback,
        on_lookups: Callable[[int], None] | None = None,
        inline: bool = True,
        threads: int = 2,
    ) -> None:
        self.store = store
        self.budget_s = budget_s
        self._on_fallback = on_fallback
        self._on_lookups = on_lookups
        self.inline = inline and isinstance(store, DeadlineAwareStore)
        self._pool: ThreadPoolExecutor | None = (
            None if self.inline else ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featurestore")
        )

    def lookup(self, keys: Sequence[str | None]) -> list[EntityAggregates]:
        """Blocking form: at most ``budget_s`` of waiting. One aggregate per key; ``None`` keys get the default
        without a lookup (a request without an entity key is not a fallback)."""
        wanted = _wanted(keys)
        if not wanted:
            return [DEFAULT_AGGREGATES] * len(keys)
        if self.inline:
            found, failure = self._inline(wanted)
        else:
            found, failure = self._threaded(wanted)
        return self._resolve(keys, wanted, found, failure)

    async def alookup(self, keys: Sequence[str | None]) -> list[EntityAggregates]:
        """Asyncio form of :meth:`lookup`: the event loop is never blocked longer than an inline lookup."""
        wanted = _wanted(keys)
        if not wanted:
            return [DEFAULT_AGGREGATES] * len(keys)
        if self.inline:
            found, failure = self._inline(wanted)
        else:
            found, failure = await self._athreaded(wanted)
        return self._resolve(keys, wanted, found, failure)

    def _inline(self, wanted: list[str]) -> tuple[Mapping[str, EntityAggregates], str | None]:
        assert isinstance(self.store, DeadlineAwareStore)
        try:
            return self.store.lookup_many_until(wanted, time.monotonic() + self.budget_s), None
        except StoreTimeoutError:
            return {}, TIMEOUT
        except Exception:
            return {}, ERROR

    def _submit(self, wanted: list[str]) -> Future[Mapping[str, EntityAggregates]]:
        assert self._pool is not None
        return self._pool.submit(self.store.lookup_many, wanted)

    def _threaded(self, wanted: list[str]) -> tuple[Mapping[str, EntityAggregates], str | None]:
        future = self._submit(wanted)
        try:
            return future.result(timeout=self.budget_s), None
        except FutureTimeout:
            future.cancel()
            return {}, TIMEOUT
        except Exception:
            return {}, ERROR

    async def _athreaded(self, wanted: list[str]) -> tuple[Mapping[str, EntityAggregates], str | None]:
        future = self._submit(wanted)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.budget_s), None
        except TimeoutError:
            future.cancel()
            return {}, TIMEOUT
        except Exception:
            return {}, ERROR

    def _resolve(
        self,
        keys: Sequence[str | None],
        wanted: list[str],
        found: Mapping[str, EntityAggregates],
        failure: str | None,
    ) -> list[EntityAggregates]:
        n_keys = sum(key is not None for key in keys)
        if self._on_lookups is not None:
            self._on_lookups(n_keys)
        if failure is not None:
            self._on_fallback(failure, n_keys)
            return [DEFAULT_AGGREGATES] * len(keys)
        result = [DEFAULT_AGGREGATES if key is None else found.get(key, DEFAULT_AGGREGATES) for key in keys]
        misses = sum(key is not None and key not in found for key in keys)
        if misses:
            self._on_fallback(MISS, misses)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _wanted(keys: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(key for key in keys if key is not None))


def budget_seconds(settings: Settings) -> float:
    """The lookup budget: ``serve.feature_store_timeout_ms`` in seconds."""
    return settings.serve.feature_store_timeout_ms / 1000.0


def lookup_with_budget(
    store: FeatureStore,
    keys: Sequence[str | None],
    on_fallback: FallbackCallback,
    budget_s: float | None = None,
) -> list[EntityAggregates]:
    """One-off budgeted lookup (a throw-away :class:`BudgetedLookup`; long-lived callers keep one instead).
    The budget defaults to the settings' ``serve.feature_store_timeout_ms``."""
    budget = budget_seconds(get_settings()) if budget_s is None else budget_s
    lookup = BudgetedLookup(store, budget, on_fallback=on_fallback)
    try:
        return lookup.lookup(keys)
    finally:
        lookup.close()


def open_store(directory: Path) -> SQLiteFeatureStore | None:
    """The store inside a bundle directory, or ``None`` when the bundle ships none."""
    path = directory / STORE_FILE
    return SQLiteFeatureStore(path) if path.is_file() else None
