"""Choose the classifier recipes' hyperparameters on VALIDATION data (never the reported test split/seed).

Data: the digits "val" split (180 images; `--n-images` of them), corrupted with seed 1 (the benchmark
reports seed 2026 on the test split) at severity 5, batch size 1, episodic, through the public Runtime.
Prints mean error per setting and writes the table as JSON.

    OMP_NUM_THREADS=1 python scripts/sweep_classifier_recipes.py digits-cnn-bn out/sweep_bn1.json 40 none,bn_stats
    PRIOR=4 OMP_NUM_THREADS=1 python scripts/sweep_classifier_recipes.py digits-cnn-bn out/sweep_bn2.json 40 tent,eata,sar,memo,rotation
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import tta_runtime
from tta_runtime.evaluation.bench_tta import TUNING_SEED
from tta_runtime.data.digits import CORRUPTIONS, corrupt, load_digits

# Stage 1 picks the BatchNorm prior with bn_stats; stage 2 (PRIOR=<best>) the learning rates at that prior.
PRIOR = float(os.environ.get("PRIOR", "16"))
GRID = {
    "none": [{}],
    "bn_stats": [{"norm_prior": p} for p in (1.0, 4.0, 16.0)],
    "tent": [{"lr": lr, "norm_prior": PRIOR} for lr in (1e-3, 1e-2)],
    "eata": [{"lr": lr, "norm_prior": PRIOR} for lr in (1e-3, 1e-2)],
    "sar": [{"lr": lr, "norm_prior": PRIOR} for lr in (0.01, 0.1)],
    "memo": [{"lr": lr, "norm_prior": PRIOR} for lr in (0.001, 0.005)],
    "rotation": [{"lr": lr, "steps": s, "norm_prior": PRIOR} for lr, s in ((0.001, 1), (0.001, 3), (0.005, 1))],
}


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    methods = sys.argv[4].split(",") if len(sys.argv) > 4 else list(GRID)
    images, labels = load_digits("val")
    images, labels = images[:n], labels[:n]
    sets = {c: corrupt(images, c, 5, seed=TUNING_SEED) for c in CORRUPTIONS}
    rows = []
    for method in methods:
        for setting in GRID[method]:
            t0 = time.perf_counter()
            if method == "none":
                rt = tta_runtime.Runtime.from_pretrained(model)
                errs = [float(np.mean([r.label != y for r, y in zip(rt.predict(x), labels)])) for x in sets.values()]
            else:
                rt = tta_runtime.Runtime.from_pretrained(model, recipe=method, **setting)
                errs = [
                    float(np.mean([rt.adapt_and_predict(im).label != y for im, y in zip(x, labels)])) for x in sets.values()
                ]
            row = {"method": method, **setting, "mean_error": float(np.mean(errs)), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump({"model": model, "n_images": n, "split": "val", "seed": TUNING_SEED, "severity": 5, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
