"""The one training loop (`train_loop`): the slot segmenter, the U-Net baseline, the classifiers and FTWT.

A trainer supplies only what is its own:

- `step_fn(step) -> StepOutput`: build batch `step` (0-based), run the model, return the loss and the numbers
  to log (floats, averaged over each logging window, weighted by `StepOutput.weight`, e.g. the batch size);
- its optimizers, each an `Optimized`: the torch optimizer, its `Schedule` (None: the lr stays as built), a
  grad-norm clip over its parameters (None: no clip) and `active(step)` (False: that step leaves it alone);
- `validate(step) -> dict`, run with the model in eval() every `eval_every` steps and at the last step.

The loop owns the rest: the lr of every optimizer, zero_grad / backward / clip / step under `enable_grad`,
the log records (the window means plus `step`, the first optimizer's `lr`, `seconds` and what `validate`
returned), and, with a `RunFolder`, resume from and a checkpoint every `ckpt_every` steps to
`ckpt.safetensors`, `config.json` and the records appended to `log.jsonl`. With `progress`, one tqdm bar.
`elapsed` counts the seconds of steps and validation, not checkpoint writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from tta_runtime.errors import ConfigError
from tta_runtime.files import atomic_write
from tta_runtime.training.checkpoint import (
    CKPT_FILE,
    LOG_FILE,
    resume_checkpoint,
    save_checkpoint,
)
from tta_runtime.training.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One step: the scalar `loss` to minimise, the numbers to log, and their weight in the window means."""

    loss: torch.Tensor
    metrics: dict[str, float]
    weight: float = 1.0


@dataclass
class Optimized:
    """An optimizer and how the loop drives it."""

    optimizer: torch.optim.Optimizer
    schedule: Schedule | None = None
    clip: float | None = None
    active: Callable[[int], bool] | None = None

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


@dataclass(frozen=True)
class RunFolder:
    """A resumable run: `path` gets ckpt.safetensors, config.json and log.jsonl. `config` must have `steps`."""

    path: Path
    config: BaseModel
    ckpt_every: int

    @property
    def ckpt(self) -> Path:
        return self.path / CKPT_FILE


@dataclass
class LoopResult:
    """`step`: steps done (resumed ones included); `elapsed`: training seconds (resumed runs included);
    `records`: the log records of this call, one per logging window."""

    step: int
    elapsed: float
    records: list[dict[str, Any]] = field(default_factory=list)


class Shuffled:
    """Epoch-style batches over `n` examples: step s takes batch s % steps_per_epoch of a permutation drawn
    from `rng` at the first step of each epoch (the last batch of an epoch may be short)."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator) -> None:
        self.n, self.batch, self.rng = n, batch, rng
        self.steps_per_epoch = -(-n // batch)
        self._perm = np.arange(n)

    def __call__(self, step: int) -> np.ndarray:
        i = step % self.steps_per_epoch
        if i == 0:
            self._perm = self.rng.permutation(self.n)
        return self._perm[i * self.batch : (i + 1) * self.batch]


def train_loop(
    model: torch.nn.Module,
    step_fn: Callable[[int], StepOutput],
    optimizers: Sequence[Optimized],
    *,
    steps: int,
    stop_at: int | None = None,
    log_every: int = 50,
    validate: Callable[[int], dict[str, Any]] | None = None,
    eval_every: int | None = None,
    folder: RunFolder | None = None,
    init: Callable[[], None] | None = None,
    progress: bool = False,
    desc: str = "train",
    show: Sequence[str] = (),
    time_limit: float | None = None,
) -> LoopResult:
    """Train `model` for steps [start, stop_at or steps) and return it in eval().

    `start` is 0, or the checkpoint's step when `folder` holds one. `init`: called once before the first step
    of a run that did not resume (e.g. loading initial weights). `show`: metric names for the bar's postfix.
    `time_limit`: stop (checkpointed) after the step that brings this call's wall time past this many seconds,
    as `stop_at` would; a later call resumes there.
    """
    end = steps if stop_at is None else stop_at
    if not 1 <= end <= steps:
        raise ConfigError(f"stop_at must be in 1..steps ({steps}); got {stop_at}")
    start, elapsed = 0, 0.0
    logf = None
    if folder is not None:
        folder.path.mkdir(parents=True, exist_ok=True)
        start, elapsed = resume_checkpoint(folder.ckpt, folder.config, model, [o.optimizer for o in optimizers])
        atomic_write(folder.path / "config.json", folder.config.model_dump_json(indent=2).encode(), "run config")
        logf = (folder.path / LOG_FILE).open("a")
    if start == 0 and init is not None:
        init()
    records: list[dict[str, Any]] = []
    sums: dict[str, float] = {}
    total_weight = 0.0
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=desc, dynamic_ncols=True)
    model.train()
    started = time.perf_counter()
    done = start
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            for o in optimizers:
                if o.schedule is not None:
                    for g in o.optimizer.param_groups:
                        g["lr"] = o.schedule(step)
            with torch.enable_grad():
                out = step_fn(step)
                for o in optimizers:
                    o.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
            for o in optimizers:
                if o.active is None or o.active(step):
                    if o.clip is not None:
                        torch.nn.utils.clip_grad_norm_(o.params(), o.clip)
                    o.optimizer.step()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * out.weight
            total_weight += out.weight
            done = step + 1
            record: dict[str, Any] = {}
            if validate is not None and (done % (eval_every or steps) == 0 or done == steps):
                model.eval()
                record.update(validate(done))
                model.train()
                log.info("%s step %d: %s", desc, done, record)
            elapsed += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix({k: f"{out.metrics[k]:.4g}" for k in show})
            if done % log_every == 0 or done == steps or record:
                means = {k: v / total_weight for k, v in sums.items()}
                lr = optimizers[0].optimizer.param_groups[0]["lr"] if optimizers else None
                record = {"step": done, **means, "lr": lr, "seconds": elapsed, **record}
                records.append(record)
                sums, total_weight = {}, 0.0
                if logf is not None:
                    logf.write(json.dumps(record) + "\n")
                    logf.flush()
            out_of_time = time_limit is not None and time.perf_counter() - started > time_limit
            if folder is not None and (done % folder.ckpt_every == 0 or done in (steps, end) or out_of_time):
                save_checkpoint(folder.ckpt, folder.config, model, [o.optimizer for o in optimizers], done, elapsed)
            if out_of_time:
                log.info("%s: time limit of %.0f s reached at step %d; re-run to resume", desc, time_limit, done)
                break
    finally:
        bar.close()
        if logf is not None:
            logf.close()
    model.eval()
    return LoopResult(done, elapsed, records)
