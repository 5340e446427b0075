"""The Kubernetes backend: one ModelRollout is the desired state, its status the durable state, and the model versions
run as Deployments + Services the controller owns.

Owns every Kubernetes API call of delivery: :mod:`~rollout.backends.kube.api` (JSON over the official client,
informers), :mod:`~rollout.backends.kube.http` (the CLI's stdlib client), :mod:`~rollout.backends.kube.lease` (leader
election), :mod:`~rollout.backends.kube.resource` (the ModelRollout as data, pure), :mod:`~rollout.backends.kube.access`
(every request, what the chart's Roles grant), and one module per port: :mod:`~rollout.backends.kube.cache`,
:mod:`~rollout.backends.kube.status` (state store, routing publisher), :mod:`~rollout.backends.kube.commands`,
:mod:`~rollout.backends.kube.events`, :mod:`~rollout.backends.kube.workloads`, :mod:`~rollout.backends.kube.versions`.

Must not: import the controller (:mod:`rollout.controller.kube` wires these parts into its loop), the router, or
model code (the registry only through :mod:`rollout.backends.registry`).
"""
