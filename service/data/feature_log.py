"""The feature log: each decision's feature vector exactly as the model server computed and scored it, stored under
the router's prediction ID as Parquet partitioned by day — beside the prediction log, which holds the same ID's
decision and, once it arrives, its label.

Where: the model server is the only process that knows the served vector (the request fields, the feature-store
aggregates looked up within their budget, the one feature path); the router is the only one that knows the
prediction ID (``rollout.outcomes.new_prediction_id``, the label join key). The router sends the ID to the version
that decides in the ``X-Prediction-ID`` header (not to shadows: the decider's vector is the one served), and the
model server logs ``(prediction_id, ts, model_version, entity_key, <features>, score, prediction)`` under it. A
request without a valid ID (a client calling the model service directly, a batch) is not logged: no label could
ever join it. The router carries no Parquet code, and its import budget does not change.

The request path pays one locked list append (:meth:`FeatureLogWriter.record`); a background thread writes the
buffer every ``flush_interval_s`` (or once ``flush_max_rows`` wait) as one Parquet file per day touched,
``<root>/day=YYYY-MM-DD/part-<host>-<pid>-<start>-<writer>-<seq>.parquet`` (Hive partitioning: ``day`` is a column to
readers), written under a temporary name and renamed, so a reader never sees half a file. A full buffer
(``max_buffer_rows``: a stalled disk) drops rows and counts them; so does a dataset over its size bound. Retention:
day partitions older than ``retention_days`` are deleted, and the oldest days go first while the dataset is larger
than ``max_bytes`` (the current day is never deleted: instead rows are dropped, counted, until retention frees room).
A SIGKILL loses the rows of the last flush interval; SIGTERM flushes (the service's shutdown hook).

Training sets are built from it by :mod:`service.training.training_set` (labels that arrived by the cut-off joined by
prediction ID): the features are those of the decision, never recomputed later, so the set is point-in-time correct
by construction.

pyarrow is imported by the writer thread, never at import: the module loads with numpy alone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from service.common.logging import get_logger, log_event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from service.settings import FeatureLogSettings

logger = get_logger(__name__)

#: The header the router sends the deciding version with the request's prediction ID (rollout.outcomes uses the
#: same name for the response header).
PREDICTION_ID_HEADER: Final[str] = "X-Prediction-ID"
#: A prediction ID as the router issues it (``secrets.token_urlsafe(16)``: 22 URL-safe characters); anything else
#: is not logged.
_PREDICTION_ID: Final = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
#: The prediction ID of the request being answered (set by the request guard from the header).
PREDICTION_ID: ContextVar[str | None] = ContextVar("fraudwatch_prediction_id", default=None)
DAY_PREFIX: Final[str] = "day="
#: Columns besides the features, in file order.
ID_COLUMNS: Final[tuple[str, ...]] = ("prediction_id", "ts", "model_version", "entity_key")
SCORE_COLUMNS: Final[tuple[str, ...]] = ("score", "prediction")
#: Parquet key-value metadata: the feature names in order (JSON) and the layout's version.
FEATURES_KEY: Final[bytes] = b"fraudwatch.feature_names"
FORMAT_KEY: Final[bytes] = b"fraudwatch.feature_log_format"
FORMAT_VERSION: Final[str] = "1"
#: Numbers the writers of this process (part of their file names).
_WRITERS: Final = itertools.count()

Row = tuple[str, int, str | None, npt.NDArray[np.float32], float, int]


def prediction_id_from_header(value: str | None) -> str | None:
    """The header's prediction ID when it has the router's shape, else None (not logged)."""
    if value is None or _PREDICTION_ID.match(value) is None:
        return None
    return value


def day_dir(root: Path, day: date) -> Path:
    return root / f"{DAY_PREFIX}{day.isoformat()}"


def day_of(path: Path) -> date | None:
    """The day of a ``day=YYYY-MM-DD`` partition directory, or None for anything else."""
    if not path.name.startswith(DAY_PREFIX):
        return None
    try:
        return date.fromisoformat(path.name.removeprefix(DAY_PREFIX))
    except ValueError:
        return None


def partitions(root: Path) -> list[tuple[date, Path]]:
    """The day partitions under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(day, path) for path in root.iterdir() if path.is_dir() and (day := day_of(path)) is not None]
    return sorted(found)


def data_files(directory: Path) -> list[Path]:
    """The finished Parquet files of a partition (temporary files of a write in progress excluded), by name."""
    return sorted(path for path in directory.glob("*.parquet") if path.is_file())


def partition_bytes(directory: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())


@dataclass(frozen=True)
class RetentionResult:
    removed_days: list[str]
    bytes_after: int
    over_budget: bool


def enforce_retention(root: Path, retention_days: int, max_bytes: int, today: date) -> RetentionResult:
    """Delete day partitions older than ``retention_days`` before ``today``, then the oldest days while the dataset
    is larger than ``max_bytes`` (never ``today``'s); ``over_budget`` when it is still larger (writers then drop)."""
    removed: list[str] = []
    oldest_kept = today - timedelta(days=retention_days)
    sizes: list[tuple[date, Path, int]] = []
    for day, path in partitions(root):
        if day < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(day.isoformat())
        else:
            with contextlib.suppress(FileNotFoundError):  # another writer's retention removed it first
                sizes.append((day, path, partition_bytes(path)))
    total = sum(size for _, _, size in sizes)
    for day, path, size in sizes:
        if total <= max_bytes or day >= today:
            break
        shutil.rmtree(path, ignore_errors=True)
        removed.append(day.isoformat())
        total -= size
    return RetentionResult(removed, total, total > max_bytes)


class FeatureLogMetrics:
    """``fraudwatch_feature_log_rows_total{model_version, outcome}``: rows written, or dropped by reason
    (``overflow`` — buffer full; ``over_budget`` — dataset over ``max_bytes``; ``failed`` — a write error)."""

    OUTCOMES: Final[tuple[str, ...]] = ("written", "overflow", "over_budget", "failed")

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        import prometheus_client as prom

        family = _rows_family(registry if registry is not None else prom.REGISTRY)
        self.rows = {outcome: family.labels(version, outcome) for outcome in self.OUTCOMES}

    def count(self, outcome: str, n: int) -> None:
        if n:
            self.rows[outcome].inc(n)


_FAMILIES: dict[int, Any] = {}


def _rows_family(registry: CollectorRegistry) -> Any:
    """One counter family per registry (a second writer in the same process reuses it)."""
    import prometheus_client as prom

    family = _FAMILIES.get(id(registry))
    if family is None:
        family = prom.Counter(
            "fraudwatch_feature_log_rows",
            "Feature-log rows (served feature vectors under a prediction ID): written, or dropped by reason.",
            ["model_version", "outcome"],
            registry=registry,
        )
        _FAMILIES[id(registry)] = family
    return family


class FeatureLogWriter:
    """Buffers served feature vectors and writes them as Parquet from a background thread (module docstring)."""

    def __init__(
        self,
        root: Path,
        settings: FeatureLogSettings,
        model_version: str,
        feature_names: Sequence[str],
        *,
        metrics: FeatureLogMetrics | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.root = root
        self.settings = settings
        self.model_version = model_version
        self.feature_names = tuple(feature_names)
        self.metrics = metrics
        self._clock_ns = clock_ns
        self._rows: list[Row] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._over_budget = False
        self._retention_checked = 0.0
        # unique per writer: two writers of one process (two versions, a reload) never share a file name
        self._prefix = f"part-{_safe(socket.gethostname())}-{os.getpid()}-{clock_ns()}-{next(_WRITERS)}"
        self._seq = 0
        self.written = 0
        self.dropped: dict[str, int] = {"overflow": 0, "over_budget": 0, "failed": 0}

    # ------------------------------------------------------------------ request path

    def record(
        self, prediction_id: str, entity_key: str | None, features: npt.NDArray[np.float32], score: float, pred: int
    ) -> None:
        """Buffer one served decision (never blocks on I/O; drops and counts when the buffer is full)."""
        if self._over_budget:
            self._drop("over_budget", 1)
            return
        row: Row = (prediction_id, self._clock_ns(), entity_key, features, score, pred)
        with self._lock:
            full = len(self._rows) >= self.settings.max_buffer_rows
            if not full:
                self._rows.append(row)
                waiting = len(self._rows)
        if full:
            self._drop("overflow", 1)
        elif waiting >= self.settings.flush_max_rows:
            self._wake.set()

    def record_decisions(
        self,
        prediction_id: str | None,
        entity_keys: Sequence[str | None],
        features: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float64],
        predictions: npt.NDArray[np.int64],
    ) -> None:
        """Log a single decision made under a prediction ID; nothing without one, nor for a batch."""
        if prediction_id is None or features.shape[0] != 1:
            return
        self.record(prediction_id, entity_keys[0], features[0], float(scores[0]), int(predictions[0]))

    # ------------------------------------------------------------------ writing

    def start(self) -> FeatureLogWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_retention()
        self._thread = threading.Thread(target=self._run, name="fraudwatch-feature-log", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import pyarrow  # noqa: F401  (imported here, off the request path and off the import of this module)

        while not self._stopping.is_set():
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write every buffered row now (one file per day touched); the number of rows written."""
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        with self._write_lock:
            try:
                for day, chunk in _by_day(rows):
                    self._write(day, chunk)
            except Exception:
                logger.exception("feature log write failed")
                self._drop("failed", len(rows))
                return 0
            self.written += len(rows)
            if self.metrics is not None:
                self.metrics.count("written", len(rows))
            if time.monotonic() - self._retention_checked >= self.settings.retention_check_interval_s:
                self._check_retention()
        return len(rows)

    def _write(self, day: date, rows: Sequence[Row]) -> Path:
        import pyarrow.parquet as pq

        table = rows_table(rows, self.model_version, self.feature_names)
        directory = day_dir(self.root, day)
        directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        final = directory / f"{self._prefix}-{self._seq:06d}.parquet"
        temporary = directory / f".{final.name}.tmp"
        compression = None if self.settings.compression == "none" else self.settings.compression
        pq.write_table(table, temporary, compression=compression)
        temporary.replace(final)
        return final

    def _check_retention(self) -> None:
        self._retention_checked = time.monotonic()
        today = datetime.fromtimestamp(self._clock_ns() / 1e9, UTC).date()
        result = enforce_retention(self.root, self.settings.retention_days, self.settings.max_bytes, today)
        if result.removed_days or result.over_budget != self._over_budget:
            log_event(
                logger,
                "feature log retention",
                removed_days=result.removed_days,
                bytes=result.bytes_after,
                over_budget=result.over_budget,
            )
        self._over_budget = result.over_budget

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n
        if self.metrics is not None:
            self.metrics.count(reason, n)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and write what is buffered (SIGTERM keeps every answered decision)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.flush()


def rows_table(rows: Sequence[Row], model_version: str, feature_names: Sequence[str]) -> Any:
    """The Parquet table of buffered rows: ids, UTC microsecond timestamps, one float32 column per feature."""
    import pyarrow as pa

    matrix = np.vstack([row[3] for row in rows]).astype(np.float32, copy=False)
    if matrix.shape[1] != len(feature_names):
        raise ValueError(f"{matrix.shape[1]} features logged, {len(feature_names)} names")
    stamps = np.asarray([row[1] for row in rows], dtype=np.int64) // 1000
    columns: dict[str, Any] = {
        "prediction_id": pa.array([row[0] for row in rows], pa.string()),
        "ts": pa.array(stamps, pa.timestamp("us", tz="UTC")),
        "model_version": pa.array([model_version] * len(rows), pa.string()).dictionary_encode(),
        "entity_key": pa.array([row[2] for row in rows], pa.string()),
        **{name: pa.array(matrix[:, i]) for i, name in enumerate(feature_names)},
        "score": pa.array([row[4] for row in rows], pa.float64()),
        "prediction": pa.array([row[5] for row in rows], pa.int8()),
    }
    metadata = {FEATURES_KEY: json.dumps(list(feature_names)).encode(), FORMAT_KEY: FORMAT_VERSION.encode()}
    return pa.table(columns).replace_schema_metadata(metadata)


def _by_day(rows: Sequence[Row]) -> list[tuple[date, list[Row]]]:
    groups: dict[date, list[Row]] = {}
    for row in rows:
        groups.setdefault(datetime.fromtimestamp(row[1] / 1e9, UTC).date(), []).append(row)
    return sorted(groups.items())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:40] or "host"


def open_writer(
    settings: FeatureLogSettings, root: Path, model_version: str, feature_names: Sequence[str]
) -> FeatureLogWriter | None:
    """The started writer of a serving worker when the feature log is enabled, else None."""
    if not settings.enabled:
        return None
    writer = FeatureLogWriter(root, settings, model_version, feature_names, metrics=FeatureLogMetrics(model_version))
    return writer.start()
