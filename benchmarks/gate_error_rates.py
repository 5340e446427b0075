"""Error rates of whole rollouts: simulated rollouts through the real policy, analysis and stage-machine code.

For each shipped policy (default, demo), fraud rate (1 %, 2 %, 10 %) and case — ``identical`` (the candidate's
recall equals stable's), ``margin_1x`` / ``margin_2x`` (worse by 1× / 2× the recall gate's margin δ) — whole
rollouts run from the first traffic stage to their end in a simulated world (benchmarks/rollout_sim.py: traffic
routed as each stage says, labels arriving after a delay, every gate's queries answered from the world's counts),
judged by the real ``rollout.core.analysis.analyse`` at the policy's analysis interval and decided by the real
``rollout.core.machine.step``: every gate of every stage together. Beside each case, for the recall gate alone:

* ``baseline_today`` — the rule before issue 10, a faithful copy: the candidate's Wilson interval against stable's
  point estimate, decided at the first look past that policy's label minimum (all labels, as it counted them);
* ``fixed_horizon`` — one look at the fixed sample size of the one-sided pooled two-proportion z-test of Δ=0
  against Δ=-2δ with the same α and β (its size from the variances under each hypothesis; the best possible
  without peeking).

Prints one JSON object whose ``cases`` list has, per case, ``policy``, ``case``, ``fraud_rate``, ``promoted``,
``rolled_back``, ``undecided``, ``median_labels`` (the candidate's labels at the decision) and the same fields
under ``sequential_recall_gate`` (today's recall gate alone, for the comparison with the fixed horizon),
``baseline_today`` and ``fixed_horizon``. ``--quick``: the default policy at 2 % only, 300 identical rollouts (an
A/A rate of 0 in 300 bounds the true rate by 1 % at 95 %) and 100 per worse case; rollouts run in one process
per core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from statistics import NormalDist

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rollout_sim import WorldSpec, run_rollout, score_models  # benchmarks/ (this script's directory)

from rollout.core import analysis as an
from rollout.core import policy as pol
from rollout.core.drift import wilson_interval
from rollout.demo.policy import load_demo_policy

STABLE, CANDIDATE = "v1", "v2"
STEP = 50
STABLE_RECALL = 0.85
#: The label minimum of the recall gate before issue 10, in labels of any class (default and demo policies).
TODAY_MIN_LABELS: dict[str, int] = {"default": 200, "demo": 100}


class SimProvider:
    """Answers the rendered recall-gate queries from a dict; every other query has no data."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def query(self, promql: str) -> float | None:
        return self.values.get(promql)

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]:
        return []


def _binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def _baseline_today(
    tp_c: int, n_c: int, tp_s: int, n_s: int, margin: float, confidence: float, minimum: int, labels: int
) -> str:
    """The pre-SPRT rule (analysis.judge_interval on ``candidate - stable >= -margin``), copied faithfully."""
    if labels < minimum or n_c <= 0 or n_s <= 0:
        return "Inconclusive"
    interval = wilson_interval(float(tp_c), float(n_c), confidence)
    if interval is None:
        return "Inconclusive"
    stable = tp_s / n_s
    if interval.lower - stable >= -margin:
        return "Successful"
    if not interval.upper - stable >= -margin:
        return "Failed"
    return "Inconclusive"


def fixed_horizon_frauds(p: float, margin: float, alpha: float, beta: float) -> float:
    """Fraud labels per arm of the one-sided pooled two-proportion z-test of Δ=0 against Δ=-2δ at (α, β):
    n = (z₁₋α·√(2·p̄(1-p̄)) + z₁₋β·√(p₀(1-p₀) + p₁(1-p₁)))² / (2δ)², p̄ the pooled rate under H1 (Fleiss)."""
    z = NormalDist().inv_cdf
    p1 = p - 2 * margin
    pooled = (p + p1) / 2
    spread = z(1 - alpha) * math.sqrt(2 * pooled * (1 - pooled)) + z(1 - beta) * math.sqrt(p * (1 - p) + p1 * (1 - p1))
    return spread**2 / (2 * margin) ** 2


def simulate(
    policy_name: str,
    policy: pol.RolloutPolicy,
    gate: pol.OutcomeGate,
    fraud_rate: float,
    cand_recall: float,
    reps: int,
    max_looks: int,
    seed: int,
) -> dict[str, float]:
    rng = random.Random(seed)
    provider = SimProvider()
    world = "demo" if policy.analysis.interval_s < 5 else "default"
    ctx = an._Context(policy, "ab", provider, STABLE, CANDIDATE, policy.analysis.window_s)
    est = gate.estimator
    assert isinstance(est, pol.WilsonEstimator)
    queries = {
        v: (ctx.render(gate.labels_query, v), ctx.render(est.successes, v), ctx.render(est.trials, v))
        for v in (STABLE, CANDIDATE)
    }
    margin = abs(gate.condition.threshold)
    alpha, beta = policy.false_rollback(gate), policy.false_promotion(gate)
    z = NormalDist().inv_cdf
    horizon_frauds = fixed_horizon_frauds(STABLE_RECALL, margin, alpha, beta)
    outcomes = {"Successful": 0, "Failed": 0, "Inconclusive": 0}
    labels_used: list[float] = []
    for _ in range(reps):
        counts = {v: [0, 0, 0] for v in (STABLE, CANDIDATE)}  # labels, tp, frauds
        decision = "Inconclusive"
        for _look in range(max_looks):
            for v, recall in ((STABLE, STABLE_RECALL), (CANDIDATE, cand_recall)):
                frauds = _binomial(rng, STEP, fraud_rate)
                counts[v][0] += STEP
                counts[v][1] += _binomial(rng, frauds, recall)
                counts[v][2] += frauds
            (lc, tpc, nc), (_ls, tps, ns) = counts[CANDIDATE], counts[STABLE]
            if policy_name == "sequential_recall_gate":
                for v, (lq, sq, tq) in queries.items():  # the gate's label minimum counts fraud labels
                    provider.values.update({lq: counts[v][2], sq: counts[v][1], tq: counts[v][2]})
                # The real gate code (analyse() minus the other gates, which have no data here).
                decision = an._outcome_result(ctx, gate).status.value
            elif policy_name == "baseline_today":
                minimum = TODAY_MIN_LABELS[world]
                decision = _baseline_today(tpc, nc, tps, ns, margin, policy.confidence(gate), minimum, lc)
            elif min(nc, ns) >= horizon_frauds:
                pooled = (tpc + tps) / (nc + ns)
                se = math.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / ns)) or 1e-12
                decision = "Failed" if (tpc / nc - tps / ns) / se < -z(1 - alpha) else "Successful"
            if decision in ("Successful", "Failed"):
                break
        outcomes[decision] += 1
        labels_used.append(counts[CANDIDATE][2])
    return {
        "promoted": outcomes["Successful"] / reps,
        "rolled_back": outcomes["Failed"] / reps,
        "undecided": outcomes["Inconclusive"] / reps,
        "median_labels": statistics.median(labels_used),
    }


#: The simulated traffic of each shipped policy: requests per second, label delay (s), longest rollout simulated (s).
WORLDS: dict[str, tuple[float, float, float]] = {
    "default": (50.0, 600.0, 3 * 86400.0),
    "demo": (150.0, 5.0, 3600.0),
}


def _policies() -> dict[str, pol.RolloutPolicy]:
    return {"default": pol.load_policy(), "demo": load_demo_policy()}


def _chunk(
    policy_name: str, fraud_rate: float, candidate_recall: float, reps: int, seed: int
) -> list[dict[str, object]]:
    """``reps`` whole rollouts in one worker process (plain dicts back)."""
    policy = _policies()[policy_name]
    rps, delay, max_s = WORLDS[policy_name]
    spec = WorldSpec(fraud_rate=fraud_rate, stable_recall=STABLE_RECALL, candidate_recall=candidate_recall, rps=rps,
                     label_delay_s=delay)  # fmt: skip
    rng = np.random.default_rng(seed)
    models = score_models(seed)
    return [asdict(run_rollout(policy, spec, rng, models, max_s)) for _ in range(reps)]


def _whole_rollouts(
    pool: Executor, policy_name: str, fraud_rate: float, candidate_recall: float, reps: int, seed: int
) -> dict[str, object]:
    workers = max(os.cpu_count() or 1, 1)
    sizes = [reps // workers + (1 if i < reps % workers else 0) for i in range(workers)]
    futures = [pool.submit(_chunk, policy_name, fraud_rate, candidate_recall, n, seed + 7919 * i)
               for i, n in enumerate(sizes) if n]  # fmt: skip
    results = [r for f in futures for r in f.result()]
    phases = Counter(str(r["phase"]) for r in results)
    by_gate = Counter(
        f"{r['stage']}:{g}"
        for r in results
        if r["phase"] == "RolledBack"
        for g in r["failed_gates"]  # type: ignore[attr-defined]
    )
    return {
        "promoted": phases["Promoted"] / reps,
        "rolled_back": phases["RolledBack"] / reps,
        "undecided": (phases["Aborted"] + phases["Undecided"]) / reps,
        "median_labels": statistics.median(float(r["candidate_labels"]) for r in results),  # type: ignore[arg-type]
        "median_hours": round(statistics.median(float(r["seconds"]) for r in results) / 3600, 2),  # type: ignore[arg-type]
        "rolled_back_by": dict(by_gate.most_common()),
    }


def _rate(row: Mapping[str, object]) -> str:
    return f"{float(row['rolled_back']):.2f} / {float(row['promoted']):.2f} · {float(row['median_labels']):.0f}"  # type: ignore[arg-type]


def markdown_table(report: Mapping[str, object]) -> str:
    """The README's table of a saved report: per case the whole-rollout shares and what rolled it back, then the
    recall gate alone (sequential, the rule before, the fixed horizon) as rolled back / promoted · median labels."""
    lines = [
        "| policy | case | fraud | promoted | rolled back | undecided | median hours "
        "| rolled back by (stage:gate, count) | recall SPRT | rule before | fixed horizon |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:  # type: ignore[attr-defined]
        by = ", ".join(f"{gate} {count}" for gate, count in case["rolled_back_by"].items()) or "—"
        lines.append(
            f"| {case['policy']} | {case['case']} | {case['fraud_rate']:.0%} | {case['promoted']:.3f} "
            f"| {case['rolled_back']:.3f} | {case['undecided']:.3f} | {case['median_hours']} | {by} "
            f"| {_rate(case['sequential_recall_gate'])} | {_rate(case['baseline_today'])} "
            f"| {_rate(case['fixed_horizon'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the default policy at fraud rate 2 %% only, 300 rollouts per case")  # fmt: skip
    parser.add_argument("--reps", type=int, default=None, help="whole rollouts per case (default 200, quick 300)")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--markdown", metavar="REPORT.json", help="print the README table of a saved report and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text(encoding="utf-8"))))
        return 0
    reps = args.reps or (300 if args.quick else 200)
    margin_reps = args.reps or (100 if args.quick else 200)
    policies = _policies()
    names = ["default"] if args.quick else list(policies)
    rates = [0.02] if args.quick else [0.01, 0.02, 0.10]
    started = time.perf_counter()
    out: list[dict[str, object]] = []
    with (
        ProcessPoolExecutor() as pool,
        Progress(*Progress.get_default_columns(), console=Console(stderr=True), transient=True) as progress,
    ):
        task = progress.add_task("simulated rollouts", total=len(names) * len(rates) * 3)
        for name in names:
            policy = policies[name]
            gate = next(g for g in policy.gates if isinstance(g, pol.OutcomeGate) and g.name == "recall")
            margin = abs(gate.condition.threshold)
            cases = {"identical": 0.0, "margin_1x": margin, "margin_2x": 2 * margin}
            for rate in rates:
                max_looks = math.ceil(1500 / (STEP * rate))  # up to ~1500 fraud labels per arm at any rate
                for case, worse in cases.items():
                    recall = STABLE_RECALL - worse
                    n = reps if case == "identical" else margin_reps
                    comparison_reps = min(n, 100 if args.quick else 200)
                    row = _whole_rollouts(pool, name, rate, recall, n, args.seed)
                    comparison = {
                        other: simulate(other, policy, gate, rate, recall, comparison_reps, max_looks, args.seed)
                        for other in ("sequential_recall_gate", "baseline_today", "fixed_horizon")
                    }
                    out.append({"policy": name, "case": case, "fraud_rate": rate, **row, **comparison})
                    progress.advance(task)
    report = {
        "benchmark": "gate_error_rates",
        "what": "whole rollouts (every gate of every stage) through rollout.core.analysis.analyse and "
        "rollout.core.machine.step; "
        "sequential_recall_gate, baseline_today and fixed_horizon: the A/B recall gate alone, labels in steps of 50 "
        "per version per look; median_labels: all the candidate's labels (whole rollouts) or its fraud labels "
        "(the recall gate alone: the fixed horizon's unit)",
        "stable_recall": STABLE_RECALL,
        "worlds": {name: dict(zip(("rps", "label_delay_s", "max_s"), WORLDS[name], strict=True)) for name in names},
        "false_rollback": {name: policies[name].analysis.false_rollback for name in names},
        "false_promotion": {name: policies[name].analysis.false_promotion for name in names},
        "reps": {"identical": reps, "margin_1x": margin_reps, "margin_2x": margin_reps},
        "cases": out,
        "seconds": round(time.perf_counter() - started, 2),
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
