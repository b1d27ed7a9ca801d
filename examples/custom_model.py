"""Your own PyTorch classifier in the runtime: adapt, calibrate, save, reload, export.

    python examples/custom_model.py [--epochs 8] [--out my-digits] [--corruption frost]

A small CNN defined below is trained for a few seconds on the digits train split, then handed to
`Runtime.from_module` with its preprocessing (mean/std, shorter side + centre crop). `calibrate` fits the OOD
scorers and EATA's Fisher on clean train images; Tent adapts on a corrupted test batch; natural photos are
flagged OOD; `save` writes a model folder that `from_pretrained(folder, trust_code=True)` loads (the card names
"python:custom_model:small_cnn", the function below); `export` writes an ONNX graph of it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from skimage.data import astronaut
from torch import nn

import tta_runtime as tta
from tta_runtime.data.digits import corrupt, load_digits


def small_cnn() -> nn.Module:
    """The network (the saved folder's builder: it returns the architecture, the weights come from the folder)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(images: np.ndarray, labels: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    net = small_cnn()
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25  # the normalisation we declare below
    y = torch.from_numpy(labels)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(net(x[perm[i : i + 64]]), y[perm[i : i + 64]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--corruption", default="frost")
    parser.add_argument("--out", default=None, help="model folder to write (default: a temporary one)")
    args = parser.parse_args()

    (x, y), (xt, yt) = load_digits("train"), load_digits("test")
    net = train(x, y, args.epochs)
    rt = tta.Runtime.from_module(
        net, input_size=32, labels=[str(d) for d in range(10)],
        preprocessing={"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "resize": "shorter_side"},
    )
    report = rt.calibrate(x)  # clean in-distribution images; no labels: the model's predictions stand in
    print(f"calibrated {len(report.calibrations)} OOD scorers on {report.n_fit} images; is_ood uses {report.default}")

    def error(results: list[tta.Result]) -> float:
        return float(np.mean([r.label != t for r, t in zip(results, yt[:256])]))

    shifted = corrupt(xt[:256], args.corruption, 5, seed=0)
    print(f"{args.corruption} (severity 5): error {error(rt.predict(shifted)):.1%} -> {error(rt.adapt_and_predict(shifted)):.1%} with Tent")
    print(f"clean digits flagged OOD: {np.mean([r.is_ood for r in rt.predict(xt)]):.1%}; "
          f"scikit-image's astronaut photo: is_ood={rt.predict(astronaut()).is_ood}")

    folder = Path(args.out or tempfile.mkdtemp()) / "my-digits"
    rt.save(folder, builder="custom_model:small_cnn", overwrite=True)
    loaded = tta.Runtime.from_pretrained(folder, trust_code=True)  # imports custom_model and calls small_cnn()
    same = all(np.array_equal(a.logits, b.logits) for a, b in zip(rt.predict(xt[:32]), loaded.predict(xt[:32])))
    print(f"saved {folder}; reloaded with trust_code=True: identical predictions {same}")
    res = loaded.export(folder / "my-digits.onnx", part="predictor_ood")
    print(f"exported {res.onnx_path.name}: ONNX Runtime parity {'passed' if res.verification['passed'] else 'FAILED'} "
          f"(probs max abs {res.verification['outputs']['probs']['max_abs']:.1e})")


if __name__ == "__main__":
    main()
