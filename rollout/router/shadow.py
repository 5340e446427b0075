"""Shadow scoring off the response path: a bounded queue, a bounded pool of workers, a deadline, shedding.

``submit`` is synchronous and O(1): it either enqueues the job or drops it and counts why —

* ``overload``   the router has more deciding calls in flight than ``shadow_shed_inflight`` (shadow is shed first);
* ``queue_full`` the queue is at ``shadow_queue_size``;
* ``expired``    the job waited longer than ``shadow_timeout_s`` before a worker took it;
* ``shutdown``   the router is stopping and the drain budget ran out (or the job came in after it started).

A worker takes the first queued job, then whatever else is queued (waiting at most ``shadow_batch_linger_ms`` for
more, up to ``shadow_batch_max`` jobs), and scores the jobs of each (version, stage) in one call to that version's
batch endpoint (a single job: one call to the scoring endpoint). Each job is still counted as one call.

When a shadow answer arrives it is paired with the decider's answer of the same request (agreement, confusion
table, score delta — see :class:`rollout.core.routing.ComparisonPair`) and handed to the prediction log (role shadow).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from rollout.core.routing import VersionEndpoint, comparison_pair
from rollout.router.metrics import DropReason, RouterMetrics
from rollout.router.outcomes.prediction_log import PredictionRecord
from rollout.router.upstream import Answer, Caller
from rollout.settings import RouterSettings


class PredictionSink(Protocol):
    """Where predictions go (``rollout.router.outcomes.prediction_log.PredictionLog``): ``record`` must not block."""

    async def start(self) -> None: ...

    def record(self, rec: PredictionRecord) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ShadowJob:
    endpoint: VersionEndpoint
    body: bytes
    headers: Mapping[str, str]
    #: The router's ID of the request (the label join key) and the client's tracing ID.
    prediction_id: str
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
        self._gathering = asyncio.Lock()
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
            jobs: list[ShadowJob] = []
            settled = 0  # jobs whose fate is counted (scored, or dropped as expired)
            try:
                async with self._gathering:  # one worker gathers at a time: idle workers must not split its batch
                    jobs.append(await self._queue.get())
                    await self._take_more(jobs)
                for group in batches(jobs):
                    fresh = self._fresh(group)
                    settled += len(group) - len(fresh)
                    await self._score(fresh)
                    settled += len(fresh)
            except asyncio.CancelledError:
                self._drop("shutdown", len(jobs) - settled)
                raise
            finally:
                for _ in jobs:
                    self._queue.task_done()

    async def _take_more(self, jobs: list[ShadowJob]) -> None:
        """Add queued jobs to ``jobs`` up to ``shadow_batch_max``, waiting at most the linger for each next one."""
        limit = self._settings.shadow_batch_max
        deadline = time.monotonic() + self._settings.shadow_batch_linger_ms / 1000.0
        while len(jobs) < limit:
            try:
                jobs.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                return
            try:
                async with asyncio.timeout(remaining):
                    jobs.append(await self._queue.get())
            except TimeoutError:
                return

    def _fresh(self, group: list[ShadowJob]) -> list[ShadowJob]:
        """The jobs still within their deadline; the others are dropped (counted) as expired."""
        now = time.monotonic()
        fresh = [job for job in group if now - job.enqueued_at <= self._settings.shadow_timeout_s]
        self._drop("expired", len(group) - len(fresh))
        return fresh

    async def _score(self, jobs: list[ShadowJob]) -> None:
        """Score jobs of one (version, stage): one scoring call for a single job, else one batch call."""
        if not jobs:
            return
        first, budget = jobs[0], self._settings.shadow_timeout_s
        self._inflight += len(jobs)
        try:
            if len(jobs) == 1:
                results = [await self._caller.call(first.endpoint, "shadow", first.stage, first.body, first.headers,
                                                    budget)]  # fmt: skip
            else:
                bodies, ids = [j.body for j in jobs], [j.correlation_id for j in jobs]
                results = await self._caller.call_batch(first.endpoint, "shadow", first.stage, bodies, ids, budget)
        finally:
            self._inflight -= len(jobs)
        self._metrics.shadow_batch_size.observe(len(jobs))
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, Answer):
                self._compare(job, result)

    def _compare(self, job: ShadowJob, shadow: Answer) -> None:
        pair = comparison_pair(job.decider_version, job.endpoint.version, job.table_stable_version)
        stable_side, candidate_side = (shadow, job.decider) if pair.shadow_is_stable else (job.decider, shadow)
        self._metrics.observe_pair(
            pair.stable,
            pair.candidate,
            job.stage,
            stable_side.prediction,
            candidate_side.prediction,
            pair.score_delta(job.decider.score, shadow.score),
        )
        self._metrics.observe_pair_scores(pair.stable, pair.candidate, stable_side.score, candidate_side.score)
        if self._sink is not None:
            self._sink.record(
                PredictionRecord(
                    prediction_id=job.prediction_id,
                    entity_key=job.entity_key,
                    ts=job.received_at,
                    model_version=job.endpoint.version,
                    role="shadow",
                    score=shadow.score,
                    prediction=shadow.prediction,
                    threshold=shadow.threshold,
                    stage=job.stage,
                    stable_version=job.table_stable_version,
                    correlation_id=job.correlation_id,
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


def batches(jobs: list[ShadowJob]) -> list[list[ShadowJob]]:
    """``jobs`` grouped by (endpoint, stage) — one upstream call each — in order of first appearance."""
    groups: dict[tuple[str, str, str], list[ShadowJob]] = {}
    for job in jobs:
        groups.setdefault((job.endpoint.version, job.endpoint.url, job.stage), []).append(job)
    return list(groups.values())
