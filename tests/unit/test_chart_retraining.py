"""The chart's retraining (templates/retraining-*.yaml), rendered by the real helm: the weekly CronJob runs the
scheduled retrain, the webhook receiver is one hardened replica behind a Service Alertmanager's example reaches,
the environment is what service/settings.py reads, and the hand-off may patch exactly one ModelRollout.

The generic checks (labels, hardening, probes, DNS names, every FW_* name a settings field) run over these objects
too: tests/unit/test_chart_render.py's matrix enables both. On a real API server: tests/e2e/test_chart.py (dry-run)
and tests/e2e/test_retrain_handoff.py (the Role, used by the hand-off itself).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from service.cli.main import ExitCode
from service.settings import Settings
from tests.chartkit import Helm, find, one
from tests.unit.test_chart_render import helm, workdir

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
__all__ = ["helm", "workdir"]  # fixtures of tests/unit/test_chart_render.py used here
ENABLED = {"retraining": {"enabled": True, "webhook": {"enabled": True}}}
VOLUMES = {
    "volumes": [{"name": "refunds", "persistentVolumeClaim": {"claimName": "refund-stream"}}],
    "volumeMounts": [{"name": "refunds", "mountPath": "/var/lib/fraudwatch-data", "readOnly": True}],
}


@pytest.fixture(scope="module")
def enabled(helm: Helm, workdir: Path) -> list[dict[str, Any]]:
    values = {"retraining": {**ENABLED["retraining"], **VOLUMES}, "mlflow": {"trackingUri": "http://mlflow:5000"}}
    return helm.template(values, workdir)


def container(objects: list[dict[str, Any]], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    obj = one(objects, kind, "retraining-webhook" if kind == "Deployment" else "retraining")
    spec = (
        obj["spec"]["jobTemplate"]["spec"]["template"]["spec"] if kind == "CronJob" else obj["spec"]["template"]["spec"]
    )
    (main,) = spec["containers"]
    return spec, main


def test_nothing_of_retraining_renders_by_default(helm: Helm, workdir: Path) -> None:
    objects = helm.template({}, workdir)
    assert [o["metadata"]["name"] for o in objects if "retraining" in o["metadata"]["name"]] == []


def test_the_cronjob_runs_the_scheduled_retrain_and_does_not_retry_what_cannot_pass(
    enabled: list[dict[str, Any]],
) -> None:
    cronjob = one(enabled, "CronJob", "retraining")
    spec, main = container(enabled, "CronJob")
    (rule,) = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]

    assert cronjob["spec"]["schedule"] == "0 3 * * 0"  # weekly
    assert main["command"] == ["fraudwatch", "retrain", "--trigger", "scheduled"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["values"] == [ExitCode.QUALITY_GATE, ExitCode.ROLLOUT_NOT_STARTED,
                                             ExitCode.NOTHING_SHIPPED]  # fmt: skip
    assert spec["serviceAccountName"] == "fw-fraudwatch-retraining"
    assert spec["automountServiceAccountToken"] is True  # the hand-off patches the ModelRollout
    assert {"name": "refunds", "mountPath": "/var/lib/fraudwatch-data", "readOnly": True} in main["volumeMounts"]
    assert {"name": "refunds", "persistentVolumeClaim": {"claimName": "refund-stream"}} in spec["volumes"]


@pytest.mark.parametrize("kind", ["CronJob", "Deployment"])
def test_the_environment_is_what_the_retrain_settings_read(
    enabled: list[dict[str, Any]], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, main = container(enabled, kind)
    for entry in main["env"]:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            monkeypatch.setenv(entry["name"], "fraud")
    settings = Settings()
    rs = settings.retrain

    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert str(rs.data_path).startswith("/var/lib/fraudwatch-data/")  # inside the mounted volume
    assert rs.regression_set is not None and rs.regression_set.suffix == ".json"
    assert (rs.window_days, rs.handoff) == (28.0, "kube")
    assert (rs.kube.namespace, rs.kube.rollout_name) == ("fraud", "fw-fraudwatch")
    if kind == "Deployment":
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        assert (rs.webhook.host, rs.webhook.port) == ("0.0.0.0", main["ports"][0]["containerPort"])
        assert rs.webhook.token_file is not None and str(rs.webhook.token_file.parent) == mounts["token"]
        assert rs.webhook.state_file is not None and str(rs.webhook.state_file.parent) == mounts["state"]
        assert rs.webhook.cooldown_s == 21600
        assert rs.webhook.graceful_shutdown_s < spec["terminationGracePeriodSeconds"]


def test_the_role_may_get_and_patch_this_release_s_modelrollout_only(helm: Helm, workdir: Path) -> None:
    objects = helm.template(ENABLED, workdir)
    role = one(objects, "Role", "retraining")
    binding = one(objects, "RoleBinding", "retraining")
    (modelrollout,) = find(objects, "ModelRollout")

    allowed = {"apiGroups": ["fraudwatch.io"], "resources": ["modelrollouts"],
               "resourceNames": [modelrollout["metadata"]["name"]], "verbs": ["get", "patch"]}  # fmt: skip
    assert role["rules"] == [allowed]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fw-fraudwatch-retraining", "namespace": "fraud"}]
    assert one(objects, "ServiceAccount", "retraining")["automountServiceAccountToken"] is False

    register_only = helm.template({"retraining": {**ENABLED["retraining"], "handoff": "none"}}, workdir)
    assert find(register_only, "Role", "retraining") == []
    assert container(register_only, "Deployment")[0]["automountServiceAccountToken"] is False


def test_the_webhook_is_one_replica_with_probes_a_token_file_and_its_service(enabled: list[dict[str, Any]]) -> None:
    deployment = one(enabled, "Deployment", "retraining-webhook")
    spec, main = container(enabled, "Deployment")
    service = one(enabled, "Service", "retraining-webhook")
    secret = one(enabled, "Secret", "retraining-webhook")
    token_volume = next(v for v in spec["volumes"] if v["name"] == "token")

    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert main["command"] == ["python", "-m", "service.retraining.webhook"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert token_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert token_volume["secret"]["items"] == [{"key": "token", "path": "token"}]
    assert len(base64.b64decode(secret["data"]["token"])) == 48
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_an_existing_token_secret_is_used_not_created(helm: Helm, workdir: Path) -> None:
    values = {"retraining": {"webhook": {"enabled": True, "token": {"existingSecret": "am-token",
                                                                    "existingSecretKey": "bearer"}}}}  # fmt: skip
    objects = helm.template(values, workdir)
    spec, _ = container(objects, "Deployment")
    token_volume = next(v for v in spec["volumes"] if v["name"] == "token")

    assert find(objects, "Secret", "retraining-webhook") == []
    assert token_volume["secret"]["secretName"] == "am-token"
    assert token_volume["secret"]["items"] == [{"key": "bearer", "path": "token"}]


def test_the_alertmanager_example_reaches_the_rendered_service(enabled: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text(encoding="utf-8"))
    (receiver,) = [r for r in config["receivers"] if r["name"] == "retrain-webhook"]
    url = urlparse(receiver["webhook_configs"][0]["url"])
    service = one(enabled, "Service", "retraining-webhook")

    assert url.hostname == f"{service['metadata']['name']}.fraud.svc"  # release fw, namespace fraud
    assert url.port == service["spec"]["ports"][0]["port"]
    assert url.path == "/hooks/alertmanager"


def test_only_alertmanager_and_prometheus_may_call_the_webhook(enabled: list[dict[str, Any]]) -> None:
    policy = one(enabled, "NetworkPolicy", "retraining-webhook")
    (ingress,) = policy["spec"]["ingress"]
    peers = ingress["from"]

    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "retraining-webhook"
    assert peers[0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "alertmanager"}}
    assert peers[1]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert "Egress" in policy["spec"]["policyTypes"]
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 443, 5000} <= ports  # DNS, the API server, MLflow


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"retraining": {"handoff": "local"}}, "/retraining/handoff"),
        ({"retraining": {"regressionSet": "/data/set.csv"}}, "/retraining/regressionSet"),
        ({"retraining": {"dataPath": "relative/path"}}, "/retraining/dataPath"),
        ({"retraining": {"webhook": {"replicas": 2}}}, "replicas"),
        ({"retraining": {"webhook": {"terminationGracePeriodSeconds": 3}}}, "terminationGracePeriodSeconds"),
    ],
)
def test_the_schema_refuses_bad_retraining_values(
    helm: Helm, workdir: Path, values: dict[str, Any], complaint: str
) -> None:
    error = helm.template_error(values, workdir)
    assert "values don't meet the specifications of the schema" in error
    assert complaint in error


def test_settings_the_chart_sets_cannot_be_overridden(helm: Helm, workdir: Path) -> None:
    error = helm.template_error({"retraining": {"enabled": True, "settings": {"data_path": "/x"}}}, workdir)
    assert "FW_RETRAIN__DATA_PATH" in error
    objects = helm.template({"retraining": {"enabled": True, "settings": {"min_positives": 100}}}, workdir)
    _, main = container(objects, "CronJob")
    assert {"name": "FW_RETRAIN__MIN_POSITIVES", "value": "100"} in main["env"]
