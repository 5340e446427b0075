"""The controller's ports (:mod:`~rollout.backends.base`: workloads, routing, metrics, model source, state, commands,
events) and their implementations: :mod:`~rollout.backends.local` (processes and files), :mod:`~rollout.backends.kube`
(a ModelRollout), :mod:`~rollout.backends.podman`, the one Prometheus client (:mod:`~rollout.backends.prometheus`) and
the one seam to the model side (:mod:`~rollout.backends.registry`).

Must not: import the controller, the router, the CLI, the dashboard or the demo; model code anywhere but
:mod:`~rollout.backends.registry`.
"""
