"""A real Prometheus (Debian's binary) scraping real exporters and evaluating deploy/prometheus/rules.yml.

1. Two exporter replicas of the model service's drift series (prometheus_client HTTP servers on 127.0.0.1) plus the
   outcome metrics of a real :class:`OutcomeTracker`: the recorded PSI equals rollout/core/drift.py's, precision is
   exact, and ROC-AUC computed from the recorded bucket series (as the controller does) matches.
2. A real ``bentoml serve`` of the scoring service receiving shifted traffic: PSI series exist for every drift
   feature and the score, and the shifted feature's PSI is large.
3. The query client's typed errors and empty results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sklearn.metrics import roc_auc_score

from rollout.backends.local.prometheus import PrometheusServer, ScrapeTarget
from rollout.backends.prometheus import PrometheusClient, PrometheusQueryError, PrometheusUnavailableError
from rollout.core import drift
from rollout.router.outcomes.feedback import OutcomeTracker
from rollout.router.outcomes.prediction_log import PredictionLog, PredictionRecord
from rollout.router.outcomes.settings import DriftSettings, OutcomeSettings
from rollout.settings import PrometheusSettings
from service.common.processes import free_port
from service.data.features import DRIFT_FEATURES
from service.data.synthetic import generate
from service.serving.process import BentoServer
from tests.conftest import SMALL_DATA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
HOST = "127.0.0.1"
WAIT_S = 60.0
T = TypeVar("T")

REFERENCE = [0.1, 0.2, 0.3, 0.4]
SHIFTED = [0.4, 0.3, 0.2, 0.1]


def _settings() -> PrometheusSettings:
    return PrometheusSettings(scrape_interval_s=1.0, evaluation_interval_s=1.0, ready_timeout_s=60.0)


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something other than None (or fail naming ``what``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class DriftExporter(Collector):
    """The model service's drift series for one replica, swapped atomically so a scrape never sees half an update."""

    def __init__(self, versions: dict[str, list[float]]) -> None:
        self.references = versions
        self.counts: dict[tuple[str, str, str], float] = {
            (version, feature, str(b)): 0.0 for version in versions for feature in ("amount", "score") for b in range(4)
        }

    def publish(self, counts: dict[tuple[str, str, str], float]) -> None:
        self.counts = dict(counts)

    def collect(self) -> Iterator[Metric]:
        counts = self.counts
        bins = CounterMetricFamily("fraudwatch_feature_bin", "bins", labels=["model_version", "feature", "bin"])
        for key, value in counts.items():
            bins.add_metric(list(key), value)
        refs = GaugeMetricFamily("fraudwatch_reference_bin_fraction", "ref", labels=["model_version", "feature", "bin"])
        for version, fractions in self.references.items():
            for feature in ("amount", "score"):
                for b, fraction in enumerate(fractions):
                    refs.add_metric([version, feature, str(b)], fraction)
        yield bins
        yield refs


def _start_exporter(registry: CollectorRegistry) -> tuple[Any, int]:
    port = free_port(HOST)
    server, _thread = start_http_server(port, addr=HOST, registry=registry)
    return server, port


def _labelled_scores(n_pos: int, n_neg: int) -> tuple[list[float], list[int]]:
    rng = np.random.default_rng(21)
    pos = rng.beta(4.0, 2.0, n_pos).tolist()
    neg = rng.beta(1.0, 8.0, n_neg).tolist()
    return pos + neg, [1] * n_pos + [0] * n_neg


def test_recorded_psi_precision_and_auc_from_real_exporters(tmp_path: Path) -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]
    exporters = [DriftExporter({"v1": REFERENCE, "v2": REFERENCE}) for _ in registries]
    for registry, exporter in zip(registries, exporters, strict=True):
        registry.register(exporter)
    outcome_settings = OutcomeSettings(dsn=f"sqlite:///{tmp_path / 'log.db'}")
    tracker = OutcomeTracker(
        PredictionLog(outcome_settings, registry=registries[0]), outcome_settings, registry=registries[0]
    )
    tracker.prepare("v2", "decider", "ab")
    servers = [_start_exporter(registry) for registry in registries]
    targets = [ScrapeTarget(f"{HOST}:{port}", {"replica": str(i)}) for i, (_, port) in enumerate(servers)]
    try:
        with PrometheusServer(tmp_path / "prom", targets, rule_files=[RULES], settings=_settings()) as prom:
            client = prom.client()
            # every exporter has been scraped with its zero counters before anything is counted
            wait_for(
                lambda: client.query(
                    "count(fraudwatch_feature_bin_total) == 32 and on () count(fraudwatch_outcome_total) == 4"
                ),
                "the first scrape of both exporters",
            )
            # v1 keeps the reference distribution, v2 shifts; replica 0 gets 3× the traffic of replica 1
            for exporter, volume in zip(exporters, (300, 100), strict=True):
                counts: dict[tuple[str, str, str], float] = {}
                for version, fractions in (("v1", REFERENCE), ("v2", SHIFTED)):
                    for feature in ("amount", "score"):
                        for b, fraction in enumerate(fractions):
                            counts[(version, feature, str(b))] = round(volume * fraction)
                exporter.publish(counts)
            scores, labels = _labelled_scores(60, 340)
            threshold = 0.5
            t0 = datetime.now(UTC) - timedelta(days=2)
            for i, (score, label) in enumerate(zip(scores, labels, strict=True)):
                rec = PredictionRecord(f"c{i}", None, t0, "v2", "decider", score, int(score >= threshold), 0.5, "ab")
                tracker.observe([rec], label, t0 + timedelta(days=1))

            psi = wait_for(
                lambda: client.query('model_version_feature:fraudwatch_psi:5m{model_version="v2",feature="amount"}'),
                "the recorded PSI of v2",
            )
            expected = drift.psi(REFERENCE, SHIFTED, DriftSettings().psi_epsilon)
            assert psi == pytest.approx(expected, rel=1e-6)
            stable = client.query('model_version_feature:fraudwatch_psi:5m{model_version="v1",feature="amount"}')
            assert stable == pytest.approx(0.0, abs=1e-9)
            vector = client.query_vector("model_version_feature:fraudwatch_psi:1h")
            assert {(labels["model_version"], labels["feature"]) for labels, _ in vector} == {
                (v, f) for v in ("v1", "v2") for f in ("amount", "score")
            }

            tp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and y == 1)
            fp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and y == 0)
            precision = wait_for(
                lambda: client.query('model_version_role:fraudwatch_outcome_precision:ratio1h{model_version="v2"}'),
                "the recorded precision",
            )
            assert precision == pytest.approx(tp / (tp + fp), rel=1e-9)

            buckets = client.query_vector(
                'model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1h{model_version="v2"}'
            )
            by_label: dict[str, dict[float, float]] = {"fraud": {}, "legit": {}}
            for sample_labels, value in buckets:
                by_label[sample_labels["label"]][drift.parse_le(sample_labels["le"])] = value
            auc = drift.roc_auc_from_prometheus_buckets(by_label["fraud"], by_label["legit"])
            assert auc is not None
            assert auc == pytest.approx(roc_auc_score(labels, scores), abs=0.01)
            client.close()
    finally:
        for server, _ in servers:
            server.shutdown()


@pytest.mark.slow
def test_psi_from_a_real_bentoml_server_under_shifted_traffic(served_model: BentoServer, tmp_path: Path) -> None:
    rows = generate(SMALL_DATA).sample(400, random_state=3).to_dict("records")  # the bundle's training data
    # amounts ten times larger than anything seen in training; account age and IP counts unchanged
    requests = [
        {"yearsActive": r["yearsActive"], "amount": round(r["amount"] * 10, 2), "ipAccounts": int(r["ipAccounts"])}
        for r in rows
    ]
    host_port = served_model.url.removeprefix("http://")
    with PrometheusServer(
        tmp_path / "prom", [ScrapeTarget(host_port)], rule_files=[RULES], settings=_settings()
    ) as prom:
        client = prom.client()
        wait_for(
            lambda: client.query("count(fraudwatch_reference_bin_fraction) > 0"),
            "the first scrape of the model service (is fraudwatch_reference_bin_fraction exported?)",
        )
        time.sleep(2.0)  # a second scrape of the zero counters
        with httpx.Client(base_url=served_model.url, timeout=30.0) as http:
            for start in range(0, len(requests), 50):
                response = http.post("/api/v1/refund-predict-batch", json={"requests": requests[start : start + 50]})
                assert response.status_code == 200, response.text

        def all_psi() -> dict[str, float] | None:
            vector = client.query_vector("model_version_feature:fraudwatch_psi:5m")
            values = {labels["feature"]: value for labels, value in vector}
            total = client.query('sum(model_version_feature:fraudwatch_feature_bin:increase5m{feature="amount"})')
            if set(values) >= {*DRIFT_FEATURES, "score"} and total is not None and total >= len(requests) * 0.95:
                return values
            return None

        psi = wait_for(all_psi, "PSI series of every drift feature and the score")
        client.close()
    assert all(math.isfinite(v) and v >= 0.0 for v in psi.values()), psi
    assert psi["amount"] > 0.25, psi
    assert psi["years_active"] < 0.1, psi
    assert psi["ip_accounts"] < 0.1, psi


def test_client_errors_are_typed_and_empty_results_are_none(tmp_path: Path) -> None:
    with PrometheusServer(tmp_path / "prom", [], rule_files=[RULES], settings=_settings()) as prom:
        client = prom.client()
        assert client.is_online()
        assert client.query("vector(2) * 3") == 6.0
        assert client.query("scalar(vector(1.5))") == 1.5
        assert client.query("fraudwatch_metric_that_does_not_exist") is None
        assert client.query("vector(0) / 0") is None
        assert client.query_vector("fraudwatch_metric_that_does_not_exist") == []
        with pytest.raises(PrometheusQueryError, match="rejected"):
            client.query("sum(")
        with pytest.raises(PrometheusQueryError, match="2 series"):
            client.query('label_replace(vector(1), "a", "x", "", "") or label_replace(vector(1), "a", "y", "", "")')
        client.close()
    offline = PrometheusClient(f"http://{HOST}:{free_port(HOST)}", settings=_settings())
    assert not offline.is_online()
    with pytest.raises(PrometheusUnavailableError, match="unreachable"):
        offline.query("up")
    offline.close()


def test_a_broken_configuration_fails_with_the_log(tmp_path: Path) -> None:
    bad_rules = tmp_path / "bad.yml"
    bad_rules.write_text(
        "groups:\n  - name: x\n    rules:\n      - record: a:b:c\n        expr: sum(\n", encoding="utf-8"
    )
    server = PrometheusServer(tmp_path / "prom", [], rule_files=[bad_rules], settings=_settings())
    with pytest.raises(PrometheusUnavailableError, match="exited"):
        server.start()
    server.stop()


def test_queries_pinned_to_one_instant_read_the_data_of_that_instant(tmp_path: Path) -> None:
    """The analysis round's instant (``PrometheusClient.at``): a series that changed since is read as it was then."""
    registry = CollectorRegistry()
    exporter = DriftExporter({"v1": REFERENCE})
    registry.register(exporter)
    server, port = _start_exporter(registry)
    series = 'fraudwatch_feature_bin_total{model_version="v1",feature="amount",bin="0"}'
    try:
        with PrometheusServer(tmp_path / "prom", [ScrapeTarget(f"{HOST}:{port}", {})], settings=_settings()) as prom:
            client = prom.client()
            exporter.publish({("v1", "amount", "0"): 5.0})
            wait_for(lambda: client.query(series) == 5.0 or None, "the first value scraped")
            then = datetime.now(UTC)
            exporter.publish({("v1", "amount", "0"): 9.0})
            wait_for(lambda: client.query(series) == 9.0 or None, "the second value scraped")
            pinned = client.at(then)
            assert pinned.query(series) == 5.0  # as it was at the round's instant, not as it is now
            assert pinned.query_vector(series)[0][1] == 5.0
            assert pinned.query("time()") == pytest.approx(then.timestamp(), abs=1e-3)
            with pytest.raises(ValueError, match="timezone-aware"):
                client.at(then.replace(tzinfo=None))
            client.close()
    finally:
        server.shutdown()
