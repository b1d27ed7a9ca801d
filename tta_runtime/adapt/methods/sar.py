"""SAR (Niu et al., ICLR 2023): reliable, sharpness-aware entropy minimisation, reset on collapse.

1. reliable entropy: only samples with entropy below 0.4 * ln C contribute;
2. sharpness-aware minimisation: the recipe sets `optimizer = "sam"` (rho 0.05 on SGD); the loop climbs
   to the worst nearby weights with the first loss, takes `sam_loss` there (entropy of the samples the
   first pass kept, filtered again) and steps the base optimizer with that gradient;
3. model recovery: an exponential moving average of the second loss (0.9/0.1) below 0.2 means the model
   has collapsed to confident, trivial predictions; `needs_reset` tells continual mode to reset.
Norm layers only (the paper argues for GroupNorm/LayerNorm models; BatchNorm ones use batch statistics).
"""

from __future__ import annotations

import math

import torch

from tta_runtime.adapt.methods.base import METHODS, MethodContext, entropy


@METHODS.register("sar")
class SAR:
    task = "classification"
    default_params = "norm"
    margin_factor = 0.4
    reset_constant = 0.2

    def __init__(self, context: MethodContext | None = None) -> None:
        self.context = context or MethodContext()
        self.margin = self.margin_factor * math.log(max(self.context.num_classes, 2))
        self.ema: float | None = None
        self._first_keep: torch.Tensor | None = None
        self.needs_reset = False
        self.info: dict[str, object] = {}

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ent = entropy(model(x).logits)
        keep = ent < self.margin
        self._first_keep = keep.detach()
        self.info = {"kept": int(keep.sum()), "batch": int(x.shape[0])}
        return ent[keep].mean() if keep.any() else ent.new_zeros(())

    def sam_loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The loss at the perturbed weights: first-pass survivors, filtered again."""
        ent = entropy(model(x).logits)
        first = self._first_keep if self._first_keep is not None else torch.ones_like(ent, dtype=torch.bool)
        keep = first & (ent < self.margin)
        if not keep.any():
            return ent.new_zeros(())
        loss = ent[keep].mean()
        value = float(loss.detach())
        self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        self.needs_reset = self.ema < self.reset_constant
        return loss

    def on_reset(self) -> None:
        self.ema, self.needs_reset = None, False
