"""Feature-space OOD scorers: distances of an input's embedding to the in-distribution ones.

KNN on L2-normalised features (Sun et al. 2022) -> +distance to the k-th neighbour; Mahalanobis with a
shared covariance (Lee et al. 2018) -> +squared distance, also on the first convolution's channel statistics
(`stem_mahalanobis`); relative Mahalanobis (Ren et al. 2021); ViM
(Wang et al. 2022) -> alpha*||residual|| - logsumexp(logits). Higher = more out of distribution, as for
every scorer. Fitting is numpy float64; scoring is written once in `tta_runtime.ood.ops` primitives.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tta_runtime.errors import ConfigError
from tta_runtime.ood.features import Array, OODFeatures, as_float64
from tta_runtime.ood.ops import (
    distances,
    kth_smallest,
    l2_normalise,
    logsumexp,
    rowmin,
    rownorm,
    sq_mahalanobis,
)
from tta_runtime.ood.scorers import OODScorer, register

log = logging.getLogger(__name__)


def _pinvh(cov: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix (what sklearn's EmpiricalCovariance.precision_ uses)."""
    from scipy.linalg import pinvh

    return np.asarray(pinvh(cov), dtype=np.float64)


def _class_gaussians(x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Class means (C, D) and the shared (tied) covariance's pseudo-inverse (D, D), MLE (ddof 0)."""
    labels = np.zeros(len(x), dtype=np.int64) if labels is None else labels
    classes, index = np.unique(labels, return_inverse=True)
    means = np.stack([x[index == c].mean(axis=0) for c in range(len(classes))])  # (C, D)
    centred = x - means[index]  # (N, D)
    cov = centred.T @ centred / len(x)  # (D, D)
    return means, _pinvh(cov)


@register
class KNNScorer(OODScorer):
    """Distance from the L2-normalised embedding to its k-th nearest normalised in-distribution one.

    Sun et al. 2022 (their score is the negated distance). k is clipped to the bank size.
    """

    name = "knn"
    requires = ("embedding",)
    state_keys = ("bank",)

    def __init__(self, k: int = 50) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"knn: k must be a positive int, got {k!r}")
        self.k = k

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        bank = l2_normalise(features.embedding)
        if len(bank) < self.k:
            log.warning("knn: bank of %d embeddings is smaller than k=%d; using k=%d", len(bank), self.k, len(bank))
        return {"bank": bank}

    def _score(self, features: OODFeatures) -> Array:
        q = l2_normalise(features.embedding)
        bank = self._param("bank", q)  # (N, D)
        return kth_smallest(distances(q, bank), min(self.k, len(bank)))


@register
class MahalanobisScorer(OODScorer):
    """min over classes of (f - mu_c)^T Sigma^-1 (f - mu_c), Sigma shared (Lee et al. 2018).

    Without labels (the segmenter) it is one Gaussian over all in-distribution embeddings.
    """

    name = "mahalanobis"
    requires = ("embedding",)
    state_keys = ("means", "precision")

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        means, precision = _class_gaussians(features.embedding, labels)
        return {"means": means, "precision": precision}

    def _score(self, features: OODFeatures) -> Array:
        x = features.embedding
        return rowmin(sq_mahalanobis(x, self._param("means", x), self._param("precision", x)))


@register
class RelativeMahalanobisScorer(MahalanobisScorer):
    """min_c MD_c(f) - MD_0(f): class-conditional (shared Sigma) minus a class-agnostic Gaussian (Ren et al. 2021)."""

    name = "rmd"
    needs_labels = True
    state_keys = ("means", "precision", "mean0", "precision0")

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        mean0, precision0 = _class_gaussians(features.embedding, None)
        return {**super()._fit(features, labels), "mean0": mean0, "precision0": precision0}

    def _score(self, features: OODFeatures) -> Array:
        x = features.embedding
        return super()._score(features) - sq_mahalanobis(x, self._param("mean0", x), self._param("precision0", x))[:, 0]


@register
class StemMahalanobisScorer(OODScorer):
    """Squared Mahalanobis distance of the input's low-level statistics (`OODFeatures.stem`: the per-channel
    mean and standard deviation of the first convolution's output) to one Gaussian over the in-distribution
    ones (labels unused: these statistics describe the image, not its class). Corruptions, weather and
    photos move them far more than the pooled features, and they are ready after one convolution, so a
    runtime that adapts every input can score it without a separate forward pass.

    Each statistic is standardised, and the correlation matrix gets `ridge` on its diagonal before it is
    inverted: the statistics of one convolution are strongly collinear (grey images make the colour channels
    equal), and an exact inverse would weigh float rounding in that null space by 1e15.
    """

    name = "stem_mahalanobis"
    requires = ("stem",)
    state_keys = ("means", "inv_scales", "precision")

    def __init__(self, ridge: float = 1e-2) -> None:
        super().__init__()
        if not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ConfigError(f"stem_mahalanobis: ridge must be a positive number, got {ridge!r}")
        self.ridge = float(ridge)

    def params(self) -> dict[str, Any]:
        return {"ridge": self.ridge}

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        x = features.stem
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.maximum(scale, 1e-6 * max(float(scale.max()), 1e-30))  # a constant statistic: any change is far
        z = (x - mean) / scale
        corr = z.T @ z / len(z)
        precision = np.linalg.inv(corr + self.ridge * np.eye(len(corr)))
        return {"means": (mean / scale)[None], "inv_scales": 1.0 / scale, "precision": (precision + precision.T) / 2}

    def _score(self, features: OODFeatures) -> Array:
        x = features.stem * self._param("inv_scales", features.stem)
        return rowmin(sq_mahalanobis(x, self._param("means", x), self._param("precision", x)))


def vim_dim(feature_dim: int) -> int:
    """Principal-subspace size as in the ViM code: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


@register
class ViMScorer(OODScorer):
    """Virtual-logit matching (Wang et al. 2022): alpha * ||residual of f - o|| - logsumexp(logits).

    The residual is the part of (f - o) outside the top-`dim` eigenvectors of the in-distribution
    (uncentred about o) covariance; alpha = mean max logit / mean residual norm on the fit data. The
    origin o is -pinv(W) b when the classifier's last layer (weight (C, D), bias (C,)) is given to
    `fit`, as in the paper; otherwise the in-distribution mean.
    """

    name = "vim"
    requires = ("embedding", "logits")
    state_keys = ("origin", "residual_basis", "alpha")

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ConfigError(f"vim: dim must be a positive int or None (the paper's rule), got {dim!r}")
        self.dim = dim
        self._head: tuple[np.ndarray, np.ndarray] | None = None  # classifier (weight, bias), set by fit

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def fit(  # type: ignore[override]
        self, features: OODFeatures, labels: np.ndarray | None = None, *, weight: Array | None = None,
        bias: Array | None = None,
    ) -> None:
        if (weight is None) != (bias is None):
            raise ConfigError("vim: give both the classifier's weight (C, D) and bias (C,), or neither")
        self._head = None if weight is None else (as_float64(weight), as_float64(bias))  # type: ignore[arg-type]
        super().fit(features, labels)

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        x, logits = features.embedding, features.logits
        d = x.shape[1]
        dim = vim_dim(d) if self.dim is None else self.dim
        if not 0 < dim < d:
            raise ConfigError(f"vim: principal dim {dim} must be in [1, {d - 1}] for {d}-D features")
        head = self._head
        origin = x.mean(axis=0) if head is None else -np.linalg.pinv(head[0]) @ head[1]
        centred = x - origin  # (N, D)
        eigval, eigvec = np.linalg.eigh(centred.T @ centred / len(x))
        order = np.argsort(eigval)[::-1]
        basis = np.ascontiguousarray(eigvec[:, order[dim:]])  # (D, D - dim): the residual space
        residual = np.linalg.norm(centred @ basis, axis=1)
        alpha = float(logits.max(axis=1).mean() / residual.mean())
        return {"origin": origin, "residual_basis": basis, "alpha": alpha}

    def _score(self, features: OODFeatures) -> Array:
        x = features.embedding
        residual = rownorm((x - self._param("origin", x)) @ self._param("residual_basis", x))  # (B,)
        return self._state["alpha"] * residual - logsumexp(features.logits)
