"""``fraudwatch-demo`` (``make demo``): the product on one machine — a model rollout from training to rollback.

1. **Model side** — ``fraudwatch demo-versions`` as a subprocess (the hand-off is its JSON; this package never
   imports training code): v1 (champion, trained before a new bot farm appeared), v2 (trained after it), v3 (v2's
   booster with its threshold raised: a deliberately bad version whose scores look exactly like v2's), all logged
   and registered in MLflow (SQLite), plus the live traffic and the regression set.
2. **Stack** — Prometheus (Debian's binary, ``deploy/prometheus/rules.yml``), the router, the rollout controller
   (``python -m rollout.controller``; it starts ``bentoml serve`` for the champion and every candidate), the MLflow
   UI and the dashboard (``fraudwatch-dashboard``), then locust headless (its CLI, its own process) replaying the
   live traffic and posting each answer's fraud label after its (time-compressed) delay.
3. **Rollouts** — ``rolloutctl start --candidate v2``: the controller walks v2 through quality → shadow → canary →
   A/B → full on Prometheus evidence while the progress is shown live; then ``rolloutctl start --candidate v3``:
   health and drift gates pass, the outcome gates (recall) fail once labels arrive, v3 is rolled back.
4. **Report** — a summary, ``report/timeline.png`` and ``report/timeline.html`` (decisions per version over time,
   gate values per monitoring layer, every transition with its gate values), ``report/summary.json``.

Every child runs in its own session and is stopped on the way out — also on Ctrl-C or SIGTERM (the controller
stops the model servers it started; the ones it recorded are stopped again in case it could not). Settings:
``FW_ROLLOUT_DEMO__…`` (:class:`DemoSettings`), the model side's ``FW_DEMO__…`` (``service/demo/versions.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

from pydantic import ValidationError
from rich.console import Console
from rich.live import Live

from rollout.backends.local.events import read_events
from rollout.backends.local.inbox import EVENTS_FILE
from rollout.backends.local.state import StateStore
from rollout.backends.prometheus import PrometheusClient, PrometheusError, RangeSeries
from rollout.core.machine import RolloutState
from rollout.core.state import ControllerState, StateError
from rollout.demo.policy import load_demo_policy
from rollout.demo.processes import (
    signals_ignored,
)
from rollout.demo.settings import EPILOG, DemoError, DemoSettings, ExitCode, TerminatedError
from rollout.demo.stack import (
    BIN,
    ROLE_ORDER,
    UI_NAMES,
    ModelSide,
    Run,
    demo_policy,
    http_ok,
    prepare_home,
    run_model_side,
    start_stack,
)
from rollout.demo.timeline import (
    FINISHED,
    ObservedShare,
    RolloutSummary,
    Timeline,
    build_timeline,
    render_html,
    render_png,
    summarize,
    write_points,
)
from rollout.demo.view import rollout_view, status_line, summary_table, transition_line
from service.common.logging import configure_logging, get_logger, log_event

logger = get_logger("rollout.demo")

SUMMARY_FILE: Final[str] = "summary.json"
GATES_FILE: Final[str] = "gates.jsonl"


# --------------------------------------------------------------------------------------------------- hand-off


# --------------------------------------------------------------------------------------------------- waiting


# --------------------------------------------------------------------------------------------------- the run


# --------------------------------------------------------------------------------------------------- rollouts


def read_state(state_dir: Path) -> ControllerState | None:
    try:
        return StateStore(state_dir).load()
    except (StateError, OSError):
        return None


def ctl(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rolloutctl"), *args], env=run.env, capture_output=True, text=True,
                          timeout=run.settings.command_timeout_s + 30, check=False)  # fmt: skip


def start_rollout(run: Run, candidate: str, rollout_id: str, reason: str) -> None:
    done = ctl(run, "start", "--candidate", candidate, "--id", rollout_id, "--reason", reason)
    if done.returncode != 0:
        raise DemoError(ExitCode.UNEXPECTED, f"rolloutctl start {candidate} exited {done.returncode}: "
                        f"{(done.stdout + done.stderr).strip()}")  # fmt: skip
    run.say(f"$ rolloutctl start --candidate {candidate} --id {rollout_id} → {done.stdout.strip()}")


def watch(run: Run, rollout_id: str) -> RolloutState:
    """Show the rollout live until it is Promoted, RolledBack or Aborted; sample its gates for the timeline."""
    s = run.settings
    assert run.policy is not None and run.controller is not None
    policy = run.policy
    deadline = time.monotonic() + s.rollout_timeout_s
    seen = 0
    last_plain = -float("inf")
    live = Live(console=run.console, refresh_per_second=4, transient=False) if run.console.is_terminal else None
    with live if live is not None else contextlib.nullcontext():
        while True:
            state = read_state(run.state_dir)
            run.sampler.observe(state)
            rollout = state.rollout if state is not None else None
            now = datetime.now(UTC)
            if rollout is not None and rollout.rollout_id == rollout_id:
                for transition in rollout.history[seen:]:
                    line = transition_line(rollout, transition, (transition.at - run.started_at).total_seconds())
                    if live is not None:
                        live.console.print(line, soft_wrap=True, highlight=False)
                    else:
                        run.console.print(line, soft_wrap=True, highlight=False)
                seen = len(rollout.history)
                started_at = state.rollout_started_at if state is not None else None
                if live is not None:
                    live.update(rollout_view(rollout, policy, now, started_at=started_at, footer=_footer(run)))
                elif time.monotonic() - last_plain >= s.plain_status_s:
                    last_plain = time.monotonic()
                    run.console.print(status_line(rollout, policy, now, run.elapsed()), soft_wrap=True, highlight=False)
                if rollout.phase in FINISHED:
                    return rollout
            if not run.controller.running():
                raise DemoError(ExitCode.FAILURE, f"the controller exited: {run.controller.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(ExitCode.TIMEOUT, f"rollout {rollout_id} did not finish in {s.rollout_timeout_s:.0f} s")
            time.sleep(s.refresh_s)


def _footer(run: Run) -> str:
    urls = "  ".join(f"{k} {v}" for k, v in run.urls.items() if k in ("dashboard", "mlflow", "prometheus"))
    return f"{run.elapsed():.0f} s since start   {urls}   (Ctrl-C stops everything)"


def check_outcomes(summaries: Sequence[RolloutSummary], side: ModelSide) -> list[str]:
    """What differs from the designed run: v2 promoted through every stage; v3 rolled back by outcome gates only,
    a recall gate among them (the paired one in shadow when its fraud labels arrive in time), after its health and
    drift gates had passed."""
    problems = []
    good = next((r for r in summaries if r.candidate == side.challenger), None)
    bad = next((r for r in summaries if r.candidate == side.bad), None)
    if good is None:
        problems.append(f"no rollout of {side.challenger}")
    else:
        if good.phase != "Promoted":
            problems.append(f"{side.challenger} ended {good.phase}: {good.reason}")
        if good.path != ("quality", "shadow", "canary", "ab", "full"):
            problems.append(f"{side.challenger} went through {' → '.join(good.path)}")
    if bad is None:
        problems.append(f"no rollout of {side.bad}")
    else:
        if bad.phase != "RolledBack" or not bad.ended_by.startswith("analysis"):
            problems.append(f"{side.bad} ended {bad.phase} ({bad.ended_by}): {bad.reason}")
        if bad.failed_layers != {"outcome"}:
            problems.append(f"{side.bad} failed gates of {sorted(bad.failed_layers)}, not the outcome layer alone")
        if not {"recall", "recall-paired"} & {g.get("name") for g in bad.failed_gates}:
            problems.append(f"{side.bad} was not caught by a recall gate (paired in shadow, or in A/B and full)")
        drift_and_health = {"error-rate", "latency", "input-psi-max", "score-psi", "decision-rate-shift"}
        missing = drift_and_health - set(bad.passed_gates)
        # Caught in shadow by a paired gate, v3 may be rolled back before the drift gates' evidence minimums are
        # met: that none of them failed is checked above (the outcome layer alone failed).
        if missing and bad.path[-1] != "shadow":
            problems.append(f"{side.bad}'s {', '.join(sorted(missing))} never passed before the rollback")
    return problems


def measured_shares(prometheus_url: str, started_at: datetime, now: datetime, step_s: float) -> list[ObservedShare]:
    """Each version's share of the router's deciding calls over the run (range query on its counters)."""
    query = 'sum by (model_version) (rate(fraudwatch_router_requests_total{role="decider"}[5s]))'
    try:
        with PrometheusClient(prometheus_url, timeout_s=10.0, trust_env=False) as client:
            result = client.query_range(query, started_at.timestamp(), now.timestamp(), step_s)
    except PrometheusError as exc:
        log_event(logger, "measured shares unavailable", event="demo_measured_failed", error=str(exc))
        return []
    return shares_of(result, started_at.timestamp())


def shares_of(result: Sequence[RangeSeries], origin: float) -> list[ObservedShare]:
    """A range query's series (one per version) as each version's share of their sum at every step, in seconds
    since ``origin`` (a UNIX time)."""
    totals: dict[float, float] = {}
    for _labels, points in result:
        for at, value in points:
            totals[at] = totals.get(at, 0.0) + value
    shares = []
    for labels, points in result:
        version = labels.get("model_version", "")
        for at, value in points:
            total = totals[at]
            if total > 0:
                shares.append(ObservedShare(at - origin, version, 100.0 * value / total))
    return shares


def locust_stats(prefix: Path) -> dict[str, dict[str, float]]:
    """Requests, failures and throughput per request name from locust's ``--csv`` stats file."""
    path = prefix.with_name(prefix.name + "_stats.csv")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return {}
    out = {}
    for row in rows:
        with contextlib.suppress(KeyError, ValueError):
            out[row["Name"]] = {
                "requests": float(row["Request Count"]),
                "failures": float(row["Failure Count"]),
                "rps": round(float(row["Requests/s"]), 2),
                "p50_ms": float(row["50%"]),
                "p99_ms": float(row["99%"]),
            }
    return out


# --------------------------------------------------------------------------------------------------- main flow


@dataclass
class Outcome:
    code: ExitCode
    message: str = ""
    summaries: list[RolloutSummary] = field(default_factory=list)
    report: dict[str, str] = field(default_factory=dict)


def rollouts(run: Run, side: ModelSide) -> None:
    for candidate, role in ((side.challenger, "trained after the new bot farm appeared"),
                            (side.bad, "deliberately bad: v2's booster, threshold raised")):  # fmt: skip
        started = time.monotonic()
        rollout_id = f"demo-{candidate}"
        run.console.rule(f"rollout of {candidate} ({role})")
        start_rollout(run, candidate, rollout_id, f"fraudwatch-demo: {role}")
        finished = watch(run, rollout_id)
        run.lap(f"rollout_{candidate}", started)
        run.say(f"rollout {rollout_id}: [bold]{finished.phase}[/] after {run.timings_s[f'rollout_{candidate}']:.0f} s "
                f"— {finished.history[-1].reason}")  # fmt: skip
        if candidate == side.challenger and finished.phase != "Promoted":
            # v3 is meant to be measured against the promoted v2: without it the second act would show nothing
            raise DemoError(ExitCode.UNEXPECTED, f"{candidate} ended {finished.phase}: {finished.history[-1].reason}")


def build_report(run: Run, side: ModelSide | None) -> tuple[Timeline, list[RolloutSummary], dict[str, str]]:
    now = datetime.now(UTC)
    policy = run.policy or load_demo_policy(run.settings.time_scale)
    timeline = build_timeline(read_events(run.state_dir / EVENTS_FILE), run.sampler.points, policy, run.started_at)
    summaries = summarize(timeline, now)
    write_points(run.sampler.points, run.report_dir / GATES_FILE)
    serving = run.timings_s.get("model_side", 0.0) + run.timings_s.get("stack", 0.0)
    png = render_png(timeline, run.report_dir / "timeline.png", now, run.observed, serving_since=serving)
    facts: dict[str, Any] = {
        "wall time (s)": round(run.elapsed(), 1),
        **{f"{k} (s)": v for k, v in run.timings_s.items()},
    }
    if side is not None:
        facts |= {f"{role} version": version for role, version in side.versions.items()}
        facts |= {
            f"{version} on the regression set": ", ".join(f"{key} {value:.3f}" for key, value in metrics.items())
            for version, metrics in side.regression_metrics.items()
        }
    html_path = render_html(timeline, summaries, run.report_dir / "timeline.html", png=png, facts=facts)
    return timeline, summaries, {"html": str(html_path), "png": str(png)}


def execute(run: Run) -> Outcome:
    """The whole demo; every child is stopped before this returns or raises."""
    prepare_home(run.settings)
    run.logs.mkdir(parents=True, exist_ok=True)
    run.log_file = (run.logs / "demo.log").open("a", encoding="utf-8")
    configure_logging(run.settings.log_level, stream=run.log_file)  # JSON logs to a file: the terminal is rich's
    intro(run)
    side: ModelSide | None = None
    outcome: Outcome | None = None
    try:
        try:
            side = run_model_side(run)
            run.model_side = side
            start_stack(run, side)
            rollouts(run, side)
            if run.prometheus is not None:
                run.observed = measured_shares(run.prometheus.url, run.started_at, datetime.now(UTC),
                                               run.settings.measured_step_s)  # fmt: skip
            run.answered = {name: http_ok(run.urls[name] + "/") for name in UI_NAMES if name in run.urls}
            outcome = judged(run, side, Outcome(ExitCode.OK))  # while the stack is up, so --hold can show it
            if run.settings.hold:
                hold(run, outcome)
        finally:
            with signals_ignored():
                run.say("stopping every process of the demo")
                stopping = time.monotonic()
                run.stack.close()
                run.lap("shutdown", stopping)
    except DemoError as error:
        outcome = judged(run, side, Outcome(error.code, str(error)))
    assert outcome is not None
    return outcome


def judged(run: Run, side: ModelSide | None, outcome: Outcome) -> Outcome:
    """``outcome`` with the report written and, for a run that went through, its rollouts checked."""
    _, outcome.summaries, outcome.report = build_report(run, side)
    if outcome.code == ExitCode.OK and side is not None:
        problems = check_outcomes(outcome.summaries, side)
        if problems:
            outcome.code, outcome.message = ExitCode.UNEXPECTED, "; ".join(problems)
    return outcome


def intro(run: Run) -> None:
    s = run.settings
    run.console.rule("fraudwatch rollout demo")
    run.console.print(
        "v1 (trained before a new bot farm appeared) serves; v2 (trained after it) is rolled out through quality → "
        "shadow → canary → A/B → full on Prometheus evidence; then v3 — v2's scores with a raised threshold, so it "
        f"looks normal but misses fraud — must be rolled back by the outcome gates. Stages of at least "
        f"{demo_policy(s).stages.shadow.min_duration_s:.0f} s; everything under {run.home}.",
        soft_wrap=False,
    )


def hold(run: Run, outcome: Outcome) -> None:
    """Keep the stack serving (UIs included) until Ctrl-C, which then ends the demo normally."""
    urls = ", ".join(f"{name} {url}" for name, url in run.urls.items())
    run.say(f"[bold]--hold[/]: the stack keeps serving ({urls}); report {outcome.report.get('html', '')}. "
            "Ctrl-C stops everything.")  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(1.0)


def summary_document(run: Run, outcome: Outcome) -> dict[str, Any]:
    side = run.model_side
    return {
        "exit_code": int(outcome.code),
        "message": outcome.message,
        "wall_s": round(run.elapsed(), 2),
        "timings_s": run.timings_s,
        "versions": side.versions if side else {},
        "registry_versions": side.registry_versions if side else {},
        "regression_metrics": side.regression_metrics if side else {},
        "stream": side.stream if side else {},
        "rollouts": [s.to_dict() for s in outcome.summaries],
        "report": outcome.report,
        "urls": run.urls,
        "ui_answered": run.answered,
        "children": run.children,
        "workload_pids": sorted(set(run.workload_pids)),
        "traffic": locust_stats(run.logs / "locust"),
        "home": str(run.home),
    }


def print_summary(run: Run, outcome: Outcome, document: Mapping[str, Any]) -> None:
    console = run.console
    console.rule("summary")
    side = run.model_side
    if side is not None:
        for role, version in sorted(side.versions.items(), key=lambda item: ROLE_ORDER.index(item[0])):
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in side.regression_metrics.get(version, {}).items())
            console.print(f"{role:>10} {version}: regression set {metrics}", soft_wrap=True, highlight=False)
    if outcome.summaries:
        console.print(summary_table(outcome.summaries))
    traffic = document.get("traffic", {}).get("Aggregated")
    if traffic:
        calls = f"{traffic['requests']:.0f} calls through the router ({traffic['failures']:.0f} failed)"
        console.print(f"traffic: {calls}, {traffic['rps']:.0f}/s, p99 {traffic['p99_ms']:.0f} ms", soft_wrap=True)
    for key, value in outcome.report.items():
        console.print(f"timeline report ({key}): {value}", soft_wrap=True, highlight=False)
    verdict = "[bold green]as designed[/]" if outcome.code == ExitCode.OK else f"[bold red]{outcome.message}[/]"
    console.print(f"demo finished in {run.elapsed():.0f} s wall (exit {int(outcome.code)}): {verdict}", soft_wrap=True)


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudwatch-demo",
        description="The rollout demo on one machine: train v1/v2/v3, serve them through the router and the rollout "
        "controller under locust load, watch v2 promoted and the deliberately bad v3 rolled back, write a timeline "
        "report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", type=Path, help="run directory (default: FW_ROLLOUT_DEMO__HOME, else var/demo)")
    parser.add_argument(
        "--time-scale", type=float, help="stage minimum multiplier (default: FW_ROLLOUT_DEMO__TIME_SCALE)"
    )
    parser.add_argument("--no-ui", action="store_true", help="start neither the MLflow UI nor the dashboard")
    parser.add_argument(
        "--hold", action="store_true", help="after the report keep everything serving until Ctrl-C (exit 0 then)"
    )
    parser.add_argument("--summary-json", type=Path, help="also write the summary here (always in HOME/report)")
    return parser


def settings_from(args: argparse.Namespace) -> DemoSettings:
    overrides: dict[str, Any] = {}
    if args.home is not None:
        overrides["home"] = args.home
    if args.time_scale is not None:
        overrides["time_scale"] = args.time_scale
    if args.no_ui:
        overrides |= {"mlflow_ui": False, "dashboard": False}
    if args.hold:
        overrides["hold"] = True
    return DemoSettings.model_validate({**DemoSettings().model_dump(), **overrides})


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise TerminatedError(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else int(ExitCode.USAGE)
    console = Console()
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        console.print(f"fraudwatch-demo: invalid settings: {exc}", soft_wrap=True)
        return int(ExitCode.USAGE)
    run = Run(settings=settings, console=console)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        outcome = execute(run)
    except KeyboardInterrupt:
        outcome = Outcome(ExitCode.INTERRUPTED, "interrupted")
    except TerminatedError:
        outcome = Outcome(ExitCode.TERMINATED, "terminated")
    except Exception as exc:  # a bug or an unforeseen failure: still a summary
        outcome = Outcome(ExitCode.FAILURE, f"{type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    document = summary_document(run, outcome)
    with contextlib.suppress(OSError):
        run.report_dir.mkdir(parents=True, exist_ok=True)
        (run.report_dir / SUMMARY_FILE).write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
        if args.summary_json is not None:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    print_summary(run, outcome, document)
    if run.log_file is not None:
        run.log_file.close()
    return int(outcome.code)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
