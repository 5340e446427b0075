"""``status --watch`` (wait until the rollout ends, one line per change) and ``get --watch`` (show every change):
polling loops over a :class:`~rollout.cli.clients.RolloutClient`, the same reads as the one-shot commands."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from rollout.cli.clients import RolloutClient
from rollout.cli.outcome import FINAL, Health, health_of, progress_line
from rollout.cli.views import status_view
from rollout.settings import ControllerSettings


def current_view(client: RolloutClient, settings: ControllerSettings) -> tuple[dict[str, Any], bool]:
    """The status view with its ``health``, and whether the controller has observed the latest desired state."""
    snapshot = client.snapshot()
    view = status_view(snapshot, datetime.now(UTC), settings.stale_after_s)
    view["health"] = health_of(view)
    return view, snapshot.observed


def watch_status(
    client: RolloutClient, settings: ControllerSettings, timeout_s: float | None, emit: Callable[[str], None]
) -> tuple[dict[str, Any], bool]:
    """Poll until the rollout's health is final and observed; ``emit`` one line per change. Returns the last view
    and whether ``timeout_s`` ran out first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown: str | None = None
    while True:
        view, observed = current_view(client, settings)
        health: Health = view["health"]
        line = progress_line(client.name, view, health) if observed else f"{client.name}: waiting for the controller"
        if line != shown:
            emit(line)
            shown = line
        if observed and health in FINAL:
            return view, False
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return view, True
        time.sleep(settings.watch_interval_s if remaining is None else min(settings.watch_interval_s, remaining))


def signature(view: Mapping[str, Any]) -> str:
    """What ``get --watch`` compares: the view without the fields that change with the clock alone."""
    rollout = dict(view.get("rollout") or {})
    rollout.pop("time_in_stage_s", None)
    gates = [{k: v for k, v in g.items() if k != "inconclusive_for_s"} for g in view.get("gates") or ()]
    controller = {k: v for k, v in (view.get("controller") or {}).items() if k != "heartbeat_age_s"}
    return json.dumps([rollout, gates, controller, view.get("workloads")], sort_keys=True, default=str)


def watch_get(
    client: RolloutClient, settings: ControllerSettings, timeout_s: float | None, show: Callable[[Any], None]
) -> int:
    """``show`` the view now and after every change until ``timeout_s`` (or Ctrl-C); how many views were shown."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown: str | None = None
    count = 0
    while True:
        view, _ = current_view(client, settings)
        key = signature(view)
        if key != shown:
            show(view)
            shown, count = key, count + 1
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return count
        time.sleep(settings.watch_interval_s if remaining is None else min(settings.watch_interval_s, remaining))
