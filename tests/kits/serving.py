"""Real ``bentoml serve`` processes of the scoring service on 127.0.0.1, not yet started."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from service.serving.process import BentoServer
from service.settings import Settings

#: Deadline for a server to become ready (generous: other jobs share the 2 cores).
START_TIMEOUT_S = 180.0


def server_settings(home: Path) -> Settings:
    return Settings.model_validate({"home": home, "process": {"start_timeout_s": START_TIMEOUT_S}})


def scoring_server(home: Path, model_dir: Path, name: str, env: Mapping[str, str]) -> BentoServer:
    """A not yet started ``bentoml serve service.serving.bento:RefundFraudService`` for ``model_dir``."""
    return BentoServer(model_dir=model_dir, settings=server_settings(home), name=name, extra_env=dict(env))


#: The stand-in Bento services of tests/integration/bento_fixture.py (no model: start, stop and failure paths).
FIXTURE = "tests.integration.bento_fixture"


def fixture_settings(home: Path, target: str, start_timeout_s: float = 120.0) -> Settings:
    """Settings that serve ``target``, one of :data:`FIXTURE`'s services, instead of the scoring service."""
    return Settings.model_validate(
        {"home": home, "process": {"bento_target": f"{FIXTURE}:{target}", "start_timeout_s": start_timeout_s}}
    )
