"""Freshness of the online store, end to end through real processes: a real ``bentoml serve`` of the scoring service
writing its velocity features to a real ``redis-server``, scraped by a real Prometheus that evaluates the shipped
deploy/prometheus/rules.yml (only the alerts' ``for:`` shortened, tests/kits/alerts.fast_rules).

The fault is a real one: ``CLIENT PAUSE ... WRITE`` (what Redis itself does during a failover) holds every write
script and still answers reads, so the store's newest event stops moving while requests keep reading it. The model
server counts the timed-out writes (``fraudwatch_online_store_dropped_total{reason="error"}``), its feature age
grows, and FraudwatchOnlineFeaturesStale fires once the p95 age passes 60 s; while the store was written it stayed
quiet. (Redis at ``maxmemory`` with ``noeviction`` is no such fault: it refuses the reads' MULTI too, and the
reads fall back — FraudwatchOnlineStoreFallbackHigh's case.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from rollout.backends.local.prometheus import PrometheusServer, ScrapeTarget
from rollout.backends.prometheus import PrometheusClient
from rollout.settings import PrometheusSettings
from service.serving.process import BentoServer
from tests.kits.alerts import fast_rules
from tests.kits.redis import redis_server
from tests.kits.serving import scoring_server
from tests.kits.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Requests a second: above the alert's 0.5 reads/s floor for the age arm.
RATE_PER_S = 4.0
#: The age arm's limit in the shipped rule (seconds) and how long past it the test waits for the alert.
AGE_LIMIT_S = 60.0
ALERT_WAIT_S = AGE_LIMIT_S * 2.5
STALE = "FraudwatchOnlineFeaturesStale"


class Traffic:
    """Refund requests at a steady rate from a thread, each from its own account on a shared IP (a bot farm)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            while not self._stop.wait(1.0 / RATE_PER_S):
                body = {
                    "yearsActive": 0.1,
                    "amount": 49.99,
                    "ipAccounts": 1,
                    "accountId": f"farm-{self.sent}",
                    "ipAddress": "203.0.113.7",
                    "deviceId": "dev-farm",
                }
                response = http.post("/api/v1/refund-predict", json=body)
                self.sent += 1
                self.failed += response.status_code != 200


def _firing(client: PrometheusClient, alert: str) -> float | None:
    return client.query(f'count(ALERTS{{alertname="{alert}", alertstate="firing"}})')


def test_a_store_refusing_writes_is_reported_stale(bundle_dir: Path, tmp_path: Path) -> None:
    settings = PrometheusSettings(scrape_interval_s=1.0, evaluation_interval_s=1.0, ready_timeout_s=60.0)
    rules = fast_rules(tmp_path / "rules.yml", for_s=1.0)
    with redis_server(tmp_path / "redis") as store:
        env = {
            "FW_SERVE__WORKERS": "1",
            "FW_SERVE__ONLINE_STORE__URL": store.url,
            # a generous read budget: this test is about freshness, and a 5 ms read on a machine at load 20 does
            # (correctly) time out now and then; the budget is test_online_store.py's
            "FW_SERVE__ONLINE_STORE__TIMEOUT_MS": "1000",
            "FW_LOG_LEVEL": "INFO",
        }
        server: BentoServer = scoring_server(tmp_path / "home", bundle_dir, "fresh", env)
        with server, Traffic(server.url) as traffic:
            target = ScrapeTarget(server.url.removeprefix("http://"))
            with PrometheusServer(tmp_path / "prom", [target], rule_files=[rules], settings=settings) as prom:
                client = prom.client()
                applied = 'sum(fraudwatch_online_store_writes_total{outcome="applied"})'
                wait_for(lambda: client.query(f"{applied} > 20"), "20 events written to Redis", 60.0)
                age = (
                    "histogram_quantile(0.95, sum by (le) "
                    "(rate(fraudwatch_online_store_feature_age_seconds_bucket[10m])))"
                )
                fresh = wait_for(lambda: client.query(age), "a feature age", 30.0)
                assert fresh < 5.0, f"p95 feature age {fresh:.2f} s while the store is written"
                assert _firing(client, STALE) is None

                admin = redis.Redis.from_url(store.url)
                admin.client_pause(int(ALERT_WAIT_S * 2000), all=False)  # CLIENT PAUSE <ms> WRITE
                faulted = time.monotonic()

                dropped = 'sum(fraudwatch_online_store_dropped_total{reason="error"})'
                wait_for(lambda: client.query(f"{dropped} > 0"), "writes held by Redis counted", 60.0)
                wait_for(lambda: _firing(client, STALE), f"{STALE} firing", ALERT_WAIT_S)
                stale_after = time.monotonic() - faulted
                stale_age = client.query(age)
                fallbacks = client.query_vector("sum by (reason) (fraudwatch_online_store_fallback_total)")
                reads = client.query("sum(fraudwatch_online_store_reads_total)")
                fallback_alert = _firing(client, "FraudwatchOnlineStoreFallbackHigh")
                admin.client_unpause()
                admin.close()
                client.close()
        assert traffic.failed == 0
    # the age arm needs the p95 past 60 s: not before the store froze 60 s ago
    assert stale_after >= AGE_LIMIT_S, stale_after
    assert stale_age is not None and stale_age > AGE_LIMIT_S
    # reads kept working: the velocity features were stale, not defaults
    assert reads is not None and reads >= traffic.sent * 0.9
    assert sum(value for _, value in fallbacks) == 0.0, fallbacks
    assert fallback_alert is None
