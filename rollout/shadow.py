"""Shadow scoring off the response path: a bounded queue, a bounded pool of workers, a deadline, shedding.

``submit`` is synchronous and O(1): it either enqueues the job or drops it and counts why —

* ``overload``   the router has more deciding calls in flight than ``shadow_shed_inflight`` (shadow is shed first);
* ``queue_full`` the queue is at ``shadow_queue_size``;
* ``expired``    the job waited longer than ``shadow_timeout_s`` before a worker took it;
* ``shutdown``   the router is stopping and the drain budget ran out (or the job came in after it started).

When a shadow answer arrives it is paired with the decider's answer of the same request (agreement, confusion
table, score delta — see :class:`rollout.routing.ComparisonPair`) and handed to the prediction log (role shadow).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from rollout.metrics import DropReason, RouterMetrics
from rollout.outcomes import PredictionRecord
from rollout.routing import VersionEndpoint, comparison_pair
from rollout.settings import RouterSettings
from rollout.upstream import Answer, Caller


class PredictionSink(Protocol):
    """Where predictions go (``rollout.outcomes.PredictionLog``): ``record`` must not block."""

    async def start(self) -> None: ...

    def record(self, rec: PredictionRecord) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ShadowJob:
    endpoint: VersionEndpoint
    body: bytes
    headers: Mapping[str, str]
    correlation_id: str
    entity_key: str | None
    received_at: datetime
    stage: str
    #: The answer that was returned to the client, and the table versions it is compared under.
    decider_version: str
    decider: Answer
    table_stable_version: str
    enqueued_at: float


class ShadowRunner:
    """Runs shadow calls on ``shadow_concurrency`` workers; never makes the caller wait."""

    def __init__(
        self,
        settings: RouterSettings,
        caller: Caller,
        metrics: RouterMetrics,
        sink: PredictionSink | None,
        deciding_inflight: Callable[[], int],
    ) -> None:
        self._settings = settings
        self._caller = caller
        self._metrics = metrics
        self._sink = sink
        self._deciding_inflight = deciding_inflight
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=settings.shadow_queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._inflight = 0
        self._closing = False
        metrics.shadow_queue_depth.set_function(self._queue.qsize)
        metrics.shadow_inflight.set_function(lambda: self._inflight)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def inflight(self) -> int:
        return self._inflight

    def start(self) -> None:
        self._workers = [
            asyncio.get_running_loop().create_task(self._work(), name=f"shadow-worker-{i}")
            for i in range(self._settings.shadow_concurrency)
        ]

    def submit(self, job: ShadowJob) -> bool:
        """Enqueue ``job`` or drop it (counted); True when enqueued."""
        if self._closing:
            return self._drop("shutdown")
        if self._deciding_inflight() > self._settings.shadow_shed_inflight:
            return self._drop("overload")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            return self._drop("queue_full")
        return True

    def _drop(self, reason: DropReason, count: int = 1) -> bool:
        if count > 0:
            self._metrics.shadow_dropped(reason).inc(count)
        return False

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._run(job)
            finally:
                self._queue.task_done()

    async def _run(self, job: ShadowJob) -> None:
        if time.monotonic() - job.enqueued_at > self._settings.shadow_timeout_s:
            self._drop("expired")
            return
        self._inflight += 1
        try:
            result = await self._caller.call(
                job.endpoint,
                "shadow",
                job.stage,
                job.body,
                job.headers,
                self._settings.shadow_timeout_s,
            )
        except asyncio.CancelledError:
            self._drop("shutdown")
            raise
        finally:
            self._inflight -= 1
        if isinstance(result, Answer):
            self._compare(job, result)

    def _compare(self, job: ShadowJob, shadow: Answer) -> None:
        pair = comparison_pair(job.decider_version, job.endpoint.version, job.table_stable_version)
        stable_side, candidate_side = (shadow, job.decider) if pair.shadow_is_stable else (job.decider, shadow)
        self._metrics.observe_pair(
            pair.stable,
            pair.candidate,
            stable_side.prediction,
            candidate_side.prediction,
            pair.score_delta(job.decider.score, shadow.score),
        )
        self._metrics.observe_pair_scores(pair.stable, pair.candidate, stable_side.score, candidate_side.score)
        if self._sink is not None:
            self._sink.record(
                PredictionRecord(
                    correlation_id=job.correlation_id,
                    entity_key=job.entity_key,
                    ts=job.received_at,
                    model_version=job.endpoint.version,
                    role="shadow",
                    score=shadow.score,
                    prediction=shadow.prediction,
                    threshold=shadow.threshold,
                    stage=job.stage,
                )
            )

    async def drain(self, budget_s: float) -> None:
        """Stop taking work; let queued jobs finish within ``budget_s``; drop (and count) whatever is left."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget_s):
                await self._queue.join()
        left = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            left += 1
        self._drop("shutdown", left)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
