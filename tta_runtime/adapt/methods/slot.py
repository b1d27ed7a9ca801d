"""Slot-model methods: Slot-TTA's reconstruction loss and the mask-entropy baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tta_runtime.models.segmenter import SegmenterOutput
from tta_runtime.adapt.methods.base import METHODS, MethodContext


@METHODS.register("slot_reconstruction")
class SlotReconstruction:
    """Slot-TTA: pixel reconstruction MSE. The masks are never supervised at test time."""

    task = "segmentation"
    default_params = "all"

    def __init__(self, context: MethodContext | None = None) -> None:
        pass

    def loss(self, out: SegmenterOutput, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.reconstruction, target)


@METHODS.register("slot_mask_entropy")
class SlotMaskEntropy:
    """Tent-style baseline: mean per-pixel entropy of the mask distribution over slots.

    Minimising it makes each pixel commit to one slot; it ignores the image, which is exactly why it is
    the baseline that reconstruction should beat.
    """

    task = "segmentation"
    default_params = "all"

    def __init__(self, context: MethodContext | None = None) -> None:
        pass

    def loss(self, out: SegmenterOutput, target: torch.Tensor) -> torch.Tensor:
        logp = out.logits.log_softmax(dim=1)  # (B, K, P), stable where softmax underflows
        return -(logp.exp() * logp).sum(dim=1).mean()
