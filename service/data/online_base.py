"""The online store's protocol and the types its implementations share (service/data/online_store.py describes the
store; service/data/online_redis.py and online_sqlite.py implement it). A module of its own so that the
implementations import it and not the module that opens them (no import cycle)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.data import velocity as v

Event = v.RefundEvent | v.LabelEvent


@dataclass(frozen=True)
class Readings:
    """A store's answer to a batch of queries: one raw reading each, and the newest event time it has applied."""

    readings: list[v.Reading]
    watermark_ms: int | None


@dataclass(frozen=True)
class WriteResult:
    applied: int
    duplicates: int


class OnlineStore(Protocol):
    """Velocity state by entity (see service/data/velocity.py). ``read`` gives up with :class:`StoreTimeoutError` once
    ``timeout_s`` has passed; ``write`` applies each event once (by its ID) and may take its time."""

    def read(self, queries: Sequence[v.RefundEvent], timeout_s: float) -> Readings: ...

    def write(self, events: Sequence[Event]) -> WriteResult: ...

    def close(self) -> None: ...
