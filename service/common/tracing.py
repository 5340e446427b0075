"""W3C Trace Context (``traceparent``, https://www.w3.org/TR/trace-context/) without a tracing SDK: parse the
header a caller sent, start this hop's span under it, and format the header for the next hop.

The router does this on every request (a header parse and 8 random bytes: no SDK import on the request path), so a
trace started by a client, or by the router when the client sent none, reaches the model service, which logs its
trace and parent span with each decision (``trace_id``, ``parent_span_id``; the router's decision line has its
``trace_id`` and ``span_id``), so one trace can be followed from the client to the deciding model.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

TRACEPARENT_HEADER: Final[str] = "traceparent"
TRACESTATE_HEADER: Final[str] = "tracestate"
#: Version 00: ``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``; a later version may append fields.
_TRACEPARENT: Final = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_INVALID_VERSION: Final[str] = "ff"
_VERSION: Final[str] = "00"
_ZERO_TRACE: Final[str] = "0" * 32
_ZERO_SPAN: Final[str] = "0" * 16
#: Flags of a trace this hop starts: sampled (the router records every request it answers).
_SAMPLED: Final[str] = "01"
#: The longest ``tracestate`` passed on (the W3C limit is 32 members; 512 characters is what it asks to keep).
MAX_TRACESTATE_CHARS: Final[int] = 512


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's place in a trace: ``parent_id`` is the span that called it (None for a trace's root)."""

    trace_id: str
    span_id: str
    flags: str = _SAMPLED
    parent_id: str | None = None

    @property
    def traceparent(self) -> str:
        """The header to send to the next hop (this span as its parent)."""
        return f"{_VERSION}-{self.trace_id}-{self.span_id}-{self.flags}"

    @property
    def sampled(self) -> bool:
        return int(self.flags, 16) & 1 == 1


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The caller's span from a ``traceparent`` header, or None when absent or invalid (the spec's rules: version
    ff, an all-zero trace or span ID, version 00 with extra fields, upper-case hex are invalid)."""
    if value is None:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == _INVALID_VERSION or (version == _VERSION and rest) or trace_id == _ZERO_TRACE:
        return None
    if span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id=trace_id, span_id=span_id, flags=flags)


def new_span_id() -> str:
    return secrets.token_hex(8)


def child_span(caller: TraceContext | None) -> TraceContext:
    """This hop's span: a child of ``caller`` (same trace and flags), or the root of a new sampled trace."""
    if caller is None:
        return TraceContext(trace_id=secrets.token_hex(16), span_id=new_span_id())
    return TraceContext(trace_id=caller.trace_id, span_id=new_span_id(), flags=caller.flags, parent_id=caller.span_id)


def passed_tracestate(value: str | None) -> str | None:
    """The ``tracestate`` to pass on unchanged, or None (absent, or longer than :data:`MAX_TRACESTATE_CHARS`)."""
    if value is None or not value or len(value) > MAX_TRACESTATE_CHARS:
        return None
    return value
