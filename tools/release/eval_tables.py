"""Markdown tables for docs/benchmarks.md from an evaluation JSON (`tta-runtime eval --json`) and an OOD JSON.

    python tools/release/eval_tables.py models/slot-shapes-32/eval.json [models/slot-shapes-32/ood_eval.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _ci(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci95"]
    return f"{cell['mean']:.3f} [{lo:.2f}, {hi:.2f}]"


def eval_tables(report: dict[str, Any]) -> str:
    rows = [
        "| split | n | FG-ARI before | Slot-TTA (last step) | gain [95% CI] | entropy baseline | oracle best step "
        "| U-Net (no slots) | U-Net + its TTA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, r in report["splits"].items():
        def m(v: str, metric: str = "fg_ari") -> str:
            return _ci(r[v][metric]) if v in r else "-"

        g = r["slot_tta_gain_fg_ari"]
        rows.append(
            f"| {split} | {r['n_images']} | {m('before')} | {m('slot_tta')} | {g['mean']:+.3f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}] "
            f"| {m('entropy')} | {m('oracle')} | {m('feedforward')} | {m('feedforward_tta')} |"
        )
    timing = ("predict", "slot_tta", "entropy", "feedforward", "feedforward_tta")
    rows += ["", "Seconds per image (one thread):", "", "| split | slot predict | Slot-TTA | entropy | U-Net | U-Net + its TTA |",
             "|---|---|---|---|---|---|"]
    for split, r in report["splits"].items():
        cells = [r["timing"].get(f"{k}_seconds_per_image") for k in timing]
        rows.append(f"| {split} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    rows += ["", "| split | ARI before | ARI Slot-TTA | ARI entropy | ARI U-Net | mIoU before | mIoU Slot-TTA | mIoU entropy | mIoU U-Net |", "|---|---|---|---|---|---|---|---|---|"]
    for split, r in report["splits"].items():
        def c(v: str, metric: str) -> str:
            return f"{r[v][metric]['mean']:.3f}" if v in r else "-"

        rows.append(
            f"| {split} | {c('before', 'ari')} | {c('slot_tta', 'ari')} | {c('entropy', 'ari')} | {c('feedforward', 'ari')} "
            f"| {c('before', 'miou')} | {c('slot_tta', 'miou')} | {c('entropy', 'miou')} | {c('feedforward', 'miou')} |"
        )
    s = report["summary"]
    rows.append("")
    rows.append(
        "Mean FG-ARI over the OOD splits: "
        + ", ".join(f"{k.split('_fg_ari')[0]} {v:.3f}" for k, v in s.items() if k.endswith("_mean_over_ood_splits"))
    )
    labels = {"slot_tta_gain": "Gain of Slot-TTA", "entropy_gain": "Gain of the entropy baseline",
              "slot_tta_minus_feedforward": "Slot-TTA minus the U-Net",
              "slot_tta_minus_feedforward_tta": "Slot-TTA minus the U-Net with its TTA"}
    for k, label in labels.items():
        g = s.get(f"{k}_fg_ari_pooled_ood_images")
        if g:
            rows.append(
                f"{label}, over all {g['n_images']} OOD images (paired bootstrap): {g['mean']:+.3f} "
                f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
            )
    return "\n".join(rows)


def ood_table(report: dict[str, Any]) -> str:
    scorers = sorted(next(iter(report["splits"].values())))
    rows = ["| split | " + " | ".join(scorers) + " |", "|---" * (len(scorers) + 1) + "|"]
    for split, per in report["splits"].items():
        rows.append(f"| {split} | " + " | ".join(f"{per[n]['auroc']:.3f}" for n in scorers) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_json", help="a `tta-runtime eval --json` report")
    ap.add_argument("ood_json", nargs="?", help="a `tta-runtime ood eval --json` report")
    args = ap.parse_args()
    print(eval_tables(json.loads(open(args.eval_json).read())))
    if args.ood_json:
        print()
        print(ood_table(json.loads(open(args.ood_json).read())))


if __name__ == "__main__":
    main()
