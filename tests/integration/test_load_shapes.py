"""loadtests/: the locustfile with its traffic shapes, run through locust's CLI against a stub scoring endpoint.

The endpoint is a tiny HTTP server in this process that answers the seed's route with a prediction ID and accepts
the labels — the shapes are about how many users locust runs when, not about the model. locust writes its user
count every second to ``_stats_history.csv``; the ramp must climb to the base count and the spike must triple it in
the middle fifth of the run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"
BASE_USERS = 4
DURATION_S = 10


class Stub(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        answer = {"prediction": 0, "score": 0.01, "prediction_id": uuid.uuid4().hex, "correlation_id": "trace"}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def user_counts(endpoint: str, shape: str, tmp_path: Path) -> list[int]:
    """Run the locustfile with ``shape`` and return the user count locust recorded each second."""
    env = {
        **os.environ,
        "FW_LOAD_SHAPE": shape,
        "FW_LOAD_USERS": str(BASE_USERS),
        "FW_LOAD_DURATION": str(DURATION_S),
        "FW_LOAD_ROWS": "2000",
        "FW_LOAD_LABEL_USERS": "1",
        "FW_LOAD_LABEL_SECONDS_PER_HOUR": "0.0001",
    }
    prefix = tmp_path / shape
    done = subprocess.run(
        [str(LOCUST), "-f", "loadtests/locustfile.py,loadtests/shapes.py", "--headless", "--host", endpoint,
         "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with prefix.with_name(prefix.name + "_stats_history.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["Name"] == "Aggregated"]
    stats = {r["Name"]: r for r in csv.DictReader(prefix.with_name(prefix.name + "_stats.csv").open(newline=""))}
    assert int(stats["refund-predict"]["Request Count"]) > 0 and int(stats["refund-predict"]["Failure Count"]) == 0
    assert int(stats["feedback"]["Request Count"]) > 0  # the label feed posted ground truth
    counts = [int(r["User Count"]) for r in rows]
    first = next(i for i, n in enumerate(counts) if n > 0)
    return counts[first:]  # from the first spawn on (locust records a 0 before it)


def test_ramp_climbs_to_the_base_user_count(endpoint: str, tmp_path: Path) -> None:
    counts = user_counts(endpoint, "ramp", tmp_path)
    assert counts[0] < BASE_USERS and max(counts) == BASE_USERS, counts
    assert counts == sorted(counts), counts


def test_spike_triples_the_users_in_the_middle_of_the_run(endpoint: str, tmp_path: Path) -> None:
    counts = user_counts(endpoint, "spike", tmp_path)
    assert max(counts) == 3 * BASE_USERS, counts
    assert counts[0] == BASE_USERS and counts[-1] == BASE_USERS, counts
    peak = [i for i, n in enumerate(counts) if n == 3 * BASE_USERS]
    assert 0.3 * len(counts) <= peak[0] and peak[-1] <= 0.75 * len(counts), counts
