"""Fixtures of the unit tests that several modules share: the isolated helm of the chart tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kits.chart import DRY_RENDER_VALUES, Helm, HelmNotFoundError, locate_helm


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = locate_helm()
    except HelmNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Helm.isolated(binary, tmp_path_factory.mktemp("helm-home")).with_base(DRY_RENDER_VALUES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chart-values")
