"""Model artifacts: the bundle format (:mod:`~service.artifacts.bundle`: booster + manifest, digests, never a pickle),
the MLflow registry (:mod:`~service.artifacts.registry`) and where a worker's bundle comes from
(:mod:`~service.artifacts.source`).

Must not: import training (what a training run logs is built in :mod:`service.training.pipeline`), serving,
retraining, or anything of :mod:`rollout`.
"""
