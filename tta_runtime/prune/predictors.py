"""FTWT mask predictors for the digits CNN classifier: Fire Together Wire Together (Elkerdawy et al., CVPR 2022).

FTWT gives each conv -> norm -> ReLU unit a small mask predictor that reads the tensor ENTERING the conv (so
the decision exists before the conv runs): global average pool, one Linear Cin -> Cout with bias, sigmoid;
filter j is kept where sigmoid > 0.5. The predictor is a binary classifier trained with BCE against a
self-supervised target recomputed every batch from the current backbone (``ftwt_targets``): score each filter
by the spatial max of its post-norm/ReLU activation, normalise the scores to sum to 1 per input, sort them
descending and keep filters until the cumulative mass first exceeds ``r`` (the filter that crosses ``r`` is
kept). So the kept count k varies per input and layer.

The first conv (it reads the image) is never pruned; every later conv is ("units" 1..5 of the 3-stage digits
model). ``FTWTClassifier.forward`` is the mask-multiply path: the full convolutions, then activations x mask
(the reference for accuracy, no speed-up, what FTWT's public code does). The masks of one unit come from
``choose_masks`` (threshold, top-k, dense) or ``WidthBuckets`` (a few static widths, one picked per input).
Cost is theoretical (``unit_macs``, ``predictor_macs``): a conv's multiply-accumulates scale with kept input x
kept output channels. Training lives in ``tta_runtime.training.ftwt``; the deployable model in
``tta_runtime.prune.fixed``, the gather and bucket paths in ``tta_runtime.prune.fast``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.models.classifier import CNNClassifier

__all__ = [
    "ChainMacs",
    "ConvUnit",
    "FTWTClassifier",
    "FTWTOutput",
    "MaskPredictor",
    "WidthBuckets",
    "choose_masks",
    "conv_units",
    "ftwt_targets",
    "predictor_macs",
    "unit_macs",
]


# --------------------------------------------------------------------------------------------------
# The backbone seen as a chain of conv -> norm -> ReLU units


@dataclass(frozen=True)
class ConvUnit:
    """One conv -> norm -> ReLU of the backbone. ``pool_before``: a 2x2 max-pool precedes the conv.
    ``size``: the side of the conv's (square) output map at the model's resolution."""

    conv: nn.Conv2d
    norm: nn.Module
    pool_before: bool
    size: int


def conv_units(model: CNNClassifier) -> list[ConvUnit]:
    """The model's units in execution order (2 per stage)."""
    units = []
    for i, stage in enumerate(model.stages):
        size = model.cfg.resolution // 2**i
        units.append(ConvUnit(stage.conv1, stage.norm1, i > 0, size))
        units.append(ConvUnit(stage.conv2, stage.norm2, False, size))
    return units


# --------------------------------------------------------------------------------------------------
# Self-supervised targets and predictors


def ftwt_targets(act: torch.Tensor, r: float) -> torch.Tensor:
    """FTWT's target masks. ``act``: (B, C, H, W) post-norm/ReLU activation; ``r`` in (0, 1].

    Returns (B, C) float32 in {0, 1}: filter j of input b is 1 when, with the per-input scores
    s = max_hw |act| / sum_c max_hw |act| sorted descending, the mass of the filters ranked before j is < r
    (so filters are kept until the cumulative mass first reaches r, the crossing filter included). An
    all-zero activation keeps every filter. Computed without gradient.
    """
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"r must be in (0, 1] (the kept share of activation-peak mass); got {r!r}")
    if act.ndim != 4:
        raise InvalidInputError(f"act must be (B, C, H, W); got shape {tuple(act.shape)}")
    with torch.no_grad():
        peak = act.detach().abs().amax(dim=(2, 3))  # (B, C)
        score = peak / peak.sum(dim=1, keepdim=True).clamp_min(1e-12)
        srt, order = score.sort(dim=1, descending=True)
        before = srt.cumsum(dim=1) - srt  # (B, C) mass ranked strictly before each filter
        keep_sorted = (before < r - 1e-6).float()  # the 1e-6 makes r = 1 drop exactly the dead filters
        return torch.zeros_like(score).scatter_(1, order, keep_sorted)


class MaskPredictor(nn.Module):
    """Global average pool then Linear(c_in, c_out): (B, c_in, H, W) -> (B, c_out) keep-logits.

    The bias starts at +3 (sigmoid 0.95: keep everything) so early fine-tuning is not hit by random masks.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)
        nn.init.constant_(self.fc.bias, 3.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(dim=(2, 3)))


@dataclass
class FTWTOutput:
    """``logits``: (B, classes). Per unit u (index 0 = the unpruned first conv, whose entries are ones /
    None): ``masks[u]`` (B, C_u) float in {0, 1} as applied; ``mask_logits[u]`` (B, C_u) predictor logits
    or None; ``targets[u]`` (B, C_u) FTWT targets (only when asked for, else None)."""

    logits: torch.Tensor
    masks: list[torch.Tensor]
    mask_logits: list[torch.Tensor | None]
    targets: list[torch.Tensor | None] = field(default_factory=list)


class FTWTClassifier(nn.Module):
    """A ``CNNClassifier`` backbone plus one ``MaskPredictor`` per unit after the first."""

    def __init__(self, backbone: CNNClassifier) -> None:
        super().__init__()
        self.backbone = backbone
        units = conv_units(backbone)
        self.predictors = nn.ModuleList(
            MaskPredictor(u.conv.in_channels, u.conv.out_channels) for u in units[1:]
        )

    @property
    def units(self) -> list[ConvUnit]:
        return conv_units(self.backbone)

    def forward(
        self,
        x: torch.Tensor,
        *,
        masks: Sequence[torch.Tensor | None] | str = "predict",
        r: float | None = None,
        ks: Sequence[int] | None = None,
        buckets: WidthBuckets | None = None,
    ) -> FTWTOutput:
        """Mask-multiply forward. ``x``: (B, 3, S, S) in [0, 1].

        ``masks``: "predict" (sigmoid > 0.5 of each predictor, no gradient), "topk" (the ``ks[u]`` highest
        predictor logits of each unit: the static-k decisions, made in sequence as the gather path makes
        them), "buckets" (width buckets: ``buckets`` picks one per input from unit 1's predictor and keeps
        that bucket's most frequent filters), "dense" (all ones), or a list with one (B, C_u) mask (or
        None = ones) per unit.
        ``r``: also compute FTWT targets at that r.
        Predictor inputs are detached: predictor losses never reach the backbone.
        """
        units = self.units
        if not isinstance(masks, str) and len(masks) != len(units):
            raise InvalidInputError(f"masks needs one entry per unit ({len(units)}); got {len(masks)}")
        if isinstance(masks, str) and masks not in ("predict", "topk", "buckets", "dense"):
            raise ConfigError(f"masks must be 'predict', 'topk', 'buckets', 'dense' or a list of tensors; got {masks!r}")
        if masks == "buckets" and buckets is None:
            raise ConfigError("masks='buckets' needs buckets (a WidthBuckets, see fit_buckets)")
        if masks == "topk" and (ks is None or len(ks) != len(units)):
            raise ConfigError(f"masks='topk' needs ks, one kept count per unit ({len(units)}); got {ks!r}")
        h = ((x - 0.5) / 0.5).contiguous()
        applied: list[torch.Tensor] = []
        logits_u: list[torch.Tensor | None] = []
        targets: list[torch.Tensor | None] = []
        chosen: torch.Tensor | None = None  # masks="buckets": one bucket per input, picked at unit 1
        for j, unit in enumerate(units):
            if unit.pool_before:
                h = F.max_pool2d(h, 2)
            z = self.predictors[j - 1](h.detach()) if j else None  # (B, C_out)
            y = F.relu(unit.norm(unit.conv(h)))  # (B, C_out, H, W)
            targets.append(ftwt_targets(y, r) if (r is not None and j) else None)
            if masks == "buckets" and j:
                assert buckets is not None and z is not None
                chosen = buckets.choose(z) if chosen is None else chosen
                m = buckets.masks(j, chosen).to(y.dtype)
            elif isinstance(masks, str):
                m = choose_masks(z, masks, None if ks is None else int(ks[j]), y)
            else:
                given = masks[j]
                m = torch.ones(y.shape[:2], dtype=y.dtype, device=y.device) if given is None else given.to(y.dtype)
            h = y * m[:, :, None, None]
            applied.append(m)
            logits_u.append(z)
        feats = h.mean(dim=(2, 3))  # (B, D)
        return FTWTOutput(self.backbone.head(feats), applied, logits_u, targets)


def choose_masks(z: torch.Tensor | None, mode: str, k: int | None, y: torch.Tensor) -> torch.Tensor:
    """The (B, C) {0, 1} mask of one unit from its predictor logits ``z`` (None: unpruned unit, all ones).
    ``mode`` "predict": sigmoid(z) > 0.5; "topk": the ``k`` largest logits; "dense": all ones. No gradient."""
    if z is None or mode == "dense":
        return torch.ones(y.shape[:2], dtype=y.dtype, device=y.device)
    if mode == "predict":
        return (z.detach() > 0).to(y.dtype)
    top = z.detach().topk(int(k), dim=1).indices  # type: ignore[arg-type]
    return torch.zeros_like(z, dtype=y.dtype).scatter_(1, top, 1.0)


@dataclass
class WidthBuckets:
    """Width buckets: each unit's filters in ``order[u]`` (most often kept by the predictors first) and one
    width per unit for each bucket (``widths[b][u]``, ascending in b; the last is the full model). A bucket
    keeps the first ``widths[b][u]`` filters of every unit: a static narrower network. Per input, the kept
    count unit 1's predictor asks for (sigmoid > 0.5) picks the smallest bucket holding it."""

    order: list[torch.Tensor]
    widths: list[list[int]]

    def choose(self, z1: torch.Tensor) -> torch.Tensor:
        """(B,) bucket index from unit 1's predictor logits ``z1`` (B, C_1)."""
        k1 = (z1.detach() > 0).sum(dim=1)  # (B,)
        caps = torch.tensor([w[1] for w in self.widths], device=z1.device)  # (n_buckets,) ascending
        return torch.searchsorted(caps, k1).clamp_max(len(self.widths) - 1)

    def masks(self, u: int, chosen: torch.Tensor) -> torch.Tensor:
        """(B, C_u) {0, 1} masks of unit ``u`` for the buckets ``chosen`` (B,)."""
        width = torch.tensor([w[u] for w in self.widths], device=chosen.device)[chosen]  # (B,)
        rank = torch.empty_like(self.order[u]).scatter_(0, self.order[u], torch.arange(len(self.order[u])))
        return (rank.to(chosen.device)[None, :] < width[:, None]).float()

    def to_dict(self) -> dict[str, Any]:
        return {"order": [o.tolist() for o in self.order], "widths": self.widths}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WidthBuckets:
        return cls([torch.tensor(o, dtype=torch.long) for o in d["order"]], [list(map(int, w)) for w in d["widths"]])

# --------------------------------------------------------------------------------------------------
# Cost accounting


def unit_macs(units: Sequence[ConvUnit], kept: torch.Tensor, *, in_channels: int = 3) -> torch.Tensor:
    """Theoretical multiply-accumulates of each conv per input.

    ``kept``: (B, U) kept output channels per unit (unit 0 usually at full width). Returns (B, U) float64:
    unit u costs kept_in x kept_out x kh x kw x size^2, kept_in = kept[:, u-1] (``in_channels`` for u = 0).
    """
    kept = kept.to(torch.float64)
    if kept.ndim != 2 or kept.shape[1] != len(units):
        raise InvalidInputError(f"kept must be (B, {len(units)}); got shape {tuple(kept.shape)}")
    cols = []
    for u, unit in enumerate(units):
        k_in = kept[:, u - 1] if u else torch.full_like(kept[:, 0], float(in_channels))
        kh, kw = unit.conv.kernel_size
        cols.append(k_in * kept[:, u] * kh * kw * unit.size**2)
    return torch.stack(cols, dim=1)


def predictor_macs(units: Sequence[ConvUnit], kept: torch.Tensor) -> torch.Tensor:
    """(B,) MACs of the predictors' Linear layers on the kept input channels (the pooling is ignored)."""
    kept = kept.to(torch.float64)
    total = torch.zeros_like(kept[:, 0])
    for u in range(1, len(units)):
        total = total + kept[:, u - 1] * units[u].conv.out_channels
    return total


class ChainMacs:
    """MACs of a chain of convs, as a fraction of the dense chain's: conv u costs kept_in x kept_out x
    ``per_channel_pair[u]`` (k x k x output pixels), kept_in = kept[:, u-1] (``in_channels`` for u = 0); a conv
    with ``predicted[u]`` adds its predictor's Linear, kept_in x widths[u]. The same sums as ``unit_macs`` +
    ``predictor_macs`` (and the segmenter's ``encoder_macs``), in numpy with the constants prepared once: a
    per-request figure should not cost more than the pruned convs save."""

    def __init__(
        self, widths: Sequence[int], per_channel_pair: Sequence[float], predicted: Sequence[bool], in_channels: int = 3
    ) -> None:
        full = np.asarray(widths, dtype=np.float64)
        self.pair = np.asarray(per_channel_pair, dtype=np.float64)
        self.pred = np.where(np.asarray(predicted, dtype=bool), full, 0.0)
        self.in_channels = float(in_channels)
        self.dense = float((np.concatenate([[self.in_channels], full[:-1]]) * full * self.pair).sum())

    def __call__(self, kept: torch.Tensor) -> torch.Tensor:
        """(B,) float64 fraction for ``kept`` (B, U) kept output channels per conv."""
        k = kept.detach().to("cpu", torch.float64).numpy()
        k_in = np.empty_like(k)
        k_in[:, 0], k_in[:, 1:] = self.in_channels, k[:, :-1]
        return torch.from_numpy((k_in * (k * self.pair + self.pred)).sum(axis=1) / self.dense)
