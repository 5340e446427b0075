"""The rollout demo's policy (``rollout/demo/demo_policy.yaml``, packaged) and its time compression.

The demo policy is the default policy's gates with stages of seconds (the YAML says where it differs and why).
:func:`time_scaled` multiplies every stage's minimum duration — ``fraudwatch-demo`` applies
``FW_ROLLOUT_DEMO__TIME_SCALE`` (1.0 by default), tests compress further — and nothing else: the evidence
minimums (requests, labels) and the analysis timings stay as written, so a faster run is judged on the same
evidence.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from rollout.core.policy import TRAFFIC_STAGES, RolloutPolicy, loads_policy

DEMO_POLICY_RESOURCE: Final[str] = "demo_policy.yaml"


def demo_policy_text() -> str:
    return resources.files("rollout.demo").joinpath(DEMO_POLICY_RESOURCE).read_text(encoding="utf-8")


def time_scaled(policy: RolloutPolicy, scale: float) -> RolloutPolicy:
    """``policy`` with every stage's ``min_duration_s`` multiplied by ``scale`` (> 0)."""
    if not scale > 0.0:
        raise ValueError(f"the time scale must be > 0, got {scale}")
    stages = policy.stages.model_copy(
        update={
            stage: policy.stages.of(stage).model_copy(
                update={"min_duration_s": round(policy.stages.of(stage).min_duration_s * scale, 3)}
            )
            for stage in TRAFFIC_STAGES
        }
    )
    return RolloutPolicy.model_validate({**policy.model_dump(), "stages": stages.model_dump()})


def load_demo_policy(scale: float = 1.0) -> RolloutPolicy:
    """The packaged demo policy, its stage minimums scaled by ``scale``."""
    return time_scaled(loads_policy(demo_policy_text()), scale)
