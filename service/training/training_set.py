"""Training sets built from what serving saw: the feature log joined with the labels that arrived by a cut-off.

Point-in-time correct by construction: every row's features are the vector the model server scored at decision
time (:mod:`service.data.feature_log`), never recomputed later from aggregates that have since moved; a label counts
only if it had arrived (``received_at``) by ``as_of``, so a retrain at T can be rebuilt exactly from what was known
at T; and the row's version must be the one that decided (the prediction log's ``decider`` row of the prediction ID)
— a candidate that scored, timed out and was rescued by stable does not put its vector in the set.

Layout of a training set (the input of every engine in :mod:`service.training.engines`)::

    <dir>/training_set.json        feature names, window, as_of, rows, positives, per-day counts, provenance
    <dir>/day=YYYY-MM-DD/part-00000.parquet
                                   ts (UTC, µs), one float32 column per feature, label (int8), prediction_id,
                                   model_version — rows in time order within a file, files in day order

Built one day partition at a time (memory bounded by one day of the feature log and the window's labels); files of
the feature log written under other feature names (an older feature version) are skipped and counted.

Labels come from the prediction log's database (``rollout.outcomes``: tables ``predictions`` and ``labels``), read
with SQLAlchemy over a read-only query; the schema is rollout's, checked by tests/integration/test_training_set.py
against the real prediction log.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.common.clock import as_utc
from service.common.logging import get_logger, log_event
from service.data.feature_log import FEATURES_KEY, data_files, day_dir, partitions

logger = get_logger(__name__)

META_FILE: Final[str] = "training_set.json"
LABEL: Final[str] = "label"
TS: Final[str] = "ts"
PART_FILE: Final[str] = "part-00000.parquet"


# -------------------------------------------------------------------------------------------------------- labels


def read_labels(dsn: str, as_of: datetime, since: datetime) -> pa.Table:
    """The labels that arrived by ``as_of`` for decisions made after ``since``, each with the version that decided:
    columns ``prediction_id``, ``model_version``, ``label`` (int8), ``received_at``."""
    from sqlalchemy import DateTime, Integer, String, and_, column, create_engine, select, table

    predictions = table(
        "predictions",
        column("prediction_id", String),
        column("model_version", String),
        column("role", String),
        column("ts", DateTime(timezone=True)),
    )
    labels = table(
        "labels",
        column("prediction_id", String),
        column("label", Integer),
        column("received_at", DateTime(timezone=True)),
    )
    query = (
        select(labels.c.prediction_id, predictions.c.model_version, labels.c.label, labels.c.received_at)
        .select_from(labels.join(predictions, labels.c.prediction_id == predictions.c.prediction_id))
        .where(and_(predictions.c.role == "decider", labels.c.received_at <= as_of, predictions.c.ts > since))
    )
    engine = create_engine(dsn)
    try:
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    return pa.table(
        {
            "prediction_id": pa.array([row[0] for row in rows], pa.string()),
            "model_version": pa.array([row[1] for row in rows], pa.string()),
            LABEL: pa.array([int(row[2]) for row in rows], pa.int8()),
            "received_at": pa.array([as_utc(row[3]) for row in rows], pa.timestamp("us", tz="UTC")),
        }
    )


# ------------------------------------------------------------------------------------------------------ building


@dataclass
class TrainingSetInfo:
    """What a training set holds and how it was made (``training_set.json``)."""

    feature_names: list[str]
    start: str
    end: str
    as_of: str
    rows: int = 0
    positives: int = 0
    days: dict[str, int] = field(default_factory=dict)
    logged_rows: int = 0
    unlabelled_rows: int = 0
    skipped_files: int = 0
    source: str = "feature_log"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_training_set(
    feature_log: Path,
    labels: pa.Table,
    feature_names: list[str],
    start: datetime,
    end: datetime,
    as_of: datetime,
    out_dir: Path,
) -> TrainingSetInfo:
    """Join the feature log's decisions with ``start`` < ts ≤ ``end`` to their ``labels`` (:func:`read_labels`) on
    (prediction ID, deciding version), one day at a time, into ``out_dir`` (replaced)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    info = TrainingSetInfo(list(feature_names), start.isoformat(), end.isoformat(), as_of.isoformat())
    keyed = labels.select(["prediction_id", "model_version", LABEL])
    for day, path in partitions(feature_log):
        if not start.date() <= day <= end.date():
            continue
        logged = _read_day(path, feature_names, info)
        if logged is None:
            continue
        stamps = logged[TS]
        logged = logged.filter(pc.and_(pc.greater(stamps, pa.scalar(start, stamps.type)),
                                       pc.less_equal(stamps, pa.scalar(end, stamps.type))))  # fmt: skip
        info.logged_rows += logged.num_rows
        joined = logged.join(keyed, keys=["prediction_id", "model_version"], join_type="inner")
        info.unlabelled_rows += logged.num_rows - joined.num_rows
        if joined.num_rows == 0:
            continue
        joined = joined.sort_by(TS).select([TS, *feature_names, LABEL, "prediction_id", "model_version"])
        _write_day(out_dir, day, joined, feature_names)
        info.rows += joined.num_rows
        info.positives += int(pc.sum(joined[LABEL]).as_py() or 0)
        info.days[day.isoformat()] = joined.num_rows
    (out_dir / META_FILE).write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
    summary = {k: v for k, v in info.to_dict().items() if k not in ("feature_names", "days")}
    log_event(logger, "training set built", directory=str(out_dir), **summary)
    return info


def _read_day(path: Path, feature_names: list[str], info: TrainingSetInfo) -> pa.Table | None:
    """The day's logged rows written under exactly ``feature_names`` (other files skipped and counted)."""
    wanted = json.dumps(list(feature_names)).encode()
    tables = []
    for file in data_files(path):
        metadata = pq.read_schema(file).metadata or {}
        if metadata.get(FEATURES_KEY) != wanted:
            info.skipped_files += 1
            continue
        tables.append(pq.read_table(file, columns=["prediction_id", TS, "model_version", *feature_names]))
    if not tables:
        return None
    table = pa.concat_tables(tables)
    return table.set_column(2, "model_version", pc.cast(table["model_version"], pa.string()))


def _write_day(out_dir: Path, day: date, table: pa.Table, feature_names: list[str]) -> Path:
    metadata = {FEATURES_KEY: json.dumps(list(feature_names)).encode()}
    directory = day_dir(out_dir, day)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / PART_FILE
    pq.write_table(table.replace_schema_metadata(metadata), target, compression="zstd")
    return target


# ------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TrainingSet:
    """A training set directory (the module docstring's layout)."""

    directory: Path
    feature_names: tuple[str, ...]
    files: tuple[Path, ...]
    rows_per_file: tuple[int, ...]
    meta: dict[str, Any]

    @classmethod
    def open(cls, directory: Path) -> TrainingSet:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        files = tuple(file for _, path in partitions(directory) for file in data_files(path))
        rows = tuple(pq.ParquetFile(file).metadata.num_rows for file in files)
        return cls(directory, tuple(meta["feature_names"]), files, rows, meta)

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)

    def row_at(self, index: int) -> Any:
        """The timestamp of the ``index``-th row in time order (reading one file's ``ts`` column)."""
        for file, count in zip(self.files, self.rows_per_file, strict=True):
            if index < count:
                return pq.read_table(file, columns=[TS])[TS][index].as_py()
            index -= count
        raise IndexError("row index beyond the training set")


@dataclass(frozen=True)
class TimeSplit:
    """Consecutive time windows: train ts < ``valid_from`` ≤ valid ts < ``test_from`` ≤ test ts."""

    valid_from: datetime
    test_from: datetime

    def to_dict(self) -> dict[str, str]:
        return {"valid_from": self.valid_from.isoformat(), "test_from": self.test_from.isoformat()}


def time_split(training_set: TrainingSet, train_fraction: float, valid_fraction: float) -> TimeSplit:
    """The cut timestamps at the ``train_fraction`` and ``train + valid`` fractions of the rows in time order."""
    n = training_set.rows
    n_train, n_valid = int(n * train_fraction), int(n * valid_fraction)
    if n_train == 0 or n_train + n_valid >= n:
        raise ValueError(f"{n} rows cannot be split {train_fraction}/{valid_fraction}/rest")
    return TimeSplit(training_set.row_at(n_train), training_set.row_at(n_train + n_valid))


Window = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[Any]]


def window_mask(stamps: pa.Array, split: TimeSplit, window: str) -> pa.Array:
    """Rows of ``window`` (train / valid / test) by the split's cut timestamps."""
    lower = pa.scalar(split.valid_from, stamps.type)
    upper = pa.scalar(split.test_from, stamps.type)
    if window == "train":
        return pc.less(stamps, lower)
    if window == "valid":
        return pc.and_(pc.greater_equal(stamps, lower), pc.less(stamps, upper))
    return pc.greater_equal(stamps, upper)


def table_arrays(table: pa.Table, feature_names: tuple[str, ...]) -> Window:
    """Features (float32, C order), labels and timestamps of a training-set table."""
    x = np.column_stack([table[name].to_numpy() for name in feature_names]).astype(np.float32, copy=False)
    y = table[LABEL].to_numpy().astype(np.int64)
    return np.ascontiguousarray(x), y, table[TS].to_numpy()


def read_window(training_set: TrainingSet, split: TimeSplit, window: str) -> Window:
    """One window's rows in memory (the local engine; and the validation/test windows of the others)."""
    columns = [TS, *training_set.feature_names, LABEL]
    parts = []
    for file in training_set.files:
        table = pq.read_table(file, columns=columns)
        parts.append(table.filter(window_mask(table[TS], split, window)))
    return table_arrays(pa.concat_tables(parts), training_set.feature_names)


def write_training_set(
    out_dir: Path,
    stamps: npt.NDArray[Any],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[Any],
    feature_names: list[str],
    source: str,
    *,
    append: bool = False,
) -> TrainingSetInfo:
    """Write labelled feature rows (any order) as a training set: sorted by time, one file per UTC day.

    With ``append`` the rows are added to an existing set, as one more file per day (a generator writing in
    chunks); the rows must then come after every row already written."""
    if not append and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_FILE
    info = (
        TrainingSetInfo(**json.loads(meta_path.read_text(encoding="utf-8")))
        if append and meta_path.exists()
        else TrainingSetInfo(list(feature_names), "", "", "", source=source)
    )
    order = np.argsort(stamps, kind="stable")
    moments = np.asarray(stamps)[order].astype("datetime64[us]")
    table = pa.table(
        {
            TS: pa.array(moments, pa.timestamp("us", tz="UTC")),
            **{
                name: pa.array(np.ascontiguousarray(x[order, i], dtype=np.float32))
                for i, name in enumerate(feature_names)
            },
            LABEL: pa.array(np.asarray(y)[order].astype(np.int8)),
        }
    )
    days = moments.astype("datetime64[D]")
    for day in np.unique(days):
        mask = days == day
        start, stop = int(np.argmax(mask)), int(mask.size - np.argmax(mask[::-1]))
        part = table.slice(start, stop - start)
        moment = date.fromisoformat(str(day))
        directory = day_dir(out_dir, moment)
        index = len(data_files(directory)) if directory.exists() else 0
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {FEATURES_KEY: json.dumps(list(feature_names)).encode()}
        pq.write_table(part.replace_schema_metadata(metadata), directory / f"part-{index:05d}.parquet")
        info.days[moment.isoformat()] = info.days.get(moment.isoformat(), 0) + part.num_rows
    info.rows += int(y.size)
    info.positives += int(np.asarray(y).sum())
    info.start = info.start or str(moments[0])
    info.end = str(moments[-1])
    meta_path.write_text(json.dumps(info.to_dict(), indent=2), encoding="utf-8")
    return info
