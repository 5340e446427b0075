"""benchmarks/rollout_sim.py, the simulated world of benchmarks/gate_error_rates.py: it answers every query the shipped
policies' gates ask (an unanswered one raises), and the real analysis and stage machine it drives promote an
identical candidate and roll back a broken one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from rollout.core import policy as pol
from rollout.demo.policy import load_demo_policy

ROOT = Path(__file__).resolve().parents[2]


def _sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rollout_sim", ROOT / "benchmarks" / "rollout_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rollout_sim"] = module
    spec.loader.exec_module(module)
    return module


SIM = _sim()


def _run(
    policy: pol.RolloutPolicy, candidate_recall: float, seed: int, rps: float, delay: float, max_s: float
) -> object:
    spec = SIM.WorldSpec(fraud_rate=0.05, stable_recall=0.85, candidate_recall=candidate_recall, rps=rps,
                         label_delay_s=delay)  # fmt: skip
    return SIM.run_rollout(policy, spec, np.random.default_rng(seed), SIM.score_models(seed), max_s)


def test_an_identical_candidate_goes_through_every_stage_of_the_demo_policy() -> None:
    result = _run(load_demo_policy(), 0.85, seed=1, rps=150, delay=5, max_s=3600)
    assert (result.phase, result.stage, result.failed_gates) == ("Promoted", "full", ())  # type: ignore[attr-defined]


POLICIES = [
    pytest.param(pol.load_policy(), 50, 300, id="default"),
    pytest.param(load_demo_policy(), 150, 5, id="demo"),
]


@pytest.mark.parametrize(("policy", "rps", "delay"), POLICIES)
def test_a_candidate_that_misses_most_fraud_is_rolled_back(policy: pol.RolloutPolicy, rps: float, delay: float) -> None:
    result = _run(policy, 0.3, seed=2, rps=rps, delay=delay, max_s=86400)
    assert result.phase == "RolledBack"  # type: ignore[attr-defined]
    caught_by = {"recall", "roc-auc", "precision", "decision-rate-shift", "shadow-agreement", "recall-paired",
                 "roc-auc-paired", "false-positive-rate-paired"}  # fmt: skip
    assert set(result.failed_gates) & caught_by  # type: ignore[attr-defined]


@pytest.mark.parametrize(("policy", "rps", "delay"), POLICIES)
def test_a_worse_candidate_is_rolled_back_in_shadow_by_a_paired_gate(
    policy: pol.RolloutPolicy, rps: float, delay: float
) -> None:
    """Issue 10: the paired outcome gates judge the requests both versions scored, before any customer sees the
    candidate's decisions."""
    result = _run(policy, 0.72, seed=4, rps=rps, delay=delay, max_s=86400)
    assert (result.phase, result.stage) == ("RolledBack", "shadow")  # type: ignore[attr-defined]
    assert set(result.failed_gates) <= {"recall-paired", "roc-auc-paired"}  # type: ignore[attr-defined]


def test_every_query_of_the_shipped_policies_is_answered_or_the_simulation_fails_loudly() -> None:
    provider = SIM.SimProvider()
    with pytest.raises(KeyError, match="no value"):
        provider.query("up")
    for policy in (pol.load_policy(), load_demo_policy()):
        assert {g.name for g in policy.gates if isinstance(g, pol.MetricGate)} <= set(SIM.METRIC_MODELS)


def _gate_error_rates() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # gate_error_rates imports rollout_sim as its sibling
    try:
        spec = importlib.util.spec_from_file_location("gate_error_rates", ROOT / "benchmarks" / "gate_error_rates.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize(("p", "margin", "alpha", "beta"), [(0.85, 0.05, 0.05, 0.1), (0.6, 0.1, 0.01, 0.05)])
def test_the_fixed_horizon_has_the_size_and_power_it_is_sized_for(p: float, margin: float, alpha: float,
                                                                  beta: float) -> None:  # fmt: skip
    """The benchmark's fixed-horizon comparison is only fair if that test really has (α, β): simulated at its own
    sample size, the pooled one-sided z-test rejects Δ=0 about α of the time and keeps Δ=-2δ about β of the time."""
    n = int(np.ceil(_gate_error_rates().fixed_horizon_frauds(p, margin, alpha, beta)))
    rng = np.random.default_rng(11)
    reps = 40_000
    z = -np.quantile(rng.standard_normal(2_000_000), alpha)  # z_{1-α}, independently of the module's NormalDist

    def rejects(candidate: float) -> float:
        c, s = rng.binomial(n, candidate, reps), rng.binomial(n, p, reps)
        pooled = (c + s) / (2 * n)
        se = np.sqrt(pooled * (1 - pooled) * 2 / n)
        return float(np.mean((c - s) / n / se < -z))

    assert rejects(p) == pytest.approx(alpha, abs=4 * np.sqrt(alpha * (1 - alpha) / reps) + 0.003)
    assert 1 - rejects(p - 2 * margin) == pytest.approx(beta, abs=4 * np.sqrt(beta * (1 - beta) / reps) + 0.01)
