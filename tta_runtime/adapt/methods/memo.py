"""MEMO (Zhang, Levine & Finn, NeurIPS 2022): marginal entropy over augmentations of a single image.

For each test image, `n_aug` random augmentations are drawn; the loss is the entropy of the model's
AVERAGE prediction over them, so the model is pushed to be both confident and invariant. All
parameters adapt, the image is predicted once afterwards, and the model resets (episodic). The paper
uses AugMix; for our 32x32 digits the augmentations are small affine moves (rotation within 15 degrees,
scale 0.9-1.1, shifts within 3 px) and contrast/brightness jitter, which keep a digit a digit (no flips).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tta_runtime.adapt.methods.base import METHODS, MethodContext


def augment(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(1, 3, S, S) in [0, 1] -> (n, 3, S, S): random affine + contrast/brightness, seeded by `gen`."""
    u = torch.rand(n, 6, generator=gen).to(x.device)
    angle = (u[:, 0] * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * u[:, 1]
    shift = (u[:, 2:4] * 2 - 1) * (3 / (x.shape[-1] / 2))  # 3 px in normalised [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, *x.shape[1:]], align_corners=False)
    out = F.grid_sample(x.expand(n, -1, -1, -1), grid, padding_mode="border", align_corners=False)
    contrast = (0.8 + 0.4 * u[:, 4]).view(n, 1, 1, 1)
    bright = ((u[:, 5] * 2 - 1) * 0.1).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(0, 1)


@METHODS.register("memo")
class MEMO:
    task = "classification"
    default_params = "all"
    n_aug = 16

    def __init__(self, context: MethodContext | None = None) -> None:
        self.needs_reset = False
        self.info: dict[str, object] = {}

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        losses = []
        for i in range(x.shape[0]):  # per image: the marginal is over one image's augmentations
            logits = model(augment(x[i : i + 1], self.n_aug, gen)).logits  # (n_aug, C)
            logp = logits.log_softmax(dim=1)
            marginal = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])  # log of the mean probability
            losses.append(-(marginal.exp() * marginal).sum())
        return torch.stack(losses).mean()
