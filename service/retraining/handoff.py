"""Handing a registered challenger to delivery: "start a rollout of this version", and nothing about stages.

The model side (``service/``) must not know about stages or traffic splitting, so retraining does not drive a
rollout: it asks delivery's public interface to start one and reports what delivery answered. One small protocol,
:class:`RolloutHandoff`, with one implementation per delivery backend:

* :class:`RolloutctlHandoff` (local) — runs ``rolloutctl start --candidate NAME --id ID`` as a subprocess: the
  controller's inbox, the same command an operator types. The id makes it idempotent (the controller applies a
  command id once), so a retried hand-off never starts a second rollout; rolloutctl's documented exit codes map to
  :class:`HandoffOutcome` (0 applied → started, 4 refused, 5/6 no controller answered → unavailable).
* :class:`ModelRolloutPatchHandoff` (Kubernetes) — a JSON merge patch of the ModelRollout's ``spec.candidate``
  (deploy/helm/fraudwatch/README.md: ``spec.candidate`` is the desired version; the controller starts a rollout
  when it differs from the stable). The patch carries the object's ``resourceVersion`` (a concurrent writer makes
  it fail with 409 instead of being overwritten) and names the version by an immutable registry URI
  (``models:/refund-fraud/7``), never by a moving alias. RBAC: ``get`` and ``patch`` on that one ModelRollout.

Neither imports :mod:`rollout`: delivery is reached only through its CLI or its custom resource.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol

from service.common.logging import get_logger, log_event
from service.settings import KubeHandoffSettings, RetrainSettings

logger = get_logger(__name__)

#: rolloutctl's exit codes (rollout/cli/main.py's epilog) that are not failures of the hand-off itself.
ROLLOUTCTL_APPLIED: Final[int] = 0
ROLLOUTCTL_REFUSED: Final[int] = 4
ROLLOUTCTL_TIMEOUT: Final[int] = 5
ROLLOUTCTL_UNAVAILABLE: Final[int] = 6
#: Seconds the subprocess may take beyond rolloutctl's own wait before it is killed.
SUBPROCESS_MARGIN_S: Final[float] = 30.0
_DETAIL_CHARS: Final[int] = 2000

MODELROLLOUT_GROUP: Final[str] = "fraudwatch.io"
MODELROLLOUT_VERSION: Final[str] = "v1alpha1"
MODELROLLOUT_PLURAL: Final[str] = "modelrollouts"
#: Annotations the Kubernetes hand-off leaves on the ModelRollout (who asked for the candidate, and why).
ANNOTATION_REQUEST: Final[str] = "fraudwatch.io/retrain-id"
ANNOTATION_REASON: Final[str] = "fraudwatch.io/retrain-reason"
_PROGRESSING: Final[str] = "Progressing"
_HTTP_CONFLICT: Final[int] = 409
_HTTP_TOO_MANY: Final[int] = 429
_HTTP_SERVER_ERROR: Final[int] = 500


class HandoffOutcome(StrEnum):
    """What delivery answered."""

    STARTED = "started"  # a rollout of the candidate runs (or it already was the desired candidate)
    REFUSED = "refused"  # delivery declined, e.g. another rollout is in progress
    UNAVAILABLE = "unavailable"  # no answer in time (controller not running, API server unreachable)
    FAILED = "failed"  # the request itself failed (bad configuration, forbidden, invalid object)


@dataclass(frozen=True)
class Candidate:
    """A registered version as delivery names it."""

    name: str  # the version's name, as the model reports it (``manifest.version``, e.g. ``v8``)
    model: str  # the registered model
    number: str  # the registry's version number


@dataclass(frozen=True)
class HandoffResult:
    outcome: HandoffOutcome
    via: str
    request_id: str
    detail: str = ""

    @property
    def started(self) -> bool:
        return self.outcome is HandoffOutcome.STARTED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome.value}


class RolloutHandoff(Protocol):
    """Delivery's "start a rollout of this version", idempotent per ``request_id``."""

    @property
    def via(self) -> str: ...

    def start(self, candidate: Candidate, *, request_id: str, reason: str) -> HandoffResult: ...


# ------------------------------------------------------------------------------------------------ rolloutctl


def resolve_command(command: Sequence[str]) -> list[str]:
    """``command`` with a bare program name resolved beside this interpreter first (the project's virtualenv),
    then on PATH; a name found in neither is left for the OS to report."""
    if not command:
        raise ValueError("empty rolloutctl command")
    program, *rest = command
    if "/" not in program:
        beside = Path(sys.executable).parent / program
        found = str(beside) if beside.is_file() else shutil.which(program)
        program = found or program
    return [program, *rest]


def rolloutctl_argv(
    command: Sequence[str],
    candidate: Candidate,
    *,
    request_id: str,
    reason: str,
    timeout_s: float,
    state_dir: Path | None,
) -> list[str]:
    """``rolloutctl [--state-dir D] --json start --candidate NAME --id ID --reason R --timeout T``."""
    argv = resolve_command(command)
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return [
        *argv,
        "--json",
        "start",
        "--candidate",
        candidate.name,
        "--id",
        request_id,
        "--reason",
        reason,
        "--timeout",
        f"{timeout_s:g}",
    ]


def rolloutctl_outcome(returncode: int, stdout: str, stderr: str) -> tuple[HandoffOutcome, str]:
    """The outcome of one ``rolloutctl start`` from its documented exit code; the detail from its JSON answer
    (``detail`` of the controller's command result) or its error message."""
    outcome = {
        ROLLOUTCTL_APPLIED: HandoffOutcome.STARTED,
        ROLLOUTCTL_REFUSED: HandoffOutcome.REFUSED,
        ROLLOUTCTL_TIMEOUT: HandoffOutcome.UNAVAILABLE,
        ROLLOUTCTL_UNAVAILABLE: HandoffOutcome.UNAVAILABLE,
    }.get(returncode, HandoffOutcome.FAILED)
    try:
        answer = json.loads(stdout)
    except json.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        detail = str(answer.get("detail") or answer.get("outcome") or "")
    else:
        detail = (stderr.strip() or stdout.strip())[-_DETAIL_CHARS:]
    return outcome, detail or f"rolloutctl exited with {returncode}"


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class RolloutctlHandoff:
    """:class:`RolloutHandoff` through the local controller's inbox (``rolloutctl start``)."""

    via = "rolloutctl"

    def __init__(
        self,
        command: Sequence[str],
        *,
        timeout_s: float,
        state_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        runner: Runner = subprocess.run,
    ) -> None:
        self._command = tuple(command)
        self._timeout_s = timeout_s
        self._state_dir = state_dir
        self._env = dict(env) if env is not None else None
        self._run = runner

    def start(self, candidate: Candidate, *, request_id: str, reason: str) -> HandoffResult:
        argv = rolloutctl_argv(
            self._command,
            candidate,
            request_id=request_id,
            reason=reason,
            timeout_s=self._timeout_s,
            state_dir=self._state_dir,
        )
        try:
            done = self._run(
                argv,
                capture_output=True,
                text=True,
                timeout=self._timeout_s + SUBPROCESS_MARGIN_S,
                check=False,
                env=self._env,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError as exc:
            return self._result(HandoffOutcome.FAILED, request_id, f"cannot run {argv[0]}: {exc}")
        except subprocess.TimeoutExpired:
            return self._result(HandoffOutcome.UNAVAILABLE, request_id, f"rolloutctl did not return in time: {argv}")
        outcome, detail = rolloutctl_outcome(done.returncode, done.stdout, done.stderr)
        return self._result(outcome, request_id, detail, candidate=candidate.name, returncode=done.returncode)

    def _result(self, outcome: HandoffOutcome, request_id: str, detail: str, **fields: Any) -> HandoffResult:
        log_event(logger, "rollout hand-off", via=self.via, outcome=outcome.value, request_id=request_id, **fields)
        return HandoffResult(outcome, self.via, request_id, detail)


# ------------------------------------------------------------------------------------------------ Kubernetes


@dataclass(frozen=True)
class PatchPlan:
    """What the Kubernetes hand-off does to one ModelRollout: nothing (``outcome`` says why) or ``patch``."""

    outcome: HandoffOutcome
    detail: str
    patch: dict[str, Any] | None = None


def plan_candidate_patch(
    rollout: Mapping[str, Any], candidate: Candidate, settings: KubeHandoffSettings, *, request_id: str, reason: str
) -> PatchPlan:
    """The merge patch that makes ``candidate`` the desired version of ``rollout`` (a ModelRollout object), or
    why there is none: it already is (started), another candidate is progressing (refused), or no image is known."""
    spec: Mapping[str, Any] = rollout.get("spec") or {}
    status: Mapping[str, Any] = rollout.get("status") or {}
    current: Mapping[str, Any] = spec.get("candidate") or {}
    if current.get("version") == candidate.name:
        return PatchPlan(HandoffOutcome.STARTED, f"{candidate.name} already is the desired candidate")
    running = status.get("candidateVersion")
    if status.get("phase") == _PROGRESSING and running not in (None, "", candidate.name):
        return PatchPlan(HandoffOutcome.REFUSED, f"a rollout of {running} is in progress")
    wanted = current.get("version")
    if wanted and status.get("phase") != _PROGRESSING and wanted not in _versions_seen(spec, status):
        return PatchPlan(HandoffOutcome.REFUSED, f"spec.candidate {wanted} waits for the controller to roll it out")
    stable: Mapping[str, Any] = spec.get("stable") or {}
    image = settings.image or current.get("image") or stable.get("image")
    if not image:
        return PatchPlan(HandoffOutcome.FAILED, "no model-server image: set FW_RETRAIN__KUBE__IMAGE")
    uri = settings.model_uri_template.format(model=candidate.model, number=candidate.number)
    metadata: dict[str, Any] = {"annotations": {ANNOTATION_REQUEST: request_id, ANNOTATION_REASON: reason[:256]}}
    version = (rollout.get("metadata") or {}).get("resourceVersion")
    if version:
        metadata["resourceVersion"] = version
    patch = {
        "metadata": metadata,
        # registryAlias: null removes it (at most one model source; a moving alias would change what a restarted
        # pod of this version loads)
        "spec": {"candidate": {"version": candidate.name, "image": image, "modelUri": uri, "registryAlias": None}},
    }
    return PatchPlan(HandoffOutcome.STARTED, f"spec.candidate → {candidate.name} ({uri})", patch)


def _versions_seen(spec: Mapping[str, Any], status: Mapping[str, Any]) -> set[Any]:
    """The versions the controller has acted on: the stable and the last rollout's candidate it recorded (before it
    recorded anything, ``spec.stable``). A ``spec.candidate`` outside them is a change still waiting to start —
    someone's ``helm upgrade`` that this hand-off must not overwrite."""
    if status.get("stableVersion"):
        return {status.get("stableVersion"), status.get("candidateVersion")}
    return {(spec.get("stable") or {}).get("version")}


class ModelRolloutPatchHandoff:
    """:class:`RolloutHandoff` on Kubernetes: a merge patch of the ModelRollout's ``spec.candidate``."""

    via = "kube"

    def __init__(self, settings: KubeHandoffSettings, api: Any | None = None) -> None:
        if not settings.rollout_name:
            raise ValueError("FW_RETRAIN__KUBE__ROLLOUT_NAME is not set")
        self._settings = settings
        self._api = api

    def _custom_objects(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            if self._settings.kubeconfig is not None:
                api_client = config.new_client_from_config(config_file=str(self._settings.kubeconfig))
            else:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()
                api_client = client.ApiClient()
            self._api = client.CustomObjectsApi(api_client)
        return self._api

    def _address(self) -> dict[str, str]:
        s = self._settings
        return {
            "group": MODELROLLOUT_GROUP,
            "version": MODELROLLOUT_VERSION,
            "namespace": s.namespace,
            "plural": MODELROLLOUT_PLURAL,
            "name": s.rollout_name,
        }

    def start(self, candidate: Candidate, *, request_id: str, reason: str) -> HandoffResult:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        where = f"modelrollout {self._settings.namespace}/{self._settings.rollout_name}"
        api = self._custom_objects()
        timeout = self._settings.request_timeout_s
        try:
            for _ in range(2):  # one retry when someone else wrote the object between our read and our patch
                current = api.get_namespaced_custom_object(**self._address(), _request_timeout=timeout)
                plan = plan_candidate_patch(current, candidate, self._settings, request_id=request_id, reason=reason)
                if plan.patch is None:
                    return self._result(plan.outcome, request_id, plan.detail, where)
                try:
                    api.patch_namespaced_custom_object(**self._address(), body=plan.patch, _request_timeout=timeout)
                except ApiException as exc:
                    if exc.status == _HTTP_CONFLICT:
                        continue
                    raise
                return self._result(plan.outcome, request_id, plan.detail, where)
            return self._result(HandoffOutcome.UNAVAILABLE, request_id, "the object kept changing (409)", where)
        except ApiException as exc:
            outcome = kube_error_outcome(int(exc.status or 0))
            return self._result(outcome, request_id, f"{exc.status} {exc.reason}: {_short(exc.body)}", where)
        except (HTTPError, OSError) as exc:
            return self._result(HandoffOutcome.UNAVAILABLE, request_id, f"API server unreachable: {exc}", where)

    def _result(self, outcome: HandoffOutcome, request_id: str, detail: str, where: str) -> HandoffResult:
        log_event(logger, "rollout hand-off", via=self.via, outcome=outcome.value, request_id=request_id, target=where)
        return HandoffResult(outcome, self.via, request_id, f"{where}: {detail}")


def kube_error_outcome(status: int) -> HandoffOutcome:
    """An API error's outcome: the server's own trouble (5xx, throttling, no status) is unavailability; any other
    4xx (RBAC, no such ModelRollout, an object the CRD refuses) is a failure of the request retrying does not fix."""
    if status == 0 or status == _HTTP_TOO_MANY or status >= _HTTP_SERVER_ERROR:
        return HandoffOutcome.UNAVAILABLE
    return HandoffOutcome.FAILED


def _short(body: Any) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    return text[:_DETAIL_CHARS]


# ------------------------------------------------------------------------------------------------ choice


def handoff_for(settings: RetrainSettings) -> RolloutHandoff | None:
    """The configured hand-off (``FW_RETRAIN__HANDOFF``); None for ``none`` (register only)."""
    if settings.handoff == "none":
        return None
    if settings.handoff == "kube":
        return ModelRolloutPatchHandoff(settings.kube)
    return RolloutctlHandoff(
        settings.rolloutctl, timeout_s=settings.handoff_timeout_s, state_dir=settings.rollout_state_dir
    )
