"""Exploration for #4: do sums or maxima of the shipped scorers' z-scores separate the far shifts better?

Each shipped calibration (models/slot-shapes-32/ood) scores 256 in-distribution scenes of the selection seed 1500
(neither the validation nor the test seed) and 256 of each shift; z-scores use 256 held-out validation scenes
(seed 1000, indices 512-767). AUROC per combination (sum or max of z-scores) and shift.

Re-run 2026-11-28 on the current calibrations (Mahalanobis on encoder mean + std, mask_disagreement): the
pair's max reaches 0.929 on textured backgrounds and 0.965 on unseen shapes, its sum 0.922 / 0.966, against
0.947 for Mahalanobis alone on textured backgrounds. No combined scorer was shipped.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/explore_ood_combinations.py   # -> docs/ood_combined_scorers.json
"""
import json, itertools, numpy as np, torch
import tta_runtime as tta
from tta_runtime.ood import load_calibration, scene_features, auroc
from tta_runtime.data.scenes import VAL_SEED
torch.set_num_threads(1)
rt = tta.Runtime.from_pretrained()
cals = load_calibration(rt.folder)
kinds = sorted({c.embedding for c in cals.values()})
def scores(split, seed, n, start=0):
    f = {k: scene_features(rt.model, split, n, seed, start=start, embedding=k) for k in kinds}
    return {name: c.score(f[c.embedding]) for name, c in cals.items()}
ref = scores("in_dist", VAL_SEED, 256, start=512)   # held-out validation scenes for the z-scores
mu = {k: v.mean() for k, v in ref.items()}; sd = {k: v.std() + 1e-12 for k, v in ref.items()}
SEL = 1500
base = scores("in_dist", SEL, 256)
out = {}
shifted = {s: scores(s, SEL, 256) for s in ("textured_background", "unseen_shapes", "textured_objects", "unseen_colours", "noise_blur", "more_objects")}
names = list(cals)
combos = [(n,) for n in names] + list(itertools.combinations(names, 2)) + list(itertools.combinations(names, 3)) + [tuple(names)]
for combo in combos:
    for agg in ("sum", "max"):
        if len(combo) == 1 and agg == "max": continue
        def z(d): 
            zs = np.stack([(d[n] - mu[n]) / sd[n] for n in combo])
            return zs.sum(0) if agg == "sum" else zs.max(0)
        row = {s: round(auroc(z(base), z(v)), 3) for s, v in shifted.items()}
        out[f"{agg}({'+'.join(combo)})"] = row
        print(f"{agg}({'+'.join(combo)})", row, flush=True)
json.dump(out, open("docs/ood_combined_scorers.json", "w"), indent=1)
