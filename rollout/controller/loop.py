"""The rollout controller: observe → analyse → decide → persist → act, level-triggered, resumable after a kill.

One reconcile::

    observe   the state (state.json), at most one operator command from the inbox, the clock, the workloads
    analyse   the gates of the current stage (rollout.core.analysis against Prometheus; the regression set for the
              quality stage) — in a background thread, so a slow or dead Prometheus never delays a command
    decide    rollout.core.machine.step(state, latest report, now, command) → new state + actions (pure)
    persist   state.json (atomic) — *before* acting: the actions describe the desired state of the world, so a
              controller killed after persisting recomputes and re-executes them on restart (nothing skipped), and
              re-executing them is harmless (nothing repeated: a running version is not started again, a table the
              routers hold is not sent again, an alias already in place is not moved)
    act       through the backend (Workloads, RoutingPublisher) and the model registry (ModelSource)
    record    transitions → events.jsonl exactly once (rollout.core.events), metrics, the command's result

Commands (``rolloutctl``) are files in the inbox, applied once per id: ``start`` and ``retry`` are the controller's
own (a new rollout of a candidate against the version now serving; ``retry``: of the candidate the last rollout
rolled back or aborted); promote / pause / resume / abort / revert go to the stage machine. The loop looks at the
inbox every ``tick_interval_s`` and reconciles at once when something is queued (on
Kubernetes: when a watch event changed the ModelRollout, its Deployments or Services).

Without a rollout the controller keeps the serving alias' version (``champion``) running and routed.

Where the state, the commands and the events live is the caller's choice (:class:`StateStorage`,
:class:`CommandSource`, :class:`EventSink`): files in the state directory on the local backend; the ModelRollout
custom resource on Kubernetes (:mod:`rollout.backends.kube`: its status, ``spec.manualCommand`` /
``spec.candidate``,
Kubernetes Events). The loop is the same.

Run: ``python -m rollout.controller`` (settings from ``FW_ROLLOUT_…``, the model side's from ``FW_…``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from rollout.backends.base import (
    Backend,
    CommandSource,
    EventSink,
    PublishedTable,
    RoutingError,
    RoutingSpec,
    StateStorage,
    VersionNotFoundError,
)
from rollout.backends.local.events import EventLog
from rollout.backends.local.inbox import EVENTS_FILE, CommandInbox
from rollout.backends.local.state import StateStore
from rollout.controller.metrics import ControllerMetrics, ReconcileStep
from rollout.controller.runners import AnalysisRunner, InlineExecutor, InlineRunner, offline_report
from rollout.core import workload_gate
from rollout.core.analysis import AnalysisReport, GateStatus, analyse, analyse_quality
from rollout.core.commands import STARTS, CommandResult, InboxCommand
from rollout.core.machine import (
    QUALITY_STAGE,
    ROLLED_BACK_PHASES,
    Action,
    EnsureRunning,
    KeepWarm,
    MoveAlias,
    PublishRouting,
    RecordEvent,
    RolloutState,
    ScaleDown,
    Transition,
    initial_state,
    stage_clock_start,
    step,
    traffic_stage,
)
from rollout.core.policy import RolloutPolicy
from rollout.core.state import ControllerState, manual_command, record_revision, workload_views
from rollout.core.workloads import WorkloadStatus
from rollout.settings import ControllerSettings
from service.common.clock import Clock, utc_now
from service.common.logging import get_logger, log_event

logger = get_logger("controller")


# --------------------------------------------------------------------------------------------------- controller


@dataclass
class ActOutcome:
    """What one act pass achieved: is the world as the state wants it (routing published, versions ready)?"""

    converged: bool = True
    #: The routers hold the table the state wants (published now, or already held).
    routed: bool = False
    statuses: dict[str, WorkloadStatus] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: The routers' tables as read back in this pass (read once, and only when a version is to be scaled down).
    held: tuple[PublishedTable, ...] | None = None


# --------------------------------------------------------------------------------------------------- where state,
# commands and events live: files locally (rollout.core.state, rollout.backends.local.inbox, rollout.core.events),
# the ModelRollout on Kubernetes (rollout.backends.kube)


class ReconcileObserver(Protocol):
    """Hooks around each reconcile (the Kubernetes backend: the policy follows the ModelRollout's spec before, the
    status summary follows the world after)."""

    def before_reconcile(self, controller: Controller, /) -> None: ...

    def after_reconcile(self, controller: Controller, outcome: ActOutcome, /) -> None: ...


@dataclass
class _Pending:
    handle: Any
    command: InboxCommand | str


class Controller:
    """The reconcile loop of one rollout (``settings.name``): its state, commands and events in ``state_dir`` (the
    local files), or in the ``store`` / ``commands`` / ``events`` given instead (the ModelRollout on Kubernetes)."""

    def __init__(
        self,
        *,
        settings: ControllerSettings,
        policy: RolloutPolicy,
        backend: Backend,
        metrics: ControllerMetrics,
        state_dir: Path | None = None,
        store: StateStorage | None = None,
        commands: CommandSource | None = None,
        events: EventSink | None = None,
        clock: Clock = utc_now,
        runner: AnalysisRunner | None = None,
        background: Executor | None = None,
        observer: ReconcileObserver | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer
        self.policy = policy
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.runner: AnalysisRunner = runner if runner is not None else InlineRunner()
        self.store: StateStorage = store if store is not None else StateStore(_given(state_dir))
        self.commands: CommandSource = commands if commands is not None else CommandInbox(_given(state_dir))
        self.events: EventSink = events if events is not None else EventLog(_given(state_dir) / EVENTS_FILE)
        self.state = self.store.load() or ControllerState(name=settings.name)
        self.converged = False
        self._last_analysis: datetime | None = None
        self._analysis_started = time.monotonic()
        self._candidate: workload_gate.CandidateWatch | None = None
        self._notes: list[tuple[datetime, str | None, str, dict[str, object]]] = []
        self._aliases: dict[tuple[str, str], bool] = {}
        #: Registry calls run here (InlineExecutor: at once, for tests and one-shot use).
        self.background: Executor = background if background is not None else InlineExecutor()
        self._alias_job: tuple[tuple[str, str], bool, Future[None]] | None = None
        self._champion: tuple[float, str | None] | None = None
        self.metrics.show(self.state.rollout)
        self.metrics.transitioned(self.events_sync())

    # ------------------------------------------------------------------ one reconcile

    def reconcile(self) -> None:
        """Observe → analyse → decide → persist → act → record; raises what the backend raises (after persisting)."""
        started = time.perf_counter()
        if self.observer is not None:
            self.observer.before_reconcile(self)
        pending = self._next_command()
        now = self.clock()
        before = self.state
        result: CommandResult | None = None
        if pending is not None and isinstance(pending.command, InboxCommand) and pending.command.kind in STARTS:
            result = self._start(pending.command, now)
        report = self._analysis(now)
        manual = None
        if pending is not None and isinstance(pending.command, InboxCommand) and pending.command.kind not in STARTS:
            manual = pending.command
        actions, result = self._decide(now, report, manual, result)
        if result is not None:
            self.state = self.state.with_result(result, self.settings.kept_command_results)
            self.metrics.command(result.kind, result.outcome)
        self._persist(before)
        if pending is not None:
            self._finish_command(pending, result, now)
        outcome = self._act(actions, now)
        self.converged = outcome.converged
        self._watch_candidate(outcome, now)
        statuses = self._workload_statuses(outcome)
        self.metrics.workloads(statuses)
        self._record_workloads(statuses)
        if self.observer is not None:
            self.observer.after_reconcile(self, outcome)
        self.metrics.show(self.state.rollout)
        self.metrics.reconciled(time.perf_counter() - started, self.clock())

    def _next_command(self) -> _Pending | None:
        for handle, command in self.commands.pending():
            if isinstance(command, InboxCommand) and self.state.result_of(command.id) is not None:
                self.commands.done(handle)  # applied before a restart; only the file was left
                continue
            return _Pending(handle, command)
        return None

    def _finish_command(self, pending: _Pending, result: CommandResult | None, now: datetime) -> None:
        if isinstance(pending.command, str):
            where = pending.handle.name if isinstance(pending.handle, Path) else str(pending.handle)
            self.events.note(now, self._rollout_id(), "unreadable command discarded", file=where,
                             error=pending.command)  # fmt: skip
        elif result is not None and result.outcome in ("ignored", "failed"):
            self.events.note(now, self._rollout_id(), f"command {result.kind} {result.outcome}: {result.detail}",
                             command_id=result.id)  # fmt: skip
        self.commands.done(pending.handle)

    def _note(self, at: datetime, rollout_id: str | None, reason: str, **fields: object) -> None:
        """A note written to the event log once the state it belongs to is saved."""
        self._notes.append((at, rollout_id, reason, fields))

    def _rollout_id(self) -> str | None:
        return self.state.rollout.rollout_id if self.state.rollout is not None else None

    # ------------------------------------------------------------------ start

    def _start(self, command: InboxCommand, now: datetime) -> CommandResult:
        def result(outcome: str, detail: str) -> CommandResult:
            return CommandResult.model_validate(
                {"id": command.id, "kind": command.kind, "outcome": outcome, "detail": detail, "at": now,
                 "rollout_id": command.id if outcome == "applied" else None}
            )  # fmt: skip

        current = self.state.rollout
        if current is not None and current.phase == "Progressing":
            return result("ignored", f"rollout {current.rollout_id} is in progress (abort it first)")
        wanted = command.candidate
        if command.kind == "retry":
            if current is None or current.phase not in ROLLED_BACK_PHASES:
                return result("ignored", "nothing to retry: " + (f"the rollout is {current.phase}" if current
                              else "no rollout yet"))  # fmt: skip
            wanted = current.candidate
        assert wanted is not None  # a start names its candidate (InboxCommand's validator)
        try:
            candidate = self.backend.source.resolve(wanted)
            stable = self.backend.source.resolve(command.stable) if command.stable else self._serving_version()
        except VersionNotFoundError as exc:
            return result("ignored", f"not found: {exc}")
        except Exception as exc:  # the registry failed: this start is done (failed), the commands behind it run
            self.metrics.failed("observe")
            return result("failed", f"the model registry failed: {type(exc).__name__}: {exc}")
        if stable is None:
            return result("ignored", "no stable version: no serving alias and no earlier rollout (give --stable)")
        if stable == candidate:
            return result("ignored", f"{candidate} is already the serving version")
        rollout = initial_state(self.policy, command.id, stable, candidate, now)
        finished = self.state.summary()
        past = self.state.past if finished is None else (*self.state.past, finished)
        self.state = self.state.model_copy(
            update={
                "rollout": rollout,
                "rollout_started_at": now,
                "past": past[-self.settings.kept_past_rollouts :],
            }
        )
        self._note(now, rollout.rollout_id, f"rollout of {candidate} against {stable} started",
                   stable=stable, candidate=candidate, command_id=command.id, stage=rollout.stage)  # fmt: skip
        return result("applied", f"rollout {rollout.rollout_id}: {stable} → {candidate}")

    def _serving_version(self) -> str | None:
        """The version serving now: the last rollout's outcome, else the serving alias' version."""
        current = self.state.rollout
        if current is not None:
            return current.candidate if current.phase == "Promoted" else current.stable
        return self._champion_version(force=True)

    def _champion_version(self, *, force: bool = False) -> str | None:
        cached = self._champion
        fresh = cached is not None and time.monotonic() - cached[0] < self.settings.champion_refresh_s
        if cached is not None and fresh and not force:
            return cached[1]
        version = self.backend.source.alias_target(self.policy.promotion.alias)
        self._champion = (time.monotonic(), version)
        return version

    # ------------------------------------------------------------------ analyse

    def _analysis(self, now: datetime) -> AnalysisReport | None:
        """Submit a measurement when one is due; return the latest finished report (None when none is new)."""
        rollout = self.state.rollout
        if rollout is not None and rollout.phase == "Progressing" and self._analysis_due(rollout, now):
            self._last_analysis = now
            self._analysis_started = time.monotonic()
            self.runner.submit(self._job(rollout))
            log_event(logger, "analysis started", event="analysis_started", rollout_id=rollout.rollout_id,
                      stage=rollout.stage)  # fmt: skip
        finished = self.runner.collect()
        if finished is not None:
            self._log_finished(finished)
        if isinstance(finished, BaseException):
            self.metrics.failed("analyse")
            finished = None
        return self._with_workload(finished, now)

    def _log_finished(self, finished: AnalysisReport | BaseException) -> None:
        """One line per finished measurement with how long it ran: a stage that waits shows where (the routing's
        convergence before the start, or Prometheus during the run)."""
        seconds = round(time.monotonic() - self._analysis_started, 3)
        if isinstance(finished, BaseException):
            log_event(logger, "analysis failed", event="analysis_failed", duration_s=seconds,
                      error=f"{type(finished).__name__}: {finished}")  # fmt: skip
            return
        failed = [r.name for r in finished.results if r.status is GateStatus.FAILED]
        log_event(logger, "analysis finished", event="analysis_finished", stage=finished.stage, duration_s=seconds,
                  gates=len(finished.results), failed=failed)  # fmt: skip

    def _watch_candidate(self, outcome: ActOutcome, now: datetime) -> None:
        """Follow the candidate's workload through a traffic stage (restarts, how long not ready)."""
        rollout = self.state.rollout
        if rollout is None or rollout.phase != "Progressing" or rollout.stage == QUALITY_STAGE:
            self._candidate = None
            return
        status = outcome.statuses.get(rollout.candidate)
        self._candidate = workload_gate.observe(self._candidate, rollout.rollout_id, rollout.candidate, status, now)

    def _workload_statuses(self, outcome: ActOutcome) -> dict[str, WorkloadStatus]:
        """Every running version's status: those the act pass saw, the others (kept for inspection) asked."""
        statuses = dict(outcome.statuses)
        with contextlib.suppress(Exception):  # metrics only: a backend hiccup must not fail the reconcile
            for version in self.backend.workloads.running():
                if version not in statuses:
                    statuses[version] = self.backend.workloads.status(version)
        return statuses

    def _record_workloads(self, statuses: Mapping[str, WorkloadStatus]) -> None:
        """Save the running versions' readiness and restarts when they changed (``rolloutctl status`` reads them from
        the state, also before any analysis report exists)."""
        views = workload_views(statuses)
        if views == self.state.workloads:
            return
        self.state = self.state.model_copy(update={"workloads": views})
        try:
            self.store.save(self.state)
        except OSError:
            self.metrics.failed("persist")

    def _with_workload(self, report: AnalysisReport | None, now: datetime) -> AnalysisReport | None:
        """``report`` with the ``candidate-workload`` gate; a report of that gate alone when it failed while no
        measurement came (routing, hence analysis, waits for a ready candidate: a crash loop still ends the rollout)."""
        rollout = self.state.rollout
        watch = self._candidate
        if rollout is None or rollout.phase != "Progressing" or watch is None or watch.rollout_id != rollout.rollout_id:
            return report
        gate = workload_gate.judge(watch, self.policy.analysis, now)
        if report is not None and report.stage != QUALITY_STAGE and report.candidate == rollout.candidate:
            return report.model_copy(update={"results": (*report.results, gate)})
        if report is None and gate.status is GateStatus.FAILED:
            return AnalysisReport(stage=traffic_stage(rollout.stage), stable=rollout.stable,
                                  candidate=rollout.candidate, at=now, results=(gate,))  # fmt: skip
        return report

    def _analysis_due(self, rollout: RolloutState, now: datetime) -> bool:
        if self.runner.busy():
            return False
        if rollout.stage != QUALITY_STAGE and not self.converged:
            return False  # measure a traffic stage only once its routing is in force
        last = self._last_analysis
        return last is None or (now - last).total_seconds() >= self.policy.analysis.interval_s

    def _job(self, rollout: RolloutState) -> Callable[[], AnalysisReport]:
        policy, stage, stable, candidate = self.policy, rollout.stage, rollout.stable, rollout.candidate
        entered = stage_clock_start(rollout)  # {{stage_window}}: since the stage's routing was in force
        backend, clock = self.backend, self.clock
        if stage == QUALITY_STAGE:
            return lambda: analyse_quality(
                policy, lambda: backend.quality.evaluate(candidate), stable, candidate, clock()
            )

        def measure() -> AnalysisReport:
            if not backend.metrics.is_online():
                return offline_report(policy, stage, stable, candidate, clock())
            return analyse(
                policy, traffic_stage(stage), backend.metrics, stable, candidate, clock(), stage_entered_at=entered
            )

        return measure

    # ------------------------------------------------------------------ decide

    def _decide(
        self,
        now: datetime,
        report: AnalysisReport | None,
        manual: InboxCommand | None,
        result: CommandResult | None,
    ) -> tuple[Sequence[Action], CommandResult | None]:
        rollout = self.state.rollout
        if rollout is None:
            if manual is not None:
                result = self._ignored(manual, now, "no rollout")
            return self._baseline(), result
        command = manual_command(manual) if manual is not None else None
        new, actions = step(rollout, report, now, command, policy=self.policy)
        revisions = record_revision(self.state.revisions, new, self.settings.kept_revisions, self._bundle_digest)
        self.state = self.state.model_copy(update={"rollout": new, "revisions": revisions})
        if manual is not None:
            transitions = len(new.history) - len(rollout.history)
            notes = [a for a in actions if isinstance(a, RecordEvent)][transitions:]
            if notes:
                result = self._ignored(manual, now, notes[0].reason)
            else:
                result = CommandResult(
                    id=manual.id, kind=manual.kind, outcome="applied", detail=_last_reason(new), at=now,
                    rollout_id=new.rollout_id,
                )  # fmt: skip
        return actions, result

    def _bundle_digest(self, version: str) -> str | None:
        """The registry's digest of ``version``'s bundle for its revision; None (logged) when it cannot tell: a
        revision is recorded either way."""
        try:
            return self.backend.source.bundle_digest(version)
        except Exception as exc:  # not registered, or the registry failed: the revision stays without it
            log_event(logger, "bundle digest unknown", event="revision_digest_unknown", version=version,
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return None

    def _ignored(self, command: InboxCommand, now: datetime, why: str) -> CommandResult:
        return CommandResult(
            id=command.id, kind=command.kind, outcome="ignored", detail=why, at=now, rollout_id=self._rollout_id()
        )

    def _baseline(self) -> Sequence[Action]:
        """Without a rollout: the serving alias' version runs and decides alone."""
        champion = self._champion_version()
        if champion is None:
            return ()
        return (
            EnsureRunning(version=champion),
            PublishRouting(stage="stable", stable=champion, candidate=None, candidate_weight=0),
        )

    # ------------------------------------------------------------------ persist

    def _persist(self, before: ControllerState) -> None:
        notes, self._notes = self._notes, []
        if self.state != before:
            try:
                self.store.save(self.state)
            except OSError:
                self.metrics.failed("persist")
                self.state = before  # nothing is acted upon that was not saved
                raise
        for at, rollout_id, reason, fields in notes:
            self.events.note(at, rollout_id, reason, **fields)
        self.metrics.transitioned(self.events_sync())

    def events_sync(self) -> list[Transition]:
        """Bring the event log level with the saved rollout; return the transitions newly logged."""
        rollout = self.state.rollout
        return self.events.sync(rollout) if rollout is not None else []

    # ------------------------------------------------------------------ act

    def _act(self, actions: Sequence[Action], now: datetime) -> ActOutcome:
        outcome = ActOutcome()
        wanted: set[str] = set()
        for action in actions:
            try:
                self._execute(action, now, outcome, wanted)
            except Exception as exc:  # one failing action must not stop the others (level-triggered: retried)
                outcome.converged = False
                outcome.problems.append(f"{action.kind}: {type(exc).__name__}: {exc}")
                self.metrics.failed("act")
                log_event(logger, "action failed", event="action_failed", action=action.kind,
                          error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        if wanted:  # no desired state (no serving version known): stop nothing
            with _logged_failure(self, "act", outcome):
                for version in self.backend.workloads.running():
                    if version not in wanted:
                        self._scale_down(version, outcome)
        with _logged_failure(self, "act", outcome):
            self._ensure_aliases()
        return outcome

    def _execute(self, action: Action, now: datetime, outcome: ActOutcome, wanted: set[str]) -> None:
        match action:
            case EnsureRunning(version=version) | KeepWarm(version=version):
                wanted.add(version)
                status = self.backend.workloads.ensure_running(version)
                outcome.statuses[version] = status
                if not status.ready:
                    outcome.converged = False
            case PublishRouting():
                self._publish(action, outcome)
            case ScaleDown(version=version, after=after):
                if now < after:
                    wanted.add(version)
                elif version not in wanted:
                    self._scale_down(version, outcome)
            case MoveAlias(alias=alias, version=version):
                self._alias(alias, version, ensure=True)
            case RecordEvent():
                return

    def _scale_down(self, version: str, outcome: ActOutcome) -> None:
        """Stop ``version`` once no router holds a table that names it (a router still shadowing it would fail
        every shadow call until its table changes); else keep it for a later pass."""
        if outcome.held is None:
            outcome.held = tuple(self.backend.publisher.read())
        holders = [t.router for t in outcome.held if t.spec is not None and version in t.spec.versions()]
        if holders:  # not a reason to stop measuring: the routing the state wants is what the routers hold
            outcome.problems.append(f"scale-down of {version} waits for {', '.join(holders)} to drop it")
            return
        self.backend.workloads.scale_down(version)

    def _publish(self, action: PublishRouting, outcome: ActOutcome) -> None:
        def status(version: str) -> WorkloadStatus:
            known = outcome.statuses.get(version)
            return known if known is not None else self.backend.workloads.status(version)

        required = [action.stable, *([action.candidate] if action.candidate else [])]
        missing = [v for v in required if not status(v).ready]
        if missing:
            outcome.converged = False
            outcome.problems.append(f"routing waits for {', '.join(missing)}")
            return
        shadow = tuple(v for v in action.shadow if status(v).ready)
        if len(shadow) != len(action.shadow):
            outcome.converged = False
        spec = RoutingSpec(
            stage=action.stage,
            stable=action.stable,
            candidate=action.candidate,
            candidate_weight=action.candidate_weight,
            shadow=shadow,
        )
        urls = {v: url for v in spec.versions() if (url := status(v).url) is not None}
        try:
            self.backend.publisher.publish(spec, urls)
        except RoutingError:
            outcome.converged = False
            raise
        outcome.routed = True
        self._mark_in_force()  # at once, not after the slower actions (alias moves) that follow
        if len(shadow) == len(action.shadow):  # the stage's whole routing, its shadows too
            self._mark_routed()

    def _mark_routed(self) -> None:
        """The current stage's routing is held by the routers: its minimum duration counts from now."""
        rollout = self.state.rollout
        if rollout is None or rollout.phase != "Progressing" or rollout.stage == QUALITY_STAGE:
            return
        if rollout.routed_at is not None and rollout.routed_at >= rollout.stage_entered_at:
            return
        routed = rollout.model_copy(update={"routed_at": self.clock()})
        self.state = self.state.model_copy(update={"rollout": routed})
        try:
            self.store.save(self.state)
        except OSError:
            self.metrics.failed("persist")

    def _mark_in_force(self) -> None:
        """Applied commands whose routing the routers now hold get ``in_force_at`` (``rolloutctl`` waits for it)."""
        waiting = [r for r in self.state.command_results if r.outcome == "applied" and r.in_force_at is None]
        if not waiting:
            return
        at = self.clock()
        results = tuple(
            r.model_copy(update={"in_force_at": at}) if r.outcome == "applied" and r.in_force_at is None else r
            for r in self.state.command_results
        )
        self.state = self.state.model_copy(update={"command_results": results})
        try:
            self.store.save(self.state)
        except OSError:
            self.metrics.failed("persist")

    def _ensure_aliases(self) -> None:
        """The candidate carries the challenger alias while its rollout runs, and loses it when rolled back."""
        rollout = self.state.rollout
        if rollout is None:
            return
        alias = self.settings.challenger_alias
        if rollout.phase == "Progressing":
            self._alias(alias, rollout.candidate, ensure=True)
        elif rollout.phase in ("RolledBack", "Aborted"):
            self._alias(alias, rollout.candidate, ensure=False)

    def _alias(self, alias: str, version: str, *, ensure: bool) -> None:
        """Move (or clear) an alias once per (alias, version, direction), in the background: registry calls take
        hundreds of milliseconds and the loop must stay free for the next command (a revert right after a
        promotion). One alias job at a time, in order; a failed one is retried by a later reconcile."""
        self._collect_alias_job()
        key = (alias, version)
        if self._aliases.get(key) is ensure or self._alias_job is not None:
            return
        rollout = self.state.rollout
        reason = f"rollout {rollout.rollout_id}: {_last_reason(rollout)}" if rollout is not None else "rollout"
        source = self.backend.source

        def move() -> None:
            if ensure:
                source.ensure_alias(alias, version, reason)
            else:
                source.clear_alias(alias, version, reason)

        self._alias_job = (key, ensure, self.background.submit(move))
        self._collect_alias_job()

    def _collect_alias_job(self) -> None:
        job = self._alias_job
        if job is None or not job[2].done():
            return
        self._alias_job = None
        (alias, version), ensure, future = job
        error = future.exception()
        if error is not None:
            self.metrics.failed("act")
            log_event(logger, "alias move failed", event="alias_failed", alias=alias, version=version,
                      error=f"{type(error).__name__}: {error}")  # fmt: skip
            return
        if ensure:
            self._aliases = {k: v for k, v in self._aliases.items() if k[0] != alias}
        self._aliases[(alias, version)] = ensure

    # ------------------------------------------------------------------ the loop

    def wants_reconcile(self) -> bool:
        """Something to react to right now: a queued command or a finished measurement."""
        ready = getattr(self.runner, "ready", None)
        return self.commands.has_pending() or (callable(ready) and bool(ready()))

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """Reconcile until ``stop`` is set: at once on a command, else every ``reconcile_interval_s``."""
        last_reconcile = -float("inf")
        last_beat = -float("inf")
        while not stop.is_set():
            now = time.monotonic()
            if self.wants_reconcile() or now - last_reconcile >= self.settings.reconcile_interval_s:
                last_reconcile = now
                try:
                    self.reconcile()
                except Exception as exc:
                    self.metrics.failed("observe")
                    log_event(logger, "reconcile failed", event="reconcile_failed",
                              error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    stop.wait(self.settings.error_backoff_s)
            if heartbeat is not None and now - last_beat >= self.settings.heartbeat_interval_s:
                last_beat = now
                with contextlib.suppress(OSError):
                    heartbeat()
            stop.wait(self.settings.tick_interval_s)


def _given(state_dir: Path | None) -> Path:
    if state_dir is None:
        raise ValueError("give state_dir (the file-based state, inbox and event log), or store, commands and events")
    return state_dir


@contextlib.contextmanager
def _logged_failure(controller: Controller, step_name: ReconcileStep, outcome: ActOutcome) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        outcome.converged = False
        outcome.problems.append(f"{type(exc).__name__}: {exc}")
        controller.metrics.failed(step_name)
        log_event(logger, "reconcile step failed", event="reconcile_step_failed", step=step_name,
                  error=f"{type(exc).__name__}: {exc}")  # fmt: skip


def _last_reason(rollout: RolloutState | None) -> str:
    if rollout is None or not rollout.history:
        return "started"
    return rollout.history[-1].reason
