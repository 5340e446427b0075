"""Training at scale: the three engines of service/training/engines.py on 1M and 10M synthetic rows, side by side.

For each row count, one synthetic training set is written in the feature log's training-set layout (Parquet, one file
per day, :func:`service.training.training_set.write_training_set`), generated in day-sized chunks (never all rows in
memory); then each engine trains on it in its own process — ``local`` (one process, ``hist``), ``dask`` (xgboost.dask on
a LocalCluster of 2 worker processes, 1 thread each) and ``external_memory`` (``ExtMemQuantileDMatrix`` over a Parquet
``DataIter``) — through the whole pipeline: strategy comparison, early stopping, calibration and threshold on the
validation window, test-window metrics and the verified bundle (``service.training.engines.bundle_fit``). Reported per
engine: wall time (fit + calibration + bundle; and the child process's whole life), peak RSS of the process (and of each
Dask worker), test PR-AUC of the served (calibrated) and the raw score, the split and the chosen strategy.

Memory budget: ``--memory-budget-mb`` (default 512 MiB per process) — the 10M-row set's float32 features alone are
10M × 17 × 4 B = 680 MB, larger than it; the external-memory engine is the one expected to stay within it.

The rows: ``FEATURE_NAMES``' 17 refund features drawn per class (fraud 1.5 %) with overlapping distributions — new
accounts, round amounts, shared IPs, refund-heavy histories and gift cards lean fraud, none decides alone.

Usage::

    python benchmarks/training_scale_benchmark.py --rows 1000000
    nice python benchmarks/training_scale_benchmark.py --rows 10000000 --engines dask,external_memory

Output: JSON on stdout and in ``--output`` (default ``var/benchmarks/training_scale-<rows>.json``), with the load
average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

ROOT: Final[Path] = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from service.data.features import CATEGORIES, FEATURE_NAMES  # noqa: E402

ENGINES: Final[tuple[str, ...]] = ("local", "dask", "external_memory")
FRAUD_RATE: Final[float] = 0.015
DAYS: Final[int] = 60
START: Final[datetime] = datetime(2026, 1, 1, tzinfo=UTC)
#: Category draw probabilities (CATEGORIES order) for legitimate and fraudulent rows.
_CATEGORY_P: Final[dict[int, list[float]]] = {
    0: [0.04, 0.25, 0.15, 0.25, 0.20, 0.06, 0.05],
    1: [0.22, 0.22, 0.24, 0.12, 0.08, 0.04, 0.08],
}


def synthetic_rows(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """``n`` refund feature vectors (``FEATURE_NAMES`` order) and their labels."""
    y = (rng.random(n) < FRAUD_RATE).astype(np.int8)
    fraud = y == 1
    half = fraud & (rng.random(n) < 0.5)
    years = rng.gamma(2.0, 1.2, n)
    years[half] = rng.exponential(0.3, int(half.sum()))
    amount = np.round(rng.lognormal(3.8, 0.9, n), 2)
    amount[fraud] = np.round(rng.lognormal(4.3, 1.0, int(fraud.sum())), 2)
    round_amount = rng.random(n) < np.where(fraud, 0.30, 0.10)
    amount[round_amount] = np.round(amount[round_amount])
    cents = np.round(amount * 100).astype(np.int64) % 100
    ips = 1 + rng.poisson(np.where(half, 3.0, 0.6))
    prior = rng.poisson(np.where(fraud & ~half, 3.5, 1.5)).astype(np.float64)
    known = rng.random(n) < np.where(fraud, 0.65, 0.85)
    prior[~known] = 0.0
    avg = np.where(known, rng.lognormal(3.8, 0.5, n), 60.0)
    category = np.where(
        fraud,
        rng.choice(len(CATEGORIES), n, p=_CATEGORY_P[1]),
        rng.choice(len(CATEGORIES), n, p=_CATEGORY_P[0]),
    )
    columns = [
        years,
        amount,
        (cents == 0).astype(np.float64),
        (cents == 99).astype(np.float64),
        ips.astype(np.float64),
        prior,
        prior / np.maximum(years, 0.25),
        amount / np.maximum(avg, 1.0),
        known.astype(np.float64),
        (category == CATEGORIES.index("missing")).astype(np.float64),
        *((category == i).astype(np.float64) for i in range(len(CATEGORIES))),
    ]
    x = np.column_stack(columns).astype(np.float32)
    assert x.shape[1] == len(FEATURE_NAMES)
    return x, y


def write_dataset(directory: Path, rows: int, seed: int) -> dict[str, Any]:
    """The synthetic training set, one day at a time (``rows / DAYS`` rows per day)."""
    from service.training.training_set import write_training_set

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    per_day = rows // DAYS
    info = None
    for day in range(DAYS):
        n = per_day if day < DAYS - 1 else rows - per_day * (DAYS - 1)
        x, y = synthetic_rows(rng, n)
        base = np.datetime64((START + timedelta(days=day)).replace(tzinfo=None), "us")
        stamps = base + np.sort(rng.integers(0, 86_400_000_000, n)).astype("timedelta64[us]")
        info = write_training_set(directory, stamps, x, y, list(FEATURE_NAMES), "synthetic", append=day > 0)
    assert info is not None
    size = sum(f.stat().st_size for f in directory.rglob("*.parquet"))
    return {"rows": info.rows, "positives": info.positives, "parquet_mb": round(size / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def run_child(engine: str, data: Path, out_dir: Path, workers: int) -> dict[str, Any]:
    """One engine, in this process: the pipeline from the training set to the bundle (the ``--child`` mode)."""
    from sklearn.metrics import average_precision_score

    from service.artifacts.bundle import bundle_digest, load_bundle
    from service.settings import Settings
    from service.training.engines import bundle_fit, fit_training_set
    from service.training.training_set import TrainingSet

    settings = Settings()
    settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"dask_workers": workers})})
    started = time.perf_counter()
    result = fit_training_set(TrainingSet.open(data), settings, engine)
    manifest, metrics = bundle_fit(result, settings, f"scale-{engine}", out_dir)
    seconds = time.perf_counter() - started
    loaded = load_bundle(out_dir, expected_digest=bundle_digest(out_dir))  # the bundle verifies
    return {
        "engine": engine,
        "seconds_fit_calibrate_bundle": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "dask_workers_peak_rss_mb": result.workers_peak_rss_mb,
        "test_pr_auc_served": metrics["pr_auc"],
        "test_pr_auc_raw": float(average_precision_score(result.y_test, result.raw_test)),
        "test_roc_auc": metrics["roc_auc"],
        "recall_at_threshold": metrics["recall"],
        "precision_at_threshold": metrics["precision"],
        "split": result.split.as_dict(),
        "strategy": result.fit.strategy,
        "trees": loaded.booster.num_boosted_rounds(),
        "calibration": manifest.calibration.method,
        "calibration_choice": result.fit.calibration.method,
        "notes": result.notes,
    }


def run_engine(engine: str, data: Path, out_dir: Path, workers: int) -> dict[str, Any]:
    started = time.perf_counter()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--data", str(data),
               "--bundle-dir", str(out_dir / engine), "--workers", str(workers)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return {
            "engine": engine,
            "failed": done.returncode,
            "stderr_tail": done.stderr[-3000:],
            "process_seconds": wall,
        }
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": wall}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The training engines at 1M/10M rows; JSON to stdout and a file.")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (LocalCluster)")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=Path("var/benchmarks/training_scale"))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bundle-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(run_child(args.child, args.data, args.bundle_dir, args.workers)) + "\n")
        return 0
    data = args.work_dir / f"rows-{args.rows}"
    out: dict[str, Any] = {
        "rows": args.rows,
        "memory_budget_mb": args.memory_budget_mb,
        "load_average_before": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "started_at": datetime.now(UTC).isoformat(),
    }
    out["dataset"] = write_dataset(data, args.rows, args.seed)
    out["engines"] = {}
    for engine in args.engines.split(","):
        result = run_engine(engine, data, args.work_dir / "bundles", args.workers)
        peaks = [result.get("peak_rss_mb", 0.0), *result.get("dask_workers_peak_rss_mb", [])]
        result["within_memory_budget"] = "failed" not in result and max(peaks) <= args.memory_budget_mb
        out["engines"][engine] = result
        sys.stderr.write(json.dumps({"event": "engine_done", **result}) + "\n")
    out["load_average_after"] = list(os.getloadavg())
    text = json.dumps(out, indent=2)
    output = args.output or Path(f"var/benchmarks/training_scale-{args.rows}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
