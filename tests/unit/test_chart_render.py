"""The Helm chart, rendered by the real helm: lint, schema, labels, hardening, RBAC, selectors and the env contract.

The first group needs no helm (the CRD and the values schema as YAML/JSON); everything else runs helm and FAILS
(never skips) when helm is missing — ``scripts/k8s-binaries.sh`` builds it.
"""

from __future__ import annotations

import base64
import inspect
import ipaddress
import json
import re
import sys
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator  # type: ignore[import-untyped]
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from rollout.backends.kube.access import REQUIRED_ACCESS
from rollout.core.policy import (
    CANARY_WEIGHT_MAX,
    CANARY_WEIGHT_MIN,
    dumps_policy,
    load_policy,
    loads_policy,
    policy_from_mapping,
)
from rollout.demo.policy import load_demo_policy
from rollout.router.app import Router
from rollout.router.outcomes.prediction_log import mark_dir_of
from rollout.router.outcomes.settings import DriftSettings, OutcomeSettings
from rollout.settings import PrometheusSettings, RolloutSettings
from service.settings import Settings
from tests.kits.chart import (
    CHART_DIR,
    DEFAULT_POLICY_FILE,
    RULES_FILE,
    STANDARD_LABELS,
    Helm,
    crd_document,
    crd_schema,
    find,
    one,
    openapi_to_draft7,
    pod_specs,
    values_schema,
)

SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    RolloutSettings,
    OutcomeSettings,
    DriftSettings,
    PrometheusSettings,
    Settings,
)
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix')}DSN"
DSN_FILE_ENV = f"{DSN_ENV}_FILE"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
FEEDBACK_TOKEN_ENV = "FW_ROLLOUT_ROUTER__FEEDBACK_TOKEN_FILE"
STICKY_KEY_ENV = "FW_ROLLOUT_ROUTER__STICKY_KEY_FILE"
FIXED_TOKEN = {
    "router": {
        "adminToken": {"value": "test-admin-token"},
        "feedback": {"token": {"value": "test-feedback-token"}},
        "stickyKey": {"value": "test-sticky-key"},
    },
    "onlineStore": {"auth": {"password": "test-online-store-password"}},
}

#: The values matrix every rendered-object test runs over.
MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring": {"monitoring": {"prometheusOperator": True, "labels": {"release": "kube-prometheus"}}},
    "existing-secrets": {
        "predictionLog": {"existingSecret": "pg-dsn", "existingSecretKey": "url"},
        "prometheus": {
            "headers": {"X-Scope-OrgID": "fraud"},
            "auth": {"existingSecret": "mimir-reader", "bearerTokenKey": "token"},
        },
        "router": {
            "adminToken": {"existingSecret": "router-admin", "existingSecretKey": "token"},
            "feedback": {"token": {"existingSecret": "label-feed", "existingSecretKey": "bearer"}},
            "stickyKey": {"existingSecret": "router-sticky", "existingSecretKey": "key"},
        },
        "onlineStore": {"auth": {"existingSecret": "redis-auth", "existingSecretKey": "pw"}},
    },
    "ha-controller": {
        "controller": {
            "replicaCount": 2,
            # the quality stage's frozen regression set, mounted from a volume the operator provides
            "volumes": [
                {"name": "regression", "persistentVolumeClaim": {"claimName": "fraud-regression", "readOnly": True}}
            ],
            "volumeMounts": [
                {"name": "regression", "mountPath": "/var/lib/fraudwatch-data/regression", "readOnly": True}
            ],
            "settings": {"quality_set": "/var/lib/fraudwatch-data/regression/frozen_synthetic.json"},
        }
    },
    "retraining-dashboards-rbac": {
        "retraining": {"enabled": True, "webhook": {"enabled": True}},
        "grafana": {"dashboards": {"enabled": True}},
        "rbac": {"aggregateToDefaultRoles": True},
        "mlflow": {"trackingUri": "http://mlflow.mlops.svc:5000"},
    },
    "rollout-v2": {"model": {"version": "v2", "stable": {"version": "v1"}, "registryAlias": "challenger"}},
    "static-router-no-netpol": {
        "router": {"autoscaling": {"enabled": False}, "replicaCount": 3, "podDisruptionBudget": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "monitoring": {"podAnnotations": False},
    },
}


@pytest.fixture(scope="module")
def rendered(helm: Helm, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each matrix case rendered once."""
    return {case: helm.template(values, workdir) for case, values in MATRIX.items()}


def merged(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge (later wins), like helm's values merge."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------------------ no helm needed


def test_crd_identity_scope_and_subresources() -> None:
    crd = crd_document()
    spec = crd["spec"]
    (version,) = spec["versions"]

    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == "modelrollouts.fraudwatch.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == ("fraudwatch.io", "Namespaced", "ModelRollout")
    assert "mro" in spec["names"]["shortNames"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Stage",
        "Weight",
        "Stable",
        "Candidate",
        "Phase",
        "Age",
    ]


def schema_at(schema: Mapping[str, Any], json_path: str) -> Mapping[str, Any] | None:
    node: Mapping[str, Any] | None = schema
    for part in json_path.strip(".").split("."):
        if node is None:
            return None
        node = node.get("properties", {}).get(part)
    return node


def test_every_printer_column_points_at_a_schema_field_of_its_type() -> None:
    (version,) = crd_document()["spec"]["versions"]
    schema = crd_schema()
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        field = schema_at(schema, column["jsonPath"])
        assert field is not None, f"printer column {column['name']}: {column['jsonPath']} is not in the schema"
        assert field["type"] == column["type"], column


def structural_violations(node: Mapping[str, Any], path: str) -> Iterator[str]:
    """Where the schema breaks Kubernetes' structural rules (every node typed, no type inside *Of)."""
    untyped_ok = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not untyped_ok:
        yield f"{path}: no type"
    for key in ("anyOf", "allOf", "oneOf"):
        for i, branch in enumerate(node.get(key, [])):
            if "type" in branch and not node.get("x-kubernetes-int-or-string"):
                yield f"{path}.{key}[{i}]: type inside {key}"
    for name, child in node.get("properties", {}).items():
        yield from structural_violations(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from structural_violations(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_violations(node["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural() -> None:
    assert list(structural_violations(crd_schema(), "openAPIV3Schema")) == []


def test_crd_status_carries_the_rollout_record() -> None:
    status = crd_schema()["properties"]["status"]["properties"]
    gate = status["gates"]["items"]["properties"]
    condition = status["conditions"]["items"]

    assert {"phase", "stage", "stableWeight", "candidateWeight", "observedGeneration", "routingGeneration"} <= set(
        status
    )
    assert gate["result"]["enum"] == ["Successful", "Failed", "Inconclusive", "Error"]
    assert {"name", "value", "threshold", "measuredAt"} <= set(gate)
    assert set(condition["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert status["routing"]["x-kubernetes-preserve-unknown-fields"] is True
    assert status["state"]["x-kubernetes-preserve-unknown-fields"] is True


def test_values_schema_policy_is_the_crd_policy() -> None:
    crd_policy = crd_schema()["properties"]["spec"]["properties"]["policy"]
    values_policy = values_schema()["properties"]["rollout"]["properties"]["policy"]

    assert values_policy == openapi_to_draft7(crd_policy)


@pytest.mark.parametrize("which", ["default", "demo", "stepped", "args"])
def test_a_dumped_policy_meets_the_values_schema(which: str) -> None:
    """``dumps_policy`` is how a policy reaches the chart's values (the e2e walks, a user's ``rollout.policy``):
    unset optional fields (``template``, ``steps``) must not be written as nulls the schema refuses; a gate's
    template ``args`` are written as the CRD declares them."""
    policy = load_demo_policy(1.0) if which == "demo" else load_policy()
    if which == "stepped":
        policy = policy.model_copy(update={"stages": policy.stages.model_copy(update={"steps": (1, 5, 25, 50)})})
    if which == "args":
        data = yaml.safe_load(dumps_policy(policy))
        query = 'sum(rate({{args.metric}}{model_version="{{version}}"}[{{window}}]))'
        args = [{"name": "metric"}, {"name": "max", "value": 5}]
        template = {"args": args, "layer": "health", "query": query, "condition": "value <= {{args.max}}"}
        data["metric_templates"] = {"rate": template}
        gate = {"name": "errors", "template": "rate", "args": [{"name": "metric", "value": "errors_total"}]}
        data["gates"] = [*data["gates"], {**gate, "stages": ["canary"]}]
        policy = loads_policy(yaml.safe_dump(data))
    values_policy = values_schema()["properties"]["rollout"]["properties"]["policy"]
    dumped = yaml.safe_load(dumps_policy(policy))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in Draft7Validator(values_policy).iter_errors(dumped)]
    assert errors == []
    assert loads_policy(dumps_policy(policy)) == policy


def test_crd_and_values_schema_bound_the_canary_weight_like_the_policy_code() -> None:
    weight = crd_schema()["properties"]["spec"]["properties"]["policy"]["properties"]["stages"]["properties"]["canary"]
    assert (weight["properties"]["weight"]["minimum"], weight["properties"]["weight"]["maximum"]) == (
        CANARY_WEIGHT_MIN,
        CANARY_WEIGHT_MAX,
    )


def test_values_schema_is_draft07_and_closed_at_the_top() -> None:
    schema = values_schema()
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))

    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])


def test_rules_file_link_resolves_to_the_one_rules_file() -> None:
    link = CHART_DIR / "files" / "rules.yml"

    assert link.is_symlink()
    assert link.resolve() == RULES_FILE.resolve()
    assert yaml.safe_load(link.read_text(encoding="utf-8"))["groups"]


# ------------------------------------------------------------------------------------------------ helm


def test_helm_is_version_3(helm: Helm) -> None:
    assert re.fullmatch(r"v3\.\d+\.\d+", helm.version())


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_lint_strict(helm: Helm, workdir: Path, case: str) -> None:
    result = helm.run("lint", "--strict", str(CHART_DIR), *helm.values_args(MATRIX[case], workdir))

    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_carries_the_standard_labels(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    objects = [o for o in rendered[case] if o["kind"] != "CustomResourceDefinition"]
    assert objects
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == "fw"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_object_names_are_unique_dns_labels(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    seen: set[tuple[str, str]] = set()
    for obj in rendered[case]:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        # cluster-scoped objects take DNS subdomain names (dots), and carry the namespace in theirs
        if obj["kind"] not in {"CustomResourceDefinition", "ClusterRole", *ADMISSION_POLICY_KINDS}:
            assert DNS_LABEL.match(obj["metadata"]["name"]), key


ADMISSION_POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


def test_the_retraining_admission_policy_binds_to_its_service_account_and_namespace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The policy matches exactly the retraining ServiceAccount's updates, in the release namespace only (its
    behaviour on a real API server: tests/e2e/test_retrain_handoff.py); none without retraining."""
    assert not [o for o in rendered["defaults"] if o["kind"] in ADMISSION_POLICY_KINDS]
    objects = rendered["retraining-dashboards-rbac"]
    policy, binding = (one(objects, kind) for kind in ADMISSION_POLICY_KINDS)
    account = one(objects, "ServiceAccount", "-retraining")["metadata"]["name"]
    (condition,) = policy["spec"]["matchConditions"]
    namespace = one(objects, "ServiceAccount", "-retraining")["metadata"].get("namespace", "fraud")
    assert condition["expression"] == f'request.userInfo.username == "system:serviceaccount:{namespace}:{account}"'
    assert policy["spec"]["failurePolicy"] == "Fail" and binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": namespace
    }
    # an allowlist: spec and spec.candidate compared over their keys, only these candidate fields may change (the
    # behaviour, with a field the CRD gains later, on a real API server: tests/e2e/test_retrain_handoff.py)
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert yaml.safe_load(variables["candidateKeys"]) == ["version", "modelUri", "registryAlias", "image"]
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "size(variables.changedSpec) == 0" in expressions and "size(variables.changedCandidate) == 0" in expressions
    assert "object.spec." not in expressions  # no field named one by one


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_pod_is_hardened_and_bounded(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    specs = list(pod_specs(rendered[case]))
    assert len(specs) >= 3  # controller, router, model-server template (+ retraining)
    for name, spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        mounts_by_volume = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in containers(spec):
            sc = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts_by_volume, f"{where}: /tmp is not a writable emptyDir"
            if not name.startswith("CronJob/"):
                assert "readinessProbe" in container and "livenessProbe" in container, where


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_pods_scrape_annotations_follow_the_value(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    wanted = MATRIX[case].get("monitoring", {}).get("podAnnotations", True)
    for deployment in find(rendered[case], "Deployment"):
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "online-store":
            # Redis serves no /metrics: the model servers export the store's series (reads, fallbacks, age, lag)
            assert "prometheus.io/scrape" not in annotations
            continue
        assert (annotations.get("prometheus.io/scrape") == "true") is wanted
        if wanted:
            ports = {p["containerPort"] for c in containers(deployment["spec"]["template"]["spec"]) for p in c["ports"]}
            assert int(annotations["prometheus.io/port"]) in ports


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"rollout": {"policy": {"stages": {"canary": {"weight": 7}}}}}, "/rollout/policy/stages/canary/weight"),
        ({"rollout": {"policy": {"stages": {"canary": {"weight": 0}}}}}, "/rollout/policy/stages/canary/weight"),
        ({"rollout": {"policy": {"stages": {"canary": {"weigth": 3}}}}}, "weigth"),
        ({"rollout": {"policy": {"gates": [{"name": "Bad Name", "layer": "health"}]}}}, "/rollout/policy/gates/0"),
        ({"controller": {"replicaCount": 3}}, "/controller/replicaCount"),
        ({"model": {"version": "v 2"}}, "/model/version"),
        ({"model": {"modelUri": "models:/refund-fraud/3", "registryAlias": "challenger"}}, "/model"),
        ({"logLevel": "LOUD"}, "/logLevel"),
        ({"router": {"service": {"type": "ExternalName"}}}, "/router/service/type"),
        ({"routerr": {}}, "routerr"),
        ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "/containerSecurityContext"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext"),
        (
            {"modelServer": {"autoscaling": {"targetCPUUtilizationPercentage": 0}}},
            "/modelServer/autoscaling/targetCPUUtilizationPercentage",
        ),
        ({"modelServer": {"podDisruptionBudget": {"maxUnavailable": "half"}}}, "/modelServer/podDisruptionBudget"),
        ({"rollout": {"policy": {"stages": {"steps": [1, 150]}}}}, "/rollout/policy/stages/steps/1"),
        ({"rollout": {"policy": {"analysis": {"interval": "5 minutes"}}}}, "/rollout/policy/analysis/interval"),
    ],
)
def test_schema_rejects_invalid_values(helm: Helm, workdir: Path, values: dict[str, Any], complaint: str) -> None:
    error = helm.template_error(values, workdir)

    assert "values don't meet the specifications of the schema" in error
    assert complaint in error


def test_two_controllers_need_leader_election(helm: Helm, workdir: Path) -> None:
    error = helm.template_error({"controller": {"replicaCount": 2, "leaderElection": {"enabled": False}}}, workdir)

    assert "leaderElection" in error


def test_chart_refuses_kubernetes_below_its_floor(helm: Helm, workdir: Path) -> None:
    error = helm.template_error({}, workdir, "--kube-version", "1.27.9")

    assert "kubeVersion" in error or ">=1.28" in error


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"router": {"settings": {"port": 9999}}}, "FW_ROLLOUT_ROUTER__PORT"),
        ({"controller": {"settings": {"kube": {"namespace": "x"}}}}, "FW_ROLLOUT_CONTROLLER__KUBE"),
        ({"outcomes": {"settings": {"dsn": "sqlite://"}}}, "FW_ROLLOUT_OUTCOMES__DSN"),
        ({"outcomes": {"settings": {"dsn_file": "/tmp/dsn"}}}, "FW_ROLLOUT_OUTCOMES__DSN_FILE"),
        ({"modelServer": {"settings": {"model_uri": "models:/x/1"}}}, "FW_SERVE__MODEL_URI"),
    ],
)
def test_settings_keys_the_chart_sets_cannot_be_overridden(
    helm: Helm, workdir: Path, values: dict[str, Any], complaint: str
) -> None:
    assert complaint in helm.template_error(values, workdir)


def test_controller_env_is_read_by_the_controller_settings(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "controller": {
            "metricsPort": 9400,
            "settings": {"reconcile_interval_s": 2},
            "leaderElection": {"leaseDurationSeconds": 20, "renewDeadlineSeconds": 12, "retryPeriodSeconds": 3},
        }
    }
    deployment = one(helm.template(values, workdir), "Deployment", "-controller")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    downward = {"metadata.namespace": "fraud", "metadata.name": "fw-fraudwatch-controller-abc12"}
    for name, entry in env_of(container).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        else:  # the downward API, as the kubelet fills it in
            monkeypatch.setenv(name, downward[entry["valueFrom"]["fieldRef"]["fieldPath"]])

    settings = RolloutSettings()
    controller = settings.controller
    assert (controller.backend, controller.name, controller.host) == ("kube", "fw-fraudwatch", "0.0.0.0")
    assert (controller.metrics_port, controller.reconcile_interval_s) == (9400, 2.0)
    assert controller.prometheus_url == "http://prometheus-operated.monitoring.svc:9090"
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert str(settings.home) == data_mount["mountPath"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert ports["metrics"] == controller.metrics_port
    kube = controller.kube
    assert (kube.namespace, kube.identity) == ("fraud", "fw-fraudwatch-controller-abc12")
    assert kube.model_server_configmap == "fw-fraudwatch-model-server"
    assert (kube.leader_election, kube.lease_name) == (True, "fw-fraudwatch-controller")
    assert (kube.lease_duration_s, kube.renew_deadline_s, kube.retry_period_s) == (20.0, 12.0, 3.0)


# ------------------------------------------------------------------------------------------------ the ModelRollout


def rollout_spec(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    spec = one(objects, "ModelRollout")["spec"]
    assert isinstance(spec, Mapping)
    return spec


def test_first_install_is_steady(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = rollout_spec(rendered["defaults"])

    assert spec["stable"] == spec["candidate"]
    assert spec["candidate"]["version"] == "v1"
    assert spec["candidate"]["image"].endswith(":v1")


def test_a_new_model_version_changes_only_the_candidate(helm: Helm, workdir: Path) -> None:
    """`helm upgrade --set model.version=v2` must change the ModelRollout's candidate and nothing else: no router
    or controller restart, the stable stays where it was."""
    base = merged(FIXED_TOKEN, {"model": {"stable": {"version": "v1"}}})
    before = helm.template(base, workdir)
    after = helm.template(merged(base, {"model": {"version": "v2"}}), workdir)

    changed = [(o["kind"], o["metadata"]["name"]) for o, n in zip(before, after, strict=True) if o != n]
    assert changed == [("ModelRollout", "fw-fraudwatch")]
    spec_before, spec_after = rollout_spec(before), rollout_spec(after)
    assert spec_after["stable"] == spec_before["stable"]
    assert spec_before["stable"]["version"] == "v1"
    assert (spec_after["candidate"]["version"], spec_after["candidate"]["image"]) == (
        "v2",
        "fraudwatch/refund-fraud-model:v2",
    )


def test_the_manifest_never_carries_fields_owned_by_others(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Helm's three-way merge leaves alone what its manifests never name: the status (controller) and the
    one-shot command (operators)."""
    for case, objects in rendered.items():
        rollout = one(objects, "ModelRollout")
        assert "status" not in rollout, case
        assert "manualCommand" not in rollout["spec"], case


def test_default_policy_passes_through_the_chart_losslessly(helm: Helm, workdir: Path) -> None:
    policy = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    objects = helm.template({"rollout": {"policy": policy}}, workdir)

    assert policy_from_mapping(rollout_spec(objects)["policy"]) == load_policy()


def test_rollout_can_be_left_to_another_tool(helm: Helm, workdir: Path) -> None:
    objects = helm.template({"rollout": {"create": False}}, workdir)

    assert find(objects, "ModelRollout") == []
    controller = one(objects, "Deployment", "-controller")
    env = env_of(controller["spec"]["template"]["spec"]["containers"][0])
    assert env["FW_ROLLOUT_CONTROLLER__NAME"]["value"] == "fw-fraudwatch"


# ------------------------------------------------------------------------------------------------ secrets


def router_container(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    deployment = one(objects, "Deployment", "-router")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert isinstance(container, Mapping)
    return container


def mounted_secret(objects: list[dict[str, Any]], env: str = "FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE") -> tuple[str, str]:
    spec = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    token_path = Path(env_of(container)[env]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(token_path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    item = next(i for i in volume["secret"]["items"] if i["path"] == token_path.name)
    return volume["secret"]["secretName"], item["key"]


def test_created_secrets_are_referenced(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    secrets = {s["metadata"]["name"]: s for s in find(objects, "Secret")}

    dsn_name, dsn_key = mounted_secret(objects, DSN_FILE_ENV)
    token_name, token_key = mounted_secret(objects)
    feed_name, feed_key = mounted_secret(objects, FEEDBACK_TOKEN_ENV)
    sticky_name, sticky_key = mounted_secret(objects, STICKY_KEY_ENV)
    assert dsn_key in secrets[dsn_name]["data"]
    assert token_key in secrets[token_name]["data"]
    assert feed_key in secrets[feed_name]["data"]
    assert sticky_key in secrets[sticky_name]["data"]
    assert len({dsn_name, token_name, feed_name, sticky_name}) == 4
    store_name, store_key = online_store_secret(objects)
    assert store_key in secrets[store_name]["data"]
    assert len(set(secrets)) == 5


def online_store_secret(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """The (Secret, key) the model-server template and Redis both mount the online store's password from."""
    template, _ = model_server_template(objects)
    redis_spec = one(objects, "Deployment", "-online-store")["spec"]["template"]["spec"]
    sources = set()
    for spec, volume_name in ((template["spec"], "online-store-auth"), (redis_spec, "auth")):
        (volume,) = [v for v in spec["volumes"] if v["name"] == volume_name]
        (item,) = volume["secret"]["items"]
        assert item["path"] == "password"
        sources.add((volume["secret"]["secretName"], item["key"]))
    (source,) = sources
    return source


def test_existing_secrets_are_referenced_not_created(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["existing-secrets"]

    assert find(objects, "Secret") == []
    assert mounted_secret(objects, DSN_FILE_ENV) == ("pg-dsn", "url")
    assert online_store_secret(objects) == ("redis-auth", "pw")
    assert mounted_secret(objects) == ("router-admin", "token")
    assert mounted_secret(objects, FEEDBACK_TOKEN_ENV) == ("label-feed", "bearer")
    assert mounted_secret(objects, STICKY_KEY_ENV) == ("router-sticky", "key")


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_the_dsn_is_a_mounted_secret_file_never_an_env_variable(
    rendered: dict[str, list[dict[str, Any]]], case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DSN carries the database password: the router reads it from the prediction-log Secret mounted as a
    volume (read back through OutcomeSettings here), no variable holds it (``kubectl describe`` would show it)."""
    container = router_container(rendered[case])
    env = env_of(container)
    assert DSN_ENV not in env and not any("secretKeyRef" in e.get("valueFrom", {}) for e in env.values())
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(env[DSN_FILE_ENV]["value"]).parent))
    assert mount.get("readOnly") is True
    # the kubelet's file, here: the settings read whatever the Secret's key holds
    secret = tmp_path / Path(env[DSN_FILE_ENV]["value"]).name
    secret.write_text("postgresql+psycopg://fw:pw@db:5432/fw\n", encoding="utf-8")
    monkeypatch.setenv(DSN_FILE_ENV, str(secret))
    assert OutcomeSettings().database_url() == "postgresql+psycopg://fw:pw@db:5432/fw"


@pytest.mark.parametrize(
    ("suffix", "key", "given_value"),
    [
        ("-router-admin", "admin-token", "test-admin-token"),
        ("-router-feedback", "feedback-token", "test-feedback-token"),
        ("-router-sticky", "sticky-key", "test-sticky-key"),
    ],
)
def test_generated_credentials_are_long_and_given_ones_are_kept(
    helm: Helm, workdir: Path, suffix: str, key: str, given_value: str
) -> None:
    generated = one(helm.template({}, workdir), "Secret", suffix)["data"][key]
    again = one(helm.template({}, workdir), "Secret", suffix)["data"][key]
    given = one(helm.template(FIXED_TOKEN, workdir), "Secret", suffix)["data"][key]

    assert len(base64.b64decode(generated)) >= 32 and generated != again  # no live Secret to keep: fresh each time
    assert base64.b64decode(given).decode() == given_value


SEED = "a-seed-of-at-least-32-characters-for-tests"
WITH_WEBHOOK = {"retraining": {"enabled": True, "webhook": {"enabled": True}}}


def generated_credentials(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Secret name/key → the decoded value of every Secret the chart generates."""
    return {
        f"{s['metadata']['name']}/{key}": base64.b64decode(value).decode()
        for s in find(objects, "Secret")
        if not s["metadata"]["name"].endswith("-prediction-log")
        for key, value in s["data"].items()
    }


def router_checksum(objects: list[dict[str, Any]]) -> str:
    annotations = one(objects, "Deployment", "-router")["spec"]["template"]["metadata"]["annotations"]
    return str(annotations["checksum/secrets"])


def test_a_seed_makes_generated_credentials_identical_on_every_render(helm: Helm, workdir: Path) -> None:
    """GitOps tools render with ``helm template`` (no lookup): without a seed every sync would rotate the tokens.
    With ``secrets.seed`` two renders give byte-identical Secrets and pod checksum annotations; the seed, the
    release and the namespace each change every credential, and no two credentials of a release are equal."""
    values = merged(WITH_WEBHOOK, {"secrets": {"seed": SEED}})
    first, second = helm.template(values, workdir), helm.template(values, workdir)
    credentials = generated_credentials(first)

    assert len(credentials) == 5  # admin, feedback, sticky, retraining webhook, online store
    assert find(first, "Secret") == find(second, "Secret")
    assert router_checksum(first) == router_checksum(second)
    assert len(set(credentials.values())) == 5 and all(len(v) >= 32 for v in credentials.values())
    assert not any(SEED in yaml.safe_dump(obj) for obj in first)
    for other in (
        helm.template(merged(values, {"secrets": {"seed": SEED + "x"}}), workdir),
        helm.template(values, workdir, release="other"),
        helm.template(values, workdir, namespace="elsewhere"),
    ):
        assert set(generated_credentials(other).values()).isdisjoint(credentials.values())
        assert router_checksum(other) != router_checksum(first)
    given = helm.template(merged(values, FIXED_TOKEN), workdir)
    assert generated_credentials(given)["fw-fraudwatch-router-admin/admin-token"] == "test-admin-token"


def test_without_a_seed_a_dry_render_generates_fresh_credentials(helm: Helm, workdir: Path) -> None:
    """No seed: random once and kept by lookup on a cluster (tests/e2e/test_chart.py); a dry render cannot look up,
    so two renders differ (why GitOps users must set secrets.seed or existingSecrets)."""
    first = generated_credentials(helm.template(WITH_WEBHOOK, workdir))
    second = generated_credentials(helm.template(WITH_WEBHOOK, workdir))
    assert first.keys() == second.keys() and all(first[k] != second[k] for k in first)


@pytest.mark.parametrize("seed", ["short", "x" * 31])
def test_a_short_seed_is_refused(helm: Helm, workdir: Path, seed: str) -> None:
    error = helm.template_error({"secrets": {"seed": seed}}, workdir)
    assert "values don't meet the specifications of the schema" in error and "/secrets/seed" in error


def test_the_feedback_port_has_its_own_service_and_the_public_service_does_not_expose_it(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for case, objects in rendered.items():
        container = router_container(objects)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(env_of(container)["FW_ROLLOUT_ROUTER__CONTROL_PORT"]["value"]) == ports["control"], case
        public = one(objects, "Service", "-router")
        assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"], case
        feed = one(objects, "Service", "-router-feedback")
        assert [p["targetPort"] for p in feed["spec"]["ports"]] == ["control"], case


def test_by_default_only_prometheus_may_reach_the_control_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The control port (labels, metrics, admin) admits Prometheus, this release's controller (it reads each
    replica's table) and feedbackIngressFrom only (empty by default: no label source until the operator names one);
    the public port admits clients, not Prometheus."""
    policy = one(rendered["defaults"], "NetworkPolicy", "-router")
    peers: dict[str, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule.get("ports", []):
            peers.setdefault(port["port"], []).extend(rule.get("from", ["anyone"]))
    assert set(peers) == {"http", "control"}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}  # fmt: skip
    controller = one(rendered["defaults"], "Deployment", "-controller")["spec"]["selector"]["matchLabels"]
    assert peers["control"] == [prometheus, {"podSelector": {"matchLabels": controller}}]
    assert peers["http"] == ["anyone"]  # routerIngressFrom empty: the front door


def pod_labels(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """(name, pod labels) of every workload the chart renders, and of the model-server pod template."""
    found = []
    for obj in objects:
        kind, name = obj.get("kind"), f"{obj.get('kind')}/{obj['metadata']['name']}"
        if kind == "Deployment":
            found.append((name, obj["spec"]["template"]["metadata"]["labels"]))
        elif kind == "CronJob":
            found.append((name, obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]))
        elif kind == "ConfigMap" and "pod-template.yaml" in obj.get("data", {}):
            found.append((name, yaml.safe_load(obj["data"]["pod-template.yaml"])["metadata"]["labels"]))
    return found


def selects(policy: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


@pytest.mark.parametrize("case", ["defaults", "retraining-dashboards-rbac"])
def test_every_pod_is_denied_by_default_and_allowed_by_one_policy_of_its_own(
    rendered: dict[str, list[dict[str, Any]]], case: str
) -> None:
    """Issue 11, point 8: a default-deny NetworkPolicy for every pod of the release, and for each pod exactly one
    allow policy, restricting egress too, whose egress rules each name their ports (no open egress)."""
    objects = rendered[case]
    policies = find(objects, "NetworkPolicy")
    deny = one(objects, "NetworkPolicy", "-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    pods = pod_labels(objects)
    assert len(pods) >= 3
    for name, labels in pods:
        assert selects(deny, labels), name
        allows = [p for p in policies if p is not deny and selects(p, labels)]
        assert len(allows) == 1, (name, [p["metadata"]["name"] for p in allows])
        spec = allows[0]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"], name
        assert spec.get("egress") and all(rule.get("ports") for rule in spec["egress"]), name


def api_server_cidrs(objects: list[dict[str, Any]]) -> set[str]:
    policy = one(objects, "NetworkPolicy", "-controller")
    return {
        peer["ipBlock"]["cidr"] for rule in policy["spec"]["egress"] for peer in rule.get("to", []) if "ipBlock" in peer
    }


def test_api_server_egress_is_the_given_cidrs_and_a_dry_render_without_them_fails(
    helm: Helm, workdir: Path, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Issue 11: without a cluster (``helm template``, what GitOps tools run) the `kubernetes` EndpointSlice cannot be
    looked up, and the chart fell back to 0.0.0.0/0 on the API server's ports for every pod. Now such a render fails
    naming the value to set; given CIDRs are used as they are (the lookup on a real API server: tests/e2e/
    test_chart.py); without egress rules nothing is needed."""
    bare = helm.with_base({})
    error = bare.template_error({}, workdir)
    assert "networkPolicy.apiServer.cidrs" in error and "0.0.0.0/0" not in error
    given = {"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1/32", "10.0.0.2/32"]}}}
    assert api_server_cidrs(bare.template(given, workdir)) == {"10.0.0.1/32", "10.0.0.2/32"}
    without_egress = bare.template({"networkPolicy": {"egress": False}}, workdir)
    assert all(
        "egress" not in p["spec"] for p in find(without_egress, "NetworkPolicy") if "deny" not in p["metadata"]["name"]
    )
    for case, objects in rendered.items():
        assert "0.0.0.0/0" not in yaml.safe_dump_all(objects), case


# ------------------------------------------------------------------------------------------------ env contract


def settings_field(root: type[BaseModel], path: list[str]) -> bool:
    """True when ``path`` (lower-case names) leads through nested models of ``root`` to a field."""
    model: Any = root
    for i, name in enumerate(path):
        fields = model.model_fields
        if name not in fields:
            return False
        annotation = fields[name].annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


#: Env prefixes (as the code declares them), longest first, and the settings class that reads them.
SETTINGS_PREFIXES: tuple[tuple[str, type[BaseSettings]], ...] = tuple(
    sorted(
        ((str(cls.model_config.get("env_prefix")), cls) for cls in SETTINGS_CLASSES),
        key=lambda item: len(item[0]),
        reverse=True,
    )
)


def unknown_settings(names: list[str]) -> list[str]:
    unknown = []
    for name in names:
        if not name.startswith("FW_"):
            continue
        prefix, settings = next((p, s) for p, s in SETTINGS_PREFIXES if name.startswith(p))
        if not settings_field(settings, name.removeprefix(prefix).lower().split("__")):
            unknown.append(name)
    return unknown


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_fw_variable_is_a_settings_field(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    names = [e for _, spec in pod_specs(rendered[case]) for c in containers(spec) for e in env_of(c)]
    assert names
    assert unknown_settings(names) == []


def controller_env(helm: Helm, workdir: Path, values: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    deployment = one(helm.template(values, workdir), "Deployment", "-controller")
    return env_of(deployment["spec"]["template"]["spec"]["containers"][0])


def test_a_model_registry_reaches_the_controller_too(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = controller_env(helm, workdir, {"mlflow": {"trackingUri": "http://mlflow:5000"}})
    for name in ("FW_MLFLOW_TRACKING_URI", "FW_ROLLOUT_CONTROLLER__KUBE__USE_REGISTRY"):
        monkeypatch.setenv(name, env[name]["value"])

    assert RolloutSettings().controller.kube.use_registry is True
    assert "FW_ROLLOUT_CONTROLLER__KUBE__USE_REGISTRY" not in controller_env(helm, workdir, {})


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_the_metrics_provider_reads_its_headers_and_a_mounted_secret(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch, auth: str
) -> None:
    """prometheus.headers and prometheus.auth reach the controller's provider settings; the credential is a file of
    the operator's Secret (one key, read-only), never a value in the manifest."""
    key = {"bearer": {"bearerTokenKey": "token"}, "basic": {"basicAuthUsername": "fw", "basicAuthPasswordKey": "pw"}}
    values = {
        "prometheus": {
            "url": "https://mimir.example/prometheus",
            "headers": {"X-Scope-OrgID": "fraud"},
            "readyPath": "/api/v1/status/buildinfo",
            "auth": {"existingSecret": "mimir-reader", **key[auth]},
        }
    }
    deployment = one(helm.template(values, workdir), "Deployment", "-controller")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for name, entry in env_of(container).items():
        monkeypatch.setenv(name, entry.get("value", "x"))
    provider = RolloutSettings().controller.provider
    assert provider.headers == {"X-Scope-OrgID": "fraud"}
    assert provider.ready_path == "/api/v1/status/buildinfo"
    volume = next(v for v in pod["volumes"] if v["name"] == "metrics-provider-auth")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "metrics-provider-auth")
    assert volume["secret"]["secretName"] == "mimir-reader" and mount["readOnly"] is True
    [item] = volume["secret"]["items"]
    credential_file = provider.bearer_token_file if auth == "bearer" else provider.basic_auth_password_file
    assert credential_file == Path(mount["mountPath"]) / item["path"]
    assert item["key"] == ("token" if auth == "bearer" else "pw")
    assert provider.basic_auth_username == (None if auth == "bearer" else "fw")


@pytest.mark.parametrize("session", [True, False])
def test_sigv4_reads_the_aws_key_from_a_mounted_secret(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch, session: bool
) -> None:
    """prometheus.auth.sigv4 (Amazon Managed Prometheus) reaches the controller's provider settings; the key's parts
    are files of the operator's Secret, never values."""
    sigv4 = {"region": "eu-west-1", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}
    if session:
        sigv4["sessionTokenKey"] = "token"
    values = {
        "prometheus": {
            "url": "https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/ws-1234",
            "readyPath": "/api/v1/labels",
            "auth": {"existingSecret": "amp-reader", "sigv4": sigv4},
        }
    }
    pod = one(helm.template(values, workdir), "Deployment", "-controller")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for name, entry in env_of(container).items():
        monkeypatch.setenv(name, entry.get("value", "x"))
    provider = RolloutSettings().controller.provider
    assert provider.sigv4 is not None and (provider.sigv4.region, provider.sigv4.service) == ("eu-west-1", "aps")
    assert (provider.bearer_token_file, provider.basic_auth_username) == (None, None)
    volume = next(v for v in pod["volumes"] if v["name"] == "metrics-provider-auth")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "metrics-provider-auth")
    assert volume["secret"]["secretName"] == "amp-reader" and mount["readOnly"] is True
    files = {item["key"]: Path(mount["mountPath"]) / item["path"] for item in volume["secret"]["items"]}
    s = provider.sigv4
    assert files == {"id": s.access_key_id_file, "key": s.secret_access_key_file} | (
        {"token": s.session_token_file} if session else {}
    )
    assert s.session_token_file is None or session


def test_sigv4_without_a_secret_reads_the_aws_variables(helm: Helm, workdir: Path) -> None:
    env = controller_env(helm, workdir, {"prometheus": {"auth": {"sigv4": {"region": "us-east-1"}}}})
    assert [name for name in env if "PROVIDER__" in name and not name.endswith("READY_PATH")] == [
        "FW_ROLLOUT_CONTROLLER__PROVIDER__SIGV4__REGION",
        "FW_ROLLOUT_CONTROLLER__PROVIDER__SIGV4__SERVICE",
    ]
    pod = one(helm.template({"prometheus": {"auth": {"sigv4": {"region": "us-east-1"}}}}, workdir), "Deployment",
              "-controller")["spec"]["template"]["spec"]  # fmt: skip
    assert "metrics-provider-auth" not in {v["name"] for v in pod["volumes"]}


def test_an_external_metrics_store_is_reached_through_controller_egress(helm: Helm, workdir: Path) -> None:
    """Amazon Managed Prometheus is outside the cluster: the controller's NetworkPolicy admits it only with
    controller.egress (by default only the in-cluster Prometheus)."""
    rule = {"ports": [{"port": 443, "protocol": "TCP"}]}
    default = one(helm.template({}, workdir), "NetworkPolicy", "-controller")["spec"]["egress"]
    assert rule not in default
    egress = one(helm.template({"controller": {"egress": [rule]}}, workdir), "NetworkPolicy", "-controller")
    assert egress["spec"]["egress"] == [*default, rule]


def test_no_provider_credentials_by_default(helm: Helm, workdir: Path) -> None:
    env = controller_env(helm, workdir, {})
    assert not [name for name in env if "PROVIDER__" in name and not name.endswith("READY_PATH")]
    pod = one(helm.template({}, workdir), "Deployment", "-controller")["spec"]["template"]["spec"]
    assert "metrics-provider-auth" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize(
    ("auth", "complaint"),
    [
        ({"bearerTokenKey": "token"}, "need prometheus.auth.existingSecret"),
        ({"existingSecret": "s"}, "set bearerTokenKey, or basicAuthUsername and basicAuthPasswordKey"),
        ({"existingSecret": "s", "bearerTokenKey": "t", "basicAuthPasswordKey": "p"}, "not both"),
        ({"existingSecret": "s", "bearerTokenKey": "t", "sigv4": {"region": "eu-west-1"}}, "exclusive"),
        ({"existingSecret": "s", "sigv4": {"region": "eu-west-1", "accessKeyIdKey": "id"}}, "and secretAccessKeyKey"),
        ({"sigv4": {"region": "eu-west-1", "accessKeyIdKey": "i"}}, "need prometheus.auth.existingSecret"),
        ({"existingSecret": "s", "sigv4": {"accessKeyIdKey": "i"}}, "need prometheus.auth.sigv4.region"),
    ],
)
def test_provider_credentials_the_wrong_way_are_refused(
    helm: Helm, workdir: Path, auth: dict[str, str], complaint: str
) -> None:
    assert complaint in helm.template_error({"prometheus": {"auth": auth}}, workdir)


def test_router_env_is_read_by_the_router_settings(helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "router": {"port": 8181, "settings": {"candidate_timeout_s": 0.3, "latency_buckets_s": [0.001, 0.01, 0.1]}},
        "outcomes": {"settings": {"flush_interval_ms": 50}},
    }
    container = router_container(helm.template(values, workdir))
    for name, entry in env_of(container).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            monkeypatch.setenv(name, "fraud")

    router = RolloutSettings().router
    assert (router.host, router.port, router.candidate_timeout_s) == ("0.0.0.0", 8181, 0.3)
    assert router.latency_buckets_s == (0.001, 0.01, 0.1)
    assert (router.kube.rollout_name, router.kube.namespace) == ("fw-fraudwatch", "fraud")
    assert router.admin_token_file is not None and router.admin_token_file.is_absolute()
    assert router.graceful_shutdown_s < one_deployment_grace(helm, workdir, values)
    assert OutcomeSettings().flush_interval_ms == 50


def test_label_sources_each_get_their_token_from_a_mounted_secret(
    helm: Helm, workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """router.feedback.sourcesSecret (source name → token) is mounted as a directory and the single token keeps
    working under router.feedback.token.source; read back through RouterSettings from files laid out as the
    kubelet would."""
    values = {"router": {"feedback": {"token": {"source": "bank-feed"}, "sourcesSecret": "label-sources"}}}
    objects = helm.template(values, workdir)
    spec = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    directory = env["FW_ROLLOUT_ROUTER__FEEDBACK_TOKENS_DIR"]["value"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == directory)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": "label-sources", "defaultMode": 0o440} and mount["readOnly"] is True
    assert "FW_ROLLOUT_ROUTER__FEEDBACK_TOKENS_DIR" not in env_of(router_container(helm.template({}, workdir)))
    local = tmp_path / "feedback-sources"
    local.mkdir()
    (local / "chargeback").write_text("t-cb", encoding="utf-8")
    monkeypatch.setenv("FW_ROLLOUT_ROUTER__FEEDBACK_SOURCE", env["FW_ROLLOUT_ROUTER__FEEDBACK_SOURCE"]["value"])
    monkeypatch.setenv("FW_ROLLOUT_ROUTER__FEEDBACK_TOKEN", "t-single")
    monkeypatch.setenv("FW_ROLLOUT_ROUTER__FEEDBACK_TOKENS_DIR", str(local))
    assert RolloutSettings().router.feedback_credentials() == {"bank-feed": "t-single", "chargeback": "t-cb"}
    refused = {"router": {"feedback": {"token": {"source": "bad name"}}}}
    assert "/router/feedback/token/source" in helm.template_error(refused, workdir)


def test_the_charts_router_answers_with_the_scoring_contract_only(helm: Helm, workdir: Path) -> None:
    default = env_of(router_container(helm.template({}, workdir)))
    assert default["FW_ROLLOUT_ROUTER__EXPOSE_DECISION_DETAILS"]["value"] == "false"
    debugging = env_of(router_container(helm.template({"router": {"exposeDecisionDetails": True}}, workdir)))
    assert debugging["FW_ROLLOUT_ROUTER__EXPOSE_DECISION_DETAILS"]["value"] == "true"


@pytest.mark.parametrize("grace", [30, 10, 120])
def test_the_routers_whole_shutdown_fits_in_its_grace_period(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch, grace: int
) -> None:
    """Issue 12, point 5: in-flight requests (25 s), the shadow drain (2 s) and the prediction log's close (30 s)
    added up to 57 s in a 30 s grace period, so a slow close was SIGKILLed and its "lost" rows never counted."""
    values = {"router": {"terminationGracePeriodSeconds": grace}}
    for name, entry in env_of(router_container(helm.template(values, workdir))).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    router, outcomes = RolloutSettings().router, OutcomeSettings()
    whole = router.graceful_shutdown_s + router.shadow_drain_timeout_s + outcomes.close_timeout_s
    assert whole < one_deployment_grace(helm, workdir, values) == grace
    assert min(router.graceful_shutdown_s, outcomes.close_timeout_s) >= 1


def test_the_router_keeps_its_prediction_log_marks_on_the_pods_data_volume(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12, point 5: what a SIGKILLed router never wrote is counted by the container started after it — its
    marks must live on a volume that outlives the container (the pod's data emptyDir), not on the read-only root."""
    container = router_container(helm.template({}, workdir))
    marks = env_of(container)["FW_ROLLOUT_OUTCOMES__MARK_DIR"]["value"]
    monkeypatch.setenv("FW_ROLLOUT_OUTCOMES__MARK_DIR", marks)
    monkeypatch.setenv(DSN_ENV, "postgresql+psycopg://fw@db/fw")
    assert mark_dir_of(OutcomeSettings()) == Path(marks)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(marks).is_relative_to(mounts["data"])
    volumes = {
        v["name"]: v
        for v in one(helm.template({}, workdir), "Deployment", "-router")["spec"]["template"]["spec"]["volumes"]
    }
    assert "emptyDir" in volumes["data"]


def one_deployment_grace(helm: Helm, workdir: Path, values: Mapping[str, Any]) -> int:
    deployment = one(helm.template(values, workdir), "Deployment", "-router")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert isinstance(grace, int)
    return grace


def test_router_probes_and_metrics_use_the_routes_the_router_serves(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = router_container(rendered["defaults"])
    paths = {container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]}
    source = inspect.getsource(sys.modules[Router.__module__])
    annotations = one(rendered["defaults"], "Deployment", "-router")["spec"]["template"]["metadata"]["annotations"]
    for path in {*paths, annotations["prometheus.io/path"]}:
        assert f'Route("{path}"' in source, path


# ------------------------------------------------------------------------------------------------ workloads


def test_controller_replicas_lease_and_spread(rendered: dict[str, list[dict[str, Any]]]) -> None:
    single = one(rendered["defaults"], "Deployment", "-controller")
    pair = one(rendered["ha-controller"], "Deployment", "-controller")
    env = env_of(pair["spec"]["template"]["spec"]["containers"][0])

    assert (single["spec"]["replicas"], pair["spec"]["replicas"]) == (1, 2)
    assert env["FW_ROLLOUT_CONTROLLER__KUBE__LEADER_ELECTION"]["value"] == "true"
    assert env["FW_ROLLOUT_CONTROLLER__KUBE__LEASE_NAME"]["value"] == "fw-fraudwatch-controller"
    assert env["FW_ROLLOUT_CONTROLLER__KUBE__IDENTITY"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FW_ROLLOUT_CONTROLLER__KUBE__NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "podAntiAffinity" in pair["spec"]["template"]["spec"]["affinity"]


def test_the_regression_set_can_be_mounted_into_the_controller(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = one(rendered["ha-controller"], "Deployment", "-controller")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "data", "admin-token", "regression"}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "regression")
    quality_set = env_of(container)["FW_ROLLOUT_CONTROLLER__QUALITY_SET"]["value"]
    assert quality_set.startswith(mount["mountPath"] + "/")
    default = one(rendered["defaults"], "Deployment", "-controller")["spec"]["template"]["spec"]
    assert {v["name"] for v in default["volumes"]} == {"tmp", "data", "admin-token"}


def test_router_has_service_hpa_and_pdb_on_its_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    deployment = one(objects, "Deployment", "-router")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", "-router")
    hpa = one(objects, "HorizontalPodAutoscaler", "-router")
    pdb = one(objects, "PodDisruptionBudget", "-router")

    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert service["spec"]["type"] == "ClusterIP"
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fw-fraudwatch-router",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_static_router_has_replicas_and_no_hpa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["static-router-no-netpol"]

    assert one(objects, "Deployment", "-router")["spec"]["replicas"] == 3
    assert find(objects, "HorizontalPodAutoscaler") == []
    assert find(objects, "PodDisruptionBudget") == []
    assert find(objects, "NetworkPolicy") == []


def model_server_template(objects: list[dict[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    configmap = one(objects, "ConfigMap", "-model-server")
    return yaml.safe_load(configmap["data"]["pod-template.yaml"]), configmap["data"]


def test_model_server_template_is_the_bentoml_contract(rendered: dict[str, list[dict[str, Any]]]) -> None:
    template, data = model_server_template(rendered["defaults"])
    spec = template["spec"]
    (container,) = spec["containers"]

    assert container["name"] == data["container-name"]
    assert container["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsUser"] == 1034  # bentoml containerize's user
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] != "Helm"
    service = yaml.safe_load(data["service-template.yaml"])
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_retraining_cronjob_is_weekly_and_off_by_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert find(rendered["defaults"], "CronJob") == []
    cronjob = one(rendered["retraining-dashboards-rbac"], "CronJob")
    spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])

    assert cronjob["spec"]["schedule"] == "0 3 * * 0"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert spec["restartPolicy"] == "Never"
    assert env["FW_MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlops.svc:5000"


def test_dashboards_render_nothing_without_dashboard_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    dashboards = list((CHART_DIR / "files" / "dashboards").glob("*.json"))
    labelled = [
        c
        for c in find(rendered["retraining-dashboards-rbac"], "ConfigMap")
        if "grafana_dashboard" in c["metadata"]["labels"]
    ]

    assert len(labelled) == len(dashboards)
    for configmap in labelled:
        for text in configmap["data"].values():
            json.loads(text)


# ------------------------------------------------------------------------------------------------ RBAC


def rules_of(objects: list[dict[str, Any]], name_suffix: str) -> set[tuple[str, str, str]]:
    role = one(objects, "Role", name_suffix)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def named_rules_of(objects: list[dict[str, Any]], name_suffix: str) -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource, verb, resourceName or None) of every grant of the Role, one row per name."""
    role = one(objects, "Role", name_suffix)
    return {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in (rule.get("resourceNames") or [None])
    }


def test_controller_role_grants_exactly_the_backends_requests_on_named_objects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Issue 11: the Role is REQUIRED_ACCESS, verb for verb, and every request that names an object (the release's
    ModelRollout, its status and finalizers, the templates ConfigMap, the Lease) is limited to that name."""
    objects = rendered["defaults"]
    names = {
        "rollout": one(objects, "ModelRollout")["metadata"]["name"],
        "configmap": one(objects, "ConfigMap", "-model-server")["metadata"]["name"],
        "lease": env_of(one(objects, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0])[
            "FW_ROLLOUT_CONTROLLER__KUBE__LEASE_NAME"
        ]["value"],
    }
    required = set()
    for access in REQUIRED_ACCESS:
        group, _, resource = access.resource.partition(":")
        required.add((group, resource, access.verb, names[access.name] if access.name else None))

    assert named_rules_of(objects, "-controller") == required
    granted = rules_of(objects, "-controller")
    assert not [r for r in granted if r[1] in {"secrets", "*"} or r[2] == "*"]
    assert {r[2] for r in granted if r[1] == "pods"} == {"list", "watch"}  # pods: read only, never create/exec
    assert {r[2] for r in granted if r[1] == "modelrollouts"} == {"get", "watch", "patch"}  # no list, no update


def test_the_controller_can_read_each_router_replica_s_table(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Issue 12, point 3 on Kubernetes: the controller finds the router replicas through the control Service's
    EndpointSlices and asks each for its table on the control port with the admin token — the Service and port it
    names exist, the token file is mounted, and its NetworkPolicy lets it reach that port."""
    objects = rendered["defaults"]
    controller = one(objects, "Deployment", "-controller")["spec"]["template"]["spec"]
    env = env_of(controller["containers"][0])
    service = one(objects, "Service", env["FW_ROLLOUT_CONTROLLER__KUBE__ROUTER_SERVICE"]["value"])
    port_name = env["FW_ROLLOUT_CONTROLLER__KUBE__ROUTER_PORT_NAME"]["value"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == port_name]
    router = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    control = next(p for p in router["ports"] if p["name"] == port["targetPort"])
    token = env["FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE"]["value"]
    mounts = {m["name"]: m["mountPath"] for m in controller["containers"][0]["volumeMounts"]}
    assert token.startswith(mounts["admin-token"] + "/")
    assert token == env_of(router)["FW_ROLLOUT_ROUTER__ADMIN_TOKEN_FILE"]["value"]
    egress = one(objects, "NetworkPolicy", "-controller")["spec"].get("egress")
    if egress is not None:  # egress enforced: the routers' control port must be allowed
        router_labels = one(objects, "Deployment", "-router")["spec"]["selector"]["matchLabels"]
        assert any(
            {"podSelector": {"matchLabels": router_labels}} in rule.get("to", [])
            and {"port": control["containerPort"], "protocol": "TCP"} in rule.get("ports", [])
            for rule in egress
        )


def test_router_role_only_reads_modelrollouts(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert rules_of(rendered["defaults"], "-router") == {
        ("fraudwatch.io", "modelrollouts", v) for v in ("get", "list", "watch")
    }
    rollout = one(rendered["defaults"], "ModelRollout")["metadata"]["name"]
    for rule in one(rendered["defaults"], "Role", "-router")["rules"]:
        assert rule.get("resourceNames") == [rollout], rule  # that one object, not every ModelRollout


def test_nothing_cluster_wide_by_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "PriorityClass", "ValidatingWebhookConfiguration"}
    for case, objects in rendered.items():
        kinds = {o["kind"] for o in objects} & cluster_scoped
        assert kinds == ({"ClusterRole"} if MATRIX[case].get("rbac", {}).get("aggregateToDefaultRoles") else set())


def test_bindings_bind_the_pods_service_accounts(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    for suffix in ("-controller", "-router"):
        binding = one(objects, "RoleBinding", suffix)
        pod = one(objects, "Deployment", suffix)["spec"]["template"]["spec"]
        assert binding["roleRef"]["name"] == one(objects, "Role", suffix)["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "fraud"}
        ]
        assert pod["automountServiceAccountToken"] is True


# ------------------------------------------------------------------------------------------------ network


def ingress_peers(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [peer for rule in policy["spec"].get("ingress", []) for peer in rule.get("from", [])]


def test_only_routers_and_prometheus_reach_model_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    policy = one(objects, "NetworkPolicy", "-model-server")
    template, _ = model_server_template(objects)
    router_labels = one(objects, "Deployment", "-router")["spec"]["template"]["metadata"]["labels"]
    controller_labels = one(objects, "Deployment", "-controller")["spec"]["template"]["metadata"]["labels"]

    assert labels_match(policy["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"])
    peers = ingress_peers(policy)
    pod_only = [p for p in peers if "namespaceSelector" not in p]
    assert len(pod_only) == 1
    assert labels_match(pod_only[0]["podSelector"]["matchLabels"], router_labels)
    assert not labels_match(pod_only[0]["podSelector"]["matchLabels"], controller_labels)
    assert [p for p in peers if "namespaceSelector" in p] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]


def egress_ports(policy: Mapping[str, Any]) -> set[int]:
    return {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", []) if isinstance(p["port"], int)}


def test_controller_and_router_egress_reach_the_api_server(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    controller = one(objects, "NetworkPolicy", "-controller")
    router = one(objects, "NetworkPolicy", "-router")

    for policy in (controller, router):
        assert "Egress" in policy["spec"]["policyTypes"]
        assert {443, 6443, 53} <= egress_ports(policy)
        cidrs = [p["ipBlock"]["cidr"] for r in policy["spec"]["egress"] for p in r.get("to", []) if "ipBlock" in p]
        assert all(ipaddress.ip_network(c) for c in cidrs)
    assert 9090 in egress_ports(controller)  # Prometheus' API
    assert {3000, 5432} <= egress_ports(router)  # model servers and the prediction log
    assert [p for p in ingress_peers(controller) if "namespaceSelector" not in p] == []


# ------------------------------------------------------------------------------------------------ monitoring

OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}


def test_operator_objects_only_when_the_api_is_served_or_forced(helm: Helm, workdir: Path) -> None:
    api = ("--api-versions", "monitoring.coreos.com/v1")

    def kinds(objects: list[dict[str, Any]]) -> set[str]:
        return {o["kind"] for o in objects} & OPERATOR_KINDS

    assert kinds(helm.template({}, workdir)) == set()
    assert kinds(helm.template({}, workdir, *api)) == OPERATOR_KINDS
    assert kinds(helm.template({"monitoring": {"prometheusOperator": False}}, workdir, *api)) == set()
    assert kinds(helm.template({"monitoring": {"prometheusOperator": True}}, workdir)) == OPERATOR_KINDS
    no_rules = helm.template({"monitoring": {"prometheusOperator": True, "rules": {"enabled": False}}}, workdir)
    assert kinds(no_rules) == OPERATOR_KINDS - {"PrometheusRule"}


def test_prometheus_rule_carries_the_one_rules_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = one(rendered["monitoring"], "PrometheusRule")
    expected = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]

    assert rule["spec"]["groups"] == expected
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"


def test_monitors_select_the_pods_that_serve_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["monitoring"]
    template, _ = model_server_template(objects)
    router_pod = one(objects, "Deployment", "-router")["spec"]["template"]
    controller_pod = one(objects, "Deployment", "-controller")["spec"]["template"]
    # the routers' metrics are scraped on their control port: the public Service does not expose /metrics
    assert one(objects, "PodMonitor", "-router")["spec"]["podMetricsEndpoints"][0]["port"] == "control"
    assert [p["targetPort"] for p in one(objects, "Service", "-router")["spec"]["ports"]] == ["http"]
    for suffix, pod in (("-router", router_pod), ("-controller", controller_pod), ("-model-server", template)):
        podmonitor = one(objects, "PodMonitor", suffix)
        assert labels_match(podmonitor["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert podmonitor["spec"]["podMetricsEndpoints"][0]["port"] in port_names


def test_packaged_chart_is_self_contained(helm: Helm, tmp_path: Path) -> None:
    """`helm package` follows the rules symlink: the archive carries the rules' content, the CRD and the schema."""
    helm.run("package", str(CHART_DIR), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("fraudwatch-*.tgz")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        rules = tar.extractfile(members["fraudwatch/files/rules.yml"])
        assert rules is not None
        assert rules.read() == RULES_FILE.read_bytes()
        assert members["fraudwatch/files/rules.yml"].isfile()
        assert {"fraudwatch/crds/modelrollouts.fraudwatch.io.yaml", "fraudwatch/values.schema.json"} <= set(members)
