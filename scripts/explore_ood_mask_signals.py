"""Exploration for #4 (2026-11-28): per-image signals of the slot model's own outputs, and Mahalanobis on
pooled encoder features with more fit images, against each shift, on selection scenes only.

Fit: in-distribution validation scenes (seed 1000; argv[1] of them, 2048 here). Scored: 256 in-distribution
scenes and 256 of each shift at the selection seed 1500 (neither the validation nor the test seed). Signals:
reconstruction error (mean, 99th percentile), entropies of the decoder masks / slot-attention maps / their
product, L1 and both KL directions between decoder masks and attention maps, the worst slot's reconstruction
error, and Mahalanobis on the encoder features' spatial mean, std and both, fitted on 256, 1024 or 2048 scenes.
KL(decoder || attention) (0.934 on unseen shapes, against 0.912 for mask entropy) became the shipped
`mask_disagreement` scorer.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/explore_ood_mask_signals.py 2048   # -> docs/ood_mask_signals.json
"""
import json, sys, numpy as np, torch
import tta_runtime as tta
from tta_runtime.ood import auroc
from tta_runtime.data.scenes import generate_scenes, VAL_SEED
from tta_runtime.models.segmenter import segmentation_masks
torch.set_num_threads(1)
rt = tta.Runtime.from_pretrained(); m = rt.model; cfg = m.cfg
def stats(split, seed, n, start=0):
    imgs, _ = generate_scenes(split, n, seed=seed, size=cfg.resolution, start=start)
    rows = {}
    with torch.inference_mode():
        for i in range(0, n, 64):
            x = torch.from_numpy(imgs[i:i+64]).permute(0,3,1,2).float()/255
            enc = m.encode(x); out = m.forward_features(enc)
            tgt = x.flatten(2).transpose(1,2)
            err = ((out.reconstruction - tgt)**2).mean(-1)  # B,P
            dec = out.masks; att = out.attention; prod = segmentation_masks(cfg, out)
            ent = lambda p: -(p*torch.log(p.clamp_min(1e-12))).sum(1).mean(1)
            d = {}
            d['recon'] = err.mean(1)
            d['recon_p99'] = torch.quantile(err, 0.99, dim=1)
            d['dec_ent'] = ent(dec); d['att_ent'] = ent(att); d['prod_ent'] = ent(prod)
            d['l1_dec_att'] = 0.5*(dec-att).abs().sum(1).mean(1)
            d['kl_att_dec'] = (att*(torch.log(att.clamp_min(1e-12))-torch.log(dec.clamp_min(1e-12)))).sum(1).mean(1)
            d['kl_dec_att'] = (dec*(torch.log(dec.clamp_min(1e-12))-torch.log(att.clamp_min(1e-12)))).sum(1).mean(1)
            mass = prod.sum(2, keepdim=True).clamp_min(1e-6)
            slot_err = (prod*err[:,None]).sum(2)/mass[...,0]
            d['slot_err_max'] = slot_err.max(1).values
            d['emb'] = enc.mean(1); d['emb_std'] = enc.std(1)
            d['slots_sorted'] = out.slots.norm(dim=-1).sort(1).values
            for k, v in d.items(): rows.setdefault(k, []).append(v.double().numpy())
    return {k: np.concatenate(v) for k, v in rows.items()}
fit = stats("in_dist", VAL_SEED, int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
SEL = 1500
base = stats("in_dist", SEL, 256)
shifts = ("textured_background", "unseen_shapes", "textured_objects", "unseen_colours", "noise_blur", "more_objects")
sh = {s: stats(s, SEL, 256) for s in shifts}
def maha(fitx, n):
    X = fitx[:n]; mu = X.mean(0); C = np.cov(X, rowvar=False) + 1e-6*np.eye(X.shape[1]); P = np.linalg.pinv(C)
    return lambda Y: np.einsum('ij,jk,ik->i', Y-mu, P, Y-mu)
res = {}
scal = [k for k in base if base[k].ndim == 1]
for k in scal:
    res[k] = {s: round(auroc(base[k], sh[s][k]), 3) for s in shifts}
for n in (256, 1024, len(fit['emb'])):
  for feat in ('emb', 'emb_std', 'slots_sorted'):
    f = maha(fit[feat], n); res[f'maha_{feat}_{n}'] = {s: round(auroc(f(base[feat]), f(sh[s][feat])), 3) for s in shifts}
  cat = lambda d: np.concatenate([d['emb'], d['emb_std']], 1)
  f = maha(cat(fit), n); res[f'maha_meanstd_{n}'] = {s: round(auroc(f(cat(base)), f(cat(sh[s]))), 3) for s in shifts}
for k, v in res.items(): print(f"{k:24s}", v['textured_background'], v['unseen_shapes'], v, flush=True)
json.dump(res, open('docs/ood_mask_signals.json', 'w'), indent=1)
