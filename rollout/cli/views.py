"""What ``rolloutctl status`` and ``history`` show: the views as data (also ``--json``) and their rich rendering."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from rollout.backends.local.inbox import (
    heartbeat_age_s,
)
from rollout.cli.clients import Snapshot

if TYPE_CHECKING:
    from rollout.core.analysis import AnalysisReport
    from rollout.core.machine import RolloutState
    from rollout.core.state import ControllerState


def _seconds(start: datetime | None, now: datetime) -> float | None:
    return None if start is None else max(0.0, (now - start).total_seconds())


def status_view(snapshot: Snapshot, now: datetime, stale_after_s: float) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (rendered as tables, or printed with ``--json``)."""
    from rollout.core.evidence import gate_evidence
    from rollout.core.machine import expected_gates, promotion_blockers, step_label

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
            "step": step_label(policy, rollout.stage, rollout.step),
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
        "revisions": [r.model_dump(mode="json") for r in state.revisions],
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


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
    console.print(f"  phase  [{phase_style}]{rollout['phase']}[/]   stage [bold]{rollout['step']}[/]{paused}")
    console.print(f"  decisions  {weights}")
    console.print(f"  time in stage  {rollout['time_in_stage_s']:.0f} s (minimum {rollout['min_duration_s']:.0f} s)")
    if rollout["last_transition"]:
        console.print(f"  last transition  {rollout['last_transition']['at']}: {rollout['last_transition']['reason']}")
    console.print(f"  controller  {alive}")
    _print_workloads(console, view["workloads"])
    if view["revisions"]:
        console.print("  revisions  " + " · ".join(revision_label(r) for r in view["revisions"]), highlight=False)
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


#: A bundle digest shown by its first hex characters, as ``docker images`` shows an image id.
SHORT_DIGEST: Final[int] = 12


def short_digest(digest: str | None) -> str:
    return f"sha256:{digest[:SHORT_DIGEST]}" if digest else "—"


def revision_label(revision: Mapping[str, Any]) -> str:
    """``3 v1 (sha256:9f86d081884c)``: a revision's number, version and the bundle it was deployed with."""
    digest = f" ({short_digest(revision['digest'])})" if revision.get("digest") else ""
    return f"{revision['number']} {revision['version']}{digest}"


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


def list_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``list`` as ``kubectl get`` prints a table: plain columns padded to their widest cell, never wrapped."""
    if not rows:
        return ["No rollouts found."]
    namespaced = any(row["namespace"] for row in rows)
    header = ("NAMESPACE",) * namespaced + (
        "NAME", "PHASE", "STAGE", "STABLE", "CANDIDATE", "WEIGHT", "PAUSED", "REVISION", "DIGEST"
    )  # fmt: skip
    table = [list(header)] + [
        [str(row["namespace"] or "")] * namespaced + [
            row["name"], _fmt(row["phase"]), _fmt(row["stage"]), _fmt(row["stable"]), _fmt(row["candidate"]),
            _fmt(row["candidate_weight"]), "yes" if row["paused"] else "no", _fmt(row.get("revision")),
            short_digest(row.get("digest")),
        ]
        for row in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return ["   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]


def render_list(rows: Sequence[Mapping[str, Any]]) -> None:
    print("\n".join(list_lines(rows)))


def render_result(payload: Mapping[str, Any]) -> None:
    from rich.console import Console

    outcome = payload.get("outcome")
    style = {"applied": "green", "queued": "cyan", "ignored": "bold yellow", "failed": "bold red"}.get(
        str(outcome), "white"
    )
    detail = f": {payload['detail']}" if payload.get("detail") else ""
    Console().print(f"{payload['kind']} {payload['id']} [{style}]{outcome}[/]{detail}")


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


_READINESS_STYLE: Final[dict[str, str]] = {
    "ready": "green",
    "starting": "yellow",
    "failed": "bold red",
    "stopped": "dim",
}
