"""Shared fixtures: a small, real model bundle (booster + manifest + feature store) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kits.bundles import build_small_bundle


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ready model bundle directory (``model.ubj``, ``manifest.json``, ``features.sqlite``); do not modify."""
    directory = tmp_path_factory.mktemp("bundle") / "model"
    build_small_bundle(directory)
    return directory
