"""Training on what serving saw: the feature log and the labels that arrived by a cut-off become a training set
(:mod:`service.training.training_set`), a training engine (:mod:`service.training.engines`, ``FW_TRAIN__ENGINE``)
fits it, and the MLflow run records the data window (start, end, as_of), the row counts (logged, labelled, per
split) and the engine. ``fraudwatch train-from-log`` runs it with rich progress bars (a spinner per stage, a bar
over the boosting rounds); without a terminal it prints one line per finished stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import xgboost as xgb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from service.artifacts.bundle import Manifest
from service.artifacts.registry import RunPayload
from service.settings import Settings
from service.training.engines import EngineFit, bundle_fit, fit_training_set
from service.training.engines import Progress as EngineProgress
from service.training.training_set import TrainingSet, build_training_set, read_labels


class RoundsCallback(xgb.callback.TrainingCallback):
    """Advances a rich task by one per boosting round (early stopping ends it short; it is then completed)."""

    def __init__(self, progress: Progress, title: str, total: int) -> None:
        super().__init__()
        self.progress = progress
        self.task = progress.add_task(title, total=total)
        self.rounds = 0

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        self.rounds += 1
        self.progress.advance(self.task)
        return False

    def after_training(self, model: Any) -> Any:
        self.progress.update(self.task, completed=self.progress.tasks[self.task].total)
        return model


class RichProgress:
    """The engines' :class:`service.training.engines.Progress` on a rich console: stages and boosting rounds."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.callbacks: list[RoundsCallback] = []

    def __enter__(self) -> RichProgress:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bars.stop()

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        task = self.bars.add_task(title, total=None)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.bars.update(task, total=1, completed=1)
            if not self.live:
                self.console.print(
                    f"✓ {title} ({time.perf_counter() - started:.1f} s)", soft_wrap=True, highlight=False
                )

    def rounds(self, title: str, total: int) -> xgb.callback.TrainingCallback | None:
        callback = RoundsCallback(self.bars, title, total)
        self.callbacks.append(callback)
        return callback


@dataclass(frozen=True)
class LogWindow:
    """Decisions with ``start`` < ts ≤ ``end``, labels that arrived by ``as_of``."""

    start: datetime
    end: datetime
    as_of: datetime


def run_payload(
    result: EngineFit, manifest: Manifest, test_metrics: dict[str, float], training_set: TrainingSet, bundle_dir: Path
) -> RunPayload:
    """The MLflow run of an engine fit: the bundle, the manifest's params, test metrics, and as tags the engine,
    the data window and the row counts (what the training set's ``training_set.json`` says it was made of)."""
    meta = training_set.meta
    split = result.split.as_dict()
    tags = {
        "engine": result.engine,
        "data_source": str(meta.get("source", "")),
        "window_start": str(meta.get("start", "")),
        "window_end": str(meta.get("end", "")),
        "window_as_of": str(meta.get("as_of", "")),
        "data_rows": str(training_set.rows),
        "data_positives": str(meta.get("positives", "")),
        "logged_rows": str(meta.get("logged_rows", "")),
        "unlabelled_rows": str(meta.get("unlabelled_rows", "")),
        **{f"rows_{window}": str(count) for window, count in split.items()},
        "strategy": result.fit.strategy,
        "calibration": manifest.calibration.method,
    }
    metrics = {f"test_{key}": float(value) for key, value in test_metrics.items()}
    metrics["train_seconds"] = result.seconds
    return RunPayload(
        run_name=f"train-{manifest.version}",
        bundle_dir=bundle_dir,
        params=dict(manifest.params),
        metrics=metrics,
        tags=tags,
    )


@dataclass(frozen=True)
class LogFit:
    """A version fitted on a training set from the log: its MLflow run, the engine's fit and its test metrics."""

    payload: RunPayload
    result: EngineFit
    manifest: Manifest
    test_metrics: dict[str, float]


def build_from_log(
    settings: Settings, dsn: str, window: LogWindow, set_dir: Path, progress: EngineProgress | None = None
) -> TrainingSet:
    """The training set of ``window`` (``train.feature_set``'s features, as served) in ``set_dir``: the feature log
    joined with the labels that had arrived in the prediction log at ``dsn`` by ``window.as_of``."""
    names = list(log_feature_names(settings))
    stage = progress.stage if progress is not None else _quiet
    with stage("Reading the labels that arrived by the cut-off"):
        labels = read_labels(dsn, window.as_of, window.start)
    with stage(f"Joining {labels.num_rows:,} labels with the feature log"):
        build_training_set(settings.feature_log_dir, labels, names, window.start, window.end, window.as_of, set_dir)
    return TrainingSet.open(set_dir)


def fit_and_bundle(
    settings: Settings,
    training_set: TrainingSet,
    version: str,
    bundle_dir: Path,
    engine: str | None = None,
    progress: EngineProgress | None = None,
) -> LogFit:
    """Fit ``training_set`` with the engine and write the verified bundle to ``bundle_dir``."""
    result = fit_training_set(training_set, settings, engine, progress)
    stage = progress.stage if progress is not None else _quiet
    with stage("Writing the verified bundle"):
        manifest, test_metrics = bundle_fit(result, settings, version, bundle_dir)
    payload = run_payload(result, manifest, test_metrics, training_set, bundle_dir)
    return LogFit(payload, result, manifest, test_metrics)


def train_from_log(
    settings: Settings,
    dsn: str,
    window: LogWindow,
    version: str,
    work_dir: Path,
    engine: str | None = None,
    progress: RichProgress | None = None,
) -> tuple[RunPayload, EngineFit]:
    """Build the training set of ``window`` from the feature log and the prediction log at ``dsn``, fit it with the
    engine, write the verified bundle under ``work_dir / version`` and return the MLflow run to log."""
    training_set = build_from_log(settings, dsn, window, work_dir / f"{version}-training-set", progress)
    fitted = fit_and_bundle(settings, training_set, version, work_dir / version, engine, progress)
    return fitted.payload, fitted.result


@contextlib.contextmanager
def _quiet(title: str) -> Iterator[None]:
    yield


def log_feature_names(settings: Settings) -> tuple[str, ...]:
    """The features a version trained from the log reads: ``train.feature_set``'s, in the served vector's order (the
    feature log holds each model's own input columns; files of another feature set are skipped and counted)."""
    from service.data.features import FEATURE_SETS

    return FEATURE_SETS[settings.train.feature_set]
