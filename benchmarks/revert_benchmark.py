"""Revert benchmark: from ``rolloutctl revert`` to the first answer of the previous version through the router.

Setup (all real, on 127.0.0.1): two model versions registered in an MLflow registry on SQLite (v1 champion), the
router (admin endpoint), the rollout controller (``python -m rollout.controller``, local backend) with a policy
that never promotes on its own, so every stage change is a command. Prometheus is not started: the controller
sees it offline (no evidence), which changes nothing for manual commands.

Each round: ``start --candidate v2`` → ``promote --to full`` → ``promote`` (Promoted: v2 decides for everyone, v1
scores in shadow, warm) → wait until the router answers with v2 → **revert**, timed from the instant the command
is issued to the first answer of v1 seen by a client that posts to the router back to back (one request in
flight, so the resolution is one round trip, a few milliseconds). Two ways of issuing it, alternating:

``rolloutctl_process``   the ``rolloutctl revert`` console script as a new process (what an operator types): Python
                         start-up + imports + queueing the command + the controller's reaction + the table PUT;
``rolloutctl_in_process`` ``rollout.cli.main.main(["revert", "--no-wait"])`` in this (warm) process: queueing +
reaction.

Baseline, measured in the same run on the same processes (after the controller is stopped): a ``PUT
/admin/routing`` of the v1 table sent directly to the router — the floor of any revert through this router.

Also reported: when the ``rolloutctl`` process exits (it waits for the controller to confirm).

Usage::

    python benchmarks/revert_benchmark.py --reverts 10 --out var/benchmarks/revert.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np

ROOT: Final[Path] = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rollout.backends.local.inbox import STATE_FILE  # noqa: E402
from rollout.backends.local.workloads import WORKLOADS_FILE  # noqa: E402
from rollout.cli.main import main as rolloutctl  # noqa: E402
from rollout.core.routing import RoutingTable, VersionEndpoint  # noqa: E402
from rollout.router.outcomes.settings import OutcomeSettings  # noqa: E402
from rollout.router.process import RouterProcess  # noqa: E402
from rollout.settings import ControllerSettings  # noqa: E402
from service.common.processes import free_port, stop_tree  # noqa: E402
from service.settings import Settings  # noqa: E402

HOST: Final[str] = "127.0.0.1"
TOKEN: Final[str] = "revert-benchmark"
BIN: Final[Path] = Path(sys.executable).parent
PREDICT: Final[str] = "/api/v1/refund-predict"
BODY: Final[dict[str, Any]] = {"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2}
WAIT_S: Final[float] = 240.0
DSN_ENV: Final[str] = f"{OutcomeSettings.model_config.get('env_prefix', '')}DSN"
#: Stages that never end on their own (manual promotion only); the quality stage is skipped (no regression set).
POLICY_YAML: Final[str] = """
stages:
  shadow: {min_duration_s: 86400}
  canary: {min_duration_s: 86400}
  ab: {min_duration_s: 86400}
  full: {min_duration_s: 86400}
analysis: {interval_s: 5, consecutive_error_limit: 100000, inconclusive_timeout_s: 86400, labels_timeout_s: 864000}
promotion: {alias: champion, warm_window_s: 86400, scale_down_delay_s: 86400}
samples:
  requests: sum(increase(fraudwatch_router_requests_total{model_version="{{version}}"}[{{stage_window}}]))
  labels: sum(increase(fraudwatch_outcome_total{model_version="{{version}}"}[{{stage_window}}]))
gates:
  - name: error-rate
    layer: health
    stages: [shadow, canary, ab, full]
    query: sum(model_version_role:fraudwatch_router_error_ratio:ratio_rate5m{model_version="{{version}}"})
    condition: value <= 0.01
"""


def summary(seconds: Sequence[float]) -> dict[str, float | int]:
    values = np.asarray(seconds, dtype=float) * 1000.0
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p95_ms": round(float(np.percentile(values, 95)), 1),
        "p99_ms": round(float(np.percentile(values, 99)), 1),
        "max_ms": round(float(values.max()), 1),
        "mean_ms": round(float(values.mean()), 1),
    }


# --------------------------------------------------------------------------------------------------- models


def prepare_registry(home: Path, rows: int) -> None:
    """v1 and v2 trained on differently seeded synthetic data, registered; v1 is the champion."""
    from service.data.synthetic import SyntheticConfig, generate
    from service.training.pipeline import track_and_register, train_version

    settings = Settings.model_validate(
        {
            "home": home,
            "train": {"imbalance_strategies": ["scale_pos_weight"]},
            # model quality is not what this measures: small data must not stop registration
            "quality": {"min_pr_auc": 0.0, "min_recall_at_threshold": 0.0},
        }
    )
    for version, seed in (("v1", 7), ("v2", 8)):
        frame = generate(SyntheticConfig(n_accounts=max(1000, rows // 6), n_requests=rows, seed=seed))
        trained = train_version(frame, settings, version, home / "artifacts" / version)
        alias = "champion" if version == "v1" else None
        track_and_register(trained, settings, register=True, alias=alias, reason="revert benchmark")


# --------------------------------------------------------------------------------------------------- probe


@dataclass
class Prober:
    """Posts to the router back to back in a thread; remembers when each version answered."""

    url: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(PREDICT, json=BODY)
                    version = str(response.json().get("model_version"))
                except (httpx.HTTPError, ValueError):
                    self.errors += 1
                    continue
                self.answers.append((time.perf_counter(), version))

    def first_after(self, since: float, version: str, timeout_s: float) -> float:
        """Seconds from ``since`` to the first answer of ``version`` received after it."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            answers = self.answers
            for at, answered in answers[seen:]:
                if at >= since and answered == version:
                    return at - since
            seen = max(0, len(answers) - 1)
            time.sleep(0.001)
        raise TimeoutError(f"no answer from {version} within {timeout_s} s")

    def latest(self) -> str | None:
        return self.answers[-1][1] if self.answers else None


# --------------------------------------------------------------------------------------------------- stack


@dataclass
class Bench:
    work: Path
    router: RouterProcess
    env: dict[str, str]
    controller: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.work / "rollout"

    def ctl(self, *args: str) -> int:
        return rolloutctl(["--state-dir", str(self.state_dir), *args])

    def phase(self) -> tuple[str | None, str | None]:
        try:
            raw = json.loads((self.state_dir / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None, None
        rollout = raw.get("rollout") or {}
        return rollout.get("phase"), rollout.get("stage")

    def table(self) -> dict[str, Any]:
        response = httpx.get(
            self.router.control_url + "/admin/routing", headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False
        )
        response.raise_for_status()
        table: dict[str, Any] = response.json()["table"]
        return table


def wait_until(predicate: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def bench_stack(work: Path) -> Iterator[Bench]:
    router = RouterProcess(
        log_path=work / "router.log",
        admin_token=TOKEN,
        env={DSN_ENV: f"sqlite:///{work / 'predictions.db'}", "FW_ROLLOUT_ROUTER__LOG_DECISIONS": "false"},
    )
    policy = work / "policy.yaml"
    policy.write_text(POLICY_YAML)
    router.start()
    prefix = "FW_ROLLOUT_CONTROLLER__"
    bench = Bench(work, router, {})
    try:
        router.wait_live()
        bench.env = {
            **os.environ,
            "FW_HOME": str(work / "model-home"),
            "FW_ROLLOUT_HOME": str(work),
            "FW_ROLLOUT_LOG_LEVEL": "WARNING",
            "FW_ROLLOUT_ROUTER__ADMIN_TOKEN": TOKEN,
            f"{prefix}STATE_DIR": str(work / "rollout"),
            f"{prefix}POLICY_FILE": str(policy),
            f"{prefix}PROMETHEUS_URL": f"http://{HOST}:{free_port(HOST)}",
            f"{prefix}METRICS_PORT": "0",
            f"{prefix}LOCAL__ROUTER_URLS": json.dumps([router.control_url]),
            f"{prefix}LOCAL__SERVER_ENV": json.dumps({"FW_SERVE__WORKERS": "1", "FW_LOG_LEVEL": "WARNING"}),
        }
        log = (work / "controller.log").open("ab")
        bench.controller = subprocess.Popen(
            [sys.executable, "-m", "rollout.controller"], cwd=ROOT, env=bench.env, stdout=log, stderr=subprocess.STDOUT
        )
        os.environ.update({k: v for k, v in bench.env.items() if k.startswith("FW_ROLLOUT_")})
        yield bench
    finally:
        if bench.controller is not None and bench.controller.poll() is None:
            bench.controller.send_signal(signal.SIGTERM)
            bench.controller.wait(timeout=60)
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            for record in json.loads((bench.state_dir / WORKLOADS_FILE).read_text()):
                stop_tree(int(record["pid"]), grace_s=20.0, poll_s=0.1)
        router.stop()


def promote_v2(bench: Bench, prober: Prober, rollout_id: str) -> None:
    """A rollout of v2 against v1 taken to Promoted by commands; returns once v2 answers for everyone."""
    for args in (("start", "--candidate", "v2", "--id", rollout_id), ("promote", "--to", "full"), ("promote",)):
        code = bench.ctl(*args, "--timeout", str(WAIT_S))
        if code != 0:
            raise RuntimeError(f"rolloutctl {' '.join(args)} exited {code}")
        if args[0] == "start":
            wait_until(lambda: bench.table().get("stage") == "shadow", "v2 ready and in shadow")
    wait_until(
        lambda: bench.phase() == ("Promoted", "full") and bench.table()["stable"]["version"] == "v2", "promotion"
    )
    since = time.perf_counter()
    prober.first_after(since, "v2", WAIT_S)


def revert(bench: Bench, prober: Prober, how: str) -> tuple[float, float | None]:
    """Seconds from issuing the revert to v1's first answer, and to the ``rolloutctl`` process's exit."""
    started = time.perf_counter()
    if how == "rolloutctl_process":
        process = subprocess.Popen(
            [str(BIN / "rolloutctl"), "--state-dir", str(bench.state_dir), "revert", "--reason", "benchmark"],
            env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        latency = prober.first_after(started, "v1", WAIT_S)
        code = process.wait(timeout=WAIT_S)
        exited = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"rolloutctl revert exited {code}")
        return latency, exited
    code = bench.ctl("revert", "--no-wait", "--reason", "benchmark")
    if code != 0:
        raise RuntimeError(f"rolloutctl revert exited {code}")
    return prober.first_after(started, "v1", WAIT_S), None


def baseline(bench: Bench, prober: Prober, rounds: int) -> list[float]:
    """Direct admin PUTs flipping the table between v2 and v1 (the controller is stopped first)."""
    if bench.controller is not None:
        bench.controller.send_signal(signal.SIGTERM)
        bench.controller.wait(timeout=60)
        bench.controller = None
    urls = {
        r["version"]: f"http://{HOST}:{r['port']}" for r in json.loads((bench.state_dir / WORKLOADS_FILE).read_text())
    }
    generation = int(bench.table()["generation"])
    out: list[float] = []
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=bench.router.control_url, headers=admin, trust_env=False) as http:
        for _ in range(rounds):
            for stable in ("v2", "v1"):
                generation += 1
                table = RoutingTable(
                    generation=generation,
                    stage="stable",
                    stable=VersionEndpoint(version=stable, url=urls[stable]),
                    candidate_weight=0.0,
                )
                started = time.perf_counter()
                http.put("/admin/routing", content=table.model_dump_json()).raise_for_status()
                latency = prober.first_after(started, stable, WAIT_S)
            out.append(latency)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reverts", type=int, default=10, help="reverts per way of issuing them")
    parser.add_argument("--rows", type=int, default=6000, help="synthetic rows per trained version")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "benchmarks" / "revert.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="revert-bench-"))
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    prepare_registry(work / "model-home", args.rows)
    latencies: dict[str, list[float]] = {"rolloutctl_process": [], "rolloutctl_in_process": []}
    exits: list[float] = []
    with bench_stack(work) as bench:
        wait_until(lambda: bench.phase() == (None, None) and _table_or_none(bench) is not None, "the champion routed")
        prober = Prober(bench.router.url)
        prober.start()
        try:
            for i in range(2 * args.reverts):
                how = "rolloutctl_process" if i % 2 == 0 else "rolloutctl_in_process"
                promote_v2(bench, prober, f"bench-{i}")
                latency, exited = revert(bench, prober, how)
                latencies[how].append(latency)
                if exited is not None:
                    exits.append(exited)
            direct = baseline(bench, prober, args.reverts)
        finally:
            prober.stop()
    return {
        "benchmark": "revert",
        "what": "seconds from issuing the revert to the first answer of the previous version through the router",
        "revert_rolloutctl_process": summary(latencies["rolloutctl_process"]),
        "revert_rolloutctl_in_process": summary(latencies["rolloutctl_in_process"]),
        "baseline_direct_admin_put": summary(direct),
        "rolloutctl_process_exit": summary(exits),
        "probe_answers": len(prober.answers),
        "probe_errors": prober.errors,
        "environment": {
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "controller_tick_s": ControllerSettings().tick_interval_s,
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "work_dir": str(work) if args.keep else None,
    }


def _table_or_none(bench: Bench) -> dict[str, Any] | None:
    try:
        return bench.table()
    except httpx.HTTPError:
        return None


if __name__ == "__main__":
    main()
