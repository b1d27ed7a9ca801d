"""Row-wise primitives the scorers are written in, each for numpy and for torch.

A scorer states its formula once in these primitives and runs on either kind of array:
- numpy float64: `OODScorer.score`, the numbers the runtime reports and calibrations are thresholded on;
- torch, any dtype and device: `OODScorer.torch_score`, plain tensor ops that an exported graph carries.

The two branches of a primitive are the same mathematics but not always the same floating-point
operations (numpy's einsum against a torch matmul, a hand-written logsumexp against torch's), so each
keeps its own; in float64 the two agree to rounding. Arrays are (B, ...) with the batch first; every
reduction is over axis 1.
"""

from __future__ import annotations

import numpy as np
import torch

from tta_runtime.ood.features import Array


def rowmax(x: Array) -> Array:
    """(B, C) -> (B,) the largest entry of each row."""
    return x.max(dim=1).values if isinstance(x, torch.Tensor) else x.max(axis=1)


def rowmin(x: Array) -> Array:
    """(B, C) -> (B,) the smallest entry of each row."""
    return x.min(dim=1).values if isinstance(x, torch.Tensor) else x.min(axis=1)


def rownorm(x: Array) -> Array:
    """(B, D) -> (B,) the Euclidean norm of each row."""
    return torch.linalg.vector_norm(x, dim=1) if isinstance(x, torch.Tensor) else np.linalg.norm(x, axis=1)


def exp(x: Array) -> Array:
    return x.exp() if isinstance(x, torch.Tensor) else np.exp(x)


def l2_normalise(x: Array) -> Array:
    """(B, D) rows scaled to unit norm; the 1e-10 keeps a zero row finite (as Sun et al.'s KNN code)."""
    if isinstance(x, torch.Tensor):
        return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def logsumexp(z: Array) -> Array:
    """(B, C) -> (B,) log sum_c exp(z_c), shifted by the row maximum so it cannot overflow."""
    if isinstance(z, torch.Tensor):
        return torch.logsumexp(z, dim=1)
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def log_softmax(z: Array) -> Array:
    """(B, C) log-probabilities over C."""
    return z.log_softmax(dim=1) if isinstance(z, torch.Tensor) else z - logsumexp(z)[:, None]


def max_softmax(z: Array) -> Array:
    """(B, C) logits -> (B,) the largest softmax probability, in [1/C, 1]."""
    return z.softmax(dim=1).max(dim=1).values if isinstance(z, torch.Tensor) else np.exp(log_softmax(z).max(axis=1))


def distances(q: Array, bank: Array) -> Array:
    """(B, D), (N, D) -> (B, N) Euclidean distances, from |q|^2 + |b|^2 - 2 q.b (one matmul)."""
    if isinstance(q, torch.Tensor):
        d2 = (q * q).sum(1, keepdim=True) + (bank * bank).sum(1)[None] - 2 * q @ bank.T
        return d2.clamp_min(0).sqrt()
    d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T
    return np.sqrt(np.clip(d2, 0, None))


def kth_smallest(x: Array, k: int) -> Array:
    """(B, N) -> (B,) the k-th smallest entry of each row (k from 1)."""
    if isinstance(x, torch.Tensor):
        return torch.topk(x, k, dim=1, largest=False).values[:, -1]
    return np.partition(x, k - 1, axis=1)[:, k - 1]


def sq_mahalanobis(x: Array, means: Array, precision: Array) -> Array:
    """(B, D), (C, D), (D, D) -> (B, C): (x_b - mu_c)^T P (x_b - mu_c)."""
    diff = x[:, None, :] - means[None]  # (B, C, D)
    if isinstance(diff, torch.Tensor):
        return ((diff @ precision) * diff).sum(dim=-1)
    return np.einsum("bcd,de,bce->bc", diff, precision, diff)
