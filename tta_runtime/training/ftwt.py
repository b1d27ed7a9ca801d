"""FTWT training (Fire Together Wire Together, Elkerdawy et al., CVPR 2022) of the mask predictors in
`tta_runtime.prune`, for the digits CNN classifier (`train_ftwt`) and the slot segmenter's encoder
(`train_ftwt_segmenter`). Both run in the shared loop (`tta_runtime.training.loop`).

Training is decoupled (FTWT's default): the predictor input is detached (the predictor BCE never reaches the
backbone) and the applied mask is computed without gradient (the task loss never trains the predictor).
Loss = task loss + w x BCE(predictor logits, `ftwt_targets` at r) summed (classifier) or averaged
(segmenter) over the pruned units, w = 1 for the first half of training, then 0 (the predictors' optimizer then stops stepping); the backbone fine-tunes from
the given weights with the masks multiplied onto its activations. The task loss is the cross-entropy for the
classifier, and the segmenter's own training loss (`tta_runtime.training.slot.slot_loss`) for the encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tta_runtime.data.scenes import TRAIN_SEED
from tta_runtime.errors import ConfigError
from tta_runtime.models.classifier import CNNClassifier, images_to_tensor, set_norm_mode
from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.prune import (
    FTWTClassifier,
    PrunedSegmenter,
    WidthBuckets,
    fit_buckets,
    fit_static_ks,
    pruned_units,
)
from tta_runtime.training.loop import Optimized, Shuffled, StepOutput, train_loop
from tta_runtime.training.schedule import Schedule
from tta_runtime.training.slot import scene_batch, slot_loss

__all__ = ["FTWTTrainLog", "SegmenterFTWTLog", "train_ftwt", "train_ftwt_segmenter"]

log = logging.getLogger(__name__)


def _mask_stats(masks: Sequence[torch.Tensor], targets: Sequence[torch.Tensor | None]) -> dict[str, float]:
    """Kept fraction of the applied masks and their agreement with the FTWT targets, over the given units."""
    return {
        "kept": float(torch.cat(list(masks), 1).mean()),
        "agree": float(torch.cat([m == t for m, t in zip(masks, targets)], 1).float().mean()),  # type: ignore[misc]
    }


def _predictor_bce(logits: Sequence[torch.Tensor | None], targets: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Sum over units of BCE(predictor logits, FTWT targets)."""
    return sum(
        (F.binary_cross_entropy_with_logits(z, t) for z, t in zip(logits, targets)),  # type: ignore[arg-type]
        torch.zeros(()),
    )


# --------------------------------------------------------------------------------------------------
# The digits classifier


@dataclass
class FTWTTrainLog:
    """``epochs``: one line per epoch (ce, bce per unit, kept fraction, agreement with the targets, predictor
    loss weight, seconds so far)."""

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
    progress: bool = False,
) -> tuple[FTWTClassifier, FTWTTrainLog]:
    """Decoupled FTWT training of predictors (and fine-tuning of ``backbone``, modified in place).

    ``images``: (N, S, S, 3) uint8, ``labels``: (N,) int64. Loss = CE(masked logits) + w x BCE(predictors,
    targets at r), w = 1 for the first ``predictor_epochs`` (default half of ``epochs``), then 0. Backbone:
    SGD momentum 0.9 at a constant ``lr_backbone`` (rotation head excluded), BatchNorm in training mode;
    predictors: ``predictor_optimizer`` "sgd" (momentum 0.9, FTWT's) or "adam", at ``lr_predictor``.
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
    batches = Shuffled(len(images), batch, rng)
    switch = pe * batches.steps_per_epoch  # the first step without the predictor loss
    phase: dict[str, Any] = {"mode": "predict", "ks": None, "buckets": None}

    def step_fn(step: int) -> StepOutput:
        if step == switch and static_quantile is not None:
            phase.update(mode="topk", ks=fit_static_ks(model, images, static_quantile))
            log.info("ftwt r=%s: static k per unit %s", r, phase["ks"])
        if step == switch and bucket_quantiles is not None:
            phase.update(mode="buckets", buckets=fit_buckets(model, images, bucket_quantiles))
            log.info("ftwt r=%s: bucket widths %s", r, phase["buckets"].widths)
        w = 1.0 if step < switch else 0.0
        idx = batches(step)
        xb = images[idx] if augment is None else augment(images[idx], rng)
        x, y = images_to_tensor(xb), torch.from_numpy(labels[idx])
        out = model(x, r=r, masks=phase["mode"], ks=phase["ks"], buckets=phase["buckets"])
        ce = F.cross_entropy(out.logits, y)
        bce = _predictor_bce(out.mask_logits[1:], out.targets[1:])
        metrics = {"ce": ce.item(), "bce": float(bce.detach()) / (len(out.masks) - 1),
                   **_mask_stats(out.masks[1:], out.targets[1:]), "predictor_loss_weight": w}
        return StepOutput(ce + w * bce, metrics, weight=len(idx))

    set_norm_mode(backbone, "train")  # ordinary BatchNorm while fine-tuning
    result = train_loop(
        model, step_fn, [Optimized(opt_b), Optimized(opt_p, active=lambda step: step < switch)],
        steps=epochs * batches.steps_per_epoch, log_every=batches.steps_per_epoch, progress=progress,
        desc=f"ftwt r={r}", show=("ce", "kept"),
    )
    history = []
    for rec in result.records:
        line = {k: rec[k] for k in ("ce", "bce", "kept", "agree")}
        line.update(epoch=rec["step"] // batches.steps_per_epoch, predictor_loss_weight=rec["predictor_loss_weight"],
                    seconds=rec["seconds"])
        history.append(line)
        log.info("ftwt r=%s epoch %d: %s", r, line["epoch"], line)
    set_norm_mode(backbone, "source")
    model.eval()
    return model, FTWTTrainLog(history, result.elapsed, phase["ks"], phase["buckets"])


# --------------------------------------------------------------------------------------------------
# The slot segmenter's encoder


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
    progress: bool = False,
) -> tuple[PrunedSegmenter, SegmenterFTWTLog]:
    """Decoupled FTWT fine-tuning of a copy of ``model`` (left untouched).

    Loss = the segmenter's training loss (``slot_loss``: reconstruction MSE + ``mask_weight`` x Hungarian-
    matched mask BCE, + ``attn_weight`` x ``mask_weight`` x the same matched BCE on the slot-attention maps)
    on the masked model, + w x the mean over pruned units of BCE(predictor logits, ``ftwt_targets`` at r),
    w = 1 for the first ``predictor_steps`` (default half of ``steps``), then 0. Predictor inputs are detached
    and applied masks carry no gradient, so neither loss reaches the other's parameters. Data: fresh
    ``in_dist`` scenes of the training stream ``seed`` from index ``data_start`` (default: past the shipped
    model's training scenes), ``batch`` per step; ``pixel_fraction`` of the pixels decoded per step, as in
    training. Backbone: Adam at ``lr``, cosine decay to ``lr x lr_final_fraction`` (the shared schedule, no
    warm-up), grad-norm clip; predictors: Adam at a constant ``lr_predictor``.
    ``dense``: the control, the same fine-tuning with every mask kept at one and no predictor loss.
    Returns the ``PrunedSegmenter`` in eval() and the log.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1; got {steps!r}")
    if not 0.0 < pixel_fraction <= 1.0:
        raise ConfigError(f"pixel_fraction must be in (0, 1]; got {pixel_fraction!r}")
    ps = max(1, steps // 2) if predictor_steps is None else int(predictor_steps)
    pruned = PrunedSegmenter.from_segmenter(model, seed=seed)
    backbone = [p for n, p in pruned.named_parameters() if not n.startswith("predictors.")]
    opt_b = torch.optim.Adam(backbone, lr=lr)
    opt_p = torch.optim.Adam(pruned.predictors.parameters(), lr=lr_predictor)
    units = pruned_units(pruned.cfg)
    config = {
        "r": r, "steps": steps, "batch": batch, "lr": lr, "lr_final_fraction": lr_final_fraction,
        "lr_predictor": lr_predictor, "mask_weight": mask_weight, "attn_weight": attn_weight, "pixel_fraction": pixel_fraction,
        "grad_clip": grad_clip, "predictor_steps": ps, "seed": seed, "data_start": data_start, "dense": dense,
        "data": f"tta_runtime.data.scenes 'in_dist', seed {seed}, indices {data_start} + step*{batch} ..",
    }

    def step_fn(step: int) -> StepOutput:
        b = scene_batch(step, batch=batch, seed=seed, size=pruned.cfg.resolution, data_start=data_start,
                        pixel_fraction=pixel_fraction)
        w = 0.0 if dense or step >= ps else 1.0
        stats = {"kept": 1.0, "agree": 1.0}
        bce = torch.zeros(())
        if dense:
            out = SlotSegmenter.forward(pruned, b.x, b.pixel_idx)  # the base model's forward: no masks
        else:
            fo = pruned.ftwt_forward(b.x, r=r, pixel_idx=b.pixel_idx)
            out = fo.out
            if units:
                bce = _predictor_bce([fo.mask_logits[u] for u in units], [fo.targets[u] for u in units]) / len(units)
                stats = _mask_stats([fo.masks[u] for u in units], [fo.targets[u] for u in units])
        loss, rec, mask = slot_loss(out, b, mask_weight, attn_weight)
        metrics = {"rec": rec.item(), "mask": mask.item(), "bce": float(bce.detach()), **stats, "predictor_loss_weight": w}
        return StepOutput(loss + w * bce, metrics)

    result = train_loop(
        pruned, step_fn,
        [Optimized(opt_b, Schedule(lr, steps, 0, lr_final_fraction), clip=grad_clip),
         Optimized(opt_p, active=lambda step: not dense and step < ps)],
        steps=steps, log_every=log_every, progress=progress, desc=f"ftwt segmenter r={r}", show=("rec", "kept"),
    )
    for line in result.records:
        log.info("ftwt segmenter r=%s: %s", r, line)
    return pruned, SegmenterFTWTLog(result.records, result.elapsed, config)
