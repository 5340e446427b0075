"""Informers of one rollout (watch + periodic re-list): the ModelRollout, its model-server Deployments, Services and
pods, the templates ConfigMap — so a reconcile reads memory, and any change wakes the loop at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rollout.backends.kube.api import (
    Informer,
    Json,
    KubeApi,
    core_path,
    deployments_path,
    label_selector,
    rollout_path,
)
from rollout.backends.kube.resource import (
    COMPONENT_LABEL,
    MODEL_SERVER,
    ROLLOUT_LABEL,
    ContractError,
    RolloutObject,
    Templates,
)
from rollout.settings import ControllerSettings


class RolloutCache:
    """Informers of one rollout: the ModelRollout, its model-server Deployments and Services, the templates
    ConfigMap. ``changed`` is set on every change of any of them (the loop's wake-up)."""

    def __init__(self, api: KubeApi, settings: ControllerSettings) -> None:
        ks = settings.kube
        self.api = api
        self.name = settings.name
        self.namespace = ks.namespace
        self.changed = threading.Event()
        self.on_rollout_change: Callable[[str, Json], None] | None = None
        owned = (("labelSelector", label_selector({ROLLOUT_LABEL: self.name, COMPONENT_LABEL: MODEL_SERVER})),)
        common: dict[str, Any] = {
            "watch_timeout_s": ks.watch_timeout_s,
            "resync_interval_s": ks.resync_interval_s,
            "retry_backoff_s": ks.retry_backoff_s,
            "on_change": self._changed,
        }
        self.rollout = Informer(api, rollout_path(self.namespace), "modelrollout", name=self.name, **common)
        self.rollout.on_change = self._rollout_changed
        self.deployments = Informer(api, deployments_path(self.namespace), "deployments", query=owned, **common)
        self.services = Informer(api, core_path(self.namespace, "services"), "services", query=owned, **common)
        #: The model servers' pods (read only): container restarts and crash loops are the candidate's evidence.
        self.pods = Informer(api, core_path(self.namespace, "pods"), "pods", query=owned, **common)
        self.configmap = Informer(
            api, core_path(self.namespace, "configmaps"), "configmap", name=ks.model_server_configmap, **common
        )
        self._templates: tuple[str, Templates] | None = None

    @property
    def informers(self) -> tuple[Informer, ...]:
        return (self.rollout, self.deployments, self.services, self.pods, self.configmap)

    def start(self) -> None:
        for informer in self.informers:
            informer.start()

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()

    def wait_synced(self, timeout_s: float) -> bool:
        return all(i.wait_synced(timeout_s) for i in self.informers)

    def _changed(self, _kind: str, _obj: Json) -> None:
        self.changed.set()

    def _rollout_changed(self, kind: str, obj: Json) -> None:
        self.changed.set()
        if self.on_rollout_change is not None:
            self.on_rollout_change(kind, obj)

    def object(self) -> RolloutObject | None:
        raw = self.rollout.get(self.name)
        return RolloutObject(raw) if raw is not None else None

    def templates(self) -> Templates:
        """The parsed templates (parsed again only when the ConfigMap changes); :class:`ContractError` without."""
        configmap = self.configmap.get(self.configmap.name or "")
        if configmap is None:
            raise ContractError(f"ConfigMap {self.configmap.name} not found (the chart's model-server templates)")
        version = str(configmap["metadata"].get("resourceVersion", ""))
        if self._templates is None or self._templates[0] != version:
            self._templates = (version, Templates.from_configmap(configmap))
        return self._templates[1]
