"""``fraudwatch``: generate data, train and register versions, manage registry aliases, score, run the model-only
demo (``demo``) and the rollout demo's model side (``demo-versions``).

Human output (rich tables and progress) goes to stdout; structured JSON logs go to stderr. Heavy libraries
(MLflow, XGBoost, BentoML) are imported only by the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.common.clock import as_utc
from service.common.logging import (
    configure_logging,
    correlation_id_from_header,
    correlation_scope,
    get_logger,
    log_event,
)
from service.settings import Settings

if TYPE_CHECKING:
    from service.artifacts.registry import ModelRef
    from service.demo.quickstart import DemoSummary, Scored
    from service.demo.versions import DemoVersions
    from service.retraining.job import RetrainReport
    from service.serving.process import BentoServer
    from service.training.pipeline import Registration, TrainedVersion

logger = get_logger(__name__)


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    QUALITY_GATE = 3
    NOT_FOUND = 4
    INTEGRITY = 5
    ROLLOUT_NOT_STARTED = 6
    NOTHING_SHIPPED = 7
    INTERRUPTED = 130
    TERMINATED = 143


EPILOG: Final[str] = """\
exit codes:
  0    success
  1    failure (the message is printed; JSON logs on stderr have the details)
  2    usage error (bad or missing arguments or settings: no regression set, no label source)
  3    quality gate failed (the run is logged in MLflow, the version is not registered)
  4    not found (data file, registered model, version or alias)
  5    integrity check failed (a bundle does not match its checksums)
  6    retrain/recalibrate: registered as challenger, but delivery did not start the rollout (refused, or no answer)
  7    retrain/recalibrate: nothing shipped (too little labelled data in the window; recalibrate: no improvement)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM) — servers started by the command are stopped first

configuration: every setting comes from the environment (prefix FW_, nested with __), e.g.
  FW_HOME=var  FW_DATA__N_REQUESTS=20000  FW_TRAIN__N_ESTIMATORS=200  FW_MLFLOW_TRACKING_URI=http://127.0.0.1:5000
"""
#: Aliases moved only by ``promote``/``rollback`` (so ``previous`` always records the last champion).
RESERVED_ALIASES: Final[tuple[str, ...]] = ("champion", "previous")
#: Test-window metrics shown after training, in this order.
SHOWN_METRICS: Final[tuple[str, ...]] = (
    "pr_auc",
    "roc_auc",
    "precision",
    "recall",
    "f1",
    "threshold",
    "recall_at_top_1pct",
    "brier",
    "ece",
    "positives",
    "flagged",
)


class TerminatedError(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks (server shutdown) run."""


class UsageError(Exception):
    """Arguments that parse but do not make sense together."""


# --------------------------------------------------------------------------------------------- parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _subparser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drift", action="store_true", help="include the new-bot-farm drift scenario")
    parser.add_argument("--seed", type=int, help="generator seed (default: FW_DATA__SEED)")
    parser.add_argument("--n-requests", type=positive_int, help="rows to generate (default: FW_DATA__N_REQUESTS)")


def _datetime(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from error


def _retrain_options(parser: argparse.ArgumentParser, window_setting: str) -> None:
    parser.add_argument("--data", type=Path, help="labelled refund stream: CSV(.gz) or a directory of them "
                        "(default: FW_RETRAIN__DATA_PATH; retrain reads it with FW_RETRAIN__SOURCE=stream, the "
                        "default; =feature_log trains on the feature log and the prediction log's labels)")  # fmt: skip
    parser.add_argument("--window-days", type=float, help=f"days of labelled data (default: {window_setting})")
    parser.add_argument("--window-end", type=_datetime, help="end of the window (default: the newest labelled row)")
    parser.add_argument("--trigger", choices=("scheduled", "alert", "manual"), default="manual",
                        help="what started this run (recorded in MLflow and the summary)")  # fmt: skip
    parser.add_argument("--id", dest="retrain_id", help="run id, also the rollout's command id (default: generated)")
    parser.add_argument("--reason", help="audit note for the run, the challenger alias and the rollout")
    parser.add_argument("--version-name", help="the new version's name (default: the next free vN)")
    parser.add_argument("--no-rollout", action="store_true", help="register as challenger only; start no rollout")
    parser.add_argument("--summary-json", type=Path, help="also write the run's report here (JSON)")
    parser.add_argument("--correlation-id", help="correlation ID of the JSON logs (default: the run id)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudwatch",
        description="Real-time refund-fraud scoring: data, training, MLflow registry, serving demo.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", type=Path, help="state directory (default: FW_HOME, else ./var)")
    parser.add_argument("--log-level", help="JSON log level on stderr (default: FW_LOG_LEVEL, else INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = _subparser(commands, "generate", "Generate a synthetic labelled refund history (CSV, gzip by name).")
    generate.add_argument("--out", type=Path, required=True, help="output file, e.g. data.csv.gz")
    _data_options(generate)

    train = _subparser(commands, "train", "Train a version; log it to MLflow; optionally register and alias it.")
    train.add_argument("--data", type=Path, help="labelled history CSV (default: generate one on the fly)")
    _data_options(train)
    train.add_argument("--version-name", required=True, help="the version's name, e.g. v2")
    train.add_argument("--out-dir", type=Path, help="bundle + report directory (default: HOME/artifacts/NAME)")
    train.add_argument("--register", action="store_true", help="register the version in the model registry")
    train.add_argument(
        "--alias", help="after registering, move this alias to it (champion promotes; implies --register)"
    )
    train.add_argument("--reason", default="trained with fraudwatch train", help="audit note for the alias move")

    from_log = _subparser(
        commands,
        "train-from-log",
        "Train on what serving saw: the feature log joined with the labels that arrived by a cut-off, fit by the "
        "configured engine (FW_TRAIN__ENGINE), logged to MLflow with its window, row counts and engine.",
    )
    from_log.add_argument("--dsn-file", type=Path, required=True, help="file holding the prediction log's DSN")
    from_log.add_argument("--window-days", type=float, default=30.0, help="days of decisions before --end")
    from_log.add_argument("--end", type=_datetime, help="end of the decision window (default: now, UTC)")
    from_log.add_argument("--as-of", type=_datetime, help="labels that arrived by then (default: --end)")
    from_log.add_argument("--engine", choices=("local", "dask", "external_memory"), help="default: FW_TRAIN__ENGINE")
    from_log.add_argument("--version-name", required=True, help="the version's name, e.g. v7")
    from_log.add_argument("--out-dir", type=Path, help="work directory (default: HOME/artifacts)")

    registry = _subparser(commands, "registry", "Inspect and move registered versions and aliases.")
    registry.add_argument("--name", help="registered model (default: FW_REGISTERED_MODEL_NAME)")
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    _subparser(actions, "list", "List versions with their aliases, checksums and test metrics.")
    alias = _subparser(actions, "alias", "Point an alias (e.g. challenger) at a version.")
    alias.add_argument("alias", help=f"alias name (not {' or '.join(RESERVED_ALIASES)}: use promote / rollback)")
    alias.add_argument("version", help="version number")
    alias.add_argument("--reason", default="", help="audit note")
    promote = _subparser(actions, "promote", "Make a version champion; the old champion becomes previous.")
    promote.add_argument("version", help="version number")
    promote.add_argument("--reason", default="", help="audit note")
    rollback = _subparser(actions, "rollback", "Make the previous champion champion again.")
    rollback.add_argument("--reason", default="", help="audit note")
    fetch = _subparser(actions, "fetch", "Download a version's bundle and verify its checksums.")
    fetch.add_argument("ref", help="alias or version number")
    fetch.add_argument("--dest", type=Path, help="directory (default: HOME/serving/REF)")

    retrain = _subparser(
        commands,
        "retrain",
        "Train on the latest labelled window; pass the quality gates; register as challenger; start a rollout.",
    )
    _retrain_options(retrain, "FW_RETRAIN__WINDOW_DAYS")
    recalibrate = _subparser(
        commands,
        "recalibrate",
        "Refit a version's calibration (isotonic) on the latest labelled window; ship it like a retrain.",
    )
    _retrain_options(recalibrate, "FW_RETRAIN__RECALIBRATION_WINDOW_DAYS")
    recalibrate.add_argument("--base", default="champion", help="the version recalibrated: alias or number")

    score = _subparser(commands, "score", "Score one request against a running service.")
    score.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:3000")
    score.add_argument("--json", dest="body", type=json_object, required=True, help="request JSON object")

    demo = _subparser(
        commands,
        "demo",
        "The model-only quickstart (make quickstart): generate data, train, register as champion, fetch it back, "
        "serve it with bentoml, score, stop. The rollout demo is make demo (fraudwatch-demo).",
    )
    demo.add_argument("--drift", action="store_true", help="include the drift scenario in the data")
    demo.add_argument("--summary-json", type=Path, help="also write a machine-readable summary here")
    demo.add_argument("--reason", default="fraudwatch demo", help="audit note for the champion alias")

    versions = _subparser(
        commands,
        "demo-versions",
        "The rollout demo's model side: train v1 (before a new bot farm) and v2 (after), derive a deliberately bad "
        "v3, register all three (v1 as champion), write the live traffic and the regression set. The rollout demo "
        "itself (make demo, fraudwatch-demo) runs this command. Settings: FW_DEMO__… (service/demo/versions.py).",
    )
    versions.add_argument("--summary-json", type=Path, help="also write the result (paths, versions) here as JSON")
    versions.add_argument("--reason", default="rollout demo", help="audit note for the champion alias")
    return parser


# ------------------------------------------------------------------------------------------- rendering


class RichObserver:
    """Shows each step as a progress line (spinner, then ✓/✗ and its time) and renders results as tables."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
        )
        #: Live progress bars on a terminal; one plain line per finished step otherwise (logs, CI, pipes).
        self.live = console.is_terminal

    def __enter__(self) -> Self:
        if self.live:
            self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.live:
            self.progress.stop()

    def step(self, title: str) -> AbstractContextManager[None]:
        return self._live_step(title) if self.live else self._plain_step(title)

    @contextmanager
    def _plain_step(self, title: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.console.print(f"✗ {title} ({time.perf_counter() - started:.1f} s)", soft_wrap=True, highlight=False)
            raise
        self.console.print(f"✓ {title} ({time.perf_counter() - started:.1f} s)", soft_wrap=True, highlight=False)

    @contextmanager
    def _live_step(self, title: str) -> Iterator[None]:
        task = self.progress.add_task(title, total=None)
        try:
            yield
        except BaseException:
            self.progress.update(task, description=f"[red]✗[/] {title}", total=1, completed=0)
            self.progress.stop_task(task)
            raise
        self.progress.update(task, description=f"[green]✓[/] {title}", total=1, completed=1)
        self.progress.stop_task(task)

    def trained(self, trained: TrainedVersion) -> None:
        self.console.print(metrics_table(trained))
        self.console.print(strategy_table(trained))
        self.console.print(gate_text(trained))

    def registered(self, registration: Registration) -> None:
        self.console.print(f"MLflow run [bold]{registration.run.run_id}[/]", soft_wrap=True)
        if registration.ref is not None:
            ref = registration.ref
            aliases = ", ".join(ref.aliases) or "no alias"
            self.console.print(f"registered [bold]{ref.name}[/] version {ref.version} ({aliases})", soft_wrap=True)

    def serving(self, ref: ModelRef, bundle: Path, server: BentoServer) -> None:
        self.console.print(
            f"serving {ref.name} v{ref.version} ({ref.model_version}) from {bundle} at [bold]{server.url}[/]",
            soft_wrap=True,
        )

    def scored(self, scored: Scored) -> None:
        request = json.dumps(scored.example.request, sort_keys=True)
        response = json.dumps(scored.body, sort_keys=True)
        truth = _truth(scored.example.is_fraud)
        suffix = f" (truth: {truth})" if truth else ""
        self.console.print(f"[bold]{scored.example.label}[/]{suffix}", soft_wrap=True)
        self.console.out(f"  request  {request}", highlight=False)
        self.console.out(f"  response HTTP {scored.status} {response}", highlight=False)


def metrics_table(trained: TrainedVersion) -> Table:
    result = trained.result
    table = Table(title=f"{trained.version}: metrics (test window {result.split.test:,} rows; validation)")
    table.add_column("metric")
    table.add_column("test", justify="right")
    table.add_column("validation", justify="right")
    for name in SHOWN_METRICS:
        if name in result.test_metrics:
            table.add_row(name, _num(result.test_metrics[name]), _num(result.valid_metrics.get(name)))
    return table


def strategy_table(trained: TrainedVersion) -> Table:
    result = trained.result
    table = Table(title="imbalance strategies (validation PR-AUC decides)")
    for column in ("strategy", "valid PR-AUC", "trees", "train rows", "positives", "scale_pos_weight", "seconds"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for row in result.strategy_table:
        chosen = row["strategy"] == result.chosen_strategy
        table.add_row(
            f"[bold]{row['strategy']} ✓[/]" if chosen else str(row["strategy"]),
            _num(row["valid_pr_auc"]),
            str(row["trees"]),
            f"{row['train_rows']:,}",
            f"{row['train_positives']:,}",
            _num(row["scale_pos_weight"]),
            _num(row["seconds"]),
        )
    return table


def gate_text(trained: TrainedVersion) -> str:
    gate = trained.gate
    floors = ", ".join(f"{name} ≥ {floor:g}" for name, floor in gate.floors.items())
    if gate.passed:
        return f"[green]quality gate passed[/] ({floors})"
    return f"[red]quality gate FAILED[/] ({floors}): " + "; ".join(gate.failures)


def versions_table(name: str, refs: Sequence[ModelRef]) -> Table:
    table = Table(title=f"registered model {name}")
    for column in ("version", "aliases", "name", "test PR-AUC", "threshold", "sha256", "strategy"):
        table.add_column(column)
    for ref in refs:
        table.add_row(
            ref.version,
            ", ".join(ref.aliases),
            ref.model_version or "",
            _num_text(ref.tags.get("metric.test_pr_auc")),
            _num_text(ref.tags.get("threshold")),
            (ref.sha256 or "")[:12],
            ref.tags.get("strategy", ""),
        )
    return table


def summary_table(summary: DemoSummary) -> Table:
    table = Table(title="responses")
    for column in ("request", "truth", "HTTP", "prediction", "score", "decision", "ms"):
        table.add_column(column, justify="left" if column in ("request", "truth", "decision") else "right")
    for item in summary.responses:
        body: Mapping[str, Any] = item["response"]
        truth = _truth(item["is_fraud"])
        table.add_row(
            str(item["label"]),
            truth,
            str(item["status"]),
            str(body.get("prediction", "")),
            _num(body.get("score")),
            str(body.get("decision", body.get("error", ""))),
            _num(item["latency_ms"]),
        )
    return table


def demo_versions_table(result: DemoVersions) -> Table:
    stream = result.stream
    live = (
        f"{stream.get('live_rows', 0):,} requests, {stream.get('live_fraud_rate', 0.0):.1%} fraud, "
        f"{stream.get('live_new_bot_farm_share', 0.0):.1%} from the new bot farm"
    )
    table = Table(title=f"rollout demo versions (live traffic: {live})")
    for column in ("role", "version", "registry", "regression PR-AUC", "recall", "precision"):
        table.add_column(column, justify="left" if column in ("role", "version") else "right")
    for role, version in result.versions.items():
        metrics = result.regression_metrics.get(version, {})
        table.add_row(
            role,
            version,
            result.registry_versions.get(version, ""),
            *(_num(metrics.get(key)) for key in ("pr_auc", "recall", "precision")),
        )
    return table


def _truth(is_fraud: bool | None) -> str:
    if is_fraud is None:
        return ""
    return "fraud" if is_fraud else "legit"


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _num_text(text: str | None) -> str:
    return "" if text is None else _num(float(text))


# -------------------------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    from service.data.synthetic import generate
    from service.training.pipeline import dataset_config, write_frame

    config = dataset_config(settings, drift=args.drift, seed=args.seed, n_requests=args.n_requests)
    with RichObserver(console) as observer, observer.step(f"Generating {config.n_requests:,} requests"):
        frame = generate(config)
        path = write_frame(frame, args.out)
    frauds = int(frame["is_fraud"].sum())
    console.print(f"wrote {len(frame):,} rows ({frauds:,} fraud) to {path}", soft_wrap=True)
    return ExitCode.OK


def cmd_train(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    if args.data is not None and not args.data.is_file():
        raise FileNotFoundError(f"no data file {args.data}")
    from service.data.synthetic import generate
    from service.training.pipeline import dataset_config, read_frame, track_and_register, train_version

    register = args.register or args.alias is not None
    out_dir = args.out_dir or settings.artifacts_dir / args.version_name
    with RichObserver(console) as observer:
        with observer.step("Loading data" if args.data else "Generating data"):
            frame = (
                read_frame(args.data)
                if args.data is not None
                else generate(dataset_config(settings, drift=args.drift, seed=args.seed, n_requests=args.n_requests))
            )
        with observer.step(f"Training {args.version_name} on {len(frame):,} requests"):
            trained = train_version(frame, settings, args.version_name, out_dir)
        observer.trained(trained)
        title = "Logging to MLflow" + (" and registering" if register else "")
        with observer.step(title):
            registration = track_and_register(
                trained, settings, register=register, alias=args.alias, reason=args.reason
            )
        observer.registered(registration)
    console.print(f"bundle and report in {out_dir}", soft_wrap=True)
    return ExitCode.OK if trained.gate.passed else ExitCode.QUALITY_GATE


def cmd_train_from_log(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    from service.artifacts.registry import ModelRegistry
    from service.training.from_log import LogWindow, RichProgress, train_from_log

    dsn = args.dsn_file.read_text(encoding="utf-8").strip()
    end = as_utc(args.end) if args.end is not None else datetime.now(UTC)
    window = LogWindow(end - timedelta(days=args.window_days), end, as_utc(args.as_of) if args.as_of else end)
    work_dir = args.out_dir or settings.artifacts_dir
    with RichProgress(console) as progress:
        payload, result = train_from_log(settings, dsn, window, args.version_name, work_dir, args.engine, progress)
        with progress.stage("Logging to MLflow"):
            run = ModelRegistry(settings).log_run(payload)
    console.print(
        f"{args.version_name}: engine {result.engine}, {payload.tags['data_rows']} rows "
        f"({payload.tags['window_start']} .. {payload.tags['window_end']}, labels as of {window.as_of.isoformat()}), "
        f"test PR-AUC {payload.metrics['test_pr_auc']:.4f}; MLflow run {run.run_id}; bundle in {payload.bundle_dir}",
        soft_wrap=True,
    )
    return ExitCode.OK


def cmd_registry(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    if args.action == "alias" and args.alias in RESERVED_ALIASES:
        raise UsageError(f"alias {args.alias!r} is moved by 'registry promote' / 'registry rollback'")
    from service.artifacts.registry import ModelRegistry
    from service.training.pipeline import apply_alias, serving_dir

    registry = ModelRegistry(settings)
    name = args.name or settings.registered_model_name
    if args.action == "list":
        refs = registry.versions(name)
        if not refs:
            console.print(f"no versions of {name!r} in {registry.tracking_uri}", soft_wrap=True)
            return ExitCode.NOT_FOUND
        console.print(versions_table(name, refs))
        return ExitCode.OK
    if args.action == "alias":
        moves = apply_alias(registry, name, args.alias, args.version, args.reason)
    elif args.action == "promote":
        moves = registry.promote(name, args.version, args.reason)
    elif args.action == "rollback":
        moves = registry.rollback(name, args.reason)
    else:
        ref = registry.resolve(name, args.ref)
        path = registry.fetch_bundle(ref, args.dest or serving_dir(settings, args.ref))
        console.print(f"{name} v{ref.version} ({ref.model_version}) verified, sha256 {ref.sha256}", soft_wrap=True)
        console.print(str(path), soft_wrap=True)
        return ExitCode.OK
    for move in moves:
        console.print(f"{move.alias}: {move.before or '-'} → {move.version or '-'}", soft_wrap=True)
    if not moves:
        console.print("nothing to change", soft_wrap=True)
    console.print(registry.aliases(name), soft_wrap=True)
    return ExitCode.OK


#: Exit code of each retrain/recalibrate outcome (service.retraining.job.RetrainOutcome values).
RETRAIN_EXIT_CODES: Final[dict[str, ExitCode]] = {
    "rollout_started": ExitCode.OK,
    "registered": ExitCode.OK,
    "rollout_not_started": ExitCode.ROLLOUT_NOT_STARTED,
    "quality_gate_failed": ExitCode.QUALITY_GATE,
    "no_improvement": ExitCode.NOTHING_SHIPPED,
    "insufficient_data": ExitCode.NOTHING_SHIPPED,
    "failed": ExitCode.FAILURE,
}
#: Gate values shown after a retrain, in this order (prefixed by gate: test_window_…, regression_…).
SHOWN_GATE_METRICS: Final[tuple[str, ...]] = ("pr_auc", "recall", "precision", "recall_new_bot_farm")


def retrain_table(report: RetrainReport) -> Table:
    table = Table(title=f"{report.operation} {report.retrain_id}: {report.outcome.value}")
    table.add_column("")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = [("trigger", f"{report.kind}: {report.reason}")]
    if report.source:
        rows.append(("data", f"{report.source}, engine {report.engine or '-'}"))
    if report.window is not None:
        w = report.window
        labels = f", labels as of {w.as_of}" if w.as_of else ""
        rows.append(("window", f"{w.start} … {w.end}: {w.rows:,} rows, {w.positives:,} frauds{labels}"))
    rows.append(("version", f"{report.version or '-'} (registry {report.registry_version or '-'})"))
    if report.gate is not None:
        for metric, value in sorted(report.gate.values.items()):
            if any(metric.endswith(f"_{shown}") for shown in SHOWN_GATE_METRICS):
                floor = report.gate.floors.get(metric)
                rows.append((metric, _num(value) + (f" (floor {floor:g})" if floor is not None else "")))
        rows.append(("quality gate", "passed" if report.gate.passed else "FAILED: " + "; ".join(report.gate.failures)))
    for key in ("ece_before", "ece_after", "brier_before", "brier_after", "threshold_before", "threshold_after"):
        if key in report.evidence:
            rows.append((key.replace("_", " "), _num(report.evidence[key])))
    if report.handoff is not None:
        rows.append((f"rollout ({report.handoff.via})", f"{report.handoff.outcome.value}: {report.handoff.detail}"))
    if report.detail:
        rows.append(("detail", report.detail))
    for label, text in rows:
        table.add_row(label, text)
    return table


def _write_summary(path: Path | None, report: RetrainReport) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True), encoding="utf-8")


def run_retrain_command(args: argparse.Namespace, settings: Settings, console: Console, operation: str) -> ExitCode:
    """``retrain`` and ``recalibrate``: one request, the configured hand-off, a report table and summary."""
    from service.retraining.handoff import handoff_for
    from service.retraining.job import RetrainKind, RetrainRequest, failed_report, retrain, safe_id
    from service.retraining.outcomes import new_retrain_id
    from service.retraining.recalibrate import recalibrate

    kind = RetrainKind(args.trigger)
    retrain_id = safe_id(args.retrain_id) if args.retrain_id else new_retrain_id(f"{kind.value}-{operation}")
    request = RetrainRequest(
        kind=kind,
        reason=args.reason or f"{kind.value} {operation}",
        retrain_id=retrain_id,
        data_path=args.data,
        window_days=args.window_days,
        window_end=args.window_end,
        start_rollout=not args.no_rollout,
        version_name=args.version_name,
        base=getattr(args, "base", "champion"),
    )
    handoff = None if args.no_rollout else handoff_for(settings.retrain)
    run = recalibrate if operation == "recalibrate" else retrain
    correlation_id = correlation_id_from_header(args.correlation_id) if args.correlation_id else retrain_id
    with correlation_scope(correlation_id), RichObserver(console) as observer:
        try:
            report = run(settings, request, handoff=handoff, observer=observer)
        except Exception as error:
            _write_summary(args.summary_json, failed_report(request, operation, error))
            raise
    console.print(retrain_table(report))
    _write_summary(args.summary_json, report)
    return RETRAIN_EXIT_CODES[report.outcome.value]


def cmd_retrain(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    return run_retrain_command(args, settings, console, "retrain")


def cmd_recalibrate(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    return run_retrain_command(args, settings, console, "recalibrate")


def cmd_score(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    import httpx

    from service.demo.quickstart import PREDICT_ROUTE

    url = args.url.rstrip("/") + PREDICT_ROUTE
    response = httpx.post(url, json=args.body, timeout=settings.process.http_timeout_s)
    console.out(response.text, highlight=False)
    return ExitCode.OK if response.is_success else ExitCode.FAILURE


def cmd_demo(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    from service.demo.quickstart import run_demo

    with RichObserver(console) as observer:
        summary = run_demo(settings, observer, drift=args.drift, reason=args.reason)
    console.print(summary_table(summary))
    for key, value in summary.paths.items():
        console.print(f"{key:>20}: {value}", soft_wrap=True, highlight=False)
    timings = ", ".join(f"{key} {value:.1f}s" for key, value in summary.timings_s.items())
    wall = time.perf_counter() - args.started_at
    console.print(f"demo finished in {wall:.1f} s wall, including start-up ({timings})", soft_wrap=True)
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        document = {**summary.to_dict(), "wall_s": round(wall, 3)}
        args.summary_json.write_text(json.dumps(document, indent=2, sort_keys=True), encoding="utf-8")
    ok = all(item["status"] == 200 for item in summary.responses)
    return ExitCode.OK if ok else ExitCode.FAILURE


def cmd_demo_versions(args: argparse.Namespace, settings: Settings, console: Console) -> ExitCode:
    from service.demo.versions import DemoDataSettings, prepare_rollout_versions

    with RichObserver(console) as observer:
        result = prepare_rollout_versions(settings, DemoDataSettings(), observer, reason=args.reason)
    console.print(demo_versions_table(result))
    for key in ("live_traffic", "regression_set", "tracking_uri"):
        console.print(f"{key:>15}: {getattr(result, key)}", soft_wrap=True, highlight=False)
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    return ExitCode.OK


COMMANDS: Final[dict[str, Callable[[argparse.Namespace, Settings, Console], ExitCode]]] = {
    "generate": cmd_generate,
    "train": cmd_train,
    "train-from-log": cmd_train_from_log,
    "registry": cmd_registry,
    "retrain": cmd_retrain,
    "recalibrate": cmd_recalibrate,
    "score": cmd_score,
    "demo": cmd_demo,
    "demo-versions": cmd_demo_versions,
}


# ------------------------------------------------------------------------------------------------ main


def exit_code_for(error: BaseException) -> ExitCode:
    """The documented exit code of an error raised by a command."""
    from service.artifacts.bundle import ModelIntegrityError
    from service.artifacts.registry import RegistryNotFoundError
    from service.retraining.job import RegressionSetMissingError
    from service.retraining.sources import LabelSourceMissingError
    from service.training.pipeline import QualityGateFailedError

    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, TerminatedError):
        return ExitCode.TERMINATED
    if isinstance(error, UsageError | RegressionSetMissingError | LabelSourceMissingError):
        return ExitCode.USAGE
    if isinstance(error, QualityGateFailedError):
        return ExitCode.QUALITY_GATE
    if isinstance(error, RegistryNotFoundError | FileNotFoundError):
        return ExitCode.NOT_FOUND
    if isinstance(error, ModelIntegrityError):
        return ExitCode.INTEGRITY
    return ExitCode.FAILURE


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.home is not None:
        overrides["home"] = args.home
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    return Settings(**overrides)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise TerminatedError(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fraudwatch`` console script; returns the exit code."""
    started_at = time.perf_counter()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else int(ExitCode.USAGE)
    args.started_at = started_at
    console = Console()
    errors = Console(stderr=True)
    try:
        settings = settings_from(args)
        configure_logging(settings.log_level)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            code = COMMANDS[args.command](args, settings, console)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except (Exception, KeyboardInterrupt, TerminatedError) as error:
        code = exit_code_for(error)
        log_event(logger, "command failed", command=args.command, error=repr(error), exit_code=int(code))
        errors.print(f"[red]fraudwatch {args.command}: {type(error).__name__}:[/] {error}", soft_wrap=True)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
