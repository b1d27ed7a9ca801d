"""How `bench adapt` measures one configuration: time per image and per step, steps run, peak memory; and
the timing-only section on a randomly initialised model of the paper's size.

* time: wall time of the adaptation and its final prediction (`Adapter.run`, the runtime's one loop; for
  the batched path a batch's time over its size), after one untimed warm-up call (2 steps), whose time
  (compilation included) is `warmup_seconds`; ms per step = loop time over steps run (batched: the
  batch's step time over the batch size).
* peak memory: CUDA, `torch.cuda.max_memory_allocated` above what was allocated before the
  configuration; CPU, the peak resident set (VmHWM) of a fresh process adapting one image (one batch),
  minus its resident set before adapting.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.adapt.batched import BatchedAdapter, ExecutionOptions
from tta_runtime.adapt.loop import Adapter
from tta_runtime.config import AdaptConfig, SegmenterConfig
from tta_runtime.data.scenes import generate_scenes
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.bench_adapt_configs import BenchConfig
from tta_runtime.evaluation.common import one_thread_on_cpu, progress_bar
from tta_runtime.hub import load_optimizer_state
from tta_runtime.models.segmenter import (
    SegmenterOutput,
    SlotSegmenter,
    images_to_tensor,
    segmentation_masks,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def segmentations(model: SlotSegmenter, out: SegmenterOutput, size: int) -> np.ndarray:
    """Predicted segments (n, S, S) int64 of a batch's output (argmax over slots)."""
    return segmentation_masks(model.cfg, out).argmax(1).reshape(-1, size, size).cpu().numpy()


@dataclass
class Measured:
    """What one configuration measured over n images."""

    seg: np.ndarray  # (n, S, S) predicted segments
    seconds: list[float]  # per image
    ms_per_step: list[float]  # per image (batched: the batch's step time over B)
    steps_run: list[int]
    warmup_seconds: float
    peak_memory_mb: float | None = None


def run_config(
    cfg: BenchConfig, model: SlotSegmenter, images: torch.Tensor, *, device: torch.device,
    training_optimizer_state: dict[str, torch.Tensor] | None = None, progress: bool = False, bar: tqdm | None = None,
) -> Measured:
    """Adapt every image with one configuration after one untimed warm-up call; (n, 3, S, S) images.

    `progress`: show a bar over the images; `bar`: advance the caller's bar instead (one step an image).
    """
    model = model.to(device).eval()
    images = images.to(device)
    n, size = images.shape[0], images.shape[-1]
    seg, seconds, ms_step, steps = [], [], [], []
    mem0 = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    with progress_bar(n, cfg.name, enabled=progress, bar=bar, unit="image") as images_bar:
        images_bar.set_postfix_str(cfg.name)
        if cfg.runner == "loop":
            adapter = Adapter(model, cfg.recipe, training_optimizer_state=training_optimizer_state)
            warm = cfg.recipe.model_copy(update={"steps": min(cfg.recipe.steps, 2)})
            t = time.perf_counter()
            adapter.run(images[:1], cfg=warm)
            _sync(device)
            warmup = time.perf_counter() - t
            for i in range(n):
                _sync(device)
                t = time.perf_counter()
                out, rep = adapter.run(images[i : i + 1])
                _sync(device)
                seconds.append(time.perf_counter() - t)
                seg.append(segmentations(model, out, size))
                steps.append(rep.steps_run)
                ms_step.append(1e3 * rep.timings["adapt_s"] / max(rep.steps_run, 1))
                images_bar.update(1)
        else:
            if cfg.execution is None:
                raise ConfigError(f"configuration {cfg.name!r} runs batched but has no execution options")
            b = cfg.execution.batch_size
            adapter = BatchedAdapter(model, cfg.recipe, execution=cfg.execution, training_optimizer_state=training_optimizer_state)
            t = time.perf_counter()
            adapter.warmup(images[:b])  # compiles the step when `compile` is on
            _sync(device)
            warmup = time.perf_counter() - t
            for s in range(0, n, b):
                chunk = images[s : s + b]
                _sync(device)
                t = time.perf_counter()
                out, reps = adapter.run(chunk)
                _sync(device)
                dt = time.perf_counter() - t
                seg.append(segmentations(model, out, size))
                top = max(r.steps_run for r in reps)
                for r in reps:
                    seconds.append(dt / len(chunk))
                    steps.append(r.steps_run)
                    ms_step.append(1e3 * r.timings["adapt_s"] / max(top, 1))  # adapt_s is already per image
                images_bar.update(len(chunk))
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - mem0) / 2**20
    return Measured(np.concatenate(seg), seconds, ms_step, steps, warmup, peak)


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB (Linux /proc; elsewhere peak from getrusage)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def _memory_worker(job: dict[str, Any]) -> float:
    """In a fresh process: adapt one image (one batch) and return the peak resident-set growth in MiB."""
    torch.set_num_threads(1)
    model, opt_state = bench_model(job["model"])
    images = torch.from_numpy(job["images"])
    cfg = BenchConfig(job["name"], AdaptConfig(**job["recipe"]), job["runner"],
                      None if job["execution"] is None else ExecutionOptions(**job["execution"]))
    rss0, _ = _rss_mb()
    run_config(cfg, model, images, device=torch.device("cpu"), training_optimizer_state=opt_state)
    _, peak = _rss_mb()
    return peak - rss0


def cpu_peak_memory_mb(cfg: BenchConfig, model_spec: dict[str, Any], images: torch.Tensor) -> float:
    """Peak resident-set growth (MiB) of a fresh process adapting one image (one batch) with `cfg`."""
    n = cfg.execution.batch_size if cfg.execution is not None else 1
    job = {"name": cfg.name, "recipe": cfg.recipe.model_dump(), "runner": cfg.runner, "model": model_spec,
           "execution": None if cfg.execution is None else cfg.execution.model_dump(), "images": images[:n].numpy()}
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its peak belongs to this configuration only
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return round(pool.submit(_memory_worker, job).result(), 1)


def bench_model(spec: dict[str, Any]) -> tuple[SlotSegmenter, dict[str, torch.Tensor] | None]:
    """The model and its training Adam moments, from {'kind': 'pretrained', 'name': ...} or
    {'kind': 'random', 'segmenter': {...}, 'seed': int} (no moments)."""
    if spec["kind"] == "pretrained":
        from tta_runtime.runtime import Runtime

        rt = Runtime.from_pretrained(spec["name"], load_calibration=False)
        if not isinstance(rt.model, SlotSegmenter):
            raise ConfigError(f"bench adapt needs a slot segmenter; {rt.name} is a {rt.task} model")
        assert rt.folder is not None  # loaded from a folder
        return rt.model, load_optimizer_state(rt.folder, rt.card)
    torch.manual_seed(spec["seed"])
    return SlotSegmenter(SegmenterConfig(**spec["segmenter"])).eval(), None


def timing_image_count(configs: Sequence[BenchConfig], n: int) -> int:
    """How many images `timing_section` adapts in all (for a progress bar's total)."""
    return sum(
        max(c.execution.batch_size, n) if c.runner == "batched" and c.execution is not None else n
        for c in configs if c.recipe.optimizer_state != "training"
    )


def timing_section(
    configs: Sequence[BenchConfig], *, size: int, slots: int, n: int, seed: int, device: torch.device, memory: bool,
    progress: bool = False, bar: tqdm | None = None, checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time and memory of every configuration on a random model of the paper's size (no quality)."""
    seg_cfg = SegmenterConfig(resolution=size, num_slots=slots)  # the paper's widths and depths
    spec = {"kind": "random", "segmenter": seg_cfg.model_dump(), "seed": 0}
    net, _ = bench_model(spec)
    n_max = max([n, *(c.execution.batch_size for c in configs if c.execution is not None)])
    images = images_to_tensor(generate_scenes("textured_background", n_max, seed=seed, size=size)[0])
    rows: dict[str, Any] = {}
    total = timing_image_count(configs, n)
    with one_thread_on_cpu(device), progress_bar(total, f"timing {size}x{size}", enabled=progress, bar=bar) as images_bar:
        for cfg in configs:
            if cfg.recipe.optimizer_state == "training":  # a random model has no training moments
                rows[cfg.name] = {"skipped": "optimizer_state='training' needs a trained model's Adam moments"}
                continue
            k = cfg.execution.batch_size if cfg.execution is not None else n
            m = run_config(cfg, net, images[: max(k, n) if cfg.runner == "batched" else n], device=device, bar=images_bar)
            if m.peak_memory_mb is None and memory and device.type == "cpu":
                m.peak_memory_mb = cpu_peak_memory_mb(cfg, spec, images)
            sec = float(np.mean(m.seconds))
            rows[cfg.name] = {
                "runner": cfg.runner, "levers": cfg.levers, "seconds_per_image": round(sec, 5),
                "images_per_second": round(1 / sec, 3), "ms_per_step": round(float(np.mean(m.ms_per_step)), 3),
                "steps_run_mean": round(float(np.mean(m.steps_run)), 2), "warmup_seconds": round(m.warmup_seconds, 3),
                "peak_memory_mb": None if m.peak_memory_mb is None else round(m.peak_memory_mb, 1),
            }
            if checkpoint is not None:
                checkpoint({"configs": rows})
    f = rows.get("faithful", {}).get("seconds_per_image")
    for r in rows.values():
        if f and "seconds_per_image" in r:
            r["time_ratio_vs_faithful"] = round(r["seconds_per_image"] / f, 4)
    return {"segmenter": seg_cfg.model_dump(), "init": "random (torch.manual_seed(0))", "n_images": n,
            "images": f"textured_background, seed {seed}, {size}x{size}", "configs": rows}
