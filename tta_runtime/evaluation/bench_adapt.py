"""`tta-runtime bench adapt`: what each fast-adaptation lever buys, alone and together, against the faithful
recipe measured in the same run.

Protocol (what the JSON says it measured):

* quality: the model's own size (the shipped 32x32 model by default), test scenes (seed 2026; recipes
  were chosen on seed 1000) of the OOD splits, `n_images` per split. Every configuration adapts every
  image; FG-ARI after the last step against FG-ARI before adaptation, pooled over all images: the gain,
  its paired-bootstrap 95% interval, and the gain as a fraction of the faithful recipe's gain (interval by
  resampling the same images for both).
* configurations: the faithful recipe (`--baseline`, adapters/slot_tta.toml); each lever of the fast recipe
  alone (the faithful recipe with only that lever's fields taken from the fast one: encoder frozen, pixel
  subsets, schedule, early stop, Adam state, time budget); the fast recipe (all levers) and any extra
  recipes; then the batched path (`batched_adapt`: `batch_size` images at once, each with its own
  weights) on the fast recipe, optionally with the execution levers (torch.compile, CUDA graphs, bf16
  autocast, fused Adam) one by one and together.
* time: seconds per image = wall time of the adaptation and its final prediction (`Adapter.run`, the
  runtime's one loop; for the batched path a batch's time over its size), after one untimed warm-up call
  (2 steps) per configuration, whose time (compilation included) is `warmup_seconds`; ms per step = loop
  time over steps run (batched: per image, i.e. the batch's step time over the batch size); images per
  second = 1 / seconds per image; the ratio to the faithful recipe's seconds per image. On CPU one thread
  (`torch.set_num_threads(1)`).
* peak memory: CUDA, `torch.cuda.max_memory_allocated` above what was allocated before the
  configuration; CPU, the peak resident set (VmHWM) of a fresh process adapting one image (one batch),
  minus its resident set before adapting.
* optionally (`timing_size`), the same configurations timed on a randomly initialised model of that size
  (the paper's 128x128, 11 slots) on generated scenes of that size: time and memory only, no quality.

The acceptance target of issue #9 is recorded with the verdict: the fast recipe keeps >= 90% of the
faithful gain at <= 1/5 of its seconds per image.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.adapt.batched import BatchedAdapter, ExecutionOptions
from tta_runtime.config import AdaptConfig, SegmenterConfig
from tta_runtime.errors import ConfigError, UnknownNameError
from tta_runtime.evaluation.segmentation import _one_thread
from tta_runtime.hub import find_model, load_card, load_optimizer_state, load_recipe
from tta_runtime.metrics import fg_ari, paired_bootstrap_ci
from tta_runtime.registry import unknown_name_message
from tta_runtime.data.scenes import OOD_SPLITS, SPLITS, TEST_SEED, generate_scenes
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter, images_to_tensor, segmentation_masks

log = logging.getLogger(__name__)

TARGET_GAIN_FRACTION = 0.9
TARGET_TIME_RATIO = 0.2

# Recipe fields that make up each lever; "alone" = the faithful recipe with these fields from the fast one.
LEVERS: dict[str, tuple[str, ...]] = {
    "frozen_encoder": ("params",),
    "pixel_subset": ("pixel_fraction",),
    "schedule": ("lr", "steps", "lr_schedule", "warmup_steps", "lr_final_fraction"),
    "early_stop": ("early_stop_patience", "early_stop_min_delta"),
    "adam_state": ("optimizer_state",),
    "time_budget": ("time_budget_ms",),
}
EXEC_LEVERS: dict[str, dict[str, Any]] = {
    "compile": {"compile": "default"},
    "graphs": {"compile": "reduce-overhead"},  # torch.compile + CUDA graphs
    "bf16": {"autocast": "bf16"},
    "fused": {"adam": "fused"},
    "async": {"sync_every": 100_000},  # the host reads losses and the guard back once, after the last step
}


@dataclass
class BenchConfig:
    """One measured configuration: a recipe and how it runs ('loop': the runtime's one loop, one image at a
    time; 'batched': `BatchedAdapter` with `execution`)."""

    name: str
    recipe: AdaptConfig
    runner: str = "loop"
    execution: ExecutionOptions | None = None
    levers: list[str] = field(default_factory=list)

    def describe(self, faithful: AdaptConfig) -> dict[str, Any]:
        base, mine = faithful.model_dump(), self.recipe.model_dump()
        return {
            "runner": self.runner, "levers": self.levers, "recipe": self.recipe.name,
            "recipe_changes_vs_faithful": {k: v for k, v in mine.items() if base[k] != v and k not in ("name", "description")},
            "execution": None if self.execution is None else self.execution.model_dump(),
        }


def lever_configs(faithful: AdaptConfig, fast: AdaptConfig) -> list[BenchConfig]:
    """Each lever of `fast` alone on top of `faithful` (only the levers where the two recipes differ)."""
    out = []
    for lever, fields in LEVERS.items():
        changes = {f: getattr(fast, f) for f in fields if getattr(fast, f) != getattr(faithful, f)}
        if changes:
            recipe = faithful.model_copy(update={**changes, "name": f"{faithful.name}+{lever}"})
            out.append(BenchConfig(f"lever:{lever}", AdaptConfig.model_validate(recipe.model_dump()), levers=[lever]))
    return out


def fast_levers(faithful: AdaptConfig, fast: AdaptConfig) -> list[str]:
    return [lv for lv, fields in LEVERS.items() if any(getattr(fast, f) != getattr(faithful, f) for f in fields)]


def build_configs(
    faithful: AdaptConfig, fast: AdaptConfig, *, extra: Sequence[AdaptConfig] = (), levers: bool = True,
    batch_sizes: Sequence[int] = (8,), exec_levers: Sequence[str] = (), batched_recipes: Sequence[AdaptConfig] | None = None,
    compile_backend: str = "inductor",
) -> list[BenchConfig]:
    """The default set: faithful, each lever alone, fast (and extras), then the batched path."""
    unknown = [e for e in exec_levers if e not in EXEC_LEVERS]
    if unknown:
        raise UnknownNameError(unknown_name_message("execution lever", unknown[0], list(EXEC_LEVERS)))
    configs = [BenchConfig("faithful", faithful)]
    if levers:
        configs += lever_configs(faithful, fast)
    configs.append(BenchConfig("fast", fast, levers=fast_levers(faithful, fast)))
    for r in extra:
        configs.append(BenchConfig(r.name, r, levers=fast_levers(faithful, r)))
    for recipe in (fast,) if batched_recipes is None else batched_recipes:
        label = "fast" if recipe is fast else recipe.name
        base_levers = fast_levers(faithful, recipe)
        for b in batch_sizes:
            variants: list[tuple[str, dict[str, Any], list[str]]] = [("", {}, [])]
            variants += [(f"+{e}", EXEC_LEVERS[e], [e]) for e in exec_levers]
            together = [e for e in exec_levers if not (e == "compile" and "graphs" in exec_levers)]  # graphs compiles
            if len(together) > 1:  # all together
                merged: dict[str, Any] = {}
                for e in together:
                    merged.update(EXEC_LEVERS[e])
                variants.append(("+" + "+".join(together), merged, together))
                if "async" in together and len(together) > 2:  # and all but async, for the ratio in one process
                    rest = [e for e in together if e != "async"]
                    merged_rest: dict[str, Any] = {}
                    for e in rest:
                        merged_rest.update(EXEC_LEVERS[e])
                    variants.append(("+" + "+".join(rest), merged_rest, rest))
            for suffix, opts, names in variants:
                ex = ExecutionOptions(batch_size=b, compile_backend=compile_backend, **opts)
                configs.append(BenchConfig(f"{label}:batched{b}{suffix}", recipe, "batched", ex, [*base_levers, "vmap", *names]))
    names_seen = [c.name for c in configs]
    twice = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if twice:
        raise ConfigError(f"configurations named twice: {twice} (an extra recipe repeats the fast one, or a batch size is repeated)")
    return configs


# -- measuring -------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    from tta_runtime.device import resolve_device

    return resolve_device(name, allowed=("cpu", "cuda"))


def _threads(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """One thread on CPU, as `eval` (numbers independent of the core count); the GPU as it is."""
    return _one_thread() if device.type == "cpu" else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _segmentations(model: SlotSegmenter, out: SegmenterOutput, size: int) -> np.ndarray:
    return segmentation_masks(model.cfg, out).argmax(1).reshape(-1, size, size).cpu().numpy()


@dataclass
class _Measured:
    seg: np.ndarray  # (n, S, S) predicted segments
    seconds: list[float]  # per image
    ms_per_step: list[float]  # per image (batched: the batch's step time over B)
    steps_run: list[int]
    warmup_seconds: float
    peak_memory_mb: float | None = None


def run_config(
    cfg: BenchConfig, model: SlotSegmenter, images: torch.Tensor, *, device: torch.device,
    training_optimizer_state: dict[str, torch.Tensor] | None = None, progress: bool = False,
) -> _Measured:
    """Adapt every image with one configuration after one untimed warm-up call; (n, 3, S, S) images."""
    from tta_runtime.adapt.loop import Adapter

    model = model.to(device).eval()
    images = images.to(device)
    n, size = images.shape[0], images.shape[-1]
    seg, seconds, ms_step, steps = [], [], [], []
    mem0 = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    if cfg.runner == "loop":
        adapter = Adapter(model, cfg.recipe, training_optimizer_state=training_optimizer_state)
        warm = cfg.recipe.model_copy(update={"steps": min(cfg.recipe.steps, 2)})
        t = time.perf_counter()
        adapter.run(images[:1], cfg=warm)
        _sync(device)
        warmup = time.perf_counter() - t
        for i in tqdm(range(n), desc=cfg.name, disable=not progress, leave=False):
            _sync(device)
            t = time.perf_counter()
            out, rep = adapter.run(images[i : i + 1])
            _sync(device)
            seconds.append(time.perf_counter() - t)
            seg.append(_segmentations(model, out, size))
            steps.append(rep.steps_run)
            ms_step.append(1e3 * rep.timings["adapt_s"] / max(rep.steps_run, 1))
    else:
        assert cfg.execution is not None
        b = cfg.execution.batch_size
        adapter = BatchedAdapter(model, cfg.recipe, execution=cfg.execution, training_optimizer_state=training_optimizer_state)
        t = time.perf_counter()
        adapter.warmup(images[:b])  # compiles the step when `compile` is on
        _sync(device)
        warmup = time.perf_counter() - t
        for s in tqdm(range(0, n, b), desc=cfg.name, disable=not progress, leave=False):
            chunk = images[s : s + b]
            _sync(device)
            t = time.perf_counter()
            out, reps = adapter.run(chunk)
            _sync(device)
            dt = time.perf_counter() - t
            seg.append(_segmentations(model, out, size))
            top = max(r.steps_run for r in reps)
            for r in reps:
                seconds.append(dt / len(chunk))
                steps.append(r.steps_run)
                ms_step.append(1e3 * r.timings["adapt_s"] / max(top, 1))  # adapt_s is already per image
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - mem0) / 2**20
    return _Measured(np.concatenate(seg), seconds, ms_step, steps, warmup, peak)


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
    model, opt_state = _build_model(job["model"])
    images = torch.from_numpy(job["images"])
    cfg = BenchConfig(job["name"], AdaptConfig(**job["recipe"]), job["runner"],
                      None if job["execution"] is None else ExecutionOptions(**job["execution"]))
    rss0, _ = _rss_mb()
    run_config(cfg, model, images, device=torch.device("cpu"), training_optimizer_state=opt_state)
    _, peak = _rss_mb()
    return peak - rss0


def cpu_peak_memory_mb(cfg: BenchConfig, model_spec: dict[str, Any], images: torch.Tensor) -> float:
    n = cfg.execution.batch_size if cfg.execution is not None else 1
    job = {"name": cfg.name, "recipe": cfg.recipe.model_dump(), "runner": cfg.runner, "model": model_spec,
           "execution": None if cfg.execution is None else cfg.execution.model_dump(), "images": images[:n].numpy()}
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its peak belongs to this configuration only
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return round(pool.submit(_memory_worker, job).result(), 1)


def _build_model(spec: dict[str, Any]) -> tuple[SlotSegmenter, dict[str, torch.Tensor] | None]:
    """{'kind': 'pretrained', 'name': ...} or {'kind': 'random', 'segmenter': {...}, 'seed': int}."""
    if spec["kind"] == "pretrained":
        from tta_runtime.runtime import Runtime

        rt = Runtime.from_pretrained(spec["name"], load_calibration=False)
        if not isinstance(rt.model, SlotSegmenter):
            raise ConfigError(f"bench adapt needs a slot segmenter; {rt.name} is a {rt.task} model")
        assert rt.folder is not None  # loaded from a folder
        return rt.model, load_optimizer_state(rt.folder, rt.card)
    torch.manual_seed(spec["seed"])
    return SlotSegmenter(SegmenterConfig(**spec["segmenter"])).eval(), None


# -- the report ------------------------------------------------------------------------------------------


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


def _hardware(device: torch.device) -> dict[str, Any]:
    hw = {"machine": platform.machine(), "processor": platform.processor() or None, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        hw["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["cuda"] = torch.version.cuda
    return hw


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
    dev = _resolve_device(device)
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
        "device": str(dev), "hardware": _hardware(dev),
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

    if quality:
        q = _quality_section(
            all_configs, faithful, fast_r, folder, splits=splits, n_images=n_images, seed=seed, device=dev,
            memory=memory, progress=progress, checkpoint=partial("configs"),
        )
        report["target"].update(q.pop("target", {}))
        report.update(q)
    if timing_size is not None:
        report["timing_model"] = _timing_section(
            all_configs, size=timing_size, slots=timing_slots, n=timing_images, seed=seed, device=dev,
            memory=memory, progress=progress, checkpoint=partial("timing_model"),
        )
    report["complete"] = True
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _quality_section(
    configs: Sequence[BenchConfig], faithful: AdaptConfig, fast: AdaptConfig, folder: Path, *, splits: Sequence[str],
    n_images: int, seed: int, device: torch.device, memory: bool, progress: bool,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every configuration on the model's own test scenes: FG-ARI, gains, time, memory; the target verdict."""
    net, opt_state = _build_model({"kind": "pretrained", "name": str(folder)})
    size = net.cfg.resolution
    data = {s: generate_scenes(s, n_images, seed=seed, size=size) for s in splits}
    images = images_to_tensor(np.concatenate([d[0] for d in data.values()]))
    truth = np.concatenate([d[1] for d in data.values()])
    with _threads(device), torch.no_grad():
        net = net.to(device)
        seg_before = _segmentations(net, net(images.to(device)), size)
    before = np.array([fg_ari(truth[i], seg_before[i]) for i in range(len(truth))])

    results: dict[str, Any] = {}
    after_by: dict[str, np.ndarray] = {}
    seg_by: dict[str, np.ndarray] = {}
    with _threads(device):
        for cfg in tqdm(configs, desc="configs", disable=not progress):
            m = run_config(cfg, net, images, device=device, training_optimizer_state=opt_state, progress=progress)
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
        d = paired_bootstrap_ci(after_by[name], after_by["faithful"], seed=seed)
        r["fg_ari_minus_faithful"] = {"mean": round(d[0], 6), "ci95": [round(d[1], 6), round(d[2], 6)]}
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
    cfg: BenchConfig, faithful: AdaptConfig, m: _Measured, after: np.ndarray, before: np.ndarray,
    splits: Sequence[str], n_images: int, seed: int,
) -> dict[str, Any]:
    g = paired_bootstrap_ci(after, before, seed=seed)
    sec = float(np.mean(m.seconds))
    return {
        **cfg.describe(faithful),
        "fg_ari_before": round(float(before.mean()), 6),
        "fg_ari_after": round(float(after.mean()), 6),
        "gain": {"mean": round(g[0], 6), "ci95": [round(g[1], 6), round(g[2], 6)]},
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


def _timing_section(
    configs: Sequence[BenchConfig], *, size: int, slots: int, n: int, seed: int,
    device: torch.device, memory: bool, progress: bool, checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time and memory of every configuration on a random model of the paper's size (no quality)."""
    seg_cfg = SegmenterConfig(resolution=size, num_slots=slots)  # the paper's widths and depths
    spec = {"kind": "random", "segmenter": seg_cfg.model_dump(), "seed": 0}
    net, _ = _build_model(spec)
    n_max = max([n, *(c.execution.batch_size for c in configs if c.execution is not None)])
    images = images_to_tensor(generate_scenes("textured_background", n_max, seed=seed, size=size)[0])
    rows: dict[str, Any] = {}
    with _threads(device):
        for cfg in tqdm(configs, desc=f"timing {size}x{size}", disable=not progress):
            if cfg.recipe.optimizer_state == "training":  # a random model has no training moments
                rows[cfg.name] = {"skipped": "optimizer_state='training' needs a trained model's Adam moments"}
                continue
            k = cfg.execution.batch_size if cfg.execution is not None else n
            m = run_config(cfg, net, images[: max(k, n) if cfg.runner == "batched" else n], device=device)
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
