"""Model versions as Deployments + Services: built from the chart's model-server templates, applied server-side, owned
by the ModelRollout (garbage-collected with it); readiness from the Deployment's status, restarts from its pods."""

from __future__ import annotations

from dataclasses import dataclass, field

from rollout.backends.kube.api import (
    Informer,
    Json,
    KubeApi,
    core_path,
    deployments_path,
)
from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.resource import (
    ROLLOUT_LABEL,
    SPEC_HASH_ANNOTATION,
    VERSION_LABEL,
    ContractError,
    annotation,
    build_workload,
    deployment_readiness,
    pod_restarts,
    pod_trouble,
    service_port,
    workload_name,
)
from rollout.core.workloads import Readiness, WorkloadStatus
from rollout.settings import KubeBackendSettings
from service.common.logging import get_logger, log_event

logger = get_logger(__name__)


@dataclass
class KubeWorkloads:
    """:class:`~rollout.backends.base.Workloads`: a Deployment + Service per version, owned by the ModelRollout."""

    api: KubeApi
    cache: RolloutCache
    settings: KubeBackendSettings
    applied: int = field(default=0, init=False)
    #: Per version, the highest restart count seen of each of its pods (by uid): the count survives a pod being
    #: replaced (a deleted crash-looping pod's restarts still count) and a kubelet that reports less later.
    _restarts_seen: dict[str, dict[str, int]] = field(default_factory=dict, init=False)

    def ensure_running(self, version: str) -> WorkloadStatus:
        obj = self.cache.object()
        if obj is None:
            return WorkloadStatus(version, Readiness.FAILED, detail="the ModelRollout is gone")
        spec = obj.known_versions().get(version)
        if spec is None:
            return WorkloadStatus(version, Readiness.FAILED, detail=f"the ModelRollout names no version {version!r}")
        try:
            deployment, service = build_workload(self.cache.templates(), obj, spec)
        except ContractError as exc:
            return WorkloadStatus(version, Readiness.FAILED, detail=str(exc))
        self._apply(deployment, self.cache.deployments, deployments_path(obj.namespace))
        self._apply(service, self.cache.services, core_path(obj.namespace, "services"))
        return self.status(version)

    def _apply(self, manifest: Json, informer: Informer, collection: str) -> None:
        name = str(manifest["metadata"]["name"])
        held = informer.get(name)
        wanted = manifest["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if held is not None and annotation(held, SPEC_HASH_ANNOTATION) == wanted and not _deleting(held):
            return
        informer.put(self.api.apply(f"{collection}/{name}", manifest, self.settings.field_manager))
        self.applied += 1
        log_event(logger, "workload applied", event="workload_applied", kind=manifest["kind"], name=name,
                  version=manifest["metadata"]["labels"].get(VERSION_LABEL))  # fmt: skip

    def status(self, version: str) -> WorkloadStatus:
        name = workload_name(self.cache.name, version)
        deployment = self.cache.deployments.get(name)
        if deployment is None:
            self._restarts_seen.pop(version, None)
            return WorkloadStatus(version, Readiness.STOPPED)
        readiness, detail = deployment_readiness(deployment)
        pods = [p for p in self.cache.pods.items() if (p.get("metadata", {}).get("labels") or {}).get(VERSION_LABEL)
                == version]  # fmt: skip
        seen = self._restarts_seen.setdefault(version, {})
        for uid, count in pod_restarts(pods).items():
            seen[uid] = max(seen.get(uid, 0), count)
        trouble = pod_trouble(pods)
        detail = f"{detail}; {trouble}" if trouble else detail
        return WorkloadStatus(version, readiness, self.url(version), detail, restarts=sum(seen.values()))

    def url(self, version: str) -> str | None:
        override = self.settings.version_urls.get(version)
        if override is not None:
            return override
        service = self.cache.services.get(workload_name(self.cache.name, version))
        if service is None:
            return None
        return self.settings.service_url_template.format(
            service=service["metadata"]["name"], namespace=self.cache.namespace, port=service_port(service)
        )

    def scale_down(self, version: str) -> bool:
        name = workload_name(self.cache.name, version)
        removed = self.api.delete(deployments_path(self.cache.namespace, name))
        removed = self.api.delete(core_path(self.cache.namespace, "services", name)) or removed
        self.cache.deployments.forget(name)
        self.cache.services.forget(name)
        if removed:
            log_event(logger, "workload deleted", event="workload_scaled_down", version=version, name=name)
        return removed

    def running(self) -> tuple[str, ...]:
        versions = []
        for deployment in self.cache.deployments.items():
            labels = deployment["metadata"].get("labels", {})
            if labels.get(ROLLOUT_LABEL) == self.cache.name and not _deleting(deployment):
                versions.append(str(labels[VERSION_LABEL]))
        return tuple(sorted(versions))

    def delete_all(self) -> int:
        """Delete every workload of the rollout (the finalizer); the number of objects deleted."""
        deleted = 0
        for informer, path in (
            (self.cache.deployments, deployments_path(self.cache.namespace)),
            (self.cache.services, core_path(self.cache.namespace, "services")),
        ):
            for obj in informer.items():
                name = str(obj["metadata"]["name"])
                if self.api.delete(f"{path}/{name}"):
                    deleted += 1
                informer.forget(name)
        return deleted


def _deleting(obj: Json) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))
