"""A pruned classifier next to its dense original, on corrupted digits, with and without adaptation.

    python examples/pruned_classifier.py [--corruption fog] [--n 128]

The pruned variant (models/digits-cnn-bn/prune/r0.6, made by `tta-runtime train ftwt --r 0.6`) predicts,
per input, which channels of each conv to compute; `Result.pruning` says how many it kept and what share of
the dense multiply-accumulates that cost. Adaptation (BatchNorm statistics of the test batch) runs on top:
the masks are decided on the adaptation loop's first forward and reused by its steps.
"""

from __future__ import annotations

import argparse

import numpy as np

import tta_runtime as tta
from tta_runtime.data.digits import BENCHMARK_CORRUPTIONS, corrupt, load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruption", default="fog", choices=BENCHMARK_CORRUPTIONS)
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--n", type=int, default=128, help="test images (a batch)")
    args = parser.parse_args()

    images, labels = load_digits("test")
    images, labels = images[: args.n], labels[: args.n]
    shifted = corrupt(images, args.corruption, args.severity, seed=0)
    print(f"{args.n} test digits, {args.corruption} at severity {args.severity}")
    for name, prune in (("dense", None), ("pruned r0.6", "r0.6")):
        rt = tta.Runtime.from_pretrained("digits-cnn-bn", recipe="bn_stats", prune=prune)
        plain = rt.predict(shifted)
        adapted = rt.adapt_and_predict(shifted)
        acc = [float(np.mean([r.label == y for r, y in zip(res, labels)])) for res in (plain, adapted)]
        line = f"{name:12} accuracy {acc[0]:.1%} -> {acc[1]:.1%} with BatchNorm statistics of the batch"
        if prune:
            macs = np.mean([r.pruning["macs_fraction"] for r in plain])
            kept = np.mean([r.pruning["kept_fraction"] for r in plain], axis=0)
            line += f"; computes {macs:.0%} of the dense multiply-accumulates (kept per conv: " + \
                ", ".join(f"{k:.0%}" for k in kept) + ")"
        print(line)


if __name__ == "__main__":
    main()
