"""Feed-forward U-Net baselines on the flat world: FG-ARI per split on test-seed scenes, with 95% bootstrap
intervals, for each U-Net model folder given.

    python tools/release/flat_baselines.py runs/unet-flat-64-f10/model [...] --n 100 --json docs/results/flat/unet_baselines.json

Splits: `evaluation_splits("flat/in_dist")` (the training split, the five named OOD splits, the three held-out
variations), `--n` scenes each at the test seed (2026), never used to train or select anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tta_runtime.data.scenes import TEST_SEED, evaluation_splits, generate_scenes, is_ood_split
from tta_runtime.evaluation.common import interval
from tta_runtime.metrics import bootstrap_ci, fg_ari
from tta_runtime.models.unet import load_feedforward, predict_segmentation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="U-Net model folders (card.json + weights.safetensors)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=TEST_SEED)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = evaluation_splits("flat/in_dist")
    report: dict = {"seed": args.seed, "n_images": args.n, "splits": list(splits), "models": {}}
    for folder in args.models:
        model = load_feedforward(folder)
        t0 = time.perf_counter()
        rows = {}
        for split in splits:
            images, truth = generate_scenes(split, args.n, seed=args.seed, size=model.cfg.resolution)
            seg = predict_segmentation(model, images)
            scores = [fg_ari(truth[i], seg[i]) for i in range(args.n)]
            rows[split] = interval(bootstrap_ci(np.asarray(scores), seed=args.seed))
            print(folder, split, rows[split], flush=True)
        ood = [rows[s]["mean"] for s in splits if is_ood_split(s)]
        report["models"][str(folder)] = {
            "splits": rows, "ood_mean_fg_ari": round(float(np.mean(ood)), 6),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    report["command"] = "python tools/release/flat_baselines.py " + " ".join(args.models) + f" --n {args.n} --json {args.json}"
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
