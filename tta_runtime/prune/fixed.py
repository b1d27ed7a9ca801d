"""Masks held fixed while a model adapts, and the deployable FTWT classifier (``PrunedClassifier``).

``FixedMasks`` is the mask bookkeeping shared by the pruned models (this classifier and
``tta_runtime.prune.segmenter.PrunedSegmenter``): the masks of the latest forward, and a ``fixed_masks()``
block in which the first forward decides the channels and every later one reuses them, so the decisions do
not drift while the adaptation loop changes the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.models.classifier import CNNClassifier
from tta_runtime.prune.fast import FoldCache, GatherUnit, fold_norm, foldable, frozen_call, gathered_forward
from tta_runtime.prune.predictors import (
    ChainMacs,
    ConvUnit,
    FTWTClassifier,
    MaskPredictor,
    choose_masks,
    conv_units,
)

__all__ = ["FixedMasks", "PrunedClassifier", "fit_fixed_masks"]


def fit_fixed_masks(fixed: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Masks fixed on one batch, for a step whose input has ``batch`` images: as they are when the sizes
    agree (or broadcast from one image); otherwise (an augmented or rotated batch of a method such as MEMO or
    rotation) the union over the fixed images, so no channel any of them needs is dropped."""
    out = []
    for m in fixed:
        if m.shape[0] == batch or m.shape[0] == 1:
            out.append(m)
        else:
            out.append(m.amax(dim=0, keepdim=True))
    return out


class FixedMasks:
    """Mask bookkeeping shared by the pruned models: ``last_masks`` of the latest forward and the
    ``fixed_masks`` block. A subclass calls ``_masks_in_force(batch)`` before choosing masks (None = predict
    them) and ``_record(masks)`` after its forward, and implements ``_predict_masks(x)`` (one forward)."""

    _fixed: list[torch.Tensor] | None = None
    _pending: list[torch.Tensor] | None = None  # fixed_masks() without x: set by the next forward
    last_masks: list[torch.Tensor]
    last_path: str = ""  # which path the latest forward ran: "gather" or "mask-multiply"
    _kept: tuple[list[torch.Tensor], torch.Tensor] | None = None  # (last_masks, their kept counts)

    def _predict_masks(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _masks_in_force(self, batch: int) -> list[torch.Tensor] | None:
        return None if self._fixed is None else fit_fixed_masks(self._fixed, batch)

    def _record(self, masks: list[torch.Tensor], kept: torch.Tensor | None = None) -> None:
        self.last_masks = masks
        self._kept = None if kept is None else (masks, kept)
        if self._pending is not None:  # the first forward of a fixed_masks() block decides
            self._pending.extend(m.clone() for m in masks)
            self._fixed, self._pending = self._pending, None

    @contextlib.contextmanager
    def fixed_masks(self, x: torch.Tensor | None = None) -> Iterator[list[torch.Tensor]]:
        """Masks decided once and applied to every forward inside the block.

        With ``x``: predicted on ``x`` now (no gradient, the norm layers as they are). Without: predicted by
        the first forward inside the block and frozen from then on; the runtime uses this, so the masks come
        from the adaptation loop's first forward (the recipe's normalisation, e.g. test-batch statistics,
        before any update) and every later step reuses them. The yielded list fills in at that point. A
        forward on a batch of another size gets the union of the fixed masks (``fit_fixed_masks``).
        """
        if self._fixed is not None or self._pending is not None:
            raise ConfigError("fixed_masks blocks do not nest")
        holder: list[torch.Tensor] = []
        if x is not None:
            with torch.no_grad():
                self._predict_masks(x)
            holder.extend(m.clone() for m in self.last_masks)
            self._fixed = holder
        else:
            self._pending = holder
        try:
            yield holder
        finally:
            self._fixed = None
            self._pending = None

    def kept(self) -> torch.Tensor:
        """(B, U) kept channels per unit of the latest forward."""
        if not self.last_masks:
            raise ConfigError("no forward has run yet: kept() describes the latest one")
        held = self._kept
        if held is None or held[0] is not self.last_masks:  # asked twice per request (kept, macs_fraction)
            held = self._kept = (self.last_masks, torch.stack([m.sum(1) for m in self.last_masks], 1))
        return held[1].clone()


class PrunedClassifier(FixedMasks, CNNClassifier):
    """The deployable FTWT classifier: a ``CNNClassifier`` (same parameter names, so recipes, EATA's Fisher
    and the OOD features work unchanged) plus ``predictors``, with masks applied by multiplication.

    Masks come from the predictors on each forward (``masks`` "predict" or "topk" with ``ks``), or, inside
    ``with model.fixed_masks(x):``, are predicted once on ``x`` and reused: how adaptation composes with
    pruning (the loop's steps compute with the channels chosen for the input before adaptation).
    ``last_masks``: the masks of the latest forward, one (B, C_u) per unit (unit 0 all ones).

    Two paths, the same numbers: without autograd (``frozen_call``) and with norm layers that fold (eval-mode
    BatchNorm: ``foldable``), the gather path computes only the kept channels on BatchNorm-folded weights
    (``tta_runtime.prune.fast.gathered_forward``); with gradients (adaptation), batch statistics or GroupNorm,
    the mask-multiply path computes every channel and multiplies the masks on. ``last_path`` says which ran.
    """

    def __init__(self, cfg: Any, *, masks: str = "predict", ks: Sequence[int] | None = None) -> None:
        super().__init__(cfg)
        self._units = units = conv_units(self)  # the modules never change; listing them costs a forward's 5%
        pair = [u.conv.kernel_size[0] * u.conv.kernel_size[1] * u.size**2 for u in units]  # k x k x output pixels
        widths = [u.conv.out_channels for u in units]
        self._macs = ChainMacs(widths, pair, [j > 0 for j in range(len(units))], cfg.in_channels)
        if masks not in ("predict", "topk"):
            raise ConfigError(f"masks must be 'predict' or 'topk'; got {masks!r}")
        if masks == "topk":
            widths = [u.conv.out_channels for u in units]
            if ks is None or len(ks) != len(units) or any(not 1 <= int(k) <= w for k, w in zip(ks, widths)):
                raise ConfigError(f"masks='topk' needs ks: one kept count per unit within {widths}; got {ks!r}")
        self.predictors = nn.ModuleList(MaskPredictor(u.conv.in_channels, u.conv.out_channels) for u in units[1:])
        self.mask_mode = masks
        self.ks = None if ks is None else [int(k) for k in ks]
        self.last_masks = []
        self._folds = FoldCache()

    @classmethod
    def from_ftwt(cls, model: FTWTClassifier, *, masks: str = "predict", ks: Sequence[int] | None = None) -> PrunedClassifier:
        """The trained ``FTWTClassifier``'s backbone and predictors as one deployable module (copies)."""
        out = cls(model.backbone.cfg, masks=masks, ks=ks)
        state = {**model.backbone.state_dict(), **{f"predictors.{k}": v for k, v in model.predictors.state_dict().items()}}
        out.load_state_dict(state, strict=True)
        return out.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise InvalidInputError(
                f"expected a (B, {self.cfg.in_channels}, S, S) float tensor in [0, 1]; got shape {tuple(x.shape)}"
            )
        h = ((x - 0.5) / 0.5).contiguous(memory_format=torch.contiguous_format)
        fixed = self._masks_in_force(x.shape[0])
        units = self._units
        if frozen_call(x) and all(foldable(u.norm) for u in units):
            run = gathered_forward(h, self._gather_units(units), self.mask_mode, self.ks, fixed)
            self.last_path = "gather"
            self._record(run.masks, run.kept)
            feats = run.h.mean(dim=(2, 3))  # (B, k) of the last unit's kept channels
            if run.channels is None:
                return feats
            return feats.new_zeros(x.shape[0], self.feature_dim).index_copy_(1, run.channels, feats)
        self.last_path = "mask-multiply"
        applied = []
        for j, unit in enumerate(units):
            if unit.pool_before:
                h = F.max_pool2d(h, 2)
            z = None
            if j and fixed is None:
                with torch.no_grad():
                    z = self.predictors[j - 1](h.detach())
            y = F.relu(unit.norm(unit.conv(h)))
            if fixed is not None:
                m = fixed[j].to(y.dtype)
            else:
                m = choose_masks(z, self.mask_mode if j else "dense", self.ks[j] if self.ks else None, y)
            h = y * m[:, :, None, None]
            applied.append(m.detach())
        self._record(applied)
        return h.mean(dim=(2, 3))

    def _predict_masks(self, x: torch.Tensor) -> None:
        self.features(x)

    def _gather_units(self, units: list[ConvUnit]) -> list[GatherUnit]:
        """The units with their norms folded, cached until a weight or statistic changes (``FoldCache``)."""

        def fold() -> list[GatherUnit]:
            out = []
            for j, u in enumerate(units):
                pred = self.predictors[j - 1].fc if j else None
                w, b = fold_norm(u.conv, u.norm)
                predictor = None if pred is None else (pred.weight.detach(), pred.bias.detach())
                out.append(GatherUnit(w, b, u.conv.padding[0], u.pool_before, predictor))  # type: ignore[index]
            return out

        return self._folds.get(self, fold)

    def macs_fraction(self) -> torch.Tensor:
        """(B,) conv MACs of the latest forward as a fraction of the dense model's (predictors counted)."""
        return self._macs(self.kept())
