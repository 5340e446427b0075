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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rollout.cli.clients import RolloutClient, client_for
from rollout.cli.errors import CliError, ExitCode
from rollout.cli.views import history_view, render_history, render_result, render_status, status_view
from rollout.core.commands import CommandResult, InboxCommand, InboxKind, new_command_id
from rollout.settings import ControllerSettings, RolloutSettings

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


# --------------------------------------------------------------------------------------------------- client


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


# --------------------------------------------------------------------------------------------------- output


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
