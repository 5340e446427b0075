"""Image benchmark: each image's size and its start-to-ready time under podman (runc), with the chart's security
context (its uid/gid, read-only root filesystem, every capability dropped, no privilege escalation, tmpfs /tmp and
/var/lib/fraudwatch).

Start-to-ready is timed from ``podman run -d`` to the first 200 of the container's health endpoint on 127.0.0.1,
polled every 50 ms:

``serve``       the Bento (``bentoml serve``) with a small model bundle bind-mounted read-only: ``GET /readyz``
``router``      ``python -m rollout.router`` (tokens from the environment): ``GET /livez`` (``/readyz`` needs a table)
``controller``  ``python -m rollout.controller`` on the Kubernetes backend, its kubeconfig pointing at a closed port
                (no API server here): ``GET /metrics`` (served before the backend connects)
``retraining``  ``python -m service.retraining.webhook`` (the chart's webhook container): ``GET /livez``

Baseline, in the same run: the same endpoint of the same program started as a process from the project's venv on
the host (no container), for the router and the model server.

Images come from scripts/images.sh (built when missing). Prints one JSON document.

Usage::

    python benchmarks/image_benchmark.py [--rounds 3] [--out var/benchmarks/images.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.common.processes import free_port  # noqa: E402
from service.data.synthetic import SyntheticConfig, generate  # noqa: E402
from tests.podkit import RLIMITS, RUNTIME, images, rm  # noqa: E402
from tests.stackkit import train_bundle  # noqa: E402

HOST = "127.0.0.1"
READY_TIMEOUT_S = 300.0
SECURITY = ["--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/var/lib/fraudwatch:rw,mode=1777"]  # fmt: skip


@dataclass(frozen=True)
class Case:
    component: str
    user: str
    path: str
    #: (port, scratch directory) → extra ``podman run`` options before the image, and the command after it.
    run: Callable[[int, Path], tuple[list[str], list[str]]]


def _serve(port: int, scratch: Path) -> tuple[list[str], list[str]]:
    bundle = scratch / "bundle"
    if not bundle.exists():
        train_bundle(bundle, "v1", generate(SyntheticConfig(n_requests=3000, seed=1, fraud_rate=0.1)), 20, 0.1)
        for path in [bundle, *bundle.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    env = {"FW_SERVE__MODEL_DIR": "/models/v1", "FW_SERVE__MODEL_VERSION": "v1", "FW_SERVE__MODEL_NAME": "refund-fraud"}
    return ["-p", f"{HOST}:{port}:3000", "-v", f"{bundle}:/models/v1:ro", *_env(env)], []


def _router(port: int, _scratch: Path) -> tuple[list[str], list[str]]:
    p = "FW_ROLLOUT_ROUTER__"
    env = {f"{p}HOST": HOST, f"{p}PORT": str(port), f"{p}CONTROL_PORT": str(free_port(HOST)),
           f"{p}ADMIN_TOKEN": "bench-admin", f"{p}FEEDBACK_TOKEN": "bench-feedback"}  # fmt: skip
    return ["--network", "host", *_env(env)], []


def _controller(port: int, scratch: Path) -> tuple[list[str], list[str]]:
    kubeconfig = scratch / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": f"http://{HOST}:1"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none", "namespace": "bench"}}],
        "users": [{"name": "none", "user": {}}],
    }))  # fmt: skip
    kubeconfig.chmod(0o644)
    p = "FW_ROLLOUT_CONTROLLER__"
    env = {f"{p}BACKEND": "kube", f"{p}HOST": HOST, f"{p}METRICS_PORT": str(port),
           f"{p}KUBE__KUBECONFIG": "/etc/bench/kubeconfig", f"{p}KUBE__LEADER_ELECTION": "false"}  # fmt: skip
    return ["--network", "host", "-v", f"{scratch}:/etc/bench:ro", *_env(env)], []


def _retraining(port: int, scratch: Path) -> tuple[list[str], list[str]]:
    token = scratch / "token"
    token.write_text("bench-token")
    token.chmod(0o644)
    p = "FW_RETRAIN__WEBHOOK__"
    env = {f"{p}HOST": HOST, f"{p}PORT": str(port), f"{p}TOKEN_FILE": "/etc/bench/token",
           f"{p}STATE_FILE": "/var/lib/fraudwatch/webhook.json"}  # fmt: skip
    return ["--network", "host", "-v", f"{scratch}:/etc/bench:ro", *_env(env)], [
        "python",
        "-m",
        "service.retraining.webhook",
    ]


def _env(env: dict[str, str]) -> list[str]:
    return [f"--env={k}={v}" for k, v in env.items()]


CASES = (
    Case("serve", "1034:1034", "/readyz", _serve),
    Case("router", "10001:10001", "/livez", _router),
    Case("controller", "10001:10001", "/metrics", _controller),
    Case("retraining", "10001:10001", "/livez", _retraining),
)


def wait_ready(url: str, started: float, alive: Callable[[], bool]) -> float:
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() - started < READY_TIMEOUT_S:
            try:
                if client.get(url).status_code == httpx.codes.OK:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if not alive():
                raise RuntimeError(f"exited before {url} answered")
            time.sleep(0.05)
    raise TimeoutError(url)


def container_ready_s(case: Case, image: str, scratch: Path) -> float:
    port = free_port(HOST)
    options, command = case.run(port, scratch)
    name = f"fw-bench-{case.component}"
    rm(name)
    argv = ["podman", *RUNTIME, "run", "-d", "--name", name, *RLIMITS, "--user", case.user, *SECURITY, *options,
            image, *command]  # fmt: skip
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def alive() -> bool:
        state = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", name], capture_output=True,
                               text=True, timeout=60, check=False)  # fmt: skip
        return state.stdout.strip() == "true"

    try:
        return wait_ready(f"http://{HOST}:{port}{case.path}", started, alive)
    finally:
        rm(name)


def process_ready_s(case: Case, scratch: Path) -> float | None:
    """The same program as a host process from the venv (the baseline): serve and router only."""
    port = free_port(HOST)
    venv = Path(sys.executable).parent
    if case.component == "serve":
        _serve(port, scratch)
        argv = [str(venv / "bentoml"), "serve", "service.serving.bento:RefundFraudService", "--host", HOST, "--port",
                str(port), "--working-dir", str(ROOT)]  # fmt: skip
        env = {"FW_SERVE__MODEL_DIR": str(scratch / "bundle"), "FW_SERVE__MODEL_VERSION": "v1",
               "BENTOML_HOME": str(scratch / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}  # fmt: skip
    elif case.component == "router":
        argv = [sys.executable, "-m", "rollout.router"]
        env = dict(e.split("=", 1) for e in (o.removeprefix("--env=") for o in _router(port, scratch)[0][2:]))
    else:
        return None
    started = time.monotonic()
    process = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        return wait_ready(f"http://{HOST}:{port}{case.path}", started, lambda: process.poll() is None)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)


def image_bytes(image: str) -> int:
    done = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    return int(done.stdout.strip())


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(samples), 2), "min_s": round(min(samples), 2),
            "max_s": round(max(samples), 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    built = images(*(case.component for case in CASES))
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        scratch.chmod(0o755)
        for case in CASES:
            samples = [container_ready_s(case, built[case.component], scratch) for _ in range(args.rounds)]
            baseline = [process_ready_s(case, scratch) for _ in range(args.rounds)]
            results[case.component] = {
                "image": built[case.component],
                "size_mb": round(image_bytes(built[case.component]) / 1e6),
                "ready": summary(samples),
                "baseline_host_process": summary([b for b in baseline if b is not None]) if baseline[0] else None,
            }
    report = {"host": platform.node(), "load_average": os.getloadavg(), "rounds": args.rounds, "images": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
