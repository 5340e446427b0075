"""The Job runner's pure parts (service/retraining/jobs.py): the Job made from the chart's rendered CronJob, its name,
and what a finished Job's status means for the ledger. The API calls themselves run against a real kube-apiserver in
tests/e2e/test_retrain_jobs_kube.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.retraining.jobs import (
    ANNOTATION_INSTANTIATE,
    LABEL_TRIGGER,
    MAX_JOB_NAME,
    job_from_cronjob,
    job_name,
    job_result,
    retrain_args,
    run_annotations,
)
from service.retraining.outcomes import RetrainOutcome
from tests.kits.chart import Helm, one

RETRAIN_ID = "alert-20261206T054200Z-0a1b2c3d"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module")
def cronjob(helm: Helm, workdir: Path) -> dict[str, Any]:
    """The chart's retrain CronJob as the API server returns it (a uid added)."""
    objects = helm.template({"retraining": {"webhook": {"enabled": True}}}, workdir)
    rendered = one(objects, "CronJob", "retraining")
    return {**rendered, "metadata": {**rendered["metadata"], "namespace": "fraud", "uid": "0000-cron"}}


def test_the_job_is_the_cronjob_template_with_the_run_s_arguments(cronjob: dict[str, Any]) -> None:
    args = retrain_args(RETRAIN_ID, "alerts: FraudwatchFeatureDrift(input_drift)", "corr-1")
    job = job_from_cronjob(cronjob, name="fw-x", container="retraining", args=args,
                           annotations=run_annotations(RETRAIN_ID, "why", "corr-1"))  # fmt: skip
    template = cronjob["spec"]["jobTemplate"]
    (main,) = job["spec"]["template"]["spec"]["containers"]
    (original,) = template["spec"]["template"]["spec"]["containers"]

    # the template's spec as is — resources, backoffLimit, deadline, pod failure policy, ServiceAccount — but args
    assert {k: v for k, v in job["spec"].items() if k != "template"} == {
        k: v for k, v in template["spec"].items() if k != "template"
    }
    assert main["resources"] == original["resources"] and main["command"] == original["command"]
    assert main["args"] == [*original.get("args", []), *args]
    assert main["command"][-2:] == ["--trigger", "scheduled"] and main["args"][:2] == ["--trigger", "alert"]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "fw-fraudwatch-retraining"
    assert job["metadata"]["labels"] == {**template["metadata"]["labels"], LABEL_TRIGGER: "alert"}
    assert job["metadata"]["annotations"][ANNOTATION_INSTANTIATE] == "manual"
    assert job["metadata"]["annotations"]["fraudwatch.io/retrain-id"] == RETRAIN_ID
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "CronJob",
                                                   "name": "fw-fraudwatch-retraining", "uid": "0000-cron",
                                                   "controller": True, "blockOwnerDeletion": False}]  # fmt: skip
    assert "args" not in original or original["args"] != main["args"]  # the CronJob itself is not changed


def test_a_template_without_the_retrain_container_is_refused(cronjob: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no container 'trainer'"):
        job_from_cronjob(cronjob, name="x", container="trainer", args=[], annotations={})


@pytest.mark.parametrize("cronjob_name", ["fw-fraudwatch-retraining", "a" * 80, "x"])
def test_job_names_are_valid_label_values_and_name_the_run(cronjob_name: str) -> None:
    name = job_name(cronjob_name, RETRAIN_ID)

    assert len(name) <= MAX_JOB_NAME and DNS_LABEL.match(name), name
    assert name.endswith(RETRAIN_ID.lower())


def job(*conditions: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": "fw-job"}, "status": {"conditions": [{"status": "True", **c} for c in conditions]}}


@pytest.mark.parametrize(
    ("status", "outcome", "exit_code"),
    [
        (job(), None, None),
        (job({"type": "SuccessCriteriaMet"}), None, None),  # pods may still be terminating
        (job({"type": "FailureTarget", "reason": "PodFailurePolicy"}), None, None),
        (job({"type": "SuccessCriteriaMet"}, {"type": "Complete"}), RetrainOutcome.ROLLOUT_STARTED, 0),
        (job({"type": "Failed", "reason": "PodFailurePolicy", "message": "Container retraining for pod fraud/p "
              "failed with exit code 3 matching FailJob rule at index 0"}), RetrainOutcome.QUALITY_GATE_FAILED, 3),
        (job({"type": "Failed", "reason": "PodFailurePolicy", "message": "… exit code 7 matching FailJob rule"}),
         RetrainOutcome.INSUFFICIENT_DATA, 7),
        (job({"type": "Failed", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff "
              "limit"}), RetrainOutcome.FAILED, None),
        (job({"type": "Failed", "reason": "DeadlineExceeded", "message": "exit code 3"}), RetrainOutcome.FAILED, None),
    ],
)  # fmt: skip
def test_a_job_s_terminal_condition_is_its_outcome(
    status: dict[str, Any], outcome: RetrainOutcome | None, exit_code: int | None
) -> None:
    result = job_result(status)

    if outcome is None:
        assert result is None
        return
    assert result is not None
    assert (result.outcome, result.exit_code) == (outcome.value, exit_code)
    assert result.detail.startswith("job fw-job ")
