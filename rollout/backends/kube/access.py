"""Every Kubernetes API request the controller and the router make, as data: what the chart's Roles must grant
(rendered and checked with SubjectAccessReviews in the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Access:
    """One kind of API request a component makes: ``resource`` is ``group:plural[/subresource]`` (group empty for
    the core API); ``name`` says which object when the request names one (``rollout``, ``configmap``, ``lease``)."""

    verb: str
    resource: str
    name: str | None = None


#: Every request the controller's Kubernetes backend makes — what the chart's Role must grant (checked with
#: SubjectAccessReviews in tests/e2e/test_controller_kube.py; the controller runs there with that Role only).
REQUIRED_ACCESS: Final[tuple[Access, ...]] = (
    Access("get", "fraudwatch.io:modelrollouts", "rollout"),  # informer: the object …
    Access("watch", "fraudwatch.io:modelrollouts", "rollout"),  # … and its watch (fieldSelector metadata.name)
    Access("patch", "fraudwatch.io:modelrollouts", "rollout"),  # the finalizer
    Access("update", "fraudwatch.io:modelrollouts/status", "rollout"),  # the status, with resourceVersion
    # Not a request: the API server's check (OwnerReferencesPermissionEnforcement) of the owner references with
    # blockOwnerDeletion on every Deployment and Service the controller creates.
    Access("update", "fraudwatch.io:modelrollouts/finalizers", "rollout"),
    *(Access(v, "apps:deployments") for v in ("list", "watch", "create", "patch", "delete")),  # apply = patch
    *(Access(v, ":services") for v in ("list", "watch", "create", "patch", "delete")),
    *(Access(v, ":pods") for v in ("list", "watch")),  # read only: the model servers' restarts and crash loops
    Access("get", ":configmaps", "configmap"),  # the model-server templates
    Access("watch", ":configmaps", "configmap"),
    Access("create", ":events"),
    Access("list", "discovery.k8s.io:endpointslices"),  # the router replicas, whose tables confirm a scale-down
    Access("create", "coordination.k8s.io:leases"),
    Access("get", "coordination.k8s.io:leases", "lease"),
    Access("update", "coordination.k8s.io:leases", "lease"),
)


#: What the router's ModelRollout watch (rollout/router/table_sources.py) requests.
ROUTER_ACCESS: Final[tuple[Access, ...]] = (
    Access("get", "fraudwatch.io:modelrollouts", "rollout"),
    Access("watch", "fraudwatch.io:modelrollouts", "rollout"),
)
