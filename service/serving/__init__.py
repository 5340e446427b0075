"""Serving: the BentoML service (:mod:`~service.serving.bento`), its metrics, and the model server as a child process
(:mod:`~service.serving.process`, which imports no model code: the local rollout backend uses it).

Must not: import training, retraining, the demos or anything of :mod:`rollout`.
"""
