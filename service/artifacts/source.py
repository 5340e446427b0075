"""Where a scoring worker's model bundle comes from: a directory, or the MLflow registry.

In order of precedence (``ServeSettings``):

* ``model_dir`` (``FW_SERVE__MODEL_DIR``) — a bundle directory mounted, synced or baked into the image;
* ``model_uri`` (``FW_SERVE__MODEL_URI``) — ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` in the
  registry at ``FW_MLFLOW_TRACKING_URI`` (what a ModelRollout's ``modelUri`` and the retraining hand-off name);
* ``model_alias`` set explicitly (``FW_SERVE__MODEL_ALIAS``, a ModelRollout's ``registryAlias``) — the alias of
  ``model_name`` in that registry.

A registry reference is resolved once, at start-up: the worker serves the version the alias pointed at then (a
moved alias means a new rollout, not a silent swap). The verified bundle (``ModelRegistry.fetch_bundle``: its
digest over every file against the version's ``bundle_sha256``) is downloaded to ``<home>/serving/<name>-v<version>``;
workers of one server share it under a file lock, and a bundle already there is reused only when it verifies.
:func:`resolve_bundle` returns the directory with the digest it must have, and the worker loads it with that digest
(``load_bundle(..., expected_digest=...)``): checked again before parsing, the model built from the hashed bytes.
A ``model_dir`` is checked against ``model_digest`` when that is set.
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from service.common.logging import get_logger, log_event
from service.settings import ServeSettings, Settings

logger = get_logger(__name__)

SERVING_DIR: Final[str] = "serving"
#: ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (MLflow's model-registry URI forms).
_MODEL_URI: Final = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))$")


class ModelUnavailableError(RuntimeError):
    """No bundle could be resolved or found in time."""


@dataclass(frozen=True)
class RegistryReference:
    """A registered model's version number or alias."""

    name: str
    version_or_alias: str

    def __str__(self) -> str:
        separator = "/" if self.version_or_alias.isdigit() else "@"
        return f"models:/{self.name}{separator}{self.version_or_alias}"


def parse_model_uri(uri: str) -> RegistryReference:
    """``models:/refund-fraud/7`` → (refund-fraud, 7); ``models:/refund-fraud@champion`` → (refund-fraud, champion)."""
    match = _MODEL_URI.match(uri.strip())
    if match is None:
        raise ModelUnavailableError(
            f"FW_SERVE__MODEL_URI={uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>"
        )
    return RegistryReference(match["name"], match["version"] or match["alias"])


def registry_reference(serve: ServeSettings) -> RegistryReference | None:
    """The registry reference the settings name (``model_uri``, else an explicitly set ``model_alias``), or None."""
    if serve.model_uri:
        return parse_model_uri(serve.model_uri)
    if "model_alias" in serve.model_fields_set:
        return RegistryReference(serve.model_name, serve.model_alias)
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ResolvedBundle:
    """A bundle directory and the digest over its files it must have (None: a ``model_dir`` without one)."""

    directory: Path
    digest: str | None


def fetch_from_registry(settings: Settings, reference: RegistryReference) -> ResolvedBundle:
    """The verified bundle of ``reference`` under ``<home>/serving/`` (downloaded unless a verified copy is there)."""
    from service.artifacts.bundle import ModelIntegrityError
    from service.artifacts.registry import ModelRegistry, RegistryError, verify_against_registry

    registry = ModelRegistry(settings)
    try:
        ref = registry.resolve(reference.name, reference.version_or_alias)
    except RegistryError as exc:
        raise ModelUnavailableError(f"{reference}: {exc}") from exc
    dest = settings.home / SERVING_DIR / f"{ref.name}-v{ref.version}"
    with _locked(dest.with_name(dest.name + ".lock")):
        if dest.is_dir():
            try:
                verify_against_registry(dest, ref)
            except (ModelIntegrityError, OSError, ValueError):
                pass  # a partial or tampered copy: fetched again below
            else:
                return ResolvedBundle(dest, ref.bundle_sha256)
        path = registry.fetch_bundle(ref, dest)
    log_event(logger, "model fetched from the registry", reference=str(reference), version=ref.version, dest=str(path))
    return ResolvedBundle(path, ref.bundle_sha256)


def resolve_model_dir(settings: Settings) -> Path:
    """The bundle directory to serve (see the module docstring for the order)."""
    return resolve_bundle(settings).directory


def resolve_bundle(settings: Settings) -> ResolvedBundle:
    """The bundle directory to serve and the digest it must have (see the module docstring for the order)."""
    serve = settings.serve
    if serve.model_dir is not None:
        return ResolvedBundle(serve.model_dir, serve.model_digest)
    reference = registry_reference(serve)
    if reference is None:
        raise ModelUnavailableError(
            "no model configured: set FW_SERVE__MODEL_DIR (a bundle directory), FW_SERVE__MODEL_URI "
            "(models:/<name>/<version> or models:/<name>@<alias>) or FW_SERVE__MODEL_ALIAS"
        )
    return fetch_from_registry(settings, reference)
