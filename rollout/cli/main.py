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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rollout.cli.clients import KubeClient, RolloutClient, client_for
from rollout.cli.completion import COMPLETE_COMMAND, cobra_lines, complete_words, completion_script
from rollout.cli.errors import CliError, ExitCode
from rollout.cli.outcome import EXIT_CODES
from rollout.cli.views import history_view, render_history, render_list, render_result, render_status
from rollout.cli.watch import current_view, watch_get, watch_status
from rollout.core.commands import CommandResult, InboxCommand, InboxKind, new_command_id
from rollout.settings import ControllerSettings, RolloutSettings

EPILOG: Final[str] = """\
exit codes:
  0    success (the controller applied the command; printed); status: the rollout is promoted and its version
       serves (Healthy), or it is still in progress (without --watch)
  1    failure (unexpected error, or the controller could not carry the command out - e.g. its model registry
       failed; the message is printed)
  2    usage error (bad or missing arguments)
  3    not found (no rollout yet, or NAME is not this controller's rollout)
  4    refused (the controller ignored the command: e.g. a rollout is already in progress, nothing to resume)
  5    timeout (the controller did not apply the command in time - it was withdrawn from the inbox - or, for
       promote/abort/revert, applied it but the routers did not hold the new routing in time; status --watch:
       the rollout had not ended within --timeout)
  6    unavailable (the backend cannot be reached: no kubeconfig / API server down for --backend kube)
  7    status: the rollout was rolled back (RolledBack: a gate failed, or revert)
  8    status: the rollout was aborted (Aborted: abort, superseded by a new candidate, or a stage timed out)
  9    status: Degraded (promoted, but the serving version's workload failed)
  130  interrupted (Ctrl-C)

durations (--timeout): seconds (90, 1.5) or Go/Kubernetes style (90s, 10m, 1h30m, 500ms)

configuration: FW_ROLLOUT_HOME (state under <home>/rollout), FW_ROLLOUT_CONTROLLER__STATE_DIR,
  FW_ROLLOUT_CONTROLLER__POLICY_FILE, FW_ROLLOUT_CONTROLLER__COMMAND_WAIT_TIMEOUT_S,
  FW_ROLLOUT_CONTROLLER__WATCH_INTERVAL_S; --backend kube: KUBECONFIG (or --kubeconfig/--context),
  -n/--namespace (default: the context's namespace)

on Kubernetes a rollout starts when the ModelRollout's spec.candidate changes (helm upgrade --set
  model.version=…), not with `start`; retry/promote/pause/resume/abort/revert patch spec.manualCommand (one slot:
  wait for a command to be applied before sending the next - the CLI does). In CI:
  helm upgrade … --set model.version=v7 && kubectl modelrollout status NAME --watch --timeout 2h
"""
MUTATIONS: Final[tuple[InboxKind, ...]] = ("start", "retry", "promote", "pause", "resume", "abort", "revert")
PROMOTE_TARGETS: Final[tuple[str, ...]] = ("shadow", "canary", "ab", "full")
HISTORY_LIMIT: Final[int] = 50
_HELP: Final[dict[str, str]] = {
    "start": "Start a rollout of a candidate version against the version serving now (on Kubernetes only a version "
    "the ModelRollout has run, set back into spec.candidate; a new one: helm upgrade --set model.version=…).",
    "retry": "Roll the candidate that was rolled back or aborted out again (a new rollout from its first stage, "
    "against the version serving now; on Kubernetes without changing spec.candidate).",
    "status": "Show the rollout: stage, weights, every gate with its value, threshold and verdict, time in stage.",
    "promote": "Promote to the next step or stage now (or --to a later stage's first step; from full: finish).",
    "pause": "Hold the current stage (no automatic promotion; a failed gate still rolls back).",
    "resume": "Resume automatic promotion.",
    "abort": "Abort the rollout: 100 % back on the stable version.",
    "revert": "Put 100 % of decisions back on the previous version now (also after promotion, while it is warm).",
    "undo": "Go back to an earlier serving version: no flag = the previous one (revert); --to-revision N = revision "
    "N of status.state.revisions (the previous one: revert; an older one: a new gated rollout of it — on Kubernetes "
    "spec.candidate is set back to the spec it ran with). Exit 3 when N is no longer kept, 4 when it is the serving "
    "one.",
    "history": "Show the rollout's transitions with their reasons.",
    "get": "Show the rollout in detail (as status); -w/--watch: show it again on every change until Ctrl-C or "
    "--timeout (exit 0).",
    "list": "List the rollouts: phase, stage, stable, candidate and weight of each (kube: -A for every namespace).",
    "completion": "Print the shell completion script: source <(rolloutctl completion bash); zsh the same.",
}
STATUS_HELP: Final[str] = (
    "Show the rollout: stage, weights, every gate with its value, threshold and verdict, time in stage; the exit "
    "code says how it ended (0 Healthy or still progressing, 7 RolledBack, 8 Aborted, 9 Degraded). "
    "-w/--watch: wait until it ends (one line per change), exit with its code, 5 after --timeout."
)
COMMANDS: Final[tuple[str, ...]] = (
    "start", "retry", "status", "get", "list", "promote", "pause", "resume", "abort", "revert", "undo", "history",
    "completion",
)  # fmt: skip
NAMELESS: Final[frozenset[str]] = frozenset({"list", "completion"})
OUTPUTS: Final[tuple[str, ...]] = ("json", "yaml")
SHELLS: Final[tuple[str, ...]] = ("bash", "zsh")


# --------------------------------------------------------------------------------------------------- client


# --------------------------------------------------------------------------------------------------- parser


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def duration(text: str) -> float:
    """A ``--timeout``: seconds or ``90s``/``10m``/``1h30m`` (argparse's type; > 0)."""
    from rollout.core.durations import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
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
    _output_flags(parser, None)
    kube = parser.add_argument_group("--backend kube")
    kube.add_argument("-n", "--namespace", help="the ModelRollout's namespace (default: the kubeconfig context's)")
    kube.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    kube.add_argument("--context", help="kubeconfig context (default: the current one)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        text = STATUS_HELP if name == "status" else _HELP[name]
        sub = commands.add_parser(
            name, help=text.replace("%", "%%"), description=text, epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        if name == "completion":
            sub.add_argument("shell", choices=SHELLS, help="the shell the script is for")
            continue
        if plugin and name not in NAMELESS:
            sub.add_argument("name", metavar="NAME", help="the rollout's name")
        sub.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="the ModelRollout's namespace (kube)")
        _output_flags(sub, argparse.SUPPRESS)
        if name == "undo":
            sub.add_argument("--to-revision", type=positive_int, metavar="N",
                             help="the revision to go back to (default: the previous one)")  # fmt: skip
        if name in MUTATIONS or name == "undo":
            sub.add_argument("--reason", default="", help="why (kept in the event log and the registry's audit tags)")
            sub.add_argument(
                "--id", dest="command_id", help="command id (default: generated; a repeated id is a no-op)"
            )
            sub.add_argument("--no-wait", action="store_true", help="queue the command and return at once")
            sub.add_argument(
                "--timeout", type=duration, metavar="DURATION", help="how long to wait for the controller to apply it"
            )
        if name in ("status", "get"):
            sub.add_argument(
                "-w",
                "--watch",
                action="store_true",
                help="wait until the rollout ends" if name == "status" else "show every change",
            )
            sub.add_argument("--timeout", type=duration, metavar="DURATION",
                             help="with --watch: give up after this long (default: no limit)")  # fmt: skip
        if name == "list":
            sub.add_argument("-A", "--all-namespaces", action="store_true", help="kube: every namespace")
        if name == "start":
            sub.add_argument("--candidate", required=True, help="version name, registry version number or alias")
            sub.add_argument("--stable", help="the version to compare against (default: the one serving now)")
        if name == "promote":
            sub.add_argument(
                "--to", choices=PROMOTE_TARGETS, help="skip to this stage (its first step when stages.steps splits it)"
            )
        if name == "history":
            sub.add_argument("--all", action="store_true", help="every rollout, not only the current one")
            sub.add_argument("--limit", type=positive_int, default=HISTORY_LIMIT, help="newest events shown")
    return parser


def _output_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``-o json|yaml`` (kubectl's) and ``--json`` (its alias), before or after the command."""
    parser.add_argument("-o", "--output", choices=OUTPUTS, default=default,
                        help="print one JSON or YAML document instead of tables")  # fmt: skip
    parser.add_argument("--json", dest="output", action="store_const", const="json", default=default,
                        help="the same as -o json")  # fmt: skip


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
    command_id = client.submit(command)
    if args.no_wait:
        return ExitCode.OK, {"id": command_id, "kind": command.kind, "outcome": "queued"}
    timeout = args.timeout if args.timeout is not None else settings.command_wait_timeout_s
    in_force = command.kind in ROUTING_COMMANDS
    result = wait_for_result(client, command_id, timeout, settings.command_poll_interval_s, in_force=in_force)
    if result is None:
        withdrawn = client.withdraw(command_id)
        late = client.result(command_id)
        if late is not None:
            result = late
        else:
            what = "withdrawn from the inbox" if withdrawn else "already taken by the controller"
            message = f"the controller did not apply {command.kind} {command_id} within {timeout:g} s ({what})"
            raise CliError(ExitCode.TIMEOUT, f"{message}; is it running? (rolloutctl status)")
    if in_force and result.outcome == "applied" and result.in_force_at is None:
        message = f"{command.kind} {command_id} was applied but the routers do not hold it after {timeout:g} s"
        raise CliError(ExitCode.TIMEOUT, f"{message}; rolloutctl status shows what the controller waits for")
    code = {"applied": ExitCode.OK, "failed": ExitCode.FAILURE}.get(result.outcome, ExitCode.REFUSED)
    return code, result.model_dump(mode="json")


def resolve_undo(client: RolloutClient, args: argparse.Namespace) -> None:
    """``undo`` as the command it means: ``revert`` (no --to-revision, or the previous revision while the rollout
    that replaced it is promoted), or ``start --candidate <revision's version>`` for an older one (on Kubernetes:
    ``spec.candidate`` set back to the spec that version ran with). CliError NOT_FOUND for a revision no longer
    kept, REFUSED for the serving one."""
    wanted: int | None = args.to_revision
    args.command = "revert"
    if wanted is None:
        return
    state = client.snapshot().state
    revisions = state.revisions if state is not None else ()
    target = next((r for r in revisions if r.number == wanted), None)
    if target is None:
        kept = f"kept: {revisions[0].number}-{revisions[-1].number}" if revisions else "no revision recorded yet"
        raise CliError(ExitCode.NOT_FOUND, f"revision {wanted} is no longer in the history ({kept})")
    serving = revisions[-1]
    if target.number == serving.number:
        raise CliError(ExitCode.REFUSED, f"revision {wanted} ({target.version}) is the serving version")
    rollout = state.rollout if state is not None else None
    previous = revisions[-2] if len(revisions) > 1 else None
    if (previous is not None and target.number == previous.number and rollout is not None
            and rollout.phase == "Promoted" and rollout.stable == target.version):  # fmt: skip
        return  # the warm previous version: revert
    args.command, args.candidate, args.stable = "start", target.version, None


# --------------------------------------------------------------------------------------------------- status


# --------------------------------------------------------------------------------------------------- output


# --------------------------------------------------------------------------------------------------- main


def _settings(args: argparse.Namespace) -> RolloutSettings:
    settings = RolloutSettings()
    if args.home is not None:
        settings = settings.model_copy(update={"home": args.home})
    return settings


def execute(args: argparse.Namespace, *, plugin: bool, prog: str) -> ExitCode:
    if args.command == "completion":
        print(completion_script(prog, args.shell), end="")
        return ExitCode.OK
    settings = _settings(args)
    client = client_for(args, settings, plugin=plugin)
    if plugin and args.command not in NAMELESS and args.name != client.name:
        raise CliError(ExitCode.NOT_FOUND, f"no rollout named {args.name!r} (this controller runs {client.name!r})")
    cs = settings.controller
    if args.command == "undo":
        resolve_undo(client, args)
    if args.command in MUTATIONS:
        code, payload = run_mutation(client, args, cs)
        _print(args, payload, render_result)
        return code
    if args.command == "list":
        _print(args, client.rollouts(args.all_namespaces), render_list)
        return ExitCode.OK
    if args.command == "status" and args.watch:
        return _watch_status(client, args, cs)
    if args.command == "get" and args.watch:
        watch_get(client, cs, args.timeout, lambda view: _print(args, view, render_status, stream=True))
        return ExitCode.OK
    if args.command in ("status", "get"):
        view, _ = current_view(client, cs)
        _print(args, view, render_status)
        if args.command == "get":
            return ExitCode.OK if view["rollout"] is not None else ExitCode.NOT_FOUND
        return EXIT_CODES[view["health"]]
    snapshot = client.snapshot()
    current = snapshot.state.rollout if snapshot.state is not None else None
    rollout_id = None if args.all or current is None else current.rollout_id
    events = history_view(client.events(), rollout_id, args.limit)
    _print(args, events, render_history)
    return ExitCode.OK


def _watch_status(client: RolloutClient, args: argparse.Namespace, cs: ControllerSettings) -> ExitCode:
    """``status --watch``: lines while it runs (human output), then the final view; its health's exit code."""
    emit = (lambda line: None) if args.output else (lambda line: print(line, flush=True))
    view, timed_out = watch_status(client, cs, args.timeout, emit)
    if args.output:
        _print(args, view, render_status)
    if timed_out:
        raise CliError(ExitCode.TIMEOUT, f"{client.name} had not ended after {args.timeout:g} s: {view['health']}")
    return EXIT_CODES[view["health"]]


def _print(args: argparse.Namespace, payload: Any, render: Any, *, stream: bool = False) -> None:
    """``payload`` as JSON, YAML or rendered; ``stream``: one document of a series (JSON: one per line; YAML:
    ``---`` separated)."""
    if args.output == "json":
        print(json.dumps(payload, default=str, indent=None if stream else 2), flush=True)
    elif args.output == "yaml":
        import yaml

        plain = json.loads(json.dumps(payload, default=str))
        print(("---\n" if stream else "") + yaml.safe_dump(plain, sort_keys=False), end="", flush=True)
    else:
        render(payload)


def _names(settings: RolloutSettings, plugin: bool) -> Any:
    """The rollouts NAME can complete to: the local controller's, or the namespace's ModelRollouts (none on any
    error: completion never fails loudly)."""

    def names(values: Mapping[str, str]) -> list[str]:
        cs = settings.controller
        backend = values.get("backend") or ("kube" if plugin and "state_dir" not in values else cs.backend)
        if backend != "kube":
            return [cs.name]
        try:
            kubeconfig = Path(values["kubeconfig"]) if "kubeconfig" in values else None
            client = KubeClient(cs.name, values.get("namespace"), kubeconfig, values.get("context"), cs)
            return [row["name"] for row in client.rollouts(False)]
        except (CliError, OSError, ValueError):
            return []

    return names


def complete(argv: Sequence[str], *, plugin: bool) -> int:
    """``__complete WORD…`` (and ``kubectl_complete-modelrollout WORD…``): Cobra's completion protocol."""
    parser = build_parser(plugin=plugin)
    names = _names(RolloutSettings(), plugin)
    print(cobra_lines(complete_words(parser, argv, names)), end="")
    return int(ExitCode.OK)


def run(argv: Sequence[str] | None, *, plugin: bool) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [COMPLETE_COMMAND]:
        return complete(words[1:], plugin=plugin)
    parser = build_parser(plugin=plugin)
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors
        return int(exc.code) if isinstance(exc.code, int) else int(ExitCode.USAGE)
    try:
        return int(execute(args, plugin=plugin, prog=parser.prog.replace("kubectl ", "kubectl-")))
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


def console_kubectl_complete() -> None:
    """``kubectl_complete-modelrollout``: kubectl runs it with the words after ``kubectl modelrollout``."""
    sys.exit(complete(sys.argv[1:], plugin=True))
