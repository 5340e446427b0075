"""Training: the pipeline (:mod:`~service.training.pipeline`: a data window → a trained, evaluated, registered
version), XGBoost training, evaluation and the quality gate, the training report.

Must not: import serving, retraining, the demos or anything of :mod:`rollout`.
"""
