"""Monitors a stream consults on every frame: a scene-cut detector and a collapse monitor.

Both answer "reset the weights now?": a new scene makes what continual adaptation learnt on the old
one stale, and a collapse (non-finite rollback, a sustained loss blow-up, slot masks merging onto
fewer slots than the scene has parts) means adaptation went wrong. They only signal; the stream resets.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from tta_runtime.device import import_cv2
from tta_runtime.errors import ConfigError

if TYPE_CHECKING:
    from tta_runtime.result import Result


class SceneCutDetector:
    """A cut when the colour histogram of a frame is far from the previous frame's.

    Frames are shrunk to 32x32 (area average); each RGB channel gets a 16-bin histogram; the distance is
    Hellinger's, sqrt(1 - sum sqrt(p q)) averaged over channels, in [0, 1]. Objects moving across a fixed
    background move it little; a new scene, a new background or a lighting change moves it far.
    """

    def __init__(self, threshold: float = 0.3) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"cut threshold must be in (0, 1] (a Hellinger distance), got {threshold!r}")
        self.threshold = threshold
        self._previous: np.ndarray | None = None
        self.distance: float | None = None

    def update(self, rgb: np.ndarray) -> bool:
        """Feed the next (H, W, 3) uint8 frame; True if it starts a new scene."""
        cv2 = import_cv2()
        small = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA) if rgb.shape[:2] != (32, 32) else rgb
        bins = (small.reshape(-1, 3) >> 4).astype(np.int64) + np.array([0, 16, 32])  # (1024, 3) bin ids
        hist = np.bincount(bins.ravel(), minlength=48).reshape(3, 16) / (small.shape[0] * small.shape[1])
        previous, self._previous = self._previous, hist
        if previous is None:
            self.distance = None
            return False
        bc = np.sqrt(hist * previous).sum(axis=1)  # Bhattacharyya coefficient per channel
        self.distance = float(np.sqrt(np.clip(1.0 - bc, 0.0, 1.0)).mean())
        return self.distance > self.threshold

    def reset(self) -> None:
        self._previous, self.distance = None, None


class CollapseMonitor:
    """Signals that continual adaptation went wrong, so that the stream resets to the loaded weights.

    Three signals, checked on every processed frame's `Result`:
    - rollback: the adaptation loop met a non-finite loss, gradient or weight (`adaptation.rolled_back`);
    - loss: the frame's reconstruction error (after adaptation) stays above `loss_ratio` x the median of
      the previous `window` frames for `patience` frames in a row (divergence);
    - mask RankMe: the effective number of slots in use, RankMe (`tta_runtime.ood.rankme`) of the
      (K, pixels) mask matrix, averaged over the last `window` frames, falls below `min_rank`: the
      masks are collapsing onto fewer slots than the scene has parts. One slot everywhere scores 1;
      an unadapted model on scenes of 2-4 objects scores above 2, and continual adaptation over
      thousands of frames can drift towards 1 without this check. A scene with a single object can
      legitimately score below 2: adaptation is then reset every `window` frames, i.e. it is held
      close to the loaded weights.
    """

    def __init__(self, window: int = 8, min_rank: float = 2.0, loss_ratio: float = 3.0, patience: int = 3) -> None:
        if window < 2 or patience < 1 or min_rank < 1 or loss_ratio <= 1:
            raise ConfigError(
                f"CollapseMonitor needs window >= 2, patience >= 1, min_rank >= 1 and loss_ratio > 1; got "
                f"window={window}, patience={patience}, min_rank={min_rank}, loss_ratio={loss_ratio}"
            )
        self.window, self.min_rank, self.loss_ratio, self.patience = window, min_rank, loss_ratio, patience
        self.ranks: deque[float] = deque(maxlen=window)
        self.losses: deque[float] = deque(maxlen=window)
        self._high = 0
        self.rank: float | None = None

    def update(self, result: Result) -> str | None:
        """Feed one frame's result; the reason to reset, or None."""
        from tta_runtime.ood import rankme

        rep = result.adaptation
        if rep is not None and rep.rolled_back:
            return f"rollback ({rep.rollback_reason})"
        k, h, w = result.masks.shape
        step = max(1, min(h, w) // 32)  # about the model's own resolution is enough for a rank
        self.rank = rankme(result.masks[:, ::step, ::step].reshape(k, -1))
        self.ranks.append(self.rank)
        loss = float(result.recon_mse)
        baseline = float(np.median(self.losses)) if len(self.losses) == self.window else None
        self.losses.append(loss)
        self._high = self._high + 1 if baseline is not None and loss > self.loss_ratio * baseline else 0
        if self._high >= self.patience:
            return f"loss {loss:.4g} > {self.loss_ratio:g} x recent median {baseline:.4g} for {self.patience} frames"
        if len(self.ranks) == self.window and (mean_rank := float(np.mean(self.ranks))) < self.min_rank:
            return f"mask RankMe {mean_rank:.2f} < {self.min_rank:g} over {self.window} frames (slots collapsed)"
        return None

    def reset(self) -> None:
        self.ranks.clear()
        self.losses.clear()
        self._high = 0
