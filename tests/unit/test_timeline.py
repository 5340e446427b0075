"""rollout.demo.timeline and the demo's views of it, on the records of a real controller.

The records come from the real reconcile loop of tests/unit/test_controller.py (its in-memory world: settable
clock, metrics from a dict): a good v2 promoted through every stage, then a v3 whose recall is far below v2's
rolled back by the outcome gate — the rollout demo's two rollouts. The timeline is built from the event log the
controller wrote and from the gate measurements sampled from its saved state between reconciles, as
``fraudwatch-demo`` does.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console

from rollout.backends.local.events import read_events
from rollout.backends.local.inbox import EVENTS_FILE
from rollout.backends.local.state import StateStore
from rollout.demo.main import check_outcomes
from rollout.demo.stack import ModelSide
from rollout.demo.timeline import (
    GateSampler,
    Timeline,
    build_timeline,
    decision_shares,
    read_points,
    render_html,
    render_png,
    stage_durations,
    summarize,
    threshold_of,
    write_points,
)
from rollout.demo.view import rollout_view, split_bar, status_line, summary_table, transition_line, walked
from tests.unit.test_controller import POLICY, T0, V1, V2, Harness

V3 = "v3"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_two_rollouts(h: Harness, sampler: GateSampler) -> None:
    """v1 → v2 promoted, then v2 → v3 rolled back on recall; the state sampled after every reconcile."""
    h.registry.versions = (V1, V2, V3)
    h.quality.metrics[V3] = {"pr_auc": 0.95}
    h.metrics_values.values |= {
        'requests{model_version="v3"}': 100.0,
        'errors{model_version="v3"}': 0.0,
        'labels{model_version="v3"}': 1000.0,
        'tp{model_version="v3"}': 300.0,  # recall 0.3 against v2's 0.89
        'pos{model_version="v3"}': 1000.0,
    }

    def tick_until(predicate: object) -> None:
        for _ in range(400):
            h.tick()
            sampler.observe(StateStore(h.state_dir).load())
            if callable(predicate) and predicate():
                return
        raise AssertionError("not reached")

    h.tick(n=2)
    h.command("start", candidate=V2, id="demo-v2")
    tick_until(lambda: h.phase() == "Promoted")
    h.command("start", candidate=V3, id="demo-v3")
    tick_until(lambda: h.rollout.rollout_id == "demo-v3" and h.phase() == "RolledBack")


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Harness, GateSampler, Timeline]:
    h = Harness(tmp_path / "state")
    sampler = GateSampler()
    run_two_rollouts(h, sampler)
    timeline = build_timeline(read_events(h.state_dir / EVENTS_FILE), sampler.points, POLICY, T0)
    return h, sampler, timeline


def side() -> ModelSide:
    return ModelSide.model_validate(
        {
            "model_name": "m",
            "tracking_uri": "sqlite:///x.db",
            "versions": {"champion": V1, "challenger": V2, "bad": V3},
            "registry_versions": {V1: "1", V2: "2", V3: "3"},
            "live_traffic": "live.csv.gz",
            "regression_set": "regression.json",
        }
    )


def test_the_timeline_has_both_rollouts_with_every_transition(recorded: tuple[Harness, GateSampler, Timeline]) -> None:
    h, _, timeline = recorded
    assert [(r.rollout_id, r.stable, r.candidate, r.phase) for r in timeline.rollouts] == [
        ("demo-v2", V1, V2, "Promoted"),
        ("demo-v3", V2, V3, "RolledBack"),
    ]
    good, bad = timeline.rollouts
    assert [(t.from_stage, t.to_stage, t.to_phase) for t in good.transitions] == [
        ("quality", "shadow", "Progressing"),
        ("shadow", "canary", "Progressing"),
        ("canary", "ab", "Progressing"),
        ("ab", "full", "Progressing"),
        ("full", "full", "Promoted"),
    ]
    assert [t.candidate_weight for t in good.transitions] == [0, 5, 50, 100, 100]
    assert bad.transitions[-1].to_phase == "RolledBack"
    assert bad.transitions[-1].candidate_weight == 0
    assert [g["name"] for g in bad.transitions[-1].failed_gates] == ["recall"]
    # the start note gives the rollout's beginning (before its first transition, the end of the quality stage)
    assert good.started_at is not None and good.started_at <= good.transitions[0].at
    assert bad.finished_at == h.rollout.finished_at


def test_gate_measurements_are_sampled_once_each(recorded: tuple[Harness, GateSampler, Timeline]) -> None:
    h, sampler, timeline = recorded
    keys = [(p.rollout_id, p.stage, p.name, p.at) for p in sampler.points]
    assert len(keys) == len(set(keys))
    good, bad = timeline.rollouts
    errors = [p for p in good.gates if p.name == "errors"]
    assert {p.stage for p in errors} == {"shadow", "canary", "ab", "full"}
    assert all(p.status == "Successful" and p.candidate == 0.0 for p in errors)
    recall = [p for p in bad.gates if p.name == "recall"]
    assert recall and recall[-1].status == "Failed"
    assert recall[-1].candidate == pytest.approx(0.3)
    assert recall[-1].stable == pytest.approx(0.89)
    again = sampler.observe(StateStore(h.state_dir).load())
    assert again == []  # the same state again: nothing new


def test_points_round_trip_through_their_file(recorded: tuple[Harness, GateSampler, Timeline], tmp_path: Path) -> None:
    _, sampler, _ = recorded
    path = write_points(sampler.points, tmp_path / "gates.jsonl")
    assert read_points(path) == sampler.points


def test_summaries_say_how_each_rollout_ended(recorded: tuple[Harness, GateSampler, Timeline]) -> None:
    h, _, timeline = recorded
    good, bad = summarize(timeline, h.clock.now)
    assert good.phase == "Promoted" and good.path == ("quality", "shadow", "canary", "ab", "full")
    assert good.ended_by == "analysis/gates_passed" and good.failed_gates == ()
    # stage minimums are 10 s in the test policy; every stage lasted at least that
    assert all(seconds >= 10 for stage, seconds in good.stages if stage != "quality")
    assert good.duration_s == pytest.approx(sum(seconds for _, seconds in good.stages))
    assert bad.phase == "RolledBack" and bad.path == ("quality", "shadow", "canary", "ab")
    assert bad.ended_by == "analysis/gate_failed"
    assert bad.failed_layers == {"outcome"}
    assert "errors" in bad.passed_gates and "recall" not in bad.passed_gates
    assert bad.to_dict()["failed_gates"][0]["name"] == "recall"


def test_the_designed_run_passes_the_demo_check_and_deviations_are_named(
    recorded: tuple[Harness, GateSampler, Timeline],
) -> None:
    h, _, timeline = recorded
    summaries = summarize(timeline, h.clock.now)
    # the test policy has one health gate ("errors"), so the demo's drift and health gate names are missing
    problems = check_outcomes(summaries, side())
    assert len(problems) == 1 and "never passed before the rollback" in problems[0]
    swapped = ModelSide.model_validate({**side().model_dump(), "versions": {"champion": V1, "challenger": V3,
                                                                             "bad": V2}})  # fmt: skip
    named = check_outcomes(summaries, swapped)
    assert any("v3 ended RolledBack" in p for p in named)
    assert any("v2 ended Promoted" in p for p in named)
    assert check_outcomes([], side()) == ["no rollout of v2", "no rollout of v3"]


def test_decision_shares_follow_the_weights(recorded: tuple[Harness, GateSampler, Timeline]) -> None:
    h, _, timeline = recorded
    shares = decision_shares(timeline, h.clock.now, serving_since=0.0)
    # as v1's candidate: quality, shadow, canary, A/B, full, Promoted; then as v3's stable: shadow, canary (95 %),
    # A/B (50 %), rolled back (100 %), until the end of the run
    assert [share for _, share in shares[V2]] == [0.0, 0.0, 5.0, 50.0, 100.0, 100.0, 100.0, 100.0, 95.0, 50.0,
                                                  100.0, 100.0]  # fmt: skip
    assert shares[V1][0] == (0.0, 100.0)  # the champion decided everything before the first rollout
    assert [share for _, share in shares[V3]][-2:] == [0.0, 0.0]
    end = timeline.seconds(h.clock.now)
    assert shares[V2][-1][0] == end  # v2 still decides after v3's rollback
    assert shares[V1][-1][0] < end  # v1 left with its rollout
    for steps in shares.values():
        assert [t for t, _ in steps] == sorted(t for t, _ in steps)


def test_stage_durations_of_a_running_rollout_count_until_now(recorded: tuple[Harness, GateSampler, Timeline]) -> None:
    _, _, timeline = recorded
    track = timeline.rollouts[0]
    running = type(track)(track.rollout_id, track.stable, track.candidate, track.started_at, track.transitions[:2])
    now = track.transitions[1].at + timedelta(seconds=7)
    stages = stage_durations(running, now)
    assert [s for s, _ in stages] == ["quality", "shadow", "canary"]
    assert stages[-1][1] == pytest.approx(7.0)


def test_threshold_of_reads_absolute_conditions_only() -> None:
    assert threshold_of("value <= 0.2") == 0.2
    assert threshold_of("candidate - stable >= -0.15") is None
    assert threshold_of(None) is None


def test_the_report_is_written_with_the_chart_and_every_transition(
    recorded: tuple[Harness, GateSampler, Timeline], tmp_path: Path
) -> None:
    h, _, timeline = recorded
    summaries = summarize(timeline, h.clock.now)
    png = render_png(timeline, tmp_path / "report" / "timeline.png", h.clock.now, serving_since=0.0)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    page = render_html(timeline, summaries, tmp_path / "report" / "timeline.html", png=png, facts={"wall (s)": 1.5})
    text = page.read_text(encoding="utf-8")
    assert "data:image/png;base64," in text
    assert text.count("<tr><td>") == 9 + 2  # nine transitions (five and four) and two summary rows
    assert "Progressing/ab → RolledBack/ab" in text and "Progressing/full → Promoted/full" in text
    assert "recall (outcome)" in text and "wall (s)" in text
    assert "— evidence " in text and " fraud labels" in text  # each gate's evidence beside its values


def test_the_live_view_and_the_plain_lines(recorded: tuple[Harness, GateSampler, Timeline]) -> None:
    h, _, _ = recorded
    rollout = h.rollout
    console = Console(width=200, record=True)
    console.print(rollout_view(rollout, POLICY, h.clock.now, started_at=h.controller.state.rollout_started_at))
    text = console.export_text()
    assert "demo-v3" in text and "RolledBack" in text and "Failed" in text and "recall" in text
    assert "evidence" in text and "fraud labels" in text  # the gates table's evidence column
    assert "v2 100 %" in text and "v3   0 %" in text
    line = transition_line(rollout, rollout.history[-1], 12.0)
    assert line.startswith("[   12.0 s] demo-v3: Progressing/ab → RolledBack/ab") and "failed: recall" in line
    assert "RolledBack/ab" in status_line(rollout, POLICY, h.clock.now, 1.0)
    assert walked(rollout, h.controller.state.rollout_started_at).plain.endswith(
        "✓ canary 10.0 s → ✗ ab 5.0 s → RolledBack"
    )
    bar = split_bar("v1", "v2", 5, width=20)
    assert bar.plain == "v1  95 % " + "█" * 20 + " v2   5 %"
    summary = Console(width=200, record=True)
    summary.print(summary_table(summarize(recorded[2], h.clock.now)))
    table = summary.export_text()
    assert "Promoted" in table and "recall (outcome)" in table
