"""Adaptation methods: each says which parameters it adapts by default and what loss to minimise.

A method never builds an optimizer, moves devices or reads configuration: the one adaptation loop in
`tta_runtime.adapt` does that. One small file per method:

=====================  ==========  ==================================================================
method                 model       loss (and what else it declares)
=====================  ==========  ==================================================================
slot_reconstruction    segmenter   Slot-TTA: pixel reconstruction MSE (slot.py)
slot_mask_entropy      segmenter   entropy of the per-pixel slot distribution, the Tent-style baseline
bn_stats               classifier  no loss: BatchNorm statistics from the test batch (bn.py)
tent                   classifier  mean prediction entropy (Wang et al. 2021) (tent.py)
eata                   classifier  entropy with reliability + redundancy filters, Fisher anti-forgetting
sar                    classifier  reliable entropy, sharpness-aware step, reset on collapse (sar.py)
memo                   classifier  marginal entropy over augmented copies of one image (memo.py)
rotation               classifier  4-way rotation prediction through the trained rotation head (TTT)
=====================  ==========  ==================================================================

Segmenter methods implement `loss(out, target)` (`SegmenterMethod`); classifier methods implement
`loss(model, x, gen)` (`ClassifierMethod`), because several of them run the model on transformed
copies of the input. Both are registered in `METHODS` with `@METHODS.register("name")`.
"""

from __future__ import annotations

from tta_runtime.adapt.methods import bn, eata, memo, rotation, sar, slot, tent
from tta_runtime.adapt.methods.base import METHODS, ClassifierMethod, MethodContext, SegmenterMethod, get_method
from tta_runtime.adapt.methods.slot import SlotMaskEntropy, SlotReconstruction

Method = SegmenterMethod | ClassifierMethod

__all__ = [
    "METHODS", "ClassifierMethod", "Method", "MethodContext", "SegmenterMethod", "SlotMaskEntropy",
    "SlotReconstruction", "get_method",
]
_ = (bn, eata, memo, rotation, sar, slot, tent)  # imported for their registrations
