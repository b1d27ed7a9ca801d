"""Fit scorers on in-distribution features and threshold each on held-out ones: a `Calibration` per scorer.

    fit features (N, ...) [+ class labels] -> each scorer's `fit` -> its scores on the held-out features
      -> threshold at `tpr` (the held-out inputs the scorer never saw: a KNN bank would find its own
         entries at distance 0) -> `Calibration`

Where the features come from is the caller's: `Runtime.calibrate` (the user's images through the runtime's
own preprocessing and frozen path), `tta_runtime.evaluation.ood_classifier` (the digits splits).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from tta_runtime.errors import ConfigError
from tta_runtime.ood.calibration import Calibration, calibrate
from tta_runtime.ood.features import DEFAULT_EMBEDDING, Embedding, OODFeatures
from tta_runtime.ood.metrics import DEFAULT_TPR
from tta_runtime.ood.scorers import CLASSIFIER_SCORERS, make_scorer

log = logging.getLogger(__name__)

__all__ = ["fit_calibrations", "holdout_split"]


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of `n` inputs: a seeded permutation, `fraction` of them (at least 1) held out
    for the threshold and at least 2 left to fit on. `ConfigError` when `n` is too small."""
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout must be in (0, 1) (the share of images that sets the threshold), got {fraction!r}")
    n_hold = max(1, round(n * fraction))
    if n - n_hold < 2:
        raise ConfigError(f"calibration needs at least 3 in-distribution images (2 to fit, 1 for the threshold), got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def fit_calibrations(
    fit: OODFeatures, held_out: OODFeatures, *, labels: np.ndarray | None = None, scorers: Iterable[str] = CLASSIFIER_SCORERS,
    tpr: float = DEFAULT_TPR, split: str = "in_dist", seed: int = 0, embedding: Embedding = DEFAULT_EMBEDDING,
    weights_sha256: str | None = None,
) -> dict[str, Calibration]:
    """Each scorer fitted on `fit` (with `labels` (N,) int for the class-conditional ones) and thresholded so
    that `tpr` of `held_out` score at or below it. Features are numpy or torch; returns {name: Calibration}."""
    out = {}
    for name in scorers:
        s = make_scorer(name)
        s.fit(fit, labels)
        out[name] = calibrate(
            s, held_out, tpr=tpr, n_images=len(fit), split=split, seed=seed, embedding=embedding, weights_sha256=weights_sha256,
        )
        log.info("OOD scorer %s fitted on %d inputs; threshold %.4g", name, len(fit), out[name].threshold)
    return out
