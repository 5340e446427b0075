"""The cost of a decision's reasons (service/serving/reasons.py) and of tracing (rollout/router/otel.py) beside the
baseline, all variants in the same run on this machine:

* reasons: CPU microseconds per scoring call of the model service's decide path (``Runtime.decide``: features,
  score, response) on one request — an approval (baseline), the same with ``explain``, a review with and without
  ``serve.reasons_on_review`` — interleaved over ``--rounds``, on ``--model-dir`` or a bundle trained here;

* import: seconds to import what each tracer needs, each in a fresh interpreter (median of ``--imports`` runs):
  the router's module alone, and the OpenTelemetry SDK + OTLP/HTTP exporter that ``otlp_endpoint`` adds;
* request path: CPU microseconds per request of what the router does per request for tracing — start the span
  (parse the client's ``traceparent``), build the upstream headers, end the span — for ``trace_context`` off, on
  (IDs only, the default) and with OpenTelemetry spans (the SDK's BatchSpanProcessor in front of an exporter that
  drops the batches, so export I/O is left out: it runs on the SDK's own thread), interleaved over ``--rounds``.

Usage: ``python benchmarks/extras_benchmark.py [--model-dir B --requests 20000 --scorings 2000 --rounds 5]``; writes
JSON to ``--out`` (default ``var/benchmarks/extras.json``) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
from prometheus_client import CollectorRegistry  # noqa: E402
from serving_benchmark import prepare_bundle  # noqa: E402  # (this directory is on sys.path when run)

from rollout.router.app import upstream_headers  # noqa: E402
from rollout.router.otel import ContextTracer, NoTracer, OtelTracer, RequestTracer  # noqa: E402
from service.api.schema import RefundRequest  # noqa: E402
from service.serving.bento import Runtime, load_runtime  # noqa: E402
from service.serving.metrics import Metrics  # noqa: E402
from service.settings import Settings  # noqa: E402

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


#: Candidates for the approval and the review of the reasons' rows (the first of each decision is used).
CANDIDATES: Final[tuple[RefundRequest, ...]] = tuple(
    RefundRequest(yearsActive=years, amount=amount, ipAccounts=ips, itemDescription=item)
    for years in (8.0, 2.0, 0.1, 0.01)
    for amount, ips, item in ((45.0, 2, "Pad Thai"), (1899.99, 1, "Laptop"), (500.0, 60, "Gift card"))
)


def runtime_of(model_dir: Path, work: Path, *, on_review: bool) -> Runtime:
    serve = {"model_dir": model_dir, "reasons_on_review": on_review}
    settings = Settings.model_validate({"home": work / "serve-home", "serve": serve})
    return load_runtime(settings, Metrics(registry=CollectorRegistry()))


def scoring_variants(model_dir: Path, work: Path) -> dict[str, Callable[[], object]]:
    """One decide() call per variant: approval (baseline), approval + explain, review with / without reasons."""
    loop = asyncio.new_event_loop()
    with_reasons, without = runtime_of(model_dir, work, on_review=True), runtime_of(model_dir, work, on_review=False)
    decided = loop.run_until_complete(without.decide(list(CANDIDATES), ["c"] * len(CANDIDATES)))
    approve = next(r for r, d in zip(CANDIDATES, decided, strict=True) if d.decision == "approve")
    review = next(r for r, d in zip(CANDIDATES, decided, strict=True) if d.decision == "review")
    explain = approve.model_copy(update={"explain": True})

    def call(runtime: Runtime, request: RefundRequest) -> Callable[[], object]:
        return lambda: loop.run_until_complete(runtime.decide([request], ["c"]))

    return {
        "approve": call(without, approve),
        "approve_explain": call(without, explain),
        "review_without_reasons": call(without, review),
        "review_with_reasons": call(with_reasons, review),
    }


def per_call_us(call: Callable[[], object], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - started) / n * 1e6


def interleaved(calls: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each variant's figure, the order rotating each round."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            samples[name].append(calls[name]())
    return {name: round(statistics.median(values), 2) for name, values in samples.items()}


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
    parser.add_argument("--scorings", type=int, default=2000, help="decide() calls per variant and round")
    parser.add_argument("--model-dir", type=Path, help="an existing bundle (default: one trained under --work)")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "benchmarks" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "benchmarks" / "extras.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    factories, exporter = variants()
    tracers = {name: factory() for name, factory in factories.items()}
    tracing = interleaved(
        {name: functools.partial(per_request_us, tracer, args.requests) for name, tracer in tracers.items()},
        args.rounds,
    )
    for tracer in tracers.values():
        tracer.shutdown()
    model_dir = prepare_bundle(args.model_dir, args.work, 20_000)
    scorings = scoring_variants(model_dir, args.work)
    reasons = interleaved(
        {name: functools.partial(per_call_us, call, args.scorings) for name, call in scorings.items()}, args.rounds
    )
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "rounds": args.rounds,
        "reasons_cpu_us_per_call_median": reasons,
        "scorings_per_round": args.scorings,
        "tracing_cpu_us_per_request_median": tracing,
        "requests_per_round": args.requests,
        "spans_exported": exporter.exported,
        "import_s_median": {name: round(import_seconds(code, args.imports), 3) for name, code in IMPORTS.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
