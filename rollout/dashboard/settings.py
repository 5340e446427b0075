"""The dashboard's settings (``FW_ROLLOUT_DASHBOARD__…``)."""

from __future__ import annotations

from typing import Final

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TITLE: Final[str] = "fraudwatch — model rollout"


class DashboardSettings(BaseSettings):
    """The self-served page (``FW_ROLLOUT_DASHBOARD__…``)."""

    model_config = SettingsConfigDict(env_prefix="FW_ROLLOUT_DASHBOARD__", extra="ignore")

    prometheus_url: str = "http://127.0.0.1:9090"
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    title: str = DEFAULT_TITLE
    #: The page reloads itself this often.
    refresh_s: int = Field(15, ge=1)
    #: Sparklines cover this much history, in this many points.
    range_s: float = Field(3600.0, gt=0.0)
    points: int = Field(60, ge=2, le=11_000)
    query_timeout_s: float = Field(5.0, gt=0.0)
    #: Queries sent to Prometheus at once while rendering a page.
    max_concurrency: int = Field(8, ge=1)
    #: Rows shown per panel (the largest current values first for time series).
    max_series_per_panel: int = Field(12, ge=1)
    log_level: str = "INFO"
