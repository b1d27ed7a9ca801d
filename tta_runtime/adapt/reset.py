"""Continual mode's reset policy: when carried-over adaptation goes back to the loaded weights.

Three signals, any of which resets: `reset_every` adapted inputs; the collapse monitor (a classifier's
predicted labels over the last `collapse_window` inputs carry too little entropy, a sign that adaptation
is collapsing onto a few classes); and a method's own signal (SAR), which the adapter handles itself.
"""

from __future__ import annotations

import collections
import math

import numpy as np


class ContinualPolicy:
    """Counts adapted inputs and recent labels; `update` says why to reset now, or None."""

    def __init__(
        self, reset_every: int | None, collapse_window: int | None, collapse_entropy: float, num_classes: int
    ) -> None:
        self.reset_every = reset_every
        self.collapse_window = collapse_window
        self.collapse_entropy = collapse_entropy
        self.num_classes = num_classes
        self.adapted = 0
        self._labels: collections.deque[int] = collections.deque(maxlen=collapse_window or 1)

    def clear(self) -> None:
        self.adapted = 0
        self._labels.clear()

    def update(self, n: int, labels: list[int] | None = None) -> str | None:
        """`n` more inputs were adapted (classifiers: with these predicted `labels`); the reason to reset, if any."""
        self.adapted += n
        why = None
        if self.reset_every is not None and self.adapted >= self.reset_every:
            why = f"reset_every={self.reset_every}"
        window = self.collapse_window
        if window is not None and labels:
            self._labels.extend(labels)
            if len(self._labels) == window:
                counts = np.bincount(np.fromiter(self._labels, dtype=np.int64))
                p = counts[counts > 0] / window
                ent = float(-(p * np.log(p)).sum())
                limit = self.collapse_entropy * math.log(max(self.num_classes, 2))
                if ent < limit:
                    why = f"collapse: label entropy {ent:.2f} < {limit:.2f} over the last {window} inputs"
        return why
