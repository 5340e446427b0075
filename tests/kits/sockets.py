"""Loopback socket faults for tests (real sockets, no mock)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def unaccepting_listener(host: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """A listener with a backlog of 0 whose accept queue is filled by connections it never accepts: the kernel drops
    every further SYN, so a client's connect hangs until its own connect timeout (what a busy node's full accept
    queue, or a black-holed database address, does)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(4):  # the queue holds backlog + 1; the others stay half-open
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(address)
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield str(address[0]), int(address[1])
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def connection_refused(url: str) -> bool:
    """True when nothing listens at ``url`` any more (a connect is refused); False when something answers or the
    connection fails otherwise."""
    try:
        httpx.get(url + "/readyz", timeout=2.0, trust_env=False)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        return False
    return False
