"""Versions seen from the ModelRollout: names from its spec and status; aliases, bundles and the quality stage through
the MLflow registry when ``controller.kube.use_registry`` (else no quality check)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rollout.backends.base import (
    ModelSource,
    VersionNotFoundError,
)
from rollout.backends.kube.cache import RolloutCache
from rollout.backends.kube.resource import (
    RolloutObject,
    serving_version,
)
from rollout.core.state import ControllerState


@dataclass
class KubeModelSource:
    """:class:`~rollout.backends.base.ModelSource`: the versions the ModelRollout names; the serving alias is its
    serving version. Other aliases and bundles come from the model registry when one is configured."""

    cache: RolloutCache
    state: Callable[[], ControllerState | None]
    serving_alias: Callable[[], str]
    registry: ModelSource | None = None

    def _obj(self) -> RolloutObject:
        obj = self.cache.object()
        if obj is None:
            raise VersionNotFoundError(f"ModelRollout {self.cache.name} not found")
        return obj

    def resolve(self, ref: str) -> str:
        if ref in self._obj().known_versions():
            return ref
        if self.registry is not None:
            return self.registry.resolve(ref)
        raise VersionNotFoundError(f"the ModelRollout names no version {ref!r}")

    def alias_target(self, alias: str) -> str | None:
        if alias == self.serving_alias():
            obj = self._obj()
            return serving_version(self.state(), obj.seed_stable)
        return self.registry.alias_target(alias) if self.registry is not None else None

    def fetch(self, version: str, dest: Path) -> Path:
        if self.registry is None:
            raise VersionNotFoundError(
                f"no model registry configured to fetch {version} (controller.kube.use_registry)"
            )
        return self.registry.fetch(version, dest)

    def bundle_digest(self, version: str) -> str | None:
        return self.registry.bundle_digest(version) if self.registry is not None else None

    def ensure_alias(self, alias: str, version: str, reason: str) -> bool:
        return self.registry.ensure_alias(alias, version, reason) if self.registry is not None else False

    def clear_alias(self, alias: str, version: str, reason: str) -> bool:
        return self.registry.clear_alias(alias, version, reason) if self.registry is not None else False


class NoQuality:
    """The quality stage without a registry: every measurement is an error (the policy should not have the gate)."""

    def evaluate(self, version: str) -> Mapping[str, float]:
        raise RuntimeError(f"no regression set for {version}: set controller.kube.use_registry and quality_set")
