"""Dependency floors sit past the releases with published advisories (issue 11, point 7), and the environment the
tests run in satisfies them. The advisory versions are the first fixed releases named in the issue's audit."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
#: package → the first release past its published advisories (a floor below it admits a vulnerable release).
FIXED_IN: dict[str, str] = {"bentoml": "1.4.19", "mlflow": "2.22.4", "aiohttp": "3.12.14", "starlette": "0.49.1"}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return {Requirement(line).name.lower(): Requirement(line) for line in project["dependencies"]}


@pytest.mark.parametrize(("name", "fixed"), sorted(FIXED_IN.items()))
def test_the_floor_admits_no_release_with_a_published_advisory(name: str, fixed: str) -> None:
    requirement = _requirements()[name]
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version(fixed), f"{requirement} admits releases below {fixed}"


@pytest.mark.parametrize("name", sorted(FIXED_IN))
def test_the_installed_release_satisfies_the_floor(name: str) -> None:
    assert _requirements()[name].specifier.contains(version(name), prereleases=True)
