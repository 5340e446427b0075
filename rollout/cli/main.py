"""``rolloutctl`` (also the kubectl plugin ``kubectl-modelrollout``): start, watch and steer a model rollout.

Commands go to the controller's inbox and the CLI waits until the controller has applied them (``--no-wait`` to
only queue); ``status`` and ``history`` read the controller's state file and event log. The CLI never acts on
the world itself: the controller is the single writer of routing, workloads and aliases.

Backends: ``--backend local`` (rolloutctl's default; the controller's state directory on this machine) and
``--backend kube`` (the kubectl plugin's default; the ModelRollout custom resource NAME in ``-n NAMESPACE``, through
the kubeconfig: a command is a patch of ``spec.manualCommand`` the controller applies once per id, ``status`` reads
the object's status and the controller's Lease). The commands and their exit codes are the same. As
``kubectl modelrollout status|promote|abort|revert|… NAME`` every command takes the rollout's name.

Human output (rich) goes to stdout; ``--json`` prints one JSON document instead. The mutating commands import
nothing heavier than pydantic, so ``rolloutctl revert`` is queued within a fraction of a second of being typed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from rollout.backends.local.inbox import (
    EVENTS_FILE,
    STATE_FILE,
    CommandInbox,
    Heartbeat,
    heartbeat_age_s,
    read_command_result,
    read_heartbeat,
)
from rollout.core.commands import CommandResult, InboxCommand, InboxKind, new_command_id
from rollout.settings import ControllerSettings, RolloutSettings

if TYPE_CHECKING:
    from rollout.backends.kube.http import KubeCalls
    from rollout.core.analysis import AnalysisReport
    from rollout.core.machine import RolloutState
    from rollout.core.policy import RolloutPolicy
    from rollout.core.state import ControllerState


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    TIMEOUT = 5
    UNAVAILABLE = 6
    INTERRUPTED = 130


EPILOG: Final[str] = """\
exit codes:
  0    success (the controller applied the command; status/history printed)
  1    failure (unexpected error, or the controller could not carry the command out - e.g. its model registry
       failed; the message is printed)
  2    usage error (bad or missing arguments)
  3    not found (no rollout yet, or NAME is not this controller's rollout)
  4    refused (the controller ignored the command: e.g. a rollout is already in progress, nothing to resume)
  5    timeout (the controller did not apply the command in time - it was withdrawn from the inbox - or, for
       promote/abort/revert, applied it but the routers did not hold the new routing in time)
  6    unavailable (the backend cannot be reached: no kubeconfig / API server down for --backend kube)
  130  interrupted (Ctrl-C)

configuration: FW_ROLLOUT_HOME (state under <home>/rollout), FW_ROLLOUT_CONTROLLER__STATE_DIR,
  FW_ROLLOUT_CONTROLLER__POLICY_FILE, FW_ROLLOUT_CONTROLLER__COMMAND_WAIT_TIMEOUT_S; --backend kube:
  KUBECONFIG (or --kubeconfig/--context), -n/--namespace (default: the context's namespace)

on Kubernetes a rollout starts when the ModelRollout's spec.candidate changes (helm upgrade --set
  model.version=…), not with `start`; promote/pause/resume/abort/revert patch spec.manualCommand (one slot:
  wait for a command to be applied before sending the next - the CLI does)
"""
MUTATIONS: Final[tuple[InboxKind, ...]] = ("start", "promote", "pause", "resume", "abort", "revert")
PROMOTE_TARGETS: Final[tuple[str, ...]] = ("shadow", "canary", "ab", "full")
HISTORY_LIMIT: Final[int] = 50
_HELP: Final[dict[str, str]] = {
    "start": "Start a rollout of a candidate version against the version serving now.",
    "status": "Show the rollout: stage, weights, every gate with its value, threshold and verdict, time in stage.",
    "promote": "Promote to the next stage now (or --to a later one; from full: finish the rollout).",
    "pause": "Hold the current stage (no automatic promotion; a failed gate still rolls back).",
    "resume": "Resume automatic promotion.",
    "abort": "Abort the rollout: 100 % back on the stable version.",
    "revert": "Put 100 % of decisions back on the previous version now (also after promotion, while it is warm).",
    "history": "Show the rollout's transitions with their reasons.",
}


class CliError(Exception):
    """A failure with its exit code and message."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Snapshot:
    """What ``status`` shows: the state (None before the first rollout), the controller's heartbeat, the policy."""

    state: ControllerState | None
    heartbeat: Heartbeat | None
    policy: RolloutPolicy


class RolloutClient(Protocol):
    """A backend's view of one rollout, as the CLI needs it."""

    name: str

    def rollout_exists(self) -> bool: ...

    def submit(self, command: InboxCommand) -> None: ...

    def result(self, command_id: str) -> CommandResult | None: ...

    def withdraw(self, command_id: str) -> bool: ...

    def snapshot(self) -> Snapshot: ...

    def events(self) -> Iterator[dict[str, Any]]: ...


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

    def submit(self, command: InboxCommand) -> None:
        self.inbox.submit(command)

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
        return Snapshot(state, read_heartbeat(self.state_dir), load_policy(self.settings.policy_file))

    def events(self) -> Iterator[dict[str, Any]]:
        from rollout.backends.local.events import read_events

        return read_events(self.state_dir / EVENTS_FILE)


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

    def submit(self, command: InboxCommand) -> None:
        if command.kind == "start":
            raise CliError(ExitCode.USAGE, "on Kubernetes a rollout starts when spec.candidate changes: "
                           "helm upgrade … --set model.version=<version>")  # fmt: skip
        manual = {
            "id": command.id,
            "kind": command.kind,
            "reason": command.reason,
            "requestedBy": command.issued_by or None,
            "requestedAt": command.issued_at.isoformat().replace("+00:00", "Z"),
            "to": command.to,  # None removes a previous command's target (a merge patch merges objects)
        }
        self._call(lambda: self.api.merge_patch(self._path(), {"spec": {"manualCommand": manual}}))

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
        return Snapshot(state, self._heartbeat(), policy)

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
        name = args.name if plugin else cs.name
        return KubeClient(name, args.namespace, args.kubeconfig, args.context, cs)
    return LocalClient(cs, args.state_dir if args.state_dir is not None else cs.resolved_state_dir(settings.home))


# --------------------------------------------------------------------------------------------------- parser


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(*, plugin: bool) -> argparse.ArgumentParser:
    prog = "kubectl modelrollout" if plugin else "rolloutctl"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start, watch and steer a fraudwatch model rollout (shadow → canary → A/B → full).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=("local", "kube"), help="where the rollout lives (default: local)")
    parser.add_argument("--home", type=Path, help="rollout home (default: FW_ROLLOUT_HOME, else ./var)")
    parser.add_argument("--state-dir", type=Path, help="the controller's state directory (default: <home>/rollout)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    kube = parser.add_argument_group("--backend kube")
    kube.add_argument("-n", "--namespace", help="the ModelRollout's namespace (default: the kubeconfig context's)")
    kube.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    kube.add_argument("--context", help="kubeconfig context (default: the current one)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("start", "status", "promote", "pause", "resume", "abort", "revert", "history"):
        sub = commands.add_parser(
            name, help=_HELP[name].replace("%", "%%"), description=_HELP[name], epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        if plugin:
            sub.add_argument("name", metavar="NAME", help="the rollout's name")
        sub.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="the ModelRollout's namespace (kube)")
        if name in MUTATIONS:
            sub.add_argument("--reason", default="", help="why (kept in the event log and the registry's audit tags)")
            sub.add_argument(
                "--id", dest="command_id", help="command id (default: generated; a repeated id is a no-op)"
            )
            sub.add_argument("--no-wait", action="store_true", help="queue the command and return at once")
            sub.add_argument("--timeout", type=positive_float, help="seconds to wait for the controller to apply it")
        if name == "start":
            sub.add_argument("--candidate", required=True, help="version name, registry version number or alias")
            sub.add_argument("--stable", help="the version to compare against (default: the one serving now)")
        if name == "promote":
            sub.add_argument("--to", choices=PROMOTE_TARGETS, help="skip to this stage")
        if name == "history":
            sub.add_argument("--all", action="store_true", help="every rollout, not only the current one")
            sub.add_argument("--limit", type=positive_int, default=HISTORY_LIMIT, help="newest events shown")
    return parser


# --------------------------------------------------------------------------------------------------- commands


def command_from_args(args: argparse.Namespace, now: datetime) -> InboxCommand:
    kind: InboxKind = args.command
    data: dict[str, Any] = {
        "id": args.command_id or new_command_id(kind),
        "kind": kind,
        "issued_at": now,
        "issued_by": _user(),
        "reason": args.reason,
    }
    if kind == "start":
        data |= {"candidate": args.candidate, "stable": args.stable}
    if kind == "promote":
        data["to"] = args.to
    return InboxCommand.model_validate(data)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


#: Commands whose confirmation waits until the routers hold the routing they lead to.
ROUTING_COMMANDS: Final[frozenset[str]] = frozenset({"promote", "abort", "revert"})


def wait_for_result(
    client: RolloutClient, command_id: str, timeout_s: float, poll_s: float, *, in_force: bool = False
) -> CommandResult | None:
    """The controller's result, once it has one (with ``in_force``: once an applied command is also in force)."""
    deadline = time.monotonic() + timeout_s
    result: CommandResult | None = None
    while True:
        result = client.result(command_id) or result
        if result is not None and (not in_force or result.outcome != "applied" or result.in_force_at is not None):
            return result
        if time.monotonic() >= deadline:
            return result
        time.sleep(poll_s)


def run_mutation(client: RolloutClient, args: argparse.Namespace, settings: ControllerSettings) -> tuple[ExitCode, Any]:
    if args.command != "start" and not client.rollout_exists():
        raise CliError(ExitCode.NOT_FOUND, f"rollout {client.name!r} has no rollout yet (rolloutctl start …)")
    command = command_from_args(args, datetime.now(UTC))
    client.submit(command)
    if args.no_wait:
        return ExitCode.OK, {"id": command.id, "kind": command.kind, "outcome": "queued"}
    timeout = args.timeout if args.timeout is not None else settings.command_wait_timeout_s
    in_force = command.kind in ROUTING_COMMANDS
    result = wait_for_result(client, command.id, timeout, settings.command_poll_interval_s, in_force=in_force)
    if result is None:
        withdrawn = client.withdraw(command.id)
        late = client.result(command.id)
        if late is not None:
            result = late
        else:
            what = "withdrawn from the inbox" if withdrawn else "already taken by the controller"
            message = f"the controller did not apply {command.kind} {command.id} within {timeout:g} s ({what})"
            raise CliError(ExitCode.TIMEOUT, f"{message}; is it running? (rolloutctl status)")
    if in_force and result.outcome == "applied" and result.in_force_at is None:
        message = f"{command.kind} {command.id} was applied but the routers do not hold it after {timeout:g} s"
        raise CliError(ExitCode.TIMEOUT, f"{message}; rolloutctl status shows what the controller waits for")
    code = {"applied": ExitCode.OK, "failed": ExitCode.FAILURE}.get(result.outcome, ExitCode.REFUSED)
    return code, result.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------- status


def _seconds(start: datetime | None, now: datetime) -> float | None:
    return None if start is None else max(0.0, (now - start).total_seconds())


def status_view(snapshot: Snapshot, now: datetime, stale_after_s: float) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (rendered as tables, or printed with ``--json``)."""
    from rollout.core.evidence import gate_evidence
    from rollout.core.machine import expected_gates, promotion_blockers

    beat = snapshot.heartbeat
    controller: dict[str, Any] = {"running": False}
    if beat is not None:
        age = heartbeat_age_s(beat, now)
        controller = {"running": age <= stale_after_s, "pid": beat.pid, "heartbeat_age_s": round(age, 3),
                      "metrics_url": beat.metrics_url}  # fmt: skip
        if beat.identity is not None:
            controller["leader"] = beat.identity
    state = snapshot.state
    rollout = state.rollout if state is not None else None
    workloads = workloads_view(state)
    if state is None or rollout is None:
        return {"rollout": None, "controller": controller, "workloads": workloads}
    policy = snapshot.policy
    names = list(dict.fromkeys([*expected_gates(policy, rollout.stage), *rollout.gates]))
    transition = rollout.history[-1] if rollout.history else None
    # a finished rollout shows the gate values its last transition recorded (why it ended)
    final = {g.name: g for g in transition.gates} if transition is not None and rollout.phase != "Progressing" else {}
    gates = []
    for name in names:
        history = rollout.gates.get(name)
        last = history.last if history is not None and history.last is not None else final.get(name)
        evidence = gate_evidence(last) if last is not None else {}
        gates.append(
            {
                **evidence,
                "name": name,
                "layer": last.layer if last else None,
                "verdict": last.status.value if last else "not measured",
                "candidate": last.candidate_value if last else None,
                "stable": last.stable_value if last else None,
                "bound": last.bound if last else None,
                "interval": list(last.interval) if last and last.interval else None,
                "threshold": last.threshold if last else None,
                "condition": last.condition if last else None,
                "values": dict(last.values) if last else {},
                "message": last.message if last else "",
                "measured_at": history.last_at.isoformat() if history and history.last_at else None,
                "consecutive_errors": history.consecutive_errors if history else 0,
                "inconclusive_for_s": _seconds(history.inconclusive_since, now) if history else None,
                "evidence": evidence.get("evidence", ""),
            }
        )
    minimum = policy.stages.of(rollout.stage).min_duration_s if rollout.stage != "quality" else 0.0
    report = history_report(rollout) if rollout.phase == "Progressing" else None
    blockers = promotion_blockers(policy, rollout, report) if report is not None else []
    until = rollout.finished_at if rollout.finished_at is not None else now
    return {
        "rollout": {
            "name": state.name,
            "id": rollout.rollout_id,
            "phase": rollout.phase,
            "stage": rollout.stage,
            "paused": rollout.paused,
            "stable": rollout.stable,
            "candidate": rollout.candidate,
            "weights": {rollout.stable: rollout.weights.stable, rollout.candidate: rollout.weights.candidate},
            "stage_entered_at": rollout.stage_entered_at.isoformat(),
            "time_in_stage_s": round(_seconds(rollout.stage_entered_at, until) or 0.0, 3),
            "min_duration_s": minimum,
            "started_at": state.rollout_started_at.isoformat() if state.rollout_started_at else None,
            "finished_at": rollout.finished_at.isoformat() if rollout.finished_at else None,
            "last_transition": {"at": transition.at.isoformat(), "reason": transition.reason} if transition else None,
            "blockers": blockers,
        },
        "gates": gates,
        "controller": controller,
        "workloads": workloads,
    }


def workloads_view(state: ControllerState | None) -> list[dict[str, Any]]:
    """Each running version's workload as the controller last saw it: its role in the rollout, readiness, restarts."""
    if state is None:
        return []
    rollout = state.rollout
    roles = {} if rollout is None else {rollout.stable: "stable", rollout.candidate: "candidate"}
    if rollout is not None and rollout.phase == "Promoted":
        roles = {rollout.candidate: "stable", rollout.stable: "previous"}
    return [
        {"version": w.version, "role": roles.get(w.version, "serving" if rollout is None else "other"),
         "readiness": w.readiness.value, "restarts": w.restarts, "detail": w.detail, "url": w.url}
        for w in state.workloads
    ]  # fmt: skip


def history_report(rollout: RolloutState) -> AnalysisReport | None:
    """The latest measurement of the current stage as a report (for the promotion blockers), or None."""
    from rollout.core.analysis import AnalysisReport

    lasts = [h.last for h in rollout.gates.values() if h.last is not None]
    at = max((h.last_at for h in rollout.gates.values() if h.last_at is not None), default=None)
    if not lasts or at is None:
        return None
    return AnalysisReport(
        stage=rollout.stage, stable=rollout.stable, candidate=rollout.candidate, at=at, results=tuple(lasts)
    )


def history_view(events: Iterator[dict[str, Any]], rollout_id: str | None, limit: int) -> list[dict[str, Any]]:
    chosen = [e for e in events if rollout_id is None or e.get("rollout_id") == rollout_id]
    return chosen[-limit:]


# --------------------------------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_VERDICT_STYLE: Final[dict[str, str]] = {
    "Successful": "green",
    "Failed": "bold red",
    "Inconclusive": "yellow",
    "Error": "magenta",
    "not measured": "dim",
}
_PHASE_STYLE: Final[dict[str, str]] = {
    "Progressing": "cyan",
    "Promoted": "green",
    "RolledBack": "bold red",
    "Aborted": "bold yellow",
}


def render_status(view: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    controller = view["controller"]
    who = (
        f"leader {controller['leader']}, lease renewed" if controller.get("leader") else f"pid {controller.get('pid')}"
    )
    alive = (
        f"[green]running[/] ({who} {controller['heartbeat_age_s']:.1f} s ago)"
        if controller.get("running")
        else "[bold red]not running[/] (no fresh heartbeat)"
    )
    rollout = view["rollout"]
    if rollout is None:
        console.print(f"No rollout yet. Controller: {alive}")
        _print_workloads(console, view["workloads"])
        return
    phase_style = _PHASE_STYLE.get(rollout["phase"], "white")
    paused = " [yellow](paused)[/]" if rollout["paused"] else ""
    weights = " · ".join(f"{v} {w} %" for v, w in rollout["weights"].items())
    console.print(
        f"[bold]{rollout['name']}[/] rollout [bold]{rollout['id']}[/]: {rollout['stable']} → {rollout['candidate']}"
    )
    console.print(f"  phase  [{phase_style}]{rollout['phase']}[/]   stage [bold]{rollout['stage']}[/]{paused}")
    console.print(f"  decisions  {weights}")
    console.print(f"  time in stage  {rollout['time_in_stage_s']:.0f} s (minimum {rollout['min_duration_s']:.0f} s)")
    if rollout["last_transition"]:
        console.print(f"  last transition  {rollout['last_transition']['at']}: {rollout['last_transition']['reason']}")
    console.print(f"  controller  {alive}")
    _print_workloads(console, view["workloads"])
    table = Table(title=f"gates of {rollout['stage']}", show_lines=False)
    for column in ("gate", "verdict", "candidate", "stable", "evidence", "threshold", "condition", "detail"):
        table.add_column(column, overflow="fold")
    for gate in view["gates"]:
        style = _VERDICT_STYLE.get(gate["verdict"], "white")
        candidate = gate["candidate"]
        if gate["values"]:
            candidate = ", ".join(f"{k}={v:.4g}" for k, v in gate["values"].items())
        table.add_row(
            gate["name"], f"[{style}]{gate['verdict']}[/]", _fmt(candidate), _fmt(gate["stable"]),
            gate["evidence"] or f"bound {_fmt(gate['bound'])}", _fmt(gate["threshold"]), _fmt(gate["condition"]),
            gate["message"],
        )  # fmt: skip
    console.print(table)
    if rollout["blockers"]:
        console.print("  not promoted yet: " + "; ".join(rollout["blockers"]))


_READINESS_STYLE: Final[dict[str, str]] = {
    "ready": "green",
    "starting": "yellow",
    "failed": "bold red",
    "stopped": "dim",
}


def _print_workloads(console: Any, workloads: Sequence[Mapping[str, Any]]) -> None:
    """One line per running version: ``workloads  v1 (stable) ready, 0 restarts · v2 (candidate) failed, 3 …``."""
    if not workloads:
        return
    parts = []
    for w in workloads:
        style = _READINESS_STYLE.get(w["readiness"], "white")
        detail = f" ({w['detail']})" if w["detail"] and w["detail"] != w["readiness"] else ""
        restarts = "1 restart" if w["restarts"] == 1 else f"{w['restarts']} restarts"
        parts.append(f"{w['version']} ({w['role']}) [{style}]{w['readiness']}[/]{detail}, {restarts}")
    console.print("  workloads  " + " · ".join(parts))


def render_history(events: Sequence[Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rollout history")
    for column in ("at", "rollout", "change", "trigger", "reason"):
        table.add_column(column, overflow="fold")
    for event in events:
        if event.get("kind") == "transition":
            change = f"{event['from_phase']}/{event['from_stage']} → {event['to_phase']}/{event['to_stage']}"
            trigger = f"{event['trigger']} ({event.get('reason_code', '')})"
        else:
            change, trigger = "note", ""
        table.add_row(str(event.get("at")), str(event.get("rollout_id")), change, trigger, str(event.get("reason")))
    Console().print(table)


def render_result(payload: Mapping[str, Any]) -> None:
    from rich.console import Console

    outcome = payload.get("outcome")
    style = {"applied": "green", "queued": "cyan", "ignored": "bold yellow", "failed": "bold red"}.get(
        str(outcome), "white"
    )
    detail = f": {payload['detail']}" if payload.get("detail") else ""
    Console().print(f"{payload['kind']} {payload['id']} [{style}]{outcome}[/]{detail}")


# --------------------------------------------------------------------------------------------------- main


def _settings(args: argparse.Namespace) -> RolloutSettings:
    settings = RolloutSettings()
    if args.home is not None:
        settings = settings.model_copy(update={"home": args.home})
    return settings


def execute(args: argparse.Namespace, *, plugin: bool) -> ExitCode:
    settings = _settings(args)
    client = client_for(args, settings, plugin=plugin)
    if plugin and args.name != client.name:
        raise CliError(ExitCode.NOT_FOUND, f"no rollout named {args.name!r} (this controller runs {client.name!r})")
    cs = settings.controller
    if args.command in MUTATIONS:
        code, payload = run_mutation(client, args, cs)
        _print(args, payload, render_result)
        return code
    snapshot = client.snapshot()
    now = datetime.now(UTC)
    if args.command == "status":
        view = status_view(snapshot, now, cs.stale_after_s)
        _print(args, view, render_status)
        return ExitCode.OK if view["rollout"] is not None else ExitCode.NOT_FOUND
    current = snapshot.state.rollout if snapshot.state is not None else None
    rollout_id = None if args.all or current is None else current.rollout_id
    events = history_view(client.events(), rollout_id, args.limit)
    _print(args, events, render_history)
    return ExitCode.OK


def _print(args: argparse.Namespace, payload: Any, render: Any) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        render(payload)


def run(argv: Sequence[str] | None, *, plugin: bool) -> int:
    parser = build_parser(plugin=plugin)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors
        return int(exc.code) if isinstance(exc.code, int) else int(ExitCode.USAGE)
    try:
        return int(execute(args, plugin=plugin))
    except CliError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except (OSError, ValueError) as exc:
        print(f"{parser.prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.FAILURE)


def main(argv: Sequence[str] | None = None) -> int:
    """``rolloutctl``."""
    return run(argv, plugin=False)


def kubectl_main(argv: Sequence[str] | None = None) -> int:
    """``kubectl-modelrollout`` (``kubectl modelrollout …``): every command takes the rollout's NAME."""
    return run(argv, plugin=True)


def console_main() -> None:
    sys.exit(main())


def console_kubectl_main() -> None:
    sys.exit(kubectl_main())
