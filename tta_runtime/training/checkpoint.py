"""Resumable training checkpoints in safetensors (no pickle), shared by every trainer.

One file, `<run_dir>/ckpt.safetensors`, holds:

- `model/<name>`: the model's state dict;
- `optimizer.<i>/<key>/<param>`: optimizer i's per-parameter state by the parameter's name in the model
  (Adam: `exp_avg`, `exp_avg_sq` and its 0-d `step`; SGD with momentum: `momentum_buffer`);
- metadata (strings): `format`, `step` (optimizer steps done), `elapsed` (training seconds so far) and
  `config` (the trainer's pydantic config as JSON).

It is written atomically (a kill mid-write never leaves a broken file). A run resumes only with the same
config, except `steps`, which may change (the lr schedule then stretches to the new length).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tta_runtime.errors import ConfigError
from tta_runtime.files import writable_path

log = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseModel)

CKPT_FILE = "ckpt.safetensors"
LOG_FILE = "log.jsonl"
FORMAT = "tta-runtime-train-checkpoint/1"


@dataclass
class Checkpoint:
    """A checkpoint read back: `model` state dict, per optimizer {key: {param name: tensor}}, progress, config."""

    model: dict[str, torch.Tensor]
    optimizers: list[dict[str, dict[str, torch.Tensor]]]
    step: int
    elapsed: float
    config: str


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The model's name of each parameter of `opt`, in the optimizer's order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ConfigError(f"optimizer parameters {missing} are not parameters of the model: cannot name them")
    return [by_id[id(p)] for p in params]


def save_checkpoint(
    path: Path, cfg: BaseModel, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
    step: int, elapsed: float,
) -> None:
    """Write model, optimizer state, `step`, `elapsed` and `cfg` to `path` (atomically)."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, opt in enumerate(optimizers):
        for name, p in zip(_param_names(model, opt), (p for g in opt.param_groups for p in g["params"]), strict=True):
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{i}/{key}/{name}"] = value.detach().cpu().contiguous()
    meta = {"format": FORMAT, "step": str(int(step)), "elapsed": repr(float(elapsed)), "config": cfg.model_dump_json()}
    tmp = path.with_suffix(".tmp")
    writable_path(path, "checkpoint")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic rename


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of checkpoint `path` without reading its tensors; ConfigError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path} is not a readable training checkpoint: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a tta-runtime training checkpoint (metadata format {meta.get('format')!r})")
    return meta


def checkpoint_progress(path: Path) -> tuple[int, float]:
    """(step, elapsed seconds) recorded in checkpoint `path`."""
    meta = read_metadata(path)
    return int(meta["step"]), float(meta["elapsed"])


def load_checkpoint(path: Path) -> Checkpoint:
    """Read checkpoint `path`; ConfigError if it is not one."""
    meta = read_metadata(path)
    flat = load_file(str(path))
    model = {k.removeprefix("model/"): v for k, v in flat.items() if k.startswith("model/")}
    optimizers: list[dict[str, dict[str, torch.Tensor]]] = []
    for k, v in flat.items():
        if not k.startswith("optimizer."):
            continue
        head, key, name = k.split("/", 2)
        i = int(head.removeprefix("optimizer."))
        while len(optimizers) <= i:
            optimizers.append({})
        optimizers[i].setdefault(key, {})[name] = v
    return Checkpoint(model, optimizers, int(meta["step"]), float(meta["elapsed"]), meta["config"])


def load_optimizer_state(
    opt: torch.optim.Optimizer, model: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Load per-parameter `state` ({key: {param name: tensor}}) into `opt`, built over `model`'s parameters."""
    sd = opt.state_dict()
    sd["state"] = {}
    for idx, name in enumerate(_param_names(model, opt)):
        entry = {key: by_name[name] for key, by_name in state.items() if name in by_name}
        if entry:
            sd["state"][idx] = entry
    opt.load_state_dict(sd)


def resume_checkpoint(
    path: Path, cfg: C, model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[int, float]:
    """Load `path` into `model` and `optimizers` if it exists; returns (step, elapsed seconds), (0, 0.0) if not."""
    if not path.exists():
        return 0, 0.0
    ckpt = load_checkpoint(path)
    saved = type(cfg).model_validate_json(ckpt.config)
    if saved.model_copy(update={"steps": cfg.steps}) != cfg:  # type: ignore[attr-defined]
        raise ConfigError(
            f"{path} was written with another config; use a new run_dir or the same settings "
            "(only --steps may change on resume)"
        )
    if saved.steps != cfg.steps:  # type: ignore[attr-defined]
        log.warning("resuming with steps=%d (was %d): the lr schedule stretches", cfg.steps, saved.steps)  # type: ignore[attr-defined]
    if len(ckpt.optimizers) > len(optimizers):
        raise ConfigError(f"{path} holds {len(ckpt.optimizers)} optimizers' state; this trainer has {len(optimizers)}")
    model.load_state_dict(ckpt.model)
    for opt, state in zip(optimizers, ckpt.optimizers):
        load_optimizer_state(opt, model, state)
    log.info("resumed from %s at step %d", path, ckpt.step)
    return ckpt.step, ckpt.elapsed


def adam_moments(path: Path, optimizer: int = 0) -> dict[str, torch.Tensor]:
    """Optimizer `optimizer`'s Adam moments in checkpoint `path` as a model folder ships them
    ('exp_avg/<param>', 'exp_avg_sq/<param>', 'step': (1,) float)."""
    state = load_checkpoint(path).optimizers[optimizer]
    tensors = {f"{key}/{name}": v for key in ("exp_avg", "exp_avg_sq") for name, v in state[key].items()}
    tensors["step"] = torch.tensor([float(next(iter(state["step"].values())))])
    return tensors
