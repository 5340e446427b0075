"""The rollout timeline: what happened when, from the controller's records, and a report of it (PNG + HTML).

Sources (both written by the controller, read here without touching it):

* the event log (``events.jsonl``, :mod:`rollout.core.events`) — every transition exactly once, with its trigger,
  reason and the gate values behind it, and a note when a rollout starts;
* the gate measurements between transitions, sampled from successive controller states (``state.json`` keeps each
  gate's latest measurement of the current stage) by :class:`GateSampler`.

:func:`build_timeline` joins them into one :class:`Timeline` per run (the rollouts in order); :func:`summarize`
says how each rollout went (stages and their durations, what ended it, which gates failed and which had passed);
:func:`decision_shares` gives each version's planned share of decisions over time. :func:`render_png` draws the
weights, the gate values per monitoring layer and the transitions; :func:`render_html` writes one self-contained
page (the chart inline, the summaries, every transition with its gate values). Everything but the two renderers is
pure.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from rollout.core.evidence import gate_evidence
from rollout.core.machine import ROLLED_BACK_PHASES, weights_for
from rollout.core.policy import PERCENT, RolloutPolicy
from rollout.core.state import ControllerState

#: The gate layers in the order the report shows them (the quality stage's gate has no time series).
LAYERS: Final[tuple[tuple[str, str], ...]] = (
    ("health", "service health"),
    ("input_drift", "input drift"),
    ("output_drift", "output drift"),
    ("outcome", "outcomes (labelled)"),
)
FINISHED: Final[frozenset[str]] = frozenset({"Promoted", *ROLLED_BACK_PHASES})
_STAGE_COLOURS: Final[dict[str, str]] = {
    "quality": "#eeeeee",
    "shadow": "#e3ecf7",
    "canary": "#fdf0d5",
    "ab": "#e6f4e6",
    "full": "#f3e5f5",
}
_FAILED_STATUS: Final[str] = "Failed"
_SUCCESS_STATUS: Final[str] = "Successful"


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class GatePoint:
    """One gate measurement of one rollout's stage."""

    at: datetime
    rollout_id: str
    stage: str
    name: str
    layer: str
    status: str
    candidate: float | None = None
    stable: float | None = None
    bound: float | None = None
    threshold: float | None = None
    condition: str | None = None
    labels: float | None = None
    #: The evidence (rollout/core/evidence.py): estimate, its interval, samples used and still needed, method.
    estimate: float | None = None
    interval: tuple[float, float] | None = None
    samples: float | None = None
    samples_needed: float | None = None
    method: str | None = None


@dataclass(frozen=True)
class TransitionPoint:
    """One transition as the event log records it, with the candidate's share of decisions after it."""

    at: datetime
    rollout_id: str
    trigger: str
    reason_code: str
    reason: str
    from_phase: str
    to_phase: str
    from_stage: str
    to_stage: str
    candidate_weight: int
    gates: tuple[Mapping[str, Any], ...] = ()

    @property
    def failed_gates(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(g for g in self.gates if g.get("status") == _FAILED_STATUS)


@dataclass
class RolloutTrack:
    """One rollout: its versions, when it started, its transitions and gate measurements in time order."""

    rollout_id: str
    stable: str
    candidate: str
    started_at: datetime | None = None
    transitions: list[TransitionPoint] = field(default_factory=list)
    gates: list[GatePoint] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return self.transitions[-1].to_phase if self.transitions else "Progressing"

    @property
    def begin(self) -> datetime | None:
        if self.started_at is not None:
            return self.started_at
        return self.transitions[0].at if self.transitions else None

    @property
    def finished_at(self) -> datetime | None:
        last = next((t for t in reversed(self.transitions) if t.to_phase in FINISHED), None)
        return last.at if last is not None else None


@dataclass
class Timeline:
    """Every rollout of one run, oldest first, on one clock (seconds since ``started_at``)."""

    started_at: datetime
    rollouts: list[RolloutTrack] = field(default_factory=list)

    def seconds(self, at: datetime) -> float:
        return (at - self.started_at).total_seconds()

    def rollout(self, rollout_id: str) -> RolloutTrack | None:
        return next((r for r in self.rollouts if r.rollout_id == rollout_id), None)


# --------------------------------------------------------------------------------------------------- building


class GateSampler:
    """Collects each gate measurement once from successive controller states (the state keeps only each gate's
    latest measurement of the current stage, so sample it at least as often as the analysis runs)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str, datetime]] = set()
        self.points: list[GatePoint] = []

    def observe(self, state: ControllerState | None) -> list[GatePoint]:
        """The measurements in ``state`` not seen before (also kept in :attr:`points`)."""
        rollout = state.rollout if state is not None else None
        if rollout is None:
            return []
        new = []
        for name, history in rollout.gates.items():
            last, at = history.last, history.last_at
            if last is None or at is None:
                continue
            key = (rollout.rollout_id, rollout.stage, name, at)
            if key in self._seen:
                continue
            self._seen.add(key)
            evidence = gate_evidence(last)
            interval = evidence["interval"]
            new.append(
                GatePoint(
                    at=at,
                    rollout_id=rollout.rollout_id,
                    stage=rollout.stage,
                    name=name,
                    layer=last.layer,
                    status=last.status.value,
                    candidate=last.candidate_value,
                    stable=last.stable_value,
                    bound=last.bound,
                    threshold=last.threshold,
                    condition=last.condition,
                    labels=last.labels,
                    estimate=evidence["estimate"],
                    interval=(interval[0], interval[1]) if interval else None,
                    samples=evidence["samples"],
                    samples_needed=evidence["samples_needed"],
                    method=evidence["method"],
                )
            )
        self.points.extend(new)
        return new


def write_points(points: Sequence[GatePoint], path: Path) -> Path:
    """The sampled measurements as JSON lines (the timeline can be rebuilt from them and the event log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for point in points:
            handle.write(json.dumps({**asdict(point), "at": point.at.isoformat()}) + "\n")
    return path


def read_points(path: Path) -> list[GatePoint]:
    points = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            data = json.loads(line)
            if data.get("interval") is not None:
                data["interval"] = tuple(data["interval"])
            points.append(GatePoint(**{**data, "at": datetime.fromisoformat(data["at"])}))
    return points


def _when(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def transition_of(event: Mapping[str, Any], policy: RolloutPolicy) -> TransitionPoint:
    """A ``transition`` event of the log as a :class:`TransitionPoint`."""
    weights = weights_for(policy, event["to_phase"], event["to_stage"])
    return TransitionPoint(
        at=_when(event["at"]),
        rollout_id=str(event["rollout_id"]),
        trigger=str(event.get("trigger", "")),
        reason_code=str(event.get("reason_code", "")),
        reason=str(event.get("reason", "")),
        from_phase=str(event["from_phase"]),
        to_phase=str(event["to_phase"]),
        from_stage=str(event["from_stage"]),
        to_stage=str(event["to_stage"]),
        candidate_weight=weights.candidate,
        gates=tuple(event.get("gates", ())),
    )


def build_timeline(
    events: Iterable[Mapping[str, Any]],
    points: Sequence[GatePoint],
    policy: RolloutPolicy,
    started_at: datetime,
) -> Timeline:
    """The rollouts of the event log (in order of first appearance) with their transitions and measurements."""
    timeline = Timeline(started_at=started_at)
    tracks: dict[str, RolloutTrack] = {}
    for event in events:
        rollout_id = event.get("rollout_id")
        if not isinstance(rollout_id, str):
            continue
        track = tracks.get(rollout_id)
        if track is None and "stable" in event and "candidate" in event:
            track = tracks[rollout_id] = RolloutTrack(rollout_id, str(event["stable"]), str(event["candidate"]))
            timeline.rollouts.append(track)
        if track is None:
            continue
        if event.get("kind") == "transition":
            track.transitions.append(transition_of(event, policy))
        elif event.get("kind") == "note" and event.get("command_id") is not None and track.started_at is None:
            track.started_at = _when(event["at"])  # the note of the start command
    for point in sorted(points, key=lambda p: p.at):
        track = tracks.get(point.rollout_id)
        if track is not None:
            track.gates.append(point)
    return timeline


# --------------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class RolloutSummary:
    """How one rollout went."""

    rollout_id: str
    stable: str
    candidate: str
    phase: str
    #: (stage, seconds in it), in order, the quality stage first.
    stages: tuple[tuple[str, float], ...]
    duration_s: float | None
    ended_by: str
    reason: str
    failed_gates: tuple[Mapping[str, Any], ...]
    #: Gates that were Successful in at least one transition (sorted).
    passed_gates: tuple[str, ...]

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(stage for stage, _ in self.stages)

    @property
    def failed_layers(self) -> frozenset[str]:
        return frozenset(str(g.get("layer")) for g in self.failed_gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "stable": self.stable,
            "candidate": self.candidate,
            "phase": self.phase,
            "stages": [{"stage": s, "seconds": round(d, 2)} for s, d in self.stages],
            "duration_s": None if self.duration_s is None else round(self.duration_s, 2),
            "ended_by": self.ended_by,
            "reason": self.reason,
            "failed_gates": [dict(g) for g in self.failed_gates],
            "passed_gates": list(self.passed_gates),
        }


def stage_durations(track: RolloutTrack, now: datetime) -> tuple[tuple[str, float], ...]:
    """Seconds in each stage the rollout went through; the current one counts until ``now`` (or the end)."""
    begin = track.begin
    if begin is None:
        return ()
    spans: list[tuple[str, float]] = []
    entered, stage = begin, track.transitions[0].from_stage if track.transitions else "quality"
    for transition in track.transitions:
        if transition.to_stage != stage or transition.to_phase in FINISHED:
            spans.append((stage, (transition.at - entered).total_seconds()))
            entered, stage = transition.at, transition.to_stage
        if transition.to_phase in FINISHED:
            return tuple(spans)
    return (*spans, (stage, (now - entered).total_seconds()))


def summarize(timeline: Timeline, now: datetime) -> list[RolloutSummary]:
    summaries = []
    for track in timeline.rollouts:
        last = track.transitions[-1] if track.transitions else None
        finished = track.finished_at
        begin = track.begin
        passed = {str(g["name"]) for t in track.transitions for g in t.gates if g.get("status") == _SUCCESS_STATUS}
        summaries.append(
            RolloutSummary(
                rollout_id=track.rollout_id,
                stable=track.stable,
                candidate=track.candidate,
                phase=track.phase,
                stages=stage_durations(track, now),
                duration_s=None if begin is None else ((finished or now) - begin).total_seconds(),
                ended_by=f"{last.trigger}/{last.reason_code}" if last is not None and finished is not None else "",
                reason=last.reason if last is not None else "",
                failed_gates=last.failed_gates if last is not None and finished is not None else (),
                passed_gates=tuple(sorted(passed)),
            )
        )
    return summaries


Step = tuple[float, float]


def serving_after(timeline: Timeline) -> str | None:
    """The version deciding after the last rollout: its candidate when promoted, else its stable."""
    if not timeline.rollouts:
        return None
    last = timeline.rollouts[-1]
    return last.candidate if last.phase == "Promoted" else last.stable


def decision_shares(timeline: Timeline, now: datetime, serving_since: float | None = None) -> dict[str, list[Step]]:
    """Each version's planned share of decisions (percent) over time, as steps ``(seconds, share)``: from the start
    of its first rollout (the first stable from ``serving_since`` when given) through the transitions, until its
    last rollout ended — the version serving after the last rollout until ``now``."""
    shares: dict[str, list[Step]] = {}
    last_seen: dict[str, float] = {}
    end_of_run = timeline.seconds(now)
    for index, track in enumerate(timeline.rollouts):
        begin = track.begin
        if begin is None:
            continue
        start = timeline.seconds(begin)
        since = min(serving_since, start) if index == 0 and serving_since is not None else start
        shares.setdefault(track.stable, []).append((since, float(PERCENT)))
        shares.setdefault(track.candidate, []).append((start, 0.0))
        for transition in track.transitions:
            at = timeline.seconds(transition.at)
            shares[track.stable].append((at, float(PERCENT - transition.candidate_weight)))
            shares[track.candidate].append((at, float(transition.candidate_weight)))
        finished = track.finished_at
        for version in (track.stable, track.candidate):
            last_seen[version] = timeline.seconds(finished) if finished is not None else end_of_run
    serving = serving_after(timeline)
    for version, steps in shares.items():
        steps.append((end_of_run if version == serving else last_seen[version], steps[-1][1]))
    return shares


def threshold_of(condition: str | None) -> float | None:
    """The number of an absolute condition (``value <= 0.2`` → 0.2); None for a relative one."""
    if condition is None or not condition.startswith("value"):
        return None
    try:
        return float(condition.split()[-1])
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class ObservedShare:
    """A version's measured share of the router's decisions (percent) at ``seconds`` since the run started."""

    seconds: float
    version: str
    share: float


def render_png(
    timeline: Timeline,
    path: Path,
    now: datetime,
    observed: Sequence[ObservedShare] = (),
    *,
    serving_since: float | None = None,
    dpi: int = 110,
) -> Path:
    """The chart: decisions per version (planned, and measured when given) over the stages, then one panel of
    gate values per monitoring layer (candidate solid, stable dotted, thresholds dashed, failures marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1 + len(LAYERS), 1, figsize=(13, 3.0 + 2.4 * len(LAYERS)), sharex=True)
    top = axes[0]
    colours = _version_colours(timeline)
    for version, steps in decision_shares(timeline, now, serving_since).items():
        xs, ys = zip(*steps, strict=True)
        top.step(xs, ys, where="post", label=f"{version} (planned)", color=colours[version], linewidth=2)
    for version, group in itertools.groupby(
        sorted(observed, key=lambda o: (o.version, o.seconds)), lambda o: o.version
    ):
        points = list(group)
        top.plot([o.seconds for o in points], [o.share for o in points], linestyle="--", linewidth=1,
                 color=colours.get(version, "grey"), label=f"{version} (measured by the router)")  # fmt: skip
    top.set_ylabel("decisions (%)")
    top.set_ylim(-5, 105)
    top.set_title("Share of decisions per version, stages and transitions")
    top.legend(loc="center left", fontsize=8, ncols=2)
    for axis in axes:
        _shade_stages(axis, timeline, now)
        for track in timeline.rollouts:
            for transition in track.transitions:
                axis.axvline(timeline.seconds(transition.at), color="#999999", linewidth=0.6)
    _annotate_transitions(top, timeline)
    for axis, (layer, title) in zip(axes[1:], LAYERS, strict=True):
        _gate_panel(axis, timeline, layer, title)
    axes[-1].set_xlabel("seconds since the demo started")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def _version_colours(timeline: Timeline) -> dict[str, str]:
    palette = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b")
    versions = list(dict.fromkeys(v for t in timeline.rollouts for v in (t.stable, t.candidate)))
    return {version: palette[i % len(palette)] for i, version in enumerate(versions)}


def _shade_stages(axis: Any, timeline: Timeline, now: datetime) -> None:
    for track in timeline.rollouts:
        begin = track.begin
        if begin is None:
            continue
        start = timeline.seconds(begin)
        for stage, seconds in stage_durations(track, now):
            axis.axvspan(start, start + seconds, color=_STAGE_COLOURS.get(stage, "#ffffff"), alpha=0.6, linewidth=0)
            start += seconds


def _annotate_transitions(axis: Any, timeline: Timeline) -> None:
    for track in timeline.rollouts:
        for transition in track.transitions:
            label = transition.to_phase if transition.to_phase in FINISHED else transition.to_stage
            axis.annotate(
                f"{track.candidate} {label}",
                (timeline.seconds(transition.at), 102),
                rotation=90,
                fontsize=7,
                va="top",
                ha="right",
                color="#b00000" if transition.to_phase in ROLLED_BACK_PHASES else "#333333",
            )


def _gate_panel(axis: Any, timeline: Timeline, layer: str, title: str) -> None:
    names = sorted({p.name for t in timeline.rollouts for p in t.gates if p.layer == layer})
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
    for i, name in enumerate(names):
        colour = palette[i % len(palette)]
        for track in timeline.rollouts:
            points = [p for p in track.gates if p.name == name]
            if not points:
                continue
            label = name if track is _first_with(timeline, name) else None
            xs = [timeline.seconds(p.at) for p in points]
            axis.plot(xs, [_nan(p.candidate) for p in points], color=colour, linewidth=1.4, label=label)
            if any(p.stable is not None for p in points):
                axis.plot(xs, [_nan(p.stable) for p in points], color=colour, linewidth=1, linestyle=":")
            failed = [p for p in points if p.status == _FAILED_STATUS and p.candidate is not None]
            axis.scatter([timeline.seconds(p.at) for p in failed], [p.candidate for p in failed], marker="x",
                         color="#d00000", zorder=5, s=30)  # fmt: skip
            threshold = threshold_of(points[-1].condition)
            if threshold is not None:
                axis.axhline(threshold, color=colour, linewidth=0.8, linestyle="--")
    axis.set_title(f"{title}: candidate (solid), stable (dotted), thresholds (dashed), failures (x)", fontsize=9)
    if names:
        axis.legend(loc="center left", fontsize=7, ncols=3)


def _first_with(timeline: Timeline, name: str) -> RolloutTrack | None:
    return next((t for t in timeline.rollouts if any(p.name == name for p in t.gates)), None)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def fmt(value: Any) -> str:
    """A value for people: ``—`` for none, four significant digits for a float."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_html(
    timeline: Timeline,
    summaries: Sequence[RolloutSummary],
    path: Path,
    *,
    png: Path | None,
    title: str = "fraudwatch rollout demo — timeline",
    facts: Mapping[str, Any] | None = None,
) -> Path:
    """One self-contained page: the facts of the run, each rollout's summary, the chart, every transition."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin:1em 0}"
        " td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}"
        " th{background:#f4f4f4} .Failed,.RolledBack,.Aborted{color:#b00000;font-weight:bold}"
        " .Successful,.Promoted{color:#006000} .Inconclusive{color:#a06000} img{max-width:100%}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>Started {html.escape(timeline.started_at.isoformat(timespec='seconds'))}.</p>",
    ]
    if facts:
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in facts.items()
        )
        parts.append(f"<table>{rows}</table>")
    parts.append("<h2>Rollouts</h2>" + _summary_table(summaries))
    if png is not None and png.exists():
        encoded = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<h2>Timeline</h2><img alt='rollout timeline' src='data:image/png;base64,{encoded}'>")
    parts.append("<h2>Transitions</h2>" + _transitions_table(timeline))
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _facts_table(facts: Mapping[str, Any]) -> str:
    rows = (
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(fmt(value))}</td></tr>" for key, value in facts.items()
    )
    return f"<table>{''.join(rows)}</table>"


def _summary_table(summaries: Sequence[RolloutSummary]) -> str:
    out = io.StringIO()
    out.write("<table><tr><th>rollout</th><th>stable → candidate</th><th>outcome</th><th>stages (s)</th>"
              "<th>ended by</th><th>failed gates</th></tr>")  # fmt: skip
    for s in summaries:
        stages = ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in s.stages)
        failed = "; ".join(_gate_text(g) for g in s.failed_gates) or "—"
        out.write(
            f"<tr><td>{html.escape(s.rollout_id)}</td><td>{html.escape(s.stable)} → {html.escape(s.candidate)}</td>"
            f"<td class='{html.escape(s.phase)}'>{html.escape(s.phase)}</td><td>{html.escape(stages)}</td>"
            f"<td>{html.escape(s.ended_by)}: {html.escape(s.reason)}</td><td>{html.escape(failed)}</td></tr>"
        )
    out.write("</table>")
    return out.getvalue()


def _gate_text(gate: Mapping[str, Any]) -> str:
    values = ", ".join(
        f"{key} {fmt(gate[key])}" for key in ("candidate_value", "stable_value", "bound", "labels") if key in gate
    )
    condition = gate.get("condition", "")
    evidence = gate_evidence(gate)["evidence"]
    text = f"{gate.get('name')} ({gate.get('layer')}): {values}" + (f" — needs {condition}" if condition else "")
    return text + (f" — evidence {evidence}" if evidence else "")


def _transitions_table(timeline: Timeline) -> str:
    out = io.StringIO()
    out.write("<table><tr><th>t (s)</th><th>rollout</th><th>change</th><th>candidate share</th><th>trigger</th>"
              "<th>reason</th><th>gates</th></tr>")  # fmt: skip
    transitions = sorted((t for r in timeline.rollouts for t in r.transitions), key=lambda t: t.at)
    for t in transitions:
        gates = "<br>".join(
            f"<span class='{html.escape(str(g.get('status')))}'>{html.escape(str(g.get('status')))}</span> "
            f"{html.escape(_gate_text(g))}"
            for g in t.gates
        )
        change = f"{t.from_phase}/{t.from_stage} → {t.to_phase}/{t.to_stage}"
        out.write(
            f"<tr><td>{timeline.seconds(t.at):.1f}</td><td>{html.escape(t.rollout_id)}</td>"
            f"<td class='{html.escape(t.to_phase)}'>{html.escape(change)}</td><td>{t.candidate_weight} %</td>"
            f"<td>{html.escape(t.trigger)} ({html.escape(t.reason_code)})</td><td>{html.escape(t.reason)}</td>"
            f"<td>{gates}</td></tr>"
        )
    out.write("</table>")
    return out.getvalue()
