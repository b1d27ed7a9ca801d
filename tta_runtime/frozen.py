"""The frozen path: a forward pass without gradients, and every input's OOD score.

`FeaturePass` runs the model once and returns its output with the features the OOD scorers read;
`ood_scores` turns those features into one `OODScore` per input, calibrated when the model folder has a
calibration, otherwise the uncalibrated fallback (segmenters: the reconstruction error, as a z-score
against the card's statistics when it has them; classifiers: the energy score).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from tta_runtime.config import ModelCard
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.ood import SCORERS, Calibration, OODFeatures, features_from_output
from tta_runtime.ood.features import stem_statistics

log = logging.getLogger(__name__)


class OODScore(NamedTuple):
    """One input's OOD verdict. `is_ood` is None without a calibration; `recon_mse` is NaN for classifiers."""

    score: float
    scorer: str
    is_ood: bool | None
    recon_mse: float


NO_SCORE = OODScore(float("nan"), "off", None, float("nan"))
"""The score of an input when the runtime computes none (`score_ood=False`)."""


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d | None:
    """The classifier's first `nn.Conv2d` in module (registration) order, the one whose output `OODFeatures.stem`
    describes: the first one that runs in every sequential network. A path that computes without calling it (a
    pruned model's folded gather path) yields no `stem`."""
    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)


class _StemReached(BaseException):
    """Raised by the stem hook to stop a forward pass once the first convolution has run (`stem_only`); a
    BaseException, so that a model's own `except Exception` cannot swallow it."""


class FeaturePass(torch.nn.Module):
    """One frozen forward pass: (output, OOD features). A module so that `torch.func.functional_call` can
    also run it with other weights than the model's own (the loaded ones, after continual adaptation).

    Classifiers: `stem=True` adds `OODFeatures.stem` (a hook on `first_conv`); `stem_only=True` stops the pass
    right after that convolution and returns (None, features with `stem` alone), all that `stem_mahalanobis`
    needs, at the cost of one convolution."""

    def __init__(self, model: torch.nn.Module, task: str, embedding: str, *, stem: bool = False, stem_only: bool = False) -> None:
        super().__init__()
        self.model, self.task, self.embedding = model, task, embedding
        self.stem, self.stem_only = stem or stem_only, stem_only

    def forward(self, x: torch.Tensor) -> tuple[Any, OODFeatures]:
        if self.task == "classification":
            conv = first_conv(self.model) if self.stem else None
            if conv is None:
                if self.stem_only:
                    raise ConfigError("stem_mahalanobis needs a model with an nn.Conv2d that runs (its first convolution's statistics)")
                out = self.model(x)
                return out, OODFeatures(logits=out.logits, embedding=out.features)
            captured: list[torch.Tensor] = []

            def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                if not captured:
                    captured.append(stem_statistics(output))
                    if self.stem_only:
                        raise _StemReached

            handle = conv.register_forward_hook(hook)
            try:
                out = self.model(x)
            except _StemReached:
                return None, OODFeatures(stem=captured[0])
            finally:
                handle.remove()
            return out, OODFeatures(logits=out.logits, embedding=out.features, stem=captured[0] if captured else None)
        encoded = self.model.encode(x)
        out = self.model.forward_features(encoded)
        return out, features_from_output(self.model, x, out, encoded=encoded, embedding=self.embedding)  # type: ignore[arg-type]


def features_with(
    model: torch.nn.Module, task: str, embedding: str, x: torch.Tensor, state: dict[str, torch.Tensor], **kinds: bool
) -> OODFeatures:
    """The OOD features of a forward pass of `model` with the weights `state` (the model's own stay); `kinds`:
    `FeaturePass`'s stem options."""
    with torch.inference_mode():
        return torch.func.functional_call(
            FeaturePass(model, task, embedding, **kinds), {f"model.{k}": v for k, v in state.items()}, (x,), strict=True
        )[1]


def needs_stem(calibration: Calibration | None) -> bool:
    """Whether `calibration`'s scorer reads `OODFeatures.stem`."""
    return calibration is not None and "stem" in SCORERS.get(calibration.scorer).requires


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


def far_ood(score: OODScore, card: ModelCard) -> bool:
    """The input scored above the card's far-OOD level (on that level's scorer): the output is unreliable."""
    scope = card.scope
    return bool(scope is not None and scope.far_ood_level is not None and score.scorer == scope.far_ood_scorer
                and score.score > scope.far_ood_level)


_FAR_REPEAT_S = 30.0
"""While calls keep bringing far inputs (a video of the wrong world), the warning repeats at most this often."""
_far_streak: dict[str, float] = {}  # model name -> when the current streak of far calls last warned


def warn_far_ood(scores: list[OODScore], card: ModelCard) -> list[OODScore]:
    """`scores`, after logging one warning for the inputs among them that scored far out of distribution (once per
    streak of calls with far inputs, and again every `_FAR_REPEAT_S` seconds while it lasts)."""
    far = [i for i, s in enumerate(scores) if far_ood(s, card)]
    if not far:
        _far_streak.pop(card.name, None)
        return scores
    now = time.monotonic()
    if now - _far_streak.get(card.name, -math.inf) >= _FAR_REPEAT_S:
        _far_streak[card.name] = now
        scope = card.scope
        assert scope is not None
        what = "masks" if card.task == "segmentation" else "labels"
        which = ("The input" if len(scores) == 1 else f"Input {far[0]} of {len(scores)}" if len(far) == 1
                 else f"{len(far)} of {len(scores)} inputs")
        log.warning(
            "%s scored far outside what %s was trained on (%s %.3g > %g): its %s are unreliable (what the model is "
            "for: its card's scope, `tta-runtime info %s`)",
            which, card.name, scope.far_ood_scorer, max(scores[i].score for i in far), scope.far_ood_level, what, card.name,
        )
    return scores


def _check_finite(scores: np.ndarray, threshold: float, source: str) -> None:
    if not (np.isfinite(scores).all() and np.isfinite(threshold)):
        bad = scores[~np.isfinite(scores)][:3].tolist() if not np.isfinite(scores).all() else []
        raise ModelLoadError(
            f"{source} gives non-finite OOD scores {bad} (threshold {threshold}) for finite inputs: its statistics "
            "hold NaN/Inf or a standard deviation of 0. Refit the calibration (tta-runtime ood fit), or load with "
            "load_calibration=False"
        )
