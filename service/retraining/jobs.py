"""Alert-triggered retrains as Kubernetes Jobs (the webhook's ``runner: job``).

On Kubernetes a retrain must not be a child of the webhook's pod (a killed pod would take it along, and it would
share the pod's memory). The receiver instead creates a batch/v1 Job from the chart's retrain CronJob's
``jobTemplate`` — as ``kubectl create job --from=cronjob/NAME`` does: the template's resources, ``backoffLimit``,
``activeDeadlineSeconds``, ``podFailurePolicy``, ServiceAccount and volumes, its logs in the Job's pods — with the
run's ``--trigger alert --id … --reason … --correlation-id …`` appended to the retrain container's args (argparse
keeps the last ``--trigger``), and reads the Job's status until it ends.

What the Job's status tells is what the ledger records: ``Complete`` → ``rollout_started`` (exit code 0);
``Failed`` by the template's pod failure policy → the outcome of the exit code it names (3, 6, 7:
:data:`service.retraining.outcomes.EXIT_OUTCOMES`); any other failure (``BackoffLimitExceeded``,
``DeadlineExceeded``) → ``failed`` with the Job's reason and message. The run's own summary (version, registry
version) stays in the Job's logs and its MLflow run.

RBAC (deploy/helm/fraudwatch/templates/retraining-rbac.yaml): ``get`` on that one CronJob, ``create`` and ``get`` on
Jobs in the namespace — nothing else (no pods, no logs, no delete, no ModelRollout: the Job's own ServiceAccount
hands the challenger over).

The Kubernetes client is imported on first use, so the receiver's import stays light (tests/unit/test_import_budget).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from service.retraining.handoff import ANNOTATION_REASON, ANNOTATION_REQUEST, kube_api_client
from service.retraining.outcomes import EXIT_OUTCOMES, MAX_REASON_CHARS, RetrainOutcome
from service.settings import RetrainJobSettings

#: As ``kubectl create job --from=cronjob/…`` marks a Job made by hand from a CronJob's template.
ANNOTATION_INSTANTIATE: Final[str] = "cronjob.kubernetes.io/instantiate"
ANNOTATION_CORRELATION: Final[str] = "fraudwatch.io/correlation-id"
#: The label that tells alert-triggered Jobs from the schedule's.
LABEL_TRIGGER: Final[str] = "fraudwatch.io/retrain-trigger"
#: A Job's name ends up in its pods' ``job-name`` label: a label value (63 characters at most).
MAX_JOB_NAME: Final[int] = 63
_HTTP_NOT_FOUND: Final[int] = 404
_EXIT_CODE: Final[re.Pattern[str]] = re.compile(r"exit code (\d+)")
_POD_FAILURE_POLICY: Final[str] = "PodFailurePolicy"
_DETAIL_CHARS: Final[int] = 1000


class JobError(RuntimeError):
    """The API server refused or did not answer (the message names the call and the status)."""


class JobGoneError(JobError):
    """The Job no longer exists (deleted by hand, or by its TTL before the receiver saw it end)."""


@dataclass(frozen=True)
class JobResult:
    """How a finished Job ended, as the ledger records it."""

    outcome: str
    detail: str
    exit_code: int | None


def job_name(cronjob: str, retrain_id: str) -> str:
    """``<cronjob>-<retrain id, lower case>``, the CronJob's part shortened so the whole is a valid label value."""
    suffix = re.sub(r"[^a-z0-9-]", "-", retrain_id.lower()).strip("-")
    prefix = cronjob[: max(0, MAX_JOB_NAME - len(suffix) - 1)].rstrip("-")
    return f"{prefix}-{suffix}" if prefix else suffix[:MAX_JOB_NAME]


def retrain_args(retrain_id: str, reason: str, correlation_id: str) -> list[str]:
    """What the alert-triggered Job adds to the template's ``fraudwatch retrain`` arguments."""
    return [
        "--trigger", "alert", "--id", retrain_id, "--reason", reason[:MAX_REASON_CHARS],
        "--correlation-id", correlation_id,
    ]  # fmt: skip


def job_from_cronjob(
    cronjob: Mapping[str, Any],
    *,
    name: str,
    container: str,
    args: Sequence[str],
    annotations: Mapping[str, str],
) -> dict[str, Any]:
    """The batch/v1 Job of one alert-triggered retrain: ``cronjob``'s ``jobTemplate`` (spec, labels, annotations),
    owned by the CronJob (deleting it deletes its Jobs), ``args`` appended to ``container``'s. ``ValueError`` when
    the template has no such container."""
    template = cronjob["spec"]["jobTemplate"]
    spec = _copy(template["spec"])
    containers = spec["template"]["spec"]["containers"]
    target = next((c for c in containers if c.get("name") == container), None)
    if target is None:
        names = ", ".join(str(c.get("name")) for c in containers)
        raise ValueError(f"the CronJob's jobTemplate has no container {container!r} (it has: {names})")
    target["args"] = [*target.get("args", []), *args]
    metadata = template.get("metadata", {})
    meta = cronjob["metadata"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta.get("namespace"),
            "labels": {**metadata.get("labels", {}), LABEL_TRIGGER: "alert"},
            "annotations": {**metadata.get("annotations", {}), ANNOTATION_INSTANTIATE: "manual", **annotations},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    # True would need update on cronjobs/finalizers where that admission plugin is on
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": spec,
    }


def _copy(value: Any) -> Any:
    """A deep copy of a JSON document."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def job_result(job: Mapping[str, Any]) -> JobResult | None:
    """How ``job`` ended, from its terminal condition; None while it runs (no ``Complete``/``Failed`` yet)."""
    name = job.get("metadata", {}).get("name", "?")
    if _condition(job, "Complete") is not None:
        return JobResult(RetrainOutcome.ROLLOUT_STARTED.value, f"job {name} completed", 0)
    failed = _condition(job, "Failed")
    if failed is None:
        return None
    reason, message = str(failed.get("reason", "")), str(failed.get("message", ""))
    code = _EXIT_CODE.search(message) if reason == _POD_FAILURE_POLICY else None
    exit_code = int(code.group(1)) if code else None
    outcome = EXIT_OUTCOMES.get(exit_code, RetrainOutcome.FAILED) if exit_code is not None else RetrainOutcome.FAILED
    detail = f"job {name} failed: {reason}: {message}"[:_DETAIL_CHARS]
    return JobResult(outcome.value, detail, exit_code)


def run_annotations(retrain_id: str, reason: str, correlation_id: str) -> dict[str, str]:
    return {
        ANNOTATION_REQUEST: retrain_id,
        ANNOTATION_REASON: reason[:MAX_REASON_CHARS],
        ANNOTATION_CORRELATION: correlation_id,
    }


class RetrainJobs:
    """The two API calls of the Job runner: create a retrain's Job from the CronJob's template, read a Job."""

    def __init__(self, settings: RetrainJobSettings, api: Any | None = None) -> None:
        if not settings.cronjob:
            raise ValueError("FW_RETRAIN__WEBHOOK__JOB__CRONJOB is not set (the retrain CronJob whose template to use)")
        self.settings = settings
        self._api = api

    def _batch(self) -> Any:
        if self._api is None:
            from kubernetes import client

            self._api = client.BatchV1Api(kube_api_client(self.settings.kubeconfig))
        return self._api

    def create(self, retrain_id: str, reason: str, correlation_id: str) -> str:
        """Create the run's Job (named after the CronJob and the run); its name. ``JobError`` when refused."""
        s = self.settings
        api = self._batch()
        name = job_name(s.cronjob, retrain_id)
        where = f"cronjob {s.namespace}/{s.cronjob}"
        cronjob = self._call(where, lambda: api.read_namespaced_cron_job(s.cronjob, s.namespace, **self._timeout()))
        try:
            body = job_from_cronjob(
                api.api_client.sanitize_for_serialization(cronjob),
                name=name,
                container=s.container,
                args=retrain_args(retrain_id, reason, correlation_id),
                annotations=run_annotations(retrain_id, reason, correlation_id),
            )
        except (KeyError, ValueError) as exc:
            raise JobError(f"{where}: not a usable template: {exc}") from exc
        self._call(f"job {s.namespace}/{name}", lambda: api.create_namespaced_job(s.namespace, body, **self._timeout()))
        return name

    def result(self, name: str) -> JobResult | None:
        """How Job ``name`` ended; None while it runs. ``JobGoneError`` when it no longer exists, ``JobError`` else."""
        s = self.settings
        api = self._batch()
        job = self._call(f"job {s.namespace}/{name}", lambda: api.read_namespaced_job(name, s.namespace,
                                                                                      **self._timeout()))  # fmt: skip
        return job_result(api.api_client.sanitize_for_serialization(job))

    def _timeout(self) -> dict[str, float]:
        return {"_request_timeout": self.settings.request_timeout_s}

    @staticmethod
    def _call(where: str, call: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except ApiException as exc:
            body = str(exc.body or "")[:300]
            error = JobGoneError if exc.status == _HTTP_NOT_FOUND else JobError
            raise error(f"{where}: {exc.status} {exc.reason}: {body}") from exc
        except (HTTPError, OSError) as exc:
            raise JobError(f"{where}: API server unreachable: {exc}") from exc
