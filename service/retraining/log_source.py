"""A retrain's data from what serving saw (``FW_RETRAIN__SOURCE=feature_log``).

The window is the decisions of the last ``window_days`` days up to the run (or ``--window-end``) whose labels had
arrived in the prediction log by then: :func:`service.training.from_log.build_from_log` joins the feature log
(``FW_FEATURE_LOG__DIRECTORY``, the vectors exactly as the model servers scored them) with the prediction log's labels
(``FW_RETRAIN__LABELS_DSN_FILE`` / ``LABELS_DSN``, read-only), so the set is point-in-time correct by construction;
too few rows or frauds → ``insufficient_data`` before anything is trained. The configured engine
(``FW_TRAIN__ENGINE``) fits it and writes the verified bundle
(:func:`service.training.from_log.fit_and_bundle`); the gates, registration and hand-off are the retrain's own
(:func:`service.retraining.job.retrain`), whatever the source.

What a logged vector holds: every input column of the model that served it — the request's fields, the velocity
features as the online store answered (or their defaults, ``velocity_known = 0``), and the per-account aggregates
(``prior_refunds``, ``avg_refund_amount`` through ``amount_to_avg``, ``account_known``) as the serving bundle's
snapshot (``features.sqlite``) answered. Training needs no store: the values are in the log. Serving does: the
velocity features come from the online store every version shares; the aggregates from the new bundle's own
snapshot, which therefore is the snapshot most of the window's rows were served with — the deciding version's,
fetched verified from the registry (:func:`carry_snapshot`). A new bundle without it would serve every account as
unknown while it learned from known ones. The snapshot is carried forward, not refreshed: a stream retrain
(``FW_RETRAIN__SOURCE=stream``) rebuilds it from the refund history.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import xgboost as xgb

from service.artifacts.bundle import sha256_of
from service.common.clock import as_utc
from service.common.logging import get_logger, log_event
from service.data.feature_store import STORE_FILE
from service.retraining.sources import (
    Fitted,
    InsufficientDataError,
    LabelSourceMissingError,
    Observer,
    WindowInfo,
    window_tags,
)
from service.settings import RetrainSettings, Settings
from service.training.from_log import LogWindow, build_from_log, fit_and_bundle
from service.training.pipeline import gate_on_metrics
from service.training.training_set import TrainingSet

if TYPE_CHECKING:
    from service.artifacts.registry import ModelRegistry

logger = get_logger(__name__)

SOURCE = "feature_log"


def labels_dsn(settings: RetrainSettings) -> str:
    """The prediction log's DSN: the file (a mounted Secret) wins over the value."""
    if settings.labels_dsn_file is not None:
        dsn = settings.labels_dsn_file.read_text(encoding="utf-8").strip()
        if not dsn:
            raise LabelSourceMissingError(f"{settings.labels_dsn_file} is empty (FW_RETRAIN__LABELS_DSN_FILE)")
        return dsn
    if settings.labels_dsn is not None and settings.labels_dsn.get_secret_value():
        return settings.labels_dsn.get_secret_value()
    raise LabelSourceMissingError(
        "FW_RETRAIN__SOURCE=feature_log reads the labels from the prediction log: set FW_RETRAIN__LABELS_DSN_FILE "
        "(a file holding its SQLAlchemy URL) or FW_RETRAIN__LABELS_DSN"
    )


def log_window(days: float, end: datetime | None, now: datetime) -> LogWindow:
    """Decisions of the ``days`` before ``end`` (default ``now``), with the labels that had arrived by then."""
    upper = as_utc(end) if end is not None else as_utc(now)
    return LogWindow(start=upper - timedelta(days=days), end=upper, as_of=upper)


def window_of(training_set: TrainingSet, window: LogWindow, days: float, settings: RetrainSettings) -> WindowInfo:
    """The retrain's :class:`WindowInfo` of a built training set; :class:`InsufficientDataError` (naming what the log
    held) when it has fewer than ``min_rows`` rows or ``min_positives`` frauds."""
    meta = training_set.meta
    info = WindowInfo(
        days=float(days),
        start=window.start.isoformat(),
        end=window.end.isoformat(),
        rows=training_set.rows,
        positives=int(meta.get("positives", 0)),
        unlabelled_dropped=int(meta.get("unlabelled_rows", 0)),
        source=SOURCE,
        as_of=window.as_of.isoformat(),
    )
    if info.rows < settings.min_rows or info.positives < settings.min_positives:
        raise InsufficientDataError(
            f"feature log window {info.start} … {info.end} holds {info.rows} labelled rows and {info.positives} frauds "
            f"(need ≥ {settings.min_rows} and ≥ {settings.min_positives}); {meta.get('logged_rows', 0)} decisions "
            f"logged, {info.unlabelled_dropped} without a label by {info.as_of}, "
            f"{meta.get('skipped_files', 0)} files of another feature set skipped"
        )
    return info


class ObserverProgress:
    """The engines' progress protocol on a retrain's :class:`Observer` (stages only; no per-round bar)."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def stage(self, title: str) -> AbstractContextManager[None]:
        return self.observer.step(title)

    def rounds(self, title: str, total: int) -> xgb.callback.TrainingCallback | None:
        return None


def deciders(training_set: TrainingSet) -> Counter[str]:
    """Rows of the training set per version that decided them (served their vector)."""
    counts: Counter[str] = Counter()
    for file in training_set.files:
        counts.update(str(v) for v in pq.read_table(file, columns=["model_version"])["model_version"].to_pylist())
    return counts


def carry_snapshot(registry: ModelRegistry, model: str, counts: Counter[str], bundle_dir: Path) -> dict[str, str]:
    """Copy the aggregate snapshot of the version that served most rows into ``bundle_dir`` (its bundle fetched and
    verified from the registry); the MLflow tags that say which one, or why none."""
    if not counts:
        return {"aggregate_snapshot": "none: no rows"}
    total = sum(counts.values())
    version, rows = counts.most_common(1)[0]
    share = f"{rows / total:.3f}"
    refs = [ref for ref in registry.versions(model) if ref.model_version == version]
    if not refs:
        log_event(logger, "aggregate snapshot not carried", version=version, reason="not in the registry")
        return {"aggregate_snapshot": f"none: {version} is not a version of {model}", "snapshot_rows_share": share}
    ref = refs[0]  # newest registration of that name
    with tempfile.TemporaryDirectory(prefix="fw-snapshot-") as scratch:
        fetched = registry.fetch_bundle(ref, Path(scratch) / "bundle")
        store = fetched / STORE_FILE
        if not store.is_file():
            return {"aggregate_snapshot": f"none: {version} serves without one", "snapshot_rows_share": share}
        shutil.copyfile(store, bundle_dir / STORE_FILE)
    digest = sha256_of(bundle_dir / STORE_FILE)
    log_event(logger, "aggregate snapshot carried", version=version, registry_version=ref.version, sha256=digest)
    return {
        "aggregate_snapshot": f"{version} (registry {ref.version})",
        "aggregate_snapshot_sha256": digest,
        "snapshot_rows_share": share,
    }


@dataclass(frozen=True)
class LogData:
    """The retrain's data from the feature log (see the module docstring)."""

    training_set: TrainingSet
    window: WindowInfo
    engine: str

    def train(
        self, settings: Settings, name: str, out_dir: Path, registry: ModelRegistry, observer: Observer
    ) -> Fitted:
        fitted = fit_and_bundle(settings, self.training_set, name, out_dir, progress=ObserverProgress(observer))
        with observer.step("Carrying the serving version's aggregate snapshot"):
            snapshot = carry_snapshot(registry, settings.registered_model_name, deciders(self.training_set), out_dir)
        gate = gate_on_metrics(name, fitted.result.split.test, fitted.test_metrics, settings.quality)
        tags = {**fitted.payload.tags, **window_tags(self.window), **snapshot}
        payload = replace(fitted.payload, run_name=f"retrain-{name}", tags=tags)
        return Fitted(payload, gate, fitted.result.engine)


def load_log_data(settings: Settings, days: float, end: datetime | None, set_dir: Path) -> LogData:
    """Build the window's training set in ``set_dir``; :class:`InsufficientDataError` when it is too small."""
    window = log_window(days, end, datetime.now(UTC))
    training_set = build_from_log(settings, labels_dsn(settings.retrain), window, set_dir)
    return LogData(training_set, window_of(training_set, window, days, settings.retrain), settings.train.engine)
