"""How a retrain ends, and its ids: the small vocabulary the retraining webhook and the CLI share with the retrain.

Kept apart from :mod:`service.retraining.job` so the webhook (which only starts retrains as subprocesses and reads their
summaries) imports no training code: no pandas, scikit-learn, XGBoost or MLflow in its process.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

#: Longest reason kept in run tags, challenger descriptions and hand-offs.
MAX_REASON_CHARS: Final[int] = 500


class RetrainOutcome(StrEnum):
    """How a retrain (or recalibration) ended; the CLI's exit code and the webhook's run metric follow it."""

    ROLLOUT_STARTED = "rollout_started"
    REGISTERED = "registered"  # challenger registered, no hand-off asked for
    ROLLOUT_NOT_STARTED = "rollout_not_started"  # challenger registered; delivery refused or did not answer
    QUALITY_GATE_FAILED = "quality_gate_failed"
    NO_IMPROVEMENT = "no_improvement"  # recalibration: the held-out calibration error did not improve
    INSUFFICIENT_DATA = "insufficient_data"
    FAILED = "failed"


#: Outcomes after which nothing is wrong with the retraining path (a challenger was made, or a recalibration was
#: rightly not shipped); any other outcome keeps ``FraudwatchRetrainFailed`` firing until a run succeeds.
SUCCESSFUL_OUTCOMES: Final[frozenset[str]] = frozenset(
    {RetrainOutcome.ROLLOUT_STARTED.value, RetrainOutcome.REGISTERED.value, RetrainOutcome.NO_IMPROVEMENT.value}
)


def new_retrain_id(kind: str, now: datetime | None = None, salt: str | None = None) -> str:
    """``<kind>-<UTC time>-<hash>``: safe as a rolloutctl command id, an MLflow tag and a file name (unique: the
    hash covers a random salt unless one is given)."""
    at = (now or datetime.now(UTC)).astimezone(UTC)
    salt = uuid.uuid4().hex if salt is None else salt
    digest = hashlib.sha256(f"{kind}|{at.isoformat()}|{salt}".encode()).hexdigest()[:8]
    return f"{kind}-{at.strftime('%Y%m%dT%H%M%SZ')}-{digest}"


def trigger_reason(alerts: Sequence[Mapping[str, str]]) -> str:
    """A short audit reason naming the alerts that triggered a retrain."""
    names = sorted({f"{a.get('alertname', '?')}({a.get('layer', '?')})" for a in alerts})
    return ("alerts: " + ", ".join(names))[:MAX_REASON_CHARS]
