"""The router's Prometheus metrics: what the rollout gates query.

Label conventions, shared by every series: ``model_version`` (the version named in the routing table), ``role``
(``decider`` — the call answered a client — or ``shadow``), ``stage`` (the routing table's stage). Paired shadow
comparisons label the pair ``stable`` / ``candidate`` after the rollout's sides (see
:class:`rollout.core.routing.ComparisonPair`), so a series keeps its meaning from stage ``shadow`` to stage ``full``.

Series (``_total`` counters, ``_seconds`` histograms)::

    fraudwatch_router_requests_total{model_version, role, stage, outcome}   one per call to a model service;
        outcome = 2xx | 4xx | 5xx | timeout | error (unreachable, broken connection or unparsable answer)
    fraudwatch_router_request_duration_seconds{model_version, role}         those calls' latency
    fraudwatch_router_upstream_errors_total{model_version, role, reason}    reason = timeout | connect | transport
                                                                            | status_4xx | status_5xx | invalid_response
    fraudwatch_router_fallback_total{model_version, reason}                 a deciding candidate failed; stable answered
    fraudwatch_router_responses_total{stage, code}                          what clients got; code = 2xx | 4xx | 5xx
    fraudwatch_router_response_duration_seconds{stage}                      router-side latency of those responses
    fraudwatch_router_unavailable_total{reason}                             503s (no table, stable failed)
    fraudwatch_router_shadow_queue_depth, fraudwatch_router_shadow_inflight
    fraudwatch_router_shadow_batch_size         histogram of shadow jobs per upstream call (batched shadow scoring)
    fraudwatch_shadow_dropped_total{reason}     queue_full | overload | expired | shutdown
    fraudwatch_shadow_agreement_total{stable, candidate, agree}
    fraudwatch_shadow_pairs_total{stable, candidate, stage, stable_prediction, candidate_prediction}
    fraudwatch_shadow_score_delta{stable, candidate}                        histogram of candidate − stable score
                                                                            (no _sum: observations can be negative)
    fraudwatch_shadow_paired_score_sum_total{stable, candidate, side}       per-side score sums of the pairs
    fraudwatch_router_routing_generation, fraudwatch_router_candidate_weight (percent)
    fraudwatch_router_routing_info{stage, stable, candidate}                1 for the table in force
    fraudwatch_router_table_updates_total{source, result}   applied | unchanged | stale | invalid | missing

Children of labelled metrics are cached per label tuple, so the request path does one dict lookup per series.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Final, Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.process_collector import ProcessCollector

from rollout.core.routing import Role, RoutePlan, comparison_pair

Outcome = Literal["2xx", "4xx", "5xx", "timeout", "error"]
DropReason = Literal["queue_full", "overload", "expired", "shutdown"]
_STATUS_CLASS: Final[dict[int, str]] = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_NO_CANDIDATE: Final[str] = ""
SHADOW_BATCH_BUCKETS: Final[tuple[float, ...]] = (1, 2, 4, 8, 16, 32, 64, 128)
M = TypeVar("M", bound=MetricWrapperBase)


def status_class(status: int) -> str:
    return _STATUS_CLASS.get(status // 100, "5xx")


class _Children(Generic[M]):
    """A cache of a labelled metric's children keyed by the label-value tuple."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self.metric.labels(*values)
            self._children[values] = child
        return child


class RouterMetrics:
    """Every series the router exports, registered in its own registry (one per app)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        latency_buckets_s: Sequence[float],
        score_delta_buckets: Sequence[float],
        *,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry
        if process_metrics:
            ProcessCollector(registry=registry)
        self.requests = _Children(
            Counter(
                "fraudwatch_router_requests",
                "Calls from the router to model services, by version, role, stage and outcome.",
                ["model_version", "role", "stage", "outcome"],
                registry=registry,
            )
        )
        self.request_duration = _Children(
            Histogram(
                "fraudwatch_router_request_duration_seconds",
                "Latency of calls from the router to model services, as the router sees it.",
                ["model_version", "role"],
                buckets=latency_buckets_s,
                registry=registry,
            )
        )
        self.upstream_errors = _Children(
            Counter(
                "fraudwatch_router_upstream_errors",
                "Failed calls to model services, by version, role and reason.",
                ["model_version", "role", "reason"],
                registry=registry,
            )
        )
        self.fallbacks = _Children(
            Counter(
                "fraudwatch_router_fallback",
                "Requests a deciding candidate failed and stable answered instead, by candidate version and reason.",
                ["model_version", "reason"],
                registry=registry,
            )
        )
        self.responses = _Children(
            Counter(
                "fraudwatch_router_responses",
                "Responses the router sent to clients, by stage and status class.",
                ["stage", "code"],
                registry=registry,
            )
        )
        self.response_duration = _Children(
            Histogram(
                "fraudwatch_router_response_duration_seconds",
                "Time from the router reading a request to it returning the response.",
                ["stage"],
                buckets=latency_buckets_s,
                registry=registry,
            )
        )
        self.unavailable = _Children(
            Counter(
                "fraudwatch_router_unavailable",
                "503 responses: no routing table, or stable failed.",
                ["reason"],
                registry=registry,
            )
        )
        self.shadow_queue_depth = Gauge(
            "fraudwatch_router_shadow_queue_depth", "Shadow calls waiting for a worker.", registry=registry
        )
        self.shadow_inflight = Gauge(
            "fraudwatch_router_shadow_inflight", "Shadow calls being made right now.", registry=registry
        )
        self.shadow_batch_size = Histogram(
            "fraudwatch_router_shadow_batch_size",
            "Shadow jobs scored per upstream call (1 = a single scoring call, more = one batch call).",
            buckets=SHADOW_BATCH_BUCKETS,
            registry=registry,
        )
        self.shadow_dropped = _Children(
            Counter(
                "fraudwatch_shadow_dropped",
                "Shadow calls not made (shed to protect the response path, or cut by shutdown), by reason.",
                ["reason"],
                registry=registry,
            )
        )
        self.shadow_agreement = _Children(
            Counter(
                "fraudwatch_shadow_agreement",
                "Paired decider/shadow answers, by whether their decisions agree.",
                ["stable", "candidate", "agree"],
                registry=registry,
            )
        )
        self.shadow_pairs = _Children(
            Counter(
                "fraudwatch_shadow_pairs",
                "Paired decider/shadow answers by the predictions of each side (a confusion table), by stage.",
                ["stable", "candidate", "stage", "stable_prediction", "candidate_prediction"],
                registry=registry,
            )
        )
        self.shadow_score_delta = _Children(
            Histogram(
                "fraudwatch_shadow_score_delta",
                "Score of the candidate minus score of the stable on the same request.",
                ["stable", "candidate"],
                buckets=score_delta_buckets,
                registry=registry,
            )
        )
        self.shadow_score_sum = _Children(
            Counter(
                "fraudwatch_shadow_paired_score_sum",
                "Sum of the scores of each side of the paired answers (the delta histogram has no _sum, as its "
                "observations can be negative): mean delta = (candidate − stable) / pairs.",
                ["stable", "candidate", "side"],
                registry=registry,
            )
        )
        self.generation = Gauge(
            "fraudwatch_router_routing_generation", "Generation of the routing table in force.", registry=registry
        )
        self.candidate_weight = Gauge(
            "fraudwatch_router_candidate_weight",
            "Percent of entities the candidate decides for under the table in force.",
            registry=registry,
        )
        self._routing_info = Gauge(
            "fraudwatch_router_routing_info",
            "1 for the (stage, stable, candidate) of the routing table in force.",
            ["stage", "stable", "candidate"],
            registry=registry,
        )
        self.table_updates = _Children(
            Counter(
                "fraudwatch_router_table_updates",
                "Routing tables offered to the router, by source and result.",
                ["source", "result"],
                registry=registry,
            )
        )

    def observe_call(self, version: str, role: Role, stage: str, outcome: Outcome, seconds: float) -> None:
        self.requests(version, role, stage, outcome).inc()
        self.request_duration(version, role).observe(seconds)

    def observe_response(self, stage: str, status: int, seconds: float) -> None:
        self.responses(stage, status_class(status)).inc()
        self.response_duration(stage).observe(seconds)

    def observe_pair(
        self, stable: str, candidate: str, stage: str, stable_prediction: int, candidate_prediction: int, delta: float
    ) -> None:
        agree = "true" if stable_prediction == candidate_prediction else "false"
        self.shadow_agreement(stable, candidate, agree).inc()
        self.shadow_pairs(stable, candidate, stage, str(stable_prediction), str(candidate_prediction)).inc()
        self.shadow_score_delta(stable, candidate).observe(delta)

    def observe_pair_scores(self, stable: str, candidate: str, stable_score: float, candidate_score: float) -> None:
        self.shadow_score_sum(stable, candidate, "stable").inc(stable_score)
        self.shadow_score_sum(stable, candidate, "candidate").inc(candidate_score)

    def show_plan(self, plan: RoutePlan) -> None:
        table = plan.table
        self.generation.set(table.generation)
        self.candidate_weight.set(table.candidate_weight)
        self._routing_info.clear()
        candidate = table.candidate.version if table.candidate else _NO_CANDIDATE
        self._routing_info.labels(table.stage, table.stable.version, candidate).set(1)
        for route in (plan.stable_route, plan.candidate_route):  # the stage's pair cells start at zero
            if route is None:
                continue
            for shadow in route.shadows:
                pair = comparison_pair(route.decider.version, shadow.version, table.stable.version)
                for stable_prediction, candidate_prediction in itertools.product("01", repeat=2):
                    self.shadow_pairs(pair.stable, pair.candidate, table.stage, stable_prediction, candidate_prediction)
