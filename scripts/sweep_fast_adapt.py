"""Choose a fast Slot-TTA preset on validation scenes (seed 1000, never the test seed).

    python scripts/sweep_fast_adapt.py --n-images 6 --stage a|b|c [--out out/sweep_fast]

Every candidate is the faithful recipe (adapters/slot_tta.toml) with a few fields overridden. Per image:
FG-ARI before adaptation, after the faithful recipe (computed once and cached in OUT/faithful.json, so
stages reuse it), and after each candidate, with seconds per image (one thread). Prints, per candidate,
the mean FG-ARI after, the gain over before, the gain as a fraction of the faithful gain and the time as
a fraction of the faithful time; appends every row to OUT/rows.jsonl. Used to pick
adapters/slot_tta_fast.toml and adapters/slot_tta_turbo.toml (their comments give the numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tta_runtime as tta
from tta_runtime.metrics import fg_ari
from tta_runtime.data.scenes import OOD_SPLITS, VAL_SEED, generate_scenes

COS = {"lr_schedule": "cosine", "warmup_steps": 5, "lr_final_fraction": 0.1}
NOENC = {"params": "no_encoder"}


def _c(px: float, lr: float, steps: int, *, params: str = "no_encoder", cosine: bool = True, state: str = "fresh") -> dict[str, Any]:
    """A candidate: the faithful recipe with these fields changed."""
    d: dict[str, Any] = {"pixel_fraction": px, "lr": lr, "steps": steps}
    if params != "all":
        d["params"] = params
    if cosine:
        d.update(COS)
    if state != "fresh":
        d["optimizer_state"] = state
    return d


# The stages as they were run, in order (names as printed then; rows.jsonl keys on them).
STAGES: dict[str, dict[str, dict[str, Any]]] = {
    # lr x steps with warm-up + cosine, encoder frozen, a quarter of the pixels, fresh Adam
    "a": {
        f"noenc_px25_{'const' if lr == 5e-4 else 'cos'}_lr{lr:g}_s{s}": _c(0.25, lr, s, cosine=lr != 5e-4)
        for lr in (5e-4, 1e-3, 2e-3, 4e-3)
        for s in (30, 60)
    },
    # around the best of a: more steps, lower lr, more pixels, constant lr, training moments, all parameters
    "b": {
        "noenc_px25_cos_lr1e-3_s45": _c(0.25, 1e-3, 45),
        "noenc_px25_cos_lr1e-3_s90": _c(0.25, 1e-3, 90),
        "noenc_px25_cos_lr7e-4_s60": _c(0.25, 7e-4, 60),
        "noenc_px25_cos_lr7e-4_s90": _c(0.25, 7e-4, 90),
        "noenc_px25_cos_lr1.4e-3_s60": _c(0.25, 1.4e-3, 60),
        "noenc_px50_cos_lr1e-3_s60": _c(0.5, 1e-3, 60),
        "noenc_px25_const_lr1e-3_s60": _c(0.25, 1e-3, 60, cosine=False),
        "noenc_px25_cos_lr1e-3_s60_train": _c(0.25, 1e-3, 60, state="training"),
        "all_px25_cos_lr1e-3_s60": _c(0.25, 1e-3, 60, params="all"),
    },
    # lr 5e-4 .. 1e-3, 40-90 steps, an eighth to a half of the pixels, within about 1/5 of the faithful time
    "c": {
        "noenc_px50_cos_lr7e-4_s45": _c(0.5, 7e-4, 45),
        "noenc_px50_cos_lr1e-3_s45": _c(0.5, 1e-3, 45),
        "noenc_px25_cos_lr7e-4_s75": _c(0.25, 7e-4, 75),
        "noenc_px25_cos_lr5e-4_s75": _c(0.25, 5e-4, 75),
        "noenc_px375_cos_lr7e-4_s60": _c(0.375, 7e-4, 60),
        "noenc_px50_cos_lr5e-4_s60": _c(0.5, 5e-4, 60),
        "noenc_px25_cos_lr7e-4_s40": _c(0.25, 7e-4, 40),
        "noenc_px125_cos_lr7e-4_s90": _c(0.125, 7e-4, 90),
    },
}


def _score(rt: tta.Runtime, data: dict[str, tuple[np.ndarray, np.ndarray]], overrides: dict[str, Any]) -> dict[str, Any]:
    scores, seconds = [], []
    for ims, inst in data.values():
        for i in range(len(ims)):
            t = time.perf_counter()
            res = rt.adapt_and_predict(ims[i], **overrides)
            seconds.append(time.perf_counter() - t)
            scores.append(fg_ari(inst[i], res.segmentation))
    return {"fg_ari": scores, "seconds_per_image": float(np.mean(seconds))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=6, help="images per split")
    p.add_argument("--splits", default=",".join(OOD_SPLITS))
    p.add_argument("--stage", default="a", help=f"one of {sorted(STAGES)}, or a JSON object name -> overrides")
    p.add_argument("--out", default="out/sweep_fast")
    p.add_argument("--model", default=None, help="model name or folder [the shipped default]")
    p.add_argument("--skip-faithful", action="store_true", help="no faithful reference (fractions are then blank)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = args.splits.split(",")
    rt = tta.Runtime.from_pretrained(args.model)
    data = {s: generate_scenes(s, args.n_images, VAL_SEED, rt.input_size) for s in splits}
    key = f"{args.n_images}x{','.join(splits)}"
    cache = out / "faithful.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in cached:
        before = [fg_ari(inst[i], rt.predict(ims[i]).segmentation) for ims, inst in data.values() for i in range(len(ims))]
        faithful_run = {"fg_ari": [float("nan")], "seconds_per_image": float("nan")} if args.skip_faithful else _score(rt, data, {})
        cached[key] = {"before": before, "faithful": faithful_run}
        cache.write_text(json.dumps(cached))
    before = np.asarray(cached[key]["before"])
    faithful = cached[key]["faithful"]
    g_f = float(np.mean(faithful["fg_ari"]) - before.mean())
    print(f"{key}: before {before.mean():.3f}  faithful {np.mean(faithful['fg_ari']):.3f} (gain {g_f:+.3f}, "
          f"{faithful['seconds_per_image']:.2f} s/img)", flush=True)
    candidates = STAGES[args.stage] if args.stage in STAGES else json.loads(args.stage)
    for name, overrides in candidates.items():
        r = _score(rt, data, overrides)
        after = np.asarray(r["fg_ari"])
        gain = float(after.mean() - before.mean())
        n = args.n_images
        per_split = [float(np.mean(after[k * n:(k + 1) * n] - before[k * n:(k + 1) * n])) for k in range(len(splits))]
        row = {"key": key, "name": name, "overrides": overrides, "after": float(after.mean()), "gain": gain,
               "gain_fraction": gain / g_f, "seconds_per_image": r["seconds_per_image"],
               "time_fraction": r["seconds_per_image"] / faithful["seconds_per_image"],
               "gain_per_split": dict(zip(splits, [round(x, 3) for x in per_split], strict=True)), "fg_ari": r["fg_ari"]}
        with (out / "rows.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:40} after {row['after']:.3f} gain {gain:+.3f} ({row['gain_fraction']:5.0%} of faithful) "
              f"{r['seconds_per_image']:.2f} s/img ({row['time_fraction']:.2f}x)  {row['gain_per_split']}", flush=True)


if __name__ == "__main__":
    main()
