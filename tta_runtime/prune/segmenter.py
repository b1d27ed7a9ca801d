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
Adaptation composes with pruning through ``fixed_masks()`` (``tta_runtime.pruning.FixedMasks``): the
runtime opens the block around the adaptation loop, the loop's first forward chooses the channels and every
later step computes with them (the decisions do not drift while the weights adapt). Costs are theoretical MACs (``encoder_macs``): masks are multiplied onto full convolutions,
so the PyTorch path is not faster; a gather path would be (see ``tta_runtime.pruning``).

``train_ftwt_segmenter`` is FTWT's decoupled training with the segmenter's own training loss
(``tta_runtime.train``: reconstruction MSE + mask_weight x Hungarian-matched mask BCE) in place of CE.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.config import SegmenterConfig
from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.prune.ftwt import FixedMasks, MaskPredictor, choose_masks, ftwt_targets
from tta_runtime.data.scenes import TRAIN_SEED, generate_scenes
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter, images_to_tensor, reconstruction_loss

__all__ = [
    "FTWTSegmenterOutput",
    "PrunedSegmenter",
    "SegmenterFTWTLog",
    "encoder_macs",
    "encoder_predictor_macs",
    "encoder_widths",
    "model_macs",
    "pruned_units",
    "train_ftwt_segmenter",
]

log = logging.getLogger(__name__)


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
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[-1] != self.cfg.resolution or image.shape[-2] != self.cfg.resolution:
            s = self.cfg.resolution
            raise InvalidInputError(f"expected a (B, 3, {s}, {s}) float tensor in [0, 1]; got shape {tuple(image.shape)}")
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

    def _predict_masks(self, x: torch.Tensor) -> None:
        self._run_encoder(x)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> features (B, S*S, D), with the masks applied (``last_masks`` updated)."""
        return self._run_encoder(image)[0]

    def ftwt_forward(self, image: torch.Tensor, *, r: float, pixel_idx: torch.Tensor | None = None) -> FTWTSegmenterOutput:
        """The training forward: masked model output plus predictor logits (gradient to the predictors only,
        through detached inputs) and FTWT targets at ``r`` for every pruned unit."""
        feats, masks, logits, targets = self._run_encoder(image, r=r, logits_grad=True)
        return FTWTSegmenterOutput(self.forward_features(feats, pixel_idx), masks, logits, targets)

    def macs_fraction(self) -> torch.Tensor:
        """(B,) encoder conv MACs plus predictor MACs of the latest forward as a fraction of the dense
        encoder's conv MACs. The predictors always count, so all-ones masks give 1 + (predictor MACs / dense
        encoder MACs), about 1 + 2e-5 for slot-shapes-32."""
        kept = self.kept().to(torch.float64)
        full = torch.tensor([encoder_widths(self.cfg)], dtype=torch.float64)
        spent = encoder_macs(self.cfg, kept).sum(1)
        spent = spent + encoder_predictor_macs(self.cfg, kept)
        return spent / encoder_macs(self.cfg, full).sum(1)


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class SegmenterFTWTLog:
    """``lines``: averages over every ``log_every`` steps (rec, mask, bce, kept fraction of the pruned units,
    agreement of applied masks with the targets, predictor weight, seconds so far)."""

    lines: list[dict[str, float]]
    seconds: float
    config: dict[str, Any]


def train_ftwt_segmenter(
    model: SlotSegmenter,
    *,
    r: float,
    steps: int,
    batch: int = 32,
    lr: float = 1e-4,
    lr_final_fraction: float = 0.1,
    lr_predictor: float = 1e-2,
    mask_weight: float = 0.1,
    attn_weight: float = 0.0,
    pixel_fraction: float = 0.25,
    grad_clip: float = 1.0,
    predictor_steps: int | None = None,
    seed: int = TRAIN_SEED,
    data_start: int = 1_000_000,
    dense: bool = False,
    log_every: int = 25,
) -> tuple[PrunedSegmenter, SegmenterFTWTLog]:
    """Decoupled FTWT fine-tuning of a copy of ``model`` (left untouched).

    Loss = reconstruction MSE + ``mask_weight`` x Hungarian-matched mask BCE (``tta_runtime.train``'s loss;
    0.1 is where the first shipped model's mask weight ended) on the masked model, + ``attn_weight`` x
    ``mask_weight`` x the same matched BCE on the slot-attention maps (all pixels; as ``TrainConfig.attn_weight``),
    + w x sum over pruned units of
    BCE(predictor logits, ``ftwt_targets`` at r), w = 1 for the first ``predictor_steps`` (default half of
    ``steps``), then 0. Predictor inputs are detached and applied masks carry no gradient, so neither loss
    reaches the other's parameters. Data: fresh ``in_dist`` scenes of the training stream ``seed`` from index
    ``data_start`` (past the shipped model's 230,400 training scenes), ``batch`` per step; ``pixel_fraction``
    of the pixels decoded per step, as in training. Backbone: Adam at ``lr`` with cosine decay to
    ``lr x lr_final_fraction``, grad-norm clip; predictors: Adam at ``lr_predictor``.
    ``dense``: the control, the same fine-tuning with every mask kept at one and no predictor loss.
    Returns the ``PrunedSegmenter`` in eval() and the log.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1; got {steps!r}")
    if not 0.0 < pixel_fraction <= 1.0:
        raise ConfigError(f"pixel_fraction must be in (0, 1]; got {pixel_fraction!r}")
    ps = max(1, steps // 2) if predictor_steps is None else int(predictor_steps)
    from tta_runtime.training.slot import matched_attention_loss, matched_mask_loss

    pruned = PrunedSegmenter.from_segmenter(model, seed=seed)
    backbone = [p for n, p in pruned.named_parameters() if not n.startswith("predictors.")]
    opt_b = torch.optim.Adam(backbone, lr=lr)
    opt_p = torch.optim.Adam(pruned.predictors.parameters(), lr=lr_predictor)
    s = pruned.cfg.resolution
    n_pix = s * s
    gen = torch.Generator().manual_seed(seed * 1_000_003 + data_start)
    config = {
        "r": r, "steps": steps, "batch": batch, "lr": lr, "lr_final_fraction": lr_final_fraction,
        "lr_predictor": lr_predictor, "mask_weight": mask_weight, "attn_weight": attn_weight, "pixel_fraction": pixel_fraction,
        "grad_clip": grad_clip, "predictor_steps": ps, "seed": seed, "data_start": data_start, "dense": dense,
        "data": f"tta_runtime.scenes 'in_dist', seed {seed}, indices {data_start} + step*{batch} ..",
    }
    pruned.train()
    t0 = time.perf_counter()
    lines: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    for step in range(steps):
        images, inst = generate_scenes("in_dist", batch, seed=seed, size=s, start=data_start + step * batch)
        x = images_to_tensor(images)
        idx = None
        if pixel_fraction < 1:
            idx = torch.randperm(n_pix, generator=gen)[: max(1, int(n_pix * pixel_fraction))]
        inst_t = torch.from_numpy(inst.reshape(batch, -1))
        if idx is not None:
            inst_t = inst_t[:, idx]
        t = step / max(1, steps - 1)
        for g in opt_b.param_groups:
            g["lr"] = lr * (lr_final_fraction + (1 - lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
        w = 0.0 if dense or step >= ps else 1.0
        with torch.enable_grad():
            if dense:
                out = SlotSegmenter.forward(pruned, x, idx)  # the base model's forward: no masks
                fo = None
            else:
                fo = pruned.ftwt_forward(x, r=r, pixel_idx=idx)
                out = fo.out
            rec = reconstruction_loss(out, x, idx)
            mask = matched_mask_loss(out, inst_t)
            bce = torch.zeros(())
            if fo is not None:
                units = pruned_units(pruned.cfg)
                bce = sum(
                    (F.binary_cross_entropy_with_logits(fo.mask_logits[u], fo.targets[u]) for u in units),  # type: ignore[arg-type]
                    torch.zeros(()),
                ) / max(1, len(units))
            loss = rec + mask_weight * mask + w * bce
            if attn_weight > 0:
                loss = loss + attn_weight * mask_weight * matched_attention_loss(out, inst)
            opt_b.zero_grad(set_to_none=True)
            opt_p.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone, grad_clip)
        opt_b.step()
        if w:
            opt_p.step()
        rec_line = {"rec": rec.item(), "mask": mask.item(), "bce": float(bce.detach()), "kept": 1.0, "agree": 1.0}
        if fo is not None and pruned_units(pruned.cfg):
            units = pruned_units(pruned.cfg)
            rec_line["kept"] = float(torch.cat([fo.masks[u] for u in units], 1).mean())
            rec_line["agree"] = float(torch.cat([fo.masks[u] == fo.targets[u] for u in units], 1).float().mean())  # type: ignore[operator]
        for k, v in rec_line.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["n"] = sums.get("n", 0.0) + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            line = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
            line.update(step=step + 1, predictor_loss_weight=w, seconds=time.perf_counter() - t0)
            lines.append(line)
            log.info("ftwt segmenter r=%s: %s", r, line)
            sums = {}
    pruned.eval()
    return pruned, SegmenterFTWTLog(lines, time.perf_counter() - t0, config)
