"""fraudwatch's model side: data, features, training, evaluation, the registry, the scoring service, retraining.

Packages: :mod:`service.common` (plumbing every component shares), :mod:`service.api`, :mod:`service.data`,
:mod:`service.training`, :mod:`service.artifacts`, :mod:`service.serving`, :mod:`service.retraining`,
:mod:`service.demo`, :mod:`service.cli` (docs/architecture.md, "The folders"; checked by ``lint-imports``).

Must not: import :mod:`rollout` or know about stages or traffic splitting.
"""

import os

# XGBoost's OpenMP runtime (libgomp) busy-waits between parallel regions by default. On a shared 2-core host that
# starves every other process and makes multi-threaded training ~50x slower under load (measured: 49 s vs 1.6 s
# for the same fit). libgomp reads this once, when it is loaded, so it is set before anything imports xgboost;
# an explicit value in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
