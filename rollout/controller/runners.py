"""Where the controller's measurements and registry calls run: inline (tests, one-shot reconciles) or in one background
thread, so the loop keeps serving commands while Prometheus or the registry answers."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar

from rollout.core.analysis import AnalysisReport, GateResult, GateStatus
from rollout.core.machine import (
    MachineStage,
    expected_gates,
)
from rollout.core.policy import MIN_LABELS_GATE, MIN_REQUESTS_GATE, RolloutPolicy

T = TypeVar("T")


OFFLINE_MESSAGE: Final[str] = "metrics provider offline: no evidence"


class AnalysisRunner(Protocol):
    """Runs one analysis job at a time; its report is collected by a later (or the same) reconcile."""

    def submit(self, job: Callable[[], AnalysisReport]) -> None: ...

    def busy(self) -> bool: ...

    def collect(self) -> AnalysisReport | BaseException | None:
        """The finished job's report (or exception), once; None when nothing finished since the last collect."""
        ...

    def close(self) -> None: ...


class InlineRunner:
    """Runs the job at submission (tests, one-shot reconciles): its report is collected by the same reconcile."""

    def __init__(self) -> None:
        self._done: AnalysisReport | BaseException | None = None

    def submit(self, job: Callable[[], AnalysisReport]) -> None:
        try:
            self._done = job()
        except Exception as exc:
            self._done = exc

    def busy(self) -> bool:
        return False

    def collect(self) -> AnalysisReport | BaseException | None:
        done, self._done = self._done, None
        return done

    def close(self) -> None:
        return None


class ThreadRunner:
    """Runs the job in one background thread, so the loop keeps serving commands while Prometheus answers."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis")
        self._future: Future[AnalysisReport] | None = None

    def submit(self, job: Callable[[], AnalysisReport]) -> None:
        if self.busy():
            return
        self._future = self._pool.submit(job)

    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def ready(self) -> bool:
        return self._future is not None and self._future.done()

    def collect(self) -> AnalysisReport | BaseException | None:
        future = self._future
        if future is None or not future.done():
            return None
        self._future = None
        error = future.exception()
        return error if error is not None else future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class InlineExecutor(Executor):
    """An executor that runs each job at submission and returns its finished future."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def offline_report(
    policy: RolloutPolicy, stage: MachineStage, stable: str, candidate: str, now: datetime
) -> AnalysisReport:
    """Every expected gate Inconclusive: the metrics store is down, so there is no evidence (never a pass; the
    inconclusive timeout ends the rollout if it stays down)."""
    layers = {g.name: g.layer for g in policy.gates}
    results = tuple(
        GateResult(
            name=name,
            layer="sample" if name in (MIN_REQUESTS_GATE, MIN_LABELS_GATE) else layers[name],
            status=GateStatus.INCONCLUSIVE,
            message=OFFLINE_MESSAGE,
        )
        for name in expected_gates(policy, stage)
    )
    return AnalysisReport(stage=stage, stable=stable, candidate=candidate, at=now, results=results)
