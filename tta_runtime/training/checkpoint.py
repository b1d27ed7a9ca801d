"""Resumable training checkpoints, shared by every trainer.

A checkpoint holds model and optimizer state, the step, the training seconds so far and the config as
JSON. It is written atomically (a kill mid-write never leaves a broken file) and read with
`weights_only=True`. A run resumes only with the same config, except `steps`, which may change (the lr
schedule then stretches to the new length).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel

from tta_runtime.errors import ConfigError

log = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseModel)


def resume(path: Path, cfg: C, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """Load `path` into `model` and `opt` if it exists; returns (step, elapsed seconds), (0, 0.0) if not."""
    if not path.exists():
        return 0, 0.0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = type(cfg).model_validate_json(ckpt["config"])
    if saved.model_copy(update={"steps": cfg.steps}) != cfg:  # type: ignore[attr-defined]
        raise ConfigError(
            f"{path} was written with another config; use a new run_dir or the same settings "
            "(only --steps may change on resume)"
        )
    if saved.steps != cfg.steps:  # type: ignore[attr-defined]
        log.warning("resuming with steps=%d (was %d): the lr schedule stretches", cfg.steps, saved.steps)  # type: ignore[attr-defined]
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    log.info("resumed from %s at step %d", path, int(ckpt["step"]))
    return int(ckpt["step"]), float(ckpt["elapsed"])


def save(path: Path, cfg: BaseModel, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, elapsed: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
         "config": cfg.model_dump_json()},
        tmp,
    )
    tmp.replace(path)  # atomic rename
