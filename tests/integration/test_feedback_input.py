"""The feedback endpoint's input handling, through the real router process (uvicorn) on loopback — issue 11 (4).

The feedback routes live on the router's control listener (``RouterProcess.control_url``) and take the label
feed's bearer token; these checks run as that authenticated feed.

* The body read is bounded before it is read: a declared ``Content-Length`` over the limit answers 413 with no
  byte of the body sent, and a chunked body answers 413 as soon as the streamed bytes pass the limit — while the
  client still holds the connection open, so a reader that waits for the whole body would never answer.
* Deeply nested JSON answers 400, not 500 (``json.loads`` raises RecursionError).

No model server is needed for these answers: the routing table points at a closed port.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout.core.routing import RoutingTable
from rollout.router.outcomes.feedback import FEEDBACK_PATH
from rollout.router.outcomes.settings import OutcomeSettings
from rollout.router.process import RouterProcess
from rollout.router.table_sources import write_table_file
from tests.routerkit import closed_port

pytestmark = pytest.mark.integration

DSN_ENV = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
LIMIT = OutcomeSettings().max_body_bytes
ANSWER_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    home = tmp_path_factory.mktemp("feedback-router")
    routing_file = home / "routing.json"
    table = RoutingTable.model_validate(
        {"generation": 1, "stage": "stable", "stable": {"version": "v1", "url": f"http://127.0.0.1:{closed_port()}"}}
    )
    write_table_file(routing_file, table)
    process = RouterProcess(
        log_path=home / "router.log",
        routing_file=routing_file,
        admin_token="feedback-input-token",
        env={DSN_ENV: f"sqlite:///{home / 'predictions.db'}", "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false"},
    )
    process.start()
    try:
        process.wait_live()
        yield process
    finally:
        process.stop()


def _connect(router: RouterProcess) -> socket.socket:
    url = httpx.URL(router.control_url)
    sock = socket.create_connection((url.host, url.port or 80), timeout=ANSWER_TIMEOUT_S)
    sock.settimeout(ANSWER_TIMEOUT_S)
    return sock


def _status_line(sock: socket.socket) -> str:
    """The response's status line, read while the request body is still unfinished (a timeout fails the test)."""
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0].decode("latin-1")


def _head(router: RouterProcess, extra: str) -> bytes:
    url = httpx.URL(router.control_url)
    auth = f"Authorization: Bearer {router.feedback_token}\r\n"
    return (
        f"POST {FEEDBACK_PATH} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
        f"{auth}{extra}\r\n"
    ).encode("latin-1")


def test_a_declared_oversized_body_is_refused_before_a_byte_of_it_is_sent(router: RouterProcess) -> None:
    declared = 64 * 1024 * 1024  # the 64 MiB of the audit: the old endpoint read all of it before its check
    with _connect(router) as sock:
        sock.sendall(_head(router, f"Content-Length: {declared}\r\n"))
        assert _status_line(sock) == "HTTP/1.1 413 Request Entity Too Large"


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(router: RouterProcess) -> None:
    piece = b"[" * 4096
    sent = 0
    with _connect(router) as sock:
        sock.sendall(_head(router, "Transfer-Encoding: chunked\r\n"))
        while sent <= LIMIT:
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        # The body is not finished (no terminating chunk): only a bounded reader answers now.
        assert _status_line(sock) == "HTTP/1.1 413 Request Entity Too Large"
    assert sent < 2 * LIMIT


def test_deeply_nested_json_is_a_400_naming_the_body(router: RouterProcess) -> None:
    headers = {"Content-Type": "application/json", **router.feedback_headers()}
    with httpx.Client(base_url=router.control_url, timeout=ANSWER_TIMEOUT_S, trust_env=False) as client:
        for body in (b"[" * 4000, b"[" * 4000 + b"]" * 4000, b'{"a":' * 2000 + b"1" + b"}" * 2000):
            assert len(body) <= LIMIT
            response = client.post(FEEDBACK_PATH, content=body, headers=headers)
            assert response.status_code == 400, response.text[:200]
            assert response.json()["details"][0]["field"] == "body"
        assert client.get("/livez").status_code == 200
    log = Path(router.log_path).read_text(encoding="utf-8", errors="replace")
    assert "RecursionError" not in log and "Traceback" not in log
