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
from tta_runtime.prune.predictors import (
    FTWTClassifier,
    MaskPredictor,
    choose_masks,
    conv_units,
    predictor_macs,
    unit_macs,
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

    def _predict_masks(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _masks_in_force(self, batch: int) -> list[torch.Tensor] | None:
        return None if self._fixed is None else fit_fixed_masks(self._fixed, batch)

    def _record(self, masks: list[torch.Tensor]) -> None:
        self.last_masks = masks
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
        return torch.stack([m.sum(1) for m in self.last_masks], 1)


class PrunedClassifier(FixedMasks, CNNClassifier):
    """The deployable FTWT classifier: a ``CNNClassifier`` (same parameter names, so recipes, EATA's Fisher
    and the OOD features work unchanged) plus ``predictors``, with masks applied by multiplication.

    Masks come from the predictors on each forward (``masks`` "predict" or "topk" with ``ks``), or, inside
    ``with model.fixed_masks(x):``, are predicted once on ``x`` and reused: how adaptation composes with
    pruning (the loop's steps compute with the channels chosen for the input before adaptation).
    ``last_masks``: the masks of the latest forward, one (B, C_u) per unit (unit 0 all ones).
    """

    def __init__(self, cfg: Any, *, masks: str = "predict", ks: Sequence[int] | None = None) -> None:
        super().__init__(cfg)
        units = conv_units(self)
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
        applied = []
        for j, unit in enumerate(conv_units(self)):
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

    def macs_fraction(self) -> torch.Tensor:
        """(B,) conv MACs of the latest forward as a fraction of the dense model's (predictors counted)."""
        units = conv_units(self)
        kept = self.kept().to(torch.float64)
        full = torch.tensor([[u.conv.out_channels for u in units]], dtype=torch.float64)
        spent = unit_macs(units, kept, in_channels=self.cfg.in_channels).sum(1) + predictor_macs(units, kept)
        return spent / unit_macs(units, full, in_channels=self.cfg.in_channels).sum(1)
