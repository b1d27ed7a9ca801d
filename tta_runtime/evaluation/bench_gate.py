"""`tta-runtime bench gate`: OOD-gated adaptation on a mixed stream (half in-distribution, half shifted scenes).

The same images go through an always-adapting runtime and a `when_ood` one; the JSON reports the
gated run's share of the adaptation compute (steps and seconds) and of the segmentation gain. Shares
are ratios within one run, on whatever device runs it.

The stream is drawn from the model's own training world (its card's `training.config.train_split`): its
in-distribution scenes are that split, its shifts splits of that world (`DEFAULT_SHIFTS` by default).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.data.scenes import TEST_SEED, evaluation_splits, generate_scenes
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.common import one_thread
from tta_runtime.evaluation.ood import calibrated_split, train_split_of
from tta_runtime.metrics import fg_ari
from tta_runtime.runtime import Runtime

# The default shifts of each world's stream, by its training split: a background unlike the training one
# and a colour / shape family never trained on.
DEFAULT_SHIFTS: dict[str, tuple[str, ...]] = {
    "in_dist": ("textured_background", "unseen_colours"),
    "flat/in_dist": ("flat/photo_background", "flat/unseen_shapes"),
}


def resolve_shifts(train_split: str, shifts: Sequence[str] | None) -> tuple[str, ...]:
    """`shifts` (default: the world's `DEFAULT_SHIFTS`), checked to be splits of the world of `train_split`
    other than the training split itself; a ConfigError naming the valid ones otherwise."""
    if train_split not in DEFAULT_SHIFTS:
        raise ConfigError(
            f"training split {train_split!r} is not a scene world's; expected one of: {', '.join(DEFAULT_SHIFTS)}"
        )
    valid = evaluation_splits(train_split)[1:]  # the world's named OOD splits and held-out variations
    if shifts is None:
        return DEFAULT_SHIFTS[train_split]
    shifts = tuple(shifts)
    bad = [s for s in shifts if s not in valid]
    if bad or not shifts:
        what = f"shift(s) {', '.join(map(repr, bad))} are not splits of" if bad else "no shifts given for"
        raise ConfigError(
            f"{what} the model's world (trained on {train_split!r}); pick from: {', '.join(valid)} "
            "(comma-separated with --shifts)"
        )
    return shifts


def mixed_stream(
    n_images: int, shifts: Sequence[str], *, seed: int, size: int, in_dist: str = "in_dist",
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`n_images` in-distribution scenes of `in_dist` interleaved with `n_images` shifted ones (cycling over
    `shifts`); each item is (split, image, instance map)."""
    ind, ind_truth = generate_scenes(in_dist, n_images, seed=seed, size=size)
    shifted = []
    for i in range(n_images):
        split = shifts[i % len(shifts)]
        img, truth = generate_scenes(split, 1, seed=seed, size=size, start=i)
        shifted.append((split, img[0], truth[0]))
    stream: list[tuple[str, np.ndarray, np.ndarray]] = []
    for i in range(n_images):
        stream.append((in_dist, ind[i], ind_truth[i]))
        stream.append(shifted[i])
    return stream


def bench_gate(
    model: str | None = None, *, n_images: int = 8, shifts: Sequence[str] | None = None,
    recipe: str | None = None, steps: int | None = None, seed: int = TEST_SEED, progress: bool = False,
    scorer: str | None = None,
) -> dict[str, Any]:
    """Always-adapt vs `adapt="when_ood"` on one mixed stream; needs a calibrated model (`ood fit`).
    The stream's in-distribution scenes are the model's training split; `shifts`: splits of its world
    (default `DEFAULT_SHIFTS` of that world; a ConfigError names the valid ones). `recipe`: default the
    model card's default_recipe; `scorer`: the calibrated scorer that gates (default: the runtime's,
    reconstruction error)."""
    extra: dict[str, Any] = {} if steps is None else {"steps": steps}
    if recipe is not None:
        extra["recipe"] = recipe
    always = Runtime.from_pretrained(model, **extra)
    in_dist = train_split_of(always.card)
    shifts = resolve_shifts(in_dist, shifts)
    gated = Runtime.from_pretrained(model, adapt="when_ood", ood_scorer=scorer, **extra)
    calibrated_split(gated._calibrations, in_dist)  # thresholds fitted on another world's scenes gate nothing useful
    stream = mixed_stream(n_images, shifts, seed=seed, size=always.input_size, in_dist=in_dist)
    rows = []
    with one_thread():  # like `eval`: numbers independent of the machine's core count
        for split, image, truth in tqdm(stream, desc="stream", disable=not progress):
            before = always.predict(image)
            t = time.perf_counter()
            a = always.adapt_and_predict(image)
            t_always = time.perf_counter() - t
            t = time.perf_counter()
            g = gated.adapt_and_predict(image)
            t_gated = time.perf_counter() - t
            rows.append({
                "split": split, "is_ood": g.is_ood, "ood_score": g.ood_score,
                "fg_ari_before": fg_ari(truth, before.segmentation),
                "fg_ari_always": fg_ari(truth, a.segmentation), "fg_ari_gated": fg_ari(truth, g.segmentation),
                "steps_always": a.adaptation.steps_run, "steps_gated": g.adaptation.steps_run,
                "seconds_always": t_always, "seconds_gated": t_gated,
            })

    def total(key: str) -> float:
        return float(sum(r[key] for r in rows))

    def mean(key: str, split: str | None = None) -> float:
        vals = [r[key] for r in rows if split is None or (r["split"] == in_dist) == (split == "in_dist")]
        return float(np.mean(vals))

    gain_always = mean("fg_ari_always") - mean("fg_ari_before")
    gain_gated = mean("fg_ari_gated") - mean("fg_ari_before")
    return {
        "model": always.name,
        "recipe": always.recipe.name,
        "scorer": gated.calibration.scorer if gated.calibration else None,
        "threshold": gated.calibration.threshold if gated.calibration else None,
        "stream": {"in_dist": n_images, "shifted": n_images, "shifts": list(shifts), "seed": seed},
        "flagged": {
            "in_dist": float(np.mean([r["is_ood"] for r in rows if r["split"] == in_dist])),
            "shifted": float(np.mean([r["is_ood"] for r in rows if r["split"] != in_dist])),
        },
        "fg_ari": {
            "before": mean("fg_ari_before"), "always": mean("fg_ari_always"), "when_ood": mean("fg_ari_gated"),
            "shifted_before": mean("fg_ari_before", "shifted"), "shifted_always": mean("fg_ari_always", "shifted"),
            "shifted_when_ood": mean("fg_ari_gated", "shifted"),
        },
        "gain_always": gain_always,
        "gain_when_ood": gain_gated,
        # a share of a loss is no "gain kept": None (the CLI says n/a) unless always-adapt gained
        "gain_kept": gain_gated / gain_always if gain_always > 0 else None,
        "compute_share_steps": total("steps_gated") / max(1.0, total("steps_always")),
        "compute_share_seconds": total("seconds_gated") / total("seconds_always"),
        "per_split": {
            split: {
                "n": len(rs), "flagged": float(np.mean([r["is_ood"] for r in rs])),
                "gain_always": float(np.mean([r["fg_ari_always"] - r["fg_ari_before"] for r in rs])),
                "gain_when_ood": float(np.mean([r["fg_ari_gated"] - r["fg_ari_before"] for r in rs])),
            }
            for split in dict.fromkeys(r["split"] for r in rows)
            for rs in [[r for r in rows if r["split"] == split]]
        },
        "per_image": rows,
        "timing": {"device": str(always.device), "hardware": f"{platform.machine()}, 1 thread, torch {torch.__version__}"},
    }
