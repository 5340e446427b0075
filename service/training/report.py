"""A human-readable training report written beside the bundle.

``report.md`` (metrics tables, imbalance-strategy comparison, calibration choice, threshold policy),
``metrics.json`` (the same numbers, machine-readable; non-finite values become ``null``), ``pr_curve.png``
(test-window precision–recall curve with the operating point) and ``calibration.png`` (reliability diagram of
the raw and calibrated scores, equal-width bins, with the score histogram).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from sklearn.metrics import precision_recall_curve

from service.artifacts.bundle import ThresholdPolicy
from service.training.evaluate import reliability_curve

REPORT_FILE: Final[str] = "report.md"
METRICS_FILE: Final[str] = "metrics.json"
PR_CURVE_FILE: Final[str] = "pr_curve.png"
CALIBRATION_FILE: Final[str] = "calibration.png"
_DPI: Final[int] = 110


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    metrics_json: Path
    pr_curve: Path
    calibration: Path

    def as_list(self) -> list[Path]:
        return [self.markdown, self.metrics_json, self.pr_curve, self.calibration]


@dataclass(frozen=True)
class ReportInput:
    """Everything the report shows. ``strategies`` rows are ``{"strategy", "valid_pr_auc", ...}`` mappings."""

    version: str
    test_metrics: Mapping[str, float]
    valid_metrics: Mapping[str, float]
    strategies: Sequence[Mapping[str, Any]]
    chosen_strategy: str
    calibration: Mapping[str, Any]
    threshold: ThresholdPolicy
    split: Mapping[str, int]
    y_test: npt.NDArray[np.int64]
    raw_test: npt.NDArray[np.float64]
    scores_test: npt.NDArray[np.float64]
    calibration_bins: int


def write_report(directory: Path, data: ReportInput) -> ReportPaths:
    """Write the four report files into ``directory`` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(
        markdown=directory / REPORT_FILE,
        metrics_json=directory / METRICS_FILE,
        pr_curve=directory / PR_CURVE_FILE,
        calibration=directory / CALIBRATION_FILE,
    )
    paths.metrics_json.write_text(json.dumps(_clean(metrics_document(data)), indent=2, sort_keys=True), "utf-8")
    paths.markdown.write_text(markdown(data), encoding="utf-8")
    plot_pr_curve(paths.pr_curve, data)
    plot_calibration(paths.calibration, data)
    return paths


def metrics_document(data: ReportInput) -> dict[str, Any]:
    return {
        "version": data.version,
        "test": dict(data.test_metrics),
        "validation": dict(data.valid_metrics),
        "strategies": [dict(row) for row in data.strategies],
        "chosen_strategy": data.chosen_strategy,
        "calibration": dict(data.calibration),
        "threshold": asdict(data.threshold),
        "split": dict(data.split),
    }


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 2 else f"{value:.4f}"
    return str(value)


def markdown(data: ReportInput) -> str:
    """The report's Markdown text."""
    names = list(data.test_metrics)
    lines = [
        f"# Model report — {data.version}",
        "",
        "Split (time-ordered rows): " + ", ".join(f"{k} {v}" for k, v in data.split.items()),
        "",
        "## Metrics",
        "",
        "| metric | validation | test |",
        "|---|---:|---:|",
        *(f"| {n} | {_fmt(data.valid_metrics.get(n, math.nan))} | {_fmt(data.test_metrics[n])} |" for n in names),
        "",
        "ECE uses equal-width bins; PR-AUC is average precision; top-K % rows are the highest-scored K %.",
        "",
        "## Imbalance strategies (validation window)",
        "",
        *_table(data.strategies, data.chosen_strategy),
        "",
        "## Calibration",
        "",
        f"Chosen: **{data.calibration.get('method')}** "
        f"(fit on the first {data.calibration.get('n_fit')} validation rows, chosen on the next "
        f"{data.calibration.get('n_holdout')} by Brier score, then refit on all validation rows). "
        f"{data.calibration.get('note', '')}",
        "",
        "| method | held-out Brier | held-out log-loss |",
        "|---|---:|---:|",
        *(
            f"| {m} | {_fmt(b)} | {_fmt(data.calibration.get('holdout_log_loss', {}).get(m, math.nan))} |"
            for m, b in dict(data.calibration.get("holdout_brier", {})).items()
        ),
        "",
        "## Threshold",
        "",
        *_threshold_lines(data.threshold),
        "",
        f"![precision-recall]({PR_CURVE_FILE})",
        f"![calibration]({CALIBRATION_FILE})",
        "",
    ]
    return "\n".join(lines)


def _table(rows: Sequence[Mapping[str, Any]], chosen: str) -> list[str]:
    if not rows:
        return ["(none)"]
    columns = list(rows[0])
    head = ["| " + " | ".join(columns) + " | chosen |", "|" + "---|" * (len(columns) + 1)]
    body = [
        "| " + " | ".join(_fmt(row[c]) for c in columns) + f" | {'✔' if row.get('strategy') == chosen else ''} |"
        for row in rows
    ]
    return head + body


def _threshold_lines(policy: ThresholdPolicy) -> list[str]:
    lines = [f"Policy `{policy.policy}` → threshold **{policy.threshold:.6f}** (on the calibrated score)."]
    if policy.policy == "target_precision":
        reached = "reached" if policy.target_reached else "NOT reached (threshold of maximal precision used)"
        lines.append(f"Target precision {policy.target_precision} on validation: {reached}.")
    else:
        lines.append(
            f"Costs: false negative {policy.cost_false_negative}, false positive {policy.cost_false_positive}."
        )
    lines.append(
        f"On validation: precision {_fmt(policy.validation_precision)}, recall {_fmt(policy.validation_recall)}."
    )
    return lines


def plot_pr_curve(path: Path, data: ReportInput) -> None:
    """Test-window precision–recall curve of the calibrated score, with the chosen operating point."""
    precision, recall, _ = precision_recall_curve(data.y_test, data.scores_test)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.step(recall, precision, where="post", label=f"PR-AUC {data.test_metrics.get('pr_auc', math.nan):.3f}")
    ax.scatter(
        [data.test_metrics.get("recall", math.nan)],
        [data.test_metrics.get("precision", math.nan)],
        color="red",
        zorder=3,
        label=f"threshold {data.threshold.threshold:.3f}",
    )
    base_rate = float(np.mean(data.y_test)) if data.y_test.size else 0.0
    ax.axhline(base_rate, color="grey", linestyle=":", label=f"base rate {base_rate:.4f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"{data.version} — test window")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def plot_calibration(path: Path, data: ReportInput) -> None:
    """Reliability diagram (equal-width bins) of raw and calibrated test scores, plus their histogram."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 6.5), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for name, values in (("raw", data.raw_test), ("calibrated", data.scores_test)):
        mean_score, observed, _ = reliability_curve(data.y_test, values, data.calibration_bins)
        ax.plot(mean_score, observed, marker="o", label=name)
        hist.hist(values, bins=data.calibration_bins, range=(0, 1), alpha=0.5, log=True, label=name)
    ax.set(ylabel="observed fraud rate", xlim=(0, 1), ylim=(0, 1), title=f"{data.version} — calibration (test)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    hist.set(xlabel="score", ylabel="rows (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
