"""EATA (Niu et al., ICML 2022): entropy minimisation on reliable, non-redundant samples, without forgetting.

Per batch:
1. reliability: keep samples with entropy below e_margin = 0.4 * ln C;
2. redundancy: keep those whose prediction's cosine similarity to a moving average of past kept
   predictions is below d_margin (the average is updated with each batch's kept predictions, 0.9/0.1);
3. weight each kept sample's entropy by 1 / exp(entropy - e_margin) (confident samples count more);
4. anti-forgetting: add fisher_alpha * sum_i F_i (theta_i - theta0_i)^2 over the adapted parameters, with
   the diagonal Fisher F shipped in the model folder (`fisher.safetensors`; see the card).
A batch where no sample survives takes no step. Defaults are the paper's; d_margin follows its CIFAR
setting (0.4), since our classifiers have 10 classes.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from tta_runtime.adapt.methods.base import METHODS, MethodContext, entropy

log = logging.getLogger(__name__)


@METHODS.register("eata")
class EATA:
    task = "classification"
    default_params = "norm"
    e_margin_factor = 0.4
    d_margin = 0.4
    fisher_alpha = 2000.0

    def __init__(self, context: MethodContext | None = None) -> None:
        self.context = context or MethodContext()
        self.e_margin = self.e_margin_factor * math.log(max(self.context.num_classes, 2))
        self.avg_probs: torch.Tensor | None = None  # moving average of kept predictions (redundancy filter)
        self.needs_reset = False
        self.info: dict[str, object] = {}
        # Without a Fisher the anti-forgetting term is off: say so (once here, and in every report's method_info).
        self.fisher_state = "used" if self.context.fisher else "absent: no anti-forgetting term"
        if not self.context.fisher:
            log.warning("EATA runs without a Fisher, so its anti-forgetting term is off: the model folder has no "
                        "fisher.safetensors; rt.calibrate(in_distribution_images) computes one")

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        logits = model(x).logits
        ent = entropy(logits)
        keep = ent < self.e_margin
        probs = logits.softmax(dim=1).detach()
        if self.avg_probs is not None and keep.any():
            sim = F.cosine_similarity(self.avg_probs.unsqueeze(0), probs, dim=1)
            keep = keep & (sim.abs() < self.d_margin)
        self.info = {"kept": int(keep.sum()), "batch": int(x.shape[0]), "fisher": self.fisher_state}
        if keep.any():
            kept_mean = probs[keep].mean(dim=0)
            self.avg_probs = kept_mean if self.avg_probs is None else 0.9 * self.avg_probs + 0.1 * kept_mean
        params = dict(model.named_parameters())
        loss = logits.new_zeros(())
        if keep.any():
            coeff = torch.exp(-(ent[keep].detach() - self.e_margin))
            loss = (ent[keep] * coeff).mean()
        fisher = self.context.fisher
        if fisher and keep.any():
            for name, f in fisher.items():
                p = params.get(name)
                if p is not None and p.requires_grad:
                    loss = loss + self.fisher_alpha * (f.to(p.device) * (p - self.context.source[name].to(p.device)) ** 2).sum()
        return loss
