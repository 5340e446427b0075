"""Helpers of the Helm chart tests (unit: ``helm lint``/``helm template``; e2e: the chart on a real control plane).

helm comes from the binaries ``scripts/k8s-binaries.sh`` builds (cached by version outside the repository), else
from ``FW_HELM`` or ``PATH``. A missing helm is a failure with the command to run, never a skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "fraudwatch"
CRD_FILE = CHART_DIR / "crds" / "modelrollouts.fraudwatch.io.yaml"
VALUES_SCHEMA_FILE = CHART_DIR / "values.schema.json"
RULES_FILE = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
DEFAULT_POLICY_FILE = REPO_ROOT / "rollout" / "core" / "default_policy.yaml"

#: The labels every object the chart renders carries (Helm's best practices).
STANDARD_LABELS: tuple[str, ...] = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
HELM_SERIES_PATTERN = re.compile(r"^helm-v3\.(\d+)\.(\d+)$")
HELM_HINT = (
    "helm is not available: build it with `scripts/k8s-binaries.sh` (scripts/bootstrap.sh runs it; helm is built "
    "first, in a few minutes), or point FW_HELM at a helm v3 binary"
)
HELM_TIMEOUT_S = 120.0


class HelmNotFoundError(RuntimeError):
    """No helm binary could be found."""


def _cache_root() -> Path:
    explicit = os.environ.get("FW_K8S_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fraudwatch" / "k8s"


def _cached_helms(root: Path) -> list[tuple[tuple[int, int], Path]]:
    found: list[tuple[tuple[int, int], Path]] = []
    if not root.is_dir():
        return found
    for directory in root.iterdir():
        match = HELM_SERIES_PATTERN.match(directory.name)
        binary = directory / "helm"
        if match and (directory / ".complete").exists() and os.access(binary, os.X_OK):
            found.append(((int(match.group(1)), int(match.group(2))), binary))
    return sorted(found)


def locate_helm() -> Path:
    """``FW_HELM``, else the newest cached build of ``scripts/k8s-binaries.sh``, else ``helm`` on PATH."""
    explicit = os.environ.get("FW_HELM")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise HelmNotFoundError(f"FW_HELM={explicit} is not an executable")
        return Path(explicit)
    cached = _cached_helms(_cache_root())
    if cached:
        return cached[-1][1]
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    raise HelmNotFoundError(HELM_HINT)


#: A dry render has no cluster to look the API server's addresses up in, and the chart refuses to guess them
#: (networkPolicy.apiServer.cidrs; a GitOps pipeline must set them too): the tests' renders name a documentation
#: address (TEST-NET-1).
DRY_RENDER_VALUES: Final[Mapping[str, Any]] = {"networkPolicy": {"apiServer": {"cidrs": ["192.0.2.1/32"]}}}


@dataclass(frozen=True)
class Helm:
    """A helm binary run with a private HOME (no user repositories, plugins or kube contexts); ``base`` values are
    given before each call's own (``-f base -f values``: helm merges them, the call's win)."""

    binary: Path
    env: Mapping[str, str]
    base: Mapping[str, Any] = field(default_factory=dict)

    def with_base(self, base: Mapping[str, Any]) -> Helm:
        return dataclasses.replace(self, base=base)

    def values_args(self, values: Mapping[str, Any], workdir: Path) -> list[str]:
        """``-f`` arguments: the base values (when any), then ``values``."""
        files = [values_file(self.base, workdir)] if self.base else []
        return [arg for path in (*files, values_file(values, workdir)) for arg in ("-f", str(path))]

    @classmethod
    def isolated(cls, binary: Path, home: Path, extra_env: Mapping[str, str] | None = None) -> Helm:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            # No cluster unless the caller passes one: `helm template` must not reach out.
            "KUBECONFIG": str(home / "no-kubeconfig"),
            **(extra_env or {}),
        }
        return cls(binary=binary, env=env)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=dict(self.env), timeout=HELM_TIMEOUT_S
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def version(self) -> str:
        return self.run("version", "--template", "{{.Version}}").stdout.strip()

    def template(
        self, values: Mapping[str, Any], workdir: Path, *args: str, release: str = "fw", namespace: str = "fraud"
    ) -> list[dict[str, Any]]:
        """The objects ``helm template`` renders for ``values`` (the CRD included)."""
        rendered = self.run(
            "template",
            release,
            str(CHART_DIR),
            "--namespace",
            namespace,
            "--include-crds",
            *self.values_args(values, workdir),
            *args,
        )
        return parse_manifests(rendered.stdout)

    def template_error(self, values: Mapping[str, Any], workdir: Path, *args: str) -> str:
        """helm's error output for values it must refuse (fails when helm renders them)."""
        result = self.run("template", "fw", str(CHART_DIR), *self.values_args(values, workdir), *args, check=False)
        assert result.returncode != 0, f"helm rendered values it should refuse: {dict(values)}"
        return result.stderr


def values_file(values: Mapping[str, Any], directory: Path) -> Path:
    """``values`` written as a YAML file in ``directory`` (helm's ``-f``)."""
    handle, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=directory)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        yaml.safe_dump(dict(values), stream, sort_keys=False)
    return Path(name)


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def find(objects: Iterable[Mapping[str, Any]], kind: str, name_suffix: str = "") -> list[Mapping[str, Any]]:
    """The objects of ``kind`` whose name ends with ``name_suffix``."""
    return [o for o in objects if o.get("kind") == kind and str(o["metadata"]["name"]).endswith(name_suffix)]


def one(objects: Iterable[Mapping[str, Any]], kind: str, name_suffix: str = "") -> Mapping[str, Any]:
    matches = find(objects, kind, name_suffix)
    assert len(matches) == 1, (
        f"expected one {kind} named *{name_suffix}, got {[m['metadata']['name'] for m in matches]}"
    )
    return matches[0]


def pod_specs(objects: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(description, pod spec) of every workload the chart renders, and of the model-server template."""
    for obj in objects:
        kind = obj.get("kind")
        name = f"{kind}/{obj['metadata']['name']}"
        if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield name, obj["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "ConfigMap" and "pod-template.yaml" in obj.get("data", {}):
            yield f"{name}[pod-template.yaml]", yaml.safe_load(obj["data"]["pod-template.yaml"])["spec"]


def crd_document() -> dict[str, Any]:
    loaded = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the (only) version of the ModelRollout CRD."""
    (version,) = crd_document()["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def values_schema() -> dict[str, Any]:
    loaded = json.loads(VALUES_SCHEMA_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def openapi_to_draft7(node: Any) -> Any:
    """A Kubernetes structural (OpenAPI v3) schema as JSON Schema draft-07, as strict as the API server's pruning.

    ``x-kubernetes-*`` and ``nullable`` are dropped (``nullable`` becomes a ``null`` type), boolean exclusive
    bounds become draft-07's numeric ones, int32/int64 formats are dropped and an object with ``properties``
    gets ``additionalProperties: false`` unless it preserves unknown fields.
    """
    if isinstance(node, list):
        return [openapi_to_draft7(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in {"nullable", "exclusiveMinimum", "exclusiveMaximum"}:
            continue
        if key == "format" and value in {"int32", "int64"}:
            continue
        if key == "properties":
            out[key] = {k: openapi_to_draft7(v) for k, v in value.items()}
        else:
            out[key] = openapi_to_draft7(value)
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = bool(node.get("x-kubernetes-preserve-unknown-fields", False))
    return out
