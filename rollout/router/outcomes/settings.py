"""Settings of the prediction log, the label join, the outcome metrics, drift maths and the Prometheus process.

Each group reads the environment under the rollout side's prefix with its own group name, exactly as a nested
group of :class:`rollout.settings.RolloutSettings` would: ``FW_ROLLOUT_OUTCOMES__DSN_FILE=/etc/…/dsn`` (or
``FW_ROLLOUT_OUTCOMES__DSN=postgresql+psycopg://…``),
``FW_ROLLOUT_OUTCOMES__FLUSH_INTERVAL_MS=100``, ``FW_ROLLOUT_DRIFT__PSI_EPSILON=1e-4``,
``FW_ROLLOUT_PROMETHEUS__SCRAPE_INTERVAL_S=1``. Nothing in the logic hard-codes these values.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rollout.settings import read_secret

#: Score buckets of the outcome histograms: fine near 0 (where most legitimate traffic sits and where the
#: decision thresholds of a rare-event model live), coarser above. 36 buckets; ROC-AUC from them is within a
#: few thousandths of the exact value on realistic score distributions (see tests/unit/test_drift.py).
DEFAULT_SCORE_BUCKETS: tuple[float, ...] = (
    0.001,
    0.002,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.06,
    0.08,
    0.1,
    0.125,
    0.15,
    0.175,
    0.2,
    0.25,
    0.3,
    0.35,
    0.4,
    0.45,
    0.5,
    0.55,
    0.6,
    0.65,
    0.7,
    0.75,
    0.8,
    0.85,
    0.9,
    0.925,
    0.95,
    0.975,
    0.99,
    1.0,
)

#: Score bin upper edges of the paired score table (``fraudwatch_outcome_paired_score_total``, the joint bins of both
#: versions' scores on the same labelled requests, for a paired AUC difference): a subset of the outcome buckets,
#: coarser because the table has up to (edges + 1)² × 2 cells per (pair, stage).
DEFAULT_PAIRED_SCORE_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    1.0,
)

#: The prediction log of the embedded default (SQLite under the working directory's var/).
DEFAULT_DSN = "sqlite:///var/predictions.db"

#: Label delay buckets in hours: one hour to eight weeks.
DEFAULT_LABEL_DELAY_HOURS: tuple[float, ...] = (1, 6, 12, 24, 48, 72, 120, 168, 336, 504, 720, 1008, 1344)


class OutcomeSettings(BaseSettings):
    """The prediction log (where and how it is written) and the feedback join."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_OUTCOMES__", env_nested_delimiter="__", extra="ignore")

    #: SQLAlchemy URL of the prediction log (it may carry the database password: a secret, never logged).
    #: SQLite (WAL mode, :data:`DEFAULT_DSN`) is the embedded default; deployments use
    #: ``postgresql+psycopg://user:pass@host:5432/db`` through ``dsn_file``.
    dsn: SecretStr | None = None
    #: Alternative to ``dsn`` for a mounted Secret: the DSN is the file's stripped content (the chart's way, so the
    #: password is in no environment variable). Setting both is refused.
    dsn_file: Path | None = None
    #: Rows kept in memory waiting to be written; beyond this ``record`` drops the row and counts it.
    buffer_max_rows: int = Field(100_000, ge=1)
    #: The writer flushes at least this often …
    flush_interval_ms: int = Field(200, ge=1)
    #: … or as soon as this many rows are waiting, and never writes more than this many in one transaction.
    flush_max_rows: int = Field(1_000, ge=1)
    #: After a failed write the writer waits this long before retrying (rows stay buffered).
    retry_backoff_ms: int = Field(500, ge=1)
    #: ``close`` gives up retrying a failing database after this long (the rows are then reported lost).
    close_timeout_s: float = Field(30.0, gt=0.0)
    #: SQLite only: how long a writer waits for the database lock.
    sqlite_busy_timeout_s: float = Field(30.0, gt=0.0)
    #: Connection pool size for server databases.
    pool_size: int = Field(5, ge=1)
    #: PostgreSQL: how long a connection attempt may take (libpq's connect_timeout, whole seconds) — an unreachable
    #: database fails the router's start and every write at once, with the reason, instead of hanging.
    connect_timeout_s: float = Field(5.0, gt=0.0)
    #: Where each router's prediction log keeps its durable mark (rollout/router/outcomes/marks.py): the rows a killed
    #: router accepted and never wrote are counted (dropped{reason="killed"}) by the next log started on the same
    #: directory. Default: ``<database>.marks`` beside a SQLite file; none for a server database unless set (the
    #: chart sets an emptyDir, which outlives container restarts).
    mark_dir: Path | None = None
    #: A write that fails with something other than a database outage (a bug, data the driver cannot encode) is
    #: retried this many times in a row, then its batch is dropped and counted (reason "failed"), not retried for ever.
    max_unexpected_write_errors: int = Field(5, ge=1)
    #: What a label that contradicts the stored one gets: ``reject`` → 409 (the first label stands).
    conflict_policy: Literal["reject"] = "reject"
    max_body_bytes: int = Field(16_384, ge=256)
    #: ``POST /api/v1/feedback/batch``: body bound (read stops there) and labels per call.
    max_batch_body_bytes: int = Field(1_048_576, ge=1024)
    max_batch_labels: int = Field(2_000, ge=1)
    #: Labels accepted per ``source`` per minute (a fixed window); beyond it 429 / ``over_quota``.
    feedback_quota_per_minute: int = Field(60_000, ge=1)
    max_prediction_id_chars: int = Field(128, ge=8)
    max_source_chars: int = Field(64, ge=1)
    score_buckets: tuple[float, ...] = DEFAULT_SCORE_BUCKETS
    calibration_bins: int = Field(10, ge=2, le=100)
    label_delay_buckets_hours: tuple[float, ...] = DEFAULT_LABEL_DELAY_HOURS
    #: Must be a subset of ``score_buckets`` (a paired bin is then a union of outcome-histogram bins).
    paired_score_buckets: tuple[float, ...] = DEFAULT_PAIRED_SCORE_BUCKETS

    def database_url(self) -> str:
        """The prediction log's DSN: ``dsn``, else the content of ``dsn_file``, else :data:`DEFAULT_DSN`."""
        return read_secret(self.dsn, self.dsn_file) or DEFAULT_DSN

    @model_validator(mode="after")
    def _one_dsn_source(self) -> OutcomeSettings:
        if self.dsn is not None and self.dsn_file is not None:
            raise ValueError("set dsn or dsn_file, not both")
        return self

    @field_validator("score_buckets", "label_delay_buckets_hours", "paired_score_buckets")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("buckets must be a non-empty, strictly increasing sequence")
        return value

    @model_validator(mode="after")
    def _paired_buckets_are_outcome_buckets(self) -> OutcomeSettings:
        extra = sorted(set(self.paired_score_buckets) - set(self.score_buckets))
        if extra:
            raise ValueError(f"paired_score_buckets must be a subset of score_buckets; not in it: {extra}")
        return self


class DriftSettings(BaseSettings):
    """Constants of the drift and outcome maths (shared with the PromQL in deploy/prometheus/rules.yml)."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_DRIFT__", extra="ignore")

    #: Fractions are clipped to at least this before PSI's logarithm (rules.yml uses the same value).
    psi_epsilon: float = Field(1e-4, gt=0.0, lt=0.1)
    #: Two-sided confidence level of the Wilson / Clopper–Pearson bounds.
    confidence_level: float = Field(0.95, gt=0.5, lt=1.0)


@lru_cache(maxsize=1)
def get_outcome_settings() -> OutcomeSettings:
    return OutcomeSettings()


@lru_cache(maxsize=1)
def get_drift_settings() -> DriftSettings:
    return DriftSettings()
