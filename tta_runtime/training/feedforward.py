"""Training of the U-Net baseline (`tta_runtime.models.unet`) with the slot model's data and mask loss.

Loss: the slot model's Hungarian-matched class-balanced BCE (`tta_runtime.training.slot.balanced_bce` on
`hungarian_targets`, shared, not copied) plus `ce_weight` x a per-pixel cross-entropy against the same
matching (the metric is scored on the argmax, and the softmax CE sharpens exactly that decision; the BCE
alone treats each channel independently).

Runs in the shared loop (`tta_runtime.training.loop`): Adam, warm-up + cosine schedule, grad-norm clip,
resumable from `run_dir/ckpt.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file

from tta_runtime.config import WeightsSpec
from tta_runtime.data.scenes import TRAIN_SEED, VAL_SEED, generate_scenes
from tta_runtime.files import atomic_write, writable_path
from tta_runtime.hub import sha256_file
from tta_runtime.metrics import fg_ari
from tta_runtime.models.segmenter import images_to_tensor as to_tensor
from tta_runtime.models.unet import (
    CARD_FILE,
    WEIGHTS_FILE,
    FeedForwardCard,
    FeedForwardConfig,
    FeedForwardProvenance,
    UNetSegmenter,
    predict_segmentation,
)
from tta_runtime.training.loop import Optimized, RunFolder, StepOutput, train_loop
from tta_runtime.training.provenance import copy_run, hardware
from tta_runtime.training.scenes_data import SceneDataConfig, labelled_batch_indices, load_scenes
from tta_runtime.training.schedule import Schedule
from tta_runtime.training.slot import balanced_bce, hungarian_targets, require_slots

__all__ = [
    "FeedForwardTrainConfig",
    "feedforward_loss",
    "main_train",
    "save_feedforward",
    "train_feedforward",
    "validate_feedforward",
]

# --------------------------------------------------------------------------------------------------
# Configuration, loss and validation


class FeedForwardTrainConfig(SceneDataConfig):
    """Training of the U-Net: the slot model's data recipe, a plain supervised schedule. With a
    `label_fraction` below 1 it learns from the labelled scenes only (it has no use for the others)."""

    name: str = Field("unet-shapes-32", pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    model: FeedForwardConfig = FeedForwardConfig()
    steps: int = Field(3000, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(200, ge=0)
    lr_final_fraction: float = Field(0.02, gt=0, le=1, description="cosine decay to lr x this at the end")
    ce_weight: float = Field(1.0, ge=0, description="weight of the matched per-pixel cross-entropy")
    grad_clip: float = Field(1.0, gt=0)
    seed: int = TRAIN_SEED
    eval_every: int = Field(250, ge=1)
    ckpt_every: int = Field(100, ge=1)
    val_images: int = Field(64, ge=1)


def feedforward_loss(
    logits: torch.Tensor, instances: torch.Tensor, ce_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slot model's matched mask loss + `ce_weight` x matched cross-entropy.

    `logits`: (B, K, S, S); `instances`: (B, S, S) long ids, 0 = background.
    Returns (total, bce, ce) as scalar tensors.
    """
    b = logits.shape[0]
    masks = logits.softmax(dim=1).flatten(2)  # (B, K, P)
    target, labels = hungarian_targets(masks, instances.reshape(b, -1))  # (B, K, P), (B, P)
    bce = balanced_bce(masks, target)
    if ce_weight == 0:
        return bce, bce, bce.new_zeros(())
    ce = F.cross_entropy(logits.flatten(2), labels)
    return bce + ce_weight * ce, bce, ce


def validate_feedforward(model: UNetSegmenter, n: int, split: str = "in_dist", seed: int = VAL_SEED) -> float:
    """Mean FG-ARI on `n` scenes of `split` (default: the in_dist validation seed)."""
    images, inst = generate_scenes(split, n, seed=seed, size=model.cfg.resolution)
    seg = predict_segmentation(model, images)
    return float(np.mean([fg_ari(inst[i], seg[i]) for i in range(n)]))


# --------------------------------------------------------------------------------------------------
# Training


def train_feedforward(cfg: FeedForwardTrainConfig, run_dir: Path, progress: bool = True) -> UNetSegmenter:
    """Train (or resume from `run_dir/ckpt.safetensors`) and return the model in eval mode.

    Data: the slot model's recipe, `generate_scenes("in_dist", batch, seed, size, start=step * batch)`
    at every step. Logs go to `run_dir/log.jsonl` (validation FG-ARI every `eval_every` steps).
    """
    require_slots(cfg.model.num_slots, "model.num_slots", "num_slots", cfg.train_split)
    torch.manual_seed(cfg.seed)
    model = UNetSegmenter(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    s = cfg.model.resolution

    def step_fn(step: int) -> StepOutput:
        indices = labelled_batch_indices(step, cfg.batch, 0, cfg.dataset_size, cfg.label_fraction)
        images, inst = load_scenes(cfg.train_split, indices, cfg.seed, s)
        loss, bce, ce = feedforward_loss(model(to_tensor(images)), torch.from_numpy(inst), cfg.ce_weight)
        return StepOutput(loss, {"loss": loss.item(), "bce": bce.item(), "ce": ce.item()})

    train_loop(
        model, step_fn, [Optimized(opt, Schedule(cfg.lr, cfg.steps, cfg.warmup, cfg.lr_final_fraction), cfg.grad_clip)],
        steps=cfg.steps, validate=lambda step: {"val_fg_ari": validate_feedforward(model, cfg.val_images, cfg.train_split)},
        eval_every=cfg.eval_every, folder=RunFolder(Path(run_dir), cfg, cfg.ckpt_every), progress=progress,
        desc="feedforward", show=("bce", "ce"),
    )
    return model


# --------------------------------------------------------------------------------------------------
# Model folder


def save_feedforward(
    model: UNetSegmenter,
    cfg: FeedForwardTrainConfig,
    folder: str | Path,
    *,
    command: str = "",
    run_dir: str | Path | None = None,
    val_images: int = 256,
) -> Path:
    """Write `folder/weights.safetensors` and `folder/card.json` (+ `train_log.jsonl` from `run_dir`).

    Steps done and training seconds come from `run_dir/ckpt.safetensors` when given; the card's validation FG-ARI
    is measured here on `val_images` in_dist scenes of seed VAL_SEED.
    """
    if model.cfg != cfg.model:
        raise ValueError(f"model config {model.cfg} differs from the training config's {cfg.model}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    writable_path(weights, "weights file")
    save_file(state, str(weights), metadata={"format": "pt", "name": cfg.name})
    seconds, steps_done = copy_run(run_dir, folder)
    steps_done = cfg.steps if steps_done is None else steps_done
    card = FeedForwardCard(
        name=cfg.name,
        description="Supervised U-Net baseline (no slot bottleneck) with the slot model's data and mask loss.",
        model=cfg.model,
        weights=WeightsSpec(file=WEIGHTS_FILE, sha256=sha256_file(weights)),
        training=FeedForwardProvenance(
            command=command,
            train_config=cfg.model_dump(mode="json"),
            steps_done=steps_done,
            seed=cfg.seed,
            data=f"tta_runtime.data.scenes {cfg.train_split!r}, seed {cfg.seed}, {cfg.batch} scenes per step, "
            f"{steps_done * cfg.batch} in all"
            + ("" if cfg.dataset_size is None else f", cycling a fixed set of {cfg.dataset_size}")
            + ("" if cfg.label_fraction >= 1 else f", only its {cfg.label_fraction:.0%} labelled scenes")
            + ": the slot model's recipe",
            validation=f"{cfg.train_split!r} seed {VAL_SEED}, {val_images} scenes",
            seconds=seconds,
            hardware=hardware(),
        ),
        metrics={f"val_in_dist_{val_images}_fg_ari": validate_feedforward(model, val_images, cfg.train_split)},
    )
    atomic_write(folder / CARD_FILE, (json.dumps(card.model_dump(mode="json"), indent=2) + "\n").encode(), "model card")
    return folder


def main_train(out_folder: str, run_dir: str, steps: int, command: str | None = None, *, progress: bool = True) -> None:
    """Train with the default config for `steps` steps (resuming `run_dir`), then save to `out_folder`."""
    cfg = FeedForwardTrainConfig(steps=steps)
    model = train_feedforward(cfg, Path(run_dir), progress=progress)
    command = command or f"tta-runtime train unet --out {out_folder} --run-dir {run_dir} --steps {steps}"
    save_feedforward(model, cfg, out_folder, command=command, run_dir=run_dir)
