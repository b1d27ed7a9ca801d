"""The one learning-rate schedule of every trainer: linear warm-up, then cosine decay to a final fraction.

    lr(step) = lr x (step + 1) / warmup                                   for step < warmup
    lr(step) = lo + (lr - lo) x (1 + cos(pi x t)) / 2,  lo = lr x final_fraction,
               t = min(1, (step - warmup) / max(1, steps - warmup))       afterwards

`step` counts from 0 (the step about to run). `final_fraction` 0 decays to zero, 1 is a constant lr; with
`warmup` 0 the first step runs at `lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tta_runtime.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """Learning rate per step: `warmup` linear steps up to `lr`, cosine down to `lr x final_fraction` at `steps`."""

    lr: float
    steps: int
    warmup: int = 0
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.steps < 1 or self.warmup < 0 or not 0.0 <= self.final_fraction <= 1.0:
            raise ConfigError(
                f"a schedule needs lr > 0, steps >= 1, warmup >= 0 and final_fraction in [0, 1]; got {self}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        lo = self.lr * self.final_fraction
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))
