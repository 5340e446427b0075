"""A connection the upstream never accepts is a connect failure, not a slow answer (issue 12, point 4).

Real loopback sockets, no mock: a listener with a backlog of 0 whose accept queue is filled by connections it never
accepts, so the kernel drops the next SYN and the router's connect waits until its connect timeout — what a busy
node's full accept queue does. Both transports must report ``connect``/"connect timeout", and only once the
connect timeout (not the call's whole budget) has passed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator

import pytest

from rollout.router.upstream import CONNECT_TIMEOUT_DETAIL, AiohttpTransport, Failure, HttpxTransport
from rollout.settings import RouterSettings
from tests.sockets import unaccepting_listener

CONNECT_TIMEOUT_S = 0.2
BUDGET_S = 2.0


@pytest.fixture
def unaccepting() -> Iterator[str]:
    """The URL of a listener whose accept queue is full (every further connect hangs in SYN_SENT)."""
    with unaccepting_listener() as (host, port):
        yield f"http://{host}:{port}"


@pytest.mark.parametrize("transport_class", [AiohttpTransport, HttpxTransport])
def test_a_connection_never_accepted_fails_as_connect_after_the_connect_timeout(
    unaccepting: str, transport_class: type[AiohttpTransport] | type[HttpxTransport]
) -> None:
    settings = RouterSettings(connect_timeout_s=CONNECT_TIMEOUT_S)

    async def call() -> tuple[object, float]:
        transport = transport_class(unaccepting, settings, ssl.create_default_context())
        started = time.perf_counter()
        try:
            result = await transport.post_raw("/api/v1/refund-predict", b"{}", {}, BUDGET_S)
            return result, time.perf_counter() - started
        finally:
            await transport.aclose()

    result, took = asyncio.run(call())
    assert isinstance(result, Failure), result
    assert (result.reason, result.detail) == ("connect", CONNECT_TIMEOUT_DETAIL)
    assert CONNECT_TIMEOUT_S * 0.9 <= took < BUDGET_S  # the connect timeout ended it, not the call's budget


def test_the_default_connect_timeout_is_not_a_busy_machines_scheduling_delay() -> None:
    assert RouterSettings().connect_timeout_s >= 1.0
