"""Pieces of the local stacks the integration tests assemble (tests/integration/test_rollout_local.py,
tests/integration/test_retrain_e2e.py): waiting for a condition, model bundles trained on exactly the features
serving computes, and the rollout controller as a real process with its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb

from rollout.router.process import RouterProcess
from service.artifacts.bundle import Calibration, Manifest, ThresholdPolicy, save_bundle
from service.data import aggregates
from service.data.feature_store import STORE_FILE, build_store
from service.data.features import DEFAULT_AGGREGATES, DRIFT_FEATURES, FEATURE_NAMES, EntityAggregates, feature_matrix
from service.training.evaluate import reference_bins, time_ordered
from tests.kits.bundles import N_REFERENCE_BINS

#: The stacks replay a recorded stream compressed from months into minutes (the locustfile's laps carry each row's
#: own ``eventTime``): their model servers' online store takes each event at the request's time, as the demo's do
#: (rollout/demo/stack.py), or as a stack ages every account looks like a bot-farm burst to the velocity features
#: and the versions' scores drift under the gates. As chart values (``modelServer.settings``) and as the servers'
#: environment.
REPLAY_SERVE_SETTINGS: Final[dict[str, str]] = {"online_store__event_time": "request"}


def replay_server_env(workdir: Path) -> dict[str, str]:
    """The environment of a stack's model servers: one worker, quiet logs, the replay's event time, and one online
    store for every version of this stack alone (under ``workdir``; the embedded default, ``FW_HOME``'s, is shared
    by every stack of a run and by the developer's demo)."""
    return {
        "FW_SERVE__WORKERS": "1",
        "FW_LOG_LEVEL": "WARNING",
        "FW_SERVE__ONLINE_STORE__URL": f"sqlite:///{(workdir / 'online' / 'velocity.sqlite').resolve()}",
        **{f"FW_SERVE__{key.upper()}": value for key, value in REPLAY_SERVE_SETTINGS.items()},
    }


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------- models


def serving_features(
    frame: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, EntityAggregates], npt.NDArray[np.float32]]:
    """``frame`` in time order, each account's latest aggregates (the feature store serving reads) and the
    feature matrix serving computes for those rows from them."""
    ordered = time_ordered(frame)
    latest = aggregates.latest(ordered)
    rows = ordered.to_dict("records")
    features = feature_matrix(rows, [latest.get(str(r["account_id"]), DEFAULT_AGGREGATES) for r in rows])
    return ordered, latest, features


def train_bundle(directory: Path, version: str, frame: pd.DataFrame, n_trees: int, fraud_rate: float) -> None:
    """An XGBoost bundle trained on the features serving computes for ``frame`` (latest aggregates), with its
    feature and score reference bins, its threshold at ``fraud_rate`` of the rows, and its feature store — so
    traffic drawn like ``frame`` shows only sampling noise against its references."""
    ordered, latest, features = serving_features(frame)
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 4, "eta": 0.2, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(features, label=ordered["is_fraud"].to_numpy()), num_boost_round=n_trees)
    calibration = Calibration(method="identity")
    scores = calibration.apply(np.asarray(booster.inplace_predict(features), dtype=np.float32))
    threshold = float(np.quantile(scores, 1.0 - fraud_rate))
    manifest = Manifest(
        version=version,
        feature_names=list(FEATURE_NAMES),
        calibration=calibration,
        threshold=ThresholdPolicy(policy="target_precision", threshold=threshold, target_precision=0.8),
        feature_reference={
            name: reference_bins(features[:, FEATURE_NAMES.index(name)], N_REFERENCE_BINS) for name in DRIFT_FEATURES
        },
        score_reference=reference_bins(scores, N_REFERENCE_BINS),
        metrics={"train_rows": float(len(ordered))},
        params={**params, "num_boost_round": n_trees},
        sha256="",
        created_at=datetime.now(UTC).isoformat(),
    )
    save_bundle(booster, manifest, directory)
    build_store(directory / STORE_FILE, latest)


def refund_body(row: Mapping[str, Any]) -> dict[str, Any]:
    """A history row as the public API's request (the locustfile's shape, but ``yearsActive`` unrounded: rounding
    moves values that sit exactly on a quantile edge of the reference bins — accounts repeat — across it)."""
    body: dict[str, Any] = {
        "yearsActive": float(row["yearsActive"]),
        "amount": float(row["amount"]),
        "ipAccounts": int(row["ipAccounts"]),
        "accountId": str(row["account_id"]),
    }
    if isinstance(row["itemDescription"], str):
        body["itemDescription"] = row["itemDescription"]
    return body


# --------------------------------------------------------------------------------------------------- controller


@dataclass(frozen=True)
class ControllerConfig:
    """What one local controller needs to know (→ its ``FW_ROLLOUT_*`` / ``FW_*`` environment)."""

    name: str
    model_home: Path
    workdir: Path
    prometheus_url: str
    #: The router's control listener (admin and metrics; RouterProcess.control_url).
    router_control_url: str
    metrics_port: int
    policy_yaml: str
    admin_token: str
    quality_set: Path | None
    start_timeout_s: float
    extra_scrape_targets: Sequence[str] = ()

    @property
    def state_dir(self) -> Path:
        return self.workdir / "rollout"

    @property
    def targets_file(self) -> Path:
        return self.workdir / "prometheus" / "targets.json"


def controller_env(config: ControllerConfig) -> dict[str, str]:
    """The controller's environment (also right for ``rolloutctl`` and the processes next to it)."""
    prefix = "FW_ROLLOUT_CONTROLLER__"
    policy = config.workdir / "policy.yaml"
    policy.write_text(config.policy_yaml)
    router_address = config.router_control_url.removeprefix("http://")
    targets = [router_address, f"{HOST}:{config.metrics_port}", *config.extra_scrape_targets]
    env = {
        **os.environ,
        "FW_HOME": str(config.model_home),
        "FW_LOG_LEVEL": "INFO",
        "FW_PROCESS__START_TIMEOUT_S": str(config.start_timeout_s),
        "FW_ROLLOUT_HOME": str(config.workdir),
        "FW_ROLLOUT_LOG_LEVEL": "INFO",
        "FW_ROLLOUT_ROUTER__ADMIN_TOKEN": config.admin_token,
        f"{prefix}NAME": config.name,
        f"{prefix}STATE_DIR": str(config.state_dir),
        f"{prefix}POLICY_FILE": str(policy),
        f"{prefix}PROMETHEUS_URL": config.prometheus_url,
        f"{prefix}METRICS_PORT": str(config.metrics_port),
        f"{prefix}COMMAND_WAIT_TIMEOUT_S": "60",
        f"{prefix}LOCAL__ROUTER_URLS": json.dumps([config.router_control_url]),
        f"{prefix}LOCAL__PROMETHEUS_TARGETS_FILE": str(config.targets_file),
        f"{prefix}LOCAL__SCRAPE_TARGETS": json.dumps(targets),
        f"{prefix}LOCAL__SERVER_ENV": json.dumps(replay_server_env(config.workdir)),
    }
    if config.quality_set is not None:
        env[f"{prefix}QUALITY_SET"] = str(config.quality_set)
    return env


def start_process(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child process run from the repository root, its output appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv), cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def start_controller(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m rollout.controller --stop-workloads-on-exit`` (its model servers stop with it)."""
    return start_process([sys.executable, "-m", "rollout.controller", "--stop-workloads-on-exit"], env, log_path)


def stop_process(process: subprocess.Popen[bytes] | None, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal, wait up to a minute, then kill."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rolloutctl(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rolloutctl"), *args], env=dict(env), capture_output=True, text=True, timeout=120, check=False
    )


def router_ready(router: RouterProcess) -> bool:
    try:
        return httpx.get(router.url + "/readyz", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
