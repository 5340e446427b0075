"""The ModelRollout custom resource as data, and the pure functions the Kubernetes backend is made of.

No I/O here (the other modules of rollout/backends/kube/ do the calls): reading the object (:class:`RolloutObject`),
the version specs it names, the commands its spec asks for (:func:`spec_commands`), the policy it carries merged over
the controller's (:func:`effective_policy`), the model-server Deployment and Service of a version built from the
chart's templates (:func:`build_workload`), a Deployment's readiness (:func:`deployment_readiness`), and the status
the controller writes (:func:`compose_status`: the durable state, the routing table and the summary people read).

The contract these implement is deploy/helm/fraudwatch/README.md ("The ModelRollout: who writes what", "Model
servers: the chart ⇄ controller contract").
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from rollout.backends.kube.api import API_VERSION, KIND
from rollout.core.analysis import GateResult
from rollout.core.commands import InboxCommand
from rollout.core.events import SUPERSEDE_PREFIX
from rollout.core.machine import ROLLED_BACK_PHASES, RolloutState, Transition, warm_until
from rollout.core.policy import RolloutPolicy, deep_merge, policy_from_mapping
from rollout.core.policy_fields import from_api_conventions
from rollout.core.routing import RoutingTable
from rollout.core.state import ControllerState, StateError, loads_state
from rollout.core.workloads import Readiness

Json = dict[str, Any]

FINALIZER: Final[str] = "fraudwatch.io/cleanup"
ROLLOUT_LABEL: Final[str] = "fraudwatch.io/rollout"
VERSION_LABEL: Final[str] = "fraudwatch.io/version"
APP_VERSION_LABEL: Final[str] = "app.kubernetes.io/version"
COMPONENT_LABEL: Final[str] = "app.kubernetes.io/component"
MODEL_SERVER: Final[str] = "model-server"
SPEC_HASH_ANNOTATION: Final[str] = "fraudwatch.io/spec-hash"
MODEL_URI_ANNOTATION: Final[str] = "fraudwatch.io/model-uri"
#: The ConfigMap keys of the chart's model-server contract (templates/model-server-configmap.yaml).
CONTRACT_VERSION: Final[str] = "1"
POD_TEMPLATE_KEY: Final[str] = "pod-template.yaml"
SERVICE_TEMPLATE_KEY: Final[str] = "service-template.yaml"
#: Optional keys: the spec of each version's HorizontalPodAutoscaler (autoscaling/v2; min/max replicas, metrics) and
#: PodDisruptionBudget (policy/v1; minAvailable or maxUnavailable), present when the chart's values enable them.
HPA_TEMPLATE_KEY: Final[str] = "hpa-template.yaml"
PDB_TEMPLATE_KEY: Final[str] = "pdb-template.yaml"
CONTAINER_KEY: Final[str] = "container-name"
#: The model server's settings the controller sets per version (service/settings.py: ServeSettings).
MODEL_ALIAS_ENV: Final[str] = "FW_SERVE__MODEL_ALIAS"
MODEL_URI_ENV: Final[str] = "FW_SERVE__MODEL_URI"
#: Ids of the commands the spec itself asks for (``spec.candidate``, ``spec.paused``) begin with these.
SPEC_PAUSE_PREFIX: Final[str] = "spec-pause-"
SPEC_RESUME_PREFIX: Final[str] = "spec-resume-"
STEADY: Final[str] = "Steady"
STABLE_STAGE: Final[str] = "stable"
_MAX_NAME: Final[int] = 63
_HASH_CHARS: Final[int] = 8
_MAX_ID: Final[int] = 128
_MAX_MESSAGE: Final[int] = 1024
_DNS_LABEL: Final[re.Pattern[str]] = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NOT_DNS: Final[re.Pattern[str]] = re.compile(r"[^-a-z0-9]+")
_NOT_ID: Final[re.Pattern[str]] = re.compile(r"[^A-Za-z0-9._:-]+")


class ContractError(ValueError):
    """The chart's model-server ConfigMap does not hold what the controller needs."""


# --------------------------------------------------------------------------------------------------- the object


class VersionSpec(BaseModel):
    """One model version as the ModelRollout names it (``spec.stable``, ``spec.candidate``, ``status.stable`` …)."""

    model_config = ConfigDict(frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True)

    version: str
    image: str
    image_pull_policy: str | None = None
    model_uri: str | None = None
    registry_alias: str | None = None
    replicas: int | None = None
    resources: dict[str, Any] | None = None

    def as_json(self) -> Json:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _version_spec(value: object) -> VersionSpec | None:
    if not isinstance(value, dict):
        return None
    try:
        return VersionSpec.model_validate(value)
    except ValidationError:
        return None


@dataclass(frozen=True)
class RolloutObject:
    """A read-only view of one ModelRollout as the API server returned it."""

    raw: Json

    @property
    def metadata(self) -> Json:
        value = self.raw.get("metadata", {})
        return value if isinstance(value, dict) else {}

    @property
    def spec(self) -> Json:
        value = self.raw.get("spec", {})
        return value if isinstance(value, dict) else {}

    @property
    def status(self) -> Json:
        value = self.raw.get("status", {})
        return value if isinstance(value, dict) else {}

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))

    @property
    def uid(self) -> str:
        return str(self.metadata.get("uid", ""))

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation", 0))

    @property
    def resource_version(self) -> str:
        return str(self.metadata.get("resourceVersion", ""))

    @property
    def deleting(self) -> bool:
        return bool(self.metadata.get("deletionTimestamp"))

    @property
    def finalizers(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.metadata.get("finalizers", []) or [])

    @property
    def spec_stable(self) -> VersionSpec | None:
        return _version_spec(self.spec.get("stable"))

    @property
    def spec_candidate(self) -> VersionSpec | None:
        return _version_spec(self.spec.get("candidate"))

    @property
    def seed_stable(self) -> str | None:
        """The stable version before any rollout: ``status.stableVersion`` once the controller recorded one (it is
        authoritative afterwards), else ``spec.stable`` (the seed of the first install)."""
        recorded = self.status.get("stableVersion")
        if recorded:
            return str(recorded)
        return self.spec_stable.version if self.spec_stable is not None else None

    @property
    def paused(self) -> bool:
        return bool(self.spec.get("paused", False))

    @property
    def manual_command(self) -> Json | None:
        value = self.spec.get("manualCommand")
        return value if isinstance(value, dict) else None

    @property
    def policy(self) -> Json | None:
        value = self.spec.get("policy")
        return value if isinstance(value, dict) else None

    @property
    def routing_salt(self) -> str | None:
        value = self.spec.get("routingSalt")
        return str(value) if value else None

    def known_versions(self) -> dict[str, VersionSpec]:
        """Every version spec the object names. A version recorded in the status (when it was first used) keeps
        that spec: a version name is immutable once it runs (a changed image needs a new version name)."""
        found: dict[str, VersionSpec] = {}
        recorded = self.status.get("revisionVersions")
        sources = (
            self.status.get("stable"),
            self.status.get("candidate"),
            self.status.get("previous"),
            self.spec.get("stable"),
            self.spec.get("candidate"),
            *(recorded if isinstance(recorded, list) else ()),
        )
        for raw in sources:
            spec = _version_spec(raw)
            if spec is not None:
                found.setdefault(spec.version, spec)
        return found

    def owner_reference(self) -> Json:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def involved_object(self) -> Json:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "resourceVersion": self.resource_version,
        }

    def controller_state(self) -> ControllerState | None:
        """The durable state in ``status.state`` (None before the controller first wrote it)."""
        return state_of(self.status)


def serving_version(state: ControllerState | None, seed: str | None) -> str | None:
    """The version serving as stable: the last rollout's outcome, else the seed (:attr:`RolloutObject.seed_stable`)."""
    rollout = state.rollout if state is not None else None
    if rollout is None:
        return seed
    return rollout.candidate if rollout.phase == "Promoted" else rollout.stable


# --------------------------------------------------------------------------------------------------- commands


def _id_part(text: str) -> str:
    return _NOT_ID.sub("-", text).strip("-.:") or "x"


def manual_from_spec(raw: Mapping[str, Any], now: datetime) -> InboxCommand | str:
    """``spec.manualCommand`` as the controller's command, or the reason it cannot be one."""
    data = {
        "id": raw.get("id"),
        "kind": raw.get("kind"),
        "issued_at": raw.get("requestedAt") or now,
        "issued_by": raw.get("requestedBy") or "",
        "reason": raw.get("reason") or "",
        "to": raw.get("to"),
    }
    try:
        command = InboxCommand.model_validate(data)
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    if command.kind == "start":
        return "kind: start is not a manual command (a rollout starts when spec.candidate changes)"
    return command


def spec_commands(obj: RolloutObject, state: ControllerState, now: datetime) -> list[InboxCommand | str]:
    """What the spec asks for, in the order it is applied: the one-shot ``manualCommand``; an abort of the running
    rollout when ``spec.candidate`` names another version (a newer build, or the stable again after a
    ``helm rollback``: the latest spec wins, as Argo Rollouts does); a new rollout when ``spec.candidate`` differs
    from the serving version (unless the current rollout already ended with it); a pause or resume that follows
    ``spec.paused``. Commands already applied are left to the controller to skip (their ids are in the state's
    command results)."""
    found: list[InboxCommand | str] = []
    manual = obj.manual_command
    if manual is not None:
        found.append(manual_from_spec(manual, now))
    rollout = state.rollout
    serving = serving_version(state, obj.seed_stable)
    candidate = obj.spec_candidate
    progressing = rollout is not None and rollout.phase == "Progressing"
    if rollout is not None and progressing and candidate is not None and candidate.version != rollout.candidate:
        found.append(_supersede(obj, rollout, candidate.version, now))
        return found
    if candidate is not None and serving is not None and candidate.version != serving and not progressing:
        ended_with_it = rollout is not None and rollout.candidate == candidate.version
        if not ended_with_it:
            command_id = spec_start_id(candidate.version, obj.generation)
            found.append(
                InboxCommand(
                    id=command_id,
                    kind="start",
                    issued_at=now,
                    issued_by="spec.candidate",
                    candidate=candidate.version,
                    reason=f"spec.candidate is {candidate.version}, {serving} serves",
                )
            )
    if rollout is not None and rollout.phase == "Progressing":
        found.extend(_pause_commands(obj, rollout, now))
    return found


def _supersede(obj: RolloutObject, rollout: RolloutState, wanted: str, now: datetime) -> InboxCommand:
    """The abort of ``rollout`` because ``spec.candidate`` is now ``wanted``; the rollout of ``wanted`` (if it is
    not the stable) starts at the next reconcile, once this one has ended."""
    why = "the stable again" if wanted == rollout.stable else "the new candidate"
    return InboxCommand(
        id=f"{SUPERSEDE_PREFIX}{_id_part(rollout.rollout_id)}-g{obj.generation}"[:_MAX_ID],
        kind="abort",
        issued_at=now,
        issued_by="spec.candidate",
        reason=f"superseded: spec.candidate is {wanted} ({why}), not {rollout.candidate}",
    )


def _pause_commands(obj: RolloutObject, rollout: RolloutState, now: datetime) -> list[InboxCommand | str]:
    suffix = f"{_id_part(rollout.rollout_id)}-g{obj.generation}"
    if obj.paused and not rollout.paused:
        command_id = f"{SPEC_PAUSE_PREFIX}{suffix}"[:_MAX_ID]
        return [InboxCommand(id=command_id, kind="pause", issued_at=now, issued_by="spec.paused", reason="spec.paused")]
    last_pause = next((t for t in reversed(rollout.history) if t.paused and t.trigger == "command"), None)
    paused_by_spec = last_pause is not None and (last_pause.command_id or "").startswith(SPEC_PAUSE_PREFIX)
    if not obj.paused and rollout.paused and paused_by_spec:
        command_id = f"{SPEC_RESUME_PREFIX}{suffix}"[:_MAX_ID]
        return [
            InboxCommand(id=command_id, kind="resume", issued_at=now, issued_by="spec.paused", reason="spec.paused")
        ]
    return []


# --------------------------------------------------------------------------------------------------- the policy


def effective_policy(base: RolloutPolicy, override: Mapping[str, Any] | None) -> RolloutPolicy:
    """The ModelRollout's ``spec.policy`` (camelCase with duration strings, or the deprecated snake_case ``*_s``
    form: rollout/core/policy_fields.py) deep-merged over the controller's policy (``ValueError`` when invalid)."""
    if not override:
        return base
    converted = from_api_conventions(override).mapping
    return policy_from_mapping(deep_merge(base.model_dump(mode="json"), converted))


#: The start of the note (Kubernetes Event ``DeprecatedPolicyFields``, a warning log line) naming the snake_case fields.
DEPRECATED_POLICY_NOTE: Final[str] = "spec.policy uses deprecated snake_case fields"


def deprecated_policy_fields(override: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The fields of ``spec.policy`` written in the deprecated snake_case form (empty when none, or when invalid:
    :func:`effective_policy` reports that)."""
    if not override:
        return ()
    try:
        return from_api_conventions(override).deprecated
    except ValueError:
        return ()


# --------------------------------------------------------------------------------------------------- workloads


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_CHARS]


def workload_name(rollout: str, version: str) -> str:
    """The Deployment's and the Service's name of a version: ``<rollout>-<version>`` when that is a DNS-1035 label
    (a Service needs one), else a shortened, sanitised form with a hash of the version (still unique)."""
    plain = f"{rollout}-{version}"
    if len(plain) <= _MAX_NAME and _DNS_LABEL.match(plain):
        return plain
    base = _NOT_DNS.sub("-", plain.lower()).strip("-")
    if not base or not base[0].isalpha():
        base = f"m-{base}"
    suffix = short_hash(version)
    return f"{base[: _MAX_NAME - _HASH_CHARS - 1].rstrip('-')}-{suffix}"


@dataclass(frozen=True)
class Templates:
    """The chart's model-server templates (ConfigMap ``<fullname>-model-server``)."""

    pod: Json
    service: Json
    container: str
    #: The spec of each version's HorizontalPodAutoscaler / PodDisruptionBudget, when the chart enables them.
    hpa: Json | None = None
    pdb: Json | None = None

    @classmethod
    def from_configmap(cls, configmap: Mapping[str, Any]) -> Templates:
        data = configmap.get("data") or {}
        version = str(data.get("contract-version", ""))
        if version != CONTRACT_VERSION:
            raise ContractError(f"model-server contract version {version!r} (this controller reads {CONTRACT_VERSION})")
        try:
            pod = yaml.safe_load(data[POD_TEMPLATE_KEY])
            service = yaml.safe_load(data[SERVICE_TEMPLATE_KEY])
            container = str(data[CONTAINER_KEY])
        except (KeyError, yaml.YAMLError) as exc:
            raise ContractError(f"model-server ConfigMap incomplete: {exc}") from exc
        if not isinstance(pod, dict) or not isinstance(service, dict):
            raise ContractError("model-server templates must be YAML mappings")
        containers = pod.get("spec", {}).get("containers", [])
        if not any(c.get("name") == container for c in containers):
            raise ContractError(f"the pod template has no container {container!r}")
        return cls(
            pod, service, container, _optional_spec(data, HPA_TEMPLATE_KEY), _optional_spec(data, PDB_TEMPLATE_KEY)
        )


def _optional_spec(data: Mapping[str, Any], key: str) -> Json | None:
    text = data.get(key)
    if text is None:
        return None
    try:
        spec = yaml.safe_load(str(text))
    except yaml.YAMLError as exc:
        raise ContractError(f"model-server ConfigMap {key}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ContractError(f"model-server ConfigMap {key} must be a YAML mapping")
    return spec


def selector_labels(rollout: str, version: str) -> dict[str, str]:
    return {COMPONENT_LABEL: MODEL_SERVER, ROLLOUT_LABEL: rollout, VERSION_LABEL: version}


def spec_hash(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()[:16]


def _version_env(spec: VersionSpec) -> list[Json]:
    if spec.registry_alias:
        return [{"name": MODEL_ALIAS_ENV, "value": spec.registry_alias}]
    if spec.model_uri:
        return [{"name": MODEL_URI_ENV, "value": spec.model_uri}]
    return []


def build_workload(templates: Templates, obj: RolloutObject, spec: VersionSpec) -> tuple[Json, Json]:
    """The Deployment and the Service of one version: the chart's templates with the version filled in, labelled
    for the rollout and the version, owned by the ModelRollout, with a hash of themselves (changed → re-applied)."""
    name = workload_name(obj.name, spec.version)
    extra = {**selector_labels(obj.name, spec.version), APP_VERSION_LABEL: spec.version}
    pod = copy.deepcopy(templates.pod)
    pod_meta = pod.setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **extra}
    if spec.model_uri:
        pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), MODEL_URI_ANNOTATION: spec.model_uri}
    container = next(c for c in pod["spec"]["containers"] if c.get("name") == templates.container)
    container["image"] = spec.image
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.resources:
        container["resources"] = copy.deepcopy(spec.resources)
    container["env"] = [e for e in container.get("env", []) if e.get("name") not in (MODEL_ALIAS_ENV, MODEL_URI_ENV)]
    container["env"] += _version_env(spec)
    labels = {**(templates.service.get("metadata", {}).get("labels") or {}), **extra}
    meta = {"name": name, "namespace": obj.namespace, "labels": labels, "ownerReferences": [obj.owner_reference()]}
    deployment: Json = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": copy.deepcopy(meta),
        "spec": {
            "replicas": spec.replicas if spec.replicas is not None else 1,
            "selector": {"matchLabels": selector_labels(obj.name, spec.version)},
            "template": pod,
        },
    }
    if templates.hpa is not None:  # the HPA owns the replica count (an applied one would fight it)
        del deployment["spec"]["replicas"]
    service: Json = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": copy.deepcopy(meta),
        "spec": {
            **copy.deepcopy(templates.service.get("spec", {})),
            "selector": selector_labels(obj.name, spec.version),
        },
    }
    for manifest in (deployment, service):
        manifest["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash(manifest)}
    return deployment, service


def build_scaling(templates: Templates, obj: RolloutObject, spec: VersionSpec) -> tuple[Json, ...]:
    """The version's HorizontalPodAutoscaler (scaling its Deployment on CPU) and PodDisruptionBudget (over its pods),
    each when the chart's templates have one; owned by the ModelRollout, named and labelled like the Deployment."""
    name = workload_name(obj.name, spec.version)
    labels = {**selector_labels(obj.name, spec.version), APP_VERSION_LABEL: spec.version}
    meta = {"name": name, "namespace": obj.namespace, "labels": labels, "ownerReferences": [obj.owner_reference()]}
    manifests: list[Json] = []
    if templates.hpa is not None:
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        manifests.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                          "metadata": copy.deepcopy(meta),
                          "spec": {**copy.deepcopy(templates.hpa), "scaleTargetRef": target}})  # fmt: skip
    if templates.pdb is not None:
        selector = {"matchLabels": selector_labels(obj.name, spec.version)}
        manifests.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": copy.deepcopy(meta),
                          "spec": {**copy.deepcopy(templates.pdb), "selector": selector}})  # fmt: skip
    for manifest in manifests:
        manifest["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash(manifest)}
    return tuple(manifests)


#: Where each scaling kind is applied: its API group/version and plural.
SCALING_KINDS: Final[dict[str, tuple[str, str]]] = {
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
}


def annotation(obj: Mapping[str, Any], key: str) -> str | None:
    value = (obj.get("metadata", {}).get("annotations") or {}).get(key)
    return str(value) if value is not None else None


def service_port(service: Mapping[str, Any]) -> int:
    ports = service.get("spec", {}).get("ports") or []
    return int(ports[0]["port"]) if ports else 80


def deployment_readiness(deployment: Mapping[str, Any]) -> tuple[Readiness, str]:
    """Ready once the Deployment's controller has seen its latest spec and every wanted replica is updated and
    available with no old one left (what ``kubectl rollout status`` waits for); Failed past its progress deadline
    or while its pods cannot be created (e.g. the template's ServiceAccount is missing)."""
    if deployment.get("metadata", {}).get("deletionTimestamp"):
        return Readiness.STOPPED, "being deleted"
    spec, status = deployment.get("spec", {}), deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return Readiness.FAILED, str(condition.get("message", "progress deadline exceeded"))
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return Readiness.FAILED, str(condition.get("message", "pods cannot be created"))
    observed = int(status.get("observedGeneration", 0)) >= int(deployment.get("metadata", {}).get("generation", 1))
    updated = int(status.get("updatedReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    total = int(status.get("replicas", 0))
    if observed and updated >= wanted and available >= wanted and total <= updated:
        return Readiness.READY, f"{available}/{wanted} available"
    return Readiness.STARTING, f"{available}/{wanted} available, {updated} updated"


#: Container waiting reasons that mean the pod cannot run its model server (reported as the workload's detail).
TROUBLE_REASONS: Final[frozenset[str]] = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "CreateContainerError",
     "InvalidImageName", "RunContainerError"}
)  # fmt: skip


def _container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def pod_restarts(pods: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The container restarts of each pod (by uid): what the kubelet counted for its containers and init containers."""
    return {
        str(pod.get("metadata", {}).get("uid") or pod.get("metadata", {}).get("name")): sum(
            int(c.get("restartCount") or 0) for c in _container_statuses(pod)
        )
        for pod in pods
    }


def pod_trouble(pods: Sequence[Mapping[str, Any]]) -> str:
    """Why a pod cannot run (``pod x: CrashLoopBackOff (…)``), from its containers' waiting states; "" if none."""
    for pod in pods:
        for container in _container_statuses(pod):
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = str(waiting.get("reason") or "")
            if reason in TROUBLE_REASONS:
                message = str(waiting.get("message") or "").strip()
                name = pod.get("metadata", {}).get("name", "?")
                return f"pod {name}: {reason}" + (f" ({message[:200]})" if message else "")
    return ""


# --------------------------------------------------------------------------------------------------- the status


ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class StatusInputs:
    """Everything the status is composed of, besides the object itself."""

    state: ControllerState | None
    routing: RoutingTable | None
    policy: RolloutPolicy
    now: datetime
    kept_history: int
    #: Why the world is not yet as the state wants it (routing waits for a workload, an action failed, …).
    problems: tuple[str, ...] = ()
    #: The stable's workload is ready and the routers' table is published.
    available: bool = False


def compose_status(obj: RolloutObject, inputs: StatusInputs) -> Json:
    """The whole ``status`` of the ModelRollout (every field the CRD's schema keeps; nothing it would prune)."""
    state, rollout = inputs.state, inputs.state.rollout if inputs.state is not None else None
    known = obj.known_versions()
    stable = serving_version(state, obj.seed_stable)
    status: Json = {"observedGeneration": obj.generation}
    if rollout is None:
        status |= {"phase": STEADY, "stage": STABLE_STAGE, "paused": False, "stableWeight": 100, "candidateWeight": 0}
        status["message"] = f"{stable} serves" if stable else "no stable version"
    else:
        progressing = rollout.phase == "Progressing"
        status |= {
            "phase": rollout.phase,
            "stage": rollout.stage,
            "stageEnteredAt": _time(rollout.stage_entered_at),
            "paused": rollout.paused,
            "candidateVersion": rollout.candidate,
            "stableWeight": rollout.weights.stable if progressing else 100,
            "candidateWeight": rollout.weights.candidate if progressing else 0,
            "message": rollout.history[-1].reason if rollout.history else f"rollout {rollout.rollout_id} started",
        }
        if rollout.candidate in known:
            status["candidate"] = known[rollout.candidate].as_json()
        until = warm_until(inputs.policy, rollout) if rollout.phase == "Promoted" else None
        if until is not None and inputs.now < until and rollout.stable in known:
            status["previous"] = known[rollout.stable].as_json()
            status["warmUntil"] = _time(until)
    if inputs.problems:
        status["message"] = "; ".join(inputs.problems)[:_MAX_MESSAGE]
    if stable is not None:
        status["stableVersion"] = stable
        if stable in known:
            status["stable"] = known[stable].as_json()
    if inputs.routing is not None:
        status["routing"] = inputs.routing.model_dump(mode="json", exclude_none=True)
        status["routingGeneration"] = inputs.routing.generation
    if state is not None:
        status["state"] = state.model_dump(mode="json")
        status["revisionVersions"] = revision_versions(known, state)
    status["gates"] = gate_rows(rollout)
    status["conditions"] = conditions(obj, inputs)
    status["history"] = history_rows(obj.status.get("history"), rollout, inputs.kept_history)
    return status


def revision_versions(known: Mapping[str, VersionSpec], state: ControllerState) -> list[Json]:
    """The spec of each version of the kept revisions that the object still knows, oldest first, each once: what
    ``undo --to-revision N`` writes back into ``spec.candidate``."""
    versions = dict.fromkeys(r.version for r in state.revisions)
    return [known[v].as_json() for v in versions if v in known]


#: kubectl's annotation for why the object last changed (``kubectl rollout history`` shows it).
CHANGE_CAUSE_ANNOTATION: Final[str] = "kubernetes.io/change-cause"


def undo_patch(obj: RolloutObject, version: str, cause: str) -> Json | None:
    """The merge patch that rolls ``version`` out again: ``spec.candidate`` set to its recorded spec, the change's
    cause annotated, guarded by the object's resourceVersion (a concurrent change makes it fail, not be
    overwritten); None when the object no longer knows the version's spec."""
    spec = obj.known_versions().get(version)
    if spec is None:
        return None
    metadata = {"resourceVersion": obj.metadata.get("resourceVersion"), "annotations": {CHANGE_CAUSE_ANNOTATION: cause}}
    return {"metadata": metadata, "spec": {"candidate": spec.as_json()}}


def spec_start_id(version: str, generation: int) -> str:
    """The id of the start the controller derives from ``spec.candidate`` = ``version`` at ``generation``."""
    return f"{_id_part(version)}-g{generation}"[:_MAX_ID]


def _time(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def gate_row(result: GateResult, measured_at: datetime | None, consecutive_errors: int) -> Json:
    value = result.bound if result.bound is not None else result.candidate_value
    row: Json = {
        "name": result.name,
        "layer": result.layer,
        "result": result.status.value,
        "value": value,
        "stableValue": result.stable_value,
        "threshold": result.threshold,
        "labels": result.labels,
        "consecutiveErrors": consecutive_errors,
    }
    if result.condition:
        row["condition"] = result.condition
    if result.message:
        row["message"] = result.message[:_MAX_MESSAGE]
    if measured_at is not None:
        row["measuredAt"] = _time(measured_at)
    return row


def gate_rows(rollout: RolloutState | None) -> list[Json]:
    """The latest result of each gate of the current stage; for a finished rollout the results its last transition
    recorded (why it ended)."""
    if rollout is None:
        return []
    rows = [gate_row(h.last, h.last_at, h.consecutive_errors) for h in rollout.gates.values() if h.last is not None]
    if not rows and rollout.phase != "Progressing" and rollout.history:
        last = rollout.history[-1]
        rows = [gate_row(g, last.at, 0) for g in last.gates]
    return rows


def _condition(
    obj: RolloutObject, kind: str, status: ConditionStatus, reason: str, message: str, now: datetime
) -> Json:
    previous = next((c for c in obj.status.get("conditions") or [] if c.get("type") == kind), None)
    since = previous["lastTransitionTime"] if previous is not None and previous.get("status") == status else _time(now)
    return {
        "type": kind,
        "status": status,
        "observedGeneration": obj.generation,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message[:_MAX_MESSAGE],
    }


def conditions(obj: RolloutObject, inputs: StatusInputs) -> list[Json]:
    """metav1 Conditions: Progressing (a rollout runs), Available (the stable serves through published routing),
    Paused, and the ones GitOps tools read — Ready, Stalled, Reconciling (:func:`health_conditions`).
    ``lastTransitionTime`` changes only when a condition's status does."""
    rollout = inputs.state.rollout if inputs.state is not None else None
    now = inputs.now
    problems = "; ".join(inputs.problems)
    if rollout is None:
        progressing = _condition(obj, "Progressing", "False", "NoRollout", "no rollout", now)
    elif rollout.phase == "Progressing":
        progressing = _condition(obj, "Progressing", "True", "RolloutProgressing",
                                 f"rollout {rollout.rollout_id} at {rollout.stage}", now)  # fmt: skip
    else:
        reason = rollout.history[-1].reason if rollout.history else rollout.phase
        progressing = _condition(obj, "Progressing", "False", rollout.phase, reason, now)
    if inputs.available:
        available = _condition(obj, "Available", "True", "RoutingPublished", "the routers' table is published", now)
    else:
        available = _condition(obj, "Available", "False", "WaitingForWorkloads", problems or "not ready yet", now)
    paused = rollout is not None and rollout.paused
    pause = _condition(obj, "Paused", "True" if paused else "False", "Paused" if paused else "NotPaused",
                       "automatic promotion is held" if paused else "", now)  # fmt: skip
    desired = obj.spec_candidate.version if obj.spec_candidate is not None else None
    health = [
        _condition(obj, kind, status, reason, message, now)
        for kind, status, reason, message in health_conditions(rollout, inputs.available, desired, problems)
    ]
    return [progressing, available, pause, *health]


ConditionRow = tuple[str, ConditionStatus, str, str]


def health_conditions(
    rollout: RolloutState | None, available: bool, desired: str | None, problems: str
) -> tuple[ConditionRow, ConditionRow, ConditionRow]:
    """Ready, Stalled and Reconciling as kstatus, Argo CD and Flux read them (abnormal-true Stalled/Reconciling):

    * Reconciling=True while a rollout is Progressing;
    * Stalled=True (reason RolledBack or Aborted, the message why) once the rollout of the version ``spec.candidate``
      still asks for ended without promoting it: nothing moves until the spec changes;
    * Ready=True when neither holds and the stable serves through published routing (reason Promoted after a
      promotion, StableServing otherwise - before any rollout, or after spec.candidate went back to the stable).
    """
    settled: ConditionRow = ("Reconciling", "False", "Settled", "")
    not_stalled: ConditionRow = ("Stalled", "False", "NotStalled", "")
    if rollout is not None and rollout.phase == "Progressing":
        at = f"{rollout.candidate} is at {rollout.stage}"
        return (
            ("Ready", "False", "RolloutProgressing", at),
            not_stalled,
            ("Reconciling", "True", "RolloutProgressing", at),
        )
    if rollout is not None and rollout.phase in ROLLED_BACK_PHASES and rollout.candidate == desired:
        why = f"{rollout.candidate} was not promoted: {rollout.history[-1].reason if rollout.history else problems}"
        return ("Ready", "False", rollout.phase, why), ("Stalled", "True", rollout.phase, why), settled
    if not available:
        return ("Ready", "False", "WaitingForWorkloads", problems or "not ready yet"), not_stalled, settled
    if rollout is not None and rollout.phase == "Promoted":
        return ("Ready", "True", "Promoted", f"{rollout.candidate} was promoted and serves"), not_stalled, settled
    return ("Ready", "True", "StableServing", "the stable version serves"), not_stalled, settled


def transition_row(rollout: RolloutState, seq: int, transition: Transition) -> Json:
    row: Json = {
        "at": _time(transition.at),
        "rolloutId": rollout.rollout_id,
        "seq": seq,
        "trigger": transition.trigger,
        "fromPhase": transition.from_phase,
        "toPhase": transition.to_phase,
        "fromStage": transition.from_stage,
        "toStage": transition.to_stage,
        "stableVersion": rollout.stable,
        "candidateVersion": rollout.candidate,
        "reason": transition.reason[:_MAX_MESSAGE],
    }
    if transition.command_id:
        row["commandId"] = transition.command_id
    return row


def history_rows(previous: object, rollout: RolloutState | None, kept: int) -> list[Json]:
    """The latest ``kept`` transitions across rollouts: earlier rollouts' rows as the status holds them, then the
    current rollout's (from its state, so none is lost or doubled)."""
    rows = [r for r in previous if isinstance(r, dict)] if isinstance(previous, list) else []
    if rollout is not None:
        rows = [r for r in rows if r.get("rolloutId") != rollout.rollout_id]
        rows += [transition_row(rollout, i, t) for i, t in enumerate(rollout.history)]
    return rows[-kept:]


def state_of(status: Mapping[str, Any]) -> ControllerState | None:
    """``status.state`` parsed (None when absent); :class:`~rollout.core.state.StateError` when it cannot be used."""
    raw = status.get("state")
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise StateError(f"status.state must be an object, not {type(raw).__name__}")
    return loads_state(json.dumps(raw))


def routing_of(status: Mapping[str, Any]) -> RoutingTable | None:
    """``status.routing`` parsed (None when absent or invalid)."""
    raw = status.get("routing")
    if not isinstance(raw, dict):
        return None
    try:
        return RoutingTable.model_validate(raw)
    except ValidationError:
        return None


#: The label an EndpointSlice carries with the name of its Service.
SERVICE_NAME_LABEL: Final[str] = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class RouterEndpoint:
    """One router replica behind the router control Service: its pod (or address) and where its control port is."""

    name: str
    address: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def router_endpoints(slices: Sequence[Mapping[str, Any]], port_name: str) -> list[RouterEndpoint]:
    """The router replicas that may route right now, from the control Service's EndpointSlices: every endpoint
    that is serving (ready, or terminating but still draining its requests — its shadow calls too), one per pod.
    A condition left out counts as true (the API's convention)."""
    found: dict[str, RouterEndpoint] = {}
    for piece in slices:
        port = next((p.get("port") for p in piece.get("ports") or [] if p.get("name") == port_name), None)
        if not isinstance(port, int):
            continue
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            serving = conditions.get("serving", conditions.get("ready", True))
            addresses = endpoint.get("addresses") or []
            if serving is False or not addresses:
                continue
            name = str((endpoint.get("targetRef") or {}).get("name") or addresses[0])
            found.setdefault(name, RouterEndpoint(name, str(addresses[0]), port))
    return sorted(found.values(), key=lambda e: e.name)


def event_reason(transition: Transition) -> tuple[str, Literal["Normal", "Warning"]]:
    """A Kubernetes Event's reason (CamelCase) and type for a transition."""
    if transition.to_phase != transition.from_phase:
        warning = transition.to_phase in ("RolledBack", "Aborted")
        return transition.to_phase, "Warning" if warning else "Normal"
    if transition.to_stage != transition.from_stage:
        return "StageEntered", "Normal"
    return ("Paused" if transition.paused else "Resumed"), "Normal"


def note_reason(text: str) -> str:
    if "ignored" in text:
        return "CommandIgnored"
    if text.startswith("command ") and " failed: " in text:
        return "CommandFailed"
    if "discarded" in text:
        return "CommandDiscarded"
    if "started" in text:
        return "RolloutStarted"
    if text.startswith(DEPRECATED_POLICY_NOTE):
        return "DeprecatedPolicyFields"
    return "Note"


def event_name(rollout: str, *parts: str) -> str:
    """A deterministic Event name (creating it twice is a 409, so each transition is recorded once)."""
    tail = ".".join(_NOT_DNS.sub("-", p.lower()).strip("-") or "x" for p in parts)
    name = f"{rollout}.{tail}"
    if len(name) > 253 - 9:
        name = f"{name[:200]}.{short_hash(name)}"
    return name


def versions_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        str(r["metadata"]["labels"][VERSION_LABEL]) for r in rows if VERSION_LABEL in r["metadata"].get("labels", {})
    ]
