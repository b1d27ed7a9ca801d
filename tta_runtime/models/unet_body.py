"""The U-Net body shared by the feed-forward baseline (`tta_runtime.models.unet`) and the slot segmenter's
"unet" encoder (`tta_runtime.models.segmenter`).

image (B, 3, S, S) -> concatenate a 2-channel coordinate grid (CoordConv) -> `depth` levels of (conv3x3 +
GroupNorm + ReLU) x 2 with max-pool down, transposed conv up and skip concatenation (channels base, 2 base,
4 base, ...) -> 1x1 conv -> (B, out_channels, S, S). GroupNorm normalises each image on its own, so a
prediction does not depend on the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class DoubleConv(nn.Sequential):
    """(conv3x3 -> GroupNorm -> ReLU) x 2, size-preserving: (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), group_norm(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1), group_norm(cout), nn.ReLU(),
        )


class UNetBody(nn.Module):
    """(B, 3, S, S) float -> (B, out_channels, S, S); `resolution` must be divisible by 2 ** `depth`."""

    def __init__(self, resolution: int, out_channels: int, base_channels: int, depth: int) -> None:
        super().__init__()
        chans = [base_channels * 2**i for i in range(depth + 1)]  # per level, last = bottleneck
        self.down = nn.ModuleList(DoubleConv(5 if i == 0 else chans[i - 1], chans[i]) for i in range(depth))
        self.bottleneck = DoubleConv(chans[-2], chans[-1])
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.up = nn.ModuleList(DoubleConv(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], out_channels, 1)
        ticks = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
        yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)  # (1, 2, S, S)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        x = torch.cat([image, self.coords.expand(b, -1, -1, -1)], dim=1)  # (B, 5, S, S)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)  # (B, C_i, S / 2**i, S / 2**i)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)  # (B, C_depth, S / 2**depth, S / 2**depth)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips), strict=True):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)
