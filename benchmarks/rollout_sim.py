"""A simulated world for whole rollouts through the real policy, analysis and stage-machine code.

Every look (the policy's ``analysis.interval_s``) the world serves ``rps`` requests routed as the rollout's stage says
(shadow: stable decides, the candidate scores the same requests; canary and A/B: split by weight, stable scoring the
candidate's requests too as their control shadow; full: the candidate decides, the previous version scores in
shadow), and every request is labelled ``label_delay_s`` later.
A :class:`SimProvider` answers each query the policy's gates render with what Prometheus would return for those
counts; the real :func:`rollout.core.analysis.analyse` judges them and the real :func:`rollout.core.machine.step`
decides.

What the world models, per version: calls and errors (rate ``error_rate``), decisions (recall at its threshold and a
false-positive rate), labels (fraud with ``fraud_rate``) joined as tp/fn/fp/tn with score histograms for AUC and
calibration (of all a version's predictions, and of its deciding ones alone), shadow pairs with their agreement and
decision cells, and the PSI of six input features and the score against the
training reference (≈ χ²₉/n on the 5-minute window's n requests, the sampling noise of a 10-bin PSI when nothing
drifted). A worse candidate misses a share of the frauds stable catches (its recall lower by that much, those
frauds scored like legitimate requests). Latency is a constant p99 with a small share of slow calls (not the subject
here).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from rollout.core import analysis as an
from rollout.core import policy as pol
from rollout.core.machine import QUALITY_STAGE, RolloutState, initial_state, step, traffic_stage

STABLE, CANDIDATE = "v1", "v2"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
BUCKETS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
FEATURES = 6
PSI_BINS = 10
_MINIMUM = re.compile(r">=\s*(\d+(?:\.\d+)?)\s*$")
_FIELDS = ("calls", "errors", "slow", "flagged", "pairs", "agree", "tp", "fn", "fp", "tn")


@dataclass(frozen=True)
class WorldSpec:
    fraud_rate: float
    stable_recall: float
    candidate_recall: float
    rps: float
    label_delay_s: float
    false_positive_rate: float = 0.01
    error_rate: float = 0.0005
    latency_s: float = 0.03
    #: Calls slower than the latency gate's limit (its tail: a healthy service, well within 1 %).
    slow_rate: float = 0.001
    #: Two retrained models disagree on some requests even at equal quality: the share of the frauds stable misses
    #: that the candidate catches (and of the legitimate requests stable flags that the candidate does not); the
    #: reverse shares follow from the two versions' recall and false-positive rate.
    churn: float = 0.2


def _score_bins(rng: np.random.Generator, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Bin probabilities and mean score per bin of Beta(a, b) scores on the 10 buckets."""
    scores = rng.beta(a, b, 200_000)
    index = np.minimum((scores * 10).astype(int), 9)
    probs = np.bincount(index, minlength=10) / scores.size
    means = np.array([scores[index == i].mean() if probs[i] > 0 else (i + 0.5) / 10 for i in range(10)])
    return probs, means


@dataclass
class Tally:
    """Counters of one version: cumulative since the rollout began, plus labels by arrival."""

    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_FIELDS, 0.0))
    pos_bins: np.ndarray = field(default_factory=lambda: np.zeros(10))
    neg_bins: np.ndarray = field(default_factory=lambda: np.zeros(10))
    pred_sum: np.ndarray = field(default_factory=lambda: np.zeros(10))
    pred_count: np.ndarray = field(default_factory=lambda: np.zeros(10))
    observed: np.ndarray = field(default_factory=lambda: np.zeros(10))

    def copy(self) -> Tally:
        return Tally(dict(self.counts), self.pos_bins.copy(), self.neg_bins.copy(), self.pred_sum.copy(),
                     self.pred_count.copy(), self.observed.copy())  # fmt: skip

    def minus(self, other: Tally) -> Tally:
        return Tally({k: self.counts[k] - other.counts[k] for k in _FIELDS}, self.pos_bins - other.pos_bins,
                     self.neg_bins - other.neg_bins, self.pred_sum - other.pred_sum,
                     self.pred_count - other.pred_count, self.observed - other.observed)  # fmt: skip

    @property
    def labels(self) -> float:
        return self.counts["tp"] + self.counts["fn"] + self.counts["fp"] + self.counts["tn"]


@dataclass
class PairTally:
    """The paired tables of the labelled requests both versions scored: decision cells per label
    (``"fraud:1:0"`` = fraud, stable flagged, candidate did not) and joint score bins (stable bin × candidate bin)."""

    cells: dict[str, float] = field(default_factory=dict)
    pos: np.ndarray = field(default_factory=lambda: np.zeros((10, 10)))
    neg: np.ndarray = field(default_factory=lambda: np.zeros((10, 10)))

    def copy(self) -> PairTally:
        return PairTally(dict(self.cells), self.pos.copy(), self.neg.copy())

    def minus(self, other: PairTally) -> PairTally:
        keys = set(self.cells) | set(other.cells)
        cells = {k: self.cells.get(k, 0.0) - other.cells.get(k, 0.0) for k in keys}
        return PairTally(cells, self.pos - other.pos, self.neg - other.neg)

    def count(self, label: str, stable: str = "*", candidate: str = "*") -> float:
        return sum(v for k, v in self.cells.items() if _matches(k.split(":"), (label, stable, candidate)))


def _matches(key: Sequence[str], pattern: Sequence[str]) -> bool:
    return all(p in ("*", k) for k, p in zip(key, pattern, strict=True))


@dataclass(frozen=True)
class _Discordance:
    """One batch of paired requests: both versions' decisions on its frauds and legitimate requests."""

    frauds: int
    both_caught: int
    stable_only: int  # frauds only stable caught
    candidate_only: int  # frauds only the candidate caught
    legit: int
    both_flagged: int
    legit_stable_only: int
    legit_candidate_only: int


def _discordance(rng: np.random.Generator, spec: WorldSpec, n: int) -> _Discordance:
    """Decisions of two versions on the same ``n`` requests with the spec's recalls, false-positive rate and churn."""
    frauds = int(rng.binomial(n, spec.fraud_rate))
    caught_s = int(rng.binomial(frauds, spec.stable_recall))
    # P(candidate misses | stable caught) so that the candidate's recall is candidate_recall.
    gained_share = spec.churn
    lost_share = 1.0 - (spec.candidate_recall - (1.0 - spec.stable_recall) * gained_share) / spec.stable_recall
    lost = int(rng.binomial(caught_s, min(max(lost_share, 0.0), 1.0)))
    gained = int(rng.binomial(frauds - caught_s, gained_share))
    legit = n - frauds
    fpr = spec.false_positive_rate
    flagged_s = int(rng.binomial(legit, fpr))
    unflagged = int(rng.binomial(flagged_s, spec.churn))
    newly = int(rng.binomial(legit - flagged_s, fpr * spec.churn / (1.0 - fpr)))
    return _Discordance(frauds, caught_s - lost, lost, gained, legit, flagged_s - unflagged, unflagged, newly)


class World:
    """The simulated traffic, labels and counters of one rollout."""

    def __init__(
        self, spec: WorldSpec, rng: np.random.Generator, score_models: Mapping[str, tuple[np.ndarray, ...]]
    ) -> None:
        self.spec, self.rng, self.models = spec, rng, score_models
        self.tally = {STABLE: Tally(), CANDIDATE: Tally()}
        #: The predictions each version made as the decider (the arm's own decisions).
        self.decided = {STABLE: Tally(), CANDIDATE: Tally()}
        self.pending: deque[tuple[float, str, bool, dict[str, float], tuple[Any, Any, Any]]] = deque()
        self.window: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()  # 5-minute (calls, flagged)
        self.stage_start = {STABLE: Tally(), CANDIDATE: Tally()}
        self.decided_start = {STABLE: Tally(), CANDIDATE: Tally()}
        self.pairs = PairTally()
        self.pairs_start = PairTally()
        self.pending_pairs: deque[tuple[float, PairTally]] = deque()
        #: Both versions' decisions on every pair (unlabelled; counted at once): "stable:candidate" → requests.
        self.decision_pairs: dict[str, float] = dict.fromkeys(("0:0", "0:1", "1:0", "1:1"), 0.0)
        self.decision_pairs_start = dict(self.decision_pairs)

    def enter_stage(self) -> None:
        self.stage_start = {v: t.copy() for v, t in self.tally.items()}
        self.decided_start = {v: t.copy() for v, t in self.decided.items()}
        self.pairs_start = self.pairs.copy()
        self.decision_pairs_start = dict(self.decision_pairs)

    def serve(self, now_s: float, dt: float, stage: str, weight: float) -> None:
        spec, rng = self.spec, self.rng
        n = int(rng.poisson(spec.rps * dt))
        seen: dict[str, tuple[float, float]] = {}
        if stage == "shadow":
            self._paired(now_s, n, STABLE, seen)
        elif stage == "full":
            self._paired(now_s, n, CANDIDATE, seen)
        else:  # the candidate's arm is paired (stable's control shadow); stable's own arm is not
            cand = int(rng.binomial(n, weight / 100.0))
            self._paired(now_s, cand, CANDIDATE, seen)
            self._alone(now_s, n - cand, seen)
        self.window.append((now_s, seen))
        while self.window and self.window[0][0] <= now_s - 300.0:
            self.window.popleft()
        self._arrive(now_s)

    def _paired(self, now_s: float, n: int, decider: str, seen: dict[str, tuple[float, float]]) -> None:
        """``n`` requests both versions score; ``decider`` answers them."""
        d = _discordance(self.rng, self.spec, n)
        caught_by = {STABLE: d.both_caught + d.stable_only, CANDIDATE: d.both_caught + d.candidate_only}
        flagged_by = {STABLE: d.both_flagged + d.legit_stable_only, CANDIDATE: d.both_flagged + d.legit_candidate_only}
        # A version scores the frauds only the other caught like legitimate requests.
        demoted_by = {STABLE: d.candidate_only, CANDIDATE: d.stable_only}
        for v in (STABLE, CANDIDATE):
            self._calls(v, n, caught_by[v] + flagged_by[v], seen)
            self._label(now_s, v, v == decider, d.frauds, caught_by[v], d.legit, flagged_by[v], demoted_by[v])
        disagree = d.stable_only + d.candidate_only + d.legit_stable_only + d.legit_candidate_only
        for v in (STABLE, CANDIDATE):
            self.tally[v].counts["pairs"] += n
            self.tally[v].counts["agree"] += n - disagree
        cells = {"1:1": d.both_caught + d.both_flagged, "1:0": d.stable_only + d.legit_stable_only,
                 "0:1": d.candidate_only + d.legit_candidate_only}  # fmt: skip
        cells["0:0"] = n - sum(cells.values())
        for key, value in cells.items():
            self.decision_pairs[key] += value
        self.pending_pairs.append((now_s + self.spec.label_delay_s, self._pair_tables(d)))

    def _alone(self, now_s: float, calls: int, seen: dict[str, tuple[float, float]]) -> None:
        """``calls`` requests stable decides alone (its arm of a split)."""
        spec, rng = self.spec, self.rng
        frauds = int(rng.binomial(calls, spec.fraud_rate))
        caught = int(rng.binomial(frauds, spec.stable_recall))
        legit_flagged = int(rng.binomial(calls - frauds, spec.false_positive_rate))
        self._calls(STABLE, calls, caught + legit_flagged, seen)
        self._label(now_s, STABLE, True, frauds, caught, calls - frauds, legit_flagged, 0)

    def _pair_tables(self, d: _Discordance) -> PairTally:
        """The paired tables of one batch: decision cells, and joint score bins (concordant requests in the same
        bin for both versions; a fraud one version missed is scored like a legitimate request by that version)."""
        rng = self.rng
        pos_p, _ = self.models["fraud"]
        neg_p, _ = self.models["legit"]
        fraud_concordant = d.frauds - d.stable_only - d.candidate_only
        legit_concordant = d.legit - d.legit_stable_only - d.legit_candidate_only
        cells = {
            "fraud:1:1": d.both_caught,
            "fraud:1:0": d.stable_only,
            "fraud:0:1": d.candidate_only,
            "fraud:0:0": fraud_concordant - d.both_caught,
            "legit:1:1": d.both_flagged,
            "legit:1:0": d.legit_stable_only,
            "legit:0:1": d.legit_candidate_only,
            "legit:0:0": legit_concordant - d.both_flagged,
        }
        pos = np.diag(rng.multinomial(fraud_concordant, pos_p)).astype(float)
        pos += _joint(rng, d.stable_only, pos_p, neg_p) + _joint(rng, d.candidate_only, neg_p, pos_p)
        neg = np.diag(rng.multinomial(legit_concordant, neg_p)).astype(float)
        neg += _joint(rng, d.legit_stable_only + d.legit_candidate_only, neg_p, neg_p)
        return PairTally({k: float(v) for k, v in cells.items()}, pos, neg)

    def _calls(self, version: str, calls: int, flagged: int, seen: dict[str, tuple[float, float]]) -> None:
        counts = self.tally[version].counts
        counts["calls"] += calls
        counts["errors"] += int(self.rng.binomial(calls, self.spec.error_rate))
        counts["slow"] += int(self.rng.binomial(calls, self.spec.slow_rate))
        counts["flagged"] += flagged
        prior = seen.get(version, (0.0, 0.0))
        seen[version] = (prior[0] + calls, prior[1] + flagged)

    def _label(
        self,
        now_s: float,
        version: str,
        decider: bool,
        frauds: int,
        caught: int,
        legit: int,
        flagged: int,
        demoted: int,
    ) -> None:
        """Queue the labels of these requests; ``demoted`` frauds (missed by a worse candidate) score like legit."""
        rng = self.rng
        pos_p, pos_mean = self.models["fraud"]
        neg_p, neg_mean = self.models["legit"]
        scored_as_fraud = rng.multinomial(frauds - demoted, pos_p)
        scored_as_legit = rng.multinomial(demoted, neg_p)
        pos = scored_as_fraud + scored_as_legit
        neg = rng.multinomial(legit, neg_p)
        counts: dict[str, float] = {"tp": caught, "fn": frauds - caught, "fp": flagged, "tn": legit - flagged}
        pred_sum = scored_as_fraud * pos_mean + (scored_as_legit + neg) * neg_mean
        self.pending.append((now_s + self.spec.label_delay_s, version, decider, counts, (pos, neg, pred_sum)))

    def _arrive(self, now_s: float) -> None:
        while self.pending_pairs and self.pending_pairs[0][0] <= now_s:
            _, batch = self.pending_pairs.popleft()
            for key, value in batch.cells.items():
                self.pairs.cells[key] = self.pairs.cells.get(key, 0.0) + value
            self.pairs.pos += batch.pos
            self.pairs.neg += batch.neg
        while self.pending and self.pending[0][0] <= now_s:
            _, version, decider, counts, (pos, neg, pred_sum) = self.pending.popleft()
            for tally in (self.tally[version], self.decided[version]) if decider else (self.tally[version],):
                for key, value in counts.items():
                    tally.counts[key] += value
                tally.pos_bins += pos
                tally.neg_bins += neg
                tally.pred_sum += pred_sum
                tally.pred_count += pos + neg
                tally.observed += pos

    def pairs_in_stage(self) -> PairTally:
        return self.pairs.minus(self.pairs_start)

    def in_stage(self, version: str) -> Tally:
        return self.tally[version].minus(self.stage_start[version])

    def decided_in_stage(self, version: str) -> Tally:
        return self.decided[version].minus(self.decided_start[version])

    def decision_pairs_in_stage(self) -> dict[str, float]:
        return {k: v - self.decision_pairs_start[k] for k, v in self.decision_pairs.items()}

    def recent(self, version: str) -> tuple[float, float]:
        calls = sum(seen.get(version, (0.0, 0.0))[0] for _, seen in self.window)
        flagged = sum(seen.get(version, (0.0, 0.0))[1] for _, seen in self.window)
        return calls, flagged


class SimProvider:
    """The rendered queries of the current look → values (what Prometheus would answer for the world's counts)."""

    def __init__(self) -> None:
        self.values: dict[str, float | None] = {}
        self.vectors: dict[str, list[tuple[dict[str, str], float]]] = {}

    def query(self, promql: str) -> float | None:
        if promql not in self.values:
            raise KeyError(f"the simulation has no value for {promql!r}")
        return self.values[promql]

    def query_vector(self, promql: str) -> Sequence[tuple[Mapping[str, str], float]]:
        return self.vectors.get(promql, [])


def _joint(rng: np.random.Generator, n: int, stable_p: np.ndarray, candidate_p: np.ndarray) -> np.ndarray:
    """``n`` requests whose two scores are drawn independently (stable's bin × candidate's bin)."""
    table = np.zeros((10, 10))
    if n > 0:
        np.add.at(table, (rng.choice(10, n, p=stable_p), rng.choice(10, n, p=candidate_p)), 1.0)
    return table


def _cells(table: np.ndarray) -> list[tuple[dict[str, str], float]]:
    return [
        ({"stable_le": f"{BUCKETS[i]:g}", "candidate_le": f"{BUCKETS[j]:g}"}, float(table[i, j]))
        for i in range(10)
        for j in range(10)
        if table[i, j] > 0
    ]


def _cumulative(bins: np.ndarray) -> list[tuple[dict[str, str], float]]:
    running = np.cumsum(bins)
    rows = [({"le": f"{le:g}"}, float(c)) for le, c in zip(BUCKETS, running, strict=True)]
    return [*rows, ({"le": "+Inf"}, float(running[-1]))]


def _psi_noise(rng: np.random.Generator, n: float, features: int) -> float | None:
    if n <= 0:
        return None
    return float(np.max(rng.chisquare(PSI_BINS - 1, features)) / n)


def _minimum(query: str) -> float:
    found = _MINIMUM.search(query.strip())
    return float(found.group(1)) if found else 0.0


def fill(provider: SimProvider, policy: pol.RolloutPolicy, world: World, stage: pol.TrafficStage, now: datetime,
         entered: datetime) -> None:  # fmt: skip
    """Render every query of ``stage``'s gates for both versions and store the world's answer."""
    stage_window_s = (now - entered).total_seconds()
    ctx = {
        v: pol.RenderContext(STABLE, CANDIDATE, v, policy.analysis.window_s, stage_window_s, stage)
        for v in (STABLE, CANDIDATE)
    }
    values, vectors = provider.values, provider.vectors
    values.clear()
    vectors.clear()
    rng = world.rng

    def put(template: str, version: str, value: float | None) -> None:
        values[pol.render(template, ctx[version])] = value

    stage_tally = {v: world.in_stage(v) for v in (STABLE, CANDIDATE)}
    for v, tally in stage_tally.items():
        c = tally.counts
        put(policy.samples.requests, v, c["calls"] - c["errors"])
        put(policy.samples.labels, v, tally.labels)
    for gate in policy.gates_for(stage):
        for v in (STABLE, CANDIDATE):
            tally, c = stage_tally[v], stage_tally[v].counts
            recent_calls, recent_flagged = world.recent(v)
            if isinstance(gate, pol.MetricGate):
                model = METRIC_MODELS[gate.name]
                point, events_trials = model(c, recent_calls, recent_flagged, rng, world.spec)
                if point is not None and recent_calls < _minimum(gate.query):
                    point = None
                put(gate.query, v, point)
                if isinstance(gate.estimator, pol.PairedProportionEstimator):
                    cells = world.decision_pairs_in_stage()
                    put(gate.estimator.pairs, CANDIDATE, sum(cells.values()))
                    put(gate.estimator.candidate_only, CANDIDATE, cells["0:1"])
                    put(gate.estimator.stable_only, CANDIDATE, cells["1:0"])
                elif gate.estimator is not None and events_trials is not None:
                    put(gate.estimator.events, v, events_trials[0])
                    put(gate.estimator.trials, v, events_trials[1])
            elif isinstance(gate, pol.OutcomeGate) and gate.paired:
                _fill_paired(gate, world.pairs_in_stage(), lambda t, x: put(t, CANDIDATE, x), vectors, ctx[v])
            elif isinstance(gate, pol.OutcomeGate):
                # A gate of the arms' own decisions (role decider) counts the deciding predictions only.
                own = world.decided_in_stage(v) if 'role="decider"' in gate.labels_query else tally
                _fill_outcome(gate, v, own, put, vectors, ctx[v])


#: The class of labelled pairs each shipped paired gate reads (its labels_query counts them).
PAIRED_CLASS: dict[str, str] = {"recall-paired": "fraud", "false-positive-rate-paired": "legit"}


def _fill_paired(gate: pol.OutcomeGate, pairs: PairTally, put: Callable[[str, float | None], None],
                 vectors: dict[str, list[tuple[dict[str, str], float]]], ctx: pol.RenderContext) -> None:  # fmt: skip
    est = gate.estimator
    if isinstance(est, pol.PairedProportionEstimator):
        label = PAIRED_CLASS[gate.name]
        put(gate.labels_query, pairs.count(label))
        put(est.pairs, pairs.count(label))
        put(est.candidate_only, pairs.count(label, "0", "1"))
        put(est.stable_only, pairs.count(label, "1", "0"))
    elif isinstance(est, pol.PairedAUCEstimator):
        # what its labels_query counts: the pairs of the label it names (the shipped gates: fraud), else all
        named = re.search(r'label="(fraud|legit)"', gate.labels_query)
        put(gate.labels_query, pairs.count(named.group(1)) if named else pairs.count("fraud") + pairs.count("legit"))
        vectors[pol.render(est.positive_cells, ctx)] = _cells(pairs.pos)
        vectors[pol.render(est.negative_cells, ctx)] = _cells(pairs.neg)


def _fill_outcome(gate: pol.OutcomeGate, version: str, tally: Tally, put: Callable[[str, str, float | None], None],
                  vectors: dict[str, list[tuple[dict[str, str], float]]], ctx: pol.RenderContext) -> None:  # fmt: skip
    c, est = tally.counts, gate.estimator
    put(gate.labels_query, version, _labels_counted(gate.labels_query, c))
    if isinstance(est, pol.WilsonEstimator):
        successes, trials = (c["tp"], c["tp"] + c["fn"]) if gate.name == "recall" else (c["tp"], c["tp"] + c["fp"])
        put(est.successes, version, successes)
        put(est.trials, version, trials)
    elif isinstance(est, pol.HistogramAUCEstimator):
        vectors[pol.render(est.positive_buckets, ctx)] = _cumulative(tally.pos_bins)
        vectors[pol.render(est.negative_buckets, ctx)] = _cumulative(tally.neg_bins)
    elif isinstance(est, pol.NormalEstimator):
        total = float(tally.pred_count.sum())
        if total <= 0:
            put(est.query, version, None)
            put(est.stderr, version, None)
            return
        ece = float(np.abs(tally.pred_sum - tally.observed).sum() / total)
        var = tally.observed - tally.observed**2 / np.maximum(tally.pred_count, 1)
        put(est.query, version, ece)
        put(est.stderr, version, float(math.sqrt(max(var.sum(), 0.0)) / total))


def _labels_counted(labels_query: str, c: Mapping[str, float]) -> float:
    """What a gate's ``labels_query`` counts: the cells its ``outcome=~"…"`` matcher names, else every label."""
    found = re.search(r'outcome=~"([a-z|]+)"', labels_query)
    cells = found.group(1).split("|") if found else ["tp", "fn", "fp", "tn"]
    return sum(c[cell] for cell in cells)


MetricModel = Callable[
    [dict[str, float], float, float, np.random.Generator, WorldSpec], tuple[float | None, tuple[float, float] | None]
]


def _error_rate(c: dict[str, float], calls: float, flagged: float, rng: np.random.Generator,
                spec: WorldSpec) -> tuple[float | None, tuple[float, float] | None]:  # fmt: skip
    return (c["errors"] / c["calls"] if c["calls"] else None), (c["errors"], c["calls"])


def _latency(c: dict[str, float], calls: float, flagged: float, rng: np.random.Generator,
             spec: WorldSpec) -> tuple[float | None, tuple[float, float] | None]:  # fmt: skip
    return (spec.latency_s if calls else None), (c["slow"], c["calls"])


def _input_psi(c: dict[str, float], calls: float, flagged: float, rng: np.random.Generator,
               spec: WorldSpec) -> tuple[float | None, tuple[float, float] | None]:  # fmt: skip
    return _psi_noise(rng, calls, FEATURES), None


def _score_psi(c: dict[str, float], calls: float, flagged: float, rng: np.random.Generator,
               spec: WorldSpec) -> tuple[float | None, tuple[float, float] | None]:  # fmt: skip
    return _psi_noise(rng, calls, 1), None


def _decision_rate(c: dict[str, float], calls: float, flagged: float, rng: np.random.Generator,
                   spec: WorldSpec) -> tuple[float | None, tuple[float, float] | None]:  # fmt: skip
    return (flagged / calls if calls else None), (c["flagged"], c["calls"])


def _agreement(c: dict[str, float], calls: float, flagged: float, rng: np.random.Generator,
               spec: WorldSpec) -> tuple[float | None, tuple[float, float] | None]:  # fmt: skip
    return (c["agree"] / c["pairs"] if c["pairs"] else None), (c["agree"], c["pairs"])


METRIC_MODELS: dict[str, MetricModel] = {
    "error-rate": _error_rate,
    "latency": _latency,
    "input-psi-max": _input_psi,
    "score-psi": _score_psi,
    "decision-rate-shift": _decision_rate,
    "shadow-agreement": _agreement,
}


@dataclass(frozen=True)
class RolloutResult:
    phase: str  # Promoted | RolledBack | Aborted | Undecided
    stage: str
    failed_gates: tuple[str, ...]
    candidate_labels: float
    seconds: float


def quality_passes(policy: pol.RolloutPolicy) -> dict[str, float]:
    """Regression-set metrics that meet every quality floor (the simulation is about the traffic stages)."""
    return {name: 1.0 for gate in policy.quality_gates() for name in gate.floors}


def run_rollout(policy: pol.RolloutPolicy, spec: WorldSpec, rng: np.random.Generator,
                score_models: Mapping[str, tuple[np.ndarray, ...]], max_s: float) -> RolloutResult:  # fmt: skip
    """One rollout from its first stage to its end (or ``max_s`` of simulated time: Undecided)."""
    world = World(spec, rng, score_models)
    provider = SimProvider()
    state: RolloutState = initial_state(policy, "sim", STABLE, CANDIDATE, T0)
    dt = policy.analysis.interval_s
    now = T0
    if state.stage == QUALITY_STAGE:
        report = an.analyse_quality(policy, lambda: quality_passes(policy), STABLE, CANDIDATE, now)
        state, _ = step(state, report, now, policy=policy)
    world.enter_stage()
    while state.phase == "Progressing" and (now - T0).total_seconds() < max_s:
        now += timedelta(seconds=dt)
        stage = traffic_stage(state.stage)
        world.serve((now - T0).total_seconds(), dt, stage, float(state.weights.candidate))
        fill(provider, policy, world, stage, now, state.stage_entered_at)
        report = an.analyse(policy, stage, provider, STABLE, CANDIDATE, now, stage_entered_at=state.stage_entered_at)
        before = state.stage
        state, _ = step(state, report, now, policy=policy)
        if state.stage != before:
            world.enter_stage()
    failed = tuple(g.name for g in state.history[-1].gates if g.status is an.GateStatus.FAILED) if state.history else ()
    phase = state.phase if state.phase != "Progressing" else "Undecided"
    labels = world.tally[CANDIDATE].labels
    return RolloutResult(phase, state.stage, failed, labels, (now - T0).total_seconds())


def score_models(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {"fraud": _score_bins(rng, 5.0, 2.0), "legit": _score_bins(rng, 1.0, 12.0)}
