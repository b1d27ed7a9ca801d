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
from tta_runtime.ood import Calibration, OODFeatures, features_from_output


class OODScore(NamedTuple):
    """One input's OOD verdict. `is_ood` is None without a calibration; `recon_mse` is NaN for classifiers."""

    score: float
    scorer: str
    is_ood: bool | None
    recon_mse: float


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
    """One `OODScore` per input of the batch that `feats` describes."""
    n = len(feats)
    mse = feats.recon_mse.float().cpu().numpy() if feats.recon_mse is not None else np.full(n, np.nan)
    if calibration is not None:
        scores = calibration.score(feats)
        return [OODScore(float(s), calibration.scorer, bool(s > calibration.threshold), float(m)) for s, m in zip(scores, mse)]
    if card.task == "classification":  # energy (Liu et al. 2020), uncalibrated
        energy = (-torch.logsumexp(feats.logits.float(), dim=1)).cpu().numpy()
        return [OODScore(float(e), "energy", None, float("nan")) for e in energy]
    stats = card.ood
    if stats is None:
        return [OODScore(float(m), "recon_mse", None, float(m)) for m in mse]
    return [OODScore(float((m - stats.recon_mse_mean) / stats.recon_mse_std), "recon_mse_z", None, float(m)) for m in mse]
