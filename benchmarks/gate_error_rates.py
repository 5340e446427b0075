"""Error rates of the recall gate: simulated rollouts through the real ``rollout.analysis`` with the default policy.

A simulated provider answers the recall gate's own queries (labels, tp, tp|fn per version) from simulated counts;
labels arrive in steps of 50 per version per look. Cases: ``identical`` (candidate recall = stable's),
``margin_1x`` / ``margin_2x`` (candidate worse by 1× / 2× the gate's margin δ). Three policies:

* ``sequential`` — today's code (Wald's SPRT on the difference, ``rollout.sequential``);
* ``baseline_today`` — the previous rule, a faithful copy: the candidate's Wilson interval against stable's point;
* ``fixed_horizon`` — one look at the fixed sample size of a one-sided z-test with the same α, β.

Prints one JSON object. ``--quick`` runs fraud rate 2 % with fewer repetitions (< 1 minute).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

from rollout import analysis as an
from rollout import policy as pol
from rollout.drift import wilson_interval

STABLE, CANDIDATE = "v1", "v2"
STEP = 50
STABLE_RECALL = 0.85


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
    ctx = an._Context(policy, "ab", provider, STABLE, CANDIDATE, policy.analysis.window_s)
    est = gate.estimator
    assert isinstance(est, pol.WilsonEstimator)
    queries = {
        v: (ctx.render(gate.labels_query, v), ctx.render(est.successes, v), ctx.render(est.trials, v))
        for v in (STABLE, CANDIDATE)
    }
    margin = abs(gate.condition.threshold)
    minimum = policy.min_labels(gate, "ab")
    alpha, beta = policy.false_rollback(gate), policy.false_promotion(gate)
    z = NormalDist().inv_cdf
    # Fixed horizon: fraud labels per arm for a one-sided z-test of Δ=0 vs Δ=-2δ at (α, β).
    p = STABLE_RECALL
    horizon_frauds = (z(1 - alpha) + z(1 - beta)) ** 2 * 2 * p * (1 - p) / (2 * margin) ** 2
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
            if policy_name == "sequential":
                for v, (lq, sq, tq) in queries.items():
                    provider.values.update({lq: counts[v][0], sq: counts[v][1], tq: counts[v][2]})
                # The real gate code (analyse() minus the other gates, which have no data here).
                decision = an._outcome_result(ctx, gate).status.value
            elif policy_name == "baseline_today":
                decision = _baseline_today(tpc, nc, tps, ns, margin, policy.confidence(gate), minimum, lc)
            else:
                if min(nc, ns) >= horizon_frauds:
                    diff = tpc / nc - tps / ns
                    se = math.sqrt((tpc / nc) * (1 - tpc / nc) / nc + (tps / ns) * (1 - tps / ns) / ns) or 1e-12
                    decision = "Failed" if diff / se < -z(1 - alpha) else "Successful"
            if decision in ("Successful", "Failed"):
                break
        outcomes[decision] += 1
        labels_used.append(counts[CANDIDATE][0])
    return {
        "promoted": outcomes["Successful"] / reps,
        "rolled_back": outcomes["Failed"] / reps,
        "undecided": outcomes["Inconclusive"] / reps,
        "median_labels": statistics.median(labels_used),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fraud rate 2 %% only, fewer repetitions (< 1 min)")
    parser.add_argument("--reps", type=int, default=None, help="rollouts per case (default 200, quick 60)")
    parser.add_argument("--seed", type=int, default=20260101)
    args = parser.parse_args(argv)
    reps = args.reps or (60 if args.quick else 200)
    policy = pol.load_policy()
    gate = next(g for g in policy.gates if isinstance(g, pol.OutcomeGate) and g.name == "recall")
    margin = abs(gate.condition.threshold)
    rates = [0.02] if args.quick else [0.01, 0.02, 0.10]
    cases: dict[str, float] = {"identical": 0.0, "margin_1x": margin, "margin_2x": 2 * margin}
    runners: dict[str, Callable[..., dict[str, float]]] = {
        name: simulate for name in ("sequential", "baseline_today", "fixed_horizon")
    }
    started = time.perf_counter()
    out: list[dict[str, object]] = []
    for rate in rates:
        max_looks = math.ceil(1500 / (STEP * rate))  # up to ~1500 fraud labels per arm at any rate
        for case, worse in cases.items():
            for name, run in runners.items():
                row = run(name, policy, gate, rate, STABLE_RECALL - worse, reps, max_looks, args.seed)
                out.append({"policy": name, "case": case, "fraud_rate": rate, **row})
    report = {
        "benchmark": "gate_error_rates",
        "gate": gate.name,
        "margin": margin,
        "stable_recall": STABLE_RECALL,
        "false_rollback": policy.false_rollback(gate),
        "false_promotion": policy.false_promotion(gate),
        "reps": reps,
        "labels_step": STEP,
        "cases": out,
        "seconds": round(time.perf_counter() - started, 2),
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
