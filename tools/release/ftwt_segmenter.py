"""FTWT dynamic channel pruning of the slot segmenter's encoder (slot-shapes-32): FG-ARI and FLOPs per r.

For each r: copy the shipped model, train the encoder's mask predictors and fine-tune the whole model with
the masks applied (tta_runtime.training.train_ftwt_segmenter, decoupled FTWT, the segmenter's own
training loss). A control fine-tunes the same way without masks. Then:

- r is chosen on the VALIDATION scenes (seed VAL_SEED, never the test seed): the largest mean encoder
  FLOPs cut among the r whose FG-ARI is within --tolerance of the shipped model both on in_dist and on the
  mean over the OOD splits (if none qualifies, the best validation FG-ARI, and the report says so);
- on the TEST scenes (seed TEST_SEED, as tta_runtime.evaluation.segmentation) FG-ARI per split for the shipped model,
  the control and every r, the theoretical encoder MACs reduction (mean over inputs; predictors counted)
  and the whole-model MACs fraction;
- Slot-TTA on top (--recipe, default slot_tta_fast) on the first --adapt-images test images of each OOD
  split: shipped dense vs the chosen pruned model, which adapts inside ``fixed_masks`` (the channels are
  chosen once on the input before adaptation), and the control.

The chosen variant is written to models/slot-shapes-32/prune/r<r>/ (tta_runtime.prune.save_pruned).

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python tools/release/ftwt_segmenter.py
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_runtime import Runtime
from tta_runtime.adapt.loop import Adapter
from tta_runtime.data.scenes import OOD_SPLITS, SPLITS, TEST_SEED, TRAIN_SEED, VAL_SEED, generate_scenes
from tta_runtime.hub import find_model, load_recipe
from tta_runtime.metrics import fg_ari
from tta_runtime.models.segmenter import SlotSegmenter, images_to_tensor, segmentation_masks
from tta_runtime.prune import PrunedSegmenter, save_pruned
from tta_runtime.prune import encoder_widths, model_macs
from tta_runtime.training import train_ftwt_segmenter
from tta_runtime.visual import line_plot, panel, save_png

MODEL = "slot-shapes-32"


def scenes(seed: int, n: int, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {split: generate_scenes(split, n, seed=seed, size=size) for split in SPLITS}


@torch.no_grad()
def forward_eval(model: SlotSegmenter, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per split: FG-ARI (mean and per image) and, for a pruned model, mean encoder MACs fraction and kept
    channels per unit."""
    out: dict[str, Any] = {}
    for split, (images, inst) in data.items():
        s = images.shape[1]
        scores, fracs, kept = [], [], []
        for i in range(0, len(images), 32):
            res = model(images_to_tensor(images[i : i + 32]))
            seg = segmentation_masks(model.cfg, res).argmax(1).reshape(-1, s, s).numpy()  # the card's mask source
            scores += [fg_ari(inst[i + j], seg[j]) for j in range(len(seg))]
            if isinstance(model, PrunedSegmenter):
                fracs.append(model.macs_fraction())
                kept.append(model.kept())
        row: dict[str, Any] = {"fg_ari": round(float(np.mean(scores)), 6), "per_image": [round(x, 6) for x in scores]}
        if fracs:
            row["encoder_macs_fraction"] = round(float(torch.cat(fracs).mean()), 6)
            row["kept_per_unit"] = [round(float(v), 3) for v in torch.cat(kept).mean(0)]
        out[split] = row
    ood = [out[s]["fg_ari"] for s in OOD_SPLITS if s in out]
    out["ood_mean_fg_ari"] = round(float(np.mean(ood)), 6)
    if isinstance(model, PrunedSegmenter):
        out["encoder_macs_fraction_mean"] = round(float(np.mean([out[s]["encoder_macs_fraction"] for s in data])), 6)
    return out


def adapt_eval(model: SlotSegmenter, data: dict[str, tuple[np.ndarray, np.ndarray]], recipe: Any, n: int) -> dict[str, Any]:
    """FG-ARI after adaptation on the first ``n`` images of each OOD split (episodic: weights restored)."""
    adapter = Adapter(model, recipe)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for split in OOD_SPLITS:
        images, inst = data[split]
        scores = []
        for i in range(n):
            x = images_to_tensor(images[i : i + 1])
            if isinstance(model, PrunedSegmenter):
                with model.fixed_masks(x):
                    final, _ = adapter.run(x)
            else:
                final, _ = adapter.run(x)
            seg = segmentation_masks(model.cfg, final)[0].argmax(0).reshape(x.shape[-2:]).numpy()
            scores.append(fg_ari(inst[i], seg))
        out[split] = {"fg_ari": round(float(np.mean(scores)), 6), "per_image": [round(x, 6) for x in scores]}
    out["ood_mean_fg_ari"] = round(float(np.mean([out[s]["fg_ari"] for s in OOD_SPLITS])), 6)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    chosen = report["chosen"]["variant"]
    test = report["test"]
    before = line_plot(
        {name: [test[name][s]["fg_ari"] for s in SPLITS] for name in ("shipped", "control", chosen)},
        size=(300, 460), title="test FG-ARI before adaptation", x_label="in_dist, then " + ", ".join(s[:6] for s in OOD_SPLITS),
    )
    ad = report["adapted"]
    n = report["adaptation"]["images_per_ood_split"]  # "before" on the same images as "+tta"
    after = line_plot(
        {f"{name} +tta": [ad[name][s]["fg_ari"] for s in OOD_SPLITS] for name in ad}
        | {name: [float(np.mean(test[name][s]["per_image"][:n])) for s in OOD_SPLITS] for name in ad},
        size=(300, 460), title=f"OOD FG-ARI, first {n} images, {report['adaptation']['recipe']}", x_label=", ".join(s[:6] for s in OOD_SPLITS),
    )
    save_png(path, panel([(f"FTWT {MODEL} encoder, {chosen}", before), ("with adaptation", after)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rs", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-predictor", type=float, default=0.05)
    ap.add_argument("--val-images", type=int, default=48)
    ap.add_argument("--test-images", type=int, default=32)
    ap.add_argument("--adapt-images", type=int, default=6)
    ap.add_argument("--recipe", default="slot_tta_fast")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/results/pruning/ftwt_segmenter.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()

    shipped = Runtime.from_pretrained(MODEL).model.eval()
    cfg = shipped.cfg
    macs = model_macs(shipped)
    val = scenes(VAL_SEED, args.val_images, cfg.resolution)
    test = scenes(TEST_SEED, args.test_images, cfg.resolution)
    print(f"dense MACs: {macs}", flush=True)

    models: dict[str, SlotSegmenter] = {"shipped": shipped}
    training: dict[str, Any] = {}
    # The fine-tuning loss is the one the shipped model's training ended with: its final mask weight, and the
    # matched loss on the slot-attention maps when it had one.
    trained = json.loads((find_model(MODEL) / "card.json").read_text())["training"]["config"]
    train_kw = dict(steps=args.steps, batch=args.batch, lr=args.lr, lr_predictor=args.lr_predictor, seed=TRAIN_SEED,
                    mask_weight=trained["mask_weight_final"], attn_weight=trained.get("attn_weight", 0.0))
    runs = [(f"r{r:g}", r, False) for r in args.rs] + ([] if args.no_control else [("control", 1.0, True)])
    for name, r, dense in runs:
        model, tlog = train_ftwt_segmenter(shipped, r=r, dense=dense, **train_kw)  # type: ignore[arg-type]
        models[name] = model
        training[name] = {"seconds": round(tlog.seconds, 1), "config": tlog.config, "log": tlog.lines}
        print(f"{name}: trained {args.steps} steps in {tlog.seconds:.0f} s; last {tlog.lines[-1]}", flush=True)

    # Validation: the only place r is chosen.
    val_rows = {}
    for name, model in models.items():
        if name == "control":
            model = SlotSegmenter(cfg).eval()
            model.load_state_dict({k: v for k, v in models["control"].state_dict().items() if not k.startswith("predictors.")})
            models["control"] = model
        val_rows[name] = forward_eval(model, val)
        print(f"val {name}: in_dist {val_rows[name]['in_dist']['fg_ari']:.4f} ood {val_rows[name]['ood_mean_fg_ari']:.4f} "
              f"macs {val_rows[name].get('encoder_macs_fraction_mean', 1.0):.3f}", flush=True)
    ref = val_rows["shipped"]
    ok = [
        f"r{r:g}" for r in args.rs
        if val_rows[f"r{r:g}"]["in_dist"]["fg_ari"] >= ref["in_dist"]["fg_ari"] - args.tolerance
        and val_rows[f"r{r:g}"]["ood_mean_fg_ari"] >= ref["ood_mean_fg_ari"] - args.tolerance
    ]
    if ok:
        chosen = min(ok, key=lambda n: val_rows[n]["encoder_macs_fraction_mean"])
        why = f"largest validation encoder MACs cut among r within {args.tolerance} FG-ARI of the shipped model (in_dist and OOD mean)"
    else:
        chosen = max((f"r{r:g}" for r in args.rs), key=lambda n: val_rows[n]["in_dist"]["fg_ari"] + val_rows[n]["ood_mean_fg_ari"])
        why = f"no r within {args.tolerance} of the shipped model on validation: best validation FG-ARI (in_dist + OOD mean)"
    print(f"chosen: {chosen} ({why})", flush=True)

    test_rows = {name: forward_eval(model, test) for name, model in models.items()}
    for row in test_rows.values():
        if "encoder_macs_fraction_mean" in row:
            f = row["encoder_macs_fraction_mean"]
            row["encoder_macs_reduction"] = round(1 - f, 6)
            row["whole_model_macs_fraction"] = round((macs["total"] - macs["encoder_convs"] * (1 - f)) / macs["total"], 6)
    for name, row in test_rows.items():
        print(f"test {name}: " + " ".join(f"{s}={row[s]['fg_ari']:.3f}" for s in SPLITS)
              + f" macs_cut={row.get('encoder_macs_reduction', 0):.3f}", flush=True)

    recipe = load_recipe(args.recipe)
    adapted = {}
    for name in ("shipped", chosen, *([] if args.no_control else ["control"])):
        adapted[name] = adapt_eval(models[name], test, recipe, args.adapt_images)
        print(f"adapted {name}: ood mean {adapted[name]['ood_mean_fg_ari']:.4f} ({adapted[name]['seconds']} s)", flush=True)
    before_n = {
        name: round(float(np.mean([np.mean(test_rows[name][s]["per_image"][: args.adapt_images]) for s in OOD_SPLITS])), 6)
        for name in adapted
    }

    r_chosen = float(chosen[1:])
    report: dict[str, Any] = {
        "model": MODEL,
        "what": "FTWT dynamic channel pruning of the slot segmenter's encoder (hidden convs 1 and 2 pruned; conv 0 "
        "and the last conv keep full output width, the last conv's input shrinks). Mask-multiply path: FLOPs are "
        "theoretical (kept_in x kept_out x k x k x S^2 per conv, predictor Linear MACs counted), no wall-clock gain.",
        "dense_macs": {**macs, "counted_by": "torch.utils.flop_counter at batch 1, all 1024 pixels decoded; encoder "
                       "convs are " + f"{macs['encoder_convs'] / macs['total']:.1%} of the model"},
        "encoder_widths": encoder_widths(cfg),
        "pruned_units": [1, 2],
        "training": training,
        "validation": {"seed": VAL_SEED, "n_images_per_split": args.val_images,
                       "rows": {n: {k: v for k, v in row.items()} for n, row in val_rows.items()}},
        "chosen": {"variant": chosen, "r": r_chosen, "why": why, "tolerance": args.tolerance},
        "test": test_rows,
        "test_seed": TEST_SEED,
        "test_images_per_split": args.test_images,
        "adaptation": {
            "recipe": args.recipe, "recipe_fields": recipe.model_dump(), "images_per_ood_split": args.adapt_images,
            "note": "first N test images of each OOD split; the pruned model adapts inside fixed_masks(x); the "
            "recipe freezes the encoder (params='no_encoder'), so the encoder runs once per image",
            "before_fg_ari_ood_mean_same_images": before_n,
        },
        "adapted": adapted,
        "command": "OMP_NUM_THREADS=1 taskset -c 0 " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "seeds": {"train": TRAIN_SEED, "train_data_start": 1_000_000, "val": VAL_SEED, "test": TEST_SEED},
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} thread, torch {torch.__version__}",
        "seconds": None,
    }
    for row in report["validation"]["rows"].values():
        for s in SPLITS:
            row[s].pop("per_image", None)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, args.out.with_suffix(".png"))
    except Exception as e:  # the plot is a convenience (OpenCV is an optional extra)
        print(f"no plot: {e}", flush=True)

    if not args.no_save:
        chosen_row = test_rows[chosen]
        folder = save_pruned(
            models[chosen], find_model(MODEL), chosen, part="segmenter_encoder", r=r_chosen, masks="predict", ks=None,
            training={"command": report["command"], "script": "tools/release/ftwt_segmenter.py",
                      **{k: v for k, v in training[chosen].items() if k != "log"}, "hardware": report["hardware"]},
            metrics={
                "val_in_dist_fg_ari": val_rows[chosen]["in_dist"]["fg_ari"], "val_ood_mean_fg_ari": val_rows[chosen]["ood_mean_fg_ari"],
                "test_in_dist_fg_ari": chosen_row["in_dist"]["fg_ari"], "test_ood_mean_fg_ari": chosen_row["ood_mean_fg_ari"],
                "test_images_per_split": args.test_images,
                "encoder_macs_reduction": chosen_row["encoder_macs_reduction"],
                "whole_model_macs_fraction": chosen_row["whole_model_macs_fraction"],
                "adapted_ood_mean_fg_ari": adapted[chosen]["ood_mean_fg_ari"], "adapt_recipe": args.recipe,
                "report": str(args.out),
            },
        )
        print(f"wrote {folder}", flush=True)
    print(f"done in {report['seconds']:.0f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
