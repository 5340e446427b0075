"""Shared fixtures: a small, real model bundle (booster + manifest + feature store) built once per session."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.kits.bundles import build_small_bundle


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the run and the processes it starts even when it was launched with SIGINT ignored (``nohup``,
    ``cmd &`` in a shell without job control): an ignored disposition is inherited across exec, so the tests that
    interrupt a demo, a rollout or a server would otherwise send a signal nobody hears. A handler is not inherited:
    children start with the default and install their own."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ready model bundle directory (``model.ubj``, ``manifest.json``, ``features.sqlite``); do not modify."""
    directory = tmp_path_factory.mktemp("bundle") / "model"
    build_small_bundle(directory)
    return directory
