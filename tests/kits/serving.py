"""Real ``bentoml serve`` processes of the scoring service on 127.0.0.1, not yet started."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from rollout.core.routing import RoutingTable, VersionEndpoint
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from service.artifacts.bundle import read_manifest
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


#: The prediction log's database setting, named through its settings class so a renamed prefix cannot silently miss.
DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"


@contextmanager
def one_version_behind_a_router(
    home: Path, bundle_dir: Path, server_env: Mapping[str, str], router_env: Mapping[str, str]
) -> Iterator[tuple[BentoServer, RouterProcess]]:
    """A real ``bentoml serve`` of ``bundle_dir`` as the stable version of a real router process in production mode
    (``expose_decision_details`` off), the router ready (its stable answered); both stopped at the end."""
    server = scoring_server(home / "v1", bundle_dir, "v1", server_env)
    routing_file = home / "routing.json"
    router = RouterProcess(
        log_path=home / "router.log",
        routing_file=routing_file,
        expose_decision_details=None,
        env={DSN_ENV: f"sqlite:///{home / 'predictions.db'}", **router_env},
    )
    with server:
        stable = VersionEndpoint(version=read_manifest(bundle_dir).version, url=server.url)
        table = RoutingTable.model_validate({"generation": 1, "stage": "stable", "stable": stable.model_dump()})
        write_table_file(routing_file, table)
        with router:
            wait_ready(router.url)
            yield server, router


def wait_ready(url: str) -> None:
    """Until the router at ``url`` says ready (``START_TIMEOUT_S`` at most)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=START_TIMEOUT_S, trust_env=False) as client:
        while client.get("/readyz").status_code != httpx.codes.OK:
            assert time.monotonic() < deadline, f"router {url} not ready within {START_TIMEOUT_S} s"
            time.sleep(0.1)
