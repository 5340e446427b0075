"""Data: the synthetic refund stream and the credit-card benchmark loader, feature engineering (one code path for
training and serving), per-account aggregates and the feature store.

Must not: import training, artifacts, serving or retraining, or anything of :mod:`rollout`.
"""
