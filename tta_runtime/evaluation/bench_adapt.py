"""`tta-runtime bench adapt`: what each fast-adaptation lever buys, alone and together, against the faithful
recipe measured in the same run.

Protocol (what the JSON says it measured):

* quality: the model's own size (the shipped 32x32 model by default), test scenes (`TEST_SEED`; recipes
  were chosen on `VAL_SEED`) of the OOD splits, `n_images` per split. Every configuration adapts every
  image; FG-ARI after the last step against FG-ARI before adaptation, pooled over all images: the gain,
  its paired-bootstrap 95% interval, and the gain as a fraction of the faithful recipe's gain (interval by
  resampling the same images for both).
* configurations (`bench_adapt_configs`): the faithful recipe (`--baseline`, the `slot_tta` recipe); each
  lever of the fast recipe alone; the fast recipe (all levers) and any extra recipes; then the batched path
  (`BatchedAdapter`: `batch_size` images at once, each with its own weights) on the fast recipe,
  optionally with the execution levers one by one and together.
* time and peak memory (`bench_adapt_timing`): seconds per image after one untimed warm-up call, ms per
  step, images per second = 1 / seconds per image, and the ratio to the faithful recipe's seconds per
  image. On CPU one thread (`torch.set_num_threads(1)`).
* optionally (`timing_size`), the same configurations timed on a randomly initialised model of that size
  (the paper's 128x128, 11 slots) on generated scenes of that size: time and memory only, no quality.

The acceptance target of issue #9 is recorded with the verdict: the fast recipe keeps at least
`TARGET_GAIN_FRACTION` of the faithful gain at most `TARGET_TIME_RATIO` of its seconds per image.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.config import AdaptConfig
from tta_runtime.data.scenes import OOD_SPLITS, SPLITS, TEST_SEED, generate_scenes
from tta_runtime.device import resolve_device
from tta_runtime.errors import ConfigError, UnknownNameError
from tta_runtime.evaluation.bench_adapt_configs import (
    EXEC_LEVERS,
    LEVERS,
    BenchConfig,
    build_configs,
)
from tta_runtime.evaluation.bench_adapt_timing import (
    Measured,
    bench_model,
    cpu_peak_memory_mb,
    run_config,
    segmentations,
    timing_image_count,
    timing_section,
)
from tta_runtime.evaluation.common import hardware, interval, one_thread_on_cpu
from tta_runtime.hub import find_model, load_card, load_recipe
from tta_runtime.metrics import fg_ari, paired_bootstrap_ci
from tta_runtime.models.segmenter import images_to_tensor
from tta_runtime.registry import unknown_name_message

__all__ = ["EXEC_LEVERS", "LEVERS", "TARGET_GAIN_FRACTION", "TARGET_TIME_RATIO", "BenchConfig", "bench_adapt", "build_configs"]

log = logging.getLogger(__name__)

TARGET_GAIN_FRACTION = 0.9
TARGET_TIME_RATIO = 0.2


def _ratio_ci(after: np.ndarray, faithful: np.ndarray, before: np.ndarray, seed: int, n_boot: int = 2000) -> list[float] | None:
    """95% percentile interval of gain(after) / gain(faithful), images resampled jointly; None when the
    faithful gain is not positive in half of the resamples (the ratio is then meaningless)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(before), size=(n_boot, len(before)))
    g_a = (after[idx] - before[idx]).mean(1)
    g_f = (faithful[idx] - before[idx]).mean(1)
    ok = g_f > 0
    if ok.mean() < 0.5:
        return None
    r = g_a[ok] / g_f[ok]
    return [round(float(np.quantile(r, 0.025)), 4), round(float(np.quantile(r, 0.975)), 4)]


def bench_adapt(
    model: str | None = None, *, splits: Sequence[str] = OOD_SPLITS, n_images: int = 8, seed: int = TEST_SEED,
    baseline: str = "slot_tta", fast: str = "slot_tta_fast", extra_recipes: Sequence[str] = (), levers: bool = True,
    batch_sizes: Sequence[int] = (8,), exec_levers: Sequence[str] = (), batched_recipes: Sequence[str] | None = None,
    device: str = "cpu", memory: bool = True, timing_size: int | None = None, timing_slots: int = 11,
    timing_images: int = 4, configs: Sequence[str] | None = None, quality: bool = True, compile_backend: str = "inductor",
    checkpoint: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
) -> dict[str, Any]:
    """The `bench adapt` report (see the module docstring). `configs`: only the configurations with
    these names (always with 'faithful', the reference). `quality=False` skips the shipped model's runs
    (with `timing_size`: a timing-only report). `checkpoint(report)` is called with the report so far after
    every configuration (the CLI writes it, so a run cut short keeps what it measured)."""
    for s in splits:
        if s not in SPLITS:
            raise UnknownNameError(unknown_name_message("split", s, list(SPLITS)))
    if n_images < 1:
        raise ConfigError(f"n_images must be >= 1, got {n_images}")
    if any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    dev = resolve_device(device, allowed=("cpu", "cuda"))
    faithful, fast_r = load_recipe(baseline), load_recipe(fast)
    extras = [load_recipe(r) for r in extra_recipes]
    named = {r.name: r for r in (faithful, fast_r, *extras)}
    b_recipes = None
    if batched_recipes is not None:
        b_recipes = [fast_r if r in (fast, fast_r.name) else named.get(r) or load_recipe(r) for r in batched_recipes]
    all_configs = build_configs(faithful, fast_r, extra=extras, levers=levers, batch_sizes=batch_sizes,
                                exec_levers=exec_levers, batched_recipes=b_recipes, compile_backend=compile_backend)
    if configs is not None:
        known = [c.name for c in all_configs]
        for c in configs:
            if c not in known:
                raise UnknownNameError(unknown_name_message("configuration", c, known))
        all_configs = [c for c in all_configs if c.name == "faithful" or c.name in configs]

    folder = find_model(model)
    card = load_card(folder)
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev), "hardware": hardware(dev),
        "model": {"name": card.name, "weights_sha256": card.weights.sha256, "resolution": card.preprocessing.size,
                  "slots": card.segmenter.num_slots if card.segmenter else None},
        "protocol": {"splits": list(splits), "n_images_per_split": n_images, "n_images": n_images * len(splits),
                     "seed": seed, "baseline": faithful.name, "fast": fast_r.name, "extra_recipes": [r.name for r in extras],
                     "warmup": "one untimed call per configuration (2 steps)", "threads": 1 if dev.type == "cpu" else None},
        "target": {"gain_fraction_min": TARGET_GAIN_FRACTION, "time_ratio_max": TARGET_TIME_RATIO},
    }

    def partial(key: str) -> Callable[[dict[str, Any]], None] | None:
        if checkpoint is None:
            return None
        return lambda part: checkpoint({**report, key: part, "complete": False})

    # One bar for the whole call, one step an adapted image; its description names the section and its
    # postfix the configuration.
    total = (len(all_configs) * n_images * len(splits) if quality else 0) + (
        timing_image_count(all_configs, timing_images) if timing_size is not None else 0
    )
    with tqdm(total=total, desc="bench adapt", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        if quality:
            q = _quality_section(
                all_configs, faithful, fast_r, folder, splits=splits, n_images=n_images, seed=seed, device=dev,
                memory=memory, bar=bar, checkpoint=partial("configs"),
            )
            report["target"].update(q.pop("target", {}))
            report.update(q)
        if timing_size is not None:
            bar.set_description(f"timing {timing_size}x{timing_size}")
            report["timing_model"] = timing_section(
                all_configs, size=timing_size, slots=timing_slots, n=timing_images, seed=seed, device=dev,
                memory=memory, bar=bar, checkpoint=partial("timing_model"),
            )
    report["complete"] = True
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _quality_section(
    configs: Sequence[BenchConfig], faithful: AdaptConfig, fast: AdaptConfig, folder: Path, *, splits: Sequence[str],
    n_images: int, seed: int, device: torch.device, memory: bool, bar: tqdm,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every configuration on the model's own test scenes: FG-ARI, gains, time, memory; the target verdict."""
    net, opt_state = bench_model({"kind": "pretrained", "name": str(folder)})
    size = net.cfg.resolution
    data = {s: generate_scenes(s, n_images, seed=seed, size=size) for s in splits}
    images = images_to_tensor(np.concatenate([d[0] for d in data.values()]))
    truth = np.concatenate([d[1] for d in data.values()])
    with one_thread_on_cpu(device), torch.no_grad():
        net = net.to(device)
        seg_before = segmentations(net, net(images.to(device)), size)
    before = np.array([fg_ari(truth[i], seg_before[i]) for i in range(len(truth))])

    results: dict[str, Any] = {}
    after_by: dict[str, np.ndarray] = {}
    seg_by: dict[str, np.ndarray] = {}
    with one_thread_on_cpu(device):
        for cfg in configs:
            m = run_config(cfg, net, images, device=device, training_optimizer_state=opt_state, bar=bar)
            if m.peak_memory_mb is None and memory and device.type == "cpu":
                m.peak_memory_mb = cpu_peak_memory_mb(cfg, {"kind": "pretrained", "name": str(folder)}, images)
            after = np.array([fg_ari(truth[i], m.seg[i]) for i in range(len(truth))])
            after_by[cfg.name], seg_by[cfg.name] = after, m.seg
            results[cfg.name] = _summarise(cfg, faithful, m, after, before, splits, n_images, seed)
            if checkpoint is not None:
                checkpoint(results)
            log.info("%s: gain %+.3f, %.2f s/img", cfg.name, results[cfg.name]["gain"]["mean"], results[cfg.name]["seconds_per_image"])
    f = results["faithful"]
    g_f = f["gain"]["mean"]
    for name, r in results.items():
        r["time_ratio_vs_faithful"] = round(r["seconds_per_image"] / f["seconds_per_image"], 4)
        r["speedup_vs_faithful"] = round(f["seconds_per_image"] / r["seconds_per_image"], 2)
        r["gain_fraction_of_faithful"] = {
            "value": round(r["gain"]["mean"] / g_f, 4) if g_f > 0 else None,
            "ci95": _ratio_ci(after_by[name], after_by["faithful"], before, seed) if g_f > 0 else None,
        }
        r["fg_ari_minus_faithful"] = interval(paired_bootstrap_ci(after_by[name], after_by["faithful"], seed=seed))
    out: dict[str, Any] = {
        "before": {"fg_ari_mean": round(float(before.mean()), 6)},
        "configs": results,
        "batched_vs_loop": _agreement(configs, after_by, seg_by),
    }
    if "fast" in results:
        fr = results["fast"]
        frac = fr["gain_fraction_of_faithful"]["value"]
        target: dict[str, Any] = {"recipe": fast.name, "gain_fraction": frac, "time_ratio": fr["time_ratio_vs_faithful"]}
        if g_f > 0:
            target["met"] = bool(frac >= TARGET_GAIN_FRACTION and fr["time_ratio_vs_faithful"] <= TARGET_TIME_RATIO)
        else:
            target["met"] = None
            target["note"] = "the faithful recipe's gain is not positive on these images: a share of it is undefined"
        out["target"] = target
    return out


def _summarise(
    cfg: BenchConfig, faithful: AdaptConfig, m: Measured, after: np.ndarray, before: np.ndarray,
    splits: Sequence[str], n_images: int, seed: int,
) -> dict[str, Any]:
    sec = float(np.mean(m.seconds))
    return {
        **cfg.describe(faithful),
        "fg_ari_before": round(float(before.mean()), 6),
        "fg_ari_after": round(float(after.mean()), 6),
        "gain": interval(paired_bootstrap_ci(after, before, seed=seed)),
        "gain_per_split": {
            s: round(float((after[k * n_images:(k + 1) * n_images] - before[k * n_images:(k + 1) * n_images]).mean()), 4)
            for k, s in enumerate(splits)
        },
        "seconds_per_image": round(sec, 5),
        "images_per_second": round(1 / sec, 3),
        "ms_per_step": round(float(np.mean(m.ms_per_step)), 3),
        "steps_run_mean": round(float(np.mean(m.steps_run)), 2),
        "warmup_seconds": round(m.warmup_seconds, 3),
        "peak_memory_mb": None if m.peak_memory_mb is None else round(m.peak_memory_mb, 1),
        "per_image_fg_ari": [round(float(x), 6) for x in after],
    }


def _agreement(configs: Sequence[BenchConfig], after_by: dict[str, np.ndarray], seg_by: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each plain batched configuration (no 16-bit autocast) against the one loop with the same recipe."""
    out = {}
    loops = {c.recipe.model_dump_json(): c.name for c in configs if c.runner == "loop"}
    for c in configs:
        if c.runner != "batched" or c.execution is None or c.execution.autocast != "off":
            continue
        ref = loops.get(c.recipe.model_dump_json())
        if ref is None:
            continue
        out[c.name] = {
            "loop": ref,
            "max_abs_fg_ari_diff": round(float(np.abs(after_by[c.name] - after_by[ref]).max()), 6),
            "mean_abs_fg_ari_diff": round(float(np.abs(after_by[c.name] - after_by[ref]).mean()), 6),
            "pixel_agreement": round(float((seg_by[c.name] == seg_by[ref]).mean()), 6),
        }
    return out


