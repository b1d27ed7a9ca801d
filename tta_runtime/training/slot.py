"""Semi-supervised training of the slot segmenter on generated in-distribution scenes.

Loss (Slot-TTA): reconstruction MSE + mask_weight x class-balanced BCE between the predicted masks and
the ground-truth instance masks, matched one-to-one by the Hungarian algorithm (background counts as one
object; ground truth is padded with empty masks to K so every slot gets a target).

What we change from the paper so that it trains on two CPU cores (all recorded in the model card):
small images and fewer slots, a narrower encoder, decoding a random subset of pixels per step, and a
mask-loss weight that starts high and decays (with the paper's 0.01 a single slot learns to paint the
whole scene before the mask loss can separate objects).

Training is resumable: a checkpoint (model, optimizer, step) is written every `ckpt_every` steps and
picked up by the next run with the same `run_dir`.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tta_runtime.config import ModelCard, OODStats, Preprocessing, SegmenterConfig, WeightsSpec, _Frozen
from tta_runtime.training import checkpoint
from tta_runtime.errors import ConfigError
from tta_runtime.hub import sha256_file
from tta_runtime.metrics import fg_ari, hungarian_match
from tta_runtime.data.scenes import TRAIN_SEED, VAL_SEED, generate_scenes, max_objects
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter, reconstruction_loss, segmentation_masks
from tta_runtime.models.segmenter import images_to_tensor as to_tensor

log = logging.getLogger(__name__)



class TrainConfig(_Frozen):
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
    pixel_fraction: float = Field(0.25, gt=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = TRAIN_SEED
    init_from: str | None = Field(
        None, description="start from these weights (a training checkpoint ckpt.pt or a model folder) with a fresh "
        "optimizer and this config's schedule: a fine-tuning stage"
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


def matched_attention_loss(out: SegmenterOutput, instances: np.ndarray) -> torch.Tensor:
    """The matched mask loss on the slot-attention maps (every pixel): `instances` (B, S, S) ids."""
    return matched_bce(out.attention, torch.from_numpy(instances.reshape(len(instances), -1)))


def matched_bce(masks: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE between soft masks (B, K, P) and instance ids (B, P), matched by the Hungarian
    algorithm on L2 distance; ground truth is padded with empty masks so every slot gets a target."""
    b, k, p = masks.shape
    target = torch.zeros_like(masks)
    with torch.no_grad():
        pred_np = masks.detach().cpu().numpy()
        inst_np = instances.cpu().numpy()
        for i in range(b):
            ids = np.unique(inst_np[i])
            gt = (inst_np[i][None, :] == ids[:, None]).astype(np.float32)  # (G, P)
            rows, cols = hungarian_match(gt, pred_np[i])
            target[i, torch.as_tensor(cols)] = torch.as_tensor(gt[rows])
    n_pos = target.sum()
    pos_weight = (target.numel() - n_pos) / n_pos.clamp(min=1.0)
    m = masks.clamp(1e-6, 1 - 1e-6)
    bce = -(pos_weight * target * m.log() + (1 - target) * (1 - m).log())
    return bce.mean()


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lo = cfg.lr * cfg.lr_final_fraction
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))


def _mask_weight_at(cfg: TrainConfig, step: int) -> float:
    t = min(1.0, step / max(1, cfg.steps))
    return cfg.mask_weight + t * (cfg.mask_weight_final - cfg.mask_weight)


@torch.no_grad()
def predict_batches(model: SlotSegmenter, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, K, S*S) and per-image reconstruction MSE (N,) for uint8 images (N, S, S, 3)."""
    masks, mses = [], []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch])
        out = model(x)
        masks.append(segmentation_masks(model.cfg, out).numpy())
        target = x.flatten(2).transpose(1, 2)
        mses.append(((out.reconstruction - target) ** 2).mean(dim=(1, 2)).numpy())
    return np.concatenate(masks), np.concatenate(mses)


def validate_model(model: SlotSegmenter, n: int, split: str = "in_dist", seed: int = VAL_SEED) -> dict[str, float]:
    """FG-ARI and reconstruction MSE on `n` validation scenes (a seed the test splits never use)."""
    s = model.cfg.resolution
    images, inst = generate_scenes(split, n, seed=seed, size=s)
    masks, mses = predict_batches(model, images)
    seg = masks.argmax(1).reshape(n, s, s)
    scores = [fg_ari(inst[i], seg[i]) for i in range(n)]
    usage = np.bincount(seg.reshape(-1), minlength=masks.shape[1]) / seg.size
    return {
        "fg_ari": float(np.mean(scores)),
        "recon_mse": float(np.mean(mses)),
        "recon_mse_std": float(np.std(mses)),
        "max_slot_share": float(usage.max()),
    }


def train(cfg: TrainConfig, run_dir: Path, *, progress: bool = True, stop_at: int | None = None) -> SlotSegmenter:
    """Train (or resume) and return the model. Logs go to `run_dir/log.jsonl`.

    `stop_at`: stop after this step (checkpointed) although the schedule runs to `cfg.steps`; a later call
    resumes from there. How a run cut short by a session's end is replayed exactly."""
    if stop_at is not None and not 1 <= stop_at <= cfg.steps:
        raise ConfigError(f"stop_at must be in 1..steps ({cfg.steps}); got {stop_at}")
    needed = max_objects("in_dist") + 1  # every object plus the background needs its own slot
    if cfg.segmenter.num_slots < needed:
        raise ConfigError(
            f"num_slots={cfg.segmenter.num_slots} is too few: training scenes hold up to {needed - 1} objects plus "
            f"the background; use --slots {needed} or more"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = SlotSegmenter(cfg.segmenter)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt_path = run_dir / "ckpt.pt"
    step, elapsed = checkpoint.resume(ckpt_path, cfg, model, opt)
    if step == 0 and cfg.init_from is not None:
        model.load_state_dict(_initial_weights(cfg.init_from), strict=True)
        log.info("initialised from %s", cfg.init_from)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    s = cfg.segmenter.resolution
    n_pix = s * s
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    logf = (run_dir / "log.jsonl").open("a")
    model.train()
    t_last = time.perf_counter()
    end = cfg.steps if stop_at is None else stop_at
    while step < end:
        images, inst = generate_scenes("in_dist", cfg.batch, seed=cfg.seed, size=s, start=cfg.data_start + step * cfg.batch)
        x = to_tensor(images)
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # resumable: the pixel subset depends on the step only
        idx = None
        if cfg.pixel_fraction < 1:
            idx = torch.randperm(n_pix, generator=gen)[: max(1, int(n_pix * cfg.pixel_fraction))]
        inst_t = torch.from_numpy(inst.reshape(cfg.batch, -1))
        if idx is not None:
            inst_t = inst_t[:, idx]
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        out = model(x, idx)
        rec = reconstruction_loss(out, x, idx)
        mw = _mask_weight_at(cfg, step)
        mask = matched_mask_loss(out, inst_t)
        loss = rec + mw * mask
        if cfg.attn_weight > 0:
            # Supervise the binding itself: the attention maps (all pixels) get the same matched loss.
            loss = loss + cfg.attn_weight * mw * matched_attention_loss(out, inst)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}", mask=f"{mask.item():.3f}")
        record: dict[str, Any] = {"step": step, "rec": rec.item(), "mask": mask.item(), "lr": _lr_at(cfg, step - 1)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            record["val"] = validate_model(model, cfg.val_images)
            model.train()
            log.info("step %d: %s", step, record["val"])
            bar.write(f"step {step}: val {record['val']}")
        if step % 50 == 0 or "val" in record:
            logf.write(json.dumps(record) + "\n")
            logf.flush()
        if step % cfg.ckpt_every == 0 or step in (cfg.steps, end):
            checkpoint.save(ckpt_path, cfg, model, opt, step, elapsed)
    bar.close()
    logf.close()
    model.eval()
    return model


def _initial_weights(source: str) -> dict[str, torch.Tensor]:
    """The model state dict in a training checkpoint (ckpt.pt, read with weights_only=True) or a model folder."""
    path = Path(source)
    if path.is_file() and path.suffix == ".pt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several kinds for a file that is not a checkpoint
            raise ConfigError(f"init_from {path} is not a readable training checkpoint: {type(e).__name__}: {e}") from None
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise ConfigError(f"init_from {path} holds no 'model' state dict (expected a tta-runtime train checkpoint)")
        return ckpt["model"]
    from tta_runtime.hub import find_model, load_card, load_weights

    folder = find_model(source)
    return load_weights(folder, load_card(folder))


def _save_adam_moments(model: SlotSegmenter, ckpt_path: Path, out: Path) -> WeightsSpec:
    """Adam's moments at the end of training, by parameter name, for optimizer_state='training' recipes."""
    opt_state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["optimizer"]
    names = [n for n, _ in model.named_parameters()]  # the optimizer was built from model.parameters()
    ids = opt_state["param_groups"][0]["params"]
    tensors: dict[str, torch.Tensor] = {}
    step = 0.0
    for name, pid in zip(names, ids, strict=True):
        st = opt_state["state"][pid]
        tensors[f"exp_avg/{name}"] = st["exp_avg"].contiguous()
        tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].contiguous()
        step = float(st["step"])
    tensors["step"] = torch.tensor([step])
    save_file(tensors, str(out))
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
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "name": cfg.name})
    opt_spec = None
    if run_dir is not None and (run_dir / "ckpt.pt").exists():
        opt_spec = _save_adam_moments(model, run_dir / "ckpt.pt", out_dir / "adam_state.safetensors")
    model.eval()
    val = validate_model(model, 256)
    elapsed, steps_done = None, cfg.steps
    if run_dir is not None and (run_dir / "ckpt.pt").exists():
        ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
        elapsed, steps_done = float(ckpt["elapsed"]), int(ckpt["step"])
        (out_dir / "train_log.jsonl").write_bytes((run_dir / "log.jsonl").read_bytes())
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
            "data": f"tta_runtime.scenes 'in_dist', seed {cfg.seed}, a fresh batch of {cfg.batch} scenes per step "
            f"(indices step*batch..), {steps_done * cfg.batch} scenes in all",
            "validation": f"'in_dist' seed {VAL_SEED}",
            "steps_done": steps_done,
            "seconds": elapsed,
            "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "changes_from_paper": [
                f"{cfg.segmenter.resolution}x{cfg.segmenter.resolution} images, {cfg.segmenter.num_slots} slots "
                "(paper 128x128, 11)",
                f"encoder {cfg.segmenter.encoder_channels} channels (paper 64)",
                f"decoder input: raw coordinates + {cfg.segmenter.decoder_fourier_bands} sin/cos frequency bands "
                "(paper: raw coordinates only)",
                f"decodes {cfg.pixel_fraction:.0%} of pixels per step (random subset)",
                f"mask-loss weight {cfg.mask_weight} decaying linearly to {cfg.mask_weight_final} (paper 0.01)",
                *(
                    [f"the matched mask loss also on the slot-attention maps, weight {cfg.attn_weight} x mask weight"]
                    if cfg.attn_weight > 0 else []
                ),
                f"Adam lr {cfg.lr} with {cfg.warmup} warm-up steps, cosine decay to {cfg.lr_final_fraction}x; "
                f"grad-norm clip {cfg.grad_clip}; batch {cfg.batch}",
            ],
        },
        metrics={"val_in_dist_256": val},
    )
    (out_dir / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return out_dir
