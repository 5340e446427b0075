"""The routing table and the routing decision (pure): validation, stage → decider/shadows, sticky hashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from rollout.core.routing import (
    HASH_SPACE,
    RoutePlan,
    RoutingTable,
    VersionEndpoint,
    comparison_pair,
    hash_percent,
    hash_point,
    keyed_salt,
    weight_cut,
)
from rollout.router.table_sources import (
    FileTableSource,
    OfferResult,
    RefusalReason,
    TableStore,
    parse_table,
    write_table_file,
)

V1 = VersionEndpoint(version="v1", url="http://127.0.0.1:3001")
V2 = VersionEndpoint(version="v2", url="http://127.0.0.1:3002")
V3 = VersionEndpoint(version="v3", url="http://127.0.0.1:3003")
N_ENTITIES = 100_000
TOLERANCE_PP = 1.0


def table(stage: str, weight: float | None = None, **extra: object) -> RoutingTable:
    data: dict[str, object] = {"stage": stage, "stable": V1.model_dump(), "candidate": V2.model_dump(), **extra}
    if weight is not None:
        data["candidate_weight"] = weight
    return RoutingTable.model_validate(data)


def entities(n: int = N_ENTITIES) -> list[str]:
    return [f"acct-{i:06d}" for i in range(n)]


def candidate_set(plan: RoutePlan, keys: list[str]) -> set[str]:
    return {k for k in keys if plan.route(k).arm == "candidate"}


# ------------------------------------------------------------------ validation


def test_weight_follows_stage_when_omitted() -> None:
    assert table("stable").candidate_weight == 0.0
    assert table("shadow").candidate_weight == 0.0
    assert table("full").candidate_weight == 100.0


@pytest.mark.parametrize(
    ("stage", "weight", "message"),
    [
        ("shadow", 5.0, "candidate_weight must be 0"),
        ("stable", 1.0, "candidate_weight must be 0"),
        ("full", 50.0, "candidate_weight must be 100"),
        ("canary", 101.0, "less than or equal to 100"),
        ("canary", -1.0, "greater than or equal to 0"),
    ],
)
def test_weight_contradicting_the_stage_is_rejected(stage: str, weight: float, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        table(stage, weight)


def test_canary_needs_an_explicit_weight() -> None:
    with pytest.raises(ValidationError, match="candidate_weight"):
        table("canary")


@pytest.mark.parametrize("stage", ["shadow", "canary", "ab", "full"])
def test_stages_beyond_stable_need_a_candidate(stage: str) -> None:
    with pytest.raises(ValidationError, match="needs a candidate"):
        RoutingTable.model_validate({"stage": stage, "stable": V1.model_dump(), "candidate_weight": 50})


def test_same_version_twice_and_shared_urls_are_rejected() -> None:
    with pytest.raises(ValidationError, match="different versions"):
        RoutingTable(stage="shadow", stable=V1, candidate=V1.model_copy(), candidate_weight=0)
    with pytest.raises(ValidationError, match="two URLs"):
        table("shadow", shadow=[{"version": "v2", "url": "http://127.0.0.1:9999"}])
    with pytest.raises(ValidationError, match="two versions"):
        table("shadow", shadow=[{"version": "v9", "url": V1.url}])


@pytest.mark.parametrize("url", ["127.0.0.1:3001", "ftp://host", "http://", "http://h:1/?q=1", "http://h:1/#f"])
def test_endpoint_url_must_be_a_plain_http_base(url: str) -> None:
    with pytest.raises(ValidationError, match="url"):
        VersionEndpoint(version="v1", url=url)


def test_endpoint_url_loses_its_trailing_slash_and_unknown_fields_are_refused() -> None:
    assert VersionEndpoint(version="v1", url="http://h:1/ ").url == "http://h:1"
    with pytest.raises(ValidationError, match="extra"):
        RoutingTable.model_validate({"stable": V1.model_dump(), "weight": 5})


# ------------------------------------------------------------------ stage → decider and shadows


def test_stable_stage_routes_everyone_to_stable_without_shadows() -> None:
    plan = RoutePlan.compile(table("stable"))
    for key in entities(1000):
        route = plan.route(key)
        assert (route.arm, route.decider, route.fallback, route.shadows) == ("stable", V1, None, ())


def test_shadow_stage_stable_decides_and_candidate_shadows() -> None:
    plan = RoutePlan.compile(table("shadow", shadow=[V3.model_dump()]))
    for key in entities(1000):
        route = plan.route(key)
        assert route.decider == V1
        assert route.fallback is None
        assert [e.version for e in route.shadows] == ["v2", "v3"]


def test_full_stage_candidate_decides_and_old_stable_shadows_and_rescues() -> None:
    plan = RoutePlan.compile(table("full"))
    for key in entities(1000):
        route = plan.route(key)
        assert (route.arm, route.decider, route.fallback) == ("candidate", V2, V1)
        assert route.shadows == (V1,)


@pytest.mark.parametrize("stage", ["canary", "ab"])
def test_split_stages_have_both_arms_with_stable_as_fallback(stage: str) -> None:
    plan = RoutePlan.compile(table(stage, 50, shadow=[V3.model_dump()]))
    routes = [plan.route(k) for k in entities(2000)]
    stable_routes = [r for r in routes if r.arm == "stable"]
    candidate_routes = [r for r in routes if r.arm == "candidate"]
    assert stable_routes
    assert candidate_routes
    assert all(r.decider == V1 and r.fallback is None and r.shadows == (V3,) for r in stable_routes)
    # the control shadow: stable scores every request the candidate decides (paired evidence in canary and A/B)
    assert all(r.decider == V2 and r.fallback == V1 and r.shadows == (V1, V3) for r in candidate_routes)


def test_a_shadow_naming_the_decider_is_not_called_twice() -> None:
    plan = RoutePlan.compile(table("shadow", shadow=[V2.model_dump(), V1.model_dump()]))
    assert plan.route("x").shadows == (V2,)


# ------------------------------------------------------------------ sticky hashing


@pytest.mark.parametrize("weight", [1.0, 5.0, 50.0])
def test_realised_weight_is_within_one_point_over_100k_entities(weight: float) -> None:
    plan = RoutePlan.compile(table("canary", weight))
    share = 100.0 * len(candidate_set(plan, entities())) / N_ENTITIES
    assert abs(share - weight) <= TOLERANCE_PP, share


def test_assignment_is_sticky_across_calls_and_recompiles() -> None:
    keys = entities(5000)
    first = [RoutePlan.compile(table("ab", 50)).route(k).arm for k in keys]
    again = [RoutePlan.compile(table("ab", 50, generation=9)).route(k).arm for k in keys]
    assert first == again


def test_raising_the_weight_only_adds_entities_to_the_candidate() -> None:
    keys = entities()
    at_1 = candidate_set(RoutePlan.compile(table("canary", 1)), keys)
    at_5 = candidate_set(RoutePlan.compile(table("canary", 5)), keys)
    at_50 = candidate_set(RoutePlan.compile(table("ab", 50)), keys)
    assert at_1 < at_5 < at_50


def test_salt_is_per_rollout_so_rollouts_pick_different_entities() -> None:
    keys = entities(20_000)
    ours = candidate_set(RoutePlan.compile(table("canary", 10)), keys)
    other_pair = RoutingTable(stage="canary", stable=V2, candidate=V3, candidate_weight=10)
    theirs = candidate_set(RoutePlan.compile(other_pair), keys)
    # Independent choices overlap on about 10 % of each set; identical salts would overlap entirely.
    overlap = len(ours & theirs) / len(ours)
    assert overlap < 0.2, overlap
    pinned = candidate_set(
        RoutePlan.compile(other_pair.model_copy(update={"salt": table("canary", 1).effective_salt})), keys
    )
    assert pinned == ours


def test_the_router_key_makes_each_rollouts_salt_secret() -> None:
    """Issue 11, point 3: the public salt (the version pair) predicts nothing once the plan is keyed — the keyed
    choice overlaps the public one on about the weight's share (independent), and another key picks other entities;
    one key is sticky across recompiles (every replica shares it)."""
    keys = entities(20_000)
    canary = table("canary", 10)
    public = candidate_set(RoutePlan.compile(canary), keys)
    ours = candidate_set(RoutePlan.compile(canary, b"router-key"), keys)
    assert ours == candidate_set(RoutePlan.compile(table("canary", 10, generation=9), b"router-key"), keys)
    assert abs(100.0 * len(ours) / len(keys) - 10.0) <= 1.0
    other_key = candidate_set(RoutePlan.compile(canary, b"another-key"), keys)
    for other in (public, other_key):
        assert len(ours & other) / len(ours) < 0.15  # independent choices overlap on ~10 %; the old code: 100 %
    store = TableStore(sticky_key=b"router-key")
    store.offer(canary, "test")
    assert store.plan is not None and candidate_set(store.plan, keys) == ours


def test_keyed_salt_known_values() -> None:
    """Frozen BLAKE2b-256 values (key, personalisation "fw-sticky"): a change would move every account's arm."""
    assert keyed_salt(b"key", b"v1->v2").hex() == "1907846574d4c8698e48ec45c8400ea8def80112835cc560594b0841a00e469e"
    # a key longer than BLAKE2b's 64 bytes is hashed first
    assert keyed_salt(b"k" * 100, b"v1->v2").hex() == (
        "f888994502b2b55d055c7ea833315275dc718b9d0443d5f594e92f15b1f186cc"
    )
    assert keyed_salt(b"key", b"v1->v3") != keyed_salt(b"key", b"v1->v2") != keyed_salt(b"kez", b"v1->v2")


def test_hash_point_is_uniform_in_range_and_weight_cut_is_monotonic() -> None:
    salt = b"s"
    percents = [hash_percent(salt, k) for k in entities(20_000)]
    assert all(0.0 <= p < 100.0 for p in percents)
    deciles = [sum(1 for p in percents if 10 * d <= p < 10 * (d + 1)) for d in range(10)]
    assert max(deciles) - min(deciles) < 400  # 2000 expected per decile; ±200 is > 4 sigma
    cuts = [weight_cut(w / 10) for w in range(0, 1001)]
    assert cuts == sorted(cuts)
    assert (cuts[0], cuts[-1]) == (0, HASH_SPACE)
    assert hash_point(salt, "a") != hash_point(b"t", "a")


def test_comparison_pair_keeps_candidate_minus_stable_across_stages() -> None:
    shadow_stage = comparison_pair("v1", "v2", "v1")  # stable v1 decides, v2 shadows
    full_stage = comparison_pair("v2", "v1", "v1")  # v2 decides, old stable v1 shadows
    assert (shadow_stage.stable, shadow_stage.candidate) == ("v1", "v2")
    assert (full_stage.stable, full_stage.candidate) == ("v1", "v2")
    # v1 scores 0.2 and v2 scores 0.7 in both stages: the delta is v2 - v1 either way.
    assert shadow_stage.score_delta(decider_score=0.2, shadow_score=0.7) == pytest.approx(0.5)
    assert full_stage.score_delta(decider_score=0.7, shadow_score=0.2) == pytest.approx(0.5)


# ------------------------------------------------------------------ parsing, store, file source


def test_yaml_and_json_parse_to_the_same_table() -> None:
    yaml_text = "stage: canary\ncandidate_weight: 5\nstable: {version: v1, url: 'http://127.0.0.1:3001'}\n" + (
        "candidate: {version: v2, url: 'http://127.0.0.1:3002'}\n"
    )
    json_text = json.dumps(
        {"stage": "canary", "candidate_weight": 5, "stable": V1.model_dump(), "candidate": V2.model_dump()}
    )
    assert parse_table(yaml_text, yaml_format=True) == parse_table(json_text, yaml_format=False)
    with pytest.raises(ValueError, match="YAML"):
        parse_table("stage: [", yaml_format=True)


def stage_of(store: TableStore) -> str | None:
    plan = store.plan
    return plan.stage if plan is not None else None


class RecordingSink:
    def __init__(self) -> None:
        self.store = TableStore()
        self.refusals: list[tuple[str, RefusalReason, str]] = []

    def offer(self, table: RoutingTable, source: str) -> OfferResult:
        return self.store.offer(table, source)

    def refuse(self, source: str, reason: RefusalReason, detail: str) -> None:
        self.refusals.append((source, reason, detail))


def test_store_refuses_older_generations_and_ignores_repeats() -> None:
    store = TableStore()
    assert store.offer(table("shadow", generation=3), "file") == "applied"
    assert store.offer(table("shadow", generation=3), "admin") == "unchanged"
    assert store.offer(table("canary", 5, generation=2), "admin") == "stale"
    assert stage_of(store) == "shadow"
    assert store.offer(table("canary", 5, generation=4), "admin") == "applied"
    assert stage_of(store) == "canary"


@pytest.mark.parametrize("name", ["routing.json", "routing.yaml"])
def test_file_source_reloads_on_change_and_keeps_the_table_on_bad_content(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    source = FileTableSource(path, interval_s=0.2)
    sink = RecordingSink()
    source.poll(sink)
    assert sink.refusals[-1][1] == "missing"
    write_table_file(path, table("shadow", generation=1))
    source.poll(sink)
    assert stage_of(sink.store) == "shadow"
    write_table_file(path, table("canary", 5, generation=2))
    source.poll(sink)
    assert stage_of(sink.store) == "canary"
    path.write_text('{"stage": "canary", "stable": ', encoding="utf-8")  # a half-written file
    source.poll(sink)
    source.poll(sink)
    assert stage_of(sink.store) == "canary"
    assert [r[1] for r in sink.refusals] == ["missing", "invalid"]  # reported once per version of the file
    write_table_file(path, table("full", generation=3))
    source.poll(sink)
    assert stage_of(sink.store) == "full"
    assert FileTableSource(path, interval_s=0.2).load_now() == table("full", generation=3)
