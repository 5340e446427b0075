"""Prometheus metrics of the scoring service; every series carries ``model_version``.

Under ``bentoml serve`` the workers run prometheus_client in multiprocess mode (BentoML sets
``PROMETHEUS_MULTIPROC_DIR`` in each worker's environment and its ``/metrics`` merges every worker's files), so
these metrics must be created inside the worker, i.e. from the service's ``__init__``, never at import time.
``prometheus_client`` is imported lazily for the same reason.

Series (PSI is computed from the ``feature_bin`` counters against the ``reference_bin_fraction`` gauges):

=============================================  =====================================================
``fraudwatch_request_duration_seconds``        histogram {model_version, endpoint}
``fraudwatch_request_errors_total``            counter {model_version, endpoint, reason}
``fraudwatch_score``                           histogram {model_version} of calibrated scores (0..1)
``fraudwatch_decisions_total``                 counter {model_version, decision}
``fraudwatch_feature_bin_total``               counter {model_version, feature, bin}; ``feature="score"``
                                               counts the score against the manifest's score_reference
``fraudwatch_reference_bin_fraction``          gauge {model_version, feature, bin}: the training fractions
``fraudwatch_feature_store_lookups_total``     counter {model_version}: entity keys looked up
``fraudwatch_feature_store_fallback_total``    counter {model_version, reason}: defaults served instead
``fraudwatch_model_info``                      gauge {model_version} = 1 while the model is loaded
``fraudwatch_model_trained_timestamp_seconds``  gauge {model_version}: when the bundle was made (its manifest's
                                               ``created_at``); ``FraudwatchModelStale`` reads it
``fraudwatch_online_store_reads_total``        counter {model_version}: requests whose velocity features were read
``fraudwatch_online_store_fallback_total``     counter {model_version, reason}: requests served the velocity
                                               defaults (timeout/error/unavailable)
``fraudwatch_online_store_feature_age_seconds``  histogram {model_version}: at each read, how far the store's
                                               newest applied event is behind the request (its freshness)
``fraudwatch_online_store_update_lag_seconds``  histogram {model_version}: from a scored request to its event
                                               being written (applied or found a replay)
``fraudwatch_online_store_writes_total``       counter {model_version, outcome}: events written (applied/duplicate)
``fraudwatch_online_store_dropped_total``      counter {model_version, reason}: events never written
                                               (overflow/error)
=============================================  =====================================================
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from service.artifacts.bundle import Manifest

PREFIX: Final[str] = "fraudwatch"
#: Request latency buckets in seconds: millisecond resolution where the latency budget lives.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
)
#: Score buckets: finer near 0 where most legitimate traffic lands, and near 1.
SCORE_BUCKETS: Final[tuple[float, ...]] = (
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.99,
    1.0,
)
#: Freshness buckets in seconds: milliseconds of writer lag up to a day-old store.
FRESHNESS_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    3600.0,
    21600.0,
    86400.0,
)
#: The ``feature`` label value under which the score's own bins are counted.
SCORE_FEATURE: Final[str] = "score"
#: ``model_version`` label value before a model is loaded.
NO_MODEL: Final[str] = "none"


class Metrics:
    """The metric families (unbound). One instance per registry; use :func:`default_metrics` in the service."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        import prometheus_client as prom

        reg = registry if registry is not None else prom.REGISTRY
        self.request_duration = prom.Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time spent in the scoring service per HTTP request (validation, lookups, scoring, response).",
            ["model_version", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.errors = prom.Counter(
            f"{PREFIX}_request_errors",
            "Requests answered with an error, by reason (validation, invalid_json, payload_too_large, ...).",
            ["model_version", "endpoint", "reason"],
            registry=reg,
        )
        self.score = prom.Histogram(
            f"{PREFIX}_score",
            "Calibrated fraud scores served.",
            ["model_version"],
            buckets=SCORE_BUCKETS,
            registry=reg,
        )
        self.decisions = prom.Counter(
            f"{PREFIX}_decisions", "Decisions served, by decision.", ["model_version", "decision"], registry=reg
        )
        self.feature_bins = prom.Counter(
            f"{PREFIX}_feature_bin",
            "Served values per reference bin of each drift feature (and of the score, feature='score').",
            ["model_version", "feature", "bin"],
            registry=reg,
        )
        self.reference_fraction = prom.Gauge(
            f"{PREFIX}_reference_bin_fraction",
            "The training fraction of each reference bin (the PSI baseline).",
            ["model_version", "feature", "bin"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.store_lookups = prom.Counter(
            f"{PREFIX}_feature_store_lookups",
            "Entity keys looked up in the feature store.",
            ["model_version"],
            registry=reg,
        )
        self.store_fallbacks = prom.Counter(
            f"{PREFIX}_feature_store_fallback",
            "Entity keys answered with the conservative default aggregates, by reason (miss/timeout/error).",
            ["model_version", "reason"],
            registry=reg,
        )
        self.model_info = prom.Gauge(
            f"{PREFIX}_model_info",
            "1 for the model version this process serves.",
            ["model_version"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.online_reads = prom.Counter(
            f"{PREFIX}_online_store_reads",
            "Requests whose velocity features were read from the online store.",
            ["model_version"],
            registry=reg,
        )
        self.online_fallbacks = prom.Counter(
            f"{PREFIX}_online_store_fallback",
            "Requests served the default velocity features instead, by reason (timeout/error/unavailable).",
            ["model_version", "reason"],
            registry=reg,
        )
        self.online_age = prom.Histogram(
            f"{PREFIX}_online_store_feature_age_seconds",
            "At each read: how far the online store's newest applied event is behind the request.",
            ["model_version"],
            buckets=FRESHNESS_BUCKETS,
            registry=reg,
        )
        self.online_lag = prom.Histogram(
            f"{PREFIX}_online_store_update_lag_seconds",
            "From a scored request to its event being written to the online store.",
            ["model_version"],
            buckets=FRESHNESS_BUCKETS,
            registry=reg,
        )
        self.online_writes = prom.Counter(
            f"{PREFIX}_online_store_writes",
            "Events written to the online store, by outcome (applied, or duplicate: a replay changed nothing).",
            ["model_version", "outcome"],
            registry=reg,
        )
        self.online_dropped = prom.Counter(
            f"{PREFIX}_online_store_dropped",
            "Events never written to the online store, by reason (overflow of the writer's queue, error).",
            ["model_version", "reason"],
            registry=reg,
        )
        self.model_trained = prom.Gauge(
            f"{PREFIX}_model_trained_timestamp_seconds",
            "When the served model version was trained (Unix time, from its manifest's created_at).",
            ["model_version"],
            registry=reg,
            multiprocess_mode="max",
        )

    def bind(self, manifest: Manifest, endpoints: Sequence[str], fallback_reasons: Sequence[str]) -> BoundMetrics:
        return BoundMetrics.create(self, manifest, endpoints, fallback_reasons)

    def online(self, version: str) -> OnlineStoreMetrics:
        return OnlineStoreMetrics(self, version)


_DEFAULT: list[Metrics] = []


def default_metrics() -> Metrics:
    """The process-wide metric families on prometheus_client's default registry (created on first use)."""
    if not _DEFAULT:
        _DEFAULT.append(Metrics())
    return _DEFAULT[0]


@dataclass(frozen=True)
class _BinnedColumn:
    """One column of the feature matrix (or the score) with its reference edges and pre-resolved counters."""

    feature: str
    column: int
    edges: npt.NDArray[np.float64]
    edge_list: tuple[float, ...]
    counters: tuple[Any, ...]

    def count(self, values: npt.NDArray[Any]) -> None:
        """Count many values (``ReferenceBins.bin_of`` semantics: ``searchsorted(..., side='right')``)."""
        bins = np.searchsorted(self.edges, values, side="right")
        for index, n in enumerate(np.bincount(bins, minlength=len(self.counters))):
            if n:
                self.counters[index].inc(float(n))

    def count_one(self, value: float) -> None:
        """Count one value; ``bisect_right`` is ``searchsorted(side='right')`` without numpy's per-call cost."""
        self.counters[bisect_right(self.edge_list, value)].inc()


class BoundMetrics:
    """The metrics of one model version with every label child resolved up front (cheap per request)."""

    def __init__(
        self,
        metrics: Metrics,
        version: str,
        threshold_decisions: Mapping[int, str],
        binned: Sequence[_BinnedColumn],
        score_bins: _BinnedColumn,
        fallback_reasons: Sequence[str],
    ) -> None:
        self.metrics = metrics
        self.version = version
        self._decisions = {pred: metrics.decisions.labels(version, name) for pred, name in threshold_decisions.items()}
        self._score = metrics.score.labels(version)
        self._binned = tuple(binned)
        self._score_bins = score_bins
        self._lookups = metrics.store_lookups.labels(version)
        self._fallbacks = {reason: metrics.store_fallbacks.labels(version, reason) for reason in fallback_reasons}
        self._latency: dict[str, Any] = {}

    @classmethod
    def create(
        cls, metrics: Metrics, manifest: Manifest, endpoints: Sequence[str], fallback_reasons: Sequence[str]
    ) -> BoundMetrics:
        version = manifest.version
        binned = [
            _bin_column(metrics, manifest, feature, manifest.feature_names.index(feature))
            for feature in manifest.feature_reference
            if feature in manifest.feature_names
        ]
        score_bins = _bin_column(metrics, manifest, SCORE_FEATURE, -1)
        bound = cls(metrics, version, {0: "approve", 1: "review"}, binned, score_bins, fallback_reasons)
        metrics.model_info.labels(version).set(1)
        trained_at = trained_timestamp(manifest.created_at)
        if trained_at is not None:
            metrics.model_trained.labels(version).set(trained_at)
        for endpoint in endpoints:
            bound._latency[endpoint] = metrics.request_duration.labels(version, endpoint)
        return bound

    def observe_latency(self, endpoint: str, seconds: float) -> None:
        child = self._latency.get(endpoint)
        if child is None:
            child = self._latency[endpoint] = self.metrics.request_duration.labels(self.version, endpoint)
        child.observe(seconds)

    def count_error(self, endpoint: str, reason: str) -> None:
        self.metrics.errors.labels(self.version, endpoint, reason).inc()

    def observe(self, features: npt.NDArray[np.float32], scores: npt.NDArray[np.float64], predictions: Any) -> None:
        """Count one scored batch: score histogram, decisions, and the bins of every drift feature and the score."""
        if scores.shape[0] == 1:
            self._observe_one(features[0].tolist(), float(scores[0]), int(predictions[0]))
            return
        for score in scores.tolist():
            self._score.observe(score)
        n_review = int(np.count_nonzero(predictions))
        if n_review:
            self._decisions[1].inc(n_review)
        if len(scores) - n_review:
            self._decisions[0].inc(len(scores) - n_review)
        for binned in self._binned:
            binned.count(features[:, binned.column])
        self._score_bins.count(scores)

    def _observe_one(self, row: list[float], score: float, prediction: int) -> None:
        self._score.observe(score)
        self._decisions[prediction].inc()
        for binned in self._binned:
            binned.count_one(row[binned.column])
        self._score_bins.count_one(score)

    def count_lookups(self, n: int) -> None:
        if n:
            self._lookups.inc(n)

    def count_fallbacks(self, reason: str, n: int) -> None:
        if n:
            self._fallbacks[reason].inc(n)


class OnlineStoreMetrics:
    """The online store's series of one model version, children resolved up front (callbacks of
    ``service.data.online_store.ReadCallbacks`` and ``WriterCallbacks``); every reason and outcome starts at zero."""

    def __init__(self, metrics: Metrics, version: str) -> None:
        from service.data.online_store import DROP_REASONS, ONLINE_FALLBACK_REASONS, WRITE_OUTCOMES

        self._reads = metrics.online_reads.labels(version)
        self._fallbacks = {
            reason: metrics.online_fallbacks.labels(version, reason) for reason in ONLINE_FALLBACK_REASONS
        }
        self._age = metrics.online_age.labels(version)
        self._lag = metrics.online_lag.labels(version)
        self._writes = {outcome: metrics.online_writes.labels(version, outcome) for outcome in WRITE_OUTCOMES}
        self._dropped = {reason: metrics.online_dropped.labels(version, reason) for reason in DROP_REASONS}

    def reads(self, n: int) -> None:
        self._reads.inc(n)

    def fallback(self, reason: str, n: int) -> None:
        self._fallbacks[reason].inc(n)

    def age(self, seconds: float) -> None:
        self._age.observe(seconds)

    def lag(self, seconds: float) -> None:
        self._lag.observe(seconds)

    def written(self, outcome: str, n: int) -> None:
        if n:
            self._writes[outcome].inc(n)

    def dropped(self, reason: str, n: int) -> None:
        if n:
            self._dropped[reason].inc(n)


def trained_timestamp(created_at: str) -> float | None:
    """A manifest's ISO-8601 ``created_at`` as Unix time (UTC when it names no zone); None if it does not parse."""
    try:
        moment = datetime.fromisoformat(created_at)
    except ValueError:
        return None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def _bin_column(metrics: Metrics, manifest: Manifest, feature: str, column: int) -> _BinnedColumn:
    reference = manifest.score_reference if feature == SCORE_FEATURE else manifest.feature_reference[feature]
    version = manifest.version
    n_bins = len(reference.edges) + 1
    counters = tuple(metrics.feature_bins.labels(version, feature, str(i)) for i in range(n_bins))
    for i, fraction in enumerate(reference.fractions[:n_bins]):
        metrics.reference_fraction.labels(version, feature, str(i)).set(float(fraction))
    edges = tuple(float(edge) for edge in reference.edges)
    return _BinnedColumn(feature, column, np.asarray(edges, dtype=np.float64), edges, counters)
