"""fraudwatch's model side: data, features, training, evaluation, registry and the scoring service."""

import os

# XGBoost's OpenMP runtime (libgomp) busy-waits between parallel regions by default. On a shared 2-core host that
# starves every other process and makes multi-threaded training ~50x slower under load (measured: 49 s vs 1.6 s
# for the same fit). libgomp reads this once, when it is loaded, so it is set before anything imports xgboost;
# an explicit value in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
