"""deploy/prometheus/rules.yml: promtool accepts it, its unit tests pass, and the PSI it records for a random
distribution shift equals rollout/core/drift.py's PSI on the same counts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rollout.core import drift
from rollout.router.outcomes.settings import DriftSettings
from rollout.settings import PrometheusSettings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# promtool's unit-test files: the retraining alerts (days of simulated time) run at a coarser evaluation interval in a
# file of their own, so the whole check takes seconds instead of minutes.
RULES_TESTS = (
    ROOT / "deploy" / "prometheus" / "rules_test.yml",
    ROOT / "deploy" / "prometheus" / "rules_test_retraining.yml",
)
# A generous bound: each file takes seconds of CPU; a machine busy with other work must not fail the suite.
PROMTOOL_TIMEOUT_S = 300
PSI_RULES = ("model_version_feature:fraudwatch_psi:5m", "model_version_feature:fraudwatch_psi:1h")
MINUTES = 90
EVAL_MINUTE = 75


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = PrometheusSettings().promtool
    if not promtool.exists():
        pytest.fail(f"{promtool} is missing: install Debian's prometheus package (scripts/ensure_system_packages.sh)")
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False
    )


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("rules_test", RULES_TESTS, ids=lambda path: path.name)
def test_promtool_unit_tests_pass(rules_test: Path) -> None:
    result = _promtool("test", "rules", str(rules_test))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_promtool_cases_that_fire_and_that_stay_quiet() -> None:
    cases = [
        case
        for rules_test in RULES_TESTS
        for test in yaml.safe_load(rules_test.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    names = {rule["alert"] for rule in _rules() if "alert" in rule}
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}

    assert names - fires == set(), "alerts without a case where they fire"
    assert names - quiet == set(), "alerts without a case where they stay quiet"


def test_psi_epsilon_in_rules_matches_drift_settings() -> None:
    epsilon = DriftSettings().psi_epsilon
    psi_exprs = [rule["expr"] for rule in _rules() if rule.get("record") in PSI_RULES]
    assert len(psi_exprs) == len(PSI_RULES)
    for expr in psi_exprs:
        clamps = re.findall(r"clamp_min\([^,]+,\s*([0-9.eE+-]+)\)", expr)
        assert len(clamps) == 4
        assert {float(c) for c in clamps} == {epsilon}


def test_alerts_have_severity_and_a_runbook_named_after_them() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "FraudwatchFeatureDriftHigh",
        "FraudwatchScoreDriftHigh",
        "FraudwatchModelErrorRateHigh",
        "FraudwatchModelLatencyHigh",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["runbook_url"] == f"runbooks/{alert['alert']}.md"
        assert alert["annotations"]["summary"]


def test_recording_rule_names_follow_level_metric_operation() -> None:
    names = [rule["record"] for rule in _rules() if "record" in rule]
    assert len(names) == len(set(names))
    for name in names:
        assert len(name.split(":")) == 3, name


def _shift_case(seed: int) -> tuple[list[float], list[list[int]], float]:
    """Random reference fractions, random shifted per-minute counts on three replicas, and drift.py's PSI."""
    rng = np.random.default_rng(seed)
    n_bins = int(rng.integers(4, 11))
    reference = rng.dirichlet(np.ones(n_bins)).tolist()
    shifted = rng.dirichlet(np.ones(n_bins) * 0.7)
    per_replica = [rng.multinomial(int(rng.integers(20, 60)), shifted).tolist() for _ in range(3)]
    totals = np.sum(per_replica, axis=0)
    if totals.sum() == 0:
        pytest.fail("degenerate random case")
    expected = drift.psi(reference, drift.fractions(totals.tolist()), DriftSettings().psi_epsilon)
    return reference, per_replica, expected


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_recorded_psi_equals_drift_py_for_a_random_shift(tmp_path: Path, seed: int) -> None:
    reference, per_replica, expected = _shift_case(seed)
    series: list[dict[str, str]] = []
    for b, fraction in enumerate(reference):
        labels = f'model_version="vx",feature="amount",bin="{b}"'
        for replica, counts in enumerate(per_replica):
            series.append(
                {
                    "series": f'fraudwatch_reference_bin_fraction{{{labels},instance="r{replica}"}}',
                    "values": f"{fraction!r}x{MINUTES}",
                }
            )
            series.append(
                {
                    "series": f'fraudwatch_feature_bin_total{{{labels},instance="r{replica}"}}',
                    "values": f"0+{counts[b]}x{MINUTES}",
                }
            )
    checks = [
        {
            "expr": f'abs({name}{{model_version="vx"}} - {expected!r}) < bool 1e-9',
            "eval_time": f"{EVAL_MINUTE}m",
            "exp_samples": [{"labels": '{model_version="vx",feature="amount"}', "value": 1}],
        }
        for name in PSI_RULES
    ]
    suite = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": checks}],
    }
    test_file = tmp_path / "psi_test.yml"
    test_file.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, f"drift.py PSI {expected}:\n{result.stdout}{result.stderr}"
    assert expected > 0.05  # the random case is a real shift
