"""``fraudwatch``: argument parsing, help, documented exit codes, and the quick commands run for real."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from service.artifacts.bundle import ModelIntegrityError
from service.artifacts.registry import RegistryNotFoundError
from service.cli.main import EPILOG, ExitCode, build_parser, exit_code_for, main
from service.common.processes import free_port
from service.demo.quickstart import PREDICT_ROUTE
from service.training.evaluate import GateReport
from service.training.pipeline import QualityGateFailedError

FRAUDWATCH = Path(sys.executable).parent / "fraudwatch"

HELP_PATHS = [
    [],
    ["generate"],
    ["train"],
    ["registry"],
    ["registry", "list"],
    ["registry", "alias"],
    ["registry", "promote"],
    ["registry", "rollback"],
    ["registry", "fetch"],
    ["retrain"],
    ["recalibrate"],
    ["score"],
    ["demo"],
]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("FW_HOME", str(home))
    monkeypatch.delenv("FW_MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.mark.parametrize("path", HELP_PATHS, ids=lambda p: " ".join(p) or "fraudwatch")
def test_help_exits_0_and_documents_exit_codes(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*path, "--help"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.startswith("usage: fraudwatch")
    assert "quality gate failed" in out
    assert "130" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-command"],
        ["train"],  # --version-name is required
        ["generate"],  # --out is required
        ["generate", "--out", "x.csv", "--n-requests", "0"],
        ["generate", "--out", "x.csv", "--n-requests", "many"],
        ["registry"],
        ["registry", "promote"],
        ["score", "--url", "http://127.0.0.1:1", "--json", "{not json"],
        ["score", "--url", "http://127.0.0.1:1", "--json", "[1, 2]"],
        ["demo", "--unknown-flag"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == ExitCode.USAGE
    assert "error:" in capsys.readouterr().err


def test_reserved_alias_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "alias", "champion", "1"]) == ExitCode.USAGE
    assert "promote" in capsys.readouterr().err


def test_missing_data_file_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "absent.csv"), "--version-name", "v1"])
    assert code == ExitCode.NOT_FOUND
    assert "absent.csv" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
        (QualityGateFailedError(GateReport(False, "v9", 10, {"pr_auc": 0.1}, {"pr_auc": 0.8}, ["pr_auc low"])), 3),
        (RegistryNotFoundError("no alias"), 4),
        (FileNotFoundError("data.csv"), 4),
        (ModelIntegrityError("sha256 mismatch"), 5),
        (RuntimeError("anything else"), 1),
    ],
)
def test_errors_map_to_the_documented_exit_codes(error: BaseException, code: int) -> None:
    assert exit_code_for(error) == code
    assert f"  {code} " in EPILOG


def test_generate_writes_the_requested_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data.csv.gz"
    assert main(["generate", "--out", str(out), "--n-requests", "600", "--seed", "3"]) == ExitCode.OK
    with gzip.open(out, "rt", encoding="utf-8") as handle:
        frame = pd.read_csv(handle)
    assert len(frame) == 600
    assert {"yearsActive", "amount", "ipAccounts", "is_fraud", "pattern"} <= set(frame.columns)
    assert f"wrote 600 rows ({int(frame['is_fraud'].sum())} fraud)" in capsys.readouterr().out


def test_generate_is_deterministic_per_seed_and_drift_adds_the_new_farm(tmp_path: Path) -> None:
    paths = [tmp_path / name for name in ("a.csv", "b.csv", "drift.csv")]
    main(["generate", "--out", str(paths[0]), "--n-requests", "3000", "--seed", "5"])
    main(["generate", "--out", str(paths[1]), "--n-requests", "3000", "--seed", "5"])
    main(["generate", "--out", str(paths[2]), "--n-requests", "3000", "--seed", "5", "--drift"])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert "new_bot_farm" not in set(pd.read_csv(paths[0])["pattern"])
    assert "new_bot_farm" in set(pd.read_csv(paths[2])["pattern"])


def test_score_without_a_server_fails_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    assert main(["score", "--url", url, "--json", '{"yearsActive": 1.5, "amount": 45.0, "ipAccounts": 2}']) == 1
    assert "ConnectError" in capsys.readouterr().err


def test_registry_list_of_an_empty_store_exits_4(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "list"]) == ExitCode.NOT_FOUND
    assert "no versions" in capsys.readouterr().out
    assert (isolated_home / "mlflow.db").is_file()


def test_demo_scores_on_the_services_route() -> None:
    from service.serving.bento import PREDICT_ROUTE as SERVICE_ROUTE

    assert PREDICT_ROUTE == SERVICE_ROUTE


def test_parser_defaults_leave_settings_in_charge() -> None:
    args = build_parser().parse_args(["train", "--version-name", "v2"])
    assert (args.data, args.seed, args.n_requests, args.alias, args.register) == (None, None, None, None, False)


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["nope"], 2)])
def test_console_script_entry_point(argv: list[str], code: int) -> None:
    completed = subprocess.run([str(FRAUDWATCH), *argv], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == code
    assert "usage: fraudwatch" in completed.stdout + completed.stderr
