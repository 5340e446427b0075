"""What ``fraudwatch-demo`` shows while a rollout runs, and after: rich renderables built from the saved state.

* :func:`rollout_view` — the live panel: versions, phase, stage with its time against the stage minimum, the
  decision split as a bar, the stages walked so far, and every gate of the stage with its value, stable's value,
  the bound compared, the condition and the verdict;
* :func:`transition_line` / :func:`status_line` — one plain line per transition and a periodic status line, for
  output that is not a terminal (CI logs, pipes);
* :func:`summary_table` — the rollouts of the run, how each ended and why.

Pure functions of :class:`~rollout.core.machine.RolloutState`, the policy and the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from rollout.core.evidence import gate_evidence
from rollout.core.machine import QUALITY_STAGE, RolloutState, Transition, expected_gates, traffic_stage
from rollout.core.policy import PERCENT, RolloutPolicy
from rollout.demo.timeline import RolloutSummary, fmt

BAR_WIDTH: Final[int] = 40
VERDICT_STYLE: Final[dict[str, str]] = {
    "Successful": "green",
    "Failed": "bold red",
    "Inconclusive": "yellow",
    "Error": "magenta",
    "waiting": "dim",
}
PHASE_STYLE: Final[dict[str, str]] = {
    "Progressing": "cyan",
    "Promoted": "bold green",
    "RolledBack": "bold red",
    "Aborted": "bold yellow",
}


def time_in_stage(rollout: RolloutState, now: datetime) -> float:
    until = rollout.finished_at if rollout.finished_at is not None else now
    return max(0.0, (until - rollout.stage_entered_at).total_seconds())


def minimum_s(rollout: RolloutState, policy: RolloutPolicy) -> float:
    return 0.0 if rollout.stage == QUALITY_STAGE else policy.stages.of(traffic_stage(rollout.stage)).min_duration_s


def split_bar(stable: str, candidate: str, candidate_weight: int, width: int = BAR_WIDTH) -> Text:
    """``v1 95 % ███████████████████████████████████████░ v2 5 %`` (stable blue, candidate magenta)."""
    filled = round(width * candidate_weight / PERCENT)
    text = Text(f"{stable} {PERCENT - candidate_weight:>3} % ", style="bold")
    text.append("█" * (width - filled), style="blue")
    text.append("█" * filled, style="magenta")
    text.append(f" {candidate} {candidate_weight:>3} %", style="bold")
    return text


def walked(rollout: RolloutState, started_at: datetime | None) -> Text:
    """The stages so far with their seconds: ``✓ quality 1.1 s → ✓ shadow 20.4 s → ● canary``."""
    text = Text()
    entered = started_at
    for transition in rollout.history:
        if transition.to_stage == transition.from_stage and transition.to_phase == transition.from_phase:
            continue  # pause / resume: same stage, same clock
        failed = transition.to_phase in ("RolledBack", "Aborted")
        seconds = "" if entered is None else f" {(transition.at - entered).total_seconds():.1f} s"
        text.append(f"{'✗' if failed else '✓'} {transition.from_stage}{seconds}", style="red" if failed else "green")
        text.append(" → ")
        entered = transition.at
    if rollout.phase == "Progressing":
        text.append(f"● {rollout.stage}", style="bold cyan")
    else:
        text.append(rollout.phase, style=PHASE_STYLE.get(rollout.phase, "white"))
    return text


def gates_table(rollout: RolloutState, policy: RolloutPolicy) -> Table:
    table = Table(title=f"gates of {rollout.stage}", title_justify="left", expand=False, pad_edge=False)
    for column in ("gate", "layer", "verdict", "candidate", "stable", "evidence", "condition", "detail"):
        table.add_column(column, overflow="fold", justify="right" if column in ("candidate", "stable") else "left")
    final = {g.name: g for g in rollout.history[-1].gates} if rollout.history and rollout.phase != "Progressing" else {}
    names = list(dict.fromkeys([*expected_gates(policy, rollout.stage), *rollout.gates, *final]))
    for name in names:
        history = rollout.gates.get(name)
        last = history.last if history is not None and history.last is not None else final.get(name)
        if last is None:
            table.add_row(name, "", Text("waiting", style="dim"), "", "", "", "", "")
            continue
        candidate = (
            ", ".join(f"{k}={v:.3g}" for k, v in last.values.items()) if last.values else fmt(last.candidate_value)
        )
        verdict = last.status.value
        table.add_row(
            name,
            last.layer,
            Text(verdict, style=VERDICT_STYLE.get(verdict, "white")),
            candidate,
            fmt(last.stable_value),
            gate_evidence(last)["evidence"] or f"bound {fmt(last.bound)}",
            last.condition or "",
            "" if verdict == "Successful" else last.message,
        )
    return table


def rollout_view(
    rollout: RolloutState, policy: RolloutPolicy, now: datetime, *, started_at: datetime | None = None, footer: str = ""
) -> RenderableType:
    phase = Text(rollout.phase, style=PHASE_STYLE.get(rollout.phase, "white"))
    head = Text.assemble(
        ("rollout ", ""), (rollout.rollout_id, "bold"), f": {rollout.stable} → {rollout.candidate}   phase ", phase,
        "   stage ", (rollout.stage, "bold"),
        f"   {time_in_stage(rollout, now):.0f} s in stage (minimum {minimum_s(rollout, policy):.0f} s)",
        (" paused" if rollout.paused else "", "yellow"),
    )  # fmt: skip
    parts: list[RenderableType] = [
        head,
        split_bar(rollout.stable, rollout.candidate, rollout.weights.candidate),
        walked(rollout, started_at),
        gates_table(rollout, policy),
    ]
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def transition_line(rollout: RolloutState, transition: Transition, seconds: float) -> str:
    failed = [g.name for g in transition.gates if g.status.value == "Failed"]
    why = f" — failed: {', '.join(failed)}" if failed else ""
    return (
        f"[{seconds:7.1f} s] {rollout.rollout_id}: {transition.from_phase}/{transition.from_stage} → "
        f"{transition.to_phase}/{transition.to_stage} ({transition.trigger}: {transition.reason}){why}"
    )


def status_line(rollout: RolloutState, policy: RolloutPolicy, now: datetime, seconds: float) -> str:
    verdicts: dict[str, int] = {}
    for history in rollout.gates.values():
        if history.last is not None:
            verdicts[history.last.status.value] = verdicts.get(history.last.status.value, 0) + 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(verdicts.items())) or "no measurement yet"
    return (
        f"[{seconds:7.1f} s] {rollout.rollout_id}: {rollout.phase}/{rollout.stage} "
        f"{time_in_stage(rollout, now):.0f}/{minimum_s(rollout, policy):.0f} s, "
        f"{rollout.stable} {rollout.weights.stable} % / {rollout.candidate} {rollout.weights.candidate} %, "
        f"gates: {counts}"
    )


def summary_table(summaries: Sequence[RolloutSummary]) -> Table:
    table = Table(title="rollouts")
    for column in ("rollout", "stable → candidate", "outcome", "stages (seconds)", "ended by", "failed gates"):
        table.add_column(column, overflow="fold")
    for summary in summaries:
        stages = " → ".join(f"{stage} {seconds:.0f}" for stage, seconds in summary.stages)
        failed = "; ".join(
            f"{g.get('name')} ({g.get('layer')}): candidate {fmt(g.get('candidate_value'))} vs stable "
            f"{fmt(g.get('stable_value'))}, needs {g.get('condition', '')}"
            for g in summary.failed_gates
        )
        table.add_row(
            summary.rollout_id,
            f"{summary.stable} → {summary.candidate}",
            Text(summary.phase, style=PHASE_STYLE.get(summary.phase, "white")),
            stages,
            f"{summary.ended_by}: {summary.reason}",
            failed or "—",
        )
    return table
