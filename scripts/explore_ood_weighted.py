"""Exploration for #4 (2026-11-28): one scorer for both far shifts? Weighted sums and maxima of the
Mahalanobis (encoder mean + std) and mask-disagreement z-scores, and Mahalanobis on the joint vector
[encoder mean + std, mask disagreement], on selection scenes only (seed 1500, 256 per split).

z-scores use held-out validation scenes (seed 1000, indices 512-767), as `explore_ood_combinations.py`.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/explore_ood_weighted.py   # -> docs/ood_weighted_combinations.json
"""
import json, numpy as np, torch
import tta_runtime as tta
from tta_runtime.ood import auroc, load_calibration, scene_features, make_scorer, OODFeatures
from tta_runtime.data.scenes import VAL_SEED

torch.set_num_threads(1)
rt = tta.Runtime.from_pretrained()
cals = load_calibration(rt.folder)
maha, md = cals["mahalanobis"], cals["mask_disagreement"]
SEL = 1500
SHIFTS = ("textured_background", "unseen_shapes", "textured_objects", "unseen_colours", "noise_blur", "more_objects")


def feats(split, seed, n, start=0):
    return scene_features(rt.model, split, n, seed, start=start, embedding="encoder_meanstd")


fit = feats("in_dist", VAL_SEED, 256)  # the calibration's fit scenes (0-255)
ref = feats("in_dist", VAL_SEED, 256, start=512)
base = feats("in_dist", SEL, 256)
sh = {s: feats(s, SEL, 256) for s in SHIFTS}


def raw(f):
    return np.stack([maha.score(f), md.score(f)])  # (2, N)


r = raw(ref)
mu, sd = r.mean(1, keepdims=True), r.std(1, keepdims=True)
z = lambda f: (raw(f) - mu) / sd
zb, zs = z(base), {s: z(f) for s, f in sh.items()}
out = {}
for w in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0):
    out[f"sum(maha + {w} md)"] = {s: round(auroc(zb[0] + w * zb[1], v[0] + w * v[1]), 4) for s, v in zs.items()}
for c in (0.0, 1.0, 2.0, 3.0, 4.0):
    out[f"max(maha, md - {c})"] = {s: round(auroc(np.maximum(zb[0], zb[1] - c), np.maximum(v[0], v[1] - c)), 4) for s, v in zs.items()}
# Mahalanobis on the joint vector: embedding + the disagreement (log, scaled like the embedding)
def joint(f, k):
    return OODFeatures(embedding=np.concatenate([f.embedding, k * np.log(f.mask_disagreement + 1e-6)[:, None]], 1))
for k in (1.0,):
    m = make_scorer("mahalanobis"); m.fit(joint(fit, k))
    out["maha(joint)"] = {s: round(auroc(m.score(joint(base, k)), m.score(joint(f, k))), 4) for s, f in sh.items()}
for k, v in out.items():
    print(f"{k:24s}", v["textured_background"], v["unseen_shapes"], "min", min(v["textured_background"], v["unseen_shapes"]), flush=True)
json.dump(out, open("docs/ood_weighted_combinations.json", "w"), indent=1)
