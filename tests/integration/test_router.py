"""The router as a real uvicorn process in front of TWO real ``bentoml serve`` processes (two model bundles).

1. Every stage routes as specified: ``model_version`` of each answer and the per-version counters on the
   router's ``/metrics`` (decider and shadow) and on each model service's own ``/metrics``.
2. A table change takes effect within one second, through the file and through the admin endpoint.
3. Faults under load: killing the shadow candidate costs no client error; killing the canary candidate costs no
   client error and its requests are counted as fallbacks.
4. A real Prometheus scrapes the router and both services and evaluates deploy/prometheus/rules.yml: the series
   the rollout gates query exist, with the version and role labels they select on.
5. Labels only from the label source: no feedback route on the public port; the control listener takes labels
   with the feed's bearer token only, answers malformed bodies with a 4xx, and discloses nothing in a 409.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import secrets
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.backends.local.prometheus import PrometheusServer, ScrapeTarget
from rollout.backends.prometheus import PrometheusClient
from rollout.core.routing import RoutePlan, RoutingTable, VersionEndpoint
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from rollout.settings import PrometheusSettings
from service.artifacts.bundle import read_manifest
from service.serving.process import BentoServer
from tests.conftest import SMALL_DATA, build_small_bundle
from tests.integration.conftest import scoring_server
from tests.routerkit import metric_value

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PREDICT = "/api/v1/refund-predict"
SEED = {"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2}
TOKEN = "integration-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTTP_TIMEOUT_S = 30.0
SWITCH_BUDGET_S = 1.0
LOAD_CONCURRENCY = 6
LOAD_SECONDS = 4.0
KILL_AFTER_S = 1.5
#: The prediction log's database, named through its settings class so a renamed prefix cannot silently miss.
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
SERVER_ENV = {"FW_SERVE__WORKERS": "1", "FW_LOG_LEVEL": "WARNING"}


@dataclasses.dataclass
class Stack:
    v1: BentoServer
    v2: BentoServer
    router: RouterProcess
    routing_file: Path
    generation: int = 0

    def endpoint(self, server: BentoServer) -> VersionEndpoint:
        assert server.model_dir is not None
        return VersionEndpoint(version=read_manifest(server.model_dir).version, url=server.url)

    def table(self, stage: str, weight: float | None = None, *, candidate: bool = True) -> RoutingTable:
        self.generation += 1
        data: dict[str, Any] = {
            "generation": self.generation,
            "stage": stage,
            "stable": self.endpoint(self.v1).model_dump(),
        }
        if candidate:
            data["candidate"] = self.endpoint(self.v2).model_dump()
        if weight is not None:
            data["candidate_weight"] = weight
        return RoutingTable.model_validate(data)


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model version: other training data, fewer trees, so another version name and other scores."""
    directory = tmp_path_factory.mktemp("bundle-v2") / "model"
    build_small_bundle(directory, dataclasses.replace(SMALL_DATA, seed=SMALL_DATA.seed + 1), n_trees=30)
    return directory


@pytest.fixture(scope="module")
def stack(bundle_dir: Path, second_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("router-stack")
    v1 = scoring_server(home / "v1", bundle_dir, "v1", SERVER_ENV)
    v2 = scoring_server(home / "v2", second_bundle, "v2", SERVER_ENV)
    routing_file = home / "routing.json"
    router = RouterProcess(
        log_path=home / "router.log",
        routing_file=routing_file,
        admin_token=TOKEN,
        env={
            DSN_ENV: f"sqlite:///{home / 'predictions.db'}",
            "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
            "FW_ROLLOUT_ROUTER__CANDIDATE_TIMEOUT_S": "1.0",
            "FW_ROLLOUT_ROUTER__STABLE_TIMEOUT_S": "2.0",
        },
    )
    try:
        v1.start()
        v2.start()
        v1.wait_ready()
        v2.wait_ready()
        built = Stack(v1=v1, v2=v2, router=router, routing_file=routing_file)
        write_table_file(routing_file, built.table("stable", candidate=False))
        router.start()
        router.wait_live()
        yield built
    finally:
        router.stop()
        v1.stop()
        v2.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.router.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as http:
        yield http


def put(stack: Stack, table: RoutingTable) -> None:
    """The table through the router's admin endpoint (its control listener: the public port has none)."""
    response = httpx.put(
        stack.router.control_url + "/admin/routing", content=table.model_dump_json(), headers=AUTH, trust_env=False
    )
    assert response.status_code == 200, response.text


def control(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.router.control_url, timeout=HTTP_TIMEOUT_S, trust_env=False)


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - started


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=HTTP_TIMEOUT_S, trust_env=False).text


def served(server: BentoServer, version: str) -> float:
    """Requests the model service itself scored for its version (its own decision counters: one per request, also
    when the router batched several shadow requests into one call)."""
    return metric_value(scrape(server.url), "fraudwatch_decisions_total", model_version=version)


def accounts(n: int) -> list[str]:
    return [f"acct-{uuid.uuid4().hex[:12]}" for _ in range(n)]


# ------------------------------------------------------------------ 1. stages


def test_router_becomes_ready_on_the_file_table(stack: Stack, client: httpx.Client) -> None:
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=10.0)
    answer = client.post(PREDICT, json=SEED)
    assert answer.status_code == 200
    assert answer.json()["model_version"] == stack.endpoint(stack.v1).version
    assert answer.headers["x-model-version"] == answer.json()["model_version"]


def test_the_public_port_serves_the_scoring_contract_and_nothing_else(stack: Stack, client: httpx.Client) -> None:
    """Issue 11, point 8: /metrics (every version's traffic and outcomes) and /admin/routing used to share the public
    port. Now they answer 404 there and work on the control listener; the public /readyz says ready or not, without
    the stage, the generation or a version (the control listener's has them)."""
    put(stack, stack.table("canary", 5.0))
    assert client.get("/metrics").status_code == 404
    assert client.get("/admin/routing", headers=AUTH).status_code == 404
    assert client.put("/admin/routing", content=stack.table("stable").model_dump_json(), headers=AUTH).status_code in (
        404,
        405,
    )
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=10.0)
    assert client.get("/readyz").json() == {"status": "ready"}
    with control(stack) as admin:
        assert "fraudwatch_router_requests_total" in admin.get("/metrics").text
        assert admin.get("/admin/routing", headers=AUTH).json()["table"]["stage"] == "canary"
        assert admin.get("/readyz").json()["stage"] == "canary"


def test_a_router_with_default_settings_answers_with_the_scoring_contract_only(stack: Stack, tmp_path: Path) -> None:
    """Issue 11: the router's own default exposed score, threshold, model_version, stage and routed_to (only the
    chart turned them off). A router process started without FW_ROLLOUT_ROUTER__EXPOSE_DECISION_DETAILS answers
    with the contract and the router's IDs, nothing a client could probe the threshold or the deciding version with."""
    routing_file = tmp_path / "routing.json"
    table = {"generation": 1, "stage": "stable", "stable": stack.endpoint(stack.v1).model_dump()}
    write_table_file(routing_file, RoutingTable.model_validate(table))
    router = RouterProcess(
        log_path=tmp_path / "router.log",
        routing_file=routing_file,
        expose_decision_details=None,  # the router's default
        env={DSN_ENV: f"sqlite:///{tmp_path / 'predictions.db'}", "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false"},
    )
    router.start()
    try:
        router.wait_live()
        with httpx.Client(base_url=router.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=10.0)
            answer = client.post(PREDICT, json=SEED)
    finally:
        router.stop()
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()) == ["confidence", "correlation_id", "decision", "prediction", "prediction_id"]
    assert "x-model-version" not in answer.headers


@pytest.mark.parametrize(
    ("stage", "weight"), [("stable", None), ("shadow", None), ("canary", 5.0), ("ab", 50.0), ("full", None)]
)
def test_each_stage_routes_as_specified(stack: Stack, client: httpx.Client, stage: str, weight: float | None) -> None:
    v1, v2 = stack.endpoint(stack.v1).version, stack.endpoint(stack.v2).version
    table = stack.table(stage, weight)
    put(stack, table)
    plan = RoutePlan.compile(table, stack.router.sticky_key.encode())  # the operator's view: it holds the key
    keys = accounts(60)
    before_router = scrape(stack.router.control_url)
    before_served = {v1: served(stack.v1, v1), v2: served(stack.v2, v2)}

    answers = {k: client.post(PREDICT, json={**SEED, "accountId": k}) for k in keys}

    assert {a.status_code for a in answers.values()} == {200}
    expected_version = {k: (v2 if plan.route(k).arm == "candidate" else v1) for k in keys}
    assert {k: a.json()["model_version"] for k, a in answers.items()} == expected_version
    assert {a.json()["stage"] for a in answers.values()} == {stage}
    n_v2 = sum(1 for v in expected_version.values() if v == v2)
    n_v1 = len(keys) - n_v2
    if stage in ("canary", "ab"):
        assert 0 < n_v2 < len(keys)  # 60 fresh accounts: both arms are used (P(no candidate at 5 %) ≈ 4.6 %)
    shadows_of_v2 = len(keys) if stage == "shadow" else 0
    # the control shadow: stable scores every request the candidate decides (canary, A/B and full)
    shadows_of_v1 = n_v2

    def counted(version: str, role: str, text: str) -> float:
        return metric_value(text, "fraudwatch_router_requests_total", model_version=version, role=role, outcome="2xx")

    def settled() -> bool:
        after = scrape(stack.router.control_url)
        return (
            counted(v2, "shadow", after) - counted(v2, "shadow", before_router) == shadows_of_v2
            and counted(v1, "shadow", after) - counted(v1, "shadow", before_router) == shadows_of_v1
        )

    wait_for(settled, timeout_s=10.0)
    after_router = scrape(stack.router.control_url)
    assert counted(v1, "decider", after_router) - counted(v1, "decider", before_router) == n_v1
    assert counted(v2, "decider", after_router) - counted(v2, "decider", before_router) == n_v2
    # Each model service saw its deciding and its shadow calls, by its own count.
    assert served(stack.v1, v1) - before_served[v1] == n_v1 + shadows_of_v1
    assert served(stack.v2, v2) - before_served[v2] == n_v2 + shadows_of_v2
    assert metric_value(after_router, "fraudwatch_router_candidate_weight") == table.candidate_weight
    assert metric_value(after_router, "fraudwatch_router_routing_info", stage=stage) == 1


def test_a_client_cannot_compute_which_accounts_the_candidate_gets(stack: Stack, client: httpx.Client) -> None:
    """Issue 11, point 3: the salt used to be the version pair, so anyone who knew (or guessed) the version names
    computed offline which accounts reach the candidate. With the router's secret key the public computation is no
    better than a coin: at 50/50 it agrees with the real arm for about half of 400 accounts (old code: all 400)."""
    v2 = stack.endpoint(stack.v2).version
    table = stack.table("ab", 50.0)
    put(stack, table)
    keys = accounts(400)
    observed = {k: client.post(PREDICT, json={**SEED, "accountId": k}).json()["model_version"] == v2 for k in keys}
    public, keyed = RoutePlan.compile(table), RoutePlan.compile(table, stack.router.sticky_key.encode())
    assert observed == {k: keyed.route(k).arm == "candidate" for k in keys}  # sticky under the key
    agreement = sum(observed[k] == (public.route(k).arm == "candidate") for k in keys) / len(keys)
    assert 0.35 < agreement < 0.65, agreement  # Binomial(400, 1/2): outside this band with p < 1e-8


# ------------------------------------------------------------------ 2. table changes


def test_a_file_change_takes_effect_within_a_second(stack: Stack, client: httpx.Client) -> None:
    v2 = stack.endpoint(stack.v2).version
    put(stack, stack.table("shadow"))
    write_table_file(stack.routing_file, stack.table("full"))
    took = wait_for(lambda: client.post(PREDICT, json=SEED).json()["model_version"] == v2, timeout_s=SWITCH_BUDGET_S)
    assert took <= SWITCH_BUDGET_S
    with control(stack) as admin:
        assert admin.get("/admin/routing", headers=AUTH).json()["source"] == "file"


def test_an_admin_change_takes_effect_at_once(stack: Stack, client: httpx.Client) -> None:
    v1 = stack.endpoint(stack.v1).version
    with control(stack) as admin:
        assert admin.put("/admin/routing", content=stack.table("stable").model_dump_json()).status_code == 401
    started = time.monotonic()
    put(stack, stack.table("stable"))
    answer = client.post(PREDICT, json=SEED)
    assert time.monotonic() - started <= SWITCH_BUDGET_S
    assert answer.json()["model_version"] == v1


# ------------------------------------------------------------------ 3. faults under load


@dataclasses.dataclass
class LoadResult:
    statuses: list[int]
    fallbacks: int


def run_load(url: str, seconds: float, concurrency: int) -> LoadResult:
    """Closed-loop load: ``concurrency`` clients, each with fresh account IDs, for ``seconds``."""

    async def one_client(http: httpx.AsyncClient, deadline: float, result: LoadResult) -> None:
        while time.monotonic() < deadline:
            response = await http.post(PREDICT, json={**SEED, "accountId": uuid.uuid4().hex})
            result.statuses.append(response.status_code)
            if response.status_code == 200 and "fallback_from" in response.json():
                result.fallbacks += 1

    async def main() -> LoadResult:
        result = LoadResult(statuses=[], fallbacks=0)
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S, limits=limits, trust_env=False) as http:
            await asyncio.gather(*(one_client(http, deadline, result) for _ in range(concurrency)))
        return result

    return asyncio.run(main())


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (from /proc: the parent is the 4th field of /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def kill_tree(server: BentoServer) -> None:
    """SIGKILL the server and every process under it, as a crash would: BentoML's workers run in sessions of their
    own, so killing the arbiter's process group alone would leave them serving on the inherited socket."""
    assert server.pid is not None
    doomed = [server.pid, *descendants(server.pid)]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(not Path(f"/proc/{pid}").exists() or zombie(pid) for pid in doomed), timeout_s=10.0)


def zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def under_load_kill(stack: Stack, server: BentoServer) -> LoadResult:
    """Run load through the router and SIGKILL ``server``'s whole process group part-way through."""
    outcome: list[LoadResult] = []
    worker = threading.Thread(target=lambda: outcome.append(run_load(stack.router.url, LOAD_SECONDS, LOAD_CONCURRENCY)))
    worker.start()
    time.sleep(KILL_AFTER_S)
    kill_tree(server)
    worker.join()
    server.stop()
    return outcome[0]


@pytest.fixture
def restore_v2(stack: Stack) -> Iterator[None]:
    yield
    if not stack.v2.running():
        stack.v2.start()
        stack.v2.wait_ready()


def test_killing_the_shadow_candidate_under_load_costs_no_client_error(
    stack: Stack, client: httpx.Client, restore_v2: None
) -> None:
    v1, v2 = stack.endpoint(stack.v1).version, stack.endpoint(stack.v2).version
    put(stack, stack.table("shadow"))
    before = scrape(stack.router.control_url)

    result = under_load_kill(stack, stack.v2)

    after = scrape(stack.router.control_url)
    assert len(result.statuses) > LOAD_CONCURRENCY * 10
    assert set(result.statuses) == {200}, collections.Counter(result.statuses)
    assert result.fallbacks == 0
    decided = metric_value(after, "fraudwatch_router_requests_total", model_version=v1, role="decider") - metric_value(
        before, "fraudwatch_router_requests_total", model_version=v1, role="decider"
    )
    assert decided == len(result.statuses)
    failed_shadows = metric_value(
        after, "fraudwatch_router_upstream_errors_total", model_version=v2, role="shadow"
    ) - metric_value(before, "fraudwatch_router_upstream_errors_total", model_version=v2, role="shadow")
    assert failed_shadows > 0


def test_killing_the_canary_candidate_under_load_falls_back_without_client_errors(
    stack: Stack, client: httpx.Client, restore_v2: None
) -> None:
    v2 = stack.endpoint(stack.v2).version
    put(stack, stack.table("canary", 5.0))
    before = scrape(stack.router.control_url)

    result = under_load_kill(stack, stack.v2)

    after = scrape(stack.router.control_url)
    assert set(result.statuses) == {200}, collections.Counter(result.statuses)
    assert result.fallbacks > 0
    fallbacks = metric_value(after, "fraudwatch_router_fallback_total", model_version=v2) - metric_value(
        before, "fraudwatch_router_fallback_total", model_version=v2
    )
    assert fallbacks == result.fallbacks, [line for line in after.splitlines() if "fallback_total" in line]


# ------------------------------------------------------------------ 4. Prometheus


def test_prometheus_sees_the_series_the_gates_query(stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    v1, v2 = stack.endpoint(stack.v1).version, stack.endpoint(stack.v2).version
    put(stack, stack.table("shadow"))
    targets = [
        ScrapeTarget(stack.router.control_url.removeprefix("http://"), {"component": "router"}),
        ScrapeTarget(stack.v1.url.removeprefix("http://"), {"component": "model"}),
        ScrapeTarget(stack.v2.url.removeprefix("http://"), {"component": "model"}),
    ]
    settings = PrometheusSettings(scrape_interval_s=0.5, evaluation_interval_s=0.5, ready_timeout_s=60.0)
    with PrometheusServer(tmp_path / "prom", targets, rule_files=[RULES], settings=settings) as prom:
        prom_client: PrometheusClient = prom.client()
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=stack.router.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as http:
                while not stop.is_set():
                    http.post(PREDICT, json={**SEED, "accountId": uuid.uuid4().hex})

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            decider_v1 = f'{{model_version="{v1}",role="decider"}}'
            shadow_v2 = f'{{model_version="{v2}",role="shadow"}}'
            queries = {
                "agreement": f'stable_candidate:fraudwatch_shadow_agreement:ratio5m{{stable="{v1}",candidate="{v2}"}}',
                "decider_errors": "model_version_role:fraudwatch_router_error_ratio:ratio_rate5m" + decider_v1,
                "shadow_rate": "model_version_role:fraudwatch_router_requests:rate5m" + shadow_v2,
                "decider_p99": "model_version_role:fraudwatch_router_request_duration_seconds:p99_5m" + decider_v1,
                "weight": "fraudwatch_router_candidate_weight",
                "served_v2": f'sum(fraudwatch_request_duration_seconds_count{{model_version="{v2}"}})',
            }
            values: dict[str, float | None] = {}

            def all_present() -> bool:
                values.update({name: prom_client.query(q) for name, q in queries.items()})
                return all(v is not None for v in values.values())

            wait_for(all_present, timeout_s=60.0, interval_s=0.5)
        finally:
            stop.set()
            sender.join()
            prom_client.close()
    assert values["agreement"] is not None and 0.0 <= values["agreement"] <= 1.0
    assert values["decider_errors"] == 0.0
    assert values["shadow_rate"] is not None and values["shadow_rate"] > 0.0
    assert values["decider_p99"] is not None and 0.0 < values["decider_p99"] < 1.0
    assert values["weight"] == 0.0
    assert values["served_v2"] is not None and values["served_v2"] > 0.0


# ------------------------------------------------------------------ 5. labels only from the label source


def test_labels_are_taken_only_on_the_control_listener_with_the_feed_token(stack: Stack, client: httpx.Client) -> None:
    put(stack, stack.table("stable", candidate=False))
    scored = client.post(PREDICT, json=SEED, headers={"X-Correlation-ID": f"label-{uuid.uuid4().hex}"})
    assert scored.status_code == 200, scored.text
    label = {"prediction_id": scored.json()["prediction_id"], "label": "fraud"}
    before = metric_value(scrape(stack.router.control_url), "fraudwatch_outcome_total")
    # the public port has no feedback route at all
    assert client.post("/api/v1/feedback", json=label).status_code == 404
    assert client.post("/api/v1/feedback/batch", json={"labels": [label]}).status_code == 404
    control = stack.router.control_url
    with httpx.Client(base_url=control, timeout=HTTP_TIMEOUT_S, trust_env=False) as feed:
        for headers in ({}, {"Authorization": "Bearer guessed"}, AUTH):  # AUTH is the admin token, not the feed's
            assert feed.post("/api/v1/feedback", json=label, headers=headers).status_code == 401
        assert metric_value(scrape(stack.router.control_url), "fraudwatch_outcome_total") == before
        assert (
            feed.post("/api/v1/feedback", content=b"[" * 4000, headers=stack.router.feedback_headers()).status_code
            == 400
        )
        genuine = label  # the feed's token authenticates its source ("default"): the body need not name it

        def recorded() -> bool:
            answer = feed.post("/api/v1/feedback", json=genuine, headers=stack.router.feedback_headers())
            return answer.status_code == 200  # 404 until the prediction log has it

        wait_for(recorded, timeout_s=10.0)
        conflict = feed.post(
            "/api/v1/feedback", json={**genuine, "label": "legit"}, headers=stack.router.feedback_headers()
        )
        assert conflict.status_code == 409
        assert "fraud" not in conflict.text and "default" not in conflict.text
        retried = feed.post(
            "/api/v1/feedback/batch", json={"labels": [genuine]}, headers=stack.router.feedback_headers()
        )
        assert retried.json()["results"][0]["status"] == "duplicate"
    assert metric_value(scrape(stack.router.control_url), "fraudwatch_outcome_total") == before + 1


def test_one_label_counts_for_one_request_whatever_correlation_id_the_client_sent(
    stack: Stack, client: httpx.Client
) -> None:
    """Issue 11: the join key is the router's. Fifty requests under one client-chosen correlation ID are fifty
    predictions with fifty unguessable IDs; a label citing the correlation ID joins nothing (422), and a label citing
    one prediction ID counts once, not fifty times (the old code counted 50 true positives for one label)."""
    put(stack, stack.table("stable", candidate=False))
    cid = f"shared-{uuid.uuid4().hex}"
    answers = [client.post(PREDICT, json=SEED, headers={"X-Correlation-ID": cid}) for _ in range(50)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    ids = [a.json()["prediction_id"] for a in answers]
    assert len(set(ids)) == 50 and all(len(i) >= 22 and cid not in i for i in ids)
    assert [a.headers["x-prediction-id"] for a in answers] == ids
    assert all(a.headers["x-correlation-id"] == cid for a in answers)
    assert all(a.json()["correlation_id"] == cid for a in answers)  # still traced, never joined
    before = metric_value(scrape(stack.router.control_url), "fraudwatch_outcome_total")
    headers = stack.router.feedback_headers()
    with httpx.Client(base_url=stack.router.control_url, timeout=HTTP_TIMEOUT_S, trust_env=False) as feed:
        by_client_id = feed.post("/api/v1/feedback", json={"correlation_id": cid, "label": "fraud"}, headers=headers)
        assert by_client_id.status_code == 422 and by_client_id.json()["details"][0]["field"] == "prediction_id"
        one = {"prediction_id": ids[17], "label": "fraud"}
        results: list[httpx.Response] = []

        def recorded() -> bool:
            results.append(feed.post("/api/v1/feedback", json=one, headers=headers))
            return results[-1].status_code == 200  # 404 until the prediction log has it

        wait_for(recorded, timeout_s=10.0)
    assert results[-1].json()["predictions"] == 1
    assert metric_value(scrape(stack.router.control_url), "fraudwatch_outcome_total") == before + 1


QUOTA_WINDOW_S = 60.0


def outside_a_quota_windows_end(margin_s: float = 15.0) -> None:
    """Sleep into the next fixed quota window when this one ends within ``margin_s``: the router counts quotas per
    ``time.monotonic() // 60`` (CLOCK_MONOTONIC is one clock for every process of this machine), so a check of
    "the third label is over the quota" must not straddle two windows."""
    left = QUOTA_WINDOW_S - time.monotonic() % QUOTA_WINDOW_S
    if left < margin_s:
        time.sleep(left + 0.1)


def test_each_label_source_has_its_own_token_its_own_name_and_its_own_quota(stack: Stack, tmp_path: Path) -> None:
    """Issue 11: quotas and the stored label trusted the body's unauthenticated ``source``, so one feed could post
    under another's name and spend its quota. A router with one token per source (a directory, as a Secret mounted
    as a volume — the kubelet's hidden ``..data`` entries included) and its single token as source "default":
    a body naming another source than its token's is a 403 naming ``source`` and counts nothing; each source's
    quota counts its own labels; each label is stored under the source its token authenticates."""
    tokens_dir = tmp_path / "feedback-tokens"
    (tokens_dir / "..data").mkdir(parents=True)
    tokens = {"chargeback": secrets.token_urlsafe(24), "manual-review": secrets.token_urlsafe(24)}
    for source, token in tokens.items():
        (tokens_dir / source).write_text(token + "\n", encoding="utf-8")
    routing_file, db = tmp_path / "routing.json", tmp_path / "predictions.db"
    table = {"generation": 1, "stage": "stable", "stable": stack.endpoint(stack.v1).model_dump()}
    write_table_file(routing_file, RoutingTable.model_validate(table))
    router = RouterProcess(
        log_path=tmp_path / "router.log",
        routing_file=routing_file,
        env={
            DSN_ENV: f"sqlite:///{db}",
            "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false",
            "FW_ROLLOUT_ROUTER__FEEDBACK_TOKENS_DIR": str(tokens_dir),
            "FW_ROLLOUT_OUTCOMES__FEEDBACK_QUOTA_PER_MINUTE": "2",
        },
    )
    router.start()
    try:
        router.wait_live()
        with httpx.Client(base_url=router.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=10.0)
            ids = [client.post(PREDICT, json=SEED).json()["prediction_id"] for _ in range(4)]

        def logged() -> bool:
            with contextlib.closing(sqlite3.connect(db)) as conn:
                return bool(conn.execute("SELECT count(*) FROM predictions").fetchone()[0] == len(ids))

        wait_for(logged, timeout_s=10.0)
        outside_a_quota_windows_end()
        with httpx.Client(base_url=router.control_url, timeout=HTTP_TIMEOUT_S, trust_env=False) as feed:

            def post(token: str, body: dict[str, Any], path: str = "/api/v1/feedback") -> httpx.Response:
                return feed.post(path, json=body, headers={"Authorization": f"Bearer {token}"})

            impostor = post(
                tokens["chargeback"], {"prediction_id": ids[0], "label": "legit", "source": "manual-review"}
            )
            assert impostor.status_code == 403, impostor.text
            assert impostor.json()["details"][0]["field"] == "source"
            own = [
                post(tokens["chargeback"], {"prediction_id": ids[0], "label": "fraud"}),
                post(tokens["chargeback"], {"prediction_id": ids[1], "label": "fraud", "source": "chargeback"}),
                post(tokens["chargeback"], {"prediction_id": ids[2], "label": "fraud"}),
            ]
            assert [r.status_code for r in own] == [200, 200, 429]
            assert post(tokens["manual-review"], {"prediction_id": ids[2], "label": "legit"}).status_code == 200
            assert post(router.feedback_token, {"prediction_id": ids[3], "label": "legit"}).status_code == 200
            as_default = [{"prediction_id": ids[3], "label": "legit", "source": "default"}]
            batch = post(tokens["manual-review"], {"labels": as_default}, "/api/v1/feedback/batch")
            assert batch.json()["results"][0] == {"status": "forbidden", "prediction_id": ids[3], "fields": ["source"]}
            exposition = scrape(router.control_url)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            stored = dict(conn.execute("SELECT prediction_id, source FROM labels").fetchall())
    finally:
        router.stop()
    assert stored == {ids[0]: "chargeback", ids[1]: "chargeback", ids[2]: "manual-review", ids[3]: "default"}
    assert metric_value(exposition, "fraudwatch_feedback_total", result="forbidden") == 2
    assert metric_value(exposition, "fraudwatch_feedback_total", result="over_quota") == 1
    assert metric_value(exposition, "fraudwatch_outcome_total") == 4  # one per stored label: none of the refused


def test_the_router_refuses_to_start_without_a_feedback_token(tmp_path: Path) -> None:
    router = RouterProcess(log_path=tmp_path / "router.log", env={"FW_ROLLOUT_ROUTER__FEEDBACK_TOKEN": ""})
    router.start()
    try:
        deadline = time.monotonic() + 60.0
        while router.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not router.running()
    finally:
        code = router.stop()
    assert code == 2
    assert "no feedback token" in router.log_path.read_text(encoding="utf-8")


def test_sigterm_drains_and_flushes_the_prediction_log(stack: Stack, client: httpx.Client) -> None:
    """Last: stops the module's router. Every decision answered before SIGTERM is in the prediction log."""
    put(stack, stack.table("shadow"))
    sent = [client.post(PREDICT, json=SEED).headers["x-correlation-id"] for _ in range(20)]
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully: the exit status is -SIGTERM.
    assert stack.router.stop() in (0, -signal.SIGTERM)
    assert '"event":"router_stopped"' in stack.router.log_path.read_text(encoding="utf-8")
    db = Path(stack.router.env[DSN_ENV].removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        logged = {row[0] for row in conn.execute("SELECT correlation_id FROM predictions WHERE role = 'decider'")}
    assert set(sent) <= logged
