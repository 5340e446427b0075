"""The local backend: model versions as ``bentoml serve`` child processes on loopback
(:mod:`~rollout.backends.local.workloads`), routing through the routers' admin endpoint
(:mod:`~rollout.backends.local.routing`), and the controller's state, commands and events as files in its state
directory (:mod:`~rollout.backends.local.state`, :mod:`~rollout.backends.local.inbox`,
:mod:`~rollout.backends.local.events`).

Must not: import the controller or the router; model code only through :mod:`service.serving.process` (starting a
model server) and :mod:`rollout.backends.registry`.
"""
