"""The prediction log: what each model version said about each scored request, kept for the label join.

``record`` never blocks and never touches the database: it appends to a bounded in-memory buffer (overflow is
dropped and counted). A background task flushes every ``flush_interval_ms`` or as soon as ``flush_max_rows`` rows
wait, in a worker thread, in one transaction per batch. ``close`` flushes everything recorded before it.
A prediction still in the buffer (or in the batch being written) is found by the label join
(:mod:`rollout.router.outcomes.feedback`). Each log owns a durable mark (:mod:`rollout.router.outcomes.marks`) that
counts the rows a SIGKILL loses.

Join key: the router issues an unguessable ``prediction_id`` for each scored request and returns it to the client
(the label feed cites it); the decider's record and the shadow records of that same request share it, and nothing
else does. The client's ``X-Correlation-ID`` is stored beside it as a tracing field and joins nothing: a client that
sends 50 requests under one correlation ID gets 50 prediction IDs, and one label counts for one of them.

``stage`` is a column: the routing stage in force when the prediction was made, and ``stable_version`` the routing
table's stable then.

``record`` and the async methods must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from rollout.router.outcomes.marks import OrphanMark, RunMark, claim_orphans
from rollout.router.outcomes.settings import OutcomeSettings, get_outcome_settings
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

Role = Literal["decider", "shadow"]
LABEL_NAMES: Final[dict[int, str]] = {1: "fraud", 0: "legit"}
#: The response header (and body member ``prediction_id``) carrying the router's ID of a scored request.
PREDICTION_ID_HEADER: Final[str] = "X-Prediction-ID"
#: Bytes of randomness in a prediction ID (``secrets.token_urlsafe``: 22 URL-safe characters).
PREDICTION_ID_BYTES: Final[int] = 16


def new_prediction_id() -> str:
    """An unguessable ID for one scored request: the label join key, issued by the router, never by a client."""
    return secrets.token_urlsafe(PREDICTION_ID_BYTES)


@dataclass(frozen=True)
class PredictionRecord:
    """One answer of one model version to one request."""

    #: The router's ID of the request (the label join key): shared by its decider and shadow records only.
    prediction_id: str
    entity_key: str | None
    ts: datetime
    model_version: str
    role: Role
    score: float
    prediction: int
    threshold: float
    #: The routing stage in force when the prediction was made.
    stage: str
    #: The routing table's stable version when the prediction was made (names the sides of a pair); None in rows
    #: written before the column existed.
    stable_version: str | None = None
    #: The client's ``X-Correlation-ID`` (tracing only; never a join key); None in rows written before the column.
    correlation_id: str | None = None


# --------------------------------------------------------------------------------------------------- schema

metadata = MetaData()

predictions_table = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("prediction_id", String, nullable=False),
    Column("entity_key", String, nullable=True),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("model_version", String, nullable=False),
    Column("role", String, nullable=False),
    Column("score", Float, nullable=False),
    Column("prediction", SmallInteger, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("stage", String, nullable=False),
    Column("stable_version", String, nullable=True),
    Column("correlation_id", String, nullable=True),
)
prediction_id_index = Index("ix_predictions_prediction_id", predictions_table.c.prediction_id)

labels_table = Table(
    "labels",
    metadata,
    Column("prediction_id", String, primary_key=True),
    Column("label", SmallInteger, nullable=False),
    Column("source", String, nullable=False),
    Column("observed_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)


def as_utc(value: datetime) -> datetime:
    """Aware UTC; a naive value (SQLite returns those) is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: Releases before router-issued prediction IDs joined labels on the client's correlation ID: that column is the
#: join key of their rows, renamed in place (old labels keep joining their old predictions).
_RENAMED_JOIN_KEYS: Final[tuple[str, ...]] = ("predictions", "labels")
_OLD_JOIN_KEY: Final[str] = "correlation_id"
_OLD_JOIN_INDEX: Final[str] = "ix_predictions_correlation_id"


def _rename_old_join_keys(conn: Any) -> list[str]:
    """``correlation_id`` → ``prediction_id`` in tables of an older release (``ALTER TABLE … RENAME COLUMN``, the
    same statement on SQLite ≥ 3.25 and PostgreSQL); their old index is replaced by the new one."""
    renamed: list[str] = []
    for name in _RENAMED_JOIN_KEYS:
        present = {column["name"] for column in inspect(conn).get_columns(name)}
        if "prediction_id" in present or _OLD_JOIN_KEY not in present:
            continue
        conn.exec_driver_sql(f'ALTER TABLE {name} RENAME COLUMN "{_OLD_JOIN_KEY}" TO "prediction_id"')
        renamed.append(f"{name}.{_OLD_JOIN_KEY}->prediction_id")
    if renamed:
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {_OLD_JOIN_INDEX}")
    prediction_id_index.create(conn, checkfirst=True)
    return renamed


def ensure_schema(engine: Engine) -> list[str]:
    """Create the tables if needed, rename an older release's join key (:func:`_rename_old_join_keys`) and add any
    nullable column a table of an older release lacks (``ALTER TABLE … ADD COLUMN``, the same statement on SQLite
    and PostgreSQL; old rows read NULL there). Returns the columns renamed and added."""
    metadata.create_all(engine)
    added: list[str] = []
    with engine.begin() as conn:
        added.extend(_rename_old_join_keys(conn))
        for table in metadata.sorted_tables:
            present = {column["name"] for column in inspect(conn).get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise RuntimeError(f"table {table.name!r} lacks the required column {column.name!r}")
                column_type = column.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {column_type}')
                added.append(f"{table.name}.{column.name}")
    if added:
        log_event(logger, "prediction log schema migrated", added_columns=added)
    return added


def create_log_engine(settings: OutcomeSettings) -> Engine:
    """An engine for the DSN: SQLite in WAL mode with a busy timeout, or a pooled server database."""
    url = make_url(settings.database_url())
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": settings.sqlite_busy_timeout_s})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":  # libpq waits for ever by default: fail fast, say why
        connect_args["connect_timeout"] = max(1, math.ceil(settings.connect_timeout_s))
    return create_engine(url, pool_size=settings.pool_size, pool_pre_ping=True, connect_args=connect_args)


def mark_dir_of(settings: OutcomeSettings) -> Path | None:
    """Where the log's durable marks live: ``mark_dir``, else ``<database file>.marks`` for a SQLite file, else none."""
    if settings.mark_dir is not None:
        return settings.mark_dir
    url = make_url(settings.database_url())
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).with_name(Path(url.database).name + ".marks")
    return None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _row_of(record: PredictionRecord) -> dict[str, Any]:
    return {
        "prediction_id": record.prediction_id,
        "entity_key": record.entity_key,
        "ts": as_utc(record.ts),
        "model_version": record.model_version,
        "role": record.role,
        "score": float(record.score),
        "prediction": int(record.prediction),
        "threshold": float(record.threshold),
        "stage": record.stage,
        "stable_version": record.stable_version,
        "correlation_id": record.correlation_id,
    }


def _rows_of(batch: Sequence[PredictionRecord]) -> tuple[list[dict[str, Any]], int]:
    """Insertable rows, and how many records could not be converted (logged and counted as rejected)."""
    rows: list[dict[str, Any]] = []
    malformed = 0
    for record in batch:
        try:
            rows.append(_row_of(record))
        except (TypeError, ValueError, AttributeError) as exc:
            malformed += 1
            log_event(
                logger,
                "malformed prediction record rejected",
                logging.ERROR,
                rejected_prediction_id=str(getattr(record, "prediction_id", None)),
                error=str(exc),
            )
    return rows, malformed


def _record_of(row: Any) -> PredictionRecord:
    return PredictionRecord(
        prediction_id=row.prediction_id,
        entity_key=row.entity_key,
        ts=as_utc(row.ts),
        model_version=row.model_version,
        role=row.role,
        score=float(row.score),
        prediction=int(row.prediction),
        threshold=float(row.threshold),
        stage=row.stage,
        stable_version=row.stable_version,
        correlation_id=row.correlation_id,
    )


def _identity(record: PredictionRecord) -> tuple[Any, ...]:
    """What makes two copies of a prediction (one in memory, one read back) the same prediction."""
    return (record.model_version, record.role, as_utc(record.ts), record.score, record.prediction, record.threshold)


def unique_predictions(records: Iterable[PredictionRecord]) -> list[PredictionRecord]:
    seen: set[tuple[Any, ...]] = set()
    out: list[PredictionRecord] = []
    for record in records:
        key = _identity(record)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


# --------------------------------------------------------------------------------------------------- the log


class PredictionLogUnavailableError(RuntimeError):
    """The prediction log's database cannot be reached (the router refuses to start, naming it)."""


class _TransientWriteError(RuntimeError):
    """The database could not be reached or was busy; the batch stays buffered and is retried."""


class _LogMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.written = Counter(
            "fraudwatch_prediction_log_written", "Prediction rows written to the log.", registry=registry
        )
        self.dropped = Counter(
            "fraudwatch_prediction_log_dropped",
            "Prediction rows not written: overflow (buffer full), closed (recorded after close), "
            "rejected (the database refused the row), lost (still failing at close), failed (an unexpected write "
            "error, repeated), killed (accepted by a router process that was killed before writing them, counted "
            "by the next one started on its mark directory).",
            ["reason"],
            registry=registry,
        )
        self.dropped.labels("killed")  # exists at zero: a kill counted at the next start shows as an increase
        self.write_errors = Counter(
            "fraudwatch_prediction_log_write_errors", "Failed batch writes (retried).", registry=registry
        )
        self.buffered = Gauge(
            "fraudwatch_prediction_log_buffered_rows", "Rows waiting to be written.", registry=registry
        )
        self.flush_seconds = Histogram(
            "fraudwatch_prediction_log_flush_seconds", "Duration of one batch write.", registry=registry
        )


class PredictionLog:
    """A batched, non-blocking writer of :class:`PredictionRecord` rows, and their lookup by prediction ID."""

    def __init__(
        self,
        settings: OutcomeSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        engine: Engine | None = None,
    ) -> None:
        self._settings = settings or get_outcome_settings()
        self._engine = engine or create_log_engine(self._settings)
        self._metrics = _LogMetrics(registry if registry is not None else REGISTRY)
        self._buffer: deque[PredictionRecord] = deque()
        self._inflight: list[PredictionRecord] = []
        #: The records in ``_buffer`` and ``_inflight`` by prediction ID: a label's lookup reads its few records
        #: in O(1) instead of scanning up to ``buffer_max_rows`` rows on the event loop.
        self._unwritten: dict[str, list[PredictionRecord]] = {}
        #: Unexpected (not outage) write errors in a row.
        self._unexpected = 0
        #: This process' durable mark (rows accepted / settled), once started with a mark directory.
        self._mark: RunMark | None = None
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._started = False

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def settings(self) -> OutcomeSettings:
        return self._settings

    def check_reachable(self) -> None:
        """Connect once (within ``connect_timeout_s`` for PostgreSQL); :class:`PredictionLogUnavailableError` names
        the database (password hidden) and the driver's reason when that fails."""
        try:
            with self._engine.connect():
                pass
        except (OperationalError, InterfaceError) as exc:
            where = self._engine.url.render_as_string(hide_password=True)
            raise PredictionLogUnavailableError(f"prediction log database {where} unreachable: {exc.orig}") from exc

    @property
    def pending(self) -> int:
        """Rows recorded but not yet written (buffered or being written)."""
        return len(self._buffer) + len(self._inflight)

    async def start(self) -> None:
        """Create the tables if needed, count what killed logs on the same mark directory lost, take a mark of this
        process' own and start the background writer."""
        await asyncio.to_thread(ensure_schema, self._engine)
        await asyncio.to_thread(self._take_mark)
        self._started = True
        self._task = asyncio.create_task(self._run(), name="prediction-log-writer")
        log_event(logger, "prediction log started", backend=self._engine.url.get_backend_name())

    def _take_mark(self) -> None:
        directory = mark_dir_of(self._settings)
        if directory is None:
            return
        try:
            orphans = claim_orphans(directory)
            self._mark = RunMark.create(directory)
        except OSError as exc:  # the log works without it; what a kill loses would go uncounted
            log_event(logger, "prediction log runs without a durable mark", logging.WARNING, mark_dir=str(directory),
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return
        for orphan in orphans:
            self._count_killed(orphan)

    def _count_killed(self, orphan: OrphanMark) -> None:
        if orphan.lost:
            self._metrics.dropped.labels("killed").inc(orphan.lost)
        log_event(
            logger, "prediction log rows lost by a killed router" if orphan.lost else "prediction log mark claimed",
            logging.ERROR if orphan.lost else logging.INFO, event="prediction_log_killed_rows", rows=orphan.lost,
            recorded=orphan.recorded, settled=orphan.settled, killed_pid=orphan.pid,
            killed_started_at=datetime.fromtimestamp(orphan.started_at, UTC).isoformat(), mark=str(orphan.path),
        )  # fmt: skip

    def record(self, rec: PredictionRecord) -> None:
        """Queue one prediction for writing; never blocks. Dropped (and counted) when the buffer is full."""
        if self._closed:
            self._metrics.dropped.labels("closed").inc()
            return
        if len(self._buffer) >= self._settings.buffer_max_rows:
            self._metrics.dropped.labels("overflow").inc()
            return
        if self._mark is not None:
            self._mark.record()
        self._buffer.append(rec)
        self._unwritten.setdefault(rec.prediction_id, []).append(rec)
        self._metrics.buffered.set(len(self._buffer))
        if len(self._buffer) >= self._settings.flush_max_rows:
            self._wake.set()

    async def flush(self) -> None:
        """Write everything recorded so far; raises when the database cannot be reached (rows stay buffered)."""
        await self._drain()

    async def find(self, prediction_id: str) -> list[PredictionRecord]:
        """Every prediction of one request (its decider and shadows): written ones and those still in memory.

        Memory is read before the database, so a batch that moves from memory to the database in between is
        seen at least once (copies are merged).
        """
        in_memory = list(self._unwritten.get(prediction_id, ()))
        stored = await asyncio.to_thread(self._select, prediction_id)
        return unique_predictions([*stored, *in_memory])

    async def close(self) -> None:
        """Stop the writer after flushing everything recorded before the call; then release the database."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if not self._started and self._buffer:
            await asyncio.to_thread(ensure_schema, self._engine)
        await self._drain_until(time.monotonic() + self._settings.close_timeout_s)
        await asyncio.to_thread(self._engine.dispose)
        mark, self._mark = self._mark, None
        if mark is not None:  # kept (for the next start to count) only if something is still unaccounted for
            mark.close(remove=mark.recorded == mark.settled)
        log_event(logger, "prediction log closed")

    async def _run(self) -> None:
        interval = self._settings.flush_interval_ms / 1000.0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            try:
                await self._drain()
            except _TransientWriteError:
                await asyncio.sleep(self._settings.retry_backoff_ms / 1000.0)

    async def _drain_until(self, deadline: float) -> None:
        while self._buffer:
            try:
                await self._drain()
            except _TransientWriteError:
                if time.monotonic() >= deadline:
                    lost = len(self._buffer)
                    self._metrics.dropped.labels("lost").inc(lost)
                    self._settle(lost)
                    log_event(logger, "prediction log closed with unwritten rows", logging.ERROR, rows=lost)
                    self._buffer.clear()
                    self._unwritten.clear()
                    return
                await asyncio.sleep(self._settings.retry_backoff_ms / 1000.0)

    async def _drain(self) -> None:
        async with self._write_lock:
            while self._buffer:
                size = min(len(self._buffer), self._settings.flush_max_rows)
                batch = [self._buffer.popleft() for _ in range(size)]
                self._inflight = batch
                try:
                    await self._write_batch(batch)
                finally:
                    self._inflight = []
                    self._metrics.buffered.set(len(self._buffer))

    async def _write_batch(self, batch: list[PredictionRecord]) -> None:
        started = time.perf_counter()
        try:
            rejected = await asyncio.to_thread(self._write, batch)
        except _TransientWriteError:
            self._buffer.extendleft(reversed(batch))
            self._metrics.write_errors.inc()
            raise
        except Exception as exc:  # not a database outage: retried a few times, then the batch is dropped, counted
            self._metrics.write_errors.inc()
            self._unexpected += 1
            if self._unexpected >= self._settings.max_unexpected_write_errors:
                self._unexpected = 0
                self._metrics.dropped.labels("failed").inc(len(batch))
                self._settle(len(batch))
                log_event(logger, "prediction log batch dropped after repeated unexpected write errors",
                          logging.ERROR, rows=len(batch), error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                self._forget(batch)
                return
            self._buffer.extendleft(reversed(batch))
            logger.exception("prediction log write failed unexpectedly; will retry")
            raise _TransientWriteError(str(exc)) from exc
        self._unexpected = 0
        self._forget(batch)
        self._metrics.flush_seconds.observe(time.perf_counter() - started)
        self._metrics.written.inc(len(batch) - rejected)
        if rejected:
            self._metrics.dropped.labels("rejected").inc(rejected)

    def _settle(self, rows: int) -> None:
        if self._mark is not None:
            self._mark.settle(rows)

    def _forget(self, batch: Sequence[PredictionRecord]) -> None:
        """Drop a batch that left memory (written, or refused for good) from the in-memory index."""
        for rec in batch:
            rows = self._unwritten.get(rec.prediction_id)
            if rows is None:
                continue
            rows[:] = [r for r in rows if r is not rec]
            if not rows:
                del self._unwritten[rec.prediction_id]

    def _write(self, batch: Sequence[PredictionRecord]) -> int:
        """Insert a batch in one transaction; on a data error fall back to one row per transaction.
        Returns how many rows the database refused."""
        rows, malformed = _rows_of(batch)
        if not rows:
            self._settle(malformed)
            return malformed
        try:
            with self._engine.begin() as conn:
                conn.execute(predictions_table.insert(), rows)
            self._settle(len(batch))  # at once after the commit: a kill between the two over-counts this batch
            return malformed
        except (OperationalError, InterfaceError) as exc:
            log_event(
                logger, "prediction log write failed; will retry", logging.WARNING, rows=len(rows), error=str(exc.orig)
            )
            raise _TransientWriteError(str(exc)) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise _TransientWriteError(str(exc)) from exc
            rejected = self._write_rows_one_by_one(rows)
            self._settle(len(batch))
            return malformed + rejected

    def _write_rows_one_by_one(self, rows: Sequence[dict[str, Any]]) -> int:
        rejected = 0
        for row in rows:
            try:
                with self._engine.begin() as conn:
                    conn.execute(predictions_table.insert(), row)
            except (OperationalError, InterfaceError) as exc:
                raise _TransientWriteError(str(exc)) from exc
            except DBAPIError as exc:
                rejected += 1
                log_event(
                    logger,
                    "prediction row rejected by the database",
                    logging.ERROR,
                    rejected_prediction_id=row["prediction_id"],
                    error=str(exc.orig),
                )
        return rejected

    def _select(self, prediction_id: str) -> list[PredictionRecord]:
        query = (
            select(predictions_table)
            .where(predictions_table.c.prediction_id == prediction_id)
            .order_by(predictions_table.c.id)
        )
        with self._engine.connect() as conn:
            return [_record_of(row) for row in conn.execute(query)]


# --------------------------------------------------------------------------------------------------- feedback


FeedbackStatus = Literal["recorded", "duplicate", "conflict", "unknown"]
