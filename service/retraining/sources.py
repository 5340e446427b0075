"""What every retrain source shares (:mod:`service.retraining.job`'s ``stream`` and
:mod:`service.retraining.log_source`'s ``feature_log``): the window a run used, the version trained on it before the
regression set, the progress observer, and the errors that end a run before training."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.common.logging import get_logger, log_event
from service.settings import Settings
from service.training.evaluate import GateReport

if TYPE_CHECKING:
    from service.artifacts.registry import ModelRegistry, RunPayload

logger = get_logger(__name__)


class InsufficientDataError(RuntimeError):
    """The window holds too few labelled rows or frauds to train (or recalibrate) on."""


class LabelSourceMissingError(RuntimeError):
    """``FW_RETRAIN__SOURCE=feature_log`` without a prediction log to read the labels from."""


class Observer(Protocol):
    """Progress reporting (the CLI's rich observer; :class:`QuietObserver` elsewhere)."""

    def step(self, title: str) -> AbstractContextManager[None]: ...


class QuietObserver:
    """Logs each step as a JSON line instead of drawing it."""

    @contextmanager
    def _step(self, title: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        log_event(logger, "retrain step", step=title, seconds=round(time.perf_counter() - started, 3))

    def step(self, title: str) -> AbstractContextManager[None]:
        return self._step(title)


@dataclass(frozen=True)
class WindowInfo:
    """The rows a retrain used: ``start`` < timestamp ≤ ``end``."""

    days: float
    start: str
    end: str
    rows: int
    positives: int
    unlabelled_dropped: int
    #: ``stream`` (the labelled refund stream) or ``feature_log`` (what serving saw, labels as of ``as_of``).
    source: str = "stream"
    as_of: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Fitted:
    """A version trained from the retrain's source, before the regression set: its run and test-window gate."""

    payload: RunPayload
    test_gate: GateReport
    engine: str


class TrainingData(Protocol):
    """A retrain's window, whatever its source, and how to train a version on it."""

    @property
    def window(self) -> WindowInfo: ...

    @property
    def engine(self) -> str: ...

    def train(
        self, settings: Settings, name: str, out_dir: Path, registry: ModelRegistry, observer: Observer
    ) -> Fitted: ...


def window_tags(window: WindowInfo) -> dict[str, str]:
    tags = {
        "data_source": window.source,
        "window_start": window.start,
        "window_end": window.end,
        "window_rows": str(window.rows),
        "window_positives": str(window.positives),
    }
    if window.as_of:
        tags["window_as_of"] = window.as_of
    return tags
