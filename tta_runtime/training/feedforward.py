"""A supervised feed-forward baseline: a small U-Net that predicts K mask channels, no slot bottleneck.

Why it exists: critics of reconstruction-based TTA say its gains come from weak feed-forward models
(Diffusion-TTA makes the same point). This model is trained on exactly the slot model's data and
mask supervision, so "before adaptation" numbers of the slot model can be put next to a strong
feed-forward segmenter on the same splits.

image (B, 3, S, S) in [0, 1]
  -> concatenate a 2-channel coordinate grid (x, y in [0, 1]; CoordConv, so that the network can
     order its output channels by position: a fully convolutional net is otherwise translation
     equivariant and cannot tell two identical objects which channel each one gets)
  -> U-Net: `depth` levels of (conv3x3 + GroupNorm + ReLU) x 2, max-pool down, transposed conv up,
     skip concatenation; channels base, 2 base, 4 base, ...
  -> 1x1 conv -> logits (B, K, S, S); masks = softmax over K

GroupNorm normalises each image on its own, so a prediction does not depend on the rest of the batch
(batch-1 inference gives the same numbers as batch-N inference).

Loss: the slot model's Hungarian-matched class-balanced BCE (`tta_runtime.train.matched_bce`,
shared, not copied) plus `ce_weight` x a per-pixel cross-entropy against the same matching (the metric
is scored on the argmax, and the softmax CE sharpens exactly that decision; the BCE alone treats each
channel independently).

Public names: FeedForwardConfig, FeedForwardTrainConfig, UNetSegmenter, feedforward_loss,
train_feedforward, save_feedforward, load_feedforward, predict_segmentation, validate_feedforward,
main_train.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tta_runtime.config import WeightsSpec, _Frozen, format_validation_error
from tta_runtime.training import checkpoint
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError
from tta_runtime.metrics import fg_ari, hungarian_match
from tta_runtime.data.scenes import generate_scenes, max_objects
from tta_runtime.hub import sha256_file
from tta_runtime.data.scenes import TRAIN_SEED, VAL_SEED
from tta_runtime.models.segmenter import images_to_tensor as to_tensor
from tta_runtime.training.slot import matched_bce

__all__ = [
    "FeedForwardCard",
    "FeedForwardConfig",
    "FeedForwardTrainConfig",
    "UNetSegmenter",
    "feedforward_loss",
    "load_feedforward",
    "main_train",
    "predict_segmentation",
    "save_feedforward",
    "train_feedforward",
    "validate_feedforward",
]

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"


# --------------------------------------------------------------------------------------------------
# Configuration


class FeedForwardConfig(_Frozen):
    """Architecture of the U-Net baseline."""

    resolution: int = Field(32, ge=8, le=512, description="square input size in pixels")
    num_slots: int = Field(8, ge=2, le=64, description="K mask channels (same K as the slot model)")
    base_channels: int = Field(32, ge=4, le=512, description="channels at full resolution; doubled per level")
    depth: int = Field(2, ge=1, le=6, description="number of down/up levels")

    @model_validator(mode="after")
    def _divisible(self) -> FeedForwardConfig:
        if self.resolution % (2**self.depth):
            raise ValueError(
                f"resolution ({self.resolution}) must be divisible by 2**depth ({2**self.depth}) so that "
                "every pooled map upsamples back to its skip connection's size"
            )
        return self


class FeedForwardTrainConfig(_Frozen):
    """Training of the U-Net: the slot model's data recipe, a plain supervised schedule."""

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


class FeedForwardProvenance(_Frozen):
    """How the shipped weights were made."""

    command: str
    train_config: FeedForwardTrainConfig
    steps_done: int = Field(ge=0)
    seed: int
    data: str
    validation: str
    seconds: float | None = Field(None, ge=0, description="training wall time (None: not recorded)")
    hardware: str


class FeedForwardCard(_Frozen):
    """`card.json` of a feed-forward baseline folder."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    task: Literal["segmentation"] = "segmentation"
    architecture: Literal["unet_feedforward"] = "unet_feedforward"
    description: str = ""
    model: FeedForwardConfig
    weights: WeightsSpec
    training: FeedForwardProvenance
    metrics: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _plain_file(self) -> FeedForwardCard:
        if Path(self.weights.file).name != self.weights.file or self.weights.file in ("", ".", ".."):
            raise ValueError(f"weights.file must be a file name inside the folder, got {self.weights.file!r}")
        if self.training.train_config.model != self.model:
            raise ValueError("training.train_config.model differs from model")
        return self


# --------------------------------------------------------------------------------------------------
# Model


def _norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class _DoubleConv(nn.Sequential):
    """(conv3x3 -> GroupNorm -> ReLU) x 2, size-preserving: (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.ReLU(),
        )


class UNetSegmenter(nn.Module):
    """U-Net with CoordConv input. `forward(image)`: (B, 3, S, S) float in [0, 1] -> logits (B, K, S, S).

    `masks(image)` is the softmax over K, (B, K, S, S) float in [0, 1] summing to 1 over K.
    Grad policy belongs to the caller: nothing here enables or disables gradients.
    """

    def __init__(self, cfg: FeedForwardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base_channels * 2**i for i in range(cfg.depth + 1)]  # per level, last = bottleneck
        self.down = nn.ModuleList(_DoubleConv(5 if i == 0 else chans[i - 1], chans[i]) for i in range(cfg.depth))
        self.bottleneck = _DoubleConv(chans[-2], chans[-1])
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(cfg.depth))
        )
        self.up = nn.ModuleList(_DoubleConv(2 * chans[i], chans[i]) for i in reversed(range(cfg.depth)))
        self.head = nn.Conv2d(chans[0], cfg.num_slots, 1)
        ticks = (torch.arange(cfg.resolution, dtype=torch.float32) + 0.5) / cfg.resolution
        yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)  # (1, 2, S, S)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        x = torch.cat([image, self.coords.expand(b, -1, -1, -1)], dim=1)  # (B, 5, S, S)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)  # (B, C_i, S / 2**i, S / 2**i)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)  # (B, C_depth, S / 2**depth, S / 2**depth)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips), strict=True):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)  # (B, K, S, S)

    def masks(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward(image).softmax(dim=1)


# --------------------------------------------------------------------------------------------------
# Loss


def _matched_labels(masks: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
    """Per-pixel channel index of each pixel's matched ground-truth segment: (B, P) long.

    The same matching as `matched_bce` (L2 between binary GT masks and soft predicted masks).
    """
    pred_np = masks.detach().cpu().numpy()
    inst_np = instances.cpu().numpy()
    labels = np.empty(inst_np.shape, dtype=np.int64)
    for i in range(len(inst_np)):
        ids, inverse = np.unique(inst_np[i], return_inverse=True)
        gt = (inverse.reshape(1, -1) == np.arange(len(ids))[:, None]).astype(np.float32)  # (G, P)
        rows, cols = hungarian_match(gt, pred_np[i])
        channel_of = np.empty(len(ids), dtype=np.int64)
        channel_of[rows] = cols
        labels[i] = channel_of[inverse.reshape(-1)]
    return torch.from_numpy(labels)


def feedforward_loss(
    logits: torch.Tensor, instances: torch.Tensor, ce_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slot model's matched mask loss + `ce_weight` x matched cross-entropy.

    `logits`: (B, K, S, S); `instances`: (B, S, S) long ids, 0 = background.
    Returns (total, bce, ce) as scalar tensors.
    """
    b, k = logits.shape[:2]
    masks = logits.softmax(dim=1).flatten(2)  # (B, K, P)
    inst = instances.reshape(b, -1)  # (B, P)
    bce = matched_bce(masks, inst)
    if ce_weight == 0:
        return bce, bce, bce.new_zeros(())
    # Matched again on the same masks: matched_bce does not return its assignment.
    ce = F.cross_entropy(logits.flatten(2), _matched_labels(masks, inst))
    return bce + ce_weight * ce, bce, ce


# --------------------------------------------------------------------------------------------------
# Inference and validation


def predict_segmentation(model: UNetSegmenter, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Argmax segmentation of uint8 images (N, S, S, 3) -> (N, S, S) int64 channel ids in [0, K).

    Runs under `torch.inference_mode()` in batches of `batch`; the model's own mode is left as it is
    (GroupNorm behaves the same in train and eval mode).
    """
    s = model.cfg.resolution
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
        got = f"{type(images).__name__} {getattr(images, 'shape', '')} {getattr(images, 'dtype', '')}"
        raise InvalidInputError(f"images must be a uint8 array of shape (N, {s}, {s}, 3); got {got.strip()}.")
    if batch < 1:
        raise InvalidInputError(f"batch must be >= 1; got {batch}.")
    device = next(model.parameters()).device
    out = np.empty(images.shape[:3], dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            logits = model(to_tensor(images[i : i + batch]).to(device))  # (b, K, S, S)
            out[i : i + batch] = logits.argmax(dim=1).cpu().numpy()
    return out


def validate_feedforward(model: UNetSegmenter, n: int, split: str = "in_dist", seed: int = VAL_SEED) -> float:
    """Mean FG-ARI on `n` scenes of `split` (default: the in_dist validation seed)."""
    images, inst = generate_scenes(split, n, seed=seed, size=model.cfg.resolution)
    seg = predict_segmentation(model, images)
    return float(np.mean([fg_ari(inst[i], seg[i]) for i in range(n)]))


# --------------------------------------------------------------------------------------------------
# Training


def _lr_at(cfg: FeedForwardTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lo = cfg.lr * cfg.lr_final_fraction
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))


def train_feedforward(cfg: FeedForwardTrainConfig, run_dir: Path, progress: bool = True) -> UNetSegmenter:
    """Train (or resume from `run_dir/ckpt.pt`) and return the model in eval mode.

    Data: the slot model's recipe, `generate_scenes("in_dist", batch, seed, size, start=step * batch)`
    at every step. Logs go to `run_dir/log.jsonl` (validation FG-ARI every `eval_every` steps).
    """
    needed = max_objects("in_dist") + 1  # + 1: the background is matched like an object
    if cfg.model.num_slots < needed:
        raise ConfigError(
            f"model.num_slots={cfg.model.num_slots} is too few for in_dist scenes: every ground-truth segment "
            f"(up to {needed}, background included) needs its own channel in the Hungarian loss"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = UNetSegmenter(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt_path = run_dir / "ckpt.pt"
    step, elapsed = checkpoint.resume(ckpt_path, cfg, model, opt)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    s = cfg.model.resolution
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="feedforward", dynamic_ncols=True)
    model.train()
    t_last = time.perf_counter()
    with (run_dir / "log.jsonl").open("a") as logf:
        while step < cfg.steps:
            images, inst = generate_scenes("in_dist", cfg.batch, seed=cfg.seed, size=s, start=step * cfg.batch)
            lr = _lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(to_tensor(images))
            loss, bce, ce = feedforward_loss(logits, torch.from_numpy(inst), cfg.ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            bar.update(1)
            bar.set_postfix(bce=f"{bce.item():.3f}", ce=f"{ce.item():.3f}")
            record: dict[str, Any] = {"step": step, "loss": loss.item(), "bce": bce.item(), "ce": ce.item(), "lr": lr}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record["val_fg_ari"] = validate_feedforward(model, cfg.val_images)
                record["elapsed"] = elapsed
                log.info("step %d: val FG-ARI %.4f", step, record["val_fg_ari"])
                bar.write(f"step {step}: val FG-ARI {record['val_fg_ari']:.4f} ({elapsed:.0f} s)")
            if step % 50 == 0 or "val_fg_ari" in record:
                logf.write(json.dumps(record) + "\n")
                logf.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint.save(ckpt_path, cfg, model, opt, step, elapsed)
                t_last = time.perf_counter()  # checkpoint I/O is not training time
    bar.close()
    model.eval()
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

    Steps done and wall seconds come from `run_dir/ckpt.pt` when given; the card's validation FG-ARI
    is measured here on `val_images` in_dist scenes of seed VAL_SEED.
    """
    if model.cfg != cfg.model:
        raise ValueError(f"model config {model.cfg} differs from the training config's {cfg.model}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "name": cfg.name})
    seconds, steps_done = None, cfg.steps
    if run_dir is not None and (Path(run_dir) / "ckpt.pt").exists():
        ckpt = torch.load(Path(run_dir) / "ckpt.pt", map_location="cpu", weights_only=True)
        seconds, steps_done = float(ckpt["elapsed"]), int(ckpt["step"])
        (folder / "train_log.jsonl").write_bytes((Path(run_dir) / "log.jsonl").read_bytes())
    card = FeedForwardCard(
        name=cfg.name,
        description="Supervised U-Net baseline (no slot bottleneck) with the slot model's data and mask loss.",
        model=cfg.model,
        weights=WeightsSpec(file=WEIGHTS_FILE, sha256=sha256_file(weights)),
        training=FeedForwardProvenance(
            command=command,
            train_config=cfg,
            steps_done=steps_done,
            seed=cfg.seed,
            data=f"tta_runtime.scenes 'in_dist', seed {cfg.seed}, a fresh batch of {cfg.batch} scenes per step "
            f"(indices step*batch..), {steps_done * cfg.batch} scenes in all: the slot model's recipe",
            validation=f"'in_dist' seed {VAL_SEED}, {val_images} scenes",
            seconds=seconds,
            hardware=f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        ),
        metrics={f"val_in_dist_{val_images}_fg_ari": validate_feedforward(model, val_images)},
    )
    (folder / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return folder


def load_feedforward(folder: str | Path) -> UNetSegmenter:
    """Load a folder written by `save_feedforward`, in eval mode on CPU.

    Raises ModelLoadError when the card is missing or invalid, the weights are missing, their sha256
    differs from the card's, or they do not fit the card's architecture.
    """
    folder = Path(folder)
    card_path = folder / CARD_FILE
    try:
        card = FeedForwardCard.model_validate_json(card_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"no {CARD_FILE} in {folder}") from None
    except ValidationError as e:
        raise ModelLoadError(format_validation_error(e, f"feed-forward card {card_path}")) from None
    weights = folder / card.weights.file
    if not weights.is_file():
        raise ModelLoadError(f"weights file {weights} named by {card_path} does not exist")
    digest = sha256_file(weights)
    if digest != card.weights.sha256:
        raise ModelLoadError(
            f"sha256 of {weights} is {digest}, the card says {card.weights.sha256}: the weights were "
            "modified or belong to another card"
        )
    model = UNetSegmenter(card.model)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, KeyError) as e:
        raise ModelLoadError(f"{weights} does not fit the card's architecture {card.model}: {e}") from None
    return model.eval()


def main_train(out_folder: str, run_dir: str, steps: int, command: str | None = None) -> None:
    """Train with the default config for `steps` steps (resuming `run_dir`), then save to `out_folder`."""
    cfg = FeedForwardTrainConfig(steps=steps)
    model = train_feedforward(cfg, Path(run_dir))
    command = command or f"tta-runtime train-feedforward --out {out_folder} --run-dir {run_dir} --steps {steps}"
    save_feedforward(model, cfg, out_folder, command=command, run_dir=run_dir)
    log.info("wrote %s", out_folder)
