"""Each console script's entry module, imported in a fresh interpreter, loads only what its job needs.

The router, the controller, ``rolloutctl`` and the retraining webhook carry no training stack: no XGBoost,
scikit-learn, SciPy, pandas, MLflow, matplotlib or BentoML in their processes (memory per pod, start-up time of
every CLI call). The time budgets are of the import's CPU time, not wall time (at load 12 on 2 cores the router's
import took 9.7-14 s of wall time against about 1.2 s of CPU), loose on purpose — about five times what a quiet
2-core machine measures — and catch an import of the training stack (seconds of CPU) rather than small drift.

That each image's entry modules import with only what its lock installs is checked in the images themselves
(tests/e2e/test_images.py): here optional imports (XGBoost's of scikit-learn and pandas, uvicorn's of watchfiles)
succeed because the development environment has everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING_STACK = ("xgboost", "sklearn", "scipy", "pandas", "mlflow", "matplotlib", "bentoml")

# entry module -> (modules it must not load, import-time budget in seconds)
BUDGETS: dict[str, tuple[tuple[str, ...], float]] = {
    "rollout.router.app": (TRAINING_STACK, 6.0),  # fraudwatch-router
    # the controller (kube client only when used), and its Kubernetes backend (the chart's controller)
    "rollout.controller.loop": ((*TRAINING_STACK, "kubernetes"), 5.0),
    "rollout.controller.kube": (TRAINING_STACK, 6.0),
    "rollout.cli.main": ((*TRAINING_STACK, "numpy", "kubernetes"), 3.0),  # rolloutctl, kubectl-modelrollout
    "service.retraining.webhook": (TRAINING_STACK, 6.0),  # the retraining webhook: retrains in subprocesses
    "service.cli.main": (TRAINING_STACK, 3.0),  # fraudwatch (retrain, train, …): each command imports its own
    "rollout.dashboard.app": (TRAINING_STACK, 6.0),  # fraudwatch-dashboard (the demo's)
    "rollout.demo.main": (TRAINING_STACK, 6.0),  # fraudwatch-demo: the model side runs in child processes
}

_PROBE = """
import json, sys, time
start = time.process_time()
__import__(sys.argv[1])
seconds = time.process_time() - start
print(json.dumps({"seconds": seconds, "modules": sorted(sys.modules)}))
"""


def _import_in_fresh_interpreter(module: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("module", sorted(BUDGETS))
def test_entry_module_loads_no_heavy_package(module: str) -> None:
    forbidden, budget_s = BUDGETS[module]
    loaded = _import_in_fresh_interpreter(module)
    top_level = {str(name).split(".")[0] for name in loaded["modules"]}  # type: ignore[attr-defined]
    assert top_level.isdisjoint(forbidden), f"{module} loads {sorted(top_level & set(forbidden))}"
    seconds = float(loaded["seconds"])  # type: ignore[arg-type]
    assert seconds < budget_s, f"importing {module} took {seconds:.2f} s of CPU (budget {budget_s} s)"
