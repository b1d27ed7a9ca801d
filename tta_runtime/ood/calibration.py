"""A fitted scorer and its threshold (`Calibration`), and how it is kept in a model folder.

    <model>/ood/calibration.json   readable metadata: scorer, params, threshold, provenance, scalar state
    <model>/ood/state.npz          the state arrays, float64, keyed "<scorer>/<name>" (loaded without pickle)

`load_calibration` refuses files fitted for other weights than the folder's card names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tta_runtime.config import ModelCard, _Frozen, validate
from tta_runtime.errors import (
    ConfigError,
    ModelLoadError,
    TTARuntimeError,
    UnknownNameError,
)
from tta_runtime.files import atomic_write, load_npz, read_json
from tta_runtime.ood.features import DEFAULT_EMBEDDING, Array, Embedding, OODFeatures
from tta_runtime.ood.metrics import DEFAULT_TPR, threshold_at_tpr
from tta_runtime.ood.scorers import OODScorer, make_scorer

CALIBRATION_DIR = "ood"
CALIBRATION_JSON = "calibration.json"
CALIBRATION_NPZ = "state.npz"
# The default provenance: the validation seed of the generated scenes (`tta_runtime.data.scenes.VAL_SEED`,
# which the runtime does not import; a test checks that the two agree).
DEFAULT_SEED = 1_000
_FORMAT = 1


@dataclass(frozen=True, eq=False)
class Calibration:
    """One scorer fitted on in-distribution scenes and thresholded at `tpr` of held-out ones.

    `threshold`: inputs with score > threshold are OOD (about 1 - tpr of in-distribution inputs are).
    Provenance: scorer fitted on `n_images` scenes of `split` with `seed` (indices 0..n_images-1),
    threshold from the next `n_threshold`; `embedding` says which vector the embedding scorers saw;
    `weights_sha256` the weights it was fitted for (checked against the card on load).
    """

    scorer: str
    params: dict[str, Any]
    state: dict[str, np.ndarray | float]
    threshold: float
    tpr: float = DEFAULT_TPR
    n_images: int = 0
    n_threshold: int = 0
    split: str = "in_dist"
    seed: int = DEFAULT_SEED
    embedding: Embedding = DEFAULT_EMBEDDING
    weights_sha256: str | None = None
    _built: list[OODScorer] = field(default_factory=list, init=False, repr=False)

    def build(self) -> OODScorer:
        """The fitted scorer (built once)."""
        if not self._built:
            scorer = make_scorer(self.scorer, **self.params)
            scorer.load_state_dict(self.state)
            self._built.append(scorer)
        return self._built[0]

    def score(self, features: OODFeatures) -> np.ndarray:
        """(B,) float64 scores, higher = more OOD."""
        return self.build().score(features)

    def torch_score(self, features: OODFeatures) -> torch.Tensor:
        return self.build().torch_score(features)

    def is_ood(self, scores: Array) -> np.ndarray | torch.Tensor:
        """scores > threshold (bool, same kind as `scores`)."""
        return scores > self.threshold


class _CalibrationRecord(_Frozen):
    scorer: str
    params: dict[str, float | int | str | None]
    scalars: dict[str, float]
    arrays: list[str]
    threshold: float
    tpr: float = Field(gt=0, le=1)
    n_images: int = Field(ge=0)
    n_threshold: int = Field(ge=0)
    split: str
    seed: int
    embedding: Literal["slots", "encoder", "encoder_meanstd"]
    weights_sha256: str | None = None


class _CalibrationFile(_Frozen):
    format: Literal[1]
    sign: Literal["higher = more out of distribution"] = "higher = more out of distribution"
    calibrations: dict[str, _CalibrationRecord]


def calibrate(
    scorer: OODScorer, threshold_features: OODFeatures, *, tpr: float = DEFAULT_TPR, n_images: int,
    split: str = "in_dist", seed: int = DEFAULT_SEED, embedding: Embedding = DEFAULT_EMBEDDING,
    weights_sha256: str | None = None,
) -> Calibration:
    """A `Calibration` from a fitted scorer and held-out in-distribution features for the threshold."""
    threshold = threshold_at_tpr(scorer.score(threshold_features), tpr)
    return Calibration(
        scorer=scorer.name, params=scorer.params(), state=scorer.state_dict(), threshold=threshold, tpr=tpr,
        n_images=n_images, n_threshold=len(threshold_features), split=split, seed=seed, embedding=embedding,
        weights_sha256=weights_sha256,
    )


def save_calibration(folder: str | os.PathLike[str], calibrations: Mapping[str, Calibration]) -> Path:
    """Write `folder/ood/calibration.json` (readable metadata) and `state.npz` (arrays); returns `folder/ood`."""
    out = Path(folder) / CALIBRATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    records, arrays = {}, {}
    for name, cal in calibrations.items():
        if name != cal.scorer:
            raise ConfigError(f"calibration stored under {name!r} is for scorer {cal.scorer!r}")
        scalars = {k: float(v) for k, v in cal.state.items() if not isinstance(v, np.ndarray)}
        bad = [k for k, v in scalars.items() if not np.isfinite(v)]
        if bad or not np.isfinite(cal.threshold):
            raise ConfigError(f"calibration {name!r} has non-finite values ({bad or ['threshold']}); refit it on "
                              "finite in-distribution features")
        keys = sorted(k for k, v in cal.state.items() if isinstance(v, np.ndarray))
        arrays.update({f"{name}/{k}": np.asarray(cal.state[k], dtype=np.float64) for k in keys})
        records[name] = _CalibrationRecord(
            scorer=cal.scorer, params=cal.params, scalars=scalars, arrays=keys, threshold=float(cal.threshold),
            tpr=cal.tpr, n_images=cal.n_images, n_threshold=cal.n_threshold, split=cal.split, seed=cal.seed,
            embedding=cal.embedding, weights_sha256=cal.weights_sha256,
        )
    doc = _CalibrationFile(format=_FORMAT, calibrations=records).model_dump(mode="json")
    atomic_write(out / CALIBRATION_NPZ, lambda f: np.savez(f, **arrays), "OOD calibration arrays")
    atomic_write(out / CALIBRATION_JSON, (json.dumps(doc, indent=2) + "\n").encode(), "OOD calibration")
    return out


def _fit_hint(folder: Path) -> str:
    """The `--model` argument that names `folder`: its repository name when that resolves back to it."""
    from tta_runtime.hub import find_model

    try:
        if find_model(folder.name).resolve() == folder.resolve():
            return folder.name
    except TTARuntimeError:
        pass
    return str(folder)


def _read_files(folder: Path) -> tuple[_CalibrationFile, dict[str, np.ndarray]]:
    """The validated metadata and the float64 arrays of `folder/ood` (ModelLoadError when absent or bad)."""
    meta, npz = folder / CALIBRATION_DIR / CALIBRATION_JSON, folder / CALIBRATION_DIR / CALIBRATION_NPZ
    if not meta.exists():
        raise ModelLoadError(f"no OOD calibration in {folder}; fit one with `tta-runtime ood fit --model {_fit_hint(folder)}`")
    data = read_json(meta, "OOD calibration", error=ModelLoadError)
    try:
        doc: _CalibrationFile = validate(_CalibrationFile, data, f"OOD calibration {meta}")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    arrays = {k: v.astype(np.float64) for k, v in load_npz(npz, "OOD calibration arrays", error=ModelLoadError).items()}
    return doc, arrays


# The state arrays' shapes by scorer, in symbols: D = the embedding width (the same in every array of a
# scorer, and the model's when its card is known), C classes, N bank entries, R residual dimensions, S the
# first convolution's statistics (the same in every array of the scorer).
_SHAPES: dict[str, dict[str, tuple[str | int, ...]]] = {
    "knn": {"bank": ("N", "D")},
    "mahalanobis": {"means": ("C", "D"), "precision": ("D", "D")},
    "rmd": {"means": ("C", "D"), "precision": ("D", "D"), "mean0": (1, "D"), "precision0": ("D", "D")},
    "vim": {"origin": ("D",), "residual_basis": ("D", "R")},
    "stem_mahalanobis": {"means": (1, "S"), "inv_scales": ("S",), "precision": ("S", "S")},  # S: 2 x first-conv channels
}
_POSITIVE = {"std"}  # scalars that divide: z-scored scorers' std


def embedding_width(card: ModelCard, embedding: str) -> int | None:
    """The width D of the embedding a model hands its feature scorers (None when the card does not say)."""
    if card.classifier is not None:
        return card.classifier.widths[-1]
    if card.module is not None:
        return card.module.feature_dim
    if card.segmenter is not None:
        return card.segmenter.slot_dim * (2 if embedding == "encoder_meanstd" else 1)
    return None


def _check_state(name: str, where: Path, state: Mapping[str, np.ndarray | float], threshold: float, width: int | None) -> None:
    """Refuse a calibration whose values are not finite, whose z-score std is not positive or whose arrays do
    not have the shapes its scorer reads (every later request would fail or score NaN)."""
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"OOD calibration {name!r} in {where}: {why}; refit with `tta-runtime ood fit`")

    if not math.isfinite(threshold):
        raise bad(f"threshold is {threshold}")
    for key, value in state.items():
        if not np.isfinite(value).all():
            raise bad(f"{key!r} holds NaN or infinite values")
        if key in _POSITIVE and not (np.ndim(value) == 0 and float(value) > 0):  # type: ignore[arg-type]
            raise bad(f"{key!r} must be a positive number, got {value}")
    sizes: dict[str, int] = {} if width is None else {"D": width}
    for key, dims in _SHAPES.get(name, {}).items():
        shape = np.shape(state.get(key, ()))
        ok = len(shape) == len(dims) and all(n >= 1 for n in shape)
        for d, n in zip(dims, shape, strict=False):
            ok = ok and (n == d if isinstance(d, int) else sizes.setdefault(d, n) == n)
        if not ok:
            want = "(" + ", ".join(f"{d}={sizes[d]}" if d in sizes else str(d) for d in dims) + ")"
            raise bad(f"array {key!r} has shape {shape}, expected {want}")


def load_calibration(folder: str | os.PathLike[str]) -> dict[str, Calibration]:
    """The calibrations saved in a model folder, by scorer name.

    Raises `ModelLoadError` when there are none (with the command that fits them), when the files are
    malformed, or when they were fitted for other weights than the folder's card names.
    """
    folder = Path(folder)
    doc, arrays = _read_files(folder)
    meta, npz = folder / CALIBRATION_DIR / CALIBRATION_JSON, folder / CALIBRATION_DIR / CALIBRATION_NPZ
    card: ModelCard | None = None
    if (folder / "card.json").exists():
        from tta_runtime.hub import load_card

        card = load_card(folder)
    card_sha = None if card is None else card.weights.sha256
    result = {}
    for name, rec in doc.calibrations.items():
        if card_sha is not None and rec.weights_sha256 is not None and rec.weights_sha256 != card_sha:
            raise ModelLoadError(
                f"OOD calibration {name!r} in {meta.parent} was fitted for weights {rec.weights_sha256[:12]}..., but the "
                f"card names {card_sha[:12]}...; refit with `tta-runtime ood fit --model {_fit_hint(folder)}`"
            )
        missing = [k for k in rec.arrays if f"{name}/{k}" not in arrays]
        if missing:
            raise ModelLoadError(f"OOD calibration {name!r}: arrays {missing} missing from {npz}")
        state: dict[str, np.ndarray | float] = {k: arrays[f"{name}/{k}"] for k in rec.arrays}
        state.update(rec.scalars)
        _check_state(rec.scorer, meta, state, rec.threshold, None if card is None else embedding_width(card, rec.embedding))
        try:
            cal = Calibration(
                scorer=rec.scorer, params=dict(rec.params), state=state, threshold=rec.threshold, tpr=rec.tpr,
                n_images=rec.n_images, n_threshold=rec.n_threshold, split=rec.split, seed=rec.seed,
                embedding=rec.embedding, weights_sha256=rec.weights_sha256,
            )
            cal.build()  # fail here, not on the first request
        except (UnknownNameError, ConfigError) as e:
            raise ModelLoadError(f"OOD calibration {name!r} in {meta}: {e}") from None
        result[name] = cal
    return result
