"""The frozen path: a forward pass without gradients, and every input's OOD score.

`FeaturePass` runs the model once and returns its output with the features the OOD scorers read;
`ood_scores` turns those features into one `OODScore` per input, calibrated when the model folder has a
calibration, otherwise the uncalibrated fallback (segmenters: the reconstruction error, as a z-score
against the card's statistics when it has them; classifiers: the energy score).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from tta_runtime.config import ModelCard
from tta_runtime.errors import ModelLoadError
from tta_runtime.ood import Calibration, OODFeatures, features_from_output


class OODScore(NamedTuple):
    """One input's OOD verdict. `is_ood` is None without a calibration; `recon_mse` is NaN for classifiers."""

    score: float
    scorer: str
    is_ood: bool | None
    recon_mse: float


NO_SCORE = OODScore(float("nan"), "off", None, float("nan"))
"""The score of an input when the runtime computes none (`score_ood=False`)."""


class FeaturePass(torch.nn.Module):
    """One frozen forward pass: (output, OOD features). A module so that `torch.func.functional_call` can
    also run it with other weights than the model's own (the loaded ones, after continual adaptation)."""

    def __init__(self, model: torch.nn.Module, task: str, embedding: str) -> None:
        super().__init__()
        self.model, self.task, self.embedding = model, task, embedding

    def forward(self, x: torch.Tensor) -> tuple[Any, OODFeatures]:
        if self.task == "classification":
            out = self.model(x)
            return out, OODFeatures(logits=out.logits, embedding=out.features)
        encoded = self.model.encode(x)
        out = self.model.forward_features(encoded)
        return out, features_from_output(self.model, x, out, encoded=encoded, embedding=self.embedding)  # type: ignore[arg-type]


def features_with(
    model: torch.nn.Module, task: str, embedding: str, x: torch.Tensor, state: dict[str, torch.Tensor]
) -> OODFeatures:
    """The OOD features of a forward pass of `model` with the weights `state` (the model's own stay)."""
    with torch.inference_mode():
        return torch.func.functional_call(
            FeaturePass(model, task, embedding), {f"model.{k}": v for k, v in state.items()}, (x,), strict=True
        )[1]


def ood_scores(feats: OODFeatures, calibration: Calibration | None, card: ModelCard) -> list[OODScore]:
    """One `OODScore` per input of the batch that `feats` describes.

    The inputs are finite (the image door refuses NaN and Inf), so a score that is not (NaN from a NaN in
    the calibration, Inf from a standard deviation of 0) means the calibration or the card's statistics are
    broken: `ModelLoadError`, rather than an `is_ood` that is silently always False."""
    n = len(feats)
    mse = feats.recon_mse.float().cpu().numpy() if feats.recon_mse is not None else np.full(n, np.nan)
    if calibration is not None:
        scores = np.asarray(calibration.score(feats), dtype=np.float64)
        _check_finite(scores, calibration.threshold, f"the calibrated OOD scorer {calibration.scorer!r} (<model>/ood/)")
        return [OODScore(float(s), calibration.scorer, bool(s > calibration.threshold), float(m)) for s, m in zip(scores, mse)]
    if card.task == "classification":  # energy (Liu et al. 2020), uncalibrated
        energy = (-torch.logsumexp(feats.logits.float(), dim=1)).cpu().numpy()
        return [OODScore(float(e), "energy", None, float("nan")) for e in energy]
    stats = card.ood
    if stats is None:
        return [OODScore(float(m), "recon_mse", None, float(m)) for m in mse]
    z = (mse.astype(np.float64) - stats.recon_mse_mean) / stats.recon_mse_std if stats.recon_mse_std else np.full(n, np.inf)
    _check_finite(z, 0.0, "the card's OOD statistics (ood.recon_mse_mean / recon_mse_std)")
    return [OODScore(float(s), "recon_mse_z", None, float(m)) for s, m in zip(z, mse)]


def _check_finite(scores: np.ndarray, threshold: float, source: str) -> None:
    if not (np.isfinite(scores).all() and np.isfinite(threshold)):
        bad = scores[~np.isfinite(scores)][:3].tolist() if not np.isfinite(scores).all() else []
        raise ModelLoadError(
            f"{source} gives non-finite OOD scores {bad} (threshold {threshold}) for finite inputs: its statistics "
            "hold NaN/Inf or a standard deviation of 0. Refit the calibration (tta-runtime ood fit), or load with "
            "load_calibration=False"
        )
