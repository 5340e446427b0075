"""The one-page dashboard: one list of panels (:mod:`~rollout.dashboard.panels`) that builds the Grafana JSON
(:mod:`~rollout.dashboard.grafana`) and the embedded mode's page (:mod:`~rollout.dashboard.page`,
:mod:`~rollout.dashboard.app`; ``fraudwatch-dashboard``).

Must not: import the controller, the router's request path (of the router only the prediction log's label names), or
model code; nothing in the product imports it.
"""
