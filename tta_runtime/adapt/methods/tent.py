"""Tent (Wang et al., ICLR 2021): minimise the entropy of the predictions, adapting only the norm layers.

Tent adapts the affine scale and shift of the normalisation layers and, for BatchNorm, normalises with
the test batch's statistics (the recipe's `norm_stats = "batch"`; at batch size 1 the recipe uses
"prior", the source statistics mixed with the single image's, so BatchNorm never sees a degenerate batch).
"""

from __future__ import annotations

import torch

from tta_runtime.adapt.methods.base import METHODS, MethodContext, entropy


@METHODS.register("tent")
class Tent:
    task = "classification"
    default_params = "norm"

    def __init__(self, context: MethodContext | None = None) -> None:
        self.needs_reset = False
        self.info: dict[str, object] = {}

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return entropy(model(x).logits).mean()
