"""The rollout controller: the reconcile loop (:mod:`~rollout.controller.loop`), where its measurements run
(:mod:`~rollout.controller.runners`), its own metrics, and the wiring of the loop to a backend
(:mod:`~rollout.controller.local`, :mod:`~rollout.controller.kube`; ``python -m rollout.controller``).

Must not: import the router (the data plane is reached through the :class:`~rollout.backends.base.RoutingPublisher`
port only), the CLI, the dashboard or the demo; or model code except through :mod:`rollout.backends.registry`.
"""
