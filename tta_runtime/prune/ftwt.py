"""Dynamic channel pruning of the digits CNN classifier: Fire Together Wire Together (FTWT).

FTWT (Elkerdawy et al., CVPR 2022) gives each conv -> norm -> ReLU unit a small mask predictor that reads
the tensor ENTERING the conv (so the decision exists before the conv runs): global average pool, one
Linear Cin -> Cout with bias, sigmoid; filter j is kept where sigmoid > 0.5. The predictor is a binary
classifier trained with BCE against a self-supervised target recomputed every batch from the current
backbone (``ftwt_targets``): score each filter by the spatial max of its post-norm/ReLU activation,
normalise the scores to sum to 1 per input, sort them descending and keep filters until the cumulative mass
first exceeds ``r`` (the filter that crosses ``r`` is kept). So the kept count k varies per input and layer.

Training is decoupled (FTWT's default, ``train_ftwt``): the predictor input is detached (the BCE never
reaches the backbone) and the applied mask is computed without gradient (the task loss never trains the
predictor). Loss = CE + w x BCE with w = 1 for the first half of the epochs, then 0; the backbone
fine-tunes from the shipped weights with the masks multiplied onto its activations.

The first conv (it reads the image) is never pruned; every later conv is ("units" 1..5 of the 3-stage
digits model). Three ways to run a trained ``FTWTClassifier``:

- mask-multiply (``FTWTClassifier.forward``): the full convolutions, then activations x mask. The reference
  for accuracy; no speed-up, exactly what FTWT's public code does.
- gather (``GatheredClassifier``): a static kept count k per unit; at batch 1 the top-k channels by
  predictor probability are selected and only their weight slices are convolved (index_select on the
  BN-folded weights). Real CPU speed-up, same numbers as mask-multiply with the same top-k masks.
- theoretical cost (``unit_macs``): a conv's multiply-accumulates scale with kept input x kept output
  channels; predictor and head costs are counted too.

Not here (yet): width buckets, an ONNX export of the gather path, the segmenter encoder, Runtime/CLI hooks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.models.classifier import CNNClassifier, images_to_tensor, set_norm_mode
from tta_runtime.errors import ConfigError, InvalidInputError

__all__ = [
    "BucketedClassifier",
    "ConvUnit",
    "FTWTClassifier",
    "FTWTOutput",
    "FTWTTrainLog",
    "FixedMasks",
    "GatheredClassifier",
    "MaskPredictor",
    "PrunedClassifier",
    "WidthBuckets",
    "fit_buckets",
    "build_pruned",
    "choose_masks",
    "fit_static_ks",
    "load_prune_card",
    "pruned_variants",
    "save_pruned",
    "conv_units",
    "ftwt_targets",
    "interleaved_latency",
    "predictor_macs",
    "static_ks",
    "train_ftwt",
    "unit_macs",
]

log = logging.getLogger(__name__)

PRUNE_DIR = "prune"  # <model folder>/prune/<variant>/
PRUNE_CARD = "prune.json"


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


# --------------------------------------------------------------------------------------------------
# Variants in the model folder (<model>/prune/<name>/)


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


def fit_buckets(model: FTWTClassifier, images: np.ndarray, quantiles: Sequence[float] = (0.5, 0.9)) -> WidthBuckets:
    """Width buckets from the predicted masks on ``images`` (eval, source statistics): filters ordered by how
    often they are kept; bucket b's width per unit = the ``quantiles[b]`` of the predicted kept counts
    (``static_ks``), plus the full width as the last bucket. Modes restored."""
    modes = {m: m.stat_mode for m in model.modules() if hasattr(m, "stat_mode")}
    was_training = model.training
    set_norm_mode(model.backbone, "source")
    model.eval()
    with torch.no_grad():
        outs = [model(images_to_tensor(images[i : i + 256])).masks for i in range(0, len(images), 256)]
    for m, mode in modes.items():
        m.stat_mode = mode
    model.train(was_training)
    masks = [torch.cat([o[u] for o in outs]) for u in range(len(outs[0]))]  # (N, C_u) each
    kept = torch.stack([m.sum(1) for m in masks], 1)
    widths = [u.conv.out_channels for u in model.units]
    order = [m.mean(0).argsort(descending=True, stable=True) for m in masks]
    return WidthBuckets(order, [static_ks(kept, widths, q) for q in sorted(quantiles)] + [list(widths)])


def save_pruned(
    model: nn.Module, base_folder: Path, name: str, *, part: str, r: float, masks: str = "predict",
    ks: Sequence[int] | None = None, training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict (base keys + ``predictors.*``) and its ``PruneCard`` to
    ``base_folder/prune/name/``; returns that folder. The base model's card and weights stay untouched."""
    from safetensors.torch import save_file

    from tta_runtime.config import PruneCard, WeightsSpec
    from tta_runtime.hub import load_card, sha256_file

    base = load_card(base_folder)
    out = base_folder / PRUNE_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    wpath = out / "weights.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(wpath))
    card = PruneCard(
        name=name, base_model=base.name, base_sha256=base.weights.sha256, part=part, r=r, masks=masks,  # type: ignore[arg-type]
        ks=None if ks is None else [int(k) for k in ks], weights=WeightsSpec(file=wpath.name, sha256=sha256_file(wpath)),
        training=training or {}, metrics=metrics or {},
    )
    (out / PRUNE_CARD).write_text(card.model_dump_json(indent=2) + "\n")
    return out


def pruned_variants(folder: Path) -> list[str]:
    """Names of the pruned variants in a model folder (sorted)."""
    root = folder / PRUNE_DIR
    return sorted(p.name for p in root.iterdir() if (p / PRUNE_CARD).is_file()) if root.is_dir() else []


def load_prune_card(folder: Path, name: str) -> Any:
    """The ``PruneCard`` of variant ``name`` in model folder ``folder``; a clear error lists what exists."""
    from tta_runtime.config import PruneCard, validate
    from tta_runtime.errors import ModelLoadError

    path = folder / PRUNE_DIR / name / PRUNE_CARD
    if not path.is_file():
        have = pruned_variants(folder)
        hint = (f"this model has: {', '.join(have)}" if have else
                "this model has none; make one with `tta-runtime prune train --model <name> --r 0.6`")
        raise ModelLoadError(f"no pruned variant {name!r} in {folder / PRUNE_DIR} ({hint})")
    try:
        return validate(PruneCard, json.loads(path.read_text()), f"prune card {path}")
    except (ConfigError, json.JSONDecodeError) as e:
        raise ModelLoadError(str(e)) from None


def build_pruned(card: Any, prune: Any) -> nn.Module:
    """The pruned module for a base ``ModelCard`` and a ``PruneCard`` (weights not loaded)."""
    if prune.part == "classifier":
        if card.classifier is None:
            raise ConfigError(f"prune variant {prune.name!r} is for a CNN classifier; {card.name!r} is a {card.architecture}")
        return PrunedClassifier(card.classifier, masks=prune.masks, ks=prune.ks)
    from tta_runtime.prune.segmenter import PrunedSegmenter

    if card.segmenter is None:
        raise ConfigError(f"prune variant {prune.name!r} is for a slot segmenter; {card.name!r} is a {card.architecture}")
    return PrunedSegmenter(card.segmenter, masks=prune.masks, ks=prune.ks)


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


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class FTWTTrainLog:
    epochs: list[dict[str, float]]
    seconds: float
    static_k: list[int] | None = None  # the k per unit of the static-k fine-tuning phase, if any
    buckets: WidthBuckets | None = None  # the width buckets of the bucket fine-tuning phase, if any


def train_ftwt(
    backbone: CNNClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    r: float,
    epochs: int = 6,
    batch: int = 64,
    lr_backbone: float = 1e-2,
    lr_predictor: float = 0.1,
    predictor_optimizer: str = "sgd",
    predictor_epochs: int | None = None,
    seed: int = 0,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    static_quantile: float | None = None,
    bucket_quantiles: Sequence[float] | None = None,
) -> tuple[FTWTClassifier, FTWTTrainLog]:
    """Decoupled FTWT training of predictors (and fine-tuning of ``backbone``, modified in place).

    ``images``: (N, S, S, 3) uint8, ``labels``: (N,) int64. Loss = CE(masked logits) + w x BCE(predictors,
    targets at r), w = 1 for the first ``predictor_epochs`` (default half of ``epochs``), then 0. Backbone:
    SGD momentum 0.9 at ``lr_backbone`` (rotation head excluded), BatchNorm in training mode; predictors:
    ``predictor_optimizer`` "sgd" (momentum 0.9, FTWT's) or "adam", at ``lr_predictor``.
    With ``static_quantile``, when the predictor loss switches off a static k per unit is fixed (that
    quantile of the predicted kept counts on ``images``, source statistics, ``static_ks``) and the backbone
    fine-tunes for the remaining epochs with the top-k masks the gather path will use (``masks="topk"``).
    With ``bucket_quantiles`` instead, width buckets are fitted at that point (``fit_buckets``) and the
    backbone fine-tunes with the bucket masks (``masks="buckets"``) the width-bucket path will run.
    Returns the model in eval() with BatchNorm on source statistics.
    """
    if static_quantile is not None and bucket_quantiles is not None:
        raise ConfigError("choose static_quantile or bucket_quantiles for the second phase, not both")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1; got {epochs!r}")
    pe = max(1, epochs // 2) if predictor_epochs is None else int(predictor_epochs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FTWTClassifier(backbone)
    rng = np.random.default_rng([seed, 8])
    bb_params = [p for n, p in backbone.named_parameters() if not n.startswith("rot_head")]
    opt_b = torch.optim.SGD(bb_params, lr=lr_backbone, momentum=0.9)
    if predictor_optimizer == "adam":
        opt_p: torch.optim.Optimizer = torch.optim.Adam(model.predictors.parameters(), lr=lr_predictor)
    elif predictor_optimizer == "sgd":
        opt_p = torch.optim.SGD(model.predictors.parameters(), lr=lr_predictor, momentum=0.9)
    else:
        raise ConfigError(f"predictor_optimizer must be 'sgd' or 'adam'; got {predictor_optimizer!r}")
    t0 = time.perf_counter()
    history = []
    ks: list[int] | None = None
    buckets: WidthBuckets | None = None
    for epoch in range(epochs):
        model.train()
        set_norm_mode(backbone, "train")  # ordinary BatchNorm while fine-tuning
        w = 1.0 if epoch < pe else 0.0
        if static_quantile is not None and epoch == pe:
            ks = fit_static_ks(model, images, static_quantile)
            log.info("ftwt r=%s: static k per unit %s", r, ks)
        if bucket_quantiles is not None and epoch == pe:
            buckets = fit_buckets(model, images, bucket_quantiles)
            log.info("ftwt r=%s: bucket widths %s", r, buckets.widths)
        mode = "predict"
        if epoch >= pe and static_quantile is not None:
            mode = "topk"
        elif epoch >= pe and bucket_quantiles is not None:
            mode = "buckets"
        sums = {"ce": 0.0, "bce": 0.0, "kept": 0.0, "agree": 0.0, "n": 0}
        perm = rng.permutation(len(images))
        with torch.enable_grad():
            for i in range(0, len(images), batch):
                idx = perm[i : i + batch]
                xb = images[idx] if augment is None else augment(images[idx], rng)
                x, y = images_to_tensor(xb), torch.from_numpy(labels[idx])
                out = model(x, r=r, masks=mode, ks=ks, buckets=buckets)
                ce = F.cross_entropy(out.logits, y)
                bce = sum(
                    F.binary_cross_entropy_with_logits(z, t)
                    for z, t in zip(out.mask_logits[1:], out.targets[1:])  # type: ignore[arg-type]
                )
                loss = ce + w * bce
                opt_b.zero_grad(set_to_none=True)
                opt_p.zero_grad(set_to_none=True)
                loss.backward()
                opt_b.step()
                if w:
                    opt_p.step()
                n = len(idx)
                sums["ce"] += ce.item() * n
                sums["bce"] += float(bce.detach()) * n / (len(out.masks) - 1)
                sums["kept"] += float(torch.cat(out.masks[1:], 1).mean()) * n
                sums["agree"] += float(
                    torch.cat([(m == t) for m, t in zip(out.masks[1:], out.targets[1:])], 1).float().mean()  # type: ignore[misc]
                ) * n
                sums["n"] += n
        line = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
        line.update(epoch=epoch + 1, predictor_loss_weight=w, seconds=time.perf_counter() - t0)
        history.append(line)
        log.info("ftwt r=%s epoch %d: %s", r, epoch + 1, line)
    set_norm_mode(backbone, "source")
    model.eval()
    return model, FTWTTrainLog(history, time.perf_counter() - t0, ks, buckets)


def fit_static_ks(model: FTWTClassifier, images: np.ndarray, quantile: float) -> list[int]:
    """``static_ks`` of the predicted kept counts on ``images`` (eval, source statistics); modes restored."""
    modes = {m: m.stat_mode for m in model.modules() if hasattr(m, "stat_mode")}
    was_training = model.training
    set_norm_mode(model.backbone, "source")
    model.eval()
    with torch.no_grad():
        kept = torch.cat([
            torch.stack([m.sum(1) for m in model(images_to_tensor(images[i : i + 256])).masks], 1)
            for i in range(0, len(images), 256)
        ])
    for m, mode in modes.items():
        m.stat_mode = mode
    model.train(was_training)
    return static_ks(kept, [u.conv.out_channels for u in model.units], quantile)


# --------------------------------------------------------------------------------------------------
# Static k and the gather path


def static_ks(kept: torch.Tensor, widths: Sequence[int], quantile: float = 0.9) -> list[int]:
    """One k per unit: the ``quantile`` of the predicted kept counts ``kept`` (N, U), at least 1; unit 0 full."""
    ks = [int(widths[0])]
    for u in range(1, len(widths)):
        q = float(torch.quantile(kept[:, u].to(torch.float64), quantile))
        ks.append(int(min(widths[u], max(1, math.ceil(q - 1e-9)))))
    return ks


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


def interleaved_latency(fns: dict[str, Callable[[], object]], *, calls: int = 300, warmup: int = 30) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (A B C A B C ...) so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
