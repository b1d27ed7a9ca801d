"""Dynamic channel pruning of the slot segmenter's encoder: Fire Together Wire Together (FTWT).

The encoder is a stride-1 stack of ``encoder_layers`` convs (k x k, ReLU, no norm) at full resolution,
then a position embedding: (B, 3, S, S) -> (B, S*S, D). Unit u is conv u + ReLU. Which outputs are pruned:

- unit 0 (3 -> C, reads the image): never pruned, as in the classifier. Its predictor would see only the
  pooled image (three mean colours); it costs 3 x C x k^2 per pixel, so masking its output saves only on
  conv 1's input side; and a colour-gated first layer is the likeliest to drop what an unseen-colour input
  needs.
- units 1 .. L-2 (C -> C, their output feeds another conv): pruned. Each has a ``MaskPredictor`` that reads
  the DETACHED tensor entering its conv (global average pool + Linear C -> C), keep where sigmoid > 0.5
  (or the static top-k); the mask multiplies the post-ReLU activation.
- unit L-1 (C -> D, feeds slot attention): full output width (slot attention needs all D features), but
  its input channels are the pruned unit L-2's, so its cost shrinks with them.

``PrunedSegmenter`` keeps ``SlotSegmenter``'s parameter names (recipes' ``params`` such as "no_encoder",
the Adapter and the exporters see the same model) and adds ``predictors``; only ``encode`` changes.
Adaptation composes with pruning through ``fixed_masks()`` (``tta_runtime.prune.fixed.FixedMasks``): the
runtime opens the block around the adaptation loop, the loop's first forward chooses the channels and every
later step computes with them (the decisions do not drift while the weights adapt). Costs are theoretical
MACs (``encoder_macs``). Two paths compute the same features: with gradients (adaptation, training) the
masks multiply full convolutions; without (``tta_runtime.prune.fast.frozen_call``: predict, the adaptation
loop's final forward) each conv computes only the kept channels (``gathered_forward``), which is what makes
the pruned encoder faster. ``last_path`` says which ran ("gather" or "mask-multiply").

Training (FTWT's decoupled training with the segmenter's own loss) lives in ``tta_runtime.training.ftwt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.config import SegmenterConfig
from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter
from tta_runtime.prune.fast import FoldCache, GatherUnit, frozen_call, gathered_forward
from tta_runtime.prune.fixed import FixedMasks
from tta_runtime.prune.predictors import ChainMacs, MaskPredictor, choose_masks, ftwt_targets

__all__ = [
    "FTWTSegmenterOutput",
    "PrunedSegmenter",
    "encoder_macs",
    "encoder_predictor_macs",
    "encoder_widths",
    "model_macs",
    "pruned_units",
]


# --------------------------------------------------------------------------------------------------
# Which units are pruned, and what they cost


def encoder_widths(cfg: SegmenterConfig) -> list[int]:
    """Output channels of each encoder conv: ``encoder_channels`` for all but the last, ``slot_dim`` last."""
    return [cfg.slot_dim if i == cfg.encoder_layers - 1 else cfg.encoder_channels for i in range(cfg.encoder_layers)]


def pruned_units(cfg: SegmenterConfig) -> list[int]:
    """Indices of the units whose output channels carry a mask predictor: 1 .. encoder_layers - 2."""
    return list(range(1, cfg.encoder_layers - 1))


def encoder_macs(cfg: SegmenterConfig, kept: torch.Tensor) -> torch.Tensor:
    """Theoretical multiply-accumulates of each encoder conv per input.

    ``kept``: (B, U) kept output channels per unit (U = ``encoder_layers``; unpruned units at full width).
    Returns (B, U) float64: conv u costs kept_in x kept_out x k x k x S^2, kept_in = kept[:, u-1] (3 for
    u = 0). Biases, ReLU and the position embedding are not counted.
    """
    kept = kept.to(torch.float64)
    if kept.ndim != 2 or kept.shape[1] != cfg.encoder_layers:
        raise InvalidInputError(f"kept must be (B, {cfg.encoder_layers}); got shape {tuple(kept.shape)}")
    per_pixel = cfg.encoder_kernel**2 * cfg.resolution**2
    k_in = torch.cat([torch.full_like(kept[:, :1], 3.0), kept[:, :-1]], dim=1)  # (B, U)
    return k_in * kept * per_pixel


def encoder_predictor_macs(cfg: SegmenterConfig, kept: torch.Tensor) -> torch.Tensor:
    """(B,) MACs of the predictors' Linear layers on the kept input channels (the pooling is ignored)."""
    kept = kept.to(torch.float64)
    widths = encoder_widths(cfg)
    total = torch.zeros_like(kept[:, 0])
    for u in pruned_units(cfg):
        total = total + kept[:, u - 1] * widths[u]
    return total


def model_macs(model: SlotSegmenter) -> dict[str, float]:
    """Dense MACs of one full forward (all pixels decoded) at batch 1, counted by PyTorch's FLOP counter
    (matmuls, convs, einsums; norms, softmax and activations not counted): {"encoder_convs", "total"}."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.cfg.resolution, model.cfg.resolution)
    counter = FlopCounterMode(display=False)
    # Under no_grad the counter's module tracker fails on expanded parameters (torch 2.13): count with grad.
    with torch.enable_grad(), counter:
        SlotSegmenter.forward(model, x)
    flops = counter.get_total_flops()
    convs = sum(int(v) for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
    return {"encoder_convs": convs / 2, "total": flops / 2}


# --------------------------------------------------------------------------------------------------
# The pruned model


@dataclass
class FTWTSegmenterOutput:
    """One training forward. ``out``: the segmenter's output with the masks applied. Per unit u (index 0 ..
    U-1; unpruned units hold ones / None): ``masks[u]`` (B, C_u) float in {0, 1} as applied,
    ``mask_logits[u]`` (B, C_u) predictor logits (with gradient to the predictor only) or None,
    ``targets[u]`` (B, C_u) FTWT targets at r or None."""

    out: SegmenterOutput
    masks: list[torch.Tensor]
    mask_logits: list[torch.Tensor | None]
    targets: list[torch.Tensor | None] = field(default_factory=list)


class PrunedSegmenter(FixedMasks, SlotSegmenter):
    """A ``SlotSegmenter`` whose encoder's hidden convs are pruned per input by FTWT mask predictors.

    State dict: the base model's keys + ``predictors.<i>.fc.{weight,bias}`` (one predictor per entry of
    ``pruned_units(cfg)``, in order). ``masks``: "predict" (sigmoid > 0.5, k varies per input) or "topk"
    (``ks[u]`` most likely channels of unit u; ``ks`` has one entry per encoder conv, unpruned units at
    their full width). ``last_masks``: the masks of the latest ``encode``, one (B, C_u) per unit, ones for
    unpruned units.
    """

    def __init__(self, cfg: SegmenterConfig, *, masks: str = "predict", ks: Sequence[int] | None = None) -> None:
        if cfg.encoder != "conv":
            raise ConfigError(
                f"FTWT pruning prunes the channels of the conv encoder; this model's encoder is {cfg.encoder!r}. "
                "Prune a model with encoder='conv', or run this one dense."
            )
        super().__init__(cfg)
        if masks not in ("predict", "topk"):
            raise ConfigError(f"masks must be 'predict' or 'topk'; got {masks!r}")
        widths = encoder_widths(cfg)
        self._pruned = pruned_units(cfg)
        if ks is not None:
            bad = len(ks) != len(widths) or any(
                not 1 <= int(k) <= w if u in self._pruned else int(k) != w for u, (k, w) in enumerate(zip(ks, widths))
            )
            if bad:
                raise ConfigError(
                    f"ks needs one kept count per encoder conv ({len(widths)}), within {widths} for the pruned "
                    f"units {self._pruned} and equal to the full width for the others; got {list(ks)!r}"
                )
        if masks == "topk" and ks is None:
            raise ConfigError(f"masks='topk' needs ks: one kept count per encoder conv, widths {widths}")
        self.predictors = nn.ModuleList(MaskPredictor(widths[u - 1], widths[u]) for u in self._pruned)
        self.mask_mode = masks
        self.ks = None if ks is None else [int(k) for k in ks]
        self.last_masks = []
        self._folds = FoldCache()
        per_pair = [cfg.encoder_kernel**2 * cfg.resolution**2] * cfg.encoder_layers  # k x k x output pixels
        self._macs = ChainMacs(widths, per_pair, [u in self._pruned for u in range(cfg.encoder_layers)], in_channels=3)

    @classmethod
    def from_segmenter(
        cls, model: SlotSegmenter, *, masks: str = "predict", ks: Sequence[int] | None = None, seed: int = 0
    ) -> PrunedSegmenter:
        """A copy of ``model``'s weights with fresh predictors (initialised from ``seed``; bias +3 = keep all)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = cls(model.cfg, masks=masks, ks=ks)
        missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("predictors.") for k in missing):
            raise ConfigError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        return out.to(next(model.parameters()).device)

    def _conv(self, u: int) -> nn.Conv2d:
        return self.encoder.convs[2 * u]  # type: ignore[return-value]  # Sequential(conv, ReLU, conv, ReLU, ...)

    def _run_encoder(
        self, image: torch.Tensor, *, r: float | None = None, logits_grad: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
        """features (B, S*S, D), applied masks, predictor logits and targets (per unit)."""
        self._check_image(image)
        self.last_path = "mask-multiply"
        fixed = self._masks_in_force(image.shape[0])
        h = image
        masks: list[torch.Tensor] = []
        logits: list[torch.Tensor | None] = []
        targets: list[torch.Tensor | None] = []
        for u in range(self.cfg.encoder_layers):
            pruned = u in self._pruned
            z = None
            if pruned and fixed is None:
                # Detached input: the predictor's BCE never reaches the backbone.
                with torch.set_grad_enabled(logits_grad and torch.is_grad_enabled()):
                    z = self.predictors[self._pruned.index(u)](h.detach())  # (B, C_u)
            y = F.relu(self._conv(u)(h))  # (B, C_u, S, S)
            targets.append(ftwt_targets(y, r) if (pruned and r is not None) else None)
            if fixed is not None:
                m = fixed[u].to(y.dtype)
            else:
                k = self.ks[u] if self.ks is not None else None
                m = choose_masks(z, self.mask_mode if pruned else "dense", k, y)  # no gradient
            h = y * m[:, :, None, None] if pruned else y
            masks.append(m.detach())
            logits.append(z)
        self._record(masks)
        x = h.flatten(2).transpose(1, 2)  # (B, N, D)
        return x + self.encoder.pos(self.encoder.grid), masks, logits, targets

    def _check_image(self, image: torch.Tensor) -> None:
        s = self.cfg.resolution
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[-1] != s or image.shape[-2] != s:
            raise InvalidInputError(f"expected a (B, 3, {s}, {s}) float tensor in [0, 1]; got shape {tuple(image.shape)}")

    def _gather_units(self) -> list[GatherUnit]:
        """The encoder convs for ``gathered_forward`` (no norm to fold): the pruned ones with their predictors."""
        pruned = {u: self.predictors[i].fc for i, u in enumerate(self._pruned)}
        units = []
        for u in range(self.cfg.encoder_layers):
            conv, fc = self._conv(u), pruned.get(u)
            predictor = None if fc is None else (fc.weight.detach(), fc.bias.detach())
            weight, bias = conv.weight.detach(), conv.bias.detach()  # type: ignore[union-attr]
            units.append(GatherUnit(weight, bias, conv.padding[0], False, predictor))  # type: ignore[index]
        return units

    def _predict_masks(self, x: torch.Tensor) -> None:
        self.encode(x)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> features (B, S*S, D), with the masks applied (``last_masks`` updated).
        Without autograd, only the kept channels are computed (the gather path, the same numbers)."""
        if not frozen_call(image):
            return self._run_encoder(image)[0]
        self._check_image(image)
        fixed = self._masks_in_force(image.shape[0])
        units = self._folds.get(self, self._gather_units)  # rebuilt (with empty slice caches) when weights change
        run = gathered_forward(image, units, self.mask_mode, self.ks, fixed, channels_last_from=1)
        self.last_path = "gather"
        self._record(run.masks, run.kept)
        return run.h.flatten(2).transpose(1, 2) + self.encoder.pos(self.encoder.grid)  # (B, D, S, S) -> (B, N, D)

    def ftwt_forward(self, image: torch.Tensor, *, r: float, pixel_idx: torch.Tensor | None = None) -> FTWTSegmenterOutput:
        """The training forward: masked model output plus predictor logits (gradient to the predictors only,
        through detached inputs) and FTWT targets at ``r`` for every pruned unit."""
        feats, masks, logits, targets = self._run_encoder(image, r=r, logits_grad=True)
        return FTWTSegmenterOutput(self.forward_features(feats, pixel_idx), masks, logits, targets)

    def macs_fraction(self) -> torch.Tensor:
        """(B,) encoder conv MACs plus predictor MACs of the latest forward as a fraction of the dense
        encoder's conv MACs. The predictors always count, so all-ones masks give 1 + (predictor MACs / dense
        encoder MACs)."""
        return self._macs(self.kept())
