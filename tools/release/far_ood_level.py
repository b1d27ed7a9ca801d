"""A segmenter's far-OOD level (card `scope.far_ood_level`), chosen on validation scenes only.

    python tools/release/far_ood_level.py [--model M] --json docs/results/ood/far_ood_level.json

The scenes are those of the model's training world (its card's `training.config.train_split`) and that world's
named OOD splits.

Rule: the level is the largest calibrated score (the card's default scorer) over 1,000 in-distribution
validation scenes (seed 1000), rounded up to an integer: about 1 in 1,000 in-distribution scenes would reach it.
Reported on what the choice never saw: 1,000 in-distribution test scenes (seed 2026), 200 test scenes of every
named OOD split, and the 24 photo crops of scikit-image's astronaut, coffee, chelsea and rocket.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from tta_runtime import Runtime
from tta_runtime.data.scenes import generate_scene, world_splits
from tta_runtime.evaluation.ood import train_split_of
from tta_runtime.evaluation.ood_photos import natural_photos


def scores(rt: Runtime, images: list[np.ndarray]) -> np.ndarray:
    out = []
    for i in range(0, len(images), 32):
        out += [r.ood_score for r in rt.predict(np.stack(images[i : i + 32]))]
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rt = Runtime.from_pretrained(args.model)
    scorer = rt.calibration.scorer if rt.calibration else "recon_mse_z"
    in_dist = train_split_of(rt.card)
    val = scores(rt, [generate_scene(in_dist, 1000, i).image for i in range(1000)])
    level = float(math.ceil(val.max()))
    test = {in_dist: scores(rt, [generate_scene(in_dist, 2026, i).image for i in range(1000)])}
    for split in world_splits(in_dist):
        test[split] = scores(rt, [generate_scene(split, 2026, i).image for i in range(200)])
    photos = np.asarray([r.ood_score for r in (rt.predict(x) for x in natural_photos())])
    report = {
        "model": rt.name, "scorer": scorer, "level": level,
        "validation": {"split": in_dist, "seed": 1000, "n": len(val), "max": float(val.max()),
                       "p99": float(np.percentile(val, 99))},
        "test_share_above": {k: {"n": len(v), "share": float((v > level).mean())} for k, v in test.items()},
        "photos": {"n": len(photos), "share_above": float((photos > level).mean()), "scores": [round(float(v), 2) for v in photos]},
        "command": "python tools/release/far_ood_level.py" + (f" --model {args.model}" if args.model else "")
        + (f" --json {args.json}" if args.json else ""),
    }
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
