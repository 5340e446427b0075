"""``fraudwatch demo`` end to end as a subprocess: synthetic data → training → MLflow (SQLite) → registry alias →
verified fetch → a real ``bentoml serve`` on 127.0.0.1 → scoring → shutdown. Small data via FW_ settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.artifacts.bundle import load_bundle
from service.artifacts.registry import CHAMPION, ModelRegistry
from service.data.synthetic import PATTERNS
from service.demo.quickstart import SEED_LABEL, SEED_REQUEST
from service.settings import Settings

pytestmark = pytest.mark.integration

FRAUDWATCH = Path(sys.executable).parent / "fraudwatch"
ROOT = Path(__file__).resolve().parents[2]
#: Small, fast, still learnable: 3 % fraud in 8,000 requests leaves ~35 positives per validation/test window. At
#: 4,000 a quarter of the fraud (~30 rows) comes in one or two bot-farm bursts, and whether the test window holds a
#: farm the training window never saw is the seed's luck: the demo's seed then scored PR-AUC 0.67 against the 0.8
#: floor, seeds 1-5 and 42 scored 0.15-0.94 at 4,000 and 0.91-0.97 at 8,000 (fraudwatch train, 2026-12-06).
SMALL = {
    "FW_DATA__N_REQUESTS": "8000",
    "FW_DATA__N_ACCOUNTS": "2000",
    "FW_DATA__FRAUD_RATE": "0.03",
    "FW_TRAIN__N_ESTIMATORS": "40",
    "FW_TRAIN__EARLY_STOPPING_ROUNDS": "10",
    "FW_PROCESS__START_TIMEOUT_S": "240",
}


def demo_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FW_")}
    return {**env, **SMALL, "FW_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/readyz", timeout=2.0)
    except httpx.ConnectError:
        return True
    return False


def check_response(body: dict[str, Any], version: str) -> None:
    """The seed's contract plus the additive fields, internally consistent."""
    assert body["prediction"] in (0, 1)
    assert 0.0 <= body["score"] <= 1.0
    assert body["prediction"] == int(body["score"] >= body["threshold"])
    expected_confidence = body["score"] if body["prediction"] == 1 else 1.0 - body["score"]
    assert body["confidence"] == pytest.approx(expected_confidence)
    assert body["decision"] == ("review" if body["prediction"] == 1 else "approve")
    assert body["model_version"] == version
    assert body["correlation_id"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    home = tmp_path_factory.mktemp("demo")
    completed = subprocess.run(
        [str(FRAUDWATCH), "demo", "--summary-json", str(home / "summary.json")],
        env=demo_env(home),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return completed, home


def test_demo_exits_0_and_prints_the_seed_response(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, _ = demo_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    seed_at = lines.index(SEED_LABEL)
    assert json.loads(lines[seed_at + 1].split("request", 1)[1]) == SEED_REQUEST
    match = re.fullmatch(r"\s*response HTTP (\d+) (\{.*\})", lines[seed_at + 2])
    assert match is not None, lines[seed_at + 2]
    assert match.group(1) == "200"
    check_response(json.loads(match.group(2)), "v1")
    assert "demo finished in" in completed.stdout


def test_demo_scored_one_request_per_pattern(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, home = demo_run
    summary = json.loads((home / "summary.json").read_text(encoding="utf-8"))
    labels = [item["label"] for item in summary["responses"]]
    # every pattern of the generator once, in its order; the drift scenario's new bot farm is not in this stream
    assert labels == [SEED_LABEL, *(pattern for pattern in PATTERNS if pattern != "new_bot_farm")]
    for item in summary["responses"]:
        assert item["status"] == 200
        check_response(item["response"], summary["model_version"])
    assert set(summary["timings_s"]) == {
        "open_store",
        "generate",
        "train",
        "register",
        "fetch",
        "serve",
        "score",
        "stop",
    }
    assert summary["wall_s"] >= summary["total_s"] > 0


def test_demo_registered_the_champion_and_served_the_fetched_bundle(
    demo_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, home = demo_run
    summary = json.loads((home / "summary.json").read_text(encoding="utf-8"))
    registry = ModelRegistry(Settings(home=home, mlflow_tracking_uri=None))
    assert registry.aliases(summary["model_name"]) == {CHAMPION: "1"}
    champion = registry.resolve(summary["model_name"], CHAMPION)
    served = load_bundle(Path(summary["paths"]["serving_bundle"]))
    assert served.manifest.sha256 == champion.sha256
    assert served.version == champion.model_version == "v1"
    assert champion.audit[0]["action"] == "promote"
    assert registry.client.get_run(summary["run_id"]).data.tags["quality_gate"] == "passed"
    assert Path(summary["paths"]["report"]).is_file()
    assert refused(summary["server_url"])  # the server was stopped


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_interrupted_demo_stops_its_server(tmp_path: Path) -> None:
    """Ctrl-C while the server is starting: exit 130, the server's process group is gone, nothing listens."""
    process = subprocess.Popen(
        [str(FRAUDWATCH), "demo"],
        env=demo_env(tmp_path),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: dict[str, Any] = {}
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("{") and json.loads(line).get("message") == "server starting":
                started = json.loads(line)
                break
        assert started, "the demo never started a server"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not group_alive(int(started["server_pid"]))
    assert refused(str(started["url"]))
