"""Test support for the feature log (service/data/feature_log.py): a model server's settings to write it quickly, and
counts of what it and the prediction log hold."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow.parquet as pq

from service.data.feature_log import data_files, partitions


def logging_server_env(log_dir: Path) -> dict[str, str]:
    """A one-worker model server that logs every decided vector to ``log_dir`` within half a second, its store
    lookups budgeted generously (the vectors compared in the tests carry the snapshot's aggregates)."""
    return {
        "FW_SERVE__WORKERS": "1",
        "FW_SERVE__FEATURE_STORE_TIMEOUT_MS": "5000",
        "FW_LOG_LEVEL": "WARNING",
        "FW_FEATURE_LOG__ENABLED": "true",
        "FW_FEATURE_LOG__DIRECTORY": str(log_dir),
        "FW_FEATURE_LOG__FLUSH_INTERVAL_S": "0.5",
    }


def logged_rows(log_dir: Path) -> int:
    """Rows in the feature log's Parquet files."""
    return sum(pq.ParquetFile(f).metadata.num_rows for _, day in partitions(log_dir) for f in data_files(day))


def decided_rows(db: Path) -> int:
    """Decisions in a SQLite prediction log."""
    with sqlite3.connect(db) as connection:
        return int(connection.execute("SELECT count(*) FROM predictions WHERE role = 'decider'").fetchone()[0])
