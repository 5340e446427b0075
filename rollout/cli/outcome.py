"""How a rollout ended, as ``rolloutctl status`` reports it (Argo Rollouts' ``status``): a health word, whether it is
final, and its exit code. Pure functions of the status view (``rollout.cli.views.status_view``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from rollout.cli.errors import ExitCode

Health = Literal["Healthy", "Progressing", "Paused", "RolledBack", "Aborted", "Degraded", "NoRollout"]

#: The exit code of each health once final (``status``; ``status --watch`` waits for one of these).
EXIT_CODES: Final[dict[Health, ExitCode]] = {
    "Healthy": ExitCode.OK,
    "Progressing": ExitCode.OK,
    "Paused": ExitCode.OK,
    "RolledBack": ExitCode.ROLLED_BACK,
    "Aborted": ExitCode.ABORTED,
    "Degraded": ExitCode.DEGRADED,
    "NoRollout": ExitCode.NOT_FOUND,
}
FINAL: Final[frozenset[Health]] = frozenset({"Healthy", "RolledBack", "Aborted", "Degraded", "NoRollout"})


def health_of(view: Mapping[str, Any]) -> Health:
    """``Healthy``: promoted and the serving version's workload is not failed; ``Degraded``: promoted but the serving
    version's workload failed; ``RolledBack`` / ``Aborted``: the phase; ``Progressing`` / ``Paused`` while it runs;
    ``NoRollout`` before the first one."""
    rollout = view.get("rollout")
    if rollout is None:
        return "NoRollout"
    phase = rollout["phase"]
    if phase == "Progressing":
        return "Paused" if rollout["paused"] else "Progressing"
    if phase in ("RolledBack", "Aborted"):
        return "RolledBack" if phase == "RolledBack" else "Aborted"
    serving = rollout["candidate"]
    failed = any(w["version"] == serving and w["readiness"] == "failed" for w in view.get("workloads") or ())
    return "Degraded" if failed else "Healthy"


def progress_line(name: str, view: Mapping[str, Any], health: Health) -> str:
    """One line per change for ``status --watch``: ``fw: Progressing · canary · v1 95 % · v2 5 %``."""
    rollout = view.get("rollout")
    if rollout is None:
        return f"{name}: no rollout"
    weights = " · ".join(f"{version} {weight} %" for version, weight in rollout["weights"].items())
    line = f"{rollout['name']}: {health} · {rollout['stage']} · {weights}"
    if health in FINAL and rollout.get("last_transition"):
        line += f" — {rollout['last_transition']['reason']}"
    return line
