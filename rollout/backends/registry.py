"""The seam between delivery and the model side: :class:`~rollout.backends.base.ModelSource` and
:class:`~rollout.backends.base.QualityCheck` implemented with :mod:`service.artifacts.registry` and
:mod:`service.training.evaluate`.

This is the only module of :mod:`rollout` that imports the model side's registry and evaluation code (never
training): the controller sees version names, bundle directories, aliases and a dict of metrics, nothing else.

Version names are the names the model reports (``manifest.version``, e.g. ``v3``), because those label every
metric (the model services' ``model_version``, the router's, the outcomes'). The registry knows each registered
version's name from its ``model_version`` tag; :meth:`RegistryModelSource.resolve` accepts that name, a registry
version number (``3``) or an alias (``champion``).

Alias moves follow :class:`service.artifacts.registry.ModelRegistry`'s semantics and audit tags: moving ``champion`` to
a new
version is a promotion (the old champion becomes ``previous``); moving it back to ``previous`` is a rollback.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from rollout.backends.base import VersionNotFoundError
from service.artifacts.bundle import ModelIntegrityError, ScoringModel, load_bundle
from service.artifacts.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    ModelRef,
    ModelRegistry,
    RegistryNotFoundError,
    is_version_number,
    verify_against_registry,
)
from service.common.logging import get_logger, log_event
from service.settings import QualitySettings, Settings
from service.training.evaluate import load_frozen_set, quality_gate

logger = get_logger(__name__)


class RegistryModelSource:
    """:class:`~rollout.backends.base.ModelSource` over the MLflow registry of ``settings``."""

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None) -> None:
        self._registry = registry or ModelRegistry(settings)
        self._model = settings.registered_model_name
        self._lock = threading.Lock()

    # ---- names

    def _refs(self) -> list[ModelRef]:
        return self._registry.versions(self._model)

    def _ref_of(self, version: str) -> ModelRef:
        """The registered version whose model reports ``version`` (the newest when several do)."""
        for ref in self._refs():
            if ref.model_version == version:
                return ref
        raise VersionNotFoundError(f"model {self._model!r} has no registered version named {version!r}")

    def _name_of(self, ref: ModelRef) -> str:
        if not ref.model_version:
            raise VersionNotFoundError(f"{ref.name} v{ref.version} has no model_version tag")
        return ref.model_version

    def resolve(self, ref: str) -> str:
        try:
            if is_version_number(ref):
                return self._name_of(self._registry.get_version(self._model, ref))
            target = self._registry.alias_version(self._model, ref)
        except RegistryNotFoundError as exc:
            raise VersionNotFoundError(str(exc)) from exc
        if target is not None:
            return self._name_of(self._registry.get_version(self._model, target))
        return self._name_of(self._ref_of(ref))

    def alias_target(self, alias: str) -> str | None:
        target = self._registry.alias_version(self._model, alias)
        return None if target is None else self._name_of(self._registry.get_version(self._model, target))

    # ---- bundles

    def fetch(self, version: str, dest: Path) -> Path:
        """The bundle in ``dest``: kept when it is already the registered one (verified), else downloaded."""
        with self._lock:
            ref = self._ref_of(version)
            if dest.exists():
                try:
                    verify_against_registry(dest, ref)
                    return dest
                except (ModelIntegrityError, OSError, ValueError, KeyError):
                    log_event(logger, "cached bundle stale, fetching again", version=version, dest=str(dest))
            return self._registry.fetch_bundle(ref, dest)

    def bundle_digest(self, version: str) -> str | None:
        return self._ref_of(version).bundle_sha256

    def load(self, version: str, dest: Path) -> ScoringModel:
        """The verified model of ``version``: fetched into ``dest``, loaded from the bytes checked against the
        version's bundle digest."""
        path = self.fetch(version, dest)
        return load_bundle(path, expected_digest=self._ref_of(version).bundle_sha256)

    # ---- aliases

    def ensure_alias(self, alias: str, version: str, reason: str) -> bool:
        number = self._ref_of(version).version
        current = self._registry.alias_version(self._model, alias)
        if current == number:
            return False
        if alias == CHAMPION:
            if self._registry.alias_version(self._model, PREVIOUS) == number:
                self._registry.rollback(self._model, reason)
            else:
                self._registry.promote(self._model, number, reason)
        elif alias == CHALLENGER:
            self._registry.set_challenger(self._model, number, reason)
        else:
            self._registry.set_alias(self._model, alias, number, reason)
        return True

    def clear_alias(self, alias: str, version: str, reason: str) -> bool:
        number = self._ref_of(version).version
        if self._registry.alias_version(self._model, alias) != number:
            return False
        self._registry.remove_alias(self._model, alias, reason)
        return True


class QualityUnavailableError(RuntimeError):
    """No regression set is configured: the quality stage cannot be measured."""


class RegressionSetQuality:
    """:class:`~rollout.backends.base.QualityCheck`: the version's bundle scored on a frozen labelled set at its own
    threshold (:func:`service.training.evaluate.quality_gate`); results are cached per (version, booster checksum)."""

    def __init__(self, source: RegistryModelSource, frozen_meta: Path | None, bundles_dir: Path) -> None:
        self._source = source
        self._meta = frozen_meta
        self._bundles = bundles_dir
        self._frame: pd.DataFrame | None = None
        self._cache: dict[tuple[str, str], dict[str, float]] = {}

    def evaluate(self, version: str) -> Mapping[str, float]:
        if self._meta is None:
            raise QualityUnavailableError("no regression set configured (FW_ROLLOUT_CONTROLLER__QUALITY_SET)")
        model = self._source.load(version, self._bundles / version)
        key = (version, model.manifest.sha256)
        if key not in self._cache:
            if self._frame is None:
                self._frame = load_frozen_set(self._meta)
            report = quality_gate(model, self._frame, QualitySettings())
            self._cache[key] = dict(report.values)
            log_event(
                logger, "regression set scored", version=version, rows=report.n_rows, metrics=_rounded(report.values)
            )
        return self._cache[key]


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {key: round(value, 6) for key, value in values.items() if key in ("pr_auc", "recall", "precision")}
