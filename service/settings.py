"""Every path, threshold, URL and timeout of the model side, from the environment (prefix ``FW_``).

Nested groups use ``__`` as the delimiter, e.g. ``FW_TRAIN__N_ESTIMATORS=400`` or
``FW_SERVE__FEATURE_STORE_TIMEOUT_MS=3``. Nothing in the logic hard-codes these values.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DataSettings(BaseModel):
    """The synthetic generator's defaults and the real benchmark's location."""

    n_accounts: int = Field(20_000, ge=100)
    n_requests: int = Field(120_000, ge=1_000)
    days: int = Field(180, ge=7)
    fraud_rate: float = Field(0.01, gt=0.0, lt=0.5)
    seed: int = 7
    creditcard_package: str = "fraud_analysis"
    creditcard_relpath: str = "datasets/raw/creditcard.csv"


class TrainSettings(BaseModel):
    """XGBoost hyper-parameters, split fractions and the decision-threshold policy."""

    n_estimators: int = Field(300, ge=10)
    max_depth: int = Field(6, ge=1, le=16)
    learning_rate: float = Field(0.08, gt=0.0, le=1.0)
    subsample: float = Field(0.9, gt=0.0, le=1.0)
    colsample_bytree: float = Field(0.9, gt=0.0, le=1.0)
    min_child_weight: float = Field(1.0, ge=0.0)
    early_stopping_rounds: int = Field(40, ge=1)
    nthread: int = Field(2, ge=1)
    seed: int = 42
    train_fraction: float = Field(0.70, gt=0.1, lt=0.95)
    valid_fraction: float = Field(0.15, gt=0.01, lt=0.5)
    imbalance_strategies: tuple[Literal["none", "scale_pos_weight", "smote"], ...] = (
        "none",
        "scale_pos_weight",
        "smote",
    )
    smote_ratio: float = Field(0.1, gt=0.0, le=1.0)
    #: Candidates for the served calibration (service.training.evaluate.choose_calibration): the default two keep
    #: the booster's ranking (served PR-AUC = raw); ``isotonic`` (the step fit) turns distinct scores into ties, for
    #: comparison.
    calibration_methods: tuple[Literal["isotonic", "interpolated_isotonic", "platt"], ...] = (
        "interpolated_isotonic",
        "platt",
    )
    threshold_policy: Literal["target_precision", "cost"] = "target_precision"
    target_precision: float = Field(0.80, gt=0.0, le=1.0)
    cost_false_negative: float = Field(50.0, gt=0.0)
    cost_false_positive: float = Field(5.0, gt=0.0)
    top_k_percents: tuple[float, ...] = (0.5, 1.0, 5.0)
    reference_bins: int = Field(10, ge=2, le=50)
    calibration_bins: int = Field(10, ge=2, le=50)
    #: Calibration choice: the first ``calibration_fit_fraction`` of the (time-ordered) validation rows fit each
    #: method, the rest choose between them; the chosen method is then refit on all validation rows.
    calibration_fit_fraction: float = Field(0.5, gt=0.1, lt=0.9)
    smote_k_neighbors: int = Field(5, ge=1)
    #: The features a model is trained on (service.data.features.FEATURE_SETS): ``velocity`` adds the online store's
    #: velocity and cross-entity features (service/data/velocity.py) to ``base``.
    feature_set: Literal["base", "velocity"] = "velocity"
    #: Where the booster is trained (service/training/engines.py): ``local`` — one process, ``hist`` (the default);
    #: ``dask`` — ``xgboost.dask`` on a dask.distributed cluster (``FW_ENGINE__…``), reading Parquet lazily;
    #: ``external_memory`` — one process, batches streamed from Parquet into XGBoost's external-memory DMatrix.
    #: Every engine produces the same verified bundle and passes the same gates.
    engine: Literal["local", "dask", "external_memory"] = "local"


class EngineSettings(BaseModel):
    """The training engines beyond one process (``FW_TRAIN__ENGINE``): the Dask cluster and the external-memory path."""

    #: An existing Dask scheduler (``tcp://scheduler:8786``: a Dask Kubernetes operator's DaskCluster, or any
    #: cluster); None starts a LocalCluster of ``dask_workers`` worker processes on this machine for the run.
    dask_scheduler_address: str | None = None
    dask_workers: int = Field(2, ge=1)
    dask_threads_per_worker: int = Field(1, ge=1)
    #: Per worker process of a LocalCluster (dask's syntax, e.g. ``2GiB``; ``auto`` splits the machine's memory).
    dask_memory_limit: str = "2GiB"
    #: Seconds to wait for the scheduler and its workers.
    dask_connect_timeout_s: float = Field(60.0, gt=0.0)
    #: Rows per batch the external-memory iterator hands XGBoost (each batch is one Parquet row group or less).
    external_memory_batch_rows: int = Field(250_000, ge=1_000)
    #: Where XGBoost keeps its external-memory pages (None: a temporary directory removed after the run).
    external_memory_cache_dir: Path | None = None


class FeatureLogSettings(BaseModel):
    """The feature log (service/data/feature_log.py): each decision's feature vector exactly as served, under the
    router's prediction ID, as Parquet partitioned by day — the next training set once the labels arrive."""

    enabled: bool = False
    #: The dataset's root (``day=YYYY-MM-DD/*.parquet`` below it); None = ``HOME/feature-log``.
    directory: Path | None = None
    #: A background thread writes the buffered rows every ``flush_interval_s`` or once ``flush_max_rows`` wait.
    flush_interval_s: float = Field(60.0, gt=0.0)
    flush_max_rows: int = Field(50_000, ge=1)
    #: Rows held in memory at most (a stalled disk drops the excess, counted); the request path never waits.
    max_buffer_rows: int = Field(200_000, ge=1)
    #: Day partitions older than this are deleted; and the oldest go first while the dataset exceeds ``max_bytes``.
    retention_days: int = Field(90, ge=1)
    max_bytes: int = Field(20 * 2**30, ge=2**20)
    #: How often a writer applies the retention (it lists and sizes every partition).
    retention_check_interval_s: float = Field(300.0, gt=0.0)
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class QualitySettings(BaseModel):
    """Floors of the pre-rollout quality gate (a candidate scored on the frozen labelled set)."""

    min_pr_auc: float = Field(0.80, ge=0.0, le=1.0)
    min_recall_at_threshold: float = Field(0.60, ge=0.0, le=1.0)


class OnlineStoreSettings(BaseModel):
    """The online feature store of the velocity features (service/data/online_store.py), shared by every model version.

    ``url``: empty → the embedded default, a SQLite file under ``FW_HOME`` (``online/velocity.sqlite``) that every
    model server of the machine shares; ``none`` → no store (velocity features are the defaults, counted as fallbacks
    with reason ``unavailable``); ``sqlite:///path``; ``redis://host:6379/0`` (``rediss://`` for TLS). A Redis
    password is read from ``password_file`` (the chart mounts its Secret there), never put in the URL.
    """

    url: str = ""
    password_file: Path | None = None
    #: The read budget of one request's (or one batch's) features: one round trip, then the defaults.
    timeout_ms: float = Field(5.0, gt=0.0)
    #: Which clock a scored request's event takes: ``server`` (its arrival here) or ``request`` (the request's own
    #: ``eventTime``, when it has one: replays of a recorded stream, e.g. the demo's time-compressed traffic).
    event_time: Literal["server", "request"] = "server"
    #: The background writer: queue bound (beyond it events are dropped and counted), batch size, retries.
    write_queue_max: int = Field(50_000, ge=1)
    write_batch_max: int = Field(256, ge=1)
    write_timeout_s: float = Field(2.0, gt=0.0)
    write_retries: int = Field(2, ge=0)
    write_retry_pause_s: float = Field(0.05, ge=0.0)
    #: How long an event's ID is remembered (a replay within it is a no-op).
    event_ttl_s: float = Field(2 * 86_400.0, gt=0.0)
    #: Redis key prefix (several deployments may share one Redis under different prefixes).
    key_prefix: str = "fw:v1:"
    #: The embedded store forgets expired state every this many events written.
    sqlite_trim_every: int = Field(5_000, ge=1)
    #: How long a stopping worker waits for its queued events to be written.
    close_timeout_s: float = Field(2.0, ge=0.0)


class ServeSettings(BaseModel):
    """The scoring service: where its model comes from and its latency budget."""

    #: Where the bundle comes from (service/artifacts/source.py): a directory; else a registry URI
    #: (``models:/<name>/<version>`` or ``models:/<name>@<alias>``); else, when set, ``model_name``'s alias.
    model_dir: Path | None = None
    #: With ``model_dir``: the bundle digest (service.artifacts.bundle.bundle_digest) it must have; checked before
    # anything
    #: is parsed. A registry bundle is always checked against the version's ``bundle_sha256`` tag.
    model_digest: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    model_uri: str | None = None
    model_alias: str = "champion"
    model_name: str = "refund-fraud"
    batch_max_size: int = Field(64, ge=1)
    batch_max_latency_ms: int = Field(5, ge=1)
    feature_store_timeout_ms: float = Field(5.0, gt=0.0)
    max_batch_items: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_text_chars: int = Field(500, ge=1)
    workers: int = Field(1, ge=1)
    #: Route single requests through BentoML's adaptive batcher (CorkDispatcher); measured in
    #: benchmarks/serving_benchmark.py, where direct scoring wins on 2 cores, hence off by default.
    adaptive_batching: bool = False
    #: BentoML's own per-request access log (the service already logs one JSON line per decision).
    access_log: bool = False
    #: Call deadline-aware stores (SQLite: progress-handler deadline) inline; False isolates every lookup in
    #: a thread pool of ``feature_store_threads`` (for stores on slow or remote disks).
    feature_store_inline: bool = True
    feature_store_threads: int = Field(2, ge=1)
    #: How long the service waits at start-up for its bundle to appear (0 = it must exist) and how often it looks.
    model_wait_timeout_s: float = Field(0.0, ge=0.0)
    model_poll_interval_s: float = Field(0.2, gt=0.0)
    #: BentoML's OpenTelemetry middleware on the scoring routes (off: ≈ 15 % of a request's CPU and no exporter
    #: is configured by default; the correlation ID already ties a decision's log lines together).
    trace_scoring_routes: bool = False
    #: Export BentoML's spans over OTLP/HTTP to this URL (e.g. ``http://otel-collector:4318/v1/traces``): every
    #: traced request whose caller sampled it (W3C ``traceparent``: the router's span as parent); the probes and
    #: ``/metrics`` are never traced. None: no exporter. The scoring routes need ``trace_scoring_routes`` too.
    otlp_endpoint: str | None = None
    #: Review decisions carry their top contributing features (``reasons``; a request's ``explain`` asks for them
    #: whatever the decision): at most this many, from XGBoost's ``pred_contribs``.
    reasons_on_review: bool = True
    reasons_top_k: int = Field(3, ge=1, le=32)
    #: Call XGBoost's C predict function directly (the call ``Booster.inplace_predict`` makes, without its
    #: ≈ 150 µs of per-call Python overhead); checked bit-exact against ``inplace_predict`` at load.
    direct_predict: bool = True
    #: Who answers a validated scoring request: ``direct`` — the request guard (the ASGI middleware that has just
    #: parsed and validated the body) calls the same ``Runtime.decide`` as the API methods and writes the JSON
    #: itself; ``bentoml`` — the body goes on to BentoML's API method (which parses it a second time and adds its
    #: routing, signature inspection and serde per call). Same responses, metrics and logs either way; measured
    #: side by side in benchmarks/serving_benchmark.py.
    dispatch: Literal["direct", "bentoml"] = "direct"
    online_store: OnlineStoreSettings = OnlineStoreSettings()


class ProcessSettings(BaseModel):
    """Child processes started by the CLI, the demo and the rollout helpers (e.g. ``bentoml serve``)."""

    host: str = "127.0.0.1"
    #: ``bentoml serve`` target (import path of the service class), run from the project's source root.
    bento_target: str = "service.serving.bento:RefundFraudService"
    start_timeout_s: float = Field(180.0, gt=0.0)
    stop_timeout_s: float = Field(20.0, gt=0.0)
    poll_interval_s: float = Field(0.25, gt=0.0)
    http_timeout_s: float = Field(10.0, gt=0.0)
    #: Lines of a failed server's log quoted in the error.
    log_tail_lines: int = Field(40, ge=1)


# ------------------------------------------------------------------------------------------------- retraining


class RetrainJobSettings(BaseModel):
    """Where the webhook's retrains run on Kubernetes (``runner: job``): a batch/v1 Job made from the chart's retrain
    CronJob's ``jobTemplate`` (its resources, retries, deadline, ServiceAccount), in the receiver's namespace."""

    namespace: str = "default"
    #: The CronJob whose ``jobTemplate`` each alert-triggered Job copies (the chart's retraining CronJob).
    cronjob: str = ""
    #: The container of the template that runs ``fraudwatch retrain`` (its args get the run's id and reason).
    container: str = "retraining"
    #: A kubeconfig file; None = the pod's in-cluster service account (else ``~/.kube/config``).
    kubeconfig: Path | None = None
    request_timeout_s: float = Field(30.0, gt=0.0)
    #: How often the receiver reads the running Job's status.
    poll_s: float = Field(10.0, gt=0.0)


class RetrainWebhookSettings(BaseModel):
    """The Alertmanager webhook receiver (``python -m service.retraining.webhook``): which alerts trigger a retrain."""

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    #: The bearer token Alertmanager sends (``http_config.authorization.credentials_file``), read from this file.
    #: Required: without one the receiver refuses to start (the chart always sets one).
    token_file: Path | None = None
    #: Local development only: accept unauthenticated calls when no ``token_file`` is set. Never in production —
    #: an alert starts a retrain whose challenger is handed to a rollout.
    insecure_no_auth: bool = False
    #: Alert ``layer`` labels (deploy/prometheus/rules.yml) whose firing alerts start a retrain.
    trigger_layers: tuple[str, ...] = ("input_drift", "output_drift", "outcome")
    #: Alerts of those layers that never start one: no labels arrive (retraining cannot help), or a candidate is
    #: compared with the stable (the rollout's gates act on it; a retrain would only queue another candidate).
    ignored_alerts: tuple[str, ...] = (
        "FraudwatchLabelsStalled",
        "FraudwatchShadowAgreementLow",
        "FraudwatchRecallDropVsStable",
        "FraudwatchPrecisionDropVsStable",
    )
    #: After a retrain starts, further triggers within this many seconds start none (an alert storm = one retrain).
    cooldown_s: float = Field(6 * 3600.0, ge=0.0)
    #: How long an alert (fingerprint + start time) is remembered, so repeated notifications start nothing.
    dedupe_ttl_s: float = Field(14 * 86_400.0, gt=0.0)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    #: The receiver's durable state (seen alerts, last start, recent runs); default ``HOME/retrain/webhook.json``.
    state_file: Path | None = None
    #: Recent retrain runs kept in the state (``GET /retrains``).
    keep_runs: int = Field(50, ge=1)
    #: A retrain subprocess running longer than this is killed (outcome ``failed``); a Job has the template's
    #: ``activeDeadlineSeconds`` instead.
    run_timeout_s: float = Field(4 * 3600.0, gt=0.0)
    graceful_shutdown_s: float = Field(10.0, ge=0.0)
    #: Where a retrain runs: ``subprocess`` — a child process of the receiver (local mode); ``job`` — a Kubernetes
    #: Job from the retrain CronJob's template (``job``), which outlives the receiver's pod.
    runner: Literal["subprocess", "job"] = "subprocess"
    job: RetrainJobSettings = RetrainJobSettings()


class KubeHandoffSettings(BaseModel):
    """Starting a rollout on Kubernetes: a merge patch of the ModelRollout's ``spec.candidate``."""

    namespace: str = "default"
    rollout_name: str = ""
    #: The model-server image of the new candidate; empty = keep the image of the current ``spec.candidate``.
    image: str = ""
    #: Where the candidate's server loads the registered version from (``{model}``, ``{number}``).
    model_uri_template: str = "models:/{model}/{number}"
    #: A kubeconfig file; None = the pod's in-cluster service account (else ``~/.kube/config``).
    kubeconfig: Path | None = None
    request_timeout_s: float = Field(30.0, gt=0.0)


class RetrainSettings(BaseModel):
    """Retraining and recalibration on the latest labelled window, and the hand-off of the result to delivery."""

    #: The labelled refund stream (the synthetic schema): a CSV(.gz) file or a directory of them.
    data_path: Path | None = None
    #: The training window: the last ``window_days`` days of the stream (up to its newest labelled row).
    window_days: float = Field(28.0, gt=0.0)
    min_rows: int = Field(2_000, ge=100)
    min_positives: int = Field(50, ge=2)
    #: The frozen labelled regression set (JSON meta with ``file`` + ``sha256``) every new version must pass with
    #: the ``quality`` floors, e.g. tests/quality/data/frozen_synthetic.json. Required: no gate, no version.
    regression_set: Path | None = None
    #: The calibration bridge's window (labels of the last N days) and its held-out evidence (the later part).
    recalibration_window_days: float = Field(7.0, gt=0.0)
    recalibration_holdout_fraction: float = Field(0.3, gt=0.05, lt=0.9)
    #: A recalibration ships only when it lowers the held-out ECE by at least this much.
    min_ece_improvement: float = Field(0.0, ge=0.0)
    #: How a registered challenger reaches delivery: ``rolloutctl`` (local controller), ``kube`` (patch the
    #: ModelRollout), ``none`` (register only).
    handoff: Literal["rolloutctl", "kube", "none"] = "rolloutctl"
    #: The ``rolloutctl`` command (a bare name is looked up beside the Python interpreter, then on PATH).
    rolloutctl: tuple[str, ...] = ("rolloutctl",)
    #: ``rolloutctl --state-dir`` (None: its own default, FW_ROLLOUT_HOME/rollout).
    rollout_state_dir: Path | None = None
    #: How long ``rolloutctl start`` waits for the controller to apply the command.
    handoff_timeout_s: float = Field(120.0, gt=0.0)
    #: What a retrain learns from: ``stream`` — the labelled refund stream at ``data_path`` (features recomputed);
    #: ``feature_log`` — the features exactly as served (``FW_FEATURE_LOG__DIRECTORY``) joined with the labels that
    #: arrived in the prediction log (``labels_dsn``/``labels_dsn_file``) by the time the retrain runs.
    source: Literal["stream", "feature_log"] = "stream"
    #: The prediction log's database (``rollout.outcomes``; SQLAlchemy URL) the labels are read from, read-only.
    labels_dsn: SecretStr | None = None
    #: A file holding that URL (a mounted Secret: the password stays out of the environment); wins over labels_dsn.
    labels_dsn_file: Path | None = None
    kube: KubeHandoffSettings = KubeHandoffSettings()
    webhook: RetrainWebhookSettings = RetrainWebhookSettings()


class Settings(BaseSettings):
    """The root of fraudwatch's model-side configuration."""

    model_config = SettingsConfigDict(env_prefix="FW_", env_nested_delimiter="__", extra="ignore")

    home: Path = Path("var")
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "refund-fraud"
    registered_model_name: str = "refund-fraud"
    log_level: str = "INFO"
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    serve: ServeSettings = ServeSettings()
    quality: QualitySettings = QualitySettings()
    process: ProcessSettings = ProcessSettings()
    retrain: RetrainSettings = RetrainSettings()
    engine: EngineSettings = EngineSettings()
    feature_log: FeatureLogSettings = FeatureLogSettings()

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: a server when configured, else a local SQLite store under ``home``."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def feature_log_dir(self) -> Path:
        return self.feature_log.directory or self.home / "feature-log"

    @property
    def mlflow_artifact_root(self) -> str:
        return (self.home / "mlruns").resolve().as_uri()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
