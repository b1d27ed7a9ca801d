"""Exploration for #4: do other published feature scorers separate the far shifts better than the shipped ones?

Not shipped scorers; a record of what was tried on the shipped segmenter. Fit on 512 in-distribution
validation scenes (seed 1000), AUROC of 256 in-distribution scenes vs 256 scenes of each shift, both from a
selection seed (1500) that is neither the validation nor the test seed. Candidates:

- gram_sastry: Gram matrices of each encoder conv's activations (orders 1 and 2), per-entry min/max
  deviations summed over layers, each layer normalised by its mean deviation on held-out in-distribution
  scenes (Sastry & Oore, ICML 2020);
- maha_mean_std: Mahalanobis distance of the encoder features' mean and standard deviation over positions;
- local_maha: one Gaussian over per-position features of encoder conv 1 (PaDiM-like), mean over positions;
- slot_knn: cosine distance of each slot (mask mass > 1%) to its nearest in-distribution slot, mean over slots;
- recon_mse: the shipped reconstruction error, for reference.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/explore_ood_scorers.py > docs/ood_scorer_exploration.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from tta_runtime import Runtime
from tta_runtime.data.scenes import OOD_SPLITS, VAL_SEED, generate_scenes
from tta_runtime.models.segmenter import images_to_tensor

SELECTION_SEED = 1_500


def features(model: torch.nn.Module, split: str, n: int, seed: int, start: int = 0) -> dict[str, np.ndarray]:
    images, _ = generate_scenes(split, n, seed=seed, start=start)
    x = images_to_tensor(images)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        convs = list(model.encoder.convs)
        h = x
        for layer in range(len(convs) // 2):
            h = convs[2 * layer + 1](convs[2 * layer](h))  # conv, ReLU
            f = h.flatten(2)  # (B, C, N)
            iu = torch.triu_indices(f.shape[1], f.shape[1])
            for p in (1, 2):
                fp = f.abs() ** p * f.sign()
                g = torch.einsum("bcn,bdn->bcd", fp, fp) / f.shape[2]
                g = g.sign() * g.abs() ** (1 / p)
                out[f"gram{layer}_{p}"] = g[:, iu[0], iu[1]].numpy()
            if layer == 1:
                out["local"] = h.permute(0, 2, 3, 1).reshape(n, -1, h.shape[1]).numpy()
        enc = model.encode(x)
        o = model.forward_features(enc)
        out["mean_std"] = torch.cat([enc.mean(1), enc.std(1)], 1).numpy()
        out["slots"], out["mass"] = o.slots.numpy(), o.masks.mean(2).numpy()
        out["recon_mse"] = ((o.reconstruction - x.flatten(2).transpose(1, 2)) ** 2).mean((1, 2)).numpy()
    return out


def _maha_fit(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cov = np.cov(z.T)
    return z.mean(0), np.linalg.inv(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)))


def _maha(q: np.ndarray, mu: np.ndarray, prec: np.ndarray) -> np.ndarray:
    d = q - mu
    return np.einsum("...i,ij,...j->...", d, prec, d)


def _sastry(fit: np.ndarray, q: np.ndarray) -> np.ndarray:
    lo, hi = fit.min(0), fit.max(0)
    return (np.where(q < lo, (lo - q) / (np.abs(lo) + 1e-6), 0) + np.where(q > hi, (q - hi) / (np.abs(hi) + 1e-6), 0)).sum(1)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def main() -> dict:
    torch.set_num_threads(1)
    model = Runtime.from_pretrained().model
    fit = features(model, "in_dist", 512, VAL_SEED)
    held = features(model, "in_dist", 256, VAL_SEED, start=512)
    gram_keys = [k for k in fit if k.startswith("gram")]
    ms = _maha_fit(fit["mean_std"])
    loc = _maha_fit(fit["local"].reshape(-1, fit["local"].shape[-1]).astype(np.float64))
    bank = _unit(fit["slots"][fit["mass"] > 0.01])
    gram_scale = {k: _sastry(fit[k], held[k]).mean() + 1e-12 for k in gram_keys}

    def scores(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b, k, d = f["slots"].shape
        dist = (1 - _unit(f["slots"].reshape(-1, d)) @ bank.T).min(1).reshape(b, k)
        return {
            "gram_sastry": sum(_sastry(fit[key], f[key]) / gram_scale[key] for key in gram_keys),
            "maha_mean_std": _maha(f["mean_std"], *ms),
            "local_maha": _maha(f["local"], *loc).mean(1),
            "slot_knn": np.nanmean(np.where(f["mass"] > 0.01, dist, np.nan), 1),
            "recon_mse": f["recon_mse"],
        }

    ind = scores(features(model, "in_dist", 256, SELECTION_SEED))
    auroc: dict[str, dict[str, float]] = {}
    for split in OOD_SPLITS:
        ood = scores(features(model, split, 256, SELECTION_SEED))
        for name in ind:
            y = np.r_[np.zeros(len(ind[name])), np.ones(len(ood[name]))]
            auroc.setdefault(name, {})[split] = round(float(roc_auc_score(y, np.r_[ind[name], ood[name]])), 3)
    return {
        "model": "slot-shapes-32", "fit": {"split": "in_dist", "seed": VAL_SEED, "n": 512},
        "eval": {"seed": SELECTION_SEED, "n_per_split": 256}, "auroc": auroc,
        "command": "OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/explore_ood_scorers.py > docs/ood_scorer_exploration.json",
    }


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=2)
    print()
