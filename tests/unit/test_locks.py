"""The images' lock files (locks/, written by scripts/lock.sh) agree with pyproject.toml, carry a hash for every pin,
and keep the router and the controller free of the model stack; the dependency audit (scripts/audit.py, run by
`make test`) fails on an advisory or a yanked pin and says so when it could check a pin against no advisory
database."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "locks"
#: lock → the pyproject extras it is compiled from (scripts/lock.sh's table).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "serve": ("serve",),
    "router": ("router",),
    "controller": ("controller",),
    "retraining": ("train", "controller"),
}
MODEL_STACK = ("xgboost", "mlflow", "mlflow-skinny", "scipy", "scikit-learn", "pandas", "matplotlib", "bentoml")
LEFT_OUT = "nvidia-nccl-cu12"  # xgboost's multi-GPU collective: the images are CPU-only (scripts/lock.sh)


def _load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fw_audit", ROOT / "scripts" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


audit = _load_audit()


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project


def _direct(component: str) -> list[Requirement]:
    """The core dependencies and those of the component's extras (self-references expanded)."""
    project = _project()
    extras = project["optional-dependencies"]
    pending, seen = list(COMPONENTS[component]), set()
    requirements = [Requirement(line) for line in project["dependencies"]]
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in extras[extra]:
            requirement = Requirement(line)
            if requirement.name == "fraudwatch":
                pending.extend(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def _lock(component: str) -> str:
    return (LOCKS / f"{component}.txt").read_text(encoding="utf-8")


def _blocks(text: str) -> dict[str, str]:
    """Each pinned requirement's block of lines (the pin, its hashes), by normalised name."""
    blocks: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = audit.PIN.match(block)
        if match:
            blocks[canonicalize_name(match.group(1))] = block
    return blocks


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_every_direct_requirement_is_pinned_within_its_range(component: str) -> None:
    pins = audit.pins(_lock(component))
    for requirement in _direct(component):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"locks/{component}.txt lacks {requirement} (run scripts/lock.sh)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"locks/{component}.txt pins {name}=={pins[name]} outside {requirement} (run scripts/lock.sh)"
        )


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_every_pin_carries_a_hash(component: str) -> None:
    blocks = _blocks(_lock(component))
    assert blocks
    unhashed = sorted(name for name, block in blocks.items() if "--hash=sha256:" not in block)
    assert unhashed == []
    assert LEFT_OUT not in blocks


@pytest.mark.parametrize("component", ["router", "controller"])
def test_the_router_and_the_controller_carry_no_model_stack(component: str) -> None:
    pins = audit.pins(_lock(component))
    assert sorted(set(pins) & set(MODEL_STACK)) == []


def test_a_pip_audit_report_splits_into_vulnerable_audited_and_skipped() -> None:
    report = {
        "dependencies": [
            {"name": "Starlette", "version": "0.40.0", "vulns": [{"id": "GHSA-1"}, {"id": "PYSEC-2"}]},
            {"name": "httpx", "version": "0.28.1", "vulns": []},
            {"name": "idna", "skip_reason": "Dependency not found on PyPI and could not be audited: idna (3.10)"},
        ]
    }
    result = audit.parse_pip_audit(report)
    assert result.vulnerable == {"starlette": ["GHSA-1", "PYSEC-2"]}
    assert result.audited == {"starlette", "httpx"}
    assert set(result.skipped) == {"idna"}


def _document(latest: str, releases: dict[str, list[dict[str, Any]]], vulns: list[dict[str, Any]]) -> dict[str, Any]:
    return {"info": {"version": latest}, "releases": releases, "vulnerabilities": vulns}


def test_the_project_json_tells_a_yanked_pin_and_the_newest_releases_advisories() -> None:
    files = {"1.0": [{"yanked": True, "yanked_reason": "bad"}]}
    yanked = audit.project_finding("pkg", "1.0", _document("1.1", files, []))
    assert (yanked.yanked, yanked.yanked_reason, yanked.advisories) == (True, "bad", None)  # not newest: no advisories
    newest = audit.project_finding("pkg", "1.1", _document("1.1", {"1.1": [{"yanked": False}]}, [{"id": "GHSA-x"}]))
    assert (newest.yanked, newest.advisories) == (False, ("GHSA-x",))
    assert audit.project_finding("pkg", "1.1", None).reachable is False


def test_the_audit_fails_on_an_advisory_and_says_what_it_could_not_check() -> None:
    locks = {"locks/a.txt": {"starlette": "0.40.0", "idna": "3.10"}}
    skipped = audit.PipAuditResult(skipped={"starlette": "not found", "idna": "not found"})
    quiet = [
        audit.ProjectFinding("starlette", "0.40.0", True, latest="1.0"),
        audit.ProjectFinding("idna", "3.10", True, latest="3.10", advisories=()),
    ]
    summary = audit.summarise(locks, {"locks/a.txt": skipped}, quiet, 1.0)
    assert not summary.failed
    assert (summary.checked, summary.unchecked) == (["idna==3.10"], ["starlette==0.40.0"])
    assert "NO ADVISORY DATABASE REACHABLE for 1 pins" in audit.report(summary)

    vulnerable = audit.PipAuditResult(vulnerable={"starlette": ["GHSA-1"]}, audited={"starlette"})
    summary = audit.summarise(locks, {"locks/a.txt": vulnerable}, quiet, 1.0)
    assert summary.failed and summary.vulnerable == {"starlette==0.40.0": ["GHSA-1"]}
    assert "ADVISORY starlette==0.40.0: GHSA-1" in audit.report(summary)
