"""Serving benchmark: latency percentiles, throughput and peak memory of the real BentoML service next to a
baseline (the same bundle behind a minimal Starlette/uvicorn endpoint, ``benchmarks/baseline_app.py``), all
measured in the same run on this machine.

The load generator is a closed loop of ``concurrency`` in-flight requests (aiohttp, asyncio) in a separate
process, so client and servers do not share an interpreter. All server variants run at the same time; at each
concurrency level the load alternates between them in short rounds (the order rotating), so that load from
other jobs on this shared 2-core machine falls on every variant alike. Per variant and level: latency
percentiles over all rounds, throughput (requests / time under load), and the servers' CPU time per request
(whole process tree, from /proc: less sensitive to contention than latency). Peak RSS (whole process tree) is
sampled throughout.

Usage::

    python benchmarks/serving_benchmark.py                       # trains a model with train_pipeline first
    python benchmarks/serving_benchmark.py --model-dir <bundle>  # an existing bundle (with features.sqlite)
    python benchmarks/serving_benchmark.py --variants baseline,bento-w1 --concurrency 1,4 --requests 500
    python benchmarks/serving_benchmark.py --variants baseline,bento-w1-nostore,bento-w1,bento-w1-redis \
        --concurrency 4 --store-lookups 3000          # the online store's cost (issue 15)

The online store (velocity features, ``service/data/online_store.py``): ``bento-w1`` reads and writes the embedded
SQLite default, ``bento-w1-redis`` a ``redis-server`` this benchmark starts on loopback, ``bento-w1-nostore`` none
(``url=none``: the model is served the velocity defaults, a fallback per request). Every request carries an account,
an IP and a device, so each one reads all its velocity features (one round trip) and writes its event. Beside the
service, ``store_lookup`` times one request's read in-process (``--store-lookups`` reads after a 20,000-event
stream): the Redis store on loopback, the embedded SQLite store and the bundle's aggregate store.

Writes JSON to ``--out`` (default ``var/benchmarks/serving.json``) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import psutil  # type: ignore[import-untyped]  # no stubs in the venv; a benchmark-only dependency (via bentoml)

ROOT: Final[Path] = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.common.processes import free_port  # noqa: E402
from service.data.feature_log import PREDICTION_ID_HEADER  # noqa: E402
from service.serving.process import BentoServer, server_env  # noqa: E402
from service.settings import Settings  # noqa: E402

PREDICT_PATH: Final[str] = "/api/v1/refund-predict"
SEED_BODY: Final[bytes] = (
    b'{"yearsActive": 1.5, "amount": 45.00, "ipAccounts": 2, "accountId": "acct-bench-1", '
    b'"ipAddress": "203.0.113.9", "deviceId": "dev-bench-1"}'
)
#: The online store's URL in a variant's env that this benchmark replaces with its own redis-server's.
REDIS_PLACEHOLDER: Final[str] = "redis://benchmark"
#: Targets on this 2-core machine (from the task): at moderate load, and throughput vs the baseline.
MODERATE_CONCURRENCY: Final[int] = 4
TARGET_P50_MS: Final[float] = 3.0
TARGET_P99_MS: Final[float] = 10.0
RSS_SAMPLE_S: Final[float] = 0.1


@dataclass(frozen=True)
class Variant:
    """One server configuration; ``env`` is added to the server's environment."""

    name: str
    kind: str  # "baseline" | "bento"
    env: Mapping[str, str]


def bento_variant(workers: int, *, batching: bool = False, dispatch: str = "direct") -> Variant:
    """``bento-w<workers>[-batching][-api]``: ``-api`` = BentoML's API methods answer (``FW_SERVE__DISPATCH=bentoml``)
    instead of the request guard that has already validated the body (``direct``, the default)."""
    name = f"bento-w{workers}" + ("-batching" if batching else "") + ("-api" if dispatch == "bentoml" else "")
    env = {
        "FW_SERVE__WORKERS": str(workers),
        "FW_SERVE__ADAPTIVE_BATCHING": str(batching).lower(),
        "FW_SERVE__DISPATCH": dispatch,
    }
    return Variant(name, "bento", env)


VARIANTS: Final[dict[str, Variant]] = {
    "baseline": Variant("baseline", "baseline", {}),
    "bento-w1-redis": Variant("bento-w1-redis", "bento", {"FW_SERVE__ONLINE_STORE__URL": REDIS_PLACEHOLDER}),
    "bento-w1-nostore": Variant("bento-w1-nostore", "bento", {"FW_SERVE__ONLINE_STORE__URL": "none"}),
    **{
        v.name: v
        for workers in (1, 2)
        for batching in (False, True)
        for dispatch in ("direct", "bentoml")
        for v in (bento_variant(workers, batching=batching, dispatch=dispatch),)
    },
    # the feature log on (its writer thread, Parquet every 60 s): what the request path pays for log-and-wait
    "bento-w1-featurelog": Variant(
        "bento-w1-featurelog", "bento", {**bento_variant(1).env, "FW_FEATURE_LOG__ENABLED": "true"}
    ),
}


# ------------------------------------------------------------------------------------------ load generator


@dataclass(frozen=True)
class Burst:
    """One round of load against one server: raw latencies (seconds), errors, time under load."""

    latencies: list[float]
    errors: int
    wall_s: float


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    server_cpu_ms_per_request: float

    @classmethod
    def of(cls, concurrency: int, bursts: Sequence[Burst], cpu_s: float) -> LevelResult:
        ms = np.asarray([x for burst in bursts for x in burst.latencies]) * 1000.0
        wall = sum(burst.wall_s for burst in bursts)
        return cls(
            concurrency=concurrency,
            requests=int(ms.size),
            errors=sum(burst.errors for burst in bursts),
            wall_s=round(wall, 3),
            throughput_rps=round(ms.size / wall, 1),
            p50_ms=round(float(np.percentile(ms, 50)), 3),
            p95_ms=round(float(np.percentile(ms, 95)), 3),
            p99_ms=round(float(np.percentile(ms, 99)), 3),
            mean_ms=round(float(ms.mean()), 3),
            max_ms=round(float(ms.max()), 3),
            server_cpu_ms_per_request=round(cpu_s * 1000.0 / ms.size, 3),
        )


def run_load(url: str, body: bytes, concurrency: int, n_requests: int, warmup: int) -> Burst:
    """Closed-loop load (runs in the client process): ``concurrency`` workers send ``n_requests`` in total."""
    return asyncio.run(_load(url, body, concurrency, n_requests, warmup))


async def _load(url: str, body: bytes, concurrency: int, n_requests: int, warmup: int) -> Burst:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    sent = itertools.count()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[float, bool]:
            # a prediction ID per request, as the router sends the decider (only the feature-log variant logs it)
            headers = {"content-type": "application/json", PREDICTION_ID_HEADER: f"bench-{next(sent):016d}"}
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
            return time.perf_counter() - started, ok

        remaining = [warmup]

        async def warm() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await one()

        await asyncio.gather(*(warm() for _ in range(concurrency)))
        latencies: list[float] = []
        errors = [0]
        left = [n_requests]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                seconds, ok = await one()
                latencies.append(seconds)
                errors[0] += 0 if ok else 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Burst(latencies=latencies, errors=errors[0], wall_s=wall)


# ---------------------------------------------------------------------------------------------- servers


class RssSampler:
    """Peak resident memory of a process and all its descendants, sampled in a background thread."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_SAMPLE_S)

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
            sizes = [process.memory_info().rss for process in processes]
        except psutil.Error:
            return
        self.peak_total = max(self.peak_total, sum(sizes))
        self.peak_single = max(self.peak_single, max(sizes))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process tree so far (children that exited are not counted)."""
        total = 0.0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += float(times.user + times.system)
        return total

    def as_dict(self) -> dict[str, float]:
        mib = 1024.0 * 1024.0
        return {
            "peak_rss_total_mib": round(self.peak_total / mib, 1),
            "peak_rss_largest_process_mib": round(self.peak_single / mib, 1),
        }


@contextmanager
def baseline_server(model_dir: Path, settings: Settings, log_dir: Path) -> Iterator[tuple[str, int]]:
    """uvicorn serving ``benchmarks.baseline_app`` (same uvicorn stack as BentoML's workers)."""
    port = free_port(settings.process.host)
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"baseline-{port}.log").open("ab") as log:
        command = [
            sys.executable, "-m", "uvicorn", "benchmarks.baseline_app:app",
            "--host", settings.process.host, "--port", str(port), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, cwd=ROOT, env=server_env(model_dir, settings), stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://{settings.process.host}:{port}"
        try:
            wait_http_ok(url + "/readyz", settings.process.start_timeout_s, process)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=settings.process.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


@contextmanager
def bento_server(model_dir: Path, settings: Settings, variant: Variant) -> Iterator[tuple[str, int]]:
    """One BENTOML_HOME per variant: servers sharing one would share (and wipe) the Prometheus multiprocess dir."""
    own = settings.model_copy(update={"home": settings.home / variant.name})
    server = BentoServer(model_dir=model_dir, settings=own, name=variant.name, extra_env=dict(variant.env))
    with server:
        assert server.pid is not None
        yield server.url, server.pid


# ------------------------------------------------------------------------------------------------ model


def prepare_bundle(model_dir: Path | None, work: Path, n_requests: int) -> Path:
    """The bundle to serve: ``model_dir`` as given, or one trained here by ``service.training.train.train_pipeline``."""
    if model_dir is not None:
        return model_dir
    from service.data.feature_store import STORE_FILE, build_store
    from service.data.synthetic import SyntheticConfig, generate
    from service.training.train import train_pipeline

    out = work / f"bundle-{n_requests}"
    if (out / "manifest.json").is_file() and (out / STORE_FILE).is_file():
        return out
    frame = generate(SyntheticConfig(n_accounts=max(1000, n_requests // 6), n_requests=n_requests, seed=7))
    settings = Settings.model_validate(
        {"home": work / "train-home", "train": {"imbalance_strategies": ["scale_pos_weight"]}}
    )
    result = train_pipeline(frame, settings, version="bench-1", out_dir=out)
    build_store(out / STORE_FILE, result.aggregates)
    return out


def describe_model(model_dir: Path) -> dict[str, Any]:
    from service.artifacts.bundle import load_bundle

    model = load_bundle(model_dir, nthread=1)
    return {
        "dir": str(model_dir),
        "version": model.version,
        "trees": int(model.booster.num_boosted_rounds()),
        "max_depth": model.manifest.params.get("xgb.max_depth"),
    }


# ------------------------------------------------------------------------------------------------- main


@dataclass
class Running:
    variant: Variant
    url: str
    rss: RssSampler
    bursts: dict[int, list[Burst]]
    cpu_s: dict[int, float]


def start_variant(
    variant: Variant, model_dir: Path, settings: Settings, stack: ExitStack, redis_url: str | None
) -> Running:
    if REDIS_PLACEHOLDER in variant.env.values():
        if redis_url is None:
            raise SystemExit("redis-server is not installed: the Redis variants need it (scripts/bootstrap.sh test)")
        env = {k: redis_url if value == REDIS_PLACEHOLDER else value for k, value in variant.env.items()}
        variant = Variant(variant.name, variant.kind, env)
    starter = (
        baseline_server(model_dir, settings, settings.logs_dir)
        if variant.kind == "baseline"
        else bento_server(model_dir, settings, variant)
    )
    url, pid = stack.enter_context(starter)
    rss = stack.enter_context(RssSampler(pid))
    return Running(variant=variant, url=url, rss=rss, bursts={}, cpu_s={})


def drive_level(
    servers: Sequence[Running], level: int, n_requests: int, rounds: int, warmup: int, client: ProcessPoolExecutor
) -> None:
    """``rounds`` short bursts per server at ``level`` in-flight requests, alternating servers (rotating order)."""
    per_round = max(1, n_requests // rounds)
    for server in servers:  # warm-up at this level, unmeasured
        client.submit(run_load, server.url + PREDICT_PATH, SEED_BODY, level, warmup, 0).result()
    for round_ in range(rounds):
        shift = round_ % len(servers)
        order = [*servers[shift:], *servers[:shift]]
        for server in order:
            cpu_before = server.rss.cpu_seconds()
            burst = client.submit(run_load, server.url + PREDICT_PATH, SEED_BODY, level, per_round, 0).result()
            server.cpu_s[level] = server.cpu_s.get(level, 0.0) + server.rss.cpu_seconds() - cpu_before
            server.bursts.setdefault(level, []).append(burst)


def report_of(server: Running, levels: Sequence[int]) -> dict[str, Any]:
    return {
        "variant": server.variant.name,
        "env": dict(server.variant.env),
        **server.rss.as_dict(),
        "levels": [asdict(LevelResult.of(level, server.bursts[level], server.cpu_s[level])) for level in levels],
    }


def verdict(runs: Sequence[dict[str, Any]], default_variant: str) -> dict[str, Any]:
    """The task's targets for every BentoML variant, and which one the default settings run."""
    by_name = {run["variant"]: run for run in runs}
    baseline = by_name.get("baseline")
    baseline_peak = max((lvl["throughput_rps"] for lvl in baseline["levels"]), default=0.0) if baseline else None
    out: dict[str, Any] = {"default_variant": default_variant, "variants": {}}
    for run in runs:
        if run["variant"] == "baseline":
            continue
        moderate = next((lvl for lvl in run["levels"] if lvl["concurrency"] == MODERATE_CONCURRENCY), None)
        peak = max(lvl["throughput_rps"] for lvl in run["levels"])
        out["variants"][run["variant"]] = {
            "p50_ms_at_moderate": moderate["p50_ms"] if moderate else None,
            "p99_ms_at_moderate": moderate["p99_ms"] if moderate else None,
            "p50_target_met": bool(moderate and moderate["p50_ms"] <= TARGET_P50_MS),
            "p99_target_met": bool(moderate and moderate["p99_ms"] <= TARGET_P99_MS),
            "peak_throughput_rps": peak,
            "baseline_peak_throughput_rps": baseline_peak,
            "throughput_target_met": None if baseline_peak is None else peak >= baseline_peak,
        }
    return out


# ------------------------------------------------------------------------------------------------ the stores


@contextmanager
def redis_server(directory: Path) -> Iterator[str | None]:
    """A ``redis-server`` on loopback (no persistence) for the Redis variants; None when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port("127.0.0.1")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with (directory / "redis.log").open("ab") as log:
        process = subprocess.Popen(command, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20.0
        while True:
            with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def percentiles_us(samples: Sequence[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1e6
    return {
        "n": float(len(values)),
        "p50_us": round(float(np.percentile(values, 50)), 1),
        "p99_us": round(float(np.percentile(values, 99)), 1),
        "max_us": round(float(values.max()), 1),
    }


def store_lookups(redis_url: str, work: Path, model_dir: Path, n: int) -> dict[str, Any]:
    """One request's features read ``n`` times from each store after the same 20,000-event stream (random accounts,
    IPs and devices of it): the online store in Redis on loopback and in SQLite (all velocity features, one round
    trip), and the bundle's aggregate store (two aggregates of one account)."""
    if n <= 0:
        return {}
    from service.data import velocity as v
    from service.data.feature_store import STORE_FILE, SQLiteFeatureStore
    from service.data.online_base import OnlineStore
    from service.data.online_store import open_online_store
    from service.data.synthetic import SyntheticConfig, generate
    from service.settings import OnlineStoreSettings
    from service.training.evaluate import time_ordered

    frame = time_ordered(generate(SyntheticConfig(n_accounts=3000, n_requests=20_000, seed=5)))
    events = v.refund_events(frame)
    rng = np.random.default_rng(7)
    queries = [events[int(i)] for i in rng.integers(0, len(events), n)]
    work.mkdir(parents=True, exist_ok=True)
    config = OnlineStoreSettings(timeout_ms=1000.0, key_prefix="bench:")
    out: dict[str, Any] = {}
    for name, url in (("online_redis", redis_url), ("online_sqlite", f"sqlite:///{work / 'online.sqlite'}")):
        store: OnlineStore | None = open_online_store(url, config)
        assert store is not None
        for start in range(0, len(events), 500):
            store.write(events[start : start + 500])
        timings = []
        for query in queries:
            began = time.perf_counter()
            store.read([query], 1.0)
            timings.append(time.perf_counter() - began)
        store.close()
        out[name] = percentiles_us(timings)
    bundle = SQLiteFeatureStore(model_dir / STORE_FILE)
    accounts = [str(query.account) for query in queries]
    timings = []
    for account in accounts:
        began = time.perf_counter()
        bundle.lookup(account)
        timings.append(time.perf_counter() - began)
    out["bundle_aggregates_sqlite"] = percentiles_us(timings)
    return out


def default_variant_name() -> str:
    serve = Settings().serve
    return bento_variant(serve.workers, batching=serve.adaptive_batching, dispatch=serve.dispatch).name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="bundle to serve (default: train one)")
    parser.add_argument("--train-rows", type=int, default=30_000, help="synthetic rows when training the bundle")
    parser.add_argument("--variants", default="baseline,bento-w1,bento-w1-api,bento-w1-batching,bento-w2,bento-w2-api")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma-separated in-flight request counts")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per concurrency level")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bursts per server and level")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per server before each level")
    parser.add_argument("--store-lookups", type=int, default=3000, help="in-process store reads per store (0: none)")
    parser.add_argument("--home", type=Path, default=ROOT / "var" / "benchmarks" / "serving-home")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "benchmarks" / "serving.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    levels = [int(level) for level in args.concurrency.split(",")]
    home: Path = args.home.resolve()
    settings = Settings.model_validate({"home": home})
    model_dir = prepare_bundle(args.model_dir, home, args.train_rows).resolve()
    context = multiprocessing.get_context("spawn")
    load_before = os.getloadavg()
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as client, ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(home / "redis"))
        lookups = store_lookups(redis_url, home / "lookup", model_dir, args.store_lookups) if redis_url else {}
        servers = [start_variant(VARIANTS[name], model_dir, settings, stack, redis_url) for name in names]
        for level in levels:
            drive_level(servers, level, args.requests, args.rounds, args.warmup, client)
        runs = [report_of(server, levels) for server in servers]
    report = {
        "benchmark": "serving",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "model": describe_model(model_dir),
        "body": SEED_BODY.decode(),
        "requests_per_level": args.requests,
        "rounds_per_level": args.rounds,
        "warmup_per_level": args.warmup,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        "store_lookup": lookups,
        "targets": verdict(runs, default_variant_name()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
