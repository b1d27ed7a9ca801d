"""Exploration for #4 (2026-11-28): variants of the decoder/attention disagreement signal, on selection
scenes only (256 in-distribution scenes and 256 per shift, seed 1500; neither validation nor test). AUROC
of the raw per-image statistic: mean KL over all pixels (the first shipped mask_disagreement, 0.934 on
unseen shapes), quantiles of the per-pixel KL, Jensen-Shannon, argmax disagreement, per-slot L1, and the
mean KL over foreground pixels (0.975 on unseen shapes), which became the shipped mask_disagreement.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/explore_ood_disagreement.py   # -> docs/ood_disagreement_variants.json
"""
import json, numpy as np, torch
import tta_runtime as tta
from tta_runtime.ood import auroc
from tta_runtime.data.scenes import generate_scenes
torch.set_num_threads(1)
rt = tta.Runtime.from_pretrained(); m = rt.model; cfg = m.cfg
def stats(split, seed, n):
    imgs, _ = generate_scenes(split, n, seed=seed, size=cfg.resolution)
    rows = {}
    with torch.inference_mode():
        for i in range(0, n, 64):
            x = torch.from_numpy(imgs[i:i+64]).permute(0,3,1,2).float()/255
            out = m(x); dec, att = out.masks, out.attention.clamp_min(1e-12)
            kl_pix = (dec*(torch.log(dec.clamp_min(1e-12))-torch.log(att))).sum(1)  # B,P
            d = {'kl_mean': kl_pix.mean(1)}
            for q in (0.5, 0.75, 0.9, 0.95, 0.99):
                d[f'kl_q{q}'] = torch.quantile(kl_pix, q, dim=1)
            js_m = 0.5*(dec+att)
            js = 0.5*(dec*(torch.log(dec.clamp_min(1e-12))-torch.log(js_m))).sum(1) + 0.5*(att*(torch.log(att)-torch.log(js_m))).sum(1)
            d['js_mean'] = js.mean(1)
            hard_dec, hard_att = dec.argmax(1), att.argmax(1)
            d['argmax_disagree'] = (hard_dec != hard_att).float().mean(1)
            # per-slot: L1 between the slot's decoder mask and attention map, over its area
            area = (dec + att).sum(2).clamp_min(1e-6)
            per_slot = (dec - att).abs().sum(2) / area  # B,K in [0,1]
            w = dec.sum(2) / dec.shape[2]
            d['slot_l1_max_big'] = torch.where(w > 0.02, per_slot, torch.zeros_like(per_slot)).max(1).values
            d['slot_l1_wmean'] = (per_slot * w).sum(1)
            # foreground only: pixels not in the biggest (background) slot
            bg = dec.sum(2).argmax(1)  # B
            fg = (hard_dec != bg[:, None]).float()
            d['kl_fg'] = (kl_pix * fg).sum(1) / fg.sum(1).clamp_min(1)
            for k, v in d.items(): rows.setdefault(k, []).append(v.double().numpy())
    return {k: np.concatenate(v) for k, v in rows.items()}
SEL = 1500
base = stats("in_dist", SEL, 256)
shifts = ("unseen_shapes", "textured_background", "textured_objects", "unseen_colours", "noise_blur", "more_objects")
sh = {s: stats(s, SEL, 256) for s in shifts}
res = {k: {s: round(auroc(base[k], sh[s][k]), 3) for s in shifts} for k in base}
for k, v in res.items(): print(f"{k:18s}", v, flush=True)
json.dump(res, open('docs/ood_disagreement_variants.json', 'w'), indent=1)
