"""FTWT dynamic channel pruning of the shipped digits BN classifier: accuracy, FLOPs and CPU latency per r.

For each r: start from models/digits-cnn-bn, train the mask predictors and fine-tune the backbone
(tta_runtime.pruning.train_ftwt, decoupled), then report on the digits test split

- clean accuracy of the mask-multiply path (dynamic k, predictor > 0.5) and of the static-k top-k path,
- theoretical conv MACs reduction (kept in x kept out per conv) with and without predictor + head cost,
- mean kept fraction per unit,
- median batch-1 CPU latency of the gather path against the dense model, interleaved in the same run.

Static k per unit = each of the ``--quantiles`` of the predicted kept counts on the VAL split (test is not looked at).

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/ftwt_digits.py
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tta_runtime.classifier import images_to_tensor, load_classifier
from tta_runtime.digits import load_digits
from tta_runtime.pruning import (
    GatheredClassifier,
    interleaved_latency,
    predictor_macs,
    static_ks,
    train_ftwt,
    unit_macs,
)
from tta_runtime.train_classifier import _augment  # the shipped model's own augmentation
from tta_runtime.visual import line_plot, panel, save_png

MODEL = "digits-cnn-bn"


def plot(report: dict, path: Path) -> None:
    """Two panels over the r values (sorted by FLOPs cut): test accuracy, and theoretical FLOPs reduction."""
    rows = sorted(report["rows"], key=lambda x: x["flops_reduction_conv"])
    base_acc = report["baseline_test_accuracy"]
    x_label = "r = " + ", ".join(f"{x['r']:g}" for x in rows)
    acc = line_plot(
        {
            "dynamic": [100 * x["accuracy_mask_multiply"] for x in rows],
            **{f"static {k}": [100 * x["static"][k]["accuracy"] for x in rows] for k in rows[0]["static"]},
            "shipped": [100 * base_acc] * len(rows),
            "shipped - 1pt": [100 * base_acc - 1] * len(rows),
        },
        size=(300, 420), title="test accuracy (%)", x_label=x_label,
    )
    cut = line_plot(
        {
            "conv MACs cut (%)": [100 * x["flops_reduction_conv"] for x in rows],
            "50% target": [50.0] * len(rows),
            **{f"gather/dense latency {k} (%)": [100 * x["static"][k]["latency_ratio_vs_dense"] for x in rows]
               for k in rows[0]["static"]},
        },
        size=(300, 420), title="FLOPs reduction, latency ratio (%)", x_label=x_label,
    )
    save_png(path, panel([(f"FTWT {report['model']}: accuracy", acc), ("cost", cut)]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rs", default="0.5,0.6,0.65,0.7,0.8,0.9")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--quantiles", default="0.5,0.8", help="static k per unit: these quantiles of val kept counts")
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--out", default="docs/pruning")
    p.add_argument("--static-quantile", type=float, default=None,
                   help="fine-tune the backbone with static top-k masks (k = this quantile of train kept counts) "
                   "after the predictor phase; writes ftwt_digits_static.{json,png}")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the existing JSON")
    args = p.parse_args()
    if args.replot:
        for stem in ("ftwt_digits", "ftwt_digits_static"):
            src = Path(args.out) / f"{stem}.json"
            if src.exists():
                plot(json.loads(src.read_text()), src.with_suffix(".png"))
        return 0
    quantiles = [float(v) for v in args.quantiles.split(",")]
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = load_digits("train")
    x_val, _ = load_digits("val")
    x_te, y_te = load_digits("test")
    t_val, t_te = images_to_tensor(x_val), images_to_tensor(x_te)

    base, card = load_classifier(MODEL)
    with torch.inference_mode():
        base_acc = float((base(t_te).logits.argmax(1).numpy() == y_te).mean())
    rows = []
    for r in [float(v) for v in args.rs.split(",")]:
        backbone, _ = load_classifier(MODEL)
        t0 = time.perf_counter()
        model, train_log = train_ftwt(
            backbone, x_tr, y_tr, r=r, epochs=args.epochs, augment=_augment,
            predictor_optimizer="adam", lr_predictor=1e-2, lr_backbone=1e-2, seed=0,
            static_quantile=args.static_quantile,
        )
        units = model.units
        widths = [u.conv.out_channels for u in units]
        full = torch.tensor([widths], dtype=torch.float64)
        dense_macs = float(unit_macs(units, full).sum())
        head_macs = base.head.in_features * base.head.out_features
        with torch.inference_mode():
            dyn = model(t_te)
            acc_dyn = float((dyn.logits.argmax(1).numpy() == y_te).mean())
            kept = torch.stack([m.sum(1) for m in dyn.masks], 1)  # (N, U)
            macs_dyn = unit_macs(units, kept)  # (N, U)
            val_kept = torch.stack([m.sum(1) for m in model(t_val).masks], 1)  # (N_val, U)
            folded = GatheredClassifier(model, None)
            x1 = t_te[:1].clone()
            fns = {"dense": lambda: base(x1), "dense_folded": lambda: folded(x1)}
            static = {}
            choices = [(f"q{q:g}", q, static_ks(val_kept, widths, q)) for q in quantiles]
            if train_log.static_k is not None:
                choices = [("trained", args.static_quantile, train_log.static_k)]
            for key, q, ks in choices:
                st_out = model(t_te, masks="topk", ks=ks)  # mask-multiply with the static-k decisions
                acc_static = float((st_out.logits.argmax(1).numpy() == y_te).mean())
                macs_static = float(unit_macs(units, torch.tensor([ks], dtype=torch.float64)).sum())
                gather = GatheredClassifier(model, ks)
                # the gather path must agree with mask-multiply on the same top-k masks
                gl = torch.cat([gather(t_te[i : i + 1]) for i in range(64)])
                ref = st_out.logits[:64]
                fns[f"gather_{key}"] = (lambda g: (lambda: g(x1)))(gather)
                static[key] = {
                    "quantile": q,
                    "k": ks,
                    "accuracy": acc_static,
                    "accuracy_drop_points": round(100 * (base_acc - acc_static), 3),
                    "flops_reduction": round(1 - macs_static / dense_macs, 4),
                    "gather_vs_mask_multiply_max_abs_logit_diff": float((gl - ref).abs().max()),
                }
            lat = interleaved_latency(fns, calls=args.calls)
        for key, st in static.items():
            st["latency_ms_gather"] = round(lat[f"gather_{key}"] * 1e3, 4)
            st["latency_ratio_vs_dense"] = round(lat[f"gather_{key}"] / lat["dense"], 3)
            st["latency_ratio_vs_dense_folded"] = round(lat[f"gather_{key}"] / lat["dense_folded"], 3)
        row = {
            "r": r,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "final_epoch": train_log.epochs[-1],
            "accuracy_mask_multiply": acc_dyn,
            "accuracy_drop_points": round(100 * (base_acc - acc_dyn), 3),
            "mean_kept_fraction_per_unit": [round(float(kept[:, u].mean()) / widths[u], 4) for u in range(len(units))],
            "conv_macs_dense": dense_macs,
            "conv_macs_per_unit_mean": [round(float(v)) for v in macs_dyn.mean(0)],
            "flops_reduction_conv": round(1 - float(macs_dyn.sum(1).mean()) / dense_macs, 4),
            "flops_reduction_with_predictors_and_head": round(
                1 - (float(macs_dyn.sum(1).mean() + predictor_macs(units, kept).mean()) + head_macs)
                / (dense_macs + head_macs), 4),
            "flops_reduction_per_input_quantiles": {
                q: round(1 - float(torch.quantile(macs_dyn.sum(1), 1 - q)) / dense_macs, 4) for q in (0.1, 0.5, 0.9)
            },
            "latency_ms_batch1": {"dense": round(lat["dense"] * 1e3, 4), "dense_folded": round(lat["dense_folded"] * 1e3, 4)},
            "static": static,
        }
        print(json.dumps({k: row[k] for k in (
            "r", "accuracy_mask_multiply", "flops_reduction_conv", "latency_ms_batch1", "static")}), flush=True)
        rows.append(row)

    statics = [(x["r"], st) for x in rows for st in x["static"].values()]
    ok_flops = [x["r"] for x in rows if x["flops_reduction_conv"] >= 0.5 and x["accuracy_drop_points"] <= 1.0]
    fits = lambda st: st["flops_reduction"] >= 0.5 and st["accuracy_drop_points"] <= 1.0  # noqa: E731
    ok_static = [(r, st["quantile"]) for r, st in statics if fits(st)]
    ok_lat = [(r, st["quantile"]) for r, st in statics if st["latency_ratio_vs_dense"] <= 0.7]
    # the honest versions: at a setting that also keeps accuracy, and against the same BN-folded kernels
    ok_lat_acc = [(r, st["quantile"]) for r, st in statics if st["latency_ratio_vs_dense"] <= 0.7 and st["accuracy_drop_points"] <= 1.0]
    ok_lat_folded = [(r, st["quantile"]) for r, st in statics if st["latency_ratio_vs_dense_folded"] <= 0.7]
    report = {
        "model": MODEL,
        "baseline_test_accuracy": base_acc,
        "n_test": len(y_te),
        "command": "OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python " + shlex.join(sys.argv),
        "args": vars(args),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "latency_note": "dense = the shipped CNNClassifier forward (AdaptiveBatchNorm as a separate op); "
        "dense_folded = the same gather code with no pruning (BN folded into the conv weights and bias): most of "
        "the gather path's gain over 'dense' is the folding, not the pruning; at batch 1 these tiny convs "
        "(<= 2.4 M MACs each) are overhead-bound, so cost does not fall in proportion to MACs",
        "recipe": "decoupled FTWT; backbone SGD lr 1e-2 momentum 0.9 (BN train mode, shipped augmentation), "
        "predictors Adam lr 1e-2 (SGD 0.1 learned too slowly in a few epochs), BCE weight 1 for the first half of "
        "the epochs then 0; unit 0 (the conv reading the image) unpruned",
        "targets": {
            "flops_50pct_at_1pt_drop_mask_multiply": {"met": bool(ok_flops), "at_r": ok_flops},
            "flops_50pct_at_1pt_drop_static_k": {"met": bool(ok_static), "at_r_quantile": ok_static},
            "latency_ratio_le_0.7_batch1_vs_shipped_model": {"met": bool(ok_lat), "at_r_quantile": ok_lat},
            "latency_ratio_le_0.7_batch1_vs_shipped_model_with_le_1pt_drop": {"met": bool(ok_lat_acc), "at_r_quantile": ok_lat_acc},
            "latency_ratio_le_0.7_batch1_vs_bn_folded_dense": {"met": bool(ok_lat_folded), "at_r_quantile": ok_lat_folded},
        },
        "rows": rows,
    }
    stem = "ftwt_digits" if args.static_quantile is None else "ftwt_digits_static"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out_dir / f"{stem}.png")
    print(json.dumps(report["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
