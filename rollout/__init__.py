"""fraudwatch's delivery side: ships a model version through shadow → canary → A/B → full on Prometheus evidence.

Packages, by plane (docs/architecture.md, "The folders"; the layering is checked by ``lint-imports``, .importlinter):
:mod:`rollout.core` (pure vocabulary, policy, stage machine, analysis, statistics), :mod:`rollout.controller` (the
control loop), :mod:`rollout.backends` (its ports and their implementations), :mod:`rollout.router` (the data
plane), :mod:`rollout.cli`, :mod:`rollout.dashboard` and :mod:`rollout.demo`.

Must not: import model code — from :mod:`service` only ``common``, ``api`` and ``settings``, plus the model seam in
:mod:`rollout.backends.registry` (and the model server's launcher, :mod:`service.serving.process`, in the local
backend).
"""
