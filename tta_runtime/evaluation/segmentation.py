"""Evaluation: segmentation quality before and after adaptation, per split, with bootstrap intervals.

For every image of every split: predict (before), adapt with the Slot-TTA recipe (after, last step;
plus the best step by FG-ARI, an oracle that peeks at the labels and is labelled so), and adapt with
the entropy baseline. With a feed-forward U-Net: its prediction on the same images, and its own
test-time adaptation (Tent on its norm layers, `feedforward_tta`). Means over images with 95%
percentile-bootstrap intervals, and the paired gain (after - before) with its own interval; over the
pooled OOD images, the paired difference between adapted slot model and each feed-forward variant. Everything but the `timing` section is deterministic for the
same seeds, so a re-run reproduces the JSON exactly.
"""

from __future__ import annotations

import logging
import multiprocessing
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.config import AdaptConfig, SegmenterConfig
from tta_runtime.data.scenes import OOD_SPLITS, TEST_SEED, generate_scenes, is_ood_split
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.common import interval, one_thread, progress_bar
from tta_runtime.evaluation.feedforward_tta import adapt_feedforward
from tta_runtime.hub import load_recipe
from tta_runtime.metrics import bootstrap_ci, paired_bootstrap_ci, segmentation_metrics
from tta_runtime.models.segmenter import SegmenterOutput, segmentation_masks
from tta_runtime.models.unet import UNetSegmenter, load_feedforward, predict_segmentation
from tta_runtime.runtime import Runtime

METRICS = ("fg_ari", "ari", "miou")


def _summary(values: Sequence[float], seed: int) -> dict[str, Any]:
    return interval(bootstrap_ci(np.asarray(values, dtype=np.float64), seed=seed))


def segment_output(cfg: SegmenterConfig, out: SegmenterOutput, size: int) -> np.ndarray:
    """The (S, S) segmentation of the first image of a segmenter output, slot ids."""
    return segmentation_masks(cfg, out)[0].argmax(0).reshape(size, size).cpu().numpy()


VARIANTS = ("before", "slot_tta", "oracle", "entropy", "feedforward", "feedforward_tta")
FEEDFORWARD = ("feedforward", "feedforward_tta")


def evaluate_split(
    runtime: Runtime, split: str, n_images: int, *, seed: int = TEST_SEED, adapt: AdaptConfig, baseline: AdaptConfig | None,
    feedforward: UNetSegmenter | None = None, feedforward_recipe: AdaptConfig | None = None, progress: bool = False,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Per-image metrics for one split and their summaries (single-threaded: see `one_thread`).

    `feedforward_recipe`: the U-Net's own adaptation (needs `feedforward`). `progress`: show a bar over the
    images; `bar`: advance the caller's bar instead (one image a step).
    """
    with one_thread(), progress_bar(n_images, split, enabled=progress, bar=bar, unit="image") as images_bar:
        return _evaluate_split(runtime, split, n_images, seed, adapt, baseline, feedforward, feedforward_recipe, images_bar)


def _evaluate_split(
    runtime: Runtime, split: str, n_images: int, seed: int, adapt: AdaptConfig, baseline: AdaptConfig | None,
    feedforward: UNetSegmenter | None, feedforward_recipe: AdaptConfig | None, bar: tqdm,
) -> dict[str, Any]:
    size = runtime.input_size
    images, truth = generate_scenes(split, n_images, seed=seed, size=size)
    per: dict[str, dict[str, list[float]]] = {v: {m: [] for m in METRICS} for v in VARIANTS}
    seconds: dict[str, list[float]] = {"predict": [], "slot_tta": [], "entropy": [], "feedforward": [], "feedforward_tta": []}
    if feedforward is not None:  # the supervised U-Net without a slot bottleneck, on the same images, one at a time
        for i in range(n_images):
            t = time.perf_counter()
            seg = predict_segmentation(feedforward, images[i : i + 1])[0]
            seconds["feedforward"].append(time.perf_counter() - t)
            for m, v in segmentation_metrics(truth[i], seg).items():
                per["feedforward"][m].append(v)
        if feedforward_recipe is not None:
            segs, seconds["feedforward_tta"] = adapt_feedforward(feedforward, images, feedforward_recipe)
            for i, seg in enumerate(segs):
                for m, v in segmentation_metrics(truth[i], seg).items():
                    per["feedforward_tta"][m].append(v)
    best_steps: list[int] = []
    bar.set_postfix_str(split)
    for i in range(n_images):
        t = time.perf_counter()
        before = runtime.predict(images[i])
        seconds["predict"].append(time.perf_counter() - t)
        for m, v in segmentation_metrics(truth[i], before.segmentation).items():
            per["before"][m].append(v)

        step_scores: list[tuple[float, int, dict[str, float]]] = []
        in_callback = [0.0]

        def on_step(step: int, out: SegmenterOutput, i: int = i) -> None:
            t_cb = time.perf_counter()
            scores = segmentation_metrics(truth[i], segment_output(runtime.model.cfg, out, size))
            step_scores.append((scores["fg_ari"], -step, scores))  # ties: the earliest step
            in_callback[0] += time.perf_counter() - t_cb

        t = time.perf_counter()
        after = runtime.adapt_and_predict(images[i], on_step=on_step, **adapt.model_dump())
        # The oracle's per-step scoring is evaluation overhead, not adaptation time: leave it out.
        seconds["slot_tta"].append(time.perf_counter() - t - in_callback[0])
        for m, v in segmentation_metrics(truth[i], after.segmentation).items():
            per["slot_tta"][m].append(v)
        best = max(step_scores, key=lambda t: t[:2])
        best_steps.append(-best[1])
        for m in METRICS:
            per["oracle"][m].append(best[2][m])

        if baseline is not None:
            t = time.perf_counter()
            ent = runtime.adapt_and_predict(images[i], **baseline.model_dump())
            seconds["entropy"].append(time.perf_counter() - t)
            for m, v in segmentation_metrics(truth[i], ent.segmentation).items():
                per["entropy"][m].append(v)
        bar.update(1)

    out: dict[str, Any] = {"n_images": n_images, "seed": seed}
    for variant, metrics in per.items():
        if not metrics["fg_ari"]:
            continue
        out[variant] = {m: _summary(vals, seed) for m, vals in metrics.items()}
    out["slot_tta_gain_fg_ari"] = interval(paired_bootstrap_ci(per["slot_tta"]["fg_ari"], per["before"]["fg_ari"], seed=seed))
    if per["entropy"]["fg_ari"]:
        out["entropy_gain_fg_ari"] = interval(paired_bootstrap_ci(per["entropy"]["fg_ari"], per["before"]["fg_ari"], seed=seed))
    if per["feedforward_tta"]["fg_ari"]:
        out["feedforward_tta_gain_fg_ari"] = interval(
            paired_bootstrap_ci(per["feedforward_tta"]["fg_ari"], per["feedforward"]["fg_ari"], seed=seed)
        )
    out["oracle_best_step_median"] = float(np.median(best_steps))
    out["per_image"] = {v: {m: [round(x, 6) for x in vals] for m, vals in ms.items()} for v, ms in per.items() if ms["fg_ari"]}
    out["timing"] = {f"{k}_seconds_per_image": round(float(np.mean(v)), 4) for k, v in seconds.items() if v}
    return out


def _split_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One split in a worker process (--jobs): load everything from paths, evaluate, return the JSON part.
    An evaluation feeds far-OOD inputs on purpose: their per-call warning stays quiet here, as in the parent."""
    logging.getLogger("tta_runtime.frozen").setLevel(logging.ERROR)
    runtime = Runtime.from_pretrained(job["model"], device=job["device"])
    feedforward = None
    if job["feedforward"] is not None:
        feedforward = load_feedforward(job["feedforward"])
    return evaluate_split(
        runtime, job["split"], job["n_images"], seed=job["seed"], adapt=AdaptConfig(**job["adapt"]),
        baseline=None if job["baseline"] is None else AdaptConfig(**job["baseline"]), feedforward=feedforward,
        feedforward_recipe=None if job["feedforward_recipe"] is None else AdaptConfig(**job["feedforward_recipe"]),
    )


def _evaluate_in_workers(
    runtime: Runtime, splits: Sequence[str], n_images: int, seed: int, adapt: AdaptConfig, base: AdaptConfig | None,
    feedforward: str | Path | None, ff_recipe: AdaptConfig | None, jobs: int, bar: tqdm,
) -> dict[str, Any]:
    """Each split in a worker process (`_split_worker`); `bar` advances by a split's images as it finishes."""
    if runtime.folder is None:
        raise ConfigError("jobs > 1 needs a runtime loaded from a model folder (workers reload it)")
    work = [
        {"model": str(runtime.folder), "device": str(runtime.device), "split": split, "n_images": n_images,
         "seed": seed, "adapt": adapt.model_dump(), "baseline": None if base is None else base.model_dump(),
         "feedforward": None if feedforward is None else str(feedforward),
         "feedforward_recipe": None if ff_recipe is None else ff_recipe.model_dump()}
        for split in splits
    ]
    ctx = multiprocessing.get_context("spawn")  # no fork: torch state is not fork-safe
    parts: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_split_worker, job): job["split"] for job in work}
        for future in as_completed(futures):
            parts[futures[future]] = future.result()
            bar.set_postfix_str(f"{futures[future]} done")
            bar.update(n_images)
    return {split: parts[split] for split in splits}


def evaluate(
    runtime: Runtime, *, splits: Sequence[str] = ("in_dist", *OOD_SPLITS), n_images: int = 24, seed: int = TEST_SEED,
    recipe: str | None = None, baseline: str | None = "entropy", steps: int | None = None, progress: bool = False,
    feedforward: str | Path | None = None, feedforward_recipe: str | None = None, jobs: int = 1,
) -> dict[str, Any]:
    """The evaluation JSON (see the module docstring).

    `feedforward`: folder of a feed-forward baseline to score on the same images; `feedforward_recipe`: the
    recipe it adapts with (e.g. "unet_tent"; None: no adaptation of it). `jobs` > 1 evaluates
    splits in that many worker processes (one thread each, like the in-process path, so the numbers are
    identical for any `jobs`). `recipe`: default the runtime's (the model card's default_recipe).
    """
    extra = {} if steps is None else {"steps": steps}
    adapt = load_recipe(recipe or runtime.recipe.name, **extra)
    base = load_recipe(baseline, **extra) if baseline else None
    ff_recipe = load_recipe(feedforward_recipe) if feedforward is not None and feedforward_recipe else None
    t0 = time.perf_counter()
    # One bar for the whole call, one step an image; its postfix names the current split.
    with tqdm(total=len(splits) * n_images, desc="eval", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        if jobs > 1:
            results = _evaluate_in_workers(runtime, splits, n_images, seed, adapt, base, feedforward, ff_recipe, jobs, bar)
        else:
            ff_model = None if feedforward is None else load_feedforward(feedforward)
            results = {
                split: evaluate_split(
                    runtime, split, n_images, seed=seed, adapt=adapt, baseline=base, feedforward=ff_model,
                    feedforward_recipe=ff_recipe, bar=bar,
                )
                for split in splits
            }
    ood = [s for s in splits if is_ood_split(s)]
    summary: dict[str, Any] = {}
    if ood:
        for variant in VARIANTS:
            if all(variant in results[s] for s in ood):
                summary[f"{variant}_fg_ari_mean_over_ood_splits"] = round(
                    float(np.mean([results[s][variant]["fg_ari"]["mean"] for s in ood])), 6
                )
        # The claim's test: the gain over every OOD image pooled, with a paired bootstrap interval.
        for variant in ("slot_tta", "entropy"):
            if all(variant in results[s]["per_image"] for s in ood):
                after = np.concatenate([results[s]["per_image"][variant]["fg_ari"] for s in ood])
                before = np.concatenate([results[s]["per_image"]["before"]["fg_ari"] for s in ood])
                summary[f"{variant}_gain_fg_ari_pooled_ood_images"] = {
                    **interval(paired_bootstrap_ci(after, before, seed=seed)), "n_images": int(len(after)),
                }
        # Slot-TTA's claim against each feed-forward variant, on the same OOD images (paired).
        slot = np.concatenate([results[s]["per_image"]["slot_tta"]["fg_ari"] for s in ood])
        for variant in FEEDFORWARD:
            if all(variant in results[s]["per_image"] for s in ood):
                other = np.concatenate([results[s]["per_image"][variant]["fg_ari"] for s in ood])
                summary[f"slot_tta_minus_{variant}_fg_ari_pooled_ood_images"] = {
                    **interval(paired_bootstrap_ci(slot, other, seed=seed)), "n_images": int(len(slot)),
                }
    return {
        "model": runtime.name,
        "recipe": adapt.model_dump(),
        "baseline": None if base is None else base.model_dump(),
        **({} if ff_recipe is None else {"feedforward_recipe": ff_recipe.model_dump()}),
        "splits": results,
        "summary": summary,
        "timing": {
            "total_seconds": round(time.perf_counter() - t0, 2),
            "device": str(runtime.device),
            "hardware": f"{platform.machine()} CPU, {jobs} process(es) x 1 thread, torch {torch.__version__}",
        },
    }


def strip_timing(report: Any) -> Any:
    """The report without wall-clock fields, for reproducibility checks."""
    if isinstance(report, dict):
        return {k: strip_timing(v) for k, v in report.items() if k != "timing"}
    if isinstance(report, list):
        return [strip_timing(v) for v in report]
    return report
