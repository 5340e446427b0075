"""The prediction log under load on SQLite and on a real PostgreSQL server: every answered request is written,
labels survive a restart, and the writer rides out a locked database without losing rows."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rollout.router.outcomes.feedback import FEEDBACK_PATH, FeedbackRequest, OutcomeTracker
from rollout.router.outcomes.prediction_log import PredictionLog, PredictionRecord, create_log_engine, ensure_schema
from rollout.router.outcomes.settings import OutcomeSettings
from tests.integration.pg import PostgresServer, running_postgres
from tests.sockets import unaccepting_listener

pytestmark = pytest.mark.integration

N_REQUESTS = 1500
CONCURRENCY = 50
BACKENDS = ["sqlite", "postgresql"]

TOKEN = "label-feed-token"
SOURCE = "chargeback"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'predictions.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"fw_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server.dsn, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield server.dsn.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _count(dsn: str, table: str, **where: Any) -> int:
    engine = sa.create_engine(dsn)
    try:
        clause = " AND ".join(f"{key} = :{key}" for key in where) or "TRUE"
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {clause}"), where).scalar_one())
    finally:
        engine.dispose()


def _scoring_app(log: PredictionLog, tracker: OutcomeTracker) -> Starlette:
    """A stand-in for the router's data plane: answers at once, logs the decider and a shadow off the path."""

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        cid = str(body["id"])
        now = datetime.now(UTC)
        score = (int(cid.rsplit("-", 1)[1]) % 100) / 100.0
        for version, role, threshold in (("v1", "decider", 0.5), ("v2", "shadow", 0.6)):
            log.record(
                PredictionRecord(
                    prediction_id=cid,
                    entity_key=f"acct-{cid}",
                    ts=now,
                    model_version=version,
                    role=role,  # type: ignore[arg-type]
                    score=score,
                    prediction=int(score >= threshold),
                    threshold=threshold,
                    stage="shadow",
                )
            )
        return JSONResponse({"prediction_id": cid, "score": score})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), *tracker.routes()])


async def _answer_all(client: httpx.AsyncClient, ids: list[str]) -> int:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for cid in ids:
        queue.put_nowait(cid)
    answered = 0

    async def worker() -> None:
        nonlocal answered
        while not queue.empty():
            cid = queue.get_nowait()
            response = await client.post("/predict", json={"id": cid})
            assert response.status_code == 200
            answered += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return answered


def test_every_answered_request_is_written_after_close(dsn: str) -> None:
    settings = OutcomeSettings(dsn=dsn, flush_interval_ms=50, flush_max_rows=200)
    registry = CollectorRegistry()
    ids = [f"req-{i}" for i in range(N_REQUESTS)]

    async def main() -> int:
        log = PredictionLog(settings, registry=registry)
        await log.start()
        app = _scoring_app(log, OutcomeTracker(log, registry=registry, tokens={SOURCE: TOKEN}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answered = await _answer_all(client, ids)
        await log.close()
        return answered

    answered = asyncio.run(main())
    assert answered == N_REQUESTS
    assert _count(dsn, "predictions") == 2 * N_REQUESTS
    assert _count(dsn, "predictions", role="shadow") == N_REQUESTS
    assert registry.get_sample_value("fraudwatch_prediction_log_written_total") == 2 * N_REQUESTS
    assert registry.get_sample_value("fraudwatch_prediction_log_buffered_rows") == 0
    assert (registry.get_sample_value("fraudwatch_prediction_log_dropped_total", {"reason": "overflow"}) or 0) == 0


def test_labels_join_after_a_restart_and_stay_idempotent(dsn: str) -> None:
    settings = OutcomeSettings(dsn=dsn)

    async def first_process() -> None:
        registry = CollectorRegistry()
        log = PredictionLog(settings, registry=registry)
        await log.start()
        app = _scoring_app(log, OutcomeTracker(log, registry=registry, tokens={SOURCE: TOKEN}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await _answer_all(client, ["r-91", "r-7"])
            labelled = await client.post(FEEDBACK_PATH, json={"prediction_id": "r-91", "label": 1}, headers=AUTH)
            assert labelled.status_code == 200
        await log.close()

    async def second_process() -> CollectorRegistry:
        registry = CollectorRegistry()
        log = PredictionLog(settings, registry=registry)
        await log.start()
        app = _scoring_app(log, OutcomeTracker(log, registry=registry, tokens={SOURCE: TOKEN}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            again = await client.post(FEEDBACK_PATH, json={"prediction_id": "r-91", "label": "fraud"}, headers=AUTH)
            conflict = await client.post(FEEDBACK_PATH, json={"prediction_id": "r-91", "label": 0}, headers=AUTH)
            fresh = await client.post(FEEDBACK_PATH, json={"prediction_id": "r-7", "label": "fraud"}, headers=AUTH)
            assert (again.status_code, conflict.status_code, fresh.status_code) == (200, 409, 200)
            assert again.json()["status"] == "duplicate"
            assert fresh.json()["predictions"] == 2
        await log.close()
        return registry

    asyncio.run(first_process())
    registry = asyncio.run(second_process())
    # r-7 scored 0.07: below both thresholds → a missed fraud (fn) for the decider and for the shadow
    for version, role in (("v1", "decider"), ("v2", "shadow")):
        labels = {"model_version": version, "role": role, "stage": "shadow", "outcome": "fn"}
        assert registry.get_sample_value("fraudwatch_outcome_total", labels) == 1
        labels["outcome"] = "tp"
        assert registry.get_sample_value("fraudwatch_outcome_total", labels) == 0
    assert _count(dsn, "labels") == 2


def test_a_prediction_table_of_the_previous_release_is_migrated_in_place(dsn: str) -> None:
    """The tables as the release before router-issued prediction IDs and ``stable_version`` created them, with a
    prediction and its label: the log renames the old join key to ``prediction_id`` (the old label still joins its
    prediction), adds the new columns (NULL for the old row), and writes and reads them."""
    old = sa.MetaData()
    sa.Table(
        "labels", old,
        sa.Column("correlation_id", sa.String, primary_key=True), sa.Column("label", sa.SmallInteger, nullable=False),
        sa.Column("source", sa.String, nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )  # fmt: skip
    old_predictions = sa.Table(
        "predictions", old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("correlation_id", sa.String, nullable=False), sa.Column("entity_key", sa.String, nullable=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String, nullable=False), sa.Column("role", sa.String, nullable=False),
        sa.Column("score", sa.Float, nullable=False), sa.Column("prediction", sa.SmallInteger, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False), sa.Column("stage", sa.String, nullable=False),
    )  # fmt: skip
    sa.Index("ix_predictions_correlation_id", old_predictions.c.correlation_id)
    engine = sa.create_engine(dsn)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO predictions (correlation_id, ts, model_version, role, score, prediction, threshold, stage)"
                " VALUES ('old-1', :ts, 'v1', 'decider', 0.9, 1, 0.5, 'full')"
            ),
            {"ts": datetime(2024, 3, 1, tzinfo=UTC)},
        )
        conn.execute(
            sa.text("INSERT INTO labels VALUES ('old-1', 1, 'chargeback', :ts, :ts)"),
            {"ts": datetime(2024, 3, 2, tzinfo=UTC)},
        )
    engine.dispose()

    async def main() -> tuple[PredictionRecord | None, PredictionRecord | None, list[str], str]:
        registry = CollectorRegistry()
        log = PredictionLog(OutcomeSettings(dsn=dsn), registry=registry)
        await log.start()
        now = datetime.now(UTC)
        log.record(
            PredictionRecord(
                "new-1", None, now, "v2", "shadow", 0.2, 0, 0.5, "shadow", stable_version="v1", correlation_id="t-1"
            )
        )
        await log.flush()
        found_old, found_new = await log.find("old-1"), await log.find("new-1")
        relabelled = await OutcomeTracker(log, registry=registry, tokens={SOURCE: TOKEN}).submit(
            FeedbackRequest(prediction_id="old-1", label=0, source="review")
        )
        again = await asyncio.to_thread(ensure_schema, log.engine)  # a second start changes nothing
        await log.close()
        return (found_old[0] if found_old else None), (found_new[0] if found_new else None), again, relabelled.status

    found_old, found_new, again, relabelled = asyncio.run(main())
    assert found_old is not None and found_old.stable_version is None and found_old.stage == "full"
    assert found_old.prediction_id == "old-1" and found_old.correlation_id is None
    assert found_new is not None and (found_new.stable_version, found_new.correlation_id) == ("v1", "t-1")
    assert relabelled == "conflict"  # the old label, stored under the old join key, still stands
    assert again == []
    assert _count(dsn, "predictions") == 2
    engine = sa.create_engine(dsn)
    try:
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("predictions")}
    finally:
        engine.dispose()
    assert indexes == {"ix_predictions_prediction_id"}


def test_overflow_is_dropped_and_counted_never_blocking(dsn: str) -> None:
    capacity = 100
    settings = OutcomeSettings(dsn=dsn, buffer_max_rows=capacity, flush_interval_ms=60_000, flush_max_rows=10_000)
    registry = CollectorRegistry()

    async def main() -> None:
        log = PredictionLog(settings, registry=registry)
        await log.start()
        for i in range(capacity + 37):
            log.record(_record(f"o-{i}"))
        assert log.pending == capacity
        await log.close()
        log.record(_record("after-close"))

    asyncio.run(main())
    assert _count(dsn, "predictions") == capacity
    assert registry.get_sample_value("fraudwatch_prediction_log_dropped_total", {"reason": "overflow"}) == 37
    assert registry.get_sample_value("fraudwatch_prediction_log_dropped_total", {"reason": "closed"}) == 1


def _record(cid: str) -> PredictionRecord:
    return PredictionRecord(cid, None, datetime.now(UTC), "v1", "decider", 0.5, 1, 0.5, "stable")


def test_a_locked_sqlite_database_delays_writes_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    settings = OutcomeSettings(
        dsn=f"sqlite:///{path}", flush_interval_ms=20, sqlite_busy_timeout_s=0.05, retry_backoff_ms=20
    )
    registry = CollectorRegistry()

    async def main() -> None:
        log = PredictionLog(settings, registry=registry)
        await log.start()
        blocker = sqlite3.connect(path, timeout=0.05, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        for i in range(50):
            log.record(_record(f"l-{i}"))
        await _wait_for(lambda: (registry.get_sample_value("fraudwatch_prediction_log_write_errors_total") or 0) >= 2)
        assert log.pending == 50
        found = await _find_while_locked(log)
        assert found == 1
        blocker.execute("ROLLBACK")
        blocker.close()
        await _wait_for(lambda: log.pending == 0)
        await log.close()

    asyncio.run(main())
    assert _count(f"sqlite:///{path}", "predictions") == 50
    assert registry.get_sample_value("fraudwatch_prediction_log_written_total") == 50


async def _find_while_locked(log: PredictionLog) -> int:
    """A reader is not blocked by a writer's lock in WAL mode, and the buffered rows are visible to the join."""
    return len(await log.find("l-3"))


async def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_an_unreachable_postgresql_fails_fast_with_the_reason() -> None:
    """Issue 12, point 5: without a connect timeout libpq waits for the kernel's SYN retries (about two minutes) on a
    database address that does not answer; the log's engine gives up after ``connect_timeout_s``."""
    with unaccepting_listener() as (host, port):
        settings = OutcomeSettings(dsn=f"postgresql+psycopg://fw:fw@{host}:{port}/fw", connect_timeout_s=1.0)
        engine = create_log_engine(settings)
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="timeout"), engine.connect():
            pass
        took = time.monotonic() - started
        engine.dispose()
    assert 0.9 <= took < 10.0, took


def test_an_unexpected_write_error_drops_its_batch_after_bounded_retries_and_the_writer_goes_on(dsn: str) -> None:
    """Not a database outage (those are retried while the buffer lasts) but, e.g., a driver bug: retried
    ``max_unexpected_write_errors`` times, then dropped and counted as "failed" — not retried for ever, blocking every
    later row. The failure is injected (a wrapped ``_write``): a driver bug cannot be caused on demand."""
    settings = OutcomeSettings(dsn=dsn, flush_interval_ms=10, retry_backoff_ms=10, max_unexpected_write_errors=3)
    registry = CollectorRegistry()

    async def main() -> None:
        log = PredictionLog(settings, registry=registry)
        await log.start()
        real_write = log._write
        calls = {"n": 0}

        def broken(batch: Any) -> int:
            calls["n"] += 1
            raise TypeError("cannot adapt type 'Decimal128'")

        log._write = broken  # type: ignore[method-assign]
        for i in range(5):
            log.record(_record(f"bad-{i}"))
        await _wait_for(
            lambda: registry.get_sample_value("fraudwatch_prediction_log_dropped_total", {"reason": "failed"}) == 5
        )
        assert calls["n"] == 3
        log._write = real_write  # type: ignore[method-assign]
        for i in range(7):
            log.record(_record(f"good-{i}"))
        await _wait_for(lambda: log.pending == 0)
        await log.close()

    asyncio.run(main())
    assert _count(dsn, "predictions") == 7
    assert registry.get_sample_value("fraudwatch_prediction_log_written_total") == 7
