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
FIXED_IN: dict[str, str] = {
    "bentoml": "1.4.19",
    "mlflow": "2.22.4",
    "mlflow-skinny": "2.22.4",  # the MLflow client the model server carries: mlflow's code, mlflow's advisories
    "aiohttp": "3.12.14",
    "starlette": "0.49.1",
}


def _requirements(name: str) -> list[Requirement]:
    """Every requirement on ``name``: the core dependencies and each component's extra (a name may recur)."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    lines = [*project["dependencies"], *(line for extra in project["optional-dependencies"].values() for line in extra)]
    found = [Requirement(line) for line in lines if Requirement(line).name.lower() == name]
    assert found, f"pyproject.toml does not require {name}"
    return found


@pytest.mark.parametrize(("name", "fixed"), sorted(FIXED_IN.items()))
def test_the_floor_admits_no_release_with_a_published_advisory(name: str, fixed: str) -> None:
    for requirement in _requirements(name):
        floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        assert floors and min(floors) >= Version(fixed), f"{requirement} admits releases below {fixed}"


@pytest.mark.parametrize("name", sorted(FIXED_IN))
def test_the_installed_release_satisfies_the_floor(name: str) -> None:
    for requirement in _requirements(name):
        assert requirement.specifier.contains(version(name), prereleases=True)
