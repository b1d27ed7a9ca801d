"""Adaptation methods: each says what loss to minimise and which parameters it adapts by default.

A method never builds an optimizer, moves devices or reads configuration: the one adaptation loop in
`tta_runtime.adapt` does that. Register a new method with `@METHODS.register("name")`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .registry import Registry
from .segmenter import SegmenterOutput


class Method(Protocol):
    """`loss(out, target)`: `out` from the segmenter on the decoded pixels, `target` (B, P, 3) in [0, 1]."""

    default_params: str

    def loss(self, out: SegmenterOutput, target: torch.Tensor) -> torch.Tensor: ...


METHODS: Registry[type[Method]] = Registry("method")


@METHODS.register("slot_reconstruction")
class SlotReconstruction:
    """Slot-TTA: pixel reconstruction MSE. The masks are never supervised at test time."""

    default_params = "all"

    def loss(self, out: SegmenterOutput, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.reconstruction, target)


@METHODS.register("slot_mask_entropy")
class SlotMaskEntropy:
    """Tent-style baseline: mean per-pixel entropy of the mask distribution over slots.

    Minimising it makes each pixel commit to one slot; it ignores the image, which is exactly why it is
    the baseline that reconstruction should beat.
    """

    default_params = "all"

    def loss(self, out: SegmenterOutput, target: torch.Tensor) -> torch.Tensor:
        logp = out.logits.log_softmax(dim=1)  # (B, K, P), stable where softmax underflows
        return -(logp.exp() * logp).sum(dim=1).mean()


def get_method(name: str) -> Method:
    return METHODS.get(name)()
