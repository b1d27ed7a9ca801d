"""EATA's diagonal Fisher information of a classifier's norm-layer affine parameters, on in-distribution images.

    F_i = mean over images of (d CE(logits(x), y) / d theta_i)^2, one image per backward pass,

with y the image's class label when known, else the model's own prediction (a pseudo-label, as EATA does on
unlabelled test-domain-free data). EATA's anti-forgetting term then weighs each parameter's drift from its
loaded value by F_i (`tta_runtime.adapt.methods.eata`). The model is used as it is set (callers pass it in
eval() with BatchNorm on source statistics); its gradients are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.errors import ConfigError
from tta_runtime.models.classifier import norm_parameters

__all__ = ["fisher_information"]


def fisher_information(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `norm_parameters(model)` by parameter name (float32, on the parameters' device).

    `batches`: (x (B, 3, S, S) in [0, 1], labels (B,) int or None) pairs; every image is its own backward pass.
    `progress(n)` is called with the images done after each batch. `ConfigError` when the model has no norm
    layer with affine parameters (EATA adapts those) or no image is given."""
    params = norm_parameters(model)
    if not params:
        raise ConfigError("the model has no norm layer with affine parameters: EATA's Fisher (and Tent) adapt those")
    names, tensors = list(params), list(params.values())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    flags = [p.requires_grad for p in tensors]
    n = 0
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for x, labels in batches:
                for i in range(x.shape[0]):
                    logits = model(x[i : i + 1]).logits  # (1, C)
                    target = logits.argmax(1).detach() if labels is None else labels[i : i + 1].to(logits.device)
                    grads = torch.autograd.grad(F.cross_entropy(logits, target), tensors, allow_unused=True)
                    for name, g in zip(names, grads):
                        if g is not None:
                            fisher[name] += g.detach() ** 2
                n += x.shape[0]
                if progress is not None:
                    progress(n)
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
    if n == 0:
        raise ConfigError("EATA's Fisher needs at least one in-distribution image")
    return {name: (f / n).float() for name, f in fisher.items()}
