"""deploy/krew/modelrollout.yaml against the rules ``kubectl krew install --manifest`` and the krew index apply
(sigs.k8s.io/krew internal/index/validation: ValidatePlugin, validatePlatform, validateFiles, validateSelector; the
index decodes manifests strictly, so an unknown field is refused too), and against this project: its version, the
archive scripts/krew-package.sh names, the plugin's console scripts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "krew" / "modelrollout.yaml"

API_VERSION: Final[str] = "krew.googlecontainertools.github.com/v1alpha2"
SAFE_NAME = re.compile(r"^[\w-]+$")
SHA256 = re.compile(r"^[a-f0-9]{64}$")
# krew's semver: a leading "v", then semantic versioning 2.0
SEMVER = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
WINDOWS_FORBIDDEN = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
FIELDS: Final[dict[str, set[str]]] = {
    "": {"apiVersion", "kind", "metadata", "spec"},
    "spec": {"version", "shortDescription", "description", "caveats", "homepage", "platforms"},
    "platform": {"selector", "uri", "sha256", "files", "bin"},
    "selector": {"matchLabels", "matchExpressions"},
    "file": {"from", "to"},
}


def krew_errors(name: str, plugin: dict[str, Any]) -> list[str]:
    """What krew's ValidatePlugin(name, plugin) would refuse (and the strict decoder's unknown fields)."""
    errors = [f"unknown field {k!r}" for k in set(plugin) - FIELDS[""]]
    spec = plugin.get("spec") or {}
    errors += [f"unknown field spec.{k}" for k in set(spec) - FIELDS["spec"]]
    if plugin.get("apiVersion") != API_VERSION:
        errors.append("apiVersion")
    if plugin.get("kind") != "Plugin":
        errors.append("kind")
    if not SAFE_NAME.match(name) or name.upper() in WINDOWS_FORBIDDEN:
        errors.append("unsafe name")
    if (plugin.get("metadata") or {}).get("name") != name:
        errors.append("metadata.name is not the file's name")
    short = spec.get("shortDescription") or ""
    if not short or "\n" in short or "\r" in short:
        errors.append("shortDescription")
    if not SEMVER.match(str(spec.get("version", ""))):
        errors.append("version")
    platforms = spec.get("platforms") or []
    if not platforms:
        errors.append("no platform")
    for platform in platforms:
        errors += [f"unknown field platform.{k}" for k in set(platform) - FIELDS["platform"]]
        if not platform.get("uri"):
            errors.append("uri")
        if not SHA256.match(str(platform.get("sha256", ""))):
            errors.append("sha256")
        if not platform.get("bin"):
            errors.append("bin")
        files = platform.get("files")
        if files is not None and (not files or any(not f.get("from") or not f.get("to") for f in files)):
            errors.append("files")
        errors += [f"unknown field file.{k}" for f in files or () for k in set(f) - FIELDS["file"]]
        selector = platform.get("selector")
        keys = [
            *(selector or {}).get("matchLabels", {}),
            *(e["key"] for e in (selector or {}).get("matchExpressions", [])),
        ]
        if not selector or not keys or any(k not in ("os", "arch") for k in keys):
            errors.append("selector")
    return errors


def manifest() -> dict[str, Any]:
    loaded = yaml.safe_load(MANIFEST.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_manifest_passes_krew_s_validation() -> None:
    assert krew_errors(MANIFEST.stem, manifest()) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda m: m["spec"].update(version="0.1.0"), "version"),  # krew wants the leading v
        (lambda m: m["spec"]["platforms"][0].update(sha256="ABC"), "sha256"),
        (lambda m: m["spec"].update(shortDescription="two\nlines"), "shortDescription"),
        (lambda m: m["metadata"].update(name="kubectl-modelrollout"), "metadata.name is not the file's name"),
        (lambda m: m["spec"]["platforms"][0]["selector"]["matchLabels"].update(distro="debian"), "selector"),
        (lambda m: m["spec"].update(caveat="typo"), "unknown field spec.caveat"),
    ],
)
def test_the_validation_refuses_what_krew_refuses(change: Any, error: str) -> None:
    broken = manifest()
    change(broken)
    assert error in krew_errors(MANIFEST.stem, broken)


def test_the_manifest_names_this_version_s_archive_and_the_plugin_s_executables() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = manifest()["spec"]
    assert spec["version"] == f"v{project['version']}"
    [platform] = spec["platforms"]
    archive = f"kubectl-modelrollout-{spec['version']}-linux-amd64"
    assert platform["uri"].endswith(f"/{spec['version']}/{archive}.tar.gz")
    assert platform["selector"]["matchLabels"] == {"os": "linux", "arch": "amd64"}
    assert {f["from"] for f in platform["files"]} == {
        f"{archive}/kubectl-modelrollout", f"{archive}/kubectl_complete-modelrollout", f"{archive}/lib"
    }  # fmt: skip
    assert platform["bin"] == "kubectl-modelrollout"
    scripts = project["scripts"]  # what the launchers run, and what kubectl finds
    assert scripts["kubectl-modelrollout"] == "rollout.cli.main:console_kubectl_main"
    assert scripts["kubectl_complete-modelrollout"] == "rollout.cli.main:console_kubectl_complete"
