"""Training engines: one pipeline, three places to run the boosting (``FW_TRAIN__ENGINE``).

Every engine trains on a training set on disk (:mod:`service.training.training_set`: Parquet, day partitions, time
order), splits it at the same cut timestamps (train / validation / test by ``train_fraction`` and ``valid_fraction`` of
the rows in time order), compares the imbalance strategies on the validation window, and ends in the same
:func:`service.training.train.choose_fit` (calibration and threshold on the validation window) and the same bundle
(:func:`bundle_fit`: ``service.artifacts.bundle.save_bundle``, digests and all) — so every engine's bundle passes the
same gates (``service.training.evaluate.quality_gate``, the test-window floors).

``local`` (the default)
    The windows read into memory; :func:`service.training.train.train_model` (``hist``, SMOTE available).
``dask``
    ``xgboost.dask`` on a ``dask.distributed`` cluster: ``FW_ENGINE__DASK_SCHEDULER_ADDRESS`` (a Dask Kubernetes
    operator's ``DaskCluster`` service, or any scheduler), else a ``LocalCluster`` of ``dask_workers`` worker
    processes started for the run. The workers read the training window's Parquet files themselves, lazily
    (``dask.dataframe.read_parquet``); the driver reads only the validation and test windows (for calibration,
    threshold, metrics and drift references).
``external_memory``
    One process, the training and validation windows streamed from Parquet in ``external_memory_batch_rows``
    batches (:class:`ParquetBatches`, an ``xgboost.DataIter``) into ``xgboost.ExtMemQuantileDMatrix``: XGBoost
    keeps quantised pages in a disk cache, so memory does not grow with the rows.

SMOTE synthesises rows from the whole training window in one process: the ``dask`` and ``external_memory`` engines
skip it (the strategy table says so). dask and distributed are imported only by the ``dask`` engine.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import xgboost as xgb
from sklearn.metrics import average_precision_score

from service.artifacts.bundle import Manifest, save_bundle
from service.common.logging import get_logger, log_event
from service.data.features import DRIFT_FEATURES
from service.settings import EngineSettings, Settings, TrainSettings
from service.training.train import (
    ModelFit,
    SplitSizes,
    StrategyResult,
    choose_fit,
    fit_manifest,
    flat_params,
    train_model,
    xgb_params,
)
from service.training.training_set import LABEL, TS, TimeSplit, TrainingSet, read_window, time_split, window_mask

logger = get_logger(__name__)

FloatArray = npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
#: Strategies an engine that never holds the training window in one process cannot run.
SINGLE_PROCESS_ONLY: Final[frozenset[str]] = frozenset({"smote"})


class Progress(Protocol):
    """Where an engine reports progress (the CLI draws rich bars; ``None`` logs nothing)."""

    def stage(self, title: str) -> contextlib.AbstractContextManager[None]: ...

    def rounds(self, title: str, total: int) -> xgb.callback.TrainingCallback | None: ...


@dataclass
class EngineFit:
    """A fit by any engine, with what the bundle and the gates need from the test window."""

    fit: ModelFit
    engine: str
    split: SplitSizes
    cuts: TimeSplit
    y_test: Labels
    raw_test: FloatArray
    #: The test window's drift-feature columns (the vectors as served: a training set is what serving computed).
    reference_columns: dict[str, npt.NDArray[np.float32]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    workers_peak_rss_mb: list[float] = field(default_factory=list)

    def scores_test(self) -> FloatArray:
        return self.fit.calibration.calibration.apply(self.raw_test.astype(np.float32))


# ------------------------------------------------------------------------------------------------- dispatch


def fit_training_set(
    training_set: TrainingSet, settings: Settings, engine: str | None = None, progress: Progress | None = None
) -> EngineFit:
    """Fit the configured engine (or ``engine``) on ``training_set`` (see the module docstring)."""
    chosen = engine or settings.train.engine
    started = time.perf_counter()
    cuts = time_split(training_set, settings.train.train_fraction, settings.train.valid_fraction)
    runner = _ENGINES.get(chosen)
    if runner is None:
        raise ValueError(f"unknown training engine {chosen!r} (FW_TRAIN__ENGINE: local, dask, external_memory)")
    result = runner(training_set, cuts, settings, progress)
    result.seconds = time.perf_counter() - started
    log_event(
        logger,
        "engine fit",
        engine=chosen,
        strategy=result.fit.strategy,
        split=result.split.as_dict(),
        seconds=round(result.seconds, 2),
        notes=result.notes,
    )
    return result


def _stage(progress: Progress | None, title: str) -> contextlib.AbstractContextManager[None]:
    return progress.stage(title) if progress is not None else contextlib.nullcontext()


def _callbacks(progress: Progress | None, title: str, total: int) -> list[xgb.callback.TrainingCallback]:
    callback = progress.rounds(title, total) if progress is not None else None
    return [callback] if callback is not None else []


def _reference(x: Matrix, names: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
    return {name: x[:, list(names).index(name)].copy() for name in DRIFT_FEATURES if name in names}


# ---------------------------------------------------------------------------------------------------- local


def fit_local(training_set: TrainingSet, cuts: TimeSplit, settings: Settings, progress: Progress | None) -> EngineFit:
    names = list(training_set.feature_names)
    with _stage(progress, "Reading the training set into memory"):
        x_tr, y_tr, _ = read_window(training_set, cuts, "train")
        x_va, y_va, _ = read_window(training_set, cuts, "valid")
        x_te, y_te, _ = read_window(training_set, cuts, "test")
    callbacks = _callbacks(progress, "Boosting (local, hist)", settings.train.n_estimators)
    with _stage(progress, f"Training on {y_tr.size:,} rows (local)"):
        fit = train_model(x_tr, y_tr, x_va, y_va, settings.train, feature_names=names, callbacks=callbacks)
    raw_test = fit.raw_scores(x_te)
    split = SplitSizes(int(y_tr.size), int(y_va.size), int(y_te.size))
    return EngineFit(fit, "local", split, cuts, y_te, raw_test, _reference(x_te, names), 0.0)


# ------------------------------------------------------------------------------ shared by the scale-out engines


def strategy_weights(settings: TrainSettings, positives: int, negatives: int) -> tuple[dict[str, float], list[str]]:
    """``scale_pos_weight`` per strategy an out-of-core engine can run, and a note for each it skips."""
    weights: dict[str, float] = {}
    notes: list[str] = []
    for strategy in settings.imbalance_strategies:
        if strategy in SINGLE_PROCESS_ONLY:
            notes.append(f"{strategy} skipped: it needs the whole training window in one process")
        elif strategy == "scale_pos_weight":
            weights[strategy] = negatives / max(positives, 1)
        else:
            weights[strategy] = 1.0
    if not weights:
        raise ValueError("no imbalance strategy this engine can run (FW_TRAIN__IMBALANCE_STRATEGIES)")
    return weights, notes


def fit_strategies(
    settings: TrainSettings,
    weights: dict[str, float],
    counts: tuple[int, int],
    fit_one: Callable[[dict[str, Any]], xgb.Booster],
    valid_raw_of: Callable[[xgb.Booster], FloatArray],
    y_valid: Labels,
) -> ModelFit:
    """Train one booster per strategy through ``fit_one`` (early-stopped and cut by the engine), score the
    validation window with ``valid_raw_of``, and end in :func:`service.training.train.choose_fit`."""
    base = xgb_params(settings)
    results: list[StrategyResult] = []
    boosters: dict[str, xgb.Booster] = {}
    for strategy, weight in weights.items():
        started = time.perf_counter()
        booster = fit_one({**base, "scale_pos_weight": weight})
        raw = valid_raw_of(booster)
        results.append(
            StrategyResult(
                strategy=strategy,
                valid_pr_auc=float(average_precision_score(y_valid, raw)),
                best_iteration=booster.num_boosted_rounds() - 1,
                train_rows=counts[0] + counts[1],
                train_positives=counts[0],
                scale_pos_weight=weight,
                seconds=time.perf_counter() - started,
            )
        )
        boosters[strategy] = booster
    return choose_fit(results, boosters, valid_raw_of, y_valid, settings, base)


def _cut_at_best(booster: xgb.Booster) -> xgb.Booster:
    best = booster.attr("best_iteration")
    return booster[: int(best) + 1] if best is not None else booster


def label_counts(training_set: TrainingSet, cuts: TimeSplit) -> tuple[int, int, SplitSizes]:
    """Positives and negatives of the training window, and every window's size (reads two columns)."""
    sizes = {"train": 0, "valid": 0, "test": 0}
    positives = 0
    for file in training_set.files:
        table = pq.read_table(file, columns=[TS, LABEL])
        for window in sizes:
            mask = window_mask(table[TS], cuts, window)
            chosen = table[LABEL].filter(mask).to_numpy()
            sizes[window] += int(chosen.size)
            if window == "train":
                positives += int(chosen.sum())
    split = SplitSizes(sizes["train"], sizes["valid"], sizes["test"])
    return positives, split.train - positives, split


# ----------------------------------------------------------------------------------------------------- dask


@contextlib.contextmanager
def dask_client(engine: EngineSettings) -> Iterator[Any]:
    """A client of the configured scheduler, or of a LocalCluster of worker processes started (and stopped) here."""
    import distributed

    # distributed's constructors are untyped: called through Any
    client_of: Any = distributed.Client
    if engine.dask_scheduler_address:
        with client_of(engine.dask_scheduler_address, timeout=engine.dask_connect_timeout_s) as client:
            yield client
        return
    cluster_of: Any = distributed.LocalCluster
    with (
        cluster_of(
            n_workers=engine.dask_workers,
            threads_per_worker=engine.dask_threads_per_worker,
            memory_limit=engine.dask_memory_limit,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        client_of(cluster, timeout=engine.dask_connect_timeout_s) as client,
    ):
        yield client


def worker_peak_rss_mb(client: Any) -> list[float]:
    """Each worker process's peak RSS so far (MiB)."""
    import resource

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    return sorted(round(float(v), 1) for v in client.run(peak).values())


def fit_dask(training_set: TrainingSet, cuts: TimeSplit, settings: Settings, progress: Progress | None) -> EngineFit:
    import dask.dataframe as dd
    import pandas as pd
    from xgboost import dask as dxgb

    ts = settings.train
    names = list(training_set.feature_names)
    with _stage(progress, "Counting labels per window"):
        positives, negatives, split = label_counts(training_set, cuts)
    weights, notes = strategy_weights(ts, positives, negatives)
    with _stage(progress, "Reading the validation window"):
        x_va, y_va, _ = read_window(training_set, cuts, "valid")
    engine = settings.engine
    where = engine.dask_scheduler_address or f"LocalCluster of {engine.dask_workers} worker processes"
    with _stage(progress, f"Training on {split.train:,} rows (dask: {where})"), dask_client(engine) as client:
        frame = dd.read_parquet([str(f) for f in training_set.files], columns=[TS, *names, LABEL])
        stamps = frame[TS]
        valid_from, test_from = pd.Timestamp(cuts.valid_from), pd.Timestamp(cuts.test_from)
        # persisted once, so the feature and label columns of a window are the same partitions (dask-expr may
        # otherwise plan the two projections apart); the workers hold them only until the quantised matrices exist
        train = client.persist(frame[stamps < valid_from])
        valid = client.persist(frame[(stamps >= valid_from) & (stamps < test_from)])
        dtrain = dxgb.DaskQuantileDMatrix(client, train[names], train[LABEL], feature_names=names)
        dvalid = dxgb.DaskQuantileDMatrix(client, valid[names], valid[LABEL], ref=dtrain, feature_names=names)
        del train, valid

        def fit_one(params: dict[str, Any]) -> xgb.Booster:
            output = dxgb.train(
                client,
                {**params, "nthread": engine.dask_threads_per_worker},
                dtrain,
                num_boost_round=ts.n_estimators,
                evals=[(dvalid, "valid")],
                early_stopping_rounds=ts.early_stopping_rounds,
                verbose_eval=False,
            )
            booster: xgb.Booster = output["booster"]
            booster.set_param({"nthread": ts.nthread})
            return _cut_at_best(booster)

        def valid_raw_of(booster: xgb.Booster) -> FloatArray:
            return np.asarray(booster.inplace_predict(x_va, validate_features=False), dtype=np.float64)

        fit = fit_strategies(ts, weights, (positives, negatives), fit_one, valid_raw_of, y_va)
        peaks = worker_peak_rss_mb(client)
    with _stage(progress, "Scoring the test window"):
        x_te, y_te, _ = read_window(training_set, cuts, "test")
        raw_test = fit.raw_scores(x_te)
    result = EngineFit(fit, "dask", split, cuts, y_te, raw_test, _reference(x_te, names), 0.0, notes, peaks)
    return result


# ------------------------------------------------------------------------------------------ external memory


class ParquetBatches(xgb.DataIter):
    """The rows of one window of a training set, ``batch_rows`` at a time, for XGBoost's external memory."""

    def __init__(
        self,
        training_set: TrainingSet,
        cuts: TimeSplit,
        window: str,
        batch_rows: int,
        cache_prefix: str,
    ) -> None:
        self._files = training_set.files
        self._names = list(training_set.feature_names)
        self._cuts = cuts
        self._window = window
        self._batch_rows = batch_rows
        self._batches: Iterator[pa.Table] | None = None
        super().__init__(cache_prefix=cache_prefix, release_data=True, on_host=False)

    def next(self, input_data: Callable[..., None]) -> bool:
        if self._batches is None:
            self._batches = window_batches(self._files, self._names, self._cuts, self._window, self._batch_rows)
        table = next(self._batches, None)
        if table is None:
            return False
        x = np.column_stack([table[name].to_numpy() for name in self._names]).astype(np.float32, copy=False)
        input_data(data=x, label=table[LABEL].to_numpy().astype(np.float32), feature_names=self._names)
        return True

    def reset(self) -> None:
        self._batches = None


def window_batches(
    files: Sequence[Path], names: Sequence[str], cuts: TimeSplit, window: str, batch_rows: int
) -> Iterator[pa.Table]:
    """The window's rows in tables of ``batch_rows`` (the last one shorter), gathered across files in time order:
    a page per small file would cost XGBoost a page's overhead per day of data."""
    pending: list[pa.Table] = []
    waiting = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows, columns=[TS, *names, LABEL]):
            table = pa.Table.from_batches([batch])
            table = table.filter(window_mask(table[TS], cuts, window))
            if table.num_rows == 0:
                continue
            pending.append(table)
            waiting += table.num_rows
            if waiting >= batch_rows:
                combined = pa.concat_tables(pending).combine_chunks()
                yield combined.slice(0, batch_rows)
                rest = combined.slice(batch_rows)
                pending, waiting = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if waiting:
        yield pa.concat_tables(pending).combine_chunks()


def scan_window(
    training_set: TrainingSet, cuts: TimeSplit, window: str, batch_rows: int, booster: xgb.Booster
) -> tuple[FloatArray, Labels, dict[str, npt.NDArray[np.float32]]]:
    """Raw scores, labels and drift-feature columns of a window, scored batch by batch (never all rows at once)."""
    names = list(training_set.feature_names)
    drift = [name for name in DRIFT_FEATURES if name in names]
    raws: list[FloatArray] = []
    labels: list[Labels] = []
    columns: dict[str, list[npt.NDArray[np.float32]]] = {name: [] for name in drift}
    for table in window_batches(training_set.files, names, cuts, window, batch_rows):
        x = np.column_stack([table[name].to_numpy() for name in names]).astype(np.float32, copy=False)
        raws.append(np.asarray(booster.inplace_predict(x, validate_features=False), dtype=np.float64))
        labels.append(table[LABEL].to_numpy().astype(np.int64))
        for name in drift:
            columns[name].append(x[:, names.index(name)].copy())
    return (
        np.concatenate(raws) if raws else np.empty(0),
        np.concatenate(labels) if labels else np.empty(0, dtype=np.int64),
        {name: np.concatenate(parts) for name, parts in columns.items() if parts},
    )


def fit_external_memory(
    training_set: TrainingSet, cuts: TimeSplit, settings: Settings, progress: Progress | None
) -> EngineFit:
    ts, engine = settings.train, settings.engine
    batch = engine.external_memory_batch_rows
    with _stage(progress, "Counting labels per window"):
        positives, negatives, split = label_counts(training_set, cuts)
    weights, notes = strategy_weights(ts, positives, negatives)
    with contextlib.ExitStack() as stack:
        cache = engine.external_memory_cache_dir
        if cache is None:
            cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fw-extmem-")))
        cache.mkdir(parents=True, exist_ok=True)
        with _stage(progress, f"Building the external-memory pages ({split.train:,} training rows)"):
            train_iter = ParquetBatches(training_set, cuts, "train", batch, os.fspath(cache / "train"))
            dtrain = xgb.ExtMemQuantileDMatrix(train_iter, nthread=ts.nthread)
            valid_iter = ParquetBatches(training_set, cuts, "valid", batch, os.fspath(cache / "valid"))
            # the matrices are released (their pages deleted) before the cache directory is
            matrices = {"train": dtrain, "valid": xgb.ExtMemQuantileDMatrix(valid_iter, nthread=ts.nthread, ref=dtrain)}
        y_va = matrices["valid"].get_label().astype(np.int64)
        callbacks = _callbacks(progress, "Boosting (external memory)", ts.n_estimators)

        def fit_one(params: dict[str, Any]) -> xgb.Booster:
            booster = xgb.train(
                params,
                matrices["train"],
                num_boost_round=ts.n_estimators,
                evals=[(matrices["valid"], "valid")],
                early_stopping_rounds=ts.early_stopping_rounds,
                verbose_eval=False,
                callbacks=callbacks,
            )
            return _cut_at_best(booster)

        def valid_raw_of(booster: xgb.Booster) -> FloatArray:
            return np.asarray(booster.predict(matrices["valid"]), dtype=np.float64)

        with _stage(progress, "Training (external memory)"):
            fit = fit_strategies(ts, weights, (positives, negatives), fit_one, valid_raw_of, y_va)
        del dtrain
        matrices.clear()
    with _stage(progress, "Scoring the test window in batches"):
        raw_test, y_test, reference = scan_window(training_set, cuts, "test", batch, fit.booster)
    return EngineFit(fit, "external_memory", split, cuts, y_test, raw_test, reference, 0.0, notes)


_ENGINES: Final[dict[str, Callable[[TrainingSet, TimeSplit, Settings, Progress | None], EngineFit]]] = {
    "local": fit_local,
    "dask": fit_dask,
    "external_memory": fit_external_memory,
}


# --------------------------------------------------------------------------------------------------- bundle


def bundle_fit(
    result: EngineFit,
    settings: Settings,
    version: str,
    out_dir: Path,
    extra: dict[str, Any] | None = None,
) -> tuple[Manifest, dict[str, float]]:
    """The verified bundle of an engine's fit (``service.artifacts.bundle`` format) and its test-window metrics."""
    from service.training.evaluate import classification_metrics

    ts = settings.train
    fit = result.fit
    scores_test = result.scores_test()
    test_metrics = classification_metrics(
        result.y_test, scores_test, fit.threshold.threshold, ts.top_k_percents, ts.calibration_bins
    )
    params = {**flat_params(ts, fit, result.split), "engine": result.engine}
    details: dict[str, Any] = {
        "imbalance_strategy": fit.strategy,
        "strategy_valid_pr_auc": fit.strategy_pr_auc,
        "strategies": [r.row() for r in fit.strategies],
        "calibration_choice": fit.calibration.summary(),
        "split": result.split.as_dict(),
        "time_split": result.cuts.to_dict(),
        "engine": result.engine,
        "engine_notes": result.notes,
        "reference_window": "test (the vectors as served)",
        **(extra or {}),
    }
    names = list(fit.booster.feature_names or [])
    manifest = fit_manifest(
        fit, version, names, result.reference_columns, scores_test, test_metrics, params, details, ts
    )
    return save_bundle(fit.booster, manifest, out_dir), test_metrics
