"""W3C Trace Context without an SDK (service/common/tracing.py) and the router's upstream headers."""

from __future__ import annotations

import pytest

from rollout.router.app import upstream_headers
from service.common.tracing import (
    MAX_TRACESTATE_CHARS,
    TraceContext,
    child_span,
    parse_traceparent,
    passed_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_parsed() -> None:
    parsed = parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert parsed == TraceContext(trace_id=TRACE, span_id=SPAN, flags="01")
    assert parsed is not None and parsed.sampled
    later_version = parse_traceparent(f"cc-{TRACE}-{SPAN}-00-and-more")  # a later version may add fields
    assert later_version is not None and not later_version.sampled


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace ID
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent ID
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace ID
        "garbage",
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_a_child_span_keeps_the_trace_and_flags_under_a_new_span() -> None:
    caller = TraceContext(trace_id=TRACE, span_id=SPAN, flags="00")
    child = child_span(caller)
    assert (child.trace_id, child.flags, child.parent_id) == (TRACE, "00", SPAN)
    assert child.span_id != SPAN and len(child.span_id) == 16
    assert child.traceparent == f"00-{TRACE}-{child.span_id}-00"
    root = child_span(None)
    assert root.parent_id is None and root.sampled and len(root.trace_id) == 32
    assert parse_traceparent(root.traceparent) == TraceContext(trace_id=root.trace_id, span_id=root.span_id)


def test_the_upstream_headers_carry_the_span_and_the_clients_tracestate() -> None:
    span = child_span(parse_traceparent(f"00-{TRACE}-{SPAN}-01"))
    headers = upstream_headers("cid-1", span, "vendor=abc")
    assert headers["traceparent"] == span.traceparent
    assert headers["tracestate"] == "vendor=abc"
    assert headers["X-Correlation-ID"] == "cid-1"
    assert "tracestate" not in upstream_headers("cid-1", span, "v=" + "x" * MAX_TRACESTATE_CHARS)
    untraced = upstream_headers("cid-1", None, "vendor=abc")
    assert "traceparent" not in untraced and "tracestate" not in untraced
    assert passed_tracestate("") is None
