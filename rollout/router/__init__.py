"""The data plane: the router in front of the model services (:mod:`~rollout.router.app`), where its routing tables
come from (:mod:`~rollout.router.table_sources`), its upstream clients, shadow scoring, metrics, the router as a
child process (:mod:`~rollout.router.process`) and the prediction log with its label join
(:mod:`rollout.router.outcomes`).

Must not: import the controller (it reads routing tables, never writes rollout state), the CLI, the dashboard, the
demo, or model code (model services are URLs).
"""
