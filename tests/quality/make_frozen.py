"""Regenerate the frozen labelled synthetic set (run once; the result is committed).

    .venv/bin/python -m tests.quality.make_frozen              # the synthetic set
    .venv/bin/python -m tests.quality.make_frozen creditcard   # the credit-card split record

Writes ``tests/quality/data/frozen_synthetic.csv.gz`` (byte-for-byte deterministic gzip: mtime 0, no file name)
and ``frozen_synthetic.json`` with its SHA-256, the generator config and label counts. The quality test checks
the SHA-256, so a later change to the generator cannot silently move the goalposts: the committed file stays
what it was; regenerate it only deliberately, and say why in the commit.

``creditcard`` writes ``creditcard_split.json``: the SHA-256 of the credit-card CSV and of the stratified
80/20 seed-42 split's test (and validation) row indices, so the quality test notices a different file or a
scikit-learn change to ``train_test_split``.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path

import sklearn

from service.data import creditcard
from service.data.synthetic import SyntheticConfig, generate
from service.settings import DataSettings
from service.training.evaluate import file_sha256

DATA_DIR = Path(__file__).parent / "data"
CSV_NAME = "frozen_synthetic.csv.gz"
META_NAME = "frozen_synthetic.json"
CREDITCARD_SPLIT_NAME = "creditcard_split.json"
#: 20k requests after the training period, with the drift scenario (a new bot farm from the middle on).
CONFIG = SyntheticConfig(
    n_accounts=4_000, n_requests=20_000, days=30, seed=20_260_701, drift=True, drift_start=0.5, start="2026-07-01"
)


def creditcard_split_record() -> dict[str, object]:
    """What identifies the frozen credit-card evaluation: the file and the split's row indices."""
    settings = DataSettings()
    path = creditcard.locate(settings)
    y = creditcard.labels(creditcard.load(settings, path))
    split = creditcard.stratified_split(y)
    return {
        "csv_sha256": file_sha256(path),
        "protocol": "sklearn train_test_split(test_size=0.2, stratify=Class, random_state=42); validation = "
        "train_test_split(train part, test_size=0.2, stratify, random_state=42)",
        "sklearn_version": sklearn.__version__,
        "sizes": split.sizes(y),
        "test_indices_sha256": creditcard.indices_sha256(split.test),
        "valid_indices_sha256": creditcard.indices_sha256(split.valid),
    }


def main() -> None:
    if sys.argv[1:] == ["creditcard"]:
        record = creditcard_split_record()
        (DATA_DIR / CREDITCARD_SPLIT_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(record, indent=2))
        return
    frame = generate(CONFIG)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    frame.to_csv(text, index=False, date_format="%Y-%m-%dT%H:%M:%S.%f")
    data_path = DATA_DIR / CSV_NAME
    with data_path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        handle.write(text.getvalue().encode("utf-8"))
    meta = {
        "file": CSV_NAME,
        "sha256": file_sha256(data_path),
        "rows": len(frame),
        "frauds": int(frame["is_fraud"].sum()),
        "patterns": {str(k): int(v) for k, v in frame["pattern"].value_counts().sort_index().items()},
        "generator": "service.data.synthetic.generate",
        "config": asdict(CONFIG),
    }
    (DATA_DIR / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
