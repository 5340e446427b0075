"""Where ``rolloutctl`` reads and sends: the controller's state directory (``--backend local``) or the ModelRollout
through the kubeconfig (``--backend kube``), behind one small protocol."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rollout.backends.local.inbox import (
    EVENTS_FILE,
    STATE_FILE,
    CommandInbox,
    Heartbeat,
    read_command_result,
    read_heartbeat,
)
from rollout.cli.errors import CliError, ExitCode
from rollout.core.commands import CommandResult, InboxCommand
from rollout.settings import ControllerSettings, RolloutSettings

if TYPE_CHECKING:
    from rollout.backends.kube.http import KubeCalls
    from rollout.core.policy import RolloutPolicy
    from rollout.core.state import ControllerState


@dataclass(frozen=True)
class Snapshot:
    """What ``status`` shows: the state (None before the first rollout), the controller's heartbeat, the policy."""

    state: ControllerState | None
    heartbeat: Heartbeat | None
    policy: RolloutPolicy
    #: The controller has seen the latest desired state (kube: ``status.observedGeneration`` is the object's
    #: generation; local: no command waits in the inbox): only then does ``status --watch`` trust a final phase.
    observed: bool = True


class RolloutClient(Protocol):
    """A backend's view of one rollout, as the CLI needs it."""

    name: str

    def rollout_exists(self) -> bool: ...

    def submit(self, command: InboxCommand) -> str:
        """Queue ``command``; the id its result will carry."""
        ...

    def result(self, command_id: str) -> CommandResult | None: ...

    def withdraw(self, command_id: str) -> bool: ...

    def snapshot(self) -> Snapshot: ...

    def events(self) -> Iterator[dict[str, Any]]: ...

    def rollouts(self, all_namespaces: bool) -> list[dict[str, Any]]: ...


def summary_row(namespace: str | None, name: str, status: Mapping[str, Any], age_from: str | None) -> dict[str, Any]:
    """One row of ``list``: the ModelRollout's status summary fields (the CRD's printer columns) and the serving
    revision (number and bundle digest) from ``status.state.revisions``."""
    state = status.get("state")
    revisions = state.get("revisions") if isinstance(state, Mapping) else None
    serving = revisions[-1] if isinstance(revisions, list) and revisions and isinstance(revisions[-1], Mapping) else {}
    return {
        "namespace": namespace,
        "name": name,
        "phase": status.get("phase"),
        "stage": status.get("stage"),
        "paused": bool(status.get("paused")),
        "stable": status.get("stableVersion"),
        "candidate": status.get("candidateVersion"),
        "candidate_weight": status.get("candidateWeight"),
        "message": status.get("message"),
        "revision": serving.get("number"),
        "digest": serving.get("digest"),
        "created_at": age_from,
    }


class LocalClient:
    """The local backend: the controller's state directory."""

    def __init__(self, settings: ControllerSettings, state_dir: Path) -> None:
        self.name = settings.name
        self.settings = settings
        self.state_dir = state_dir
        self.inbox = CommandInbox(state_dir)

    def _raw_state(self) -> dict[str, Any] | None:
        try:
            raw = json.loads((self.state_dir / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise CliError(ExitCode.FAILURE, f"state file {self.state_dir / STATE_FILE} is not JSON: {exc}") from exc
        return raw if isinstance(raw, dict) else None

    def rollout_exists(self) -> bool:
        raw = self._raw_state()
        return raw is not None and raw.get("rollout") is not None

    def submit(self, command: InboxCommand) -> str:
        self.inbox.submit(command)
        return command.id

    def result(self, command_id: str) -> CommandResult | None:
        return read_command_result(self.state_dir, command_id)

    def withdraw(self, command_id: str) -> bool:
        return self.inbox.withdraw(command_id)

    def snapshot(self) -> Snapshot:
        from rollout.backends.local.state import StateStore
        from rollout.core.policy import load_policy
        from rollout.core.state import StateError

        try:
            state = StateStore(self.state_dir).load()
        except StateError as exc:
            raise CliError(ExitCode.FAILURE, str(exc)) from exc
        policy = load_policy(self.settings.policy_file)
        return Snapshot(state, read_heartbeat(self.state_dir), policy, observed=not self.inbox.has_pending())

    def events(self) -> Iterator[dict[str, Any]]:
        from rollout.backends.local.events import read_events

        return read_events(self.state_dir / EVENTS_FILE)

    def rollouts(self, all_namespaces: bool) -> list[dict[str, Any]]:
        """The one rollout this state directory holds (a local controller runs one), or none before the first."""
        state = self.snapshot().state
        rollout = state.rollout if state is not None else None
        if rollout is None:
            return []
        progressing = rollout.phase == "Progressing"
        revisions = [r.model_dump(mode="json") for r in (state.revisions if state is not None else ())]
        status = {"phase": rollout.phase, "stage": rollout.stage, "paused": rollout.paused,
                  "stableVersion": rollout.stable, "candidateVersion": rollout.candidate,
                  "candidateWeight": rollout.weights.candidate if progressing else 0,
                  "message": rollout.history[-1].reason if rollout.history else "",
                  "state": {"revisions": revisions}}  # fmt: skip
        started = state.rollout_started_at.isoformat() if state is not None and state.rollout_started_at else None
        return [summary_row(None, self.name, status, started)]


class KubeClient:
    """The Kubernetes backend: the ModelRollout ``name`` in ``namespace``; commands go to ``spec.manualCommand``."""

    def __init__(
        self,
        name: str,
        namespace: str | None,
        kubeconfig: Path | None,
        context: str | None,
        settings: ControllerSettings,
    ) -> None:
        from rollout.backends.kube.http import light_api

        self.name = name
        self.settings = settings
        ks = settings.kube
        configured = ks.namespace if "namespace" in ks.model_fields_set else None
        self.lease = ks.lease_name if "lease_name" in ks.model_fields_set else f"{name}-controller"
        # The standard-library client when the kubeconfig allows (a revert must not wait ~0.4 s for the official
        # client's import); the official client for exec plugins and the like.
        light = light_api(kubeconfig, context, ks.request_timeout_s)
        self.api: KubeCalls
        if light is not None:
            self.api, context_ns = light
        else:
            self.api, context_ns = self._official(kubeconfig, context, ks.request_timeout_s)
        self.namespace: str = namespace or configured or context_ns or "default"

    @staticmethod
    def _official(kubeconfig: Path | None, context: str | None, timeout_s: float) -> tuple[KubeCalls, str | None]:
        from rollout.backends.kube.api import KubeApi, KubeUnavailableError, context_namespace

        try:
            return KubeApi.connect(kubeconfig, context, timeout_s), context_namespace(kubeconfig, context)
        except KubeUnavailableError as exc:
            raise CliError(ExitCode.UNAVAILABLE, str(exc)) from exc

    def _call(self, what: Any) -> Any:
        from rollout.backends.kube.api import KubeError

        try:
            return what()
        except KubeError as exc:
            code = ExitCode.UNAVAILABLE if exc.status == 0 else ExitCode.FAILURE
            raise CliError(code, str(exc)) from exc

    def _path(self) -> str:
        from rollout.backends.kube.api import rollout_path

        return rollout_path(self.namespace, self.name)

    def _object(self) -> dict[str, Any]:
        obj = self._call(lambda: self.api.get(self._path()))
        if obj is None:
            raise CliError(ExitCode.NOT_FOUND, f"no ModelRollout {self.name!r} in namespace {self.namespace!r}")
        return dict(obj)

    def _state(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        state = (obj.get("status") or {}).get("state")
        return state if isinstance(state, dict) else {}

    def rollout_exists(self) -> bool:
        return self._state(self._object()).get("rollout") is not None

    def submit(self, command: InboxCommand) -> str:
        if command.kind == "start":
            return self._start(command)
        manual = {
            "id": command.id,
            "kind": command.kind,
            "reason": command.reason,
            "requestedBy": command.issued_by or None,
            "requestedAt": command.issued_at.isoformat().replace("+00:00", "Z"),
            "to": command.to,  # None removes a previous command's target (a merge patch merges objects)
        }
        self._call(lambda: self.api.merge_patch(self._path(), {"spec": {"manualCommand": manual}}))
        return command.id

    def _start(self, command: InboxCommand) -> str:
        """A rollout of a version the ModelRollout has run (a kept revision): ``spec.candidate`` set back to the
        spec it ran with, as Argo Rollouts' undo sets the pod template back; the controller starts it like any new
        candidate. The id of that start (the controller derives it from the new generation)."""
        from rollout.backends.kube.resource import RolloutObject, spec_start_id, undo_patch

        version = str(command.candidate)
        helm = f"helm upgrade … --reuse-values --set model.version={version} (with its image and model URI)"
        if command.stable is not None:
            raise CliError(ExitCode.USAGE, "on Kubernetes the stable is the serving version: leave out --stable")
        cause = f"{command.issued_by or 'someone'}: roll {version} out again" + (
            f" ({command.reason})" if command.reason else ""
        )
        patch = undo_patch(RolloutObject(self._object()), version, cause[:1024])
        if patch is None:
            raise CliError(ExitCode.REFUSED, f"ModelRollout {self.name} records no spec of {version}: {helm}")
        patched = self._call(lambda: self.api.merge_patch(self._path(), patch))
        return spec_start_id(version, RolloutObject(dict(patched)).generation)

    def result(self, command_id: str) -> CommandResult | None:
        for item in reversed(self._state(self._object()).get("command_results") or []):
            if isinstance(item, dict) and item.get("id") == command_id:
                return CommandResult.model_validate(item)
        return None

    def withdraw(self, command_id: str) -> bool:
        from rollout.backends.kube.api import KubeError

        test = {"op": "test", "path": "/spec/manualCommand/id", "value": command_id}
        try:
            self.api.json_patch(self._path(), [test, {"op": "remove", "path": "/spec/manualCommand"}])
        except KubeError:
            return False  # another command replaced it, or the controller's result is there already
        return True

    def snapshot(self) -> Snapshot:
        from rollout.backends.kube.resource import effective_policy
        from rollout.core.policy import load_policy
        from rollout.core.state import StateError, loads_state

        obj = self._object()
        raw = self._state(obj)
        try:
            state = loads_state(json.dumps(raw)) if raw else None
            policy = effective_policy(load_policy(self.settings.policy_file), (obj.get("spec") or {}).get("policy"))
        except (StateError, ValueError) as exc:
            raise CliError(ExitCode.FAILURE, f"ModelRollout {self.name}: {exc}") from exc
        observed = int((obj.get("status") or {}).get("observedGeneration") or 0) >= int(
            (obj.get("metadata") or {}).get("generation") or 0
        )
        return Snapshot(state, self._heartbeat(), policy, observed=observed)

    def _heartbeat(self) -> Heartbeat | None:
        """The controller's Lease as its heartbeat: the holder and its last renewal."""
        from rollout.backends.kube.api import KubeError, lease_path

        try:
            lease = self.api.get(lease_path(self.namespace, self.lease))
        except KubeError:
            return None  # no read access to Leases: shown as unknown
        spec = (lease or {}).get("spec") or {}
        if not spec.get("holderIdentity") or not spec.get("renewTime"):
            return None
        return Heartbeat(pid=0, name=self.name, backend="kube", started_at=spec.get("acquireTime") or spec["renewTime"],
                         heartbeat_at=spec["renewTime"], identity=spec["holderIdentity"])  # fmt: skip

    def events(self) -> Iterator[dict[str, Any]]:
        """The transitions in ``status.history`` (across rollouts, as many as the controller keeps)."""
        for row in (self._object().get("status") or {}).get("history") or []:
            yield {
                "kind": "transition",
                "at": row.get("at"),
                "rollout_id": row.get("rolloutId"),
                "from_phase": row.get("fromPhase"),
                "from_stage": row.get("fromStage"),
                "to_phase": row.get("toPhase"),
                "to_stage": row.get("toStage"),
                "trigger": row.get("trigger"),
                "reason": row.get("reason"),
                "command_id": row.get("commandId"),
            }

    def rollouts(self, all_namespaces: bool) -> list[dict[str, Any]]:
        """Every ModelRollout of the namespace (``-A``: of every namespace the caller may list)."""
        from rollout.backends.kube.api import GROUP, PLURAL, VERSION, rollout_path

        path = f"/apis/{GROUP}/{VERSION}/{PLURAL}" if all_namespaces else rollout_path(self.namespace)
        listed = self._call(lambda: self.api.get(path)) or {}
        rows = []
        for item in listed.get("items") or []:
            meta = item.get("metadata") or {}
            rows.append(summary_row(meta.get("namespace"), str(meta.get("name")), item.get("status") or {},
                                    meta.get("creationTimestamp")))  # fmt: skip
        return sorted(rows, key=lambda r: (r["namespace"] or "", r["name"]))


def client_for(args: argparse.Namespace, settings: RolloutSettings, *, plugin: bool) -> RolloutClient:
    """The backend's client: ``--backend``, else the kubectl plugin's ``kube`` (``local`` when a state directory
    or home is given), else ``FW_ROLLOUT_CONTROLLER__BACKEND``."""
    cs = settings.controller
    backend = args.backend
    if backend is None and plugin:
        backend = "local" if args.state_dir is not None or args.home is not None else "kube"
    if backend is None:
        backend = cs.backend
    if backend == "kube":
        name = getattr(args, "name", None) or cs.name
        return KubeClient(name, args.namespace, args.kubeconfig, args.context, cs)
    return LocalClient(cs, args.state_dir if args.state_dir is not None else cs.resolved_state_dir(settings.home))
