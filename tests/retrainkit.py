"""Test support for retraining: the frozen regression set's path, and the hand-off protocol answered in memory.

:class:`RecordingHandoff` stands in for delivery only where a test is about the model side (window, gates,
registry); the real hand-offs — ``rolloutctl`` against a real controller, the ModelRollout patch against a real
API server — are tested in tests/unit/test_retrain.py, tests/integration/test_retrain_e2e.py and
tests/e2e/test_retrain_handoff.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.retraining.handoff import Candidate, HandoffOutcome, HandoffResult

ROOT = Path(__file__).resolve().parents[1]
#: The frozen labelled regression set of tests/quality (20,000 requests, the new bot farm from day 15).
FROZEN_SET = ROOT / "tests" / "quality" / "data" / "frozen_synthetic.json"


@dataclass
class RecordingHandoff:
    """:class:`service.retraining.handoff.RolloutHandoff` in memory: records each call, answers ``outcome``."""

    outcome: HandoffOutcome = HandoffOutcome.STARTED
    calls: list[tuple[Candidate, str, str]] = field(default_factory=list)
    via: str = "recording"

    def start(self, candidate: Candidate, *, request_id: str, reason: str) -> HandoffResult:
        self.calls.append((candidate, request_id, reason))
        return HandoffResult(self.outcome, self.via, request_id, "recorded")
