"""The model artifact: an XGBoost booster in its native UBJSON format plus a JSON manifest, never a pickle.

Layout of a bundle directory::

    model.ubj       the booster (``Booster.save_model``)
    manifest.json   version, feature names, calibration, threshold policy, reference bins, metrics,
                    and the SHA-256 of model.ubj, verified at every load
    features.sqlite (optional) the feature store the bundle serves with

The bundle digest (:func:`bundle_digest`) covers every file of the directory — manifest included, so the threshold
and the calibration too: the SHA-256 of the ``sha256sum``-style listing ``"<sha256 of file>  <name>\n"`` of all
files sorted by name (``cd bundle && sha256sum * | sha256sum`` in the C locale). The registry records it when a
version is registered; :func:`load_bundle` with ``expected_digest`` reads every file once, compares the digest
before anything is parsed, and builds the booster and the manifest from the very bytes that were hashed (a serving
worker also copies the feature store from those bytes into a private directory and opens that copy).

Calibration is stored as data (isotonic breakpoints or Platt coefficients) and applied with numpy, so loading
a model never executes stored code.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import numpy.typing as npt
import xgboost as xgb

MODEL_FILE = "model.ubj"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_EPS = 1e-6


class ModelIntegrityError(RuntimeError):
    """A bundle does not match its recorded digest, or the booster does not match the checksum in its manifest."""


@dataclass(frozen=True)
class Calibration:
    """Maps the booster's raw probability to a calibrated one.

    ``isotonic``: piecewise-linear through (``x``, ``y``) breakpoints; ``platt``: sigmoid(a·logit(p) + b);
    ``identity``: unchanged.
    """

    method: Literal["isotonic", "platt", "identity"]
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    a: float = 1.0
    b: float = 0.0

    def apply(self, raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        p = np.asarray(raw, dtype=np.float64)
        if self.method == "isotonic":
            return np.clip(np.interp(p, self.x, self.y), 0.0, 1.0)
        if self.method == "platt":
            return 1.0 / (1.0 + np.exp(-(self.a * logit(p) + self.b)))
        return p


def logit(probability: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """log(p / (1 - p)) with p clipped away from 0 and 1: the input of Platt scaling, at fit and at apply."""
    clipped = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.asarray(np.log(clipped / (1.0 - clipped)), dtype=np.float64)


@dataclass(frozen=True)
class ReferenceBins:
    """Bin edges and the training fraction in each bin; the PSI reference for one feature or for the score.

    ``edges`` are the inner cut points (k edges → k+1 bins); a value v falls in bin ``searchsorted(edges, v,
    side='right')``.
    """

    edges: list[float]
    fractions: list[float]

    def bin_of(self, value: float) -> int:
        return int(np.searchsorted(np.asarray(self.edges), value, side="right"))


@dataclass(frozen=True)
class ThresholdPolicy:
    """How the decision threshold was chosen, and the result."""

    policy: Literal["target_precision", "cost"]
    threshold: float
    target_precision: float | None = None
    cost_false_negative: float | None = None
    cost_false_positive: float | None = None
    #: ``target_precision`` only: False when no threshold reached the target on the data it was chosen on
    #: (the threshold then maximises precision instead).
    target_reached: bool | None = None
    #: Precision and recall at ``threshold`` on the data the threshold was chosen on (the validation window).
    validation_precision: float | None = None
    validation_recall: float | None = None


@dataclass(frozen=True)
class Manifest:
    version: str
    feature_names: list[str]
    calibration: Calibration
    threshold: ThresholdPolicy
    feature_reference: dict[str, ReferenceBins]
    score_reference: ReferenceBins
    metrics: dict[str, float]
    params: dict[str, Any]
    sha256: str
    created_at: str
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            version=str(data["version"]),
            feature_names=list(data["feature_names"]),
            calibration=Calibration(**data["calibration"]),
            threshold=ThresholdPolicy(**data["threshold"]),
            feature_reference={k: ReferenceBins(**v) for k, v in data["feature_reference"].items()},
            score_reference=ReferenceBins(**data["score_reference"]),
            metrics={k: float(v) for k, v in data["metrics"].items()},
            params=dict(data["params"]),
            sha256=str(data["sha256"]),
            created_at=str(data["created_at"]),
            format_version=int(data.get("format_version", FORMAT_VERSION)),
            extra=dict(data.get("extra", {})),
        )


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ScoringModel:
    """A loaded, verified model: raw booster probability → calibrated score → decision."""

    booster: xgb.Booster
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.threshold

    def model_input(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The model's columns of a feature matrix: a full one (``service.data.features.FEATURE_NAMES``) is reduced to
        the manifest's features; one already that wide is taken as it is."""
        names = self.manifest.feature_names
        if features.shape[1] == len(names):
            return features
        from service.data.features import select

        return select(features, names)

    def raw_scores(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Uncalibrated booster probabilities; ``inplace_predict`` on float32, no DMatrix per call. ``features``
        may be the full feature matrix (see :meth:`model_input`)."""
        out = self.booster.inplace_predict(self.model_input(features), validate_features=False)
        return np.asarray(out, dtype=np.float32)

    def scores(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self.manifest.calibration.apply(self.raw_scores(features))

    def predictions(self, scores: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        return (scores >= self.threshold).astype(np.int64)

    def contributions(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Per row, each feature's SHAP value in the booster's log-odds, then the bias (``pred_contribs``): the row
        sums to the raw margin. A DMatrix per call — only for the rows whose reasons are asked for."""
        matrix = xgb.DMatrix(features, nthread=1)  # one row or a few: threads would cost more than they save
        out = self.booster.predict(matrix, pred_contribs=True, validate_features=False)
        return np.asarray(out, dtype=np.float32)


def save_bundle(booster: xgb.Booster, manifest_without_sha: Manifest, directory: Path) -> Manifest:
    """Write the booster and its manifest (with the booster's SHA-256) to ``directory``; return the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    booster.save_model(str(model_path))
    manifest = Manifest(**{**_shallow(manifest_without_sha), "sha256": sha256_of(model_path)})
    (directory / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _shallow(manifest: Manifest) -> dict[str, Any]:
    return {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}


def _parse_manifest(raw: bytes, where: Path) -> Manifest:
    data = json.loads(raw.decode("utf-8"))
    if int(data.get("format_version", 0)) != FORMAT_VERSION:
        raise ModelIntegrityError(f"unsupported bundle format {data.get('format_version')!r} in {where}")
    return Manifest.from_dict(data)


def read_manifest(directory: Path) -> Manifest:
    """The manifest, unverified (for listings and tests; serving goes through :func:`load_bundle`)."""
    return _parse_manifest((directory / MANIFEST_FILE).read_bytes(), directory)


def digest_of_listing(file_digests: Mapping[str, str]) -> str:
    """The bundle digest from each file's SHA-256: SHA-256 of ``"<hex>  <name>\n"`` lines sorted by name."""
    listing = "".join(f"{file_digests[name]}  {name}\n" for name in sorted(file_digests))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BundleRead:
    """One read of a bundle directory: the digest over every file, and the bytes of the files that are parsed."""

    digest: str
    manifest: bytes
    model: bytes


def _private_copy(copy_to: Path | None, name: str) -> contextlib.AbstractContextManager[IO[bytes] | None]:
    """A new file ``copy_to/name`` only the owner can read (never an existing one: O_EXCL), or nothing."""
    if copy_to is None:
        return contextlib.nullcontext()
    return os.fdopen(os.open(copy_to / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def read_bundle(directory: Path, copy_to: Path | None = None) -> BundleRead:
    """Hash every file of ``directory`` (reading each once) and keep the manifest's and the booster's bytes.

    With ``copy_to`` (a private directory) every other file — the feature store — is written there from the very
    chunks that are hashed: the copy holds the bytes the digest covers, whatever happens to ``directory`` later.
    A bundle is flat: a subdirectory or anything but a regular file in it is refused."""
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.is_symlink():
            raise ModelIntegrityError(f"{path}: a bundle holds regular files only")
        digest = hashlib.sha256()
        parts: list[bytes] = []
        keep = path.name in (MANIFEST_FILE, MODEL_FILE)
        with path.open("rb") as handle, _private_copy(None if keep else copy_to, path.name) as sink:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                if keep:
                    parts.append(chunk)
                elif sink is not None:
                    sink.write(chunk)
        digests[path.name] = digest.hexdigest()
        if path.name in (MANIFEST_FILE, MODEL_FILE):
            kept[path.name] = b"".join(parts)
    for required in (MANIFEST_FILE, MODEL_FILE):
        if required not in kept:
            raise ModelIntegrityError(f"{directory}: no {required}")
    return BundleRead(digest=digest_of_listing(digests), manifest=kept[MANIFEST_FILE], model=kept[MODEL_FILE])


def bundle_digest(directory: Path) -> str:
    """The digest over every file of the bundle (see the module docstring)."""
    return read_bundle(directory).digest


def load_bundle(
    directory: Path,
    nthread: int = 1,
    expected_digest: str | None = None,
    digest_source: str = "expected",
    copy_to: Path | None = None,
) -> ScoringModel:
    """Load and verify a bundle, reading each file once.

    With ``expected_digest`` (the registry's record) the digest over every file is compared before anything is
    parsed; then the booster must match the manifest's checksum. The booster and the manifest are built from the
    bytes that were hashed, never read again; with ``copy_to`` the other files (the feature store) are copied there
    from those bytes (:func:`read_bundle`), to be opened instead of the bundle's. Raises
    :class:`ModelIntegrityError` on any mismatch (the copy is then of unverified bytes: discard it)."""
    read = read_bundle(directory, copy_to)
    if expected_digest is not None and not hmac.compare_digest(read.digest, expected_digest):
        raise ModelIntegrityError(
            f"{directory}: bundle digest {read.digest} does not match the {digest_source}'s {expected_digest}"
        )
    manifest = _parse_manifest(read.manifest, directory)
    actual = hashlib.sha256(read.model).hexdigest()
    if actual != manifest.sha256:
        raise ModelIntegrityError(
            f"{directory / MODEL_FILE}: sha256 {actual} does not match manifest {manifest.sha256}"
        )
    booster = xgb.Booster()
    booster.load_model(bytearray(read.model))
    booster.set_param({"nthread": nthread})
    return ScoringModel(booster=booster, manifest=manifest)


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
