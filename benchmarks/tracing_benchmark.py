"""Tracing's cost in the router (rollout/router/otel.py), all variants in the same run on this machine:

* import: seconds to import what each tracer needs, each in a fresh interpreter (median of ``--imports`` runs):
  the router's module alone, and the OpenTelemetry SDK + OTLP/HTTP exporter that ``otlp_endpoint`` adds;
* request path: CPU microseconds per request of what the router does per request for tracing — start the span
  (parse the client's ``traceparent``), build the upstream headers, end the span — for ``trace_context`` off, on
  (IDs only, the default) and with OpenTelemetry spans (the SDK's BatchSpanProcessor in front of an exporter that
  drops the batches, so export I/O is left out: it runs on the SDK's own thread), interleaved over ``--rounds``.

Usage: ``python benchmarks/tracing_benchmark.py [--requests 20000 --rounds 5 --imports 5]``; writes JSON to
``--out`` (default ``var/benchmarks/tracing.json``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

ROOT: Final[Path] = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from rollout.router.app import upstream_headers  # noqa: E402
from rollout.router.otel import ContextTracer, NoTracer, OtelTracer, RequestTracer  # noqa: E402

CLIENT_TRACEPARENT: Final[str] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SPAN_NAME: Final[str] = "POST /api/v1/refund-predict"
IMPORTS: Final[dict[str, str]] = {
    "router_app": "import rollout.router.app",
    "otel_sdk_and_otlp_exporter": "import opentelemetry.sdk.trace, opentelemetry.sdk.trace.export, "
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}


class DroppingExporter(SpanExporter):
    """Takes every batch and drops it: the SDK's work without the network."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def import_seconds(statement: str, runs: int) -> float:
    """Median wall seconds of ``python -c statement`` minus an empty interpreter's start (same runs, interleaved)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def timed(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
        return time.perf_counter() - started

    samples = [timed(statement) - timed("pass") for _ in range(runs)]
    return statistics.median(samples)


def per_request_us(tracer: RequestTracer, n: int) -> float:
    """CPU microseconds per request of the router's tracing work."""
    started = time.process_time()
    for _ in range(n):
        span = tracer.start(CLIENT_TRACEPARENT, SPAN_NAME)
        upstream_headers("cid", span.context, "vendor=abc")
        span.end(200)
    return (time.process_time() - started) / n * 1e6


def variants() -> tuple[dict[str, Callable[[], RequestTracer]], DroppingExporter]:
    exporter = DroppingExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "benchmark"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    otel = OtelTracer("http://unused", provider=provider)
    return {"off": NoTracer, "trace_context": ContextTracer, "otel_spans": lambda: otel}, exporter


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--imports", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "benchmarks" / "tracing.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    factories, exporter = variants()
    tracers = {name: factory() for name, factory in factories.items()}
    samples: dict[str, list[float]] = {name: [] for name in tracers}
    for round_index in range(args.rounds):
        order = list(tracers)[round_index % len(tracers) :] + list(tracers)[: round_index % len(tracers)]
        for name in order:
            samples[name].append(per_request_us(tracers[name], args.requests))
    for tracer in tracers.values():
        tracer.shutdown()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "request_path_cpu_us_median": {name: round(statistics.median(v), 2) for name, v in samples.items()},
        "spans_exported": exporter.exported,
        "import_s_median": {name: round(import_seconds(code, args.imports), 3) for name, code in IMPORTS.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
