"""Detection metrics over two sets of OOD scores, the threshold rule, and RankMe for streams.

Detection: in-distribution scores are the negatives, OOD scores the positives (the higher-scoring class):
AUROC, AUPR-Out, and the FPR at the threshold keeping `tpr` of in-distribution inputs.

`rankme` / `RankMeMonitor` are different in kind: a set-level statistic over a window of embeddings (low =
collapsed representations; Garrido et al. 2023). They compare windows of equal size only.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.ood.features import Array, as_float64

DEFAULT_TPR = 0.95
# The far shifts of the generated test scenes that the OOD acceptance criterion names (best scorer's
# AUROC >= 0.95 on both): a background unlike any trained on, and a shape family never trained on. This is
# the shapes world's pair; `far_shift_splits` gives each world's, by its training split.
FAR_SHIFT_SPLITS: tuple[str, ...] = ("textured_background", "unseen_shapes")
FLAT_FAR_SHIFT_SPLITS: tuple[str, ...] = ("flat/photo_background", "flat/unseen_shapes")
FAR_SHIFT_SPLITS_BY_WORLD: dict[str, tuple[str, ...]] = {
    "in_dist": FAR_SHIFT_SPLITS, "flat/in_dist": FLAT_FAR_SHIFT_SPLITS,
}


def far_shift_splits(train_split: str = "in_dist") -> tuple[str, ...]:
    """The far-shift pair of the world whose training split is `train_split` ("in_dist": the shapes world,
    "flat/in_dist": the flat world)."""
    try:
        return FAR_SHIFT_SPLITS_BY_WORLD[train_split]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in FAR_SHIFT_SPLITS_BY_WORLD)
        raise ConfigError(
            f"no far-shift splits for training split {train_split!r}; expected a world's training split: {known}"
        ) from None


def _two_sets(in_scores: Array, ood_scores: Array) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(s, dtype=np.float64).ravel() for s in (in_scores, ood_scores))
    if not len(a) or not len(b):
        raise InvalidInputError(f"need in-distribution and OOD scores, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InvalidInputError("OOD scores must be finite")
    return a, b


def auroc(in_scores: Array, ood_scores: Array) -> float:
    """Area under the ROC curve for OOD = positive: the Mann-Whitney U / (n_in n_ood), ties count 1/2."""
    a, b = _two_sets(in_scores, ood_scores)
    x = np.concatenate([a, b])
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average ranks
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def aupr(in_scores: Array, ood_scores: Array) -> float:
    """Average precision with OOD = positive (AUPR-Out), as sklearn's `average_precision_score`."""
    a, b = _two_sets(in_scores, ood_scores)
    s = np.concatenate([a, b])
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_at_tpr(in_scores: Array, tpr: float = DEFAULT_TPR) -> float:
    """The smallest in-distribution score t with at least `tpr` of `in_scores` <= t.

    Flagging `score > t` as OOD then keeps at least `tpr` of in-distribution inputs (e.g. 95 %).
    """
    if not 0 < tpr <= 1:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr!r}")
    s = np.sort(np.asarray(in_scores, dtype=np.float64).ravel())
    if not len(s) or not np.isfinite(s).all():
        raise InvalidInputError("threshold_at_tpr needs finite in-distribution scores")
    k = max(math.ceil(tpr * len(s) - 1e-9), 1)  # the guard keeps 0.95 * 100 from rounding up to 96
    return float(s[k - 1])


def fpr_at_tpr(in_scores: Array, ood_scores: Array, tpr: float = DEFAULT_TPR) -> float:
    """Fraction of OOD inputs accepted as in-distribution at the threshold keeping `tpr` of in-dist ones."""
    a, b = _two_sets(in_scores, ood_scores)
    return float(np.mean(b <= threshold_at_tpr(a, tpr)))


def rankme(embeddings: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023) of an (N, D) matrix: exp(-sum p log p), p = s / sum(s) + eps.

    In [~1, min(N, D)]: ~1 for rank-1 (collapsed) embeddings, near min(N, D) for isotropic ones.
    """
    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2:
        raise InvalidInputError(f"rankme needs an (N, D) matrix, got shape {z.shape}")
    s = np.linalg.svd(z, compute_uv=False)
    total = s.sum()
    p = (s / total if total > 0 else np.zeros_like(s)) + eps
    return float(np.exp(-(p * np.log(p)).sum()))


class RankMeMonitor:
    """RankMe over a sliding window of the last `window` embeddings (a drift / collapse monitor).

    `update` returns None until the window is full, then the window's RankMe. Compare values only
    between windows of the same size: RankMe grows with the window up to the embedding width.
    """

    def __init__(self, window: int, eps: float = 1e-7) -> None:
        if not isinstance(window, int) or window < 2:
            raise ConfigError(f"RankMeMonitor: window must be an int >= 2, got {window!r}")
        self.window, self.eps = window, eps
        self._buffer: deque[np.ndarray] = deque(maxlen=window)
        self.value: float | None = None

    def update(self, embedding: Array) -> float | None:
        """Add one (D,) embedding; the window's RankMe once `window` embeddings have been seen."""
        e = as_float64(embedding)
        if e.ndim != 1 or (self._buffer and e.shape != self._buffer[0].shape):
            want = f"({self._buffer[0].shape[0]},)" if self._buffer else "(D,)"
            raise InvalidInputError(f"RankMeMonitor.update takes one {want} embedding, got shape {e.shape}")
        self._buffer.append(e)
        self.value = rankme(np.stack(self._buffer), self.eps) if len(self._buffer) == self.window else None
        return self.value

    def reset(self) -> None:
        self._buffer.clear()
        self.value = None

    def __len__(self) -> int:
        return len(self._buffer)
