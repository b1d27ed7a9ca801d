"""Fast execution paths of a trained ``FTWTClassifier`` at batch 1 (frozen, plain tensors, BatchNorm folded).

- gather (``GatheredClassifier``): a static kept count k per unit (``static_ks``, ``fit_static_ks``); per input
  the top-k channels by predictor logit are selected and only their weight slices are convolved
  (index_select on the BN-folded weights). Same numbers as the mask-multiply forward with the same top-k
  masks, on fewer channels.
- width buckets (``BucketedClassifier``, ``fit_buckets``): one static narrower network per bucket of each
  unit's most frequently kept filters; unit 1's predictor picks the bucket per input, so nothing is gathered
  at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tta_runtime.errors import InvalidInputError
from tta_runtime.models.classifier import images_to_tensor, set_norm_mode
from tta_runtime.prune.predictors import FTWTClassifier, WidthBuckets, unit_macs

__all__ = [
    "BucketedClassifier",
    "GatheredClassifier",
    "fit_buckets",
    "fit_static_ks",
    "predicted_masks",
    "static_ks",
]


# --------------------------------------------------------------------------------------------------
# Static widths fitted on predicted masks


def predicted_masks(model: FTWTClassifier, images: np.ndarray, batch: int = 256) -> list[torch.Tensor]:
    """The predicted masks on ``images`` (N, S, S, 3) uint8, in eval() with source statistics and no gradient:
    one (N, C_u) {0, 1} tensor per unit. The model's train/eval and statistics modes are restored."""
    modes = {m: m.stat_mode for m in model.modules() if hasattr(m, "stat_mode")}
    was_training = model.training
    set_norm_mode(model.backbone, "source")
    model.eval()
    with torch.no_grad():
        outs = [model(images_to_tensor(images[i : i + batch])).masks for i in range(0, len(images), batch)]
    for m, mode in modes.items():
        m.stat_mode = mode
    model.train(was_training)
    return [torch.cat([o[u] for o in outs]) for u in range(len(outs[0]))]


def static_ks(kept: torch.Tensor, widths: Sequence[int], quantile: float = 0.9) -> list[int]:
    """One k per unit: the ``quantile`` of the predicted kept counts ``kept`` (N, U), at least 1; unit 0 full."""
    ks = [int(widths[0])]
    for u in range(1, len(widths)):
        q = float(torch.quantile(kept[:, u].to(torch.float64), quantile))
        ks.append(int(min(widths[u], max(1, math.ceil(q - 1e-9)))))
    return ks


def fit_static_ks(model: FTWTClassifier, images: np.ndarray, quantile: float) -> list[int]:
    """``static_ks`` of the predicted kept counts on ``images`` (``predicted_masks``)."""
    kept = torch.stack([m.sum(1) for m in predicted_masks(model, images)], 1)
    return static_ks(kept, [u.conv.out_channels for u in model.units], quantile)


def fit_buckets(model: FTWTClassifier, images: np.ndarray, quantiles: Sequence[float] = (0.5, 0.9)) -> WidthBuckets:
    """Width buckets from the predicted masks on ``images`` (``predicted_masks``): filters ordered by how
    often they are kept; bucket b's width per unit = the ``quantiles[b]`` of the predicted kept counts
    (``static_ks``), plus the full width as the last bucket."""
    masks = predicted_masks(model, images)  # (N, C_u) each
    kept = torch.stack([m.sum(1) for m in masks], 1)
    widths = [u.conv.out_channels for u in model.units]
    order = [m.mean(0).argsort(descending=True, stable=True) for m in masks]
    return WidthBuckets(order, [static_ks(kept, widths, q) for q in sorted(quantiles)] + [list(widths)])


# --------------------------------------------------------------------------------------------------
# The gather and bucket paths


class GatheredClassifier:
    """The gather execution path at batch 1 with a static k per unit, or dense (``ks=None``).

    Norm layers are folded into the conv weights with the source statistics (eval-mode BatchNorm), so the
    path computes exactly the mask-multiply forward with top-k masks, only on the selected channels. Plain
    tensors, not an ``nn.Module``: a frozen inference path (call it under ``torch.inference_mode()``).
    """

    def __init__(self, model: FTWTClassifier, ks: Sequence[int] | None) -> None:
        units = model.units
        self.pool = [u.pool_before for u in units]
        self.weights, self.biases = [], []
        for u in units:
            bn = u.norm
            scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
            self.weights.append((u.conv.weight.detach() * scale[:, None, None, None]).contiguous())
            self.biases.append((bn.bias.detach() - bn.running_mean * scale).contiguous())
        self.pred_w = [None] + [p.fc.weight.detach().clone() for p in model.predictors]
        self.pred_b = [None] + [p.fc.bias.detach().clone() for p in model.predictors]
        self.head_w = model.backbone.head.weight.detach().clone()
        self.head_b = model.backbone.head.bias.detach().clone()
        self.ks = None if ks is None else [int(k) for k in ks]

    def select(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The channel indices the gather path picks for ``x`` (1, 3, S, S): one (k_u,) int64 per unit."""
        return self._run(x, None)[1]

    def __call__(self, x: torch.Tensor, indices: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(1, 3, S, S) in [0, 1] -> (1, classes) logits. ``indices``: force the kept channels per unit."""
        return self._run(x, indices)[0]

    def _run(self, x: torch.Tensor, indices: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.ndim != 4 or x.shape[0] != 1:
            raise InvalidInputError(f"the gather path runs at batch 1: expected (1, 3, S, S); got {tuple(x.shape)}")
        h = (x - 0.5) / 0.5
        chosen: list[torch.Tensor] = []
        prev: torch.Tensor | None = None  # indices of the channels h holds (None = all)
        for u, w in enumerate(self.weights):
            if self.pool[u]:
                h = F.max_pool2d(h, 2)
            if self.ks is None or u == 0:
                idx = None
            elif indices is not None:
                idx = indices[u]
            else:
                pw = self.pred_w[u] if prev is None else self.pred_w[u].index_select(1, prev)
                z = torch.addmv(self.pred_b[u], pw, h.mean(dim=(0, 2, 3)))  # (C_out,) keep-logits
                idx = z.topk(self.ks[u]).indices
            if prev is not None:
                w = w.index_select(1, prev)
            if idx is not None:
                w, b = w.index_select(0, idx), self.biases[u].index_select(0, idx)
            else:
                b = self.biases[u]
            h = F.relu_(F.conv2d(h, w, b, padding=1))  # (1, k_u, s, s)
            chosen.append(idx if idx is not None else torch.arange(w.shape[0]))
            prev = idx
        feats = h.mean(dim=(2, 3))  # (1, k_last)
        hw = self.head_w if prev is None else self.head_w.index_select(1, prev)
        return F.linear(feats, hw, self.head_b), chosen


class BucketedClassifier:
    """The width-bucket execution path at batch 1 (frozen, plain tensors, BatchNorm folded): one static
    narrower network per bucket of ``buckets`` (each unit's most frequent filters, weights sliced once), and
    per input the bucket unit 1's predictor picks from the (always full) unit-0 output. ``counts``: inputs
    served per bucket since construction."""

    def __init__(self, model: FTWTClassifier, buckets: WidthBuckets) -> None:
        self.units = model.units
        self.pool = [u.pool_before for u in self.units]
        self.order, self.widths = buckets.order, buckets.widths
        self._buckets = buckets
        g = GatheredClassifier(model, None)  # the BatchNorm-folded weights
        self.layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for bw in self.widths:
            layers = []
            for u in range(len(self.units)):
                keep_out = self.order[u][: bw[u]]
                wu = g.weights[u].index_select(0, keep_out)
                if u:
                    wu = wu.index_select(1, self.order[u - 1][: bw[u - 1]])
                layers.append((wu.contiguous(), g.biases[u].index_select(0, keep_out).contiguous()))
            self.layers.append(layers)
        self.head = [(g.head_w.index_select(1, self.order[-1][: bw[-1]]).contiguous(), g.head_b) for bw in self.widths]
        self.pred_w, self.pred_b = g.pred_w[1], g.pred_b[1]  # unit 1's predictor reads unit 0's output
        self.counts = [0] * len(self.widths)

    def choose(self, h0: torch.Tensor) -> int:
        """The bucket for the unit-0 output ``h0`` (1, C_0, s, s)."""
        z1 = torch.addmv(self.pred_b, self.pred_w, h0.mean(dim=(0, 2, 3)))  # type: ignore[arg-type]
        return int(self._buckets.choose(z1[None])[0])

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Unit 0 (full width, shared by every bucket): (1, 3, S, S) in [0, 1] -> (1, C_0, S, S)."""
        w, b = self.layers[-1][0]
        return F.relu(F.conv2d((x - 0.5) / 0.5, w, b, padding=1))

    def run_bucket(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Units 1.. and the head of bucket ``i`` on the stem output ``h`` -> (1, classes) logits."""
        for u in range(1, len(self.units)):
            if self.pool[u]:
                h = F.max_pool2d(h, 2)
            w, b = self.layers[i][u]
            h = F.relu(F.conv2d(h, w, b, padding=1))
        hw, hb = self.head[i]
        return F.linear(h.mean(dim=(2, 3)), hw, hb)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[0] != 1:
            raise InvalidInputError(f"the bucket path runs at batch 1: expected (1, 3, S, S); got {tuple(x.shape)}")
        h0 = self.stem(x)
        i = self.choose(h0)
        self.counts[i] += 1
        return self.run_bucket(i, h0)

    def macs(self, i: int) -> float:
        """Theoretical conv MACs of bucket ``i``."""
        return float(unit_macs(self.units, torch.tensor([self.widths[i]], dtype=torch.float64)).sum())
