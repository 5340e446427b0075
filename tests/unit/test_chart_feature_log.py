"""The chart's feature log and the retrain that trains on it, rendered by the real helm: every model server writes
the vectors it served to one volume (a ReadWriteMany PersistentVolumeClaim, or yours), the retrain CronJob — and so
every Job the webhook copies from its template — mounts the same volume read-only and the prediction log's Secret
(the labels), and the environment of both is what service/settings.py reads. Values that could not run are refused
at render, naming what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.kits.chart import Helm, one

DSN = "postgresql+psycopg://fw:secret@postgres:5432/fraudwatch"
FROM_LOG: dict[str, Any] = {
    "featureLog": {"enabled": True},
    "predictionLog": {"dsn": DSN},
    "retraining": {"enabled": True, "source": "feature_log", "webhook": {"enabled": True}},
    "networkPolicy": {"egress": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}},
}


@pytest.fixture(scope="module")
def from_log(helm: Helm, workdir: Path) -> list[dict[str, Any]]:
    return helm.template(FROM_LOG, workdir)


def model_server_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = one(objects, "ConfigMap", "-model-server")
    spec: dict[str, Any] = yaml.safe_load(configmap["data"]["pod-template.yaml"])["spec"]
    return spec


def job_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "CronJob", "retraining")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for entry in container["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value", "fraud"))
    return Settings()


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in spec["volumes"] if v["name"] == name]
    assert len(found) == 1, found
    return found[0]


def mount(container: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in container["volumeMounts"] if m["name"] == name]
    assert len(found) == 1, found
    return found[0]


def test_by_default_nothing_is_logged_and_the_retrain_reads_the_stream(
    helm: Helm, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = helm.template({"retraining": {"enabled": True}}, workdir)
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim"] == []
    server = model_server_spec(objects)
    assert "feature-log" not in [v["name"] for v in server["volumes"]]
    assert not any(e["name"].startswith("FW_FEATURE_LOG__") for e in server["containers"][0]["env"])
    spec = job_spec(objects)
    assert "feature-log" not in [v["name"] for v in spec["volumes"]]
    assert settings_of(spec["containers"][0], monkeypatch).retrain.source == "stream"


def test_the_model_servers_write_the_feature_log_to_a_read_write_many_claim(
    from_log: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    claim = one(from_log, "PersistentVolumeClaim", "-feature-log")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every model-server pod of every version, and the Job
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    server = model_server_spec(from_log)
    (container,) = server["containers"]
    assert volume(server, "feature-log")["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    written = mount(container, "feature-log")
    assert not written.get("readOnly", False)
    settings = settings_of(container, monkeypatch)
    assert settings.feature_log.enabled
    assert str(settings.feature_log_dir) == written["mountPath"]
    assert (settings.feature_log.retention_days, settings.feature_log.max_bytes) == (90, 20 * 2**30)


def test_the_retrain_job_reads_the_same_volume_and_the_prediction_log_s_labels(
    from_log: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = job_spec(from_log)
    (container,) = spec["containers"]
    server = model_server_spec(from_log)
    assert volume(spec, "feature-log") == volume(server, "feature-log")
    read = mount(container, "feature-log")
    assert read["readOnly"] is True and read["mountPath"] == mount(server["containers"][0], "feature-log")["mountPath"]
    # the labels: the very Secret (and key) the routers write the prediction log with
    router = one(from_log, "Deployment", "-router")["spec"]["template"]["spec"]
    assert volume(spec, "prediction-log") == volume(router, "prediction-log")
    settings = settings_of(container, monkeypatch)
    rs = settings.retrain
    assert rs.source == "feature_log"
    assert str(settings.feature_log_dir) == read["mountPath"]
    assert (
        rs.labels_dsn_file is not None
        and str(rs.labels_dsn_file.parent) == mount(container, "prediction-log")["mountPath"]
    )
    assert rs.labels_dsn is None  # the DSN is a file, never an env value
    assert DSN not in yaml.safe_dump(spec)
    egress = one(from_log, "NetworkPolicy", "-retraining")["spec"]["egress"]
    assert any(port["port"] == 5432 for rule in egress for port in rule.get("ports", []))


def test_the_webhook_that_creates_jobs_mounts_nothing_of_it_and_one_that_trains_itself_does(
    from_log: list[dict[str, Any]], helm: Helm, workdir: Path
) -> None:
    webhook = one(from_log, "Deployment", "retraining-webhook")["spec"]["template"]["spec"]
    assert {"feature-log", "prediction-log"}.isdisjoint(v["name"] for v in webhook["volumes"])
    subprocess_runner = {"enabled": True, "runner": "subprocess"}
    values = {**FROM_LOG, "retraining": {**FROM_LOG["retraining"], "webhook": subprocess_runner}}
    trains = one(helm.template(values, workdir), "Deployment", "retraining-webhook")["spec"]["template"]["spec"]
    assert mount(trains["containers"][0], "feature-log")["readOnly"] is True
    assert volume(trains, "prediction-log")["secret"]["items"][0]["path"] == "dsn"


def test_an_existing_claim_is_used_not_created(helm: Helm, workdir: Path) -> None:
    values = {**FROM_LOG, "featureLog": {"enabled": True, "existingClaim": "shared-feature-log"}}
    objects = helm.template(values, workdir)
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim"] == []
    for spec in (model_server_spec(objects), job_spec(objects)):
        assert volume(spec, "feature-log")["persistentVolumeClaim"]["claimName"] == "shared-feature-log"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({**FROM_LOG, "featureLog": {"enabled": False}}, "needs featureLog.enabled: true"),
        ({**FROM_LOG, "predictionLog": {"dsn": ""}}, "set predictionLog.dsn or predictionLog.existingSecret"),
    ],
)
def test_a_retrain_from_the_log_it_could_not_read_is_refused(
    helm: Helm, workdir: Path, values: dict[str, Any], complaint: str
) -> None:
    assert complaint in helm.template_error(values, workdir)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"retraining": {"source": "history"}}, "source"),
        ({"featureLog": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}, "accessModes"),
        ({"featureLog": {"mountPath": "relative"}}, "mountPath"),
    ],
)
def test_the_schema_refuses_bad_feature_log_values(
    helm: Helm, workdir: Path, values: dict[str, Any], complaint: str
) -> None:
    error = helm.template_error(values, workdir)
    assert "values don't meet the specifications of the schema" in error and complaint in error
