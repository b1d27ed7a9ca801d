"""Tune the baselines' step count and learning rate on validation scenes, for the fair comparison table.

    OMP_NUM_THREADS=1 python tools/release/tune_baselines.py --unet runs/unet-flat-64-f10/model runs/unet-flat-64-f01/model \
        --slot-model MODEL_FOLDER --n 6 --json docs/results/flat/baseline_tuning.json

Two baselines, each with a grid of constant learning rates and up to `--max-steps` steps (one run per rate:
the per-step callback scores every step count on the way, which is exact for a constant rate):
- `unet_tent`: Tent on the feed-forward U-Net's GroupNorm scale and shift (per-pixel entropy, Adam);
- `entropy_norm`: the slot model's mask entropy on its norm layers only (LayerNorm, GroupNorm), Adam.
Scenes: the first `--n` validation scenes (seed 1000) of the model's training split and of each named OOD
split; the held-out variations and the test seed are never looked at. The objective is the mean over those
splits of the split's mean FG-ARI (over the U-Nets given, for `unet_tent`); ties go to fewer steps.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime import Runtime
from tta_runtime.data.scenes import VAL_SEED, generate_scenes, world_splits
from tta_runtime.evaluation.feedforward_tta import adapt_feedforward
from tta_runtime.evaluation.segmentation import segment_output
from tta_runtime.hub import load_recipe
from tta_runtime.metrics import fg_ari
from tta_runtime.models.unet import load_feedforward

UNET_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SLOT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def _choose(grid: dict[float, dict[int, float]]) -> dict[str, float | int]:
    """The (lr, steps >= 1) with the highest objective; ties: fewer steps, then the smaller rate. (Step 0, no
    update, is in the grid as the reference.)"""
    best = max(((score, -steps, -lr) for lr, row in grid.items() for steps, score in row.items() if steps >= 1))
    return {"lr": -best[2], "steps": -best[1], "objective": round(best[0], 6)}


def _mean_over_splits(scores: dict[str, dict[int, list[float]]]) -> dict[int, float]:
    steps = next(iter(scores.values())).keys()
    return {s: float(np.mean([np.mean(per[s]) for per in scores.values()])) for s in steps}


def tune_unet(folders: list[str], splits: tuple[str, ...], n: int, max_steps: int, bar: tqdm) -> dict:
    grid: dict[float, dict[int, float]] = {}
    for lr in UNET_LRS:
        recipe = load_recipe("tent", name="unet_tent_sweep", lr=lr, steps=max_steps, norm_stats="source")
        per_model = []
        for folder in folders:
            unet = load_feedforward(folder)
            scores: dict[str, dict[int, list[float]]] = {}
            for split in splits:
                images, truth = generate_scenes(split, n, seed=VAL_SEED, size=unet.cfg.resolution)
                per: dict[int, list[float]] = defaultdict(list)
                adapt_feedforward(unet, images, recipe, on_step=lambda i, step, seg: per[step].append(fg_ari(truth[i], seg)))
                scores[split] = per
                bar.update(n)
            per_model.append(_mean_over_splits(scores))
        grid[lr] = {s: round(float(np.mean([m[s] for m in per_model])), 6) for s in per_model[0]}
    return {"grid": {str(lr): row for lr, row in grid.items()}, "choice": _choose(grid)}


def tune_slot(folder: str, splits: tuple[str, ...], n: int, max_steps: int, bar: tqdm) -> dict:
    rt = Runtime.from_pretrained(folder)
    size = rt.input_size
    grid: dict[float, dict[int, float]] = {}
    for lr in SLOT_LRS:
        scores: dict[str, dict[int, list[float]]] = {}
        recipe = load_recipe("entropy", name="entropy_norm_sweep", params="norm", lr=lr, steps=max_steps)
        for split in splits:
            images, truth = generate_scenes(split, n, seed=VAL_SEED, size=size)
            per: dict[int, list[float]] = defaultdict(list)
            for i in range(n):
                def on_step(step: int, out, i: int = i) -> None:
                    per[step].append(fg_ari(truth[i], segment_output(rt.model.cfg, out, size)))

                rt.adapt_and_predict(images[i], on_step=on_step, **recipe.model_dump())
                bar.update(1)
            scores[split] = per
        grid[lr] = {s: round(v, 6) for s, v in _mean_over_splits(scores).items()}
    return {"grid": {str(lr): row for lr, row in grid.items()}, "choice": _choose(grid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", nargs="*", default=[], help="U-Net baseline folders (unet_tent)")
    ap.add_argument("--slot-model", default=None, help="slot model folder (entropy_norm)")
    ap.add_argument("--train-split", default="flat/in_dist")
    ap.add_argument("--n", type=int, default=6, help="validation scenes per split")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = (args.train_split, *world_splits(args.train_split))
    total = args.n * len(splits) * (len(UNET_LRS) * len(args.unet) + (len(SLOT_LRS) if args.slot_model else 0))
    report: dict = {"validation_seed": VAL_SEED, "n_per_split": args.n, "splits": list(splits), "max_steps": args.max_steps,
                    "objective": "mean over splits of the mean FG-ARI; steps = updates before the prediction (0: none)"}
    t0 = time.perf_counter()
    with tqdm(total=total, desc="tune", unit="image") as bar:
        if args.unet:
            report["unet_tent"] = {"models": args.unet, "lrs": list(UNET_LRS), **tune_unet(args.unet, splits, args.n, args.max_steps, bar)}
        if args.slot_model:
            report["entropy_norm"] = {"model": args.slot_model, "lrs": list(SLOT_LRS),
                                      **tune_slot(args.slot_model, splits, args.n, args.max_steps, bar)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["command"] = ("OMP_NUM_THREADS=1 python tools/release/tune_baselines.py" + (" --unet " + " ".join(args.unet) if args.unet else "")
                         + (f" --slot-model {args.slot_model}" if args.slot_model else "")
                         + f" --train-split {args.train_split} --n {args.n} --max-steps {args.max_steps} --json {args.json}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for key in ("unet_tent", "entropy_norm"):
        if key in report:
            print(key, report[key]["choice"])


if __name__ == "__main__":
    main()
