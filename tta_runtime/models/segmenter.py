"""The slot-centric segmenter: Slot-TTA's 2D model (Prabhudesai et al., ICML 2023).

image (B, 3, S, S) in [0, 1]
  -> encoder: `encoder_layers` x conv(k x k, C, stride 1, 'same') + ReLU, + soft position embedding
  -> features (B, N = S*S, D)
  -> Slot Attention: K learned initial slots, `iters` rounds of attention (softmax over slots), GRU, MLP
  -> slots (B, K, D)
  -> coordinate-MLP decoder, one pass per (slot, pixel): RGB (3) + mask logit (1)
  -> masks = softmax over slots (B, K, P); reconstruction = sum_k masks * rgb (B, P, 3)

Differences from the released code are only in sizes, which come from `SegmenterConfig` (the card).
Grad policy belongs to the caller: nothing here disables or enables gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.config import SegmenterConfig
from tta_runtime.models.modes import frozen_call
from tta_runtime.models.unet_body import UNetBody

if TYPE_CHECKING:
    import numpy as np


@dataclass
class SegmenterOutput:
    """What one forward pass produces. P is the number of decoded pixels (S*S unless a subset)."""

    masks: torch.Tensor  # (B, K, P) float, softmax over K
    reconstruction: torch.Tensor  # (B, P, 3) float, mask-weighted sum of per-slot RGB
    rgb: torch.Tensor  # (B, K, P, 3) per-slot RGB (no activation)
    logits: torch.Tensor  # (B, K, P) mask logits
    slots: torch.Tensor  # (B, K, D)
    attention: torch.Tensor  # (B, K, N) last slot-attention weights (softmax over K)


def _grid(resolution: int) -> torch.Tensor:
    """Pixel-centre coordinates in [0, 1], (S*S, 2) as (x, y), row-major like a flattened image."""
    ticks = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


class Encoder(nn.Module):
    """Stride-1 conv stack (or, with ``encoder="unet"``, a 2-level U-Net) + soft position embedding:
    (B, 3, S, S) -> (B, S*S, D)."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        c, k = cfg.encoder_channels, cfg.encoder_kernel
        self.convs: nn.Module
        if cfg.encoder == "unet":
            self.convs = UNetBody(cfg.resolution, cfg.slot_dim, c, depth=2)
        else:
            layers: list[nn.Module] = []
            for i in range(cfg.encoder_layers):
                out = cfg.slot_dim if i == cfg.encoder_layers - 1 else c
                layers += [nn.Conv2d(3 if i == 0 else c, out, k, padding=k // 2), nn.ReLU()]
            self.convs = nn.Sequential(*layers)
        self.pos = nn.Linear(4, cfg.slot_dim)
        grid = _grid(cfg.resolution)
        # [x, y, 1-x, 1-y]: the released code's 4-channel ramp.
        self.register_buffer("grid", torch.cat([grid, 1 - grid], dim=-1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if _frozen_call(image):  # channels-last convolutions are faster on the CPU, and the (B, N, D) view is free
            image = image.contiguous(memory_format=torch.channels_last)
        x = self.convs(image)  # (B, D, S, S)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        return x + self.pos(self.grid)


class SlotAttention(nn.Module):
    """Slot Attention with learned per-slot initial slots (deterministic: no sampling)."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        d = cfg.slot_dim
        self.iters = cfg.iters
        self.scale = d**-0.5
        self.slots_init = nn.Parameter(torch.randn(1, cfg.num_slots, d) * d**-0.5)
        self.norm_inputs = nn.LayerNorm(d)
        self.norm_slots = nn.LayerNorm(d)
        self.norm_mlp = nn.LayerNorm(d)
        self.to_q = nn.Linear(d, d)
        self.to_k = nn.Linear(d, d)
        self.to_v = nn.Linear(d, d)
        self.gru = nn.GRUCell(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, d = inputs.shape
        inputs = self.norm_inputs(inputs)
        if _frozen_call(inputs):  # one product for both projections
            k, v = F.linear(inputs, torch.cat([self.to_k.weight, self.to_v.weight]),
                            torch.cat([self.to_k.bias, self.to_v.bias])).split(d, dim=-1)
        else:
            k, v = self.to_k(inputs), self.to_v(inputs)  # (B, N, D)
        slots = self.slots_init.expand(b, -1, -1)
        attn = inputs.new_zeros(0)
        for _ in range(self.iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots))  # (B, K, D)
            logits = torch.einsum("bkd,bnd->bkn", q, k) * self.scale
            attn = logits.softmax(dim=1) + 1e-8  # slots compete for each input
            weights = attn / attn.sum(dim=-1, keepdim=True)  # weighted mean over inputs
            updates = torch.einsum("bkn,bnd->bkd", weights, v)
            slots = self.gru(updates.reshape(-1, d), prev.reshape(-1, d)).reshape(b, -1, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


_TILE_ROWS = 2048
"""Rows (slot x pixel pairs) per tile of the decoder's frozen pass: three buffers of 2048 x W=64 floats (1.5 MiB)
stay in a core's L2 cache; fewer, larger tiles spend less on per-operation overhead (measured best of 512-8192)."""


_TILED = [True]  # False inside `eager_decoder()`


@contextlib.contextmanager
def eager_decoder() -> Iterator[None]:
    """Frozen passes decode as whole tensors inside this block, as before the tiled path existed: the reference
    of `tta-runtime bench overhead` and of the parity tests. Not thread-safe (a process-wide switch)."""
    _TILED[0] = False
    try:
        yield
    finally:
        _TILED[0] = True


def _frozen_call(t: torch.Tensor) -> bool:
    """`frozen_call` outside `eager_decoder()`: the decoder may run tiled and in place."""
    return _TILED[0] and frozen_call(t)


def _rows(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layers` (pointwise, Linear last dim) on x (..., W) as one (rows, W) matrix: the same numbers in PyTorch
    (a Linear runs as one addmm either way), but an exported graph then holds Gemm with its bias fused instead
    of MatMul + Add (ONNX Runtime fuses the bias only on 2-D inputs), which saves a pass over the activations."""
    y = layers(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class CoordDecoder(nn.Module):
    """Coordinate MLP conditioned additively on a slot: (B, K, D) x (P, 2) -> RGB (B,K,P,3), logit (B,K,P)."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        w = cfg.decoder_width
        coords = _grid(cfg.resolution) - 0.5  # [-0.5, 0.5), as released
        if cfg.decoder_fourier_bands:
            # Fourier features (Tancik et al. 2020): a ReLU MLP on raw coordinates learns sharp object edges
            # very slowly (spectral bias); sin/cos at doubling frequencies let it draw them early in training.
            freqs = 2.0 ** torch.arange(cfg.decoder_fourier_bands, dtype=torch.float32) * 2 * torch.pi
            angles = (coords[:, :, None] * freqs).flatten(1)  # (S*S, 2 * bands)
            coords = torch.cat([coords, angles.sin(), angles.cos()], dim=-1)
        self.coord = nn.Linear(coords.shape[-1], w)
        self.slot_proj = nn.ModuleList(nn.Linear(cfg.slot_dim, w) for _ in range(cfg.decoder_blocks))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w)) for _ in range(cfg.decoder_blocks)
        )
        for block in self.blocks:
            # Zero-initialised output: each residual block starts as the identity (as released).
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(w, 4))
        self.register_buffer("coords", coords, persistent=False)  # (S*S, 2 [+ 4 * bands])

    def forward(
        self, slots: torch.Tensor, pixel_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self.coords if pixel_idx is None else self.coords[pixel_idx]
        if _frozen_call(slots):
            return self._forward_tiled(slots, coords)
        h = self.coord(coords)[None, None]  # (1, 1, P, W)
        for proj, block in zip(self.slot_proj, self.blocks, strict=True):
            h = h + proj(slots)[:, :, None, :]  # (B, K, P, W)
            h = h + _rows(block, h)
        out = _rows(self.out, h)  # (B, K, P, 4)
        return out[..., :3], out[..., 3]

    def _forward_tiled(self, slots: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same numbers without gradients, in tiles of pixels that stay in the CPU cache, in place.

        The (slot, pixel) activations are the bulk of a frozen pass (B*K*P rows of W floats, several MB): as whole
        tensors every ReLU, bias and residual add is a trip to memory and a fresh allocation. Here each tile of
        about `_TILE_ROWS` rows runs the whole MLP in three preallocated buffers while it is in cache (matrix
        products into them, bias, ReLU and residual adds in place). Rows are independent, so tiling changes
        nothing but the summation order inside a product."""
        b, k, _ = slots.shape
        bk, p, w = b * k, coords.shape[0], self.coord.out_features
        pos = self.coord(coords)  # (P, W): the per-position term, once
        per_slot = [proj(slots).reshape(bk, 1, w) for proj in self.slot_proj]  # the per-slot terms, once each
        n = len(self.blocks)
        # after block i the residual stream gets its bias and block i+1's slot term: one add of their sum
        shifts = [self.blocks[i][3].bias + (per_slot[i + 1] if i + 1 < n else 0) for i in range(n)]
        layers = [(blk[1].weight.t(), blk[1].bias, blk[3].weight.t()) for blk in self.blocks]
        w_out, b_out = self.out[1].weight.t(), self.out[1].bias
        out = slots.new_empty(bk, p, 4)
        tile = max(8, _TILE_ROWS // bk)
        bufs = slots.new_empty(3, bk * min(tile, p), w)
        for p0 in range(0, p, tile):
            t = min(tile, p - p0)
            h, r, a = bufs[:, : bk * t]  # residual stream, its ReLU, a block's hidden layer: (B*K*t, W) each
            torch.add(pos[p0 : p0 + t][None], per_slot[0], out=h.view(bk, t, w))
            for (w1, b1, w2), shift in zip(layers, shifts):
                torch.mm(torch.clamp_min(h, 0, out=r), w1, out=a)
                h.addmm_(a.add_(b1).relu_(), w2)
                h.view(bk, -1, w).add_(shift)
            out[:, p0 : p0 + t] = torch.mm(torch.clamp_min(h, 0, out=r), w_out).add_(b_out).view(bk, t, 4)
        out = out.view(b, k, p, 4)
        return out[..., :3], out[..., 3]


class SlotSegmenter(nn.Module):
    """Encoder + Slot Attention + coordinate decoder. Inputs (B, 3, S, S) float in [0, 1]."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.slot_attention = SlotAttention(cfg)
        self.decoder = CoordDecoder(cfg)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> features (B, S*S, D)."""
        return self.encoder(image)

    def forward_features(
        self, features: torch.Tensor, pixel_idx: torch.Tensor | None = None
    ) -> SegmenterOutput:
        """Everything after the encoder; `pixel_idx` (P,) long decodes only those flattened pixels."""
        slots, attn = self.slot_attention(features)
        rgb, logits = self.decoder(slots, pixel_idx)
        masks = logits.softmax(dim=1)  # (B, K, P)
        recon = (masks[..., None] * rgb).sum(dim=1)  # (B, P, 3)
        return SegmenterOutput(masks, recon, rgb, logits, slots, attn)

    def forward(self, image: torch.Tensor, pixel_idx: torch.Tensor | None = None) -> SegmenterOutput:
        return self.forward_features(self.encode(image), pixel_idx)


def segmentation_masks(cfg: SegmenterConfig, out: SegmenterOutput) -> torch.Tensor:
    """The masks that are the model's segmentation, (B, K, S*S) summing to 1 over K: ``out.masks`` (decoder)
    or ``out.attention`` (slot attention over the stride-1 encoder positions), or the product
    ``masks * attention ** cfg.attention_power`` renormalised over K, by ``cfg.mask_source``.

    An output with no attention maps (``attention.numel() == 0``: the ONNX frozen path, whose ``masks``
    output already applies the card's mask source) is returned as it is."""
    if out.attention.numel() == 0:
        return out.masks
    if cfg.mask_source == "attention":
        return out.attention
    if cfg.mask_source == "product":
        attn = out.attention if cfg.attention_power == 1 else out.attention.clamp_min(1e-12) ** cfg.attention_power
        joint = out.masks * attn
        return joint / joint.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return out.masks


def images_to_tensor(images: "np.ndarray") -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def image_targets(image: torch.Tensor, pixel_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, S, S) -> (B, P, 3) pixels in the decoder's order, optionally a subset."""
    flat = image.flatten(2).transpose(1, 2)  # (B, S*S, 3)
    return flat if pixel_idx is None else flat[:, pixel_idx]


def reconstruction_loss(out: SegmenterOutput, image: torch.Tensor, pixel_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the reconstruction over the decoded pixels (Slot-TTA's test-time loss)."""
    return F.mse_loss(out.reconstruction, image_targets(image, pixel_idx))
