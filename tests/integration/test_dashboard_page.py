"""The self-served dashboard (``python -m rollout.dashboard``) on REAL metrics, looked at by headless Chromium.

The stack: two real ``bentoml serve`` processes (stable v1, candidate v2 in shadow), the real router in front of
them with its prediction log, a real Prometheus scraping all three and evaluating deploy/prometheus/rules.yml (plus
one always-firing alert, so the alerts panel has something real to show). Traffic goes through the router, then a
label for every request through ``POST /api/v1/feedback`` on the router's control listener. The page is rendered by
the dashboard process and loaded
by Debian's ``chromium`` (``--dump-dom`` and ``--screenshot``): the DOM must carry the four layers' panels with the
numbers this test can compute itself from the answers and the labels it sent (precision, recall, shadow agreement,
ROC-AUC), and the screenshot must be a real picture of it.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from rollout.backends.local.prometheus import PrometheusServer, ScrapeTarget
from rollout.backends.prometheus import PrometheusClient
from rollout.core.routing import RoutingTable, VersionEndpoint
from rollout.dashboard import panels
from rollout.dashboard.panels import VELOCITY_FEATURES
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from rollout.settings import PrometheusSettings
from service.artifacts.bundle import read_manifest
from service.common.processes import free_port
from service.data.features import DRIFT_FEATURES
from service.data.synthetic import generate
from service.serving.process import BentoServer
from tests.kits import waiting
from tests.kits.bundles import SMALL_DATA, build_small_bundle
from tests.kits.router import metric_value
from tests.kits.serving import scoring_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
WINDOW = (1400, 2600)
BROWSER_TIMEOUT_S = 120.0
HOST = "127.0.0.1"
PREDICT = "/api/v1/refund-predict"
FEEDBACK = "/api/v1/feedback"
#: A generous feature-store budget: a lookup timing out on this busy machine would change a prediction, and this
#: test compares the router's answers with the services' own.
SERVER_ENV = {"FW_SERVE__WORKERS": "1", "FW_LOG_LEVEL": "WARNING", "FW_SERVE__FEATURE_STORE_TIMEOUT_MS": "2000"}
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
N_FRAUD, N_LEGIT = 60, 140
WAIT_S = 90.0
SMOKE_ALERT = "DashboardSmokeAlert"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Answer:
    prediction_id: str
    label: int
    v1_prediction: int
    v1_score: float
    payload: dict[str, Any]


@dataclasses.dataclass
class Live:
    prometheus: PrometheusServer
    router: RouterProcess
    v1: BentoServer
    v2: BentoServer
    versions: tuple[str, str]
    answers: list[Answer]
    v2_predictions: list[int]
    #: The labelled pairs sent before the measured traffic (their outcome cells are born at 1).
    warm_up: list[Answer]


def within_born(shown: float, hits: int, misses: int, hits_born: int, misses_born: int) -> bool:
    """``shown`` lies between the ratios ``hits / (hits + misses)`` can take with up to ``hits_born`` more hits and
    ``misses_born`` more misses (the counts their cells were born at; rounding slack 1e-9)."""
    ratios = [(hits + h) / (hits + h + misses + m) for h in (0, hits_born) for m in (0, misses_born)]
    return min(ratios) - 1e-9 <= shown <= max(ratios) + 1e-9


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something other than None (False counts: a comparison's answer)."""
    return waiting.wait_for(probe, what, timeout_s, 0.25, ready=lambda value: value is not None)


def _payloads() -> list[tuple[dict[str, Any], int]]:
    """Requests from the training distribution, fraud over-represented so every confusion cell is populated."""
    frame = generate(SMALL_DATA)
    fraud = frame[frame["is_fraud"] == 1].sample(N_FRAUD, random_state=7)
    legit = frame[frame["is_fraud"] == 0].sample(N_LEGIT, random_state=7)
    rows = [*fraud.to_dict("records"), *legit.to_dict("records")]
    return [
        (
            {
                "yearsActive": float(r["yearsActive"]),
                "amount": float(r["amount"]),
                "ipAccounts": int(r["ipAccounts"]),
                "accountId": str(r["account_id"]),
                "itemDescription": str(r["itemDescription"]),
            },
            int(r["is_fraud"]),
        )
        for r in rows
    ]


def _smoke_rules(path: Path) -> Path:
    rule = {
        "alert": SMOKE_ALERT,
        "expr": "vector(1)",
        "labels": {"severity": "warning", "layer": "health"},
        "annotations": {"summary": "always firing (dashboard test)", "runbook_url": "runbooks/README.md"},
    }
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard_test", "rules": [rule]}]}), encoding="utf-8")
    return path


def _predictions(url: str, payloads: list[dict[str, Any]]) -> list[int]:
    with httpx.Client(base_url=url, timeout=30.0, trust_env=False) as http:
        return [int(http.post(PREDICT, json=p).json()["prediction"]) for p in payloads]


def _send_traffic(router_url: str, payloads: list[tuple[dict[str, Any], int]]) -> list[Answer]:
    answers = []
    with httpx.Client(base_url=router_url, timeout=30.0, trust_env=False) as http:
        for payload, label in payloads:
            response = http.post(PREDICT, json=payload)
            assert response.status_code == 200, response.text
            body = response.json()
            answers.append(Answer(body["prediction_id"], label, body["prediction"], body["score"], payload))
    return answers


def _pairs_counted(router_url: str, n: int) -> bool | None:
    text = httpx.get(router_url + "/metrics", timeout=30.0, trust_env=False).text
    return True if metric_value(text, "fraudwatch_shadow_agreement_total") >= n else None


def _send_labels(router: RouterProcess, answers: list[Answer]) -> None:
    """Through the router's control listener, with the label feed's token (the public port has no feedback)."""
    pending = list(answers)
    with httpx.Client(
        base_url=router.control_url, headers=router.feedback_headers(), timeout=30.0, trust_env=False
    ) as http:

        def send() -> bool | None:
            nonlocal pending
            retry = []
            for a in pending:
                response = http.post(FEEDBACK, json={"prediction_id": a.prediction_id, "label": a.label})
                if response.status_code == 404:  # not yet flushed to the prediction log
                    retry.append(a)
                else:
                    assert response.status_code == 200, response.text
            pending = retry
            return True if not pending else None

        wait_for(send, "every label joined to a logged prediction", timeout_s=30.0)


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dash-bundle-v2") / "model"
    build_small_bundle(directory, dataclasses.replace(SMALL_DATA, seed=SMALL_DATA.seed + 1), n_trees=30)
    return directory


@pytest.fixture(scope="module")
def live(bundle_dir: Path, second_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    home = tmp_path_factory.mktemp("dashboard-stack")
    v1 = scoring_server(home / "v1", bundle_dir, "v1", SERVER_ENV)
    v2 = scoring_server(home / "v2", second_bundle, "v2", SERVER_ENV)
    routing_file = home / "routing.json"
    router = RouterProcess(
        log_path=home / "router.log",
        routing_file=routing_file,
        admin_token="dashboard-test",
        env={
            DSN_ENV: f"sqlite:///{home / 'predictions.db'}",
            "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
            # budgets for a loaded 2-core machine: this test is about the page, not about timeouts
            "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": "10",
            "FW_ROLLOUT_ROUTER__CANDIDATE_TIMEOUT_S": "10",
            "FW_ROLLOUT_ROUTER__SHADOW_TIMEOUT_S": "10",
        },
    )
    settings = PrometheusSettings(scrape_interval_s=0.5, evaluation_interval_s=0.5, ready_timeout_s=60.0)
    prometheus: PrometheusServer | None = None
    try:
        v1.start()
        v2.start()
        v1.wait_ready()
        v2.wait_ready()
        versions = (read_manifest(bundle_dir).version, read_manifest(second_bundle).version)
        table = RoutingTable.model_validate(
            {
                "generation": 1,
                "stage": "shadow",
                "stable": VersionEndpoint(version=versions[0], url=v1.url).model_dump(),
                "candidate": VersionEndpoint(version=versions[1], url=v2.url).model_dump(),
            }
        )
        write_table_file(routing_file, table)
        router.start()
        router.wait_live()
        targets = [
            ScrapeTarget(s.url.removeprefix("http://"), {"component": c}) for s, c in ((v1, "model"), (v2, "model"))
        ]
        targets.append(ScrapeTarget(router.control_url.removeprefix("http://"), {"component": "router"}))
        prometheus = PrometheusServer(
            home / "prom", targets, rule_files=[RULES, _smoke_rules(home / "smoke.yml")], settings=settings
        )
        prometheus.start()
        with prometheus.client() as client:
            # two scrapes of the zero-valued series first: a counter first seen non-zero shows no increase
            wait_for(lambda: client.query("count(up == 1) == 3"), "three targets up")
            wait_for(lambda: client.query("count(fraudwatch_router_routing_info) > 0"), "the router's table")
            time.sleep(4 * settings.scrape_interval_s)
        payloads = _payloads()
        v1_direct = _predictions(v1.url, [p for p, _ in payloads])
        v2_direct = _predictions(v2.url, [p for p, _ in payloads])
        # Warm-up: one pair that agrees and one that does not, each labelled, so the agreement counters and the
        # outcome series exist (born at 1) before the measured traffic — the router creates them on first use, and
        # increase() cannot see a series' birth.
        agree = [i for i, (a, b) in enumerate(zip(v1_direct, v2_direct, strict=True)) if a == b][:1]
        differ = [i for i, (a, b) in enumerate(zip(v1_direct, v2_direct, strict=True)) if a != b][:1]
        warm_up = _send_traffic(router.url, [payloads[i] for i in agree + differ])
        wait_for(lambda: _pairs_counted(router.control_url, len(warm_up)), "the warm-up pairs")
        time.sleep(1.0)  # the prediction log flushes shadow rows every 200 ms
        _send_labels(router, warm_up)
        v1_name, v2_name = versions
        born = [
            f'count(fraudwatch_outcome_total{{model_version="{v1_name}",role="decider"}}) == 4',
            f'count(fraudwatch_outcome_total{{model_version="{v2_name}",role="shadow"}}) == 4',
            f'count(fraudwatch_shadow_agreement_total{{stable="{v1_name}"}}) == {len(warm_up)}',
        ]
        with prometheus.client() as client:  # scraped before the measured traffic: its increase is all counted
            wait_for(lambda: True if all(client.query(q) for q in born) else None, "the warm-up series scraped")
        answers = _send_traffic(router.url, payloads)
        assert [a.v1_prediction for a in answers] == v1_direct
        wait_for(lambda: _pairs_counted(router.control_url, len(warm_up) + len(answers)), "every shadow call paired")
        time.sleep(1.0)  # the prediction log flushes shadow rows every 200 ms
        _send_labels(router, answers)
        v2_predictions = v2_direct
        yield Live(prometheus, router, v1, v2, versions, answers, v2_predictions, warm_up)
    finally:
        if prometheus is not None:
            prometheus.stop()
        router.stop()
        v1.stop()
        v2.stop()


@pytest.fixture(scope="module")
def page_url(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port(HOST)
    log = (tmp_path_factory.mktemp("dashboard") / "dashboard.log").open("wb")
    env = {
        **os.environ,
        "FW_ROLLOUT_DASHBOARD__RANGE_S": "300",
        "FW_ROLLOUT_DASHBOARD__POINTS": "30",
        "FW_ROLLOUT_DASHBOARD__QUERY_TIMEOUT_S": "30",
    }
    argv = [sys.executable, "-m", "rollout.dashboard", "--prometheus", live.prometheus.url, "--host", HOST]
    process = subprocess.Popen([*argv, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}/"
    try:
        wait_for(lambda: _live(url), "the dashboard's /livez", timeout_s=30.0)
        with PrometheusClient(live.prometheus.url) as client:
            v1, v2 = live.versions
            needed = [
                f'model_version_role:fraudwatch_outcome_precision:ratio1d{{model_version="{v1}",role="decider"}}',
                f'stable_candidate:fraudwatch_shadow_agreement:ratio5m{{stable="{v1}",candidate="{v2}"}}',
                f'count(model_version_feature:fraudwatch_psi:1h{{model_version="{v1}"}})',
                f'count(ALERTS{{alertname="{SMOKE_ALERT}",alertstate="firing"}})',
                f'sum(model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1d{{model_version="{v1}"}})',
                f'stable_candidate_stage:fraudwatch_outcome_paired_fraud_labels:increase1d{{stable="{v1}"}}',
            ]
            wait_for(lambda: True if all(client.query(q) is not None for q in needed) else None, "recorded series")
            labelled = len(live.answers)
            total = (
                f'sum(model_version_role_outcome:fraudwatch_outcome:increase1d{{model_version="{v1}",role="decider"}})'
            )
            wait_for(lambda: True if (client.query(total) or 0.0) >= labelled else None, "every label counted")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def _live(url: str) -> bool | None:
    try:
        return True if httpx.get(url + "livez", timeout=2.0, trust_env=False).status_code == 200 else None
    except httpx.HTTPError:
        return None


def _chromium(url: str, tmp_path: Path, *action: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package")
    argv = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *action, url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class _Panels(HTMLParser):
    """Each panel of the DOM (``div.panel#panel-KEY``): its title and its rows' (series, data-value)."""

    def __init__(self) -> None:
        super().__init__()
        self.panels: dict[str, dict[str, Any]] = {}
        self.sections: list[str] = []
        self._panel: dict[str, Any] | None = None
        self._series: str | None = None
        self._text_into: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and "panel" in (a.get("class") or "").split():
            self._panel = {"title": "", "rows": {}, "text": ""}
            self.panels[(a.get("id") or "").removeprefix("panel-")] = self._panel
        elif tag == "h2":
            self._text_into = "section"
            self.sections.append("")
        elif tag == "h3" and self._panel is not None:
            self._text_into = "title"
        elif self._panel is not None and "data-series" in a:
            self._series = a["data-series"]
            self._panel["rows"].setdefault(self._series, None)
        if self._panel is not None and self._series is not None and "data-value" in a:
            self._panel["rows"][self._series] = float(a["data-value"] or "nan")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3"):
            self._text_into = None
        if tag in ("tr", "div") and self._series is not None:
            self._series = None

    def handle_data(self, data: str) -> None:
        if self._text_into == "section":
            self.sections[-1] += data
        elif self._text_into == "title" and self._panel is not None:
            self._panel["title"] += data
        if self._panel is not None:
            self._panel["text"] += data


@pytest.fixture(scope="module")
def dom(page_url: str, tmp_path_factory: pytest.TempPathFactory) -> _Panels:
    result = _chromium(page_url, tmp_path_factory.mktemp("dump"), "--dump-dom")
    parsed = _Panels()
    parsed.feed(result.stdout)
    return parsed


def _value(dom: _Panels, panel: str, series: str) -> float:
    rows = dom.panels[panel]["rows"]
    assert series in rows, f"{panel}: no row {series!r} in {sorted(rows)}; panel text: {dom.panels[panel]['text']!r}"
    value = rows[series]
    assert value is not None, f"{panel}/{series} shows no number"
    return float(value)


def test_the_page_has_the_four_layers_the_rollout_and_the_alerts(dom: _Panels) -> None:
    sections = [html.unescape(s).strip() for s in dom.sections]
    assert sections == [s.title for s in panels.SECTIONS]
    for section in panels.SECTIONS:
        for panel in section.panels:
            assert html.unescape(dom.panels[panel.key]["title"]) == panel.title


def test_service_health_shows_latency_errors_and_throughput_per_version(dom: _Panels, live: Live) -> None:
    v1, v2 = live.versions
    assert 0.0 < _value(dom, "latency", f"p99 {v1}") < 1.0
    assert _value(dom, "latency", f"p50 {v1}") <= _value(dom, "latency", f"p99 {v1}")
    assert _value(dom, "errors", f"{v1} decider") == 0.0
    assert _value(dom, "throughput", f"{v1} decider") > 0.0
    assert _value(dom, "throughput", f"{v2} shadow") > 0.0


def test_input_drift_shows_psi_for_every_drift_feature(dom: _Panels, live: Live) -> None:
    v1 = live.versions[0]
    for feature in DRIFT_FEATURES:
        panel = "velocity-psi-1h" if feature in VELOCITY_FEATURES else "psi-1h"
        psi = _value(dom, panel, f"{v1} {feature}")
        assert 0.0 <= psi < 10.0, (feature, psi)


def test_output_drift_shows_scores_decision_rate_and_the_agreement_this_test_computed(dom: _Panels, live: Live) -> None:
    v1, v2 = live.versions
    assert 0.0 <= _value(dom, "score-quantiles", f"p50 {v1}") <= _value(dom, "score-quantiles", f"p99 {v1}") <= 1.0
    # 5-minute windows over the counters: the warm-up requests and the window's edges blur the exact share a little
    reviewed = sum(a.v1_prediction for a in live.answers) / len(live.answers)
    assert _value(dom, "decision-rate", v1) == pytest.approx(reviewed, abs=0.02)
    agreement = sum(a.v1_prediction == p for a, p in zip(live.answers, live.v2_predictions, strict=True))
    assert _value(dom, "shadow-agreement", f"{v1} vs {v2}") == pytest.approx(agreement / len(live.answers), abs=0.02)


def test_outcomes_show_the_precision_recall_and_auc_of_the_labels_sent(dom: _Panels, live: Live) -> None:
    v1 = live.versions[0]
    tp = sum(1 for a in live.answers if a.v1_prediction == 1 and a.label == 1)
    fp = sum(1 for a in live.answers if a.v1_prediction == 1 and a.label == 0)
    fn = sum(1 for a in live.answers if a.v1_prediction == 0 and a.label == 1)
    assert tp > 0 and fp + fn > 0
    # increase() cannot see a series' birth, and extrapolates one born at n (a cell the warm-up labelled n times)
    # back towards zero: up to n counts more in that cell (how much depends on the scrapes' timing)
    warm = collections.Counter((a.v1_prediction, a.label) for a in live.warm_up)
    assert within_born(_value(dom, "precision", f"{v1} decider"), tp, fp, warm[(1, 1)], warm[(1, 0)])
    assert within_born(_value(dom, "recall", f"{v1} decider"), tp, fn, warm[(1, 1)], warm[(0, 1)])
    exact_auc = roc_auc_score([a.label for a in live.answers], [a.v1_score for a in live.answers])
    assert _value(dom, "roc-auc", f"{v1} decider") == pytest.approx(exact_auc, abs=0.02)
    assert 0.0 <= _value(dom, "calibration", f"{v1} decider") <= 1.0
    assert _value(dom, "labels", f"{v1} decider") >= len(live.answers)


def test_paired_recall_difference_is_the_one_of_the_labelled_requests_both_versions_scored(
    dom: _Panels, live: Live
) -> None:
    v1, v2 = live.versions
    pairs = list(zip(live.answers, live.v2_predictions, strict=True))
    frauds = [(a.v1_prediction, p) for a, p in pairs if a.label == 1]
    only_candidate = sum(1 for s, c in frauds if c == 1 and s == 0)
    only_stable = sum(1 for s, c in frauds if s == 1 and c == 0)
    assert frauds
    # increase() extrapolates the young series a little past their samples (the ratio below cancels that), and the
    # two labelled warm-up requests are paired too
    paired_frauds = _value(dom, "paired-recall", "fraud labels both scored, shadow")
    assert paired_frauds == pytest.approx(len(frauds) + 1, rel=0.15)
    expected = (only_candidate - only_stable) / len(frauds)
    assert _value(dom, "paired-recall", f"{v2} − {v1} in shadow") == pytest.approx(expected, abs=2 / len(frauds))


def test_rollout_stage_and_firing_alerts_come_from_prometheus(dom: _Panels, live: Live) -> None:
    v1, v2 = live.versions
    assert f"router: shadow · stable {v1} · candidate {v2}" in dom.panels["stage"]["rows"]
    alerts = dom.panels["alerts"]["rows"]
    assert any(name.startswith(f"{SMOKE_ALERT} · firing · warning") for name in alerts), sorted(alerts)


def test_screenshot_is_a_real_picture_of_the_page(page_url: str, tmp_path: Path) -> None:
    png = tmp_path / "dashboard.png"
    _chromium(page_url, tmp_path, f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert png.is_file()
    with Image.open(png) as image:
        assert image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, sparklines, panels: not a blank page
    share_of_commonest = max(count for count, _ in colours) / (WINDOW[0] * WINDOW[1])
    assert share_of_commonest < 0.95
    keep = os.environ.get("FW_TEST_KEEP_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(png.read_bytes())


def test_page_reloads_itself_and_loads_nothing_from_elsewhere(page_url: str) -> None:
    text = httpx.get(page_url, timeout=30.0, trust_env=False).text
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', text)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    assert "<script" not in text
