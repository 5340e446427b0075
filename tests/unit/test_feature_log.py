"""The feature log on a real filesystem with real Parquet files: day partitions, retention by age and by size (the
current day never deleted; writers drop and count rows while over budget), the buffer bound, and the training-set
join (deciding version, the window, labels by the cut-off, other feature versions skipped)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.data.feature_log import (
    FEATURES_KEY,
    FeatureLogWriter,
    data_files,
    day_dir,
    enforce_retention,
    partitions,
    prediction_id_from_header,
)
from service.settings import FeatureLogSettings
from service.training.training_set import META_FILE, TrainingSet, build_training_set

NAMES = ("amount", "yearsActive", "ipAccounts")
DAY0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """The writer's clock (nanoseconds since the epoch), moved by the test."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> int:
        return int(self.moment.timestamp() * 1e9)


def writer_at(
    root: Path, clock: Clock, version: str = "v1", names: tuple[str, ...] = NAMES, **kw: object
) -> FeatureLogWriter:
    settings = FeatureLogSettings.model_validate({"enabled": True, "flush_interval_s": 3600, **kw})
    return FeatureLogWriter(root, settings, version, names, clock_ns=clock)


def pid(i: int) -> str:
    return f"prediction-{i:08d}-abcdefgh"


def vector(i: int, width: int = len(NAMES)) -> np.ndarray:
    return np.arange(width, dtype=np.float32) + np.float32(i) / 4


def test_rows_land_in_their_day_partition_with_the_feature_names(tmp_path: Path) -> None:
    clock = Clock(DAY0)
    writer = writer_at(tmp_path, clock)
    for i in range(3):
        writer.record(pid(i), f"acct-{i}", vector(i), 0.1 * i, i % 2)
    clock.moment = DAY0 + timedelta(days=1)
    writer.record(pid(3), None, vector(3), 0.9, 1)
    assert writer.flush() == 4
    days = partitions(tmp_path)
    assert [day for day, _ in days] == [date(2026, 3, 1), date(2026, 3, 2)]
    first = pq.read_table(data_files(days[0][1])[0])
    assert first.column("prediction_id").to_pylist() == [pid(0), pid(1), pid(2)]
    assert first.column("entity_key").to_pylist() == ["acct-0", "acct-1", "acct-2"]
    np.testing.assert_array_equal(first.column("yearsActive").to_numpy(), [1.0, 1.25, 1.5])
    assert json.loads(first.schema.metadata[FEATURES_KEY]) == list(NAMES)
    assert not list(tmp_path.rglob(".*.tmp"))  # written under a temporary name, then renamed


def test_retention_deletes_days_past_the_age_bound(tmp_path: Path) -> None:
    for offset in range(5):
        (day_dir(tmp_path, date(2026, 3, 1) + timedelta(days=offset))).mkdir(parents=True)
    result = enforce_retention(tmp_path, retention_days=2, max_bytes=2**30, today=date(2026, 3, 5))
    assert result.removed_days == ["2026-03-01", "2026-03-02"]
    assert [d.isoformat() for d, _ in partitions(tmp_path)] == ["2026-03-03", "2026-03-04", "2026-03-05"]


def test_retention_deletes_the_oldest_days_past_the_size_bound_but_never_today(tmp_path: Path) -> None:
    for offset in range(4):
        directory = day_dir(tmp_path, date(2026, 3, 1) + timedelta(days=offset))
        directory.mkdir(parents=True)
        (directory / "part.parquet").write_bytes(b"x" * 1000)
    result = enforce_retention(tmp_path, retention_days=30, max_bytes=2500, today=date(2026, 3, 4))
    assert result.removed_days == ["2026-03-01", "2026-03-02"] and result.bytes_after == 2000
    assert not result.over_budget
    # today alone over the bound: kept, and reported over budget
    alone = enforce_retention(tmp_path, retention_days=30, max_bytes=500, today=date(2026, 3, 4))
    assert alone.removed_days == ["2026-03-03"] and alone.over_budget
    assert [d for d, _ in partitions(tmp_path)] == [date(2026, 3, 4)]


def test_a_writer_over_its_size_bound_drops_and_counts_rows(tmp_path: Path) -> None:
    directory = day_dir(tmp_path, DAY0.date())
    directory.mkdir(parents=True)
    (directory / "big.parquet").write_bytes(b"x" * (2**20 + 1))
    writer = writer_at(tmp_path, Clock(DAY0), max_bytes=2**20).start()
    try:
        writer.record(pid(1), None, vector(1), 0.5, 0)
        assert writer.dropped["over_budget"] == 1 and writer.flush() == 0
    finally:
        writer.close()


def test_a_full_buffer_drops_and_counts_rows(tmp_path: Path) -> None:
    writer = writer_at(tmp_path, Clock(DAY0), max_buffer_rows=2, flush_max_rows=10)
    for i in range(5):
        writer.record(pid(i), None, vector(i), 0.5, 0)
    assert writer.dropped["overflow"] == 3 and writer.flush() == 2


def test_only_router_shaped_prediction_ids_are_logged() -> None:
    assert prediction_id_from_header("Zx8_-" * 4 + "ab") == "Zx8_-" * 4 + "ab"
    for bad in (None, "", "short", "has space in it!!!!!", "a" * 65, "../../etc/passwd-xxxxx"):
        assert prediction_id_from_header(bad) is None


def labels_table(rows: list[tuple[str, str, int, datetime]]) -> pa.Table:
    return pa.table(
        {
            "prediction_id": pa.array([r[0] for r in rows], pa.string()),
            "model_version": pa.array([r[1] for r in rows], pa.string()),
            "label": pa.array([r[2] for r in rows], pa.int8()),
            "received_at": pa.array([r[3] for r in rows], pa.timestamp("us", tz="UTC")),
        }
    )


def test_the_training_set_joins_on_the_deciding_version_within_the_window(tmp_path: Path) -> None:
    log = tmp_path / "log"
    clock = Clock(DAY0)
    v1, v2 = writer_at(log, clock, "v1"), writer_at(log, clock, "v2")
    for i in range(6):
        clock.moment = DAY0 + timedelta(hours=i)
        v1.record(pid(i), None, vector(i), 0.1, 0)
        v2.record(pid(i), None, vector(100 + i), 0.2, 0)  # the same requests scored by another version
    clock.moment = DAY0 + timedelta(hours=1)
    other = writer_at(log, clock, "v1", ("amount", "yearsActive"))  # an older feature version
    other.record(pid(1), None, vector(1, 2), 0.1, 0)
    for writer in (v1, v2, other):
        writer.flush()
    # labels of decisions by v1; pid(5) decided by v2; pid(0) outside the window
    labels = labels_table(
        [(pid(i), "v1", i % 2, DAY0) for i in range(5)] + [(pid(5), "v2", 1, DAY0)],
    )
    start, end = DAY0 + timedelta(minutes=30), DAY0 + timedelta(hours=6)
    info = build_training_set(log, labels, list(NAMES), start, end, DAY0 + timedelta(days=1), tmp_path / "set")
    assert info.rows == 5 and info.positives == 3 and info.skipped_files == 1
    # v1's pid(1..4) and v2's pid(5): v1's pid(5) and v2's pid(1..4) are not the deciding vectors
    assert info.logged_rows == 10 and info.unlabelled_rows == 5
    training_set = TrainingSet.open(tmp_path / "set")
    table = pq.read_table(training_set.files[0])
    assert table.column("prediction_id").to_pylist() == [pid(i) for i in range(1, 6)]
    assert table.column("model_version").to_pylist() == ["v1"] * 4 + ["v2"]
    np.testing.assert_array_equal(table.column("amount").to_numpy(), [0.25, 0.5, 0.75, 1.0, 105 / 4])
    assert json.loads((tmp_path / "set" / META_FILE).read_text())["as_of"] == (DAY0 + timedelta(days=1)).isoformat()


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_settings_choose_the_compression(tmp_path: Path, compression: str) -> None:
    writer = writer_at(tmp_path, Clock(DAY0), compression=compression)
    writer.record(pid(1), None, vector(1), 0.5, 0)
    writer.flush()
    file = data_files(partitions(tmp_path)[0][1])[0]
    codec = pq.ParquetFile(file).metadata.row_group(0).column(0).compression
    assert codec == ("ZSTD" if compression == "zstd" else "UNCOMPRESSED")
