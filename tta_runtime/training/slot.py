"""Semi-supervised training of the slot segmenter on generated in-distribution scenes.

Loss (Slot-TTA): reconstruction MSE + mask_weight x class-balanced BCE between the predicted masks and
the ground-truth instance masks, matched one-to-one by the Hungarian algorithm (background counts as one
object; ground truth is padded with empty masks to K so every slot gets a target).

What we change from the paper so that it trains on a few CPU cores (all recorded in the model card):
small images and fewer slots, a narrower encoder, decoding a random subset of pixels per step, and a
mask-loss weight that starts high and decays (with the paper's 0.01 a single slot learns to paint the
whole scene before the mask loss can separate objects).

Runs in the shared loop (`tta_runtime.training.loop`): resumable from `run_dir/ckpt.safetensors`, written
every `ckpt_every` steps.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file

from tta_runtime.config import (
    ModelCard,
    OODStats,
    Preprocessing,
    SegmenterConfig,
    WeightsSpec,
)
from tta_runtime.data.scenes import TRAIN_SEED, VAL_SEED, generate_scenes, max_objects
from tta_runtime.errors import ConfigError
from tta_runtime.files import atomic_write, writable_path
from tta_runtime.hub import sha256_file
from tta_runtime.metrics import fg_ari, hungarian_match
from tta_runtime.models.segmenter import (
    SegmenterOutput,
    SlotSegmenter,
    reconstruction_loss,
    segmentation_masks,
)
from tta_runtime.models.segmenter import images_to_tensor as to_tensor
from tta_runtime.training.checkpoint import CKPT_FILE, adam_moments, load_checkpoint
from tta_runtime.training.loop import Optimized, RunFolder, StepOutput, train_loop
from tta_runtime.training.provenance import copy_run, hardware
from tta_runtime.training.scenes_data import Prefetcher, SceneDataConfig, batch_indices, is_labelled, load_scenes
from tta_runtime.training.schedule import Schedule

__all__ = [
    "SceneBatch",
    "TrainConfig",
    "balanced_bce",
    "hungarian_targets",
    "matched_attention_loss",
    "matched_bce",
    "matched_mask_loss",
    "predict_batches",
    "require_slots",
    "scene_batch",
    "slot_loss",
    "to_tensor",
    "train",
    "validate_model",
    "write_model_folder",
]

log = logging.getLogger(__name__)


class TrainConfig(SceneDataConfig):
    name: str = Field("slot-shapes-32", pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    segmenter: SegmenterConfig = SegmenterConfig(
        resolution=32, num_slots=8, encoder_channels=32, decoder_fourier_bands=5
    )
    steps: int = Field(6_000, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(500, ge=0)
    lr_final_fraction: float = Field(0.1, gt=0, le=1, description="cosine decay to lr x this at the end")
    mask_weight: float = Field(1.0, ge=0)
    mask_weight_final: float = Field(0.1, ge=0, description="linear decay of the mask weight to this value")
    attn_weight: float = Field(
        0.0, ge=0, description="weight of the same matched BCE on the slot-attention maps (0 = paper)"
    )
    attn_ce_weight: float = Field(
        0.0, ge=0, description="weight of a per-pixel cross-entropy over the slots of the attention maps against each "
        "pixel's matched slot (0 = off): every pixel counts the same, however few of them lie on object edges",
    )
    pixel_fraction: float = Field(0.25, gt=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = TRAIN_SEED
    init_from: str | None = Field(
        None, description="start from these weights (a training checkpoint ckpt.safetensors or a model folder) with a fresh "
        "optimizer and this config's schedule: a fine-tuning stage"
    )
    init_encoder: str | None = Field(
        None, description="a pretrained encoder folder or name (tta-runtime train encoder) whose U-Net body initialises "
        "the U-Net encoder (encoder='unet', same base channels), all but its output head"
    )
    data_start: int = Field(0, ge=0, description="first scene index of the training stream (a later stage can use unseen scenes)")
    ckpt_every: int = Field(250, ge=1)
    eval_every: int = Field(500, ge=1)
    val_images: int = Field(64, ge=1)


def matched_mask_loss(out: SegmenterOutput, instances: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE on Hungarian-matched masks.

    `out.masks`: (B, K, P); `instances`: (B, P) long ids, 0 = background.
    """
    return matched_bce(out.masks, instances)


def matched_attention_loss(
    out: SegmenterOutput, instances: np.ndarray, bce_weight: float = 1.0, ce_weight: float = 0.0
) -> torch.Tensor:
    """The matched mask loss on the slot-attention maps (every pixel; `instances` (B, S, S) ids): `bce_weight` x
    the class-balanced BCE + `ce_weight` x the per-pixel cross-entropy over the slots against each pixel's
    matched slot (the attention is a softmax over the slots, and the masks are its argmax), one matching."""
    att = out.attention
    target, labels = hungarian_targets(att, torch.from_numpy(instances.reshape(len(instances), -1)))
    loss = att.new_zeros(())
    if bce_weight > 0:
        loss = loss + bce_weight * balanced_bce(att, target)
    if ce_weight > 0:
        loss = loss + ce_weight * F.nll_loss(att.clamp_min(1e-8).log(), labels.to(att.device))
    return loss


def hungarian_targets(masks: torch.Tensor, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match ground-truth segments to mask channels by the Hungarian algorithm on L2 distance.

    `masks`: (B, K, P) soft masks; `instances`: (B, P) ids. Returns the target masks (B, K, P) float in {0, 1}
    (ground truth padded with empty masks, so every channel gets a target) and each pixel's matched channel
    (B, P) long. No gradient.
    """
    with torch.no_grad():
        target = torch.zeros_like(masks)
        pred_np = masks.detach().cpu().numpy()
        inst_np = instances.cpu().numpy()
        labels = np.empty(inst_np.shape, dtype=np.int64)
        for i in range(len(inst_np)):
            ids, inverse = np.unique(inst_np[i], return_inverse=True)
            gt = (inverse.reshape(1, -1) == np.arange(len(ids))[:, None]).astype(np.float32)  # (G, P)
            rows, cols = hungarian_match(gt, pred_np[i])
            target[i, torch.as_tensor(cols, device=target.device)] = torch.as_tensor(gt[rows], device=target.device)
            channel_of = np.empty(len(ids), dtype=np.int64)
            channel_of[rows] = cols
            labels[i] = channel_of[inverse.reshape(-1)]
    return target, torch.from_numpy(labels).to(masks.device)


def balanced_bce(masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE between soft masks and {0, 1} targets of the same shape (positives weighted by
    negatives / positives)."""
    n_pos = target.sum()
    pos_weight = (target.numel() - n_pos) / n_pos.clamp(min=1.0)
    m = masks.clamp(1e-6, 1 - 1e-6)
    bce = -(pos_weight * target * m.log() + (1 - target) * (1 - m).log())
    return bce.mean()


def matched_bce(masks: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE between soft masks (B, K, P) and instance ids (B, P), matched by the Hungarian
    algorithm on L2 distance; ground truth is padded with empty masks so every slot gets a target."""
    return balanced_bce(masks, hungarian_targets(masks, instances)[0])


def require_slots(k: int, field: str, option: str, split: str = "in_dist") -> None:
    """ConfigError unless `k` mask channels can each take one segment of every training scene of `split`: the
    matched losses need a channel per object plus one for the background."""
    needed = max_objects(split) + 1
    if k < needed:
        raise ConfigError(
            f"{field}={k} is too few: training scenes hold up to {needed - 1} objects plus the background, and "
            f"the Hungarian-matched loss needs a channel for each; use {option} {needed} or more"
        )


def _mask_weight_at(cfg: TrainConfig, step: int) -> float:
    t = min(1.0, step / max(1, cfg.steps))
    return cfg.mask_weight + t * (cfg.mask_weight_final - cfg.mask_weight)


@dataclass
class SceneBatch:
    """One training batch of generated scenes. `x`: (B, 3, S, S) in [0, 1]; `instances`: (B, S, S) ids;
    `pixel_idx`: (P,) the pixels decoded this step (None: all); `targets`: (B, P) ids at those pixels."""

    x: torch.Tensor
    instances: np.ndarray
    pixel_idx: torch.Tensor | None
    targets: torch.Tensor
    labelled: np.ndarray | None = None  # (B,) bool: rows whose labels the mask losses see (None: all)

    def to(self, device: str | torch.device) -> SceneBatch:
        if torch.device(device).type == "cpu":
            return self
        idx = None if self.pixel_idx is None else self.pixel_idx.to(device)
        return replace(self, x=self.x.to(device, non_blocking=True), pixel_idx=idx, targets=self.targets.to(device))


def scene_batch(
    step: int, *, batch: int, seed: int, size: int, data_start: int, pixel_fraction: float,
    split: str = "in_dist", dataset_size: int | None = None, label_fraction: float = 1.0,
) -> SceneBatch:
    """Training batch `step`: the scenes of `split` that `tta_runtime.training.scenes_data` assigns to the step,
    which of them are labelled, and a random `pixel_fraction` of the pixels drawn from a generator seeded
    by the step alone (so a resumed run draws the same subsets)."""
    indices = batch_indices(step, batch, data_start, dataset_size)
    images, inst = load_scenes(split, indices, seed, size)
    labelled = None if label_fraction >= 1 else is_labelled(indices, data_start, label_fraction)
    n_pix = size * size
    idx = None
    if pixel_fraction < 1:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randperm(n_pix, generator=gen)[: max(1, int(n_pix * pixel_fraction))]
    targets = torch.from_numpy(inst.reshape(batch, -1))
    if idx is not None:
        targets = targets[:, idx]
    return SceneBatch(to_tensor(images), inst, idx, targets, labelled)


def slot_loss(
    out: SegmenterOutput, b: SceneBatch, mask_weight: float, attn_weight: float = 0.0, attn_ce_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction MSE, matched mask BCE): rec + mask_weight x mask (+ mask_weight x the matched losses
    on the slot-attention maps, all pixels: attn_weight x BCE + attn_ce_weight x cross-entropy). The mask terms see only
    the batch's labelled rows (`b.labelled`); a batch without one has a mask term of 0."""
    rec = reconstruction_loss(out, b.x, b.pixel_idx)
    if b.labelled is not None and not b.labelled.all():
        rows = torch.from_numpy(np.flatnonzero(b.labelled))
        if len(rows) == 0:
            return rec, rec, rec.new_zeros(())
        out = replace(out, masks=out.masks[rows], attention=out.attention[rows])
        b = replace(b, targets=b.targets[rows], instances=b.instances[rows.numpy()], labelled=None)
    mask = matched_mask_loss(out, b.targets)
    loss = rec + mask_weight * mask
    if attn_weight > 0 or attn_ce_weight > 0:
        # Supervise the binding itself: the attention maps (all pixels) get the same matched loss.
        loss = loss + mask_weight * matched_attention_loss(out, b.instances, attn_weight, attn_ce_weight)
    return loss, rec, mask


@torch.no_grad()
def predict_batches(
    model: SlotSegmenter, images: np.ndarray, batch: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks (N, K, S*S), per-image reconstruction MSE (N,) and the slot-attention argmax (N, S*S) for uint8
    images (N, S, S, 3)."""
    masks, mses, attention = [], [], []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch]).to(next(model.parameters()).device)
        out = model(x)
        masks.append(segmentation_masks(model.cfg, out).cpu().numpy())
        target = x.flatten(2).transpose(1, 2)
        mses.append(((out.reconstruction - target) ** 2).mean(dim=(1, 2)).cpu().numpy())
        attention.append(out.attention.argmax(1).cpu().numpy())
    return np.concatenate(masks), np.concatenate(mses), np.concatenate(attention)


def validate_model(model: SlotSegmenter, n: int, split: str = "in_dist", seed: int = VAL_SEED) -> dict[str, float]:
    """FG-ARI and reconstruction MSE on `n` validation scenes (a seed the test splits never use)."""
    s = model.cfg.resolution
    images, inst = generate_scenes(split, n, seed=seed, size=s)
    masks, mses, attention = predict_batches(model, images)
    seg = masks.argmax(1).reshape(n, s, s)
    scores = [fg_ari(inst[i], seg[i]) for i in range(n)]
    usage = np.bincount(seg.reshape(-1), minlength=masks.shape[1]) / seg.size
    by_attention = attention.reshape(n, s, s)
    return {
        "fg_ari": float(np.mean(scores)),
        # the slot-attention maps alone (the card's mask_source may combine them with the decoder's masks)
        "fg_ari_attention": float(np.mean([fg_ari(inst[i], by_attention[i]) for i in range(n)])),
        "recon_mse": float(np.mean(mses)),
        "recon_mse_std": float(np.std(mses)),
        "max_slot_share": float(usage.max()),
    }


def train(
    cfg: TrainConfig, run_dir: Path, *, progress: bool = True, stop_at: int | None = None, device: str = "cpu",
    workers: int = 0, time_limit: float | None = None,
) -> SlotSegmenter:
    """Train (or resume from `run_dir/ckpt.safetensors`) and return the model. Logs go to `run_dir/log.jsonl`.

    `stop_at`: stop after this step (checkpointed) although the schedule runs to `cfg.steps`; a later call
    resumes from there. How a run cut short by a session's end is replayed exactly. `time_limit`: the same,
    after this many seconds. `device`: where the model trains (the checkpoint is on the CPU either way);
    `workers`: processes that generate the next batches ahead (0: in the loop). The batches are the same
    for every device and worker count: they depend on the step alone."""
    require_slots(cfg.segmenter.num_slots, "num_slots", "--slots", cfg.train_split)
    torch.manual_seed(cfg.seed)
    model = SlotSegmenter(cfg.segmenter).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = Prefetcher(functools.partial(
        scene_batch, batch=cfg.batch, seed=cfg.seed, size=cfg.segmenter.resolution, data_start=cfg.data_start,
        pixel_fraction=cfg.pixel_fraction, split=cfg.train_split, dataset_size=cfg.dataset_size,
        label_fraction=cfg.label_fraction,
    ), workers)

    def init() -> None:
        if cfg.init_from is not None:
            model.load_state_dict(_initial_weights(cfg.init_from), strict=True)
            log.info("initialised from %s", cfg.init_from)
        if cfg.init_encoder is not None:
            if cfg.segmenter.encoder != "unet":
                raise ConfigError(f"init_encoder {cfg.init_encoder!r} is a U-Net body: it needs encoder='unet' (--encoder unet)")
            from tta_runtime.models.encoder_folder import body_init

            source = body_init(model.encoder.convs, cfg.init_encoder)
            log.info("encoder body initialised from %s (sha256 %s)", source["name"], source["sha256"][:12])

    def step_fn(step: int) -> StepOutput:
        b = batches(step).to(device)
        loss, rec, mask = slot_loss(
            model(b.x, b.pixel_idx), b, _mask_weight_at(cfg, step), cfg.attn_weight, cfg.attn_ce_weight
        )
        return StepOutput(loss, {"rec": rec.item(), "mask": mask.item()})

    schedule = Schedule(cfg.lr, cfg.steps, cfg.warmup, cfg.lr_final_fraction)
    with batches:
        train_loop(
            model, step_fn, [Optimized(opt, schedule, clip=cfg.grad_clip)], steps=cfg.steps, stop_at=stop_at,
            validate=lambda step: {"val": validate_model(model, cfg.val_images, cfg.train_split)},
            eval_every=cfg.eval_every, folder=RunFolder(Path(run_dir), cfg, cfg.ckpt_every), init=init,
            progress=progress, desc="train", show=("rec", "mask"), time_limit=time_limit,
        )
    return model


def _data_line(cfg: TrainConfig, steps_done: int) -> str:
    if cfg.dataset_size is None:
        seen = f"a fresh batch of {cfg.batch} scenes per step (indices step*batch..), {steps_done * cfg.batch} scenes in all"
    else:
        seen = f"a fixed set of {cfg.dataset_size} scenes cycled {steps_done * cfg.batch / cfg.dataset_size:.1f} times"
    labels = "" if cfg.label_fraction >= 1 else f"; segmentation labels on {cfg.label_fraction:.0%} of them"
    return f"tta_runtime.data.scenes {cfg.train_split!r}, seed {cfg.seed}, {seen}{labels}"


def _initial_weights(source: str) -> dict[str, torch.Tensor]:
    """The model state dict in a training checkpoint (ckpt.safetensors) or a model folder."""
    path = Path(source)
    if path.is_file():
        try:
            return load_checkpoint(path).model
        except ConfigError as e:
            raise ConfigError(f"init_from {e} (expected a tta-runtime train checkpoint)") from None
    from tta_runtime.hub import find_model, load_card, load_weights

    folder = find_model(source)
    return load_weights(folder, load_card(folder))


def _save_adam_moments(ckpt_path: Path, out: Path) -> WeightsSpec:
    """Adam's moments at the end of training, by parameter name, for optimizer_state='training' recipes."""
    writable_path(out, "optimizer state file")
    save_file(adam_moments(ckpt_path), str(out))
    return WeightsSpec(file=out.name, sha256=sha256_file(out))


def write_model_folder(
    model: SlotSegmenter, cfg: TrainConfig, out_dir: Path, *, command: str, run_dir: Path | None = None,
    description: str = "",
) -> Path:
    """Write `card.json` + `weights.safetensors` (+ the training log) for a trained model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # What was measured on the previous weights no longer holds: remove it rather than ship it stale.
    for stale in ("eval.json", "ood_eval.json", "gate_bench.json"):
        (out_dir / stale).unlink(missing_ok=True)
    if (out_dir / "ood").is_dir():
        shutil.rmtree(out_dir / "ood")
    weights = out_dir / "weights.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    writable_path(weights, "weights file")
    save_file(state, str(weights), metadata={"format": "pt", "name": cfg.name})
    ckpt = None if run_dir is None else Path(run_dir) / CKPT_FILE
    opt_spec = None
    if ckpt is not None and ckpt.exists():
        opt_spec = _save_adam_moments(ckpt, out_dir / "adam_state.safetensors")
    model.eval()
    val = validate_model(model, 256, cfg.train_split)
    elapsed, steps_done = copy_run(run_dir, out_dir)
    steps_done = cfg.steps if steps_done is None else steps_done
    card = ModelCard(
        name=cfg.name,
        description=description or "Slot-TTA 2D segmenter trained on generated flat-coloured shape scenes.",
        segmenter=cfg.segmenter,
        preprocessing=Preprocessing(size=cfg.segmenter.resolution),
        weights=WeightsSpec(file=weights.name, sha256=sha256_file(weights)),
        optimizer_state=opt_spec,
        ood=OODStats(recon_mse_mean=val["recon_mse"], recon_mse_std=max(val["recon_mse_std"], 1e-8), n_images=256),
        training={
            "command": command,
            "config": cfg.model_dump(),
            "data": _data_line(cfg, steps_done),
            "validation": f"{cfg.train_split!r} seed {VAL_SEED}",
            "steps_done": steps_done,
            "seconds": elapsed,
            "hardware": hardware(),
            "changes_from_paper": [
                (f"{cfg.segmenter.resolution}x{cfg.segmenter.resolution} images, {cfg.segmenter.num_slots} slots "
                 "(paper 128x128, 11)"),
                f"encoder {cfg.segmenter.encoder_channels} channels (paper 64)",
                (f"decoder input: raw coordinates + {cfg.segmenter.decoder_fourier_bands} sin/cos frequency bands "
                 "(paper: raw coordinates only)"),
                f"decodes {cfg.pixel_fraction:.0%} of pixels per step (random subset)",
                f"mask-loss weight {cfg.mask_weight} decaying linearly to {cfg.mask_weight_final} (paper 0.01)",
                *(
                    [f"the matched mask loss also on the slot-attention maps, weight {cfg.attn_weight} x mask weight"]
                    if cfg.attn_weight > 0 else []
                ),
                *(
                    [f"a per-pixel cross-entropy over the slots on the attention maps, weight {cfg.attn_ce_weight} x mask weight"]
                    if cfg.attn_ce_weight > 0 else []
                ),
                (f"Adam lr {cfg.lr} with {cfg.warmup} warm-up steps, cosine decay to {cfg.lr_final_fraction}x; "
                 f"grad-norm clip {cfg.grad_clip}; batch {cfg.batch}"),
            ],
        },
        metrics={"val_in_dist_256": val},
    )
    atomic_write(out_dir / "card.json", (json.dumps(card.model_dump(mode="json"), indent=2) + "\n").encode(), "model card")
    return out_dir
