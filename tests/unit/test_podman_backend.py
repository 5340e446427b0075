"""The podman backend's container spec: what the chart gives a model-server pod, in libpod's terms (the walk from the
images, tests/integration/test_rollout_podman.py, checks the running containers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.backends.podman import PORT_LABEL, ROLLOUT_LABEL, VERSION_LABEL, container_name, container_spec, readable
from rollout.settings import ControllerSettings, PodmanBackendSettings

CHART_ENV = {"FW_LOG_LEVEL": "INFO", "FW_HOME": "/var/lib/fraudwatch", "FW_SERVE__MODEL_NAME": "refund-fraud"}


def test_a_model_server_container_has_the_charts_security_context_and_environment(tmp_path: Path) -> None:
    settings = PodmanBackendSettings(image="localhost/fraudwatch/refund-fraud-model:abc", env=CHART_ENV)
    spec = container_spec(settings, name="fw-it-v2", rollout="it", version="v2", model_dir=tmp_path, host_port=4321)

    assert (spec["user"], spec["read_only_filesystem"], spec["cap_drop"], spec["no_new_privileges"]) == (
        "1034:1034", True, ["ALL"], True,
    )  # fmt: skip
    assert spec["env"] == {**CHART_ENV, "FW_SERVE__MODEL_VERSION": "v2", "FW_SERVE__MODEL_DIR": "/models/v2"}
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert {d for d, m in mounts.items() if m["type"] == "tmpfs"} == {"/tmp", "/var/lib/fraudwatch"}
    assert mounts["/models/v2"]["source"] == str(tmp_path.resolve())
    assert "ro" in mounts["/models/v2"]["options"]
    assert spec["portmappings"] == [{"host_ip": "127.0.0.1", "host_port": 4321, "container_port": 3000,
                                     "protocol": "tcp"}]  # fmt: skip
    assert spec["labels"] == {ROLLOUT_LABEL: "it", VERSION_LABEL: "v2", PORT_LABEL: "4321"}
    assert {limit["type"] for limit in spec["r_limits"]} == {"nofile", "nproc"}


def test_container_names_are_safe_for_any_version() -> None:
    assert container_name("fw", "it", "v2") == "fw-it-v2"
    assert container_name("fw", "it", "v2+build/7") == "fw-it-v2-build-7"


def test_the_user_must_not_be_root() -> None:
    with pytest.raises(ValueError, match="user"):
        PodmanBackendSettings(user="0:0")


def test_the_backend_is_chosen_by_setting() -> None:
    assert ControllerSettings.model_validate({"backend": "podman"}).backend == "podman"


def test_a_fetched_bundle_is_made_readable_by_the_servers_uid(tmp_path: Path) -> None:
    bundle = tmp_path / "v2"
    bundle.mkdir(mode=0o700)
    (bundle / "features.sqlite").write_bytes(b"x")
    (bundle / "features.sqlite").chmod(0o600)
    readable(bundle)
    assert (bundle.stat().st_mode & 0o777, (bundle / "features.sqlite").stat().st_mode & 0o777) == (0o755, 0o644)


def test_a_registry_backed_controller_without_the_model_stack_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from rollout.backends import base

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(base.RegistryUnavailableError, match=r"missing here: mlflow .*retraining image"):
        base.require_registry_stack()
