"""Alert-triggered retrains as Kubernetes Jobs on a real control plane (kube-apiserver, the Job controller of
kube-controller-manager, kube-scheduler, kwok's node): the webhook's :class:`RetrainService` with ``runner: job``,
acting as the chart's webhook ServiceAccount (the admin impersonates it, so RBAC decides as for the pod), creates one
Job from the chart's retrain CronJob's template per retrain, starts none while it runs, and records how it ended.

The chart is rendered with ``retraining.webhook.enabled`` (``helm template --validate`` against this API server) and
its CronJob, ServiceAccounts, Role and RoleBinding are created as Helm would. The template's ``nodeSelector`` names a
node label that no node has yet, so the Job's pod stays Pending (the Job runs) until the test labels kwok's node:
then the scheduler binds it, kwok runs it to completion and the Job controller marks the Job Complete. A failure is
the template's own ``activeDeadlineSeconds`` expiring (the Job controller marks it Failed, DeadlineExceeded).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from prometheus_client import CollectorRegistry

from service.retraining.jobs import LABEL_TRIGGER, RetrainJobs
from service.retraining.outcomes import RetrainOutcome
from service.retraining.triggers import Decision, parse_payload
from service.retraining.webhook import RetrainService
from service.settings import Settings
from tests.kits.alerts import alert, notification
from tests.kits.cluster import ControlPlane
from tests.kits.release import GROUP, PLURAL, ROLLOUT, VERSION, impersonating, render

pytestmark = pytest.mark.e2e

CRONJOB = "fw-fraudwatch-retraining"
WEBHOOK_ACCOUNT = "fw-fraudwatch-retraining-webhook"
#: The node label the template's nodeSelector waits for (its value: the test's namespace).
GATE = "fraudwatch.io/e2e-retrain-gate"
FINISH_TIMEOUT_S = 120.0


@pytest.fixture
def installed(
    k8s_cluster: ControlPlane, dynamic: DynamicClient, crd: Any, namespace: str, tmp_path: Path
) -> Iterator[str]:
    """The webhook's RBAC and the retrain CronJob (with the node gate), created from the rendered chart."""
    values = {"retraining": {"webhook": {"enabled": True}, "nodeSelector": {GATE: namespace}}}
    objects = render(k8s_cluster, values, tmp_path, namespace)
    wanted = {("CronJob", CRONJOB), ("ServiceAccount", CRONJOB), ("ServiceAccount", WEBHOOK_ACCOUNT),
              ("Role", WEBHOOK_ACCOUNT), ("RoleBinding", WEBHOOK_ACCOUNT)}  # fmt: skip
    chosen = [o for o in objects if (o["kind"], o["metadata"]["name"]) in wanted]
    assert {(o["kind"], o["metadata"]["name"]) for o in chosen} == wanted
    for obj in chosen:
        dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).create(body=obj, namespace=namespace)
    yield namespace


@pytest.fixture
def as_webhook(k8s_cluster: ControlPlane, installed: str) -> Iterator[k8s.ApiClient]:
    api_client = impersonating(k8s_cluster, installed, WEBHOOK_ACCOUNT)
    try:
        yield api_client
    finally:
        api_client.close()


@pytest.fixture
def open_gate(k8s_cluster: ControlPlane, k8s_client: Any, installed: str) -> Iterator[Any]:
    """Call it to label kwok's node so the test's Job pods schedule; the label is removed after the test."""
    core = k8s.CoreV1Api(k8s_client)
    node = k8s_cluster.settings.node_name

    def label(value: str | None) -> None:
        core.patch_node(node, {"metadata": {"labels": {GATE: value}}})

    try:
        yield lambda: label(installed)
    finally:
        label(None)


def receiver(home: Path, namespace: str, api_client: k8s.ApiClient, cronjob: str = CRONJOB) -> RetrainService:
    token = home / "token"
    token.write_text("e2e-token\n", encoding="utf-8")
    webhook = {"token_file": token, "cooldown_s": 0, "runner": "job",
               "job": {"namespace": namespace, "cronjob": cronjob, "poll_s": 0.2}}  # fmt: skip
    settings = Settings.model_validate({"home": home, "retrain": {"webhook": webhook}})
    jobs = RetrainJobs(settings.retrain.webhook.job, api=k8s.BatchV1Api(api_client))
    return RetrainService(settings, registry=CollectorRegistry(), jobs=jobs)


def firing(fingerprint: str) -> Any:
    return parse_payload(json.dumps(notification(alert(fingerprint=fingerprint))).encode())


def jobs_of(k8s_client: Any, namespace: str) -> list[Any]:
    return list(k8s.BatchV1Api(k8s_client).list_namespaced_job(namespace).items)


def test_an_alert_creates_one_job_from_the_template_a_repeat_none_while_it_runs_and_the_ledger_gets_its_end(
    k8s_cluster: ControlPlane, k8s_client: Any, installed: str, as_webhook: k8s.ApiClient, open_gate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    service = receiver(tmp_path, installed, as_webhook)
    try:
        started, run = service.notify(firing("f1"), "corr-e2e-1")
        assert started.decision is Decision.STARTED and run is not None
        (job,) = jobs_of(k8s_client, installed)
        # the real Job controller takes it on: a pod, Pending (no node has the gate label yet)
        k8s_cluster.wait_for("the Job's pod", lambda: (k8s.BatchV1Api(k8s_client).read_namespaced_job(
            job.metadata.name, installed).status.active or 0) == 1)  # fmt: skip

        repeat, second = service.notify(firing("f2"), "corr-e2e-2")

        assert repeat.decision is Decision.BUSY and second is None
        assert [j.metadata.name for j in jobs_of(k8s_client, installed)] == [job.metadata.name]
        assert service.view().running == run.retrain_id
        assert service.state.runs[-1].job == job.metadata.name

        open_gate()
        assert service.wait_idle(FINISH_TIMEOUT_S), "the Job did not finish"
    finally:
        service.close()

    cronjob = k8s.BatchV1Api(k8s_client).read_namespaced_cron_job(CRONJOB, installed)
    template, spec = cronjob.spec.job_template.spec, job.spec
    (main,) = spec.template.spec.containers
    (original,) = template.template.spec.containers
    assert (spec.backoff_limit, spec.active_deadline_seconds) == (template.backoff_limit,
                                                                  template.active_deadline_seconds)  # fmt: skip
    assert spec.pod_failure_policy == template.pod_failure_policy
    assert main.resources == original.resources and main.command == original.command
    assert spec.template.spec.service_account_name == CRONJOB  # the Job's pods, not the webhook, hand over
    assert main.args[main.args.index("--id") + 1] == run.retrain_id
    assert main.args[main.args.index("--correlation-id") + 1] == "corr-e2e-1"
    assert main.args[:2] == ["--trigger", "alert"] and job.metadata.labels[LABEL_TRIGGER] == "alert"
    (owner,) = job.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("CronJob", CRONJOB, cronjob.metadata.uid)

    (record,) = service.state.runs
    assert (record.outcome, record.exit_code, record.job) == (RetrainOutcome.ROLLOUT_STARTED.value, 0,
                                                              job.metadata.name)  # fmt: skip
    assert record.finished_at is not None and "completed" in record.detail
    runs = {"trigger": "alert", "outcome": "rollout_started"}
    assert service.metrics.registry.get_sample_value("fraudwatch_retrain_runs_total", runs) == 1.0


def test_a_failed_job_is_recorded_as_failed_by_the_receiver_that_adopted_it_after_a_restart(
    k8s_client: Any, installed: str, as_webhook: k8s.ApiClient, tmp_path: Path
) -> None:
    batch = k8s.BatchV1Api(k8s_client)
    batch.patch_namespaced_cron_job(CRONJOB, installed, {"spec": {"jobTemplate": {"spec": {
        "activeDeadlineSeconds": 15}}}})  # fmt: skip
    first = receiver(tmp_path, installed, as_webhook)
    _, run = first.notify(firing("f1"), "corr-e2e-3")
    assert run is not None
    first.close()  # the receiver's pod goes away; the Job does not
    assert first.state.running() is not None and first.state.running().job is not None  # type: ignore[union-attr]
    (job,) = jobs_of(k8s_client, installed)
    assert job.status.conditions is None or all(c.type not in ("Complete", "Failed") for c in job.status.conditions)

    second = receiver(tmp_path, installed, as_webhook)
    try:
        assert second.view().running == run.retrain_id  # adopted: a new alert would be "busy"
        assert second.wait_idle(FINISH_TIMEOUT_S), "the Job did not fail"
    finally:
        second.close()

    (record,) = second.state.runs
    assert record.outcome == RetrainOutcome.FAILED.value and record.adopted
    assert "DeadlineExceeded" in record.detail and record.job == job.metadata.name
    assert [j.metadata.name for j in jobs_of(k8s_client, installed)] == [job.metadata.name]


def test_the_webhook_account_may_create_jobs_from_its_cronjob_and_nothing_else(
    k8s_client: Any, installed: str, as_webhook: k8s.ApiClient, tmp_path: Path
) -> None:
    batch = k8s.BatchV1Api(k8s_client)
    other = batch.read_namespaced_cron_job(CRONJOB, installed)
    other.metadata = k8s.V1ObjectMeta(name="another-cronjob")
    batch.create_namespaced_cron_job(installed, other)

    # another CronJob's template: refused by RBAC, recorded as a failed start, no Job
    service = receiver(tmp_path, installed, as_webhook, cronjob="another-cronjob")
    try:
        started, run = service.notify(firing("f1"), "corr-e2e-4")
    finally:
        service.close()
    assert started.decision is Decision.STARTED and run is not None
    (record,) = service.state.runs
    assert record.outcome == RetrainOutcome.FAILED.value and "403" in record.detail and record.job is None
    assert jobs_of(k8s_client, installed) == []

    denied: dict[str, Callable[[], Any]] = {
        "list jobs": lambda: k8s.BatchV1Api(as_webhook).list_namespaced_job(installed),
        "delete a job": lambda: k8s.BatchV1Api(as_webhook).delete_namespaced_job("any", installed),
        "patch the cronjob": lambda: k8s.BatchV1Api(as_webhook).patch_namespaced_cron_job(
            CRONJOB, installed, {"spec": {"suspend": False}}),
        "create a pod": lambda: k8s.CoreV1Api(as_webhook).create_namespaced_pod(installed, k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="p"), spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c",
                                                                                                 image="x")]))),
        "read pod logs": lambda: k8s.CoreV1Api(as_webhook).read_namespaced_pod_log("any", installed),
        "patch the ModelRollout": lambda: k8s.CustomObjectsApi(as_webhook).patch_namespaced_custom_object(
            GROUP, VERSION, installed, PLURAL, ROLLOUT, {"spec": {}}),
        "read a secret": lambda: k8s.CoreV1Api(as_webhook).read_namespaced_secret("any", installed),
    }  # fmt: skip
    statuses: dict[str, int] = {}
    for what, call in denied.items():
        with pytest.raises(ApiException) as refused:
            call()
        statuses[what] = refused.value.status
    assert statuses == dict.fromkeys(denied, 403)


#: A retrain from the feature log: the model servers' volume and the prediction log's Secret (a DSN to nowhere: the
#: Job's pod runs on kwok, which runs no container).
FROM_LOG = {
    "featureLog": {"enabled": True, "persistence": {"size": "1Gi"}},
    "predictionLog": {"dsn": "postgresql+psycopg://fw:e2e@postgres:5432/fraudwatch"},
    "retraining": {"source": "feature_log", "webhook": {"enabled": True}},
}
FEATURE_LOG_CLAIM = "fw-fraudwatch-feature-log"
PREDICTION_LOG_SECRET = "fw-fraudwatch-prediction-log"


def test_a_retrain_job_from_the_feature_log_mounts_the_model_servers_volume_and_the_label_secret(
    k8s_cluster: ControlPlane, k8s_client: Any, dynamic: DynamicClient, crd: Any, namespace: str, tmp_path: Path
) -> None:
    """The webhook's Job, copied from the CronJob's template, gets the feature log's ReadWriteMany claim read-only
    and the prediction log's Secret: the real Job controller makes its pod with both, the PersistentVolume binder
    binds the claim (to a ReadWriteMany volume made here: this cluster has no provisioner), the scheduler places the
    pod once it is bound, and the Job completes (kwok)."""
    objects = render(k8s_cluster, FROM_LOG, tmp_path, namespace)
    wanted = {("CronJob", CRONJOB), ("ServiceAccount", CRONJOB), ("ServiceAccount", WEBHOOK_ACCOUNT),
              ("Role", WEBHOOK_ACCOUNT), ("RoleBinding", WEBHOOK_ACCOUNT),
              ("PersistentVolumeClaim", FEATURE_LOG_CLAIM), ("Secret", PREDICTION_LOG_SECRET)}  # fmt: skip
    chosen = [o for o in objects if (o["kind"], o["metadata"]["name"]) in wanted]
    assert {(o["kind"], o["metadata"]["name"]) for o in chosen} == wanted
    for obj in chosen:
        dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).create(body=obj, namespace=namespace)
    core = k8s.CoreV1Api(k8s_client)
    volume_name = f"feature-log-{namespace}"
    core.create_persistent_volume(k8s.V1PersistentVolume(
        metadata=k8s.V1ObjectMeta(name=volume_name),
        spec=k8s.V1PersistentVolumeSpec(
            capacity={"storage": "1Gi"}, access_modes=["ReadWriteMany"], storage_class_name="",
            host_path=k8s.V1HostPathVolumeSource(path=str(tmp_path / "feature-log")),
            claim_ref=k8s.V1ObjectReference(namespace=namespace, name=FEATURE_LOG_CLAIM),
            persistent_volume_reclaim_policy="Retain"),
    ))  # fmt: skip
    api_client = impersonating(k8s_cluster, namespace, WEBHOOK_ACCOUNT)
    service = receiver(tmp_path, namespace, api_client)
    try:
        started, run = service.notify(firing("f1"), "corr-e2e-log")
        assert started.decision is Decision.STARTED and run is not None
        k8s_cluster.wait_for("the claim bound", lambda: core.read_namespaced_persistent_volume_claim(
            FEATURE_LOG_CLAIM, namespace).status.phase == "Bound")  # fmt: skip
        assert service.wait_idle(FINISH_TIMEOUT_S), "the Job did not finish"
    finally:
        service.close()
        api_client.close()
        core.delete_persistent_volume(volume_name)

    (job,) = jobs_of(k8s_client, namespace)
    (pod,) = core.list_namespaced_pod(namespace, label_selector=f"job-name={job.metadata.name}").items
    mounts = {m.name: m for m in pod.spec.containers[0].volume_mounts}
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["feature-log"].persistent_volume_claim.claim_name == FEATURE_LOG_CLAIM
    assert mounts["feature-log"].read_only and mounts["prediction-log"].read_only
    assert volumes["prediction-log"].secret.secret_name == PREDICTION_LOG_SECRET
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["FW_RETRAIN__SOURCE"] == "feature_log"
    assert env["FW_FEATURE_LOG__DIRECTORY"] == mounts["feature-log"].mount_path
    assert env["FW_RETRAIN__LABELS_DSN_FILE"].startswith(mounts["prediction-log"].mount_path + "/")
    (record,) = service.state.runs
    assert (record.outcome, record.job) == (RetrainOutcome.ROLLOUT_STARTED.value, job.metadata.name)
