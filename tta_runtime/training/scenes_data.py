"""Which generated scenes a segmenter trains on, and which of them carry segmentation labels.

Shared by the slot trainer and the U-Net trainer so that both see the same scenes and the same labels.

- ``dataset_size`` None: a fresh batch at every step (scene indices ``data_start + step * batch + r``);
  N: a fixed dataset of N scenes (indices ``data_start .. data_start + N - 1``), cycled through in order.
- ``label_fraction`` F: scene offset ``o`` (its index minus ``data_start``) is labelled iff
  ``floor((o + 1) F) > floor(o F)``, an evenly spread, deterministic F of every run of scenes. The slot model
  learns reconstruction on every scene and the mask losses on the labelled ones only (the paper's
  semi-supervised training); a feed-forward model can only learn from the labelled ones, so it cycles
  through them (`labelled_batch_indices`).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from fractions import Fraction
from typing import Any

import numpy as np

from pydantic import Field, field_validator

from tta_runtime.config import _Frozen
from tta_runtime.data.scenes import generate_scene
from tta_runtime.errors import ConfigError

__all__ = ["Prefetcher", "SceneDataConfig", "batch_indices", "is_labelled", "labelled_batch_indices", "load_scenes"]


class SceneDataConfig(_Frozen):
    """The data fields a segmenter's training config shares (the slot model's and the U-Net's)."""

    train_split: str = Field(
        "in_dist", description="the generated family trained on: 'in_dist' (the shapes world) or 'flat/in_dist'"
    )
    dataset_size: int | None = Field(
        None, ge=1, description="a fixed dataset of this many scenes, cycled through (None: fresh scenes every step)"
    )
    label_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the scenes whose segmentation labels the mask losses see; "
        "reconstruction learns from all (the paper's semi-supervised training)",
    )

    @field_validator("train_split")
    @classmethod
    def _known_split(cls, v: str) -> str:
        if v not in ("in_dist", "flat/in_dist"):
            raise ValueError(f"train_split must be 'in_dist' or 'flat/in_dist' (a world's training split), got {v!r}")
        return v


def _fraction(label_fraction: float) -> tuple[int, int]:
    f = Fraction(label_fraction).limit_denominator(10_000)
    return f.numerator, f.denominator


def batch_indices(step: int, batch: int, data_start: int, dataset_size: int | None) -> np.ndarray:
    """The scene indices (batch,) int64 of training step ``step``."""
    offsets = step * batch + np.arange(batch, dtype=np.int64)
    if dataset_size is not None:
        offsets %= dataset_size
    return data_start + offsets


def is_labelled(indices: np.ndarray, data_start: int, label_fraction: float) -> np.ndarray:
    """(n,) bool: which of these scenes carry segmentation labels."""
    p, q = _fraction(label_fraction)
    o = np.asarray(indices, dtype=np.int64) - data_start
    return ((o + 1) * p) // q > (o * p) // q


def labelled_batch_indices(
    step: int, batch: int, data_start: int, dataset_size: int | None, label_fraction: float
) -> np.ndarray:
    """The scene indices (batch,) of step ``step`` for a model that learns from labelled scenes only: the
    labelled scenes of the same dataset, cycled through in order."""
    p, q = _fraction(label_fraction)
    k = step * batch + np.arange(batch, dtype=np.int64)
    if dataset_size is not None:
        n_labelled = dataset_size * p // q
        if n_labelled < 1:
            raise ConfigError(
                f"label_fraction {label_fraction} of dataset_size {dataset_size} labels no scene; raise either"
            )
        k %= n_labelled
    # the k-th labelled offset (from 0) is the smallest o with floor((o + 1) p / q) = k + 1
    return data_start + (-(-(k + 1) * q // p) - 1)


def load_scenes(split: str, indices: np.ndarray, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``indices`` of ``split``: images (n, size, size, 3) uint8 and instances (n, size, size) int64."""
    images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    instances = np.empty((len(indices), size, size), dtype=np.int64)
    for row, index in enumerate(indices):
        scene = generate_scene(split, seed, int(index), size)
        images[row], instances[row] = scene.image, scene.instances
    return images, instances


class Prefetcher:
    """``batches(step)`` is ``fn(step)``; with ``workers`` > 0 the next ``2 x workers`` steps are generated ahead in
    that many spawned processes (``fn`` must pickle: a module-level function or a partial of one). Use it as a
    context manager so the processes end with the run."""

    def __init__(self, fn: Callable[[int], Any], workers: int = 0) -> None:
        if workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: generate batches in the training loop); got {workers}")
        self.fn, self.workers = fn, workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[int, Future[Any]] = {}

    def __enter__(self) -> Prefetcher:
        if self.workers:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, {}

    def __call__(self, step: int) -> Any:
        if self._pool is None:
            return self.fn(step)
        for s in list(self._pending):
            if s < step:  # a step the loop will not ask for again (it moved on or resumed later)
                self._pending.pop(s).cancel()
        for s in range(step, step + 2 * self.workers):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self.fn, s)
        return self._pending.pop(step).result()
