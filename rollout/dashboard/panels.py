"""The dashboard's one list of panels (:data:`SECTIONS`): the rollout's stage and alerts and the four monitoring
layers — service health, input drift, output drift, outcomes — as PromQL with Grafana legends. Both views are built
from it (:mod:`~rollout.dashboard.grafana`, :mod:`~rollout.dashboard.page`), so they cannot drift apart."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

PanelKind = Literal["timeseries", "table", "stat", "auc"]


#: Grafana unit ids; the page formats values the same way.
Unit = Literal["s", "percentunit", "reqps", "short", "none"]


Labels = Mapping[str, str]


LEGEND_SEPARATOR: Final[str] = " · "


_LEGEND: Final = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and how each of its series is named (Grafana's ``legendFormat`` syntax)."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    kind: PanelKind
    unit: Unit
    queries: tuple[Query, ...] = ()
    description: str = ""
    #: ``stat`` panels: show the series' name (e.g. the stage) rather than its value.
    show_name: bool = False


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    panels: tuple[Panel, ...]


def _q(expr: str, legend: str) -> Query:
    return Query(" ".join(expr.split()), legend)


#: The online store's features (service.data.velocity.VELOCITY_FEATURES, spelled out: the router and controller
#: images carry no model stack; tests/unit/test_dashboard_json.py keeps the two equal).
VELOCITY_FEATURES: Final[tuple[str, ...]] = (
    "acct_refunds_1h",
    "acct_refunds_24h",
    "acct_amount_24h",
    "acct_secs_since_prev",
    "ip_accounts_1h",
    "ip_accounts_24h",
    "device_accounts_24h",
    "acct_fraud_labels",
)
ROC_AUC_NOTE: Final[str] = (
    "ROC-AUC is not computed in PromQL (it pairs adjacent histogram buckets). The controller's roc-auc gate and this "
    "page compute it from model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1d with "
    "rollout.core.drift.roc_auc_from_prometheus_buckets; the gate's numbers are in the panel beside this one and in "
    "`rolloutctl status`."
)


ROLLOUT = Section(
    "rollout",
    "Rollout and alerts",
    (
        Panel(
            "stage",
            "Current stage",
            "stat",
            "none",
            (
                _q("max by (rollout, stage) (fraudwatch_rollout_stage == 1)", "controller: {{stage}}"),
                _q(
                    "max by (stage, stable, candidate) (fraudwatch_router_routing_info == 1)",
                    "router: {{stage}} · stable {{stable}} · candidate {{candidate}}",
                ),
            ),
            "The controller's stage of the current rollout, and the routing table the routers hold.",
            show_name=True,
        ),
        Panel(
            "weight",
            "Candidate weight (% of decisions)",
            "stat",
            "none",
            (
                _q("max by (rollout) (fraudwatch_rollout_candidate_weight)", "controller"),
                _q("max(fraudwatch_router_candidate_weight)", "routers"),
            ),
        ),
        Panel(
            "gates",
            "Gate results (current stage)",
            "table",
            "none",
            (_q("max by (gate, result) (fraudwatch_rollout_gate_result == 1)", "{{gate}}: {{result}}"),),
        ),
        Panel(
            "gate-evidence",
            "Gate evidence (current stage)",
            "table",
            "none",
            (
                _q(
                    "max by (gate, value) (fraudwatch_rollout_gate_value"
                    '{value=~"estimate|interval_low|interval_high|samples|samples_needed"})',
                    "{{gate}}: {{value}}",
                ),
            ),
            "Per gate: the estimate (candidate − stable for a relative gate), its interval at the gate's confidence, "
            "the samples it used (fraud labels for recall, flagged labels for precision, requests for health) and "
            "about how many more it needs before a decision (samples_needed; none once decided).",
        ),
        Panel(
            "alerts",
            "Alerts firing or pending",
            "table",
            "none",
            (
                _q(
                    "max by (alertname, alertstate, severity, layer, model_version) (ALERTS)",
                    "{{alertname}} · {{alertstate}} · {{severity}} · {{model_version}}",
                ),
            ),
            "Prometheus' ALERTS series; each alert's runbook is runbooks/<alertname>.md.",
        ),
        Panel(
            "model-age",
            "Model age (since training)",
            "table",
            "s",
            (
                _q(
                    "time() - max by (model_version) (fraudwatch_model_trained_timestamp_seconds)",
                    "{{model_version}}",
                ),
            ),
            "How long ago each version in service was trained; FraudwatchModelStale fires when the newest is older"
            " than 14 days (twice the weekly retraining cadence).",
        ),
        Panel(
            "recent-alerts",
            "Alerts fired in the last 6 hours",
            "table",
            "none",
            (
                _q(
                    'max by (alertname, severity) (max_over_time(ALERTS{alertstate="firing"}[6h]))',
                    "{{alertname}} · {{severity}}",
                ),
            ),
        ),
    ),
)


SERVICE_HEALTH = Section(
    "service-health",
    "Service health",
    (
        Panel(
            "latency",
            "Latency p50 / p95 / p99 per version (router, deciding calls)",
            "timeseries",
            "s",
            tuple(
                _q(
                    f"histogram_quantile({q}, sum by (model_version, le) "
                    '(rate(fraudwatch_router_request_duration_seconds_bucket{role="decider"}[5m])))',
                    f"p{round(q * 100)} {{{{model_version}}}}",
                )
                for q in (0.5, 0.95, 0.99)
            ),
        ),
        Panel(
            "errors",
            "Error rate per version",
            "timeseries",
            "percentunit",
            (
                _q("model_version_role:fraudwatch_router_error_ratio:ratio_rate5m", "{{model_version}} {{role}}"),
                _q(
                    'sum(rate(fraudwatch_router_responses_total{code="5xx"}[5m])) '
                    "/ (sum(rate(fraudwatch_router_responses_total[5m])) > 0)",
                    "clients (5xx)",
                ),
            ),
            "Failed calls (5xx, timeout, unreachable) per model version as the router saw them; clients' 5xx.",
        ),
        Panel(
            "throughput",
            "Throughput per version",
            "timeseries",
            "reqps",
            (_q("model_version_role:fraudwatch_router_requests:rate5m", "{{model_version}} {{role}}"),),
        ),
    ),
)


INPUT_DRIFT = Section(
    "input-drift",
    "Input drift",
    (
        Panel(
            "psi-1h",
            "PSI per request feature (1 h)",
            "timeseries",
            "short",
            (
                _q(
                    f'model_version_feature:fraudwatch_psi:1h{{feature!~"score|{"|".join(VELOCITY_FEATURES)}"}}',
                    "{{model_version}} {{feature}}",
                ),
            ),
            "Population stability index against the training reference; > 0.1 moderate, > 0.25 major shift. The "
            "velocity features have their own panel below.",
        ),
        Panel(
            "psi-5m",
            "PSI per feature (5 min, the gates' window)",
            "timeseries",
            "short",
            (_q('model_version_feature:fraudwatch_psi:5m{feature!="score"}', "{{model_version}} {{feature}}"),),
        ),
        Panel(
            "store-fallbacks",
            "Feature-store fallbacks (defaults served)",
            "timeseries",
            "reqps",
            (
                _q(
                    "sum by (model_version, reason) (rate(fraudwatch_feature_store_fallback_total[5m]))",
                    "{{model_version}} {{reason}}",
                ),
            ),
        ),
        Panel(
            "velocity-psi-1h",
            "PSI of the velocity features (1 h)",
            "timeseries",
            "short",
            (
                _q(
                    f'model_version_feature:fraudwatch_psi:1h{{feature=~"{"|".join(VELOCITY_FEATURES)}"}}',
                    "{{model_version}} {{feature}}",
                ),
            ),
            "The online store's features against the training reference: a bot-farm burst or a stalled store "
            "(every velocity feature at its default) shows here first.",
        ),
        Panel(
            "online-freshness",
            "Online store freshness (p95 feature age, p95 update lag)",
            "timeseries",
            "s",
            (
                _q(
                    "histogram_quantile(0.95, sum by (model_version, le) "
                    "(rate(fraudwatch_online_store_feature_age_seconds_bucket[5m])))",
                    "age p95 {{model_version}}",
                ),
                _q(
                    "histogram_quantile(0.95, sum by (model_version, le) "
                    "(rate(fraudwatch_online_store_update_lag_seconds_bucket[5m])))",
                    "lag p95 {{model_version}}",
                ),
            ),
            "Age: how far the store's newest event is behind a request reading it. Lag: from a scored request to "
            "its event written. FraudwatchOnlineFeaturesStale fires on either.",
        ),
        Panel(
            "online-fallbacks",
            "Online store: velocity defaults served, events dropped",
            "timeseries",
            "reqps",
            (
                _q(
                    "sum by (model_version, reason) (rate(fraudwatch_online_store_fallback_total[5m]))",
                    "defaults {{model_version}} {{reason}}",
                ),
                _q(
                    "sum by (model_version, reason) (rate(fraudwatch_online_store_dropped_total[5m]))",
                    "dropped {{model_version}} {{reason}}",
                ),
            ),
        ),
    ),
)


OUTPUT_DRIFT = Section(
    "output-drift",
    "Output drift",
    (
        Panel(
            "score-quantiles",
            "Score distribution (p50 / p90 / p99 per version)",
            "timeseries",
            "short",
            tuple(
                _q(
                    f"histogram_quantile({q}, sum by (model_version, le) (rate(fraudwatch_score_bucket[5m])))",
                    f"p{round(q * 100)} {{{{model_version}}}}",
                )
                for q in (0.5, 0.9, 0.99)
            ),
        ),
        Panel(
            "score-psi",
            "Score PSI (1 h)",
            "timeseries",
            "short",
            (_q('model_version_feature:fraudwatch_psi:1h{feature="score"}', "{{model_version}}"),),
        ),
        Panel(
            "decision-rate",
            "Decision rate (share sent to review)",
            "timeseries",
            "percentunit",
            (_q("model_version:fraudwatch_review_decision_ratio:ratio_rate5m", "{{model_version}}"),),
        ),
        Panel(
            "shadow-agreement",
            "Shadow agreement (same decision as stable)",
            "timeseries",
            "percentunit",
            (_q("stable_candidate:fraudwatch_shadow_agreement:ratio5m", "{{stable}} vs {{candidate}}"),),
        ),
    ),
)


OUTCOMES = Section(
    "outcomes",
    "Outcomes",
    (
        Panel(
            "precision",
            "Precision per version (labels of the last day)",
            "timeseries",
            "percentunit",
            (_q("model_version_role:fraudwatch_outcome_precision:ratio1d", "{{model_version}} {{role}}"),),
        ),
        Panel(
            "recall",
            "Recall per version (labels of the last day)",
            "timeseries",
            "percentunit",
            (_q("model_version_role:fraudwatch_outcome_recall:ratio1d", "{{model_version}} {{role}}"),),
        ),
        Panel(
            "calibration",
            "Calibration error (ECE, labels of the last day)",
            "timeseries",
            "short",
            (_q("model_version_role:fraudwatch_calibration_error:ece1d", "{{model_version}} {{role}}"),),
        ),
        Panel(
            "labels",
            "Labels joined per version (last day)",
            "table",
            "short",
            (
                _q(
                    "sum by (model_version, role) (model_version_role_outcome:fraudwatch_outcome:increase1d)",
                    "{{model_version}} {{role}}",
                ),
            ),
        ),
        Panel(
            "paired-recall",
            "Paired recall difference, candidate − stable (labels of the last day, by prediction stage)",
            "table",
            "short",
            (
                _q(
                    "stable_candidate_stage:fraudwatch_outcome_paired_recall_difference:ratio1d",
                    "{{candidate}} − {{stable}} in {{stage}}",
                ),
                _q(
                    "stable_candidate_stage:fraudwatch_outcome_paired_fraud_labels:increase1d",
                    "fraud labels both scored, {{stage}}",
                ),
            ),
            "Labelled requests both versions scored (shadow; full with the old version in shadow): frauds only the "
            "candidate caught minus frauds only stable caught, over the paired frauds (the sample beside it).",
        ),
        Panel(
            "roc-auc",
            "ROC-AUC per version (labels of the last day)",
            "auc",
            "short",
            (
                _q(
                    "model_version_role_label_le:fraudwatch_outcome_score_bucket:increase1d",
                    "{{model_version}} {{role}}",
                ),
            ),
            ROC_AUC_NOTE,
        ),
        Panel(
            "roc-auc-gate",
            "ROC-AUC gate (controller)",
            "table",
            "short",
            (_q('max by (value) (fraudwatch_rollout_gate_value{gate="roc-auc"})', "{{value}}"),),
        ),
    ),
)


#: The page, top to bottom: the rollout and alerts, then the four monitoring layers.
SECTIONS: Final[tuple[Section, ...]] = (ROLLOUT, SERVICE_HEALTH, INPUT_DRIFT, OUTPUT_DRIFT, OUTCOMES)


#: The four monitoring layers (each one row of the Grafana dashboard and one section of the page).
LAYER_SECTIONS: Final[tuple[Section, ...]] = (SERVICE_HEALTH, INPUT_DRIFT, OUTPUT_DRIFT, OUTCOMES)


def legend(template: str, labels: Labels) -> str:
    """Grafana's legend format: ``{{name}}`` → the label's value. A `` · ``-separated part whose placeholders are
    all absent or empty is left out (``{{alertname}} · {{model_version}}`` without a version → the alert's name)."""
    parts = []
    for part in template.split(LEGEND_SEPARATOR):
        names = _LEGEND.findall(part)
        if names and not any(labels.get(name) for name in names):
            continue
        parts.append(_LEGEND.sub(lambda m: labels.get(m.group(1), ""), part).strip())
    return LEGEND_SEPARATOR.join(p for p in parts if p)
