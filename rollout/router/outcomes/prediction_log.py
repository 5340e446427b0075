"""The prediction log and the label join: what each model version said, and what turned out to be true.

Data plane::

    router ──record()──▶ PredictionLog buffer ──background flush (thread, executemany)──▶ predictions table
    label source ──POST /api/v1/feedback──▶ OutcomeTracker ──find(prediction_id)──▶ the predictions of that request
                                             ├──▶ labels table (first label wins; the primary key arbitrates)
                                             ├──▶ outcome metrics per (model_version, role, stage)
                                             └──▶ paired tables per (stable, candidate, stage)

``record`` never blocks and never touches the database: it appends to a bounded in-memory buffer (overflow is
dropped and counted). A background task flushes every ``flush_interval_ms`` or as soon as ``flush_max_rows`` rows
wait, in a worker thread, in one transaction per batch. ``close`` flushes everything recorded before it.
A prediction still in the buffer (or in the batch being written) is found by the label join.

Join key: the router issues an unguessable ``prediction_id`` for each scored request and returns it to the client
(the label feed cites it); the decider's record and the shadow records of that same request share it, and nothing
else does. The client's ``X-Correlation-ID`` is stored beside it as a tracing field and joins nothing: a client that
sends 50 requests under one correlation ID gets 50 prediction IDs, and one label counts for one of them.

Label sources: each has its own bearer token (source → token); a label's ``source`` is the one its token
authenticates (the body may omit it; naming another is a 403 naming ``source``), quotas count per authenticated
source, and the stored label carries it — a source cannot post, or exhaust the quota, under another's name.

Label policy: the first label of a prediction ID stands. The same label again → 200 ``duplicate`` (counted once);
a different label → 409. Outcome metrics are updated once per label, for every prediction of the ID (the decider
and each shadow), with that prediction's own decision (taken at its own threshold). A shadow prediction logged
after its label arrived gets no outcome (labels arrive days later; shadows answer within seconds).

``stage`` on every outcome series is the routing stage in force when the PREDICTION was made (a column of the
log), not when its label arrived: a gate of stage S counts exactly the predictions made while the arms ran side by
side in S, whenever their labels come. A request both versions scored (the decider and a shadow of the same
prediction ID) also counts once, when its label arrives, in the paired tables — both decisions
(``fraudwatch_outcome_paired_total``: discordant pairs per label give paired recall, precision and decision-rate
differences) and both score bins (``fraudwatch_outcome_paired_score_total``: a paired AUC difference). The sides
are named after the routing table's stable at prediction time (column ``stable_version``), as the shadow
comparison series are (:func:`rollout.core.routing.comparison_pair`).

Series are created at zero when a routing table names their (version, role, stage) or (pair, stage) — the tracker
observes the router's table store — so Prometheus sees the first label as an increase (the paired score table's
cells excepted: see :meth:`OutcomeTracker.prepare_pair`).

``record`` and the async methods must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Summary
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
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
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rollout.core.drift import calibration_bin_of
from rollout.core.routing import ComparisonPair, RoutePlan, comparison_pair
from rollout.router.outcomes.marks import OrphanMark, RunMark, claim_orphans
from rollout.router.outcomes.settings import OutcomeSettings, get_outcome_settings
from service.api.schema import ErrorDetail, ErrorResponse
from service.common.clock import utc_now
from service.common.http import bearer_matches, read_limited
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)

Role = Literal["decider", "shadow"]
FEEDBACK_PATH: Final[str] = "/api/v1/feedback"
FEEDBACK_BATCH_PATH: Final[str] = "/api/v1/feedback/batch"
SECONDS_PER_HOUR: Final[float] = 3600.0
LABEL_NAMES: Final[dict[int, str]] = {1: "fraud", 0: "legit"}
#: The response header (and body member ``prediction_id``) carrying the router's ID of a scored request.
PREDICTION_ID_HEADER: Final[str] = "X-Prediction-ID"
#: Bytes of randomness in a prediction ID (``secrets.token_urlsafe``: 22 URL-safe characters).
PREDICTION_ID_BYTES: Final[int] = 16
#: An insecure development tracker (no tokens) takes each label's own source, or this one when it names none.
INSECURE_SOURCE: Final[str] = "unauthenticated"
#: What :meth:`OutcomeTracker._authenticated_source` answers for such a tracker (not a source name: it has a space).
ANY_SOURCE: Final[str] = "any source"
_LABEL_VALUES: Final[dict[str, int]] = {name: value for value, name in LABEL_NAMES.items()}


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


def _parse_label(value: object) -> int:
    """``"fraud"``/``"legit"`` (any case) or ``1``/``0``; booleans and other numbers are refused."""
    if isinstance(value, str) and value.strip().lower() in _LABEL_VALUES:
        return _LABEL_VALUES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in LABEL_NAMES:
        return value
    raise ValueError('must be "fraud", "legit", 1 or 0')


class FeedbackRequest(BaseModel):
    """A ground-truth label for one earlier prediction (joined by ``prediction_id``).

    Length limits come from :class:`OutcomeSettings`, passed as validation context ``{"settings": …}``.
    """

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    prediction_id: str = Field(..., min_length=1)
    label: Annotated[int, BeforeValidator(_parse_label)]
    #: The label source. On the wire optional: the router binds it to the source the bearer token authenticates
    #: (a body naming another source is refused); a label is stored under the authenticated source only.
    source: str | None = Field(None, min_length=1)
    #: When the truth became known (e.g. the chargeback date); default: when the label was received.
    observed_at: AwareDatetime | None = None

    @field_validator("prediction_id")
    @classmethod
    def _prediction_id_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _context_settings(info).max_prediction_id_chars
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value

    @field_validator("source")
    @classmethod
    def _source_length(cls, value: str | None, info: ValidationInfo) -> str | None:
        limit = _context_settings(info).max_source_chars
        if value is not None and len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value


def _context_settings(info: ValidationInfo) -> OutcomeSettings:
    context = info.context if isinstance(info.context, dict) else {}
    settings = context.get("settings")
    return settings if isinstance(settings, OutcomeSettings) else get_outcome_settings()


FeedbackStatus = Literal["recorded", "duplicate", "conflict", "unknown"]


@dataclass(frozen=True)
class StoredLabel:
    label: int
    source: str
    observed_at: datetime
    received_at: datetime


@dataclass(frozen=True)
class FeedbackResult:
    status: FeedbackStatus
    prediction_id: str
    predictions: int
    existing: StoredLabel | None = None


class _OutcomeMetrics:
    def __init__(self, registry: CollectorRegistry, settings: OutcomeSettings) -> None:
        by_version = ["model_version", "role", "stage"]
        self.outcomes = Counter(
            "fraudwatch_outcome",
            "Labelled predictions by confusion-matrix cell, at each prediction's own threshold; stage = the routing "
            "stage when the prediction was made.",
            [*by_version, "outcome"],
            registry=registry,
        )
        self.score = Histogram(
            "fraudwatch_outcome_score",
            "Scores of labelled predictions, split by the label (ROC-AUC from the two histograms).",
            [*by_version, "label"],
            buckets=settings.score_buckets,
            registry=registry,
        )
        self.calibration_predicted = Summary(
            "fraudwatch_calibration_predicted",
            "Scores of labelled predictions per equal-width calibration bin (_sum / _count = mean score).",
            [*by_version, "bin"],
            registry=registry,
        )
        self.calibration_observed = Counter(
            "fraudwatch_calibration_observed_fraud",
            "Labelled predictions per calibration bin whose label is fraud (÷ _count = observed rate).",
            [*by_version, "bin"],
            registry=registry,
        )
        self.label_delay = Histogram(
            "fraudwatch_label_delay_seconds",
            "Time from a prediction to the observation of its label.",
            by_version,
            buckets=tuple(h * SECONDS_PER_HOUR for h in settings.label_delay_buckets_hours),
            registry=registry,
        )
        by_pair = ["stable", "candidate", "stage", "label"]
        self.paired = Counter(
            "fraudwatch_outcome_paired",
            "Labelled requests both versions scored (decider + shadow), by label and each side's prediction; "
            "stage = the routing stage when the predictions were made.",
            [*by_pair, "stable_prediction", "candidate_prediction"],
            registry=registry,
        )
        self.paired_score = Counter(
            "fraudwatch_outcome_paired_score",
            "Labelled requests both versions scored, by label and each side's score bin (non-cumulative cells; "
            "*_le = the bin's upper edge, +Inf last).",
            [*by_pair, "stable_le", "candidate_le"],
            registry=registry,
        )
        self.feedback = Counter(
            "fraudwatch_feedback",
            "Feedback labels by result (recorded, duplicate, conflict, unknown, invalid, unauthorized, forbidden, "
            "over_quota, unavailable).",
            ["result"],
            registry=registry,
        )


def confusion_cell(prediction: int, label: int) -> Literal["tp", "fp", "tn", "fn"]:
    if prediction == 1:
        return "tp" if label == 1 else "fp"
    return "fn" if label == 1 else "tn"


def le_of(edge: float) -> str:
    """A bucket edge spelt as a Prometheus histogram's ``le`` label (prometheus_client: ``repr`` of the float for
    the edges of scores in [0, 1], ``+Inf``)."""
    return "+Inf" if math.isinf(edge) else repr(float(edge))


def bin_edges(buckets: Sequence[float]) -> tuple[str, ...]:
    """The ``le`` label values of the bins of ``buckets``, as Prometheus histograms spell them, ``+Inf`` last."""
    return (*(le_of(b) for b in buckets), "+Inf")


def score_bin(score: float, buckets: Sequence[float]) -> str:
    """The upper edge (``le`` value) of the bin holding ``score``: the smallest bucket ≥ score, else ``+Inf``."""
    index = bisect.bisect_left(buckets, score)
    return le_of(buckets[index]) if index < len(buckets) else "+Inf"


@dataclass(frozen=True)
class PairedPrediction:
    """The two versions' predictions of one request, named after the rollout's sides."""

    pair: ComparisonPair
    stage: str
    stable: PredictionRecord
    candidate: PredictionRecord


def paired_predictions(found: Sequence[PredictionRecord]) -> list[PairedPrediction]:
    """The (decider, shadow) pairs among the predictions of one prediction ID, made in the same stage.

    The sides follow the routing table's stable at prediction time, as the shadow comparison series do; a row
    without ``stable_version`` (written before the column) falls back to the stage: in ``full`` the shadow is the
    old stable, in every other stage the decider is stable.
    """
    deciders = [r for r in found if r.role == "decider"]
    if not deciders:
        return []
    decider = deciders[0]
    out: list[PairedPrediction] = []
    for shadow in found:
        if shadow.role != "shadow" or shadow.stage != decider.stage or shadow.model_version == decider.model_version:
            continue
        table_stable = shadow.stable_version or decider.stable_version
        if table_stable is None:
            table_stable = shadow.model_version if decider.stage == "full" else decider.model_version
        pair = comparison_pair(decider.model_version, shadow.model_version, table_stable)
        stable_rec, candidate_rec = (shadow, decider) if pair.shadow_is_stable else (decider, shadow)
        out.append(PairedPrediction(pair, decider.stage, stable_rec, candidate_rec))
    return out


def plan_series(plan: RoutePlan) -> tuple[set[tuple[str, Role, str]], set[tuple[str, str, str]]]:
    """The (version, role, stage) and (stable, candidate, stage) a routing plan can produce predictions for."""
    stage = plan.stage
    versions: set[tuple[str, Role, str]] = set()
    pairs: set[tuple[str, str, str]] = set()
    for route in (plan.stable_route, plan.candidate_route):
        if route is None:
            continue
        versions.add((route.decider.version, "decider", stage))
        if route.fallback is not None:
            versions.add((route.fallback.version, "decider", stage))
        for shadow in route.shadows:
            versions.add((shadow.version, "shadow", stage))
            pair = comparison_pair(route.decider.version, shadow.version, plan.table.stable.version)
            pairs.add((pair.stable, pair.candidate, stage))
    return versions, pairs


class OutcomeTracker:
    """Joins labels to logged predictions and keeps the outcome metrics; serves ``POST /api/v1/feedback``."""

    def __init__(
        self,
        log: PredictionLog,
        settings: OutcomeSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        tokens: Mapping[str, str] | None = None,
        insecure_dev: bool = False,
    ) -> None:
        """``tokens``: each label source's bearer token (source → token, e.g.
        :meth:`rollout.settings.RouterSettings.feedback_credentials`); none refuses every label unless
        ``insecure_dev``, which takes the body's ``source`` (else :data:`INSECURE_SOURCE`) unauthenticated."""
        self._log = log
        self._tokens = dict(tokens or {})
        self._insecure_dev = insecure_dev
        self._quota_window = -1
        self._quota_used: dict[tuple[str, int], int] = {}
        self._settings = settings or log.settings
        self._metrics = _OutcomeMetrics(registry if registry is not None else REGISTRY, self._settings)
        self._prepared: set[tuple[str, Role, str]] = set()
        self._prepared_pairs: set[tuple[str, str, str]] = set()

    def routes(self) -> list[Route]:
        """The feedback routes, for the router's control listener (never its public one)."""
        return [
            Route(FEEDBACK_PATH, self.feedback_endpoint, methods=["POST"]),
            Route(FEEDBACK_BATCH_PATH, self.feedback_batch_endpoint, methods=["POST"]),
        ]

    async def submit(self, feedback: FeedbackRequest, received_at: datetime | None = None) -> FeedbackResult:
        """Store the label (first one wins) and, when it is new, update the outcome metrics of every prediction.
        ``feedback.source`` must be set (the endpoints set it to the authenticated source)."""
        if feedback.source is None:
            raise ValueError("a label is submitted with its (authenticated) source")
        received = as_utc(received_at or utc_now())
        observed = as_utc(feedback.observed_at or received)
        pid = feedback.prediction_id
        found = await self._log.find(pid)
        if not found:
            return self._counted(FeedbackResult("unknown", pid, 0))
        new = StoredLabel(label=feedback.label, source=feedback.source, observed_at=observed, received_at=received)
        existing = await asyncio.to_thread(self._store_label, pid, new)
        if existing is None:
            self.observe(found, feedback.label, observed)
            return self._counted(FeedbackResult("recorded", pid, len(found)))
        status: FeedbackStatus = "duplicate" if existing.label == feedback.label else "conflict"
        return self._counted(FeedbackResult(status, pid, len(found), existing))

    # ------------------------------------------------------------------ table store observer

    def table_applied(self, plan: RoutePlan, _source: str) -> None:
        """Create at zero every outcome and paired series the new routing table can feed (see :meth:`prepare`)."""
        versions, pairs = plan_series(plan)
        for version, role, stage in sorted(versions):
            self.prepare(version, role, stage)
        for stable, candidate, stage in sorted(pairs):
            self.prepare_pair(stable, candidate, stage)

    def table_refused(self, _source: str, _result: str, _detail: str) -> None:
        return

    def prepare(self, model_version: str, role: Role, stage: str) -> None:
        """Create every outcome series of a (version, role, stage) at zero, so Prometheus sees the first labels as
        an increase (a series born with a non-zero value counts as no increase). Called when a routing table names
        the version (:meth:`table_applied`); :meth:`observe` does it for any it has not seen."""
        keys = (model_version, role, stage)
        if keys in self._prepared:
            return
        self._prepared.add(keys)
        for cell in ("tp", "fp", "tn", "fn"):
            self._metrics.outcomes.labels(*keys, cell)
        for label_name in LABEL_NAMES.values():
            self._metrics.score.labels(*keys, label_name)
        for cal_bin in range(self._settings.calibration_bins):
            self._metrics.calibration_predicted.labels(*keys, str(cal_bin))
            self._metrics.calibration_observed.labels(*keys, str(cal_bin))
        self._metrics.label_delay.labels(*keys)

    def prepare_pair(self, stable: str, candidate: str, stage: str) -> None:
        """Create the 8 paired prediction cells of a (stable, candidate, stage) at zero. The score table's cells
        ((edges + 1)² × 2 of them) are created when first counted — at zero they would multiply the router's
        exposition (scraped every few seconds) by thousands of series per rollout — so ``increase()`` does not see
        the first count of each score cell: read it with ``(x unless x offset W) or increase(x[W])``, or over the
        total of the 8 cells."""
        keys = (stable, candidate, stage)
        if keys in self._prepared_pairs:
            return
        self._prepared_pairs.add(keys)
        for label_name in LABEL_NAMES.values():
            for stable_prediction in ("0", "1"):
                for candidate_prediction in ("0", "1"):
                    self._metrics.paired.labels(*keys, label_name, stable_prediction, candidate_prediction)

    def observe(self, found: Sequence[PredictionRecord], label: int, observed_at: datetime) -> None:
        """Outcome metrics for a label joined to predictions, each under the stage of its prediction; and the
        paired tables for the requests both versions scored."""
        label_name = LABEL_NAMES[label]
        for rec in found:
            keys = (rec.model_version, rec.role, rec.stage)
            self.prepare(*keys)
            self._metrics.outcomes.labels(*keys, confusion_cell(rec.prediction, label)).inc()
            self._metrics.score.labels(*keys, label_name).observe(rec.score)
            cal_bin = str(calibration_bin_of(rec.score, self._settings.calibration_bins))
            self._metrics.calibration_predicted.labels(*keys, cal_bin).observe(rec.score)
            self._metrics.calibration_observed.labels(*keys, cal_bin).inc(label)
            delay = max(0.0, (as_utc(observed_at) - as_utc(rec.ts)).total_seconds())
            self._metrics.label_delay.labels(*keys).observe(delay)
        buckets = self._settings.paired_score_buckets
        for paired in paired_predictions(found):
            keys_pair = (paired.pair.stable, paired.pair.candidate, paired.stage)
            self.prepare_pair(*keys_pair)
            self._metrics.paired.labels(
                *keys_pair, label_name, str(paired.stable.prediction), str(paired.candidate.prediction)
            ).inc()
            stable_le, candidate_le = (
                score_bin(paired.stable.score, buckets),
                score_bin(paired.candidate.score, buckets),
            )
            self._metrics.paired_score.labels(*keys_pair, label_name, stable_le, candidate_le).inc()

    def _counted(self, result: FeedbackResult) -> FeedbackResult:
        self._metrics.feedback.labels(result.status).inc()
        return result

    def _store_label(self, prediction_id: str, new: StoredLabel) -> StoredLabel | None:
        """Insert the label unless one exists; return the existing one (None when this one was stored)."""
        existing = self._read_label(prediction_id)
        if existing is not None:
            return existing
        row = {
            "prediction_id": prediction_id,
            "label": new.label,
            "source": new.source,
            "observed_at": new.observed_at,
            "received_at": new.received_at,
        }
        try:
            with self._log.engine.begin() as conn:
                conn.execute(labels_table.insert(), row)
        except IntegrityError:
            return self._read_label(prediction_id)
        return None

    def _read_label(self, prediction_id: str) -> StoredLabel | None:
        query = select(labels_table).where(labels_table.c.prediction_id == prediction_id)
        with self._log.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return StoredLabel(
            label=int(row.label),
            source=row.source,
            observed_at=as_utc(row.observed_at),
            received_at=as_utc(row.received_at),
        )

    def _authenticated_source(self, request: Request) -> str | None:
        """The label source whose token the request carries (every token is compared, in constant time each);
        :data:`ANY_SOURCE` for an insecure development tracker without tokens; None → 401."""
        if not self._tokens:
            return ANY_SOURCE if self._insecure_dev else None
        authorization = request.headers.get("authorization")
        matched = [source for source, token in self._tokens.items() if bearer_matches(authorization, token)]
        return matched[0] if matched else None

    def _bind(self, feedback: FeedbackRequest, source: str) -> FeedbackRequest | None:
        """The label under its authenticated source, or None when the body names another source."""
        if source == ANY_SOURCE:
            return feedback if feedback.source is not None else feedback.model_copy(update={"source": INSECURE_SOURCE})
        if feedback.source is not None and feedback.source != source:
            return None
        return feedback.model_copy(update={"source": source})

    def _wrong_source(self, feedback: FeedbackRequest) -> Response:
        self._metrics.feedback.labels("forbidden").inc()
        return _error(
            403,
            f"source {feedback.source!r} is not the label source this token authenticates",
            "source",
            "omit it, or name the source of the bearer token",
        )

    def _unauthorized(self) -> Response:
        self._metrics.feedback.labels("unauthorized").inc()
        response = _error(401, "missing or wrong bearer token", "authorization", "a label source's bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="fraudwatch-feedback"'
        return response

    def _over_quota(self, source: str | None) -> bool:
        """A fixed one-minute window of labels per ``source`` (``feedback_quota_per_minute``)."""
        now = time.monotonic()
        window = int(now // 60.0)
        key = (source or INSECURE_SOURCE, window)
        if self._quota_window != window:
            self._quota_window = window
            self._quota_used.clear()
        used = self._quota_used.get(key, 0)
        if used >= self._settings.feedback_quota_per_minute:
            return True
        self._quota_used[key] = used + 1
        return False

    async def _read_json(self, request: Request, limit: int) -> tuple[object, Response | None]:
        """The parsed body, or the 4xx to answer: the read stops at ``limit`` bytes, and any body that is not JSON
        (including one nested too deep for the parser) is a 400."""
        body = await read_limited(request, limit)
        if body is None:
            self._metrics.feedback.labels("invalid").inc()
            return None, _error(413, f"body larger than {limit} bytes", "body", "too large")
        try:
            return json.loads(body), None
        except (ValueError, RecursionError):
            self._metrics.feedback.labels("invalid").inc()
            return None, _error(400, "body is not valid JSON", "body", "expected a JSON object")

    async def feedback_endpoint(self, request: Request) -> Response:
        source = self._authenticated_source(request)
        if source is None:
            return self._unauthorized()
        payload, refused = await self._read_json(request, self._settings.max_body_bytes)
        if refused is not None:
            return refused
        try:
            parsed = FeedbackRequest.model_validate(payload, context={"settings": self._settings})
        except ValidationError as exc:
            self._metrics.feedback.labels("invalid").inc()
            return _validation_error(exc)
        feedback = self._bind(parsed, source)
        if feedback is None:
            return self._wrong_source(parsed)
        if self._over_quota(feedback.source):
            self._metrics.feedback.labels("over_quota").inc()
            return _error(429, f"label quota of source {feedback.source!r} exhausted; retry later", "source", "quota")
        try:
            result = await self.submit(feedback)
        except (OperationalError, InterfaceError) as exc:
            self._metrics.feedback.labels("unavailable").inc()
            log_event(logger, "feedback join failed: prediction log unavailable", logging.ERROR, error=str(exc.orig))
            return _error(503, "the prediction log is unavailable; retry later", "prediction_id", "not looked up")
        return _response_of(result, feedback)

    async def feedback_batch_endpoint(self, request: Request) -> Response:
        """Many labels per call, each accepted or refused on its own (``results[i]`` answers ``labels[i]``).

        Retrying a batch counts nothing twice: a label already stored answers ``duplicate`` and changes no metric.
        """
        source = self._authenticated_source(request)
        if source is None:
            return self._unauthorized()
        payload, refused = await self._read_json(request, self._settings.max_batch_body_bytes)
        if refused is not None:
            return refused
        items = payload.get("labels") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            self._metrics.feedback.labels("invalid").inc()
            return _error(422, "invalid feedback batch: labels", "labels", "a non-empty list of labels")
        if len(items) > self._settings.max_batch_labels:
            self._metrics.feedback.labels("invalid").inc()
            limit = self._settings.max_batch_labels
            return _error(422, f"invalid feedback batch: at most {limit} labels", "labels", "too many labels")
        results = [await self._one_of_batch(item, source) for item in items]
        return JSONResponse({"results": results}, status_code=200)

    async def _one_of_batch(self, item: object, source: str) -> dict[str, Any]:
        try:
            parsed = FeedbackRequest.model_validate(item, context={"settings": self._settings})
        except ValidationError as exc:
            self._metrics.feedback.labels("invalid").inc()
            fields = [".".join(str(part) for part in err["loc"]) or "label" for err in exc.errors()]
            return {"status": "invalid", "fields": fields}
        feedback = self._bind(parsed, source)
        if feedback is None:
            self._metrics.feedback.labels("forbidden").inc()
            return {"status": "forbidden", "prediction_id": parsed.prediction_id, "fields": ["source"]}
        if self._over_quota(feedback.source):
            self._metrics.feedback.labels("over_quota").inc()
            return {"status": "over_quota", "prediction_id": feedback.prediction_id}
        try:
            result = await self.submit(feedback)
        except (OperationalError, InterfaceError):
            self._metrics.feedback.labels("unavailable").inc()
            return {"status": "unavailable", "prediction_id": feedback.prediction_id}
        return {"status": result.status, "prediction_id": result.prediction_id, "predictions": result.predictions}


def _error(status: int, message: str, field: str, detail: str) -> JSONResponse:
    body = ErrorResponse(error=message, details=[ErrorDetail(field=field, message=detail)])
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_error(exc: ValidationError) -> JSONResponse:
    details = [
        ErrorDetail(field=".".join(str(part) for part in err["loc"]) or "body", message=err["msg"])
        for err in exc.errors()
    ]
    names = ", ".join(d.field for d in details)
    body = ErrorResponse(error=f"invalid feedback: {names}", details=details)
    return JSONResponse(body.model_dump(), status_code=422)


def _response_of(result: FeedbackResult, feedback: FeedbackRequest) -> JSONResponse:
    pid = result.prediction_id
    # The 404 and the 409 name only what the caller sent: never the stored label, its source or its time (a label
    # feed that needs them reads the prediction log; the router's log line below has them for operators).
    if result.status == "unknown":
        return _error(
            404,
            f"unknown prediction_id {pid!r}: no prediction was logged under this ID",
            "prediction_id",
            "no prediction with this prediction_id",
        )
    if result.status == "conflict" and result.existing is not None:
        first = result.existing
        log_event(
            logger,
            "conflicting label refused",
            prediction_id=pid,
            label=LABEL_NAMES[feedback.label],
            source=feedback.source,
            stored_label=LABEL_NAMES[first.label],
            stored_source=first.source,
            stored_received_at=first.received_at.isoformat(),
        )
        return _error(
            409,
            f"conflicting label for {pid!r}: a different label is already recorded; the first label stands",
            "label",
            "conflicts with the label already recorded",
        )
    return JSONResponse(
        {
            "status": result.status,
            "prediction_id": pid,
            "label": LABEL_NAMES[feedback.label],
            "predictions": result.predictions,
        },
        status_code=200,
    )
