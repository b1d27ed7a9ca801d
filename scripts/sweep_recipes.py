"""Compare adaptation recipes on validation scenes (seed 1000, never the test seed).

    python scripts/sweep_recipes.py MODEL N_IMAGES SPLIT[,SPLIT...]

Prints mean FG-ARI before adaptation and after each candidate, with seconds per image. Used to pick
adapters/slot_tta_fast.toml (see the comment there for the numbers and the checkpoint it ran on).
"""

from __future__ import annotations

import sys
import time

import numpy as np

import tta_runtime as tta
from tta_runtime.metrics import fg_ari
from tta_runtime.data.scenes import generate_scenes
from tta_runtime.training.slot import VAL_SEED

CANDIDATES: dict[str, dict[str, object]] = {
    "faithful_150": dict(recipe="slot_tta"),
    "all_lr1e-3_30": dict(recipe="slot_tta", lr=1e-3, steps=30),
    "all_lr2e-3_30": dict(recipe="slot_tta", lr=2e-3, steps=30),
    "all_lr1e-3_30_px25": dict(recipe="slot_tta", lr=1e-3, steps=30, pixel_fraction=0.25),
    "noenc_lr1e-3_30_px25": dict(recipe="slot_tta", lr=1e-3, steps=30, pixel_fraction=0.25, params="no_encoder"),
    "noenc_lr5e-4_30": dict(recipe="slot_tta", lr=5e-4, steps=30, params="no_encoder"),
    "noenc_5e-4_60_px25": dict(recipe="slot_tta", lr=5e-4, steps=60, pixel_fraction=0.25, params="no_encoder"),
    "noenc_5e-4_40_px50": dict(recipe="slot_tta", lr=5e-4, steps=40, pixel_fraction=0.5, params="no_encoder"),
    "all_5e-4_50_px25": dict(recipe="slot_tta", lr=5e-4, steps=50, pixel_fraction=0.25),
    "all_3e-4_40_px50": dict(recipe="slot_tta", lr=3e-4, steps=40, pixel_fraction=0.5),
}


def main() -> None:
    model, n, splits = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    rt = tta.Runtime.from_pretrained(model)
    data = {s: generate_scenes(s, n, VAL_SEED, rt.input_size) for s in splits}
    before = [fg_ari(inst[i], rt.predict(ims[i]).segmentation) for ims, inst in data.values() for i in range(n)]
    print(f"before {np.mean(before):.3f}", flush=True)
    for name, overrides in CANDIDATES.items():
        t = time.perf_counter()
        scores = [
            fg_ari(inst[i], rt.adapt_and_predict(ims[i], **overrides).segmentation)
            for ims, inst in data.values()
            for i in range(n)
        ]
        print(f"{name:24} {np.mean(scores):.3f}  {(time.perf_counter() - t) / len(scores):.2f} s/img", flush=True)


if __name__ == "__main__":
    main()
