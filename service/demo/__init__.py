"""The model-side demos: the quickstart (``fraudwatch demo``) and the rollout demo's model half (``fraudwatch
demo-versions``: three versions and a JSON hand-off).

Must not: hold production code (training lives in :mod:`service.training.pipeline`) or import :mod:`rollout`;
nothing in the product imports it.
"""
