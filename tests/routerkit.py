"""Test support for the router: Prometheus text parsing, and an in-process stand-in model service (unit tests only).

The stand-in is a tiny Starlette app on a real uvicorn server in a background thread, on a port picked by binding
port 0. Its behaviour (answer, fail with 500, hang, answer garbage) can be switched while it runs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.api.schema import BatchRequest, RefundRequest

Mode = Literal["ok", "error", "slow", "garbage", "reject"]
LOOPBACK = "127.0.0.1"


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of every sample named ``name`` whose labels include ``labels`` (0.0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def metric_labels(text: str, name: str) -> list[dict[str, str]]:
    return [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def wait_until(predicate: object, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll ``predicate()`` until true; return the seconds it took; raise AssertionError after ``timeout_s``."""
    assert callable(predicate)
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@dataclass
class StandIn:
    """A fake model service: scores ``score`` (deterministic per version), or misbehaves per ``mode``."""

    version: str
    score: float
    threshold: float = 0.5
    mode: Mode = "ok"
    slow_s: float = 1.5
    port: int = 0
    seen: list[tuple[str | None, bytes]] = field(default_factory=list)
    #: Sizes of the batch calls received.
    batches: list[int] = field(default_factory=list)
    _server: uvicorn.Server | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def answer(self, cid: str | None) -> dict[str, object]:
        prediction = int(self.score >= self.threshold)
        return {
            "prediction": prediction,
            "confidence": self.score if prediction else 1.0 - self.score,
            "score": self.score,
            "decision": "review" if prediction else "approve",
            "threshold": self.threshold,
            "model_version": self.version,
            "correlation_id": cid,
        }

    def app(self) -> Starlette:
        async def predict(request: Request) -> Response:
            body = await request.body()
            cid = request.headers.get("x-correlation-id")
            self.seen.append((cid, body))
            if self.mode == "error":
                return JSONResponse({"error": "boom"}, status_code=500)
            if self.mode == "reject":
                return JSONResponse({"error": "invalid", "details": [{"field": "amount"}]}, status_code=422)
            if self.mode == "garbage":
                return Response(b"not json", media_type="text/plain")
            if self.mode == "slow":
                await asyncio.sleep(self.slow_s)
            RefundRequest.model_validate_json(body)
            return Response(json.dumps(self.answer(cid)).encode(), media_type="application/json")

        async def predict_batch(request: Request) -> Response:
            body = await request.body()
            batch = BatchRequest.model_validate_json(body)
            ids: list[str | None] = list(batch.correlation_ids or [])
            ids = ids or [request.headers.get("x-correlation-id")] * len(batch.requests)
            self.seen.extend((cid, body) for cid in ids)
            self.batches.append(len(ids))
            if self.mode == "error":
                return JSONResponse({"error": "boom"}, status_code=500)
            if self.mode == "slow":
                await asyncio.sleep(self.slow_s)
            payload = {"results": [self.answer(cid) for cid in ids], "model_version": self.version}
            return Response(json.dumps({**payload, "correlation_id": "batch"}).encode(), media_type="application/json")

        async def readyz(_request: Request) -> Response:
            return JSONResponse({"status": "ready"}, status_code=500 if self.mode == "error" else 200)

        return Starlette(
            routes=[
                Route("/api/v1/refund-predict", predict, methods=["POST"]),
                Route("/api/v1/refund-predict-batch", predict_batch, methods=["POST"]),
                Route("/readyz", readyz, methods=["GET"]),
            ]
        )

    def start(self) -> None:
        # host/port rather than a pre-bound socket: uvicorn serving a passed-in socket from a thread answers only
        # after ~40 ms per request here (a delayed-ACK stall), which would slow every test down.
        if self.port == 0:
            self.port = closed_port()
        config = uvicorn.Config(
            self.app(), host=LOOPBACK, port=self.port, log_level="warning", access_log=False, lifespan="off"
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: server.started, timeout_s=10.0)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)


@contextmanager
def stand_in(version: str, score: float, **kwargs: object) -> Iterator[StandIn]:
    server = StandIn(version=version, score=score, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, read back, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
