"""Retraining: the job (window → train → gates → register → hand-off), recalibration, the Alertmanager webhook and
its triggers, the hand-off to delivery (:mod:`~service.retraining.handoff`: a CLI call or a ModelRollout patch).

Must not: import anything of :mod:`rollout` (delivery is reached through the hand-off only) or the demos.
"""
