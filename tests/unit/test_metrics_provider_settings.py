"""The controller's metrics-provider settings (rollout/settings.py MetricsProviderSettings): read from the
environment as the chart sets them, and refused at the boundary when they would send credentials the wrong way.
The provider against a real Prometheus behind an authenticating proxy: tests/integration/test_metrics_provider.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rollout.backends.prometheus import describe
from rollout.settings import ControllerSettings, MetricsProviderSettings, RolloutSettings


def test_the_chart_environment_configures_the_provider(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = tmp_path / "token"
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROMETHEUS_URL", "https://mimir.example:8080/prometheus")
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROVIDER__HEADERS", '{"X-Scope-OrgID": "fraud-team"}')
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROVIDER__BEARER_TOKEN_FILE", str(token))
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROVIDER__READY_PATH", "/api/v1/status/buildinfo")
    controller = RolloutSettings().controller
    assert controller.prometheus_url == "https://mimir.example:8080/prometheus"
    assert controller.provider.headers == {"X-Scope-OrgID": "fraud-team"}
    assert controller.provider.bearer_token_file == token
    assert controller.provider.ready_path == "/api/v1/status/buildinfo"
    assert describe(controller.provider) == "header X-Scope-OrgID, a bearer token"


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ({"headers": {"Authorization": "Bearer abc"}}, "carries credentials"),
        ({"headers": {"cookie": "session=abc"}}, "carries credentials"),
        ({"headers": {"Bad Header": "x"}}, "is not a header name"),
        ({"headers": {"X-Scope-OrgID": "a\r\nX-Evil: 1"}}, "line break"),
        ({"basic_auth_username": "fw"}, "basic auth needs"),
        ({"basic_auth_password_file": "/run/secret"}, "basic auth needs"),
        ({"bearer_token_file": "/t", "basic_auth_username": "fw", "basic_auth_password_file": "/p"}, "exclusive"),
        ({"basic_auth_username": "f:w", "basic_auth_password_file": "/p"}, "basic_auth_username"),
        ({"bearer_token_file": "/t", "sigv4": {"region": "eu-west-1"}}, "exclusive"),
        ({"sigv4": {"region": "eu-west-1", "access_key_id_file": "/k"}}, "together"),
        ({"sigv4": {"region": "eu-west-1", "session_token_file": "/s"}}, "session_token_file needs"),
        ({"sigv4": {"region": "Europe"}}, "region"),
        ({"sigv4": {"region": "eu-west-1", "service": "APS Workspaces"}}, "service"),
    ],
)
def test_credentials_the_wrong_way_are_refused(provider: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MetricsProviderSettings.model_validate(provider)


def test_a_url_with_credentials_is_refused_it_would_be_logged() -> None:
    with pytest.raises(ValidationError, match="prometheus_url"):
        ControllerSettings(prometheus_url="http://fw:s3cret@prometheus:9090")


def test_the_secret_is_never_in_the_settings_repr() -> None:
    provider = MetricsProviderSettings.model_validate({"bearer_token": "s3cret-token"})
    assert "s3cret-token" not in repr(provider) and "s3cret-token" not in str(provider.model_dump())


def test_the_chart_environment_configures_sigv4(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROVIDER__SIGV4__REGION", "eu-west-1")
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROVIDER__SIGV4__ACCESS_KEY_ID_FILE", str(tmp_path / "id"))
    monkeypatch.setenv("FW_ROLLOUT_CONTROLLER__PROVIDER__SIGV4__SECRET_ACCESS_KEY_FILE", str(tmp_path / "key"))
    provider = RolloutSettings().controller.provider
    assert provider.sigv4 is not None and provider.authenticated
    assert (provider.sigv4.region, provider.sigv4.service) == ("eu-west-1", "aps")
    assert provider.sigv4.access_key_id_file == tmp_path / "id"
    assert describe(provider) == "a SigV4 signature (aps, eu-west-1)"
