"""A fitted scorer and its threshold (`Calibration`), and how it is kept in a model folder.

    <model>/ood/calibration.json   readable metadata: scorer, params, threshold, provenance, scalar state
    <model>/ood/state.npz          the state arrays, float64, keyed "<scorer>/<name>" (loaded without pickle)

`load_calibration` refuses files fitted for other weights than the folder's card names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tta_runtime.config import _Frozen, validate
from tta_runtime.errors import (
    ConfigError,
    ModelLoadError,
    TTARuntimeError,
    UnknownNameError,
)
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


def _atomic_write(path: Path, write: Any) -> None:
    """Write beside `path` then rename, so a reader never sees half a file (modes follow the umask)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_calibration(folder: str | os.PathLike[str], calibrations: Mapping[str, Calibration]) -> Path:
    """Write `folder/ood/calibration.json` (readable metadata) and `state.npz` (arrays); returns `folder/ood`."""
    out = Path(folder) / CALIBRATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    records, arrays = {}, {}
    for name, cal in calibrations.items():
        if name != cal.scorer:
            raise ConfigError(f"calibration stored under {name!r} is for scorer {cal.scorer!r}")
        scalars = {k: float(v) for k, v in cal.state.items() if not isinstance(v, np.ndarray)}
        keys = sorted(k for k, v in cal.state.items() if isinstance(v, np.ndarray))
        arrays.update({f"{name}/{k}": np.asarray(cal.state[k], dtype=np.float64) for k in keys})
        records[name] = _CalibrationRecord(
            scorer=cal.scorer, params=cal.params, scalars=scalars, arrays=keys, threshold=float(cal.threshold),
            tpr=cal.tpr, n_images=cal.n_images, n_threshold=cal.n_threshold, split=cal.split, seed=cal.seed,
            embedding=cal.embedding, weights_sha256=cal.weights_sha256,
        )
    doc = _CalibrationFile(format=_FORMAT, calibrations=records).model_dump(mode="json")
    _atomic_write(out / CALIBRATION_NPZ, lambda f: np.savez(f, **arrays))
    _atomic_write(out / CALIBRATION_JSON, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))
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
    if not meta.is_file():
        raise ModelLoadError(f"no OOD calibration in {folder}; fit one with `tta-runtime ood fit --model {_fit_hint(folder)}`")
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read OOD calibration {meta}: {e}") from None
    try:
        doc: _CalibrationFile = validate(_CalibrationFile, data, f"OOD calibration {meta}")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: np.array(z[k], dtype=np.float64) for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read OOD calibration arrays {npz}: {e}") from None
    return doc, arrays


def load_calibration(folder: str | os.PathLike[str]) -> dict[str, Calibration]:
    """The calibrations saved in a model folder, by scorer name.

    Raises `ModelLoadError` when there are none (with the command that fits them), when the files are
    malformed, or when they were fitted for other weights than the folder's card names.
    """
    folder = Path(folder)
    doc, arrays = _read_files(folder)
    meta, npz = folder / CALIBRATION_DIR / CALIBRATION_JSON, folder / CALIBRATION_DIR / CALIBRATION_NPZ
    card_sha = None
    if (folder / "card.json").is_file():
        from tta_runtime.hub import load_card

        card_sha = load_card(folder).weights.sha256
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
