"""Fast execution paths of a trained ``FTWTClassifier`` at batch 1 (frozen, plain tensors, BatchNorm folded).

- gather (``GatheredClassifier``): a static kept count k per unit (``static_ks``, ``fit_static_ks``); per input
  the top-k channels by predictor logit are selected and only their weight slices are convolved
  (index_select on the BN-folded weights). Same numbers as the mask-multiply forward with the same top-k
  masks, on fewer channels.
- width buckets (``BucketedClassifier``, ``fit_buckets``): one static narrower network per bucket of each
  unit's most frequently kept filters; unit 1's predictor picks the bucket per input, so nothing is gathered
  at run time.
- the runtime's frozen path (``frozen_call``, ``gathered_forward``): what ``PrunedClassifier`` and
  ``PrunedSegmenter``'s encoder run without autograd. Per input the predictors choose the masks as in the
  mask-multiply forward; each conv then computes only the kept output channels (the union over the batch)
  from the kept input channels, on weights sliced with index_select (BatchNorm folded in, ``fold_norm``,
  cached in a ``FoldCache`` until a weight changes). Images of a batch that do not keep a channel of the
  union get it zeroed, as the mask multiplication would: the same numbers on fewer channels.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.errors import InvalidInputError
from tta_runtime.models.modes import frozen_call
from tta_runtime.models.classifier import AdaptiveBatchNorm2d, images_to_tensor, set_norm_mode
from tta_runtime.prune.predictors import FTWTClassifier, WidthBuckets, choose_masks, unit_macs

__all__ = [
    "BucketedClassifier",
    "FoldCache",
    "GatherUnit",
    "Gathered",
    "GatheredClassifier",
    "fit_buckets",
    "fit_static_ks",
    "fold_norm",
    "foldable",
    "frozen_call",
    "gathered_forward",
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
            w, b = fold_norm(u.conv, u.norm)
            self.weights.append(w)
            self.biases.append(b)
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


# --------------------------------------------------------------------------------------------------
# The runtime's frozen path: kept channels only, on sliced (BatchNorm-folded) weights


def foldable(norm: nn.Module | None) -> bool:
    """Whether ``norm`` (None: no norm layer) normalises with fixed statistics, so it folds into the conv:
    eval-mode BatchNorm, i.e. ``AdaptiveBatchNorm2d`` in stat_mode "source", "ema" once its update is done,
    or "train" under eval(); a plain ``nn.BatchNorm2d`` under eval(). Batch statistics and GroupNorm do not."""
    if norm is None:
        return True
    if not isinstance(norm, nn.BatchNorm2d):
        return False
    if norm._buffers.get("running_mean") is None or norm._buffers.get("running_var") is None:
        return False
    if isinstance(norm, AdaptiveBatchNorm2d):
        mode = norm.stat_mode
        return mode == "source" or (mode == "ema" and not norm._ema_pending) or (mode == "train" and not norm.training)
    return not norm.training


def fold_norm(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv`` followed by ``norm`` (eval-mode BatchNorm, see ``foldable``; None: the conv alone) as one
    conv's (weight (C_out, C_in, k, k), bias (C_out,) or None), detached and contiguous."""
    w = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()
    if norm is None:
        return w, b
    assert isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None and norm.running_mean is not None
    scale = torch.rsqrt(norm.running_var + norm.eps)  # (C,)
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    shift = -norm.running_mean * scale if b is None else (b - norm.running_mean) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    return (w * scale[:, None, None, None]).contiguous(), shift.contiguous()


class FoldCache:
    """Values derived from a module's tensors (the folded weights), recomputed when any of its parameters or
    buffers is replaced (``torch.func.functional_call``, ``load_state_dict(assign=True)``, ``.to()``) or
    changed in place (an optimizer step, a restore with ``copy_``, an EMA update of BatchNorm statistics):
    entries are keyed by the tensors' identity, version counter and storage. (A write through ``.data``
    bypasses the version counter, as it bypasses autograd: call ``clear()`` after one.) Keeps the ``size``
    latest entries: the runtime alternates between the adapted weights and the loaded ones its OOD pass swaps in.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: list[tuple[list[torch.Tensor], list[tuple[int, int]], Any]] = []
        self._where: list[tuple[dict[str, Any], str]] | None = None  # (module._parameters or _buffers, name)

    def get(self, module: nn.Module, make: Callable[[], Any]) -> Any:
        """The value ``make()`` returns for ``module``'s tensors as they are now, made again only when they changed."""
        if self._where is None:  # listed once: walking the module tree on every call costs more than a fold
            held = [d for m in module.modules() for d in (m._parameters, m._buffers)]
            self._where = [(d, n) for d in held for n, t in d.items() if t is not None]
        sources = [d[n] for d, n in self._where]  # where functional_call and load_state_dict put tensors
        try:
            stamps = [(t._version, t.data_ptr()) for t in sources]
        except (RuntimeError, AttributeError):  # an inference tensor has no version counter: fold, keep nothing
            with torch.no_grad():
                return make()
        for i, (held, held_stamps, value) in enumerate(self._entries):
            if held_stamps == stamps and all(map(operator.is_, held, sources)):
                if i:
                    self._entries.insert(0, self._entries.pop(i))
                return value
        with torch.no_grad():
            value = make()
        self._entries.insert(0, (sources, stamps, value))
        del self._entries[self.size :]
        return value

    def clear(self) -> None:
        self._entries.clear()
        self._where = None


Channels = tuple[int, ...] | None
"""A set of kept channels as sorted indices into the full width; None = all of them."""

_MAX_SLICES = 512  # weight slices one unit keeps (one per distinct channel set); emptied when full


@dataclass
class GatherUnit:
    """One conv (norm folded in) -> ReLU of the gather path. ``pool_before``: a 2x2 max-pool first.
    ``predictor``: (weight (C_out, C_in), bias (C_out,)) of the Linear that reads the pooled input and
    predicts the unit's keep-logits; None for an unpruned unit (full output width).

    Slicing weights costs several small ops per unit, about what the conv saves on one image, and the same
    channel sets recur from image to image: ``sliced`` and ``predictor_for`` keep what they cut, by channel set
    (rebuilt with the folded weights, so never stale)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    padding: int
    pool_before: bool = False
    predictor: tuple[torch.Tensor, torch.Tensor] | None = None
    _slices: dict[Any, Any] = field(default_factory=dict, repr=False)

    def sliced(
        self, cols: Channels, rows: Channels
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(weight[rows][:, cols], bias[rows], rows as an index tensor or None for all, the (1, C_out) {0, 1}
        mask of rows)."""
        hit = self._slices.get(("conv", cols, rows))
        if hit is None:
            w, b, idx = self.weight, self.bias, None
            if cols is not None:
                w = w.index_select(1, torch.tensor(cols, device=w.device))
            mask = w.new_ones(1, w.shape[0])
            if rows is not None:
                idx = torch.tensor(rows, device=w.device)
                w, b = w.index_select(0, idx), None if b is None else b.index_select(0, idx)
                mask = torch.zeros_like(mask).index_fill_(1, idx, 1.0)
            hit = self._keep(("conv", cols, rows), (w.contiguous(), b, idx, mask))
        return hit

    def predictor_for(self, cols: Channels) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor's (weight[:, cols], bias): it reads only the channels its input holds."""
        hit = self._slices.get(("predictor", cols))
        if hit is None:
            pw, pb = self.predictor  # type: ignore[misc]
            if cols is not None:
                pw = pw.index_select(1, torch.tensor(cols, device=pw.device))
            hit = self._keep(("predictor", cols), (pw, pb))
        return hit

    def _keep(self, key: Any, value: Any) -> Any:
        if len(self._slices) >= _MAX_SLICES:
            self._slices.clear()
        self._slices[key] = value
        return value


class Gathered(NamedTuple):
    """What ``gathered_forward`` returns. ``h``: the last unit's output (B, k, H', W'); ``channels``: the
    indices of its k channels in the full width (None = all, in order); ``masks``: one (B, C_u) (or (1, C_u)
    for fixed ones given so) {0, 1} mask per unit as the mask-multiply forward applies them (ones for
    unpruned units); ``kept``: their kept counts, (B, U) (or (1, U)) in the masks' dtype."""

    h: torch.Tensor
    channels: torch.Tensor | None
    masks: list[torch.Tensor]
    kept: torch.Tensor


def gathered_forward(
    h: torch.Tensor, units: Sequence[GatherUnit], mode: str, ks: Sequence[int] | None,
    fixed: Sequence[torch.Tensor] | None = None, *, channels_last_from: int = 2,
) -> Gathered:
    """The units on ``h`` (B, C_in, H, W), computing only kept channels (see ``Gathered`` for the result).

    Masks: ``fixed[u]`` when given (each (B, C_u) or (1, C_u)), else chosen from the predictor's logits
    like ``choose_masks`` (``mode`` "predict": logit > 0; "topk": the ``ks[u]`` largest). A conv computes
    the union over the batch of the kept channels; images that do not keep one of them get it zeroed after
    the ReLU, so every image sees exactly its own masked activations (ReLU(norm(conv(h))) x mask).

    ``channels_last_from``: the batch size from which the units run channels-last. On CPU, PyTorch runs
    those convs with oneDNN, faster from batch 2 for the digits CNN's 3x3 convs and from batch 1 for the
    segmenter's 5x5 ones; below it, the default layout's im2col + GEMM is faster."""
    batch = h.shape[0]
    layout = torch.channels_last if batch >= channels_last_from else torch.contiguous_format
    h = h.contiguous(memory_format=layout)
    prev: Channels = None  # the channels h holds
    idx: torch.Tensor | None = None  # the same as an index tensor
    masks: list[torch.Tensor] = []
    counts: list[int] = []  # kept per unit when one set of channels serves the whole (single-image) batch
    for u, unit in enumerate(units):
        if unit.pool_before:  # the channels-last pool is several times faster, even with the two copies
            h = F.max_pool2d(h.contiguous(memory_format=torch.channels_last), 2).contiguous(memory_format=layout)
        m = None if fixed is None else fixed[u].to(h.dtype)
        if unit.predictor is None:  # full output width
            w, b, idx, ones = unit.sliced(prev, None)
            h, prev = F.relu_(F.conv2d(h, w, b, padding=unit.padding)), None
            masks.append(m if m is not None else ones if batch == 1 else ones.expand(batch, -1).clone())
            counts.append(w.shape[0])
            continue
        rows: Channels = None
        if m is None:
            pw, pb = unit.predictor_for(prev)
            m, rows = _choose(h, pw, pb, mode, None if ks is None else int(ks[u]))
        if m is not None:  # (B, C) masks: compute the union over the batch
            union = (m[0] if m.shape[0] == 1 else m.amax(dim=0)).tolist()
            rows = tuple(c for c, v in enumerate(union) if v)
        computed = rows or (0,)  # nothing kept: one channel computed, then zeroed (a conv needs a channel)
        w, b, idx, one = unit.sliced(prev, computed)
        h = F.relu_(F.conv2d(h, w, b, padding=unit.padding))
        if m is None and not rows:
            m = torch.zeros_like(one)
        if m is not None and (m.shape[0] > 1 or not rows):  # images that drop a computed channel get it zeroed
            sub = m.index_select(1, idx) if idx is not None else m  # (B, k)
            if not bool(sub.all()):
                h.mul_(sub[:, :, None, None])
        masks.append(one if m is None else m)
        counts.append(len(rows))
        prev = computed
    if batch == 1 and fixed is None:  # counted on the way: no small reductions to run
        kept = torch.tensor([counts], dtype=masks[0].dtype, device=h.device)
    else:
        kept = torch.stack([m.sum(1) for m in masks], 1)
    return Gathered(h, idx, masks, kept)


def _choose(
    h: torch.Tensor, pw: torch.Tensor, pb: torch.Tensor, mode: str, k: int | None
) -> tuple[torch.Tensor | None, Channels]:
    """A pruned unit's decisions from its predictor (``pw``, ``pb``) on the unit's input ``h`` (B, k_in, H, W):
    for a batch, the (B, C) masks (``choose_masks``) and None; for one image, None and the kept channels (the
    same decisions: logit > 0, or the ``k`` largest)."""
    alpha = 1.0 / (h.shape[2] * h.shape[3])  # the mean's 1 / (H W), applied inside the product
    if h.shape[0] > 1:
        z = torch.addmm(pb, h.sum(dim=(2, 3)), pw.t(), alpha=alpha)  # (B, C) keep-logits
        return choose_masks(z, mode, k, z), None
    z = torch.addmv(pb, pw, h.sum(dim=(0, 2, 3)), alpha=alpha)  # (C,): one image, fewer small ops
    if mode == "topk":
        return None, tuple(sorted(z.topk(int(k)).indices.tolist()))  # type: ignore[arg-type]
    return None, tuple(c for c, keep in enumerate((z > 0).tolist()) if keep)
