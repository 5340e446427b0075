"""Model-quality regression on the FROZEN labelled synthetic set.

The frozen set (``data/frozen_synthetic.csv.gz``, 20,000 requests over 30 days incl. the ``new_bot_farm`` drift
pattern from day 15) was generated once by ``tests/quality/make_frozen.py`` and committed with its SHA-256; the
test refuses a file that does not match. The model is trained by the real pipeline on a training frame generated
from a fixed seed (the generator may evolve; the goalposts cannot), then scored on the frozen set through the
pre-rollout gate ``service.training.evaluate.quality_gate``.

Measured (2026-11-23, XGBoost 3.2.0, default TrainSettings, nthread 2; identical in repeated runs):
    trained with drift:  frozen-set PR-AUC 0.901, recall 0.856 / precision 0.776 at the validation-chosen
                         threshold; recall per pattern: bot_farm 1.0, new_bot_farm 1.0, high_value 0.917,
                         serial_refunder 0.493; strategy ``scale_pos_weight`` (valid PR-AUC none 0.963,
                         scale_pos_weight 0.965, smote 0.957); Platt calibration.
    trained blind to the new farm: frozen-set PR-AUC 0.456, recall 0.327, new_bot_farm recall 0.0 → gate fails.
Floors (``FLOORS``) sit a little below the first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from service.artifacts.bundle import load_bundle
from service.data.synthetic import SyntheticConfig, generate
from service.settings import QualitySettings, Settings
from service.training.evaluate import file_sha256, load_frozen_set, quality_gate
from service.training.train import TrainingResult, train_pipeline

pytestmark = pytest.mark.quality

DATA = Path(__file__).parent / "data"
META = DATA / "frozen_synthetic.json"
TRAINING_FRAME = SyntheticConfig(
    n_accounts=10_000, n_requests=60_000, days=90, seed=11, drift=True, drift_start=0.5, start="2026-04-01"
)
#: Floors a little below the measured values in the module docstring.
FLOORS = QualitySettings(min_pr_auc=0.85, min_recall_at_threshold=0.78)


@pytest.fixture(scope="module")
def frozen() -> pd.DataFrame:
    return load_frozen_set(META)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    return train_pipeline(generate(TRAINING_FRAME), Settings(), "quality", tmp_path_factory.mktemp("quality"))


def test_frozen_set_is_the_committed_one(frozen: pd.DataFrame) -> None:
    meta = json.loads(META.read_text())
    assert file_sha256(DATA / meta["file"]) == meta["sha256"]
    assert len(frozen) == meta["rows"]
    assert int(frozen["is_fraud"].sum()) == meta["frauds"]
    assert frozen["pattern"].value_counts().to_dict() == meta["patterns"]


def test_model_meets_floors_on_frozen_set(trained: TrainingResult, frozen: pd.DataFrame) -> None:
    model = load_bundle(trained.bundle_dir)
    report = quality_gate(model, frozen, FLOORS)
    assert report.passed, report.failures
    assert report.values["pr_auc"] >= FLOORS.min_pr_auc
    assert report.values["recall"] >= FLOORS.min_recall_at_threshold
    # the shipped default floors of the pre-rollout gate are met as well
    assert quality_gate(model, frozen, Settings().quality).passed


def test_a_model_blind_to_a_pattern_fails_the_gate(frozen: pd.DataFrame, tmp_path: Path) -> None:
    """The gate has teeth: a model trained without the drift pattern misses the new farm and fails the floors."""
    no_drift = SyntheticConfig(**{**TRAINING_FRAME.__dict__, "drift": False})
    result = train_pipeline(generate(no_drift), Settings(), "blind", tmp_path)
    report = quality_gate(load_bundle(result.bundle_dir), frozen, FLOORS)
    assert report.values["recall_new_bot_farm"] < report.values["recall_bot_farm"]
    assert not report.passed
