"""Integration fixtures: real ``bentoml serve`` processes of the scoring service on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from service.serving.process import BentoServer
from service.settings import Settings

#: Deadline for a server to become ready (generous: other jobs share the 2 cores).
START_TIMEOUT_S = 180.0


def server_settings(home: Path) -> Settings:
    return Settings.model_validate({"home": home, "process": {"start_timeout_s": START_TIMEOUT_S}})


def scoring_server(home: Path, model_dir: Path, name: str, env: Mapping[str, str]) -> BentoServer:
    """A not yet started ``bentoml serve service.serving.bento:RefundFraudService`` for ``model_dir``."""
    return BentoServer(model_dir=model_dir, settings=server_settings(home), name=name, extra_env=dict(env))


@pytest.fixture(scope="module")
def served_model(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    """The scoring service on the session's bundle with TWO workers (metrics must add up across them), small
    body and batch limits so the limit tests stay cheap; started once per module, always stopped. The feature-store
    budget is generous: these tests compare scores, and a lookup over its budget on a loaded machine would
    (correctly) fall back to the defaults; the budget itself is tested in tests/unit/test_featurestore.py."""
    env = {
        "FW_SERVE__WORKERS": "2",
        "FW_SERVE__FEATURE_STORE_TIMEOUT_MS": "5000",
        "FW_SERVE__MAX_BODY_BYTES": "65536",
        "FW_SERVE__MAX_BATCH_ITEMS": "50",
        "FW_LOG_LEVEL": "INFO",
    }
    server = scoring_server(tmp_path_factory.mktemp("serve-home"), bundle_dir, "scoring", env)
    with server:
        yield server
