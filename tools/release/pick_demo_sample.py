"""Choose a segmenter's demo sample: a validation-seed scene that the model's calibrated OOD scorer flags and on
which its default recipe changes the masks most.

    python tools/release/pick_demo_sample.py [--model M] --json docs/results/demo_sample.json [--write-asset]

`--write-asset` writes the pick to the model folder's `demo_sample.png` (the card's `scope.demo_sample`, which
`tta-runtime demo` shows) or, for `slot-shapes-32`, to the package's `tta_runtime/assets/ood_sample.png`.
Candidates: scenes 0..N-1 of every named OOD split of the model's training world at the validation seed (1000;
never the test seed), at 3x (shapes world) or 2x (flat world) the model's input size, as a user's image would be. For each: the OOD score and verdict
before adaptation, FG-ARI before and after the default recipe against the scene's exact instance map, and
the share of pixels whose slot changed. The pick: the largest FG-ARI gain among scenes that are flagged but
below the card's far-OOD level (a shift the model can adapt to, not another world: those get the "masks are
unreliable" line) and whose masks changed on at least 10% of the pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tta_runtime import Runtime
from tta_runtime.data.scenes import VAL_SEED, generate_scene, world_splits
from tta_runtime.evaluation.ood import train_split_of
from tta_runtime.metrics import fg_ari
from tta_runtime.visual import save_png


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    ap.add_argument("--n", type=int, default=8, help="scenes per OOD split")
    ap.add_argument("--json", required=True)
    ap.add_argument("--write-asset", action="store_true", help="write the pick as the model's demo sample")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rt = Runtime.from_pretrained(args.model, threads=1)
    in_dist = train_split_of(rt.card)
    size = rt.input_size * (2 if in_dist.startswith("flat/") else 3)
    rows = []
    for split in world_splits(in_dist):
        for i in range(args.n):
            scene = generate_scene(split, VAL_SEED, i, size)
            before = rt.predict(scene.image)
            after = rt.adapt_and_predict(scene.image)
            rows.append({
                "split": split, "index": i, "ood_score": round(before.ood_score, 4), "is_ood": before.is_ood,
                "fg_ari_before": round(fg_ari(scene.instances, before.segmentation), 4),
                "fg_ari_after": round(fg_ari(scene.instances, after.segmentation), 4),
                "pixels_changed": round(float((before.segmentation != after.segmentation).mean()), 4),
            })
            print(rows[-1], flush=True)
    far = rt.card.scope.far_ood_level if rt.card.scope is not None else None
    eligible = [r for r in rows if r["is_ood"] and r["pixels_changed"] >= 0.10 and (far is None or r["ood_score"] <= far)]
    pick = max(eligible, key=lambda r: r["fg_ari_after"] - r["fg_ari_before"])
    report = {
        "model": rt.name, "recipe": rt.recipe.name, "seed": VAL_SEED, "size": size, "pick": pick,
        "rule": "largest FG-ARI gain among flagged scenes below the far-OOD level with >= 10% of pixels changed",
        "far_ood_level": far, "candidates": rows,
        "command": "python tools/release/pick_demo_sample.py" + (f" --model {args.model}" if args.model else "")
        + " --json " + args.json,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("pick", pick)
    if args.write_asset:
        image = generate_scene(pick["split"], VAL_SEED, pick["index"], size).image
        package_asset = Path(__file__).resolve().parents[2] / "tta_runtime" / "assets" / "ood_sample.png"
        save_png(package_asset if rt.name == "slot-shapes-32" else rt.folder / "demo_sample.png", np.asarray(image))


if __name__ == "__main__":
    main()
