"""Self-supervised pretraining of the U-Net body: masked image modelling, no labels.

Each step takes a batch of unlabelled images, part generated scenes of the training world and part crops of
the photographs scikit-image ships (`tta_runtime.data.textures.photo_background`), hides a random share of
square patches (filled with mid-grey), and trains the body (with a 3-channel head) to paint the hidden
pixels back; the loss is the mean squared error over the hidden pixels only. This is the dense-convolution
form of masked image modelling (a context encoder): SparK's sparse convolutions keep the hidden patches out
of the statistics, which GroupNorm over mostly visible pixels makes less pressing here.

Runs in the shared loop (`tta_runtime.training.loop`): Adam, warm-up + cosine schedule, grad-norm clip,
resumable from `run_dir/ckpt.safetensors`. `write_encoder_folder` writes the encoder model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator
from safetensors.torch import save_file

from tta_runtime.config import WeightsSpec, _Frozen
from tta_runtime.data.scenes import ALL_SPLITS, TRAIN_SEED, VAL_SEED
from tta_runtime.data.textures import photo_background
from tta_runtime.files import atomic_write, writable_path
from tta_runtime.hub import sha256_file
from tta_runtime.models.encoder_folder import EncoderArch, EncoderCard
from tta_runtime.models.segmenter import images_to_tensor
from tta_runtime.models.unet import CARD_FILE, WEIGHTS_FILE
from tta_runtime.models.unet_body import UNetBody
from tta_runtime.training.loop import Optimized, RunFolder, StepOutput, train_loop
from tta_runtime.training.provenance import copy_run, hardware
from tta_runtime.training.scenes_data import load_scenes
from tta_runtime.training.schedule import Schedule

__all__ = ["PretrainConfig", "mim_batch", "pretrain_encoder", "write_encoder_folder"]


class PretrainConfig(_Frozen):
    """Masked-image-modelling pretraining of a U-Net body (`pretrain_encoder`)."""

    name: str = Field("unet-mim-64", pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    model: EncoderArch = EncoderArch()
    train_split: str = Field("flat/in_dist", description="the generated world the scenes come from (their labels unused)")
    photo_fraction: float = Field(0.5, ge=0, le=1, description="share of each batch that is photo crops")
    patch: int = Field(8, ge=1, description="side of a hidden square, pixels (must divide the resolution)")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of the patches hidden")
    steps: int = Field(1000, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    lr_final_fraction: float = Field(0.05, gt=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = TRAIN_SEED
    ckpt_every: int = Field(100, ge=1)
    eval_every: int = Field(250, ge=1)
    val_images: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> PretrainConfig:
        if self.train_split not in ALL_SPLITS:
            raise ValueError(f"train_split {self.train_split!r} is not a split; expected one of {ALL_SPLITS}")
        if self.model.resolution % self.patch:
            raise ValueError(f"patch ({self.patch}) must divide the resolution ({self.model.resolution})")
        return self


def mim_batch(cfg: PretrainConfig, step: int, seed: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s images (B, 3, S, S) in [0, 1] and hidden-pixel mask (B, 1, S, S) in {0, 1}; the same for the
    same (cfg, step, seed). Scenes are indices step * B.. of `cfg.train_split`; photo crops and masks are drawn
    from a generator seeded by (seed, step)."""
    b, s = n or cfg.batch, cfg.model.resolution
    rng = np.random.default_rng([seed, step])
    n_photo = int(round(b * cfg.photo_fraction))
    scenes, _ = load_scenes(cfg.train_split, step * b + np.arange(b - n_photo), seed, s) if b > n_photo else (None, None)
    parts = [] if scenes is None else [images_to_tensor(scenes)]
    if n_photo:
        photos = np.stack([photo_background(rng, s) for _ in range(n_photo)])  # (n, S, S, 3) float32
        parts.append(torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous())
    images = torch.cat(parts)
    g = s // cfg.patch
    hidden = torch.from_numpy(rng.random((b, 1, g, g)) < cfg.mask_ratio).float()
    return images, hidden.repeat_interleave(cfg.patch, 2).repeat_interleave(cfg.patch, 3)


def masked_mse(body: UNetBody, images: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the painted pixels over the hidden ones (grey-filled in the input)."""
    pred = body(images * (1 - hidden) + 0.5 * hidden)
    return ((pred - images) ** 2 * hidden).sum() / (3 * hidden.sum().clamp_min(1))


def validate_encoder(body: UNetBody, cfg: PretrainConfig) -> float:
    """Masked MSE on `cfg.val_images` validation images (seed VAL_SEED, step 0's draw)."""
    images, hidden = mim_batch(cfg, 0, VAL_SEED, cfg.val_images)
    with torch.no_grad():
        return float(masked_mse(body, images, hidden))


def pretrain_encoder(
    cfg: PretrainConfig, run_dir: Path, *, progress: bool = True, time_limit: float | None = None
) -> UNetBody:
    """Pretrain (or resume from `run_dir/ckpt.safetensors`) and return the body in eval mode."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    body = UNetBody(m.resolution, 3, m.base_channels, m.depth)
    opt = torch.optim.Adam(body.parameters(), lr=cfg.lr)

    def step_fn(step: int) -> StepOutput:
        loss = masked_mse(body, *mim_batch(cfg, step, cfg.seed))
        return StepOutput(loss, {"mse": loss.item()})

    train_loop(
        body, step_fn, [Optimized(opt, Schedule(cfg.lr, cfg.steps, cfg.warmup, cfg.lr_final_fraction), cfg.grad_clip)],
        steps=cfg.steps, validate=lambda step: {"val_masked_mse": validate_encoder(body, cfg)},
        eval_every=cfg.eval_every, folder=RunFolder(Path(run_dir), cfg, cfg.ckpt_every), progress=progress,
        desc="pretrain", show=("mse",), time_limit=time_limit,
    )
    return body.eval()


def write_encoder_folder(body: UNetBody, cfg: PretrainConfig, folder: str | Path, *, command: str, run_dir: str | Path) -> Path:
    """Write `folder/weights.safetensors` (the whole body, head included) and `folder/card.json` (+ the log)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    writable_path(weights, "weights file")
    save_file({k: v.detach().cpu().contiguous() for k, v in body.state_dict().items()}, str(weights),
              metadata={"format": "pt", "name": cfg.name})
    seconds, steps_done = copy_run(run_dir, folder)
    photos = int(round(cfg.batch * cfg.photo_fraction))
    card = EncoderCard(
        name=cfg.name,
        description=("U-Net body pretrained by masked image modelling (hidden patches painted back, no labels); "
                     "initialises a segmenter's U-Net encoder (train segmenter --init-encoder)."),
        model=cfg.model,
        weights=WeightsSpec(file=WEIGHTS_FILE, sha256=sha256_file(weights)),
        training={
            "command": command, "config": cfg.model_dump(mode="json"), "steps_done": steps_done, "seconds": seconds,
            "data": (f"per step {cfg.batch - photos} unlabelled scenes of {cfg.train_split!r} (seed {cfg.seed}, indices "
                     f"step*{cfg.batch}..) and {photos} random crops of the scikit-image photographs; "
                     f"{cfg.mask_ratio:.0%} of {cfg.patch}x{cfg.patch} patches hidden"),
            "hardware": hardware(),
        },
        metrics={f"val_masked_mse_{cfg.val_images}": validate_encoder(body, cfg)},
    )
    atomic_write(folder / CARD_FILE, (json.dumps(card.model_dump(mode="json"), indent=2) + "\n").encode(), "encoder card")
    return folder
