"""The feed-forward U-Net's own test-time adaptation: Tent on its GroupNorm layers, per image, episodic.

The fair comparison for Slot-TTA (the paper's, too) is a feed-forward segmenter given an adaptation of
its own. The U-Net predicts K mask logits per pixel, which is a classifier per pixel; Tent minimises the
mean per-pixel entropy of those logits over the norm layers' scale and shift. It runs through the one
adaptation loop (`tta_runtime.adapt.loop.Adapter`, classifier path): `PixelClassifier` presents the
U-Net's output as a classifier output whose logits are (B, K, S, S), and the entropy over dim 1 is then
the per-pixel entropy. GroupNorm has no running statistics, so the recipe's `norm_stats` has nothing to
choose: only the affine parameters change, and the loop restores them after every image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tta_runtime.adapt.loop import Adapter
from tta_runtime.config import AdaptConfig
from tta_runtime.errors import ConfigError
from tta_runtime.models.segmenter import images_to_tensor
from tta_runtime.models.unet import UNetSegmenter

__all__ = ["PixelClassifier", "PixelOutput", "adapt_feedforward"]


@dataclass
class PixelOutput:
    """``logits``: (B, K, S, S) mask-channel scores of every pixel (before the softmax over K)."""

    logits: torch.Tensor


class PixelClassifier(nn.Module):
    """A `UNetSegmenter` seen by the adaptation loop as a classifier of every pixel into K channels."""

    def __init__(self, unet: UNetSegmenter) -> None:
        super().__init__()
        self.unet = unet
        self.num_classes = unet.cfg.num_slots

    def forward(self, image: torch.Tensor) -> PixelOutput:
        return PixelOutput(self.unet(image))


def _per_image(on_step: Callable[[int, int, np.ndarray], None], i: int) -> Callable[[int, PixelOutput], None]:
    """The loop's `on_step(step, output)` for image i, handing on its segmentation."""
    return lambda step, out: on_step(i, step, out.logits[0].argmax(0).cpu().numpy())


def adapt_feedforward(
    unet: UNetSegmenter, images: np.ndarray, recipe: AdaptConfig,
    on_step: Callable[[int, int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Adapt `unet` on each uint8 image (N, S, S, 3) alone with `recipe` and segment it with the adapted
    weights. Returns the segmentations (N, S, S) int64 and the seconds each image took.

    `on_step(i, step, segmentation)`: image i's segmentation before update `step` and, last, after the
    final update (what a sweep over step counts reads from one run at a constant learning rate).
    The U-Net's weights are bit-exact afterwards (episodic recipes; the loop restores them).
    """
    if recipe.mode != "episodic":
        raise ConfigError(f"the U-Net baseline adapts per image: recipe {recipe.name!r} must have mode='episodic', got {recipe.mode!r}")
    adapter = Adapter(PixelClassifier(unet), recipe)
    segs = np.empty(images.shape[:3], dtype=np.int64)
    seconds: list[float] = []
    for i in range(len(images)):
        x = images_to_tensor(images[i : i + 1])
        t = time.perf_counter()
        out, _ = adapter.run(x, on_step=None if on_step is None else _per_image(on_step, i))
        seconds.append(time.perf_counter() - t)
        segs[i] = out.logits[0].argmax(0).cpu().numpy()
    return segs, seconds
