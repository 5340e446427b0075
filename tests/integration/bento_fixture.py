"""A minimal BentoML service for testing :mod:`service.serving.process` without a trained model.

It reports the model directory it was started with, so a test can see the environment reached the child.
"""

from __future__ import annotations

import os

import bentoml

from service.serving.process import MODEL_DIR_ENV


@bentoml.service
class EchoService:
    @bentoml.api  # type: ignore[untyped-decorator]
    def model_dir(self) -> str:
        return os.environ.get(MODEL_DIR_ENV, "")


@bentoml.service
class NeverReadyService:
    def __is_ready__(self) -> bool:
        return False

    @bentoml.api  # type: ignore[untyped-decorator]
    def ping(self) -> str:
        return "pong"


@bentoml.service
class DeadService:
    """Alive-check fails, as the scoring service's does when its model cannot be loaded."""

    def __is_ready__(self) -> bool:
        return False

    def __is_alive__(self) -> bool:
        return False

    @bentoml.api  # type: ignore[untyped-decorator]
    def ping(self) -> str:
        return "pong"
