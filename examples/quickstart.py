"""Adapt the default shipped segmenter to an out-of-distribution image and compare before/after.

    python examples/quickstart.py [IMAGE] [--steps N]

Uses only the public API (`import tta_runtime as tta`).
"""

from __future__ import annotations

import argparse

import numpy as np

import tta_runtime as tta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=None, help="image file (default: the bundled OOD sample)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default: the recipe's)")
    args = parser.parse_args()

    rt = tta.Runtime.from_pretrained()  # the default model (slot-flat-64), its card's default recipe
    image = args.image or tta.sample_image_path(rt.name)  # the model's own demo sample
    before = rt.predict(image)
    overrides = {} if args.steps is None else {"steps": args.steps}
    after = rt.adapt_and_predict(image, **overrides)

    report = after.adaptation
    print(f"models available: {tta.list_models()}, recipes: {tta.list_recipes()}")
    print(f"OOD score {before.ood_score:+.2f} ({before.ood_scorer})")
    print(f"loss {report.losses[0]:.5f} -> {report.final_loss:.5f} in {report.steps_run} steps")
    print(f"slots used before {len(np.unique(before.segmentation))}, after {len(np.unique(after.segmentation))}")
    print(f"masks {after.masks.shape}, segmentation {after.segmentation.shape}, overlay {after.overlay().shape}")


if __name__ == "__main__":
    main()
