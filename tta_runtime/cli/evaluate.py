"""`tta-runtime eval | ood fit | ood eval`: segmentation quality before/after adaptation, OOD scorers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tta_runtime.cli.common import busy, check_range, command_line, echo, fail, progress, read_json, write_json


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--splits", default=None, help="comma-separated (default: the model's world: its training split, "
                   "named OOD splits and held-out variations)")
    p.add_argument("--n-images", type=int, default=24)
    p.add_argument("--seed", type=int, default=None, help="test-scene seed (default 2026)")
    p.add_argument("--recipe", default=None, help="the adaptation recipe (default: the model card's default_recipe)")
    p.add_argument("--baseline", default="entropy_norm", help="the slot model's baseline recipe, or 'none' (default: mask "
                   "entropy on the norm layers, tuned on validation scenes; 'entropy' adapts every parameter)")
    p.add_argument("--steps", type=int, default=None, help="override the slot model's two recipes' step count")
    p.add_argument("--feedforward", default=None, help="feed-forward baseline folder (default: MODEL/feedforward when present)")
    p.add_argument("--feedforward-recipe", default="unet_tent", help="the feed-forward baseline's own adaptation recipe, "
                   "or 'none' (default: Tent on its norm layers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one split each (same numbers for any value)")
    p.add_argument("--check", default=None, help="compare with this report (timings excluded); exit 1 if it differs")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.data.scenes import evaluation_splits
    from tta_runtime.evaluation.segmentation import TEST_SEED, evaluate, strip_timing

    check_range(args.n_images, "--n-images", 1, 100_000)
    check_range(args.jobs, "--jobs", 1, 256)
    expected = read_json(args.check, "--check") if args.check else None  # before --json may overwrite it
    rt = Runtime.from_pretrained(args.model, device=args.device)
    splits = args.splits.split(",") if args.splits else list(evaluation_splits(_train_split(rt)))
    feedforward = None
    ff_folder = Path(args.feedforward) if args.feedforward else (rt.folder / "feedforward" if rt.folder else None)
    if ff_folder is not None and (ff_folder / "card.json").is_file():
        feedforward = ff_folder
    elif args.feedforward:
        return fail(f"no feed-forward baseline at {ff_folder} (expected card.json there)")
    report = evaluate(
        rt, splits=splits, n_images=args.n_images, seed=args.seed if args.seed is not None else TEST_SEED,
        recipe=args.recipe or rt.recipe.name, baseline=None if args.baseline == "none" else args.baseline, steps=args.steps,
        progress=progress(args), feedforward=feedforward, jobs=args.jobs,
        feedforward_recipe=None if args.feedforward_recipe == "none" else args.feedforward_recipe,
    )
    report["command"] = command_line(args)
    echo(args, *_eval_table(report))
    write_json(args, report)
    if expected is not None:
        a, b = strip_timing(expected), strip_timing(report)
        a.pop("command", None)
        b.pop("command", None)
        if a != b:
            print(f"MISMATCH: the evaluation differs from {args.check}", file=sys.stderr)
            return 1
        echo(args, f"reproduced {args.check} exactly (timings excluded)")
    return 0


def _train_split(rt: Any) -> str:
    """The split a segmenter was trained on, from its card ("in_dist", the shapes world, when not recorded)."""
    from tta_runtime.evaluation.ood import train_split_of

    return train_split_of(rt.card)


def _eval_table(report: dict[str, Any]) -> list[str]:
    head = (
        f"{'split':22}{'n':>4}  {'FG-ARI before':>14}{'Slot-TTA':>10}{'entropy':>10}{'oracle':>10}{'U-Net':>8}"
        f"{'U-Net+TTA':>11}  {'gain 95% CI':>20}{'s/img':>8}"
    )
    lines = [head, "-" * len(head)]
    for split, r in report["splits"].items():
        before, slot_tta, entropy, oracle, unet, unet_tta = (
            f"{r[v]['fg_ari']['mean']:.3f}" if v in r else "-"
            for v in ("before", "slot_tta", "entropy", "oracle", "feedforward", "feedforward_tta")
        )
        g = r["slot_tta_gain_fg_ari"]
        ci = f"{g['mean']:+.3f} [{g['ci95'][0]:+.3f},{g['ci95'][1]:+.3f}]"
        lines.append(
            f"{split:22}{r['n_images']:>4}  {before:>14}{slot_tta:>10}{entropy:>10}{oracle:>10}{unet:>8}{unet_tta:>11}  "
            f"{ci:>20}{r['timing'].get('slot_tta_seconds_per_image', 0):>8.2f}"
        )
    return lines


def add_ood_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--n-images", type=int, default=256, help="fit scenes (as many again set the threshold)")
    p.add_argument("--tpr", type=float, default=0.95, help="fraction of in-distribution inputs kept below the threshold")
    p.set_defaults(func=_ood_fit)


def _ood_fit(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.errors import ConfigError
    from tta_runtime.hub import find_model
    from tta_runtime.ood import save_calibration

    check_range(args.n_images, "--n-images", 2, 100_000)
    if not 0 < args.tpr < 1:
        raise ConfigError(f"--tpr must be in (0, 1) (the share of in-distribution inputs kept below the threshold); got {args.tpr}")
    folder = find_model(args.model)
    rt = Runtime.from_pretrained(folder, load_calibration=False)  # an old calibration may be stale: refit it
    if rt.task == "classification":
        from tta_runtime.evaluation.ood_classifier import fit_ood_classifier

        with busy(args, "ood fit"):
            cals = fit_ood_classifier(rt.model, tpr=args.tpr, weights_sha256=rt.card.weights.sha256)
    else:
        from tta_runtime.evaluation.ood import fit_ood

        cals = fit_ood(
            rt.model, n_images=args.n_images, tpr=args.tpr, weights_sha256=rt.card.weights.sha256,
            progress=progress(args), split=_train_split(rt),
        )
    out = save_calibration(folder, cals)
    for name, cal in cals.items():
        echo(args, f"{name:14} threshold {cal.threshold:.4g} (TPR {cal.tpr:.0%} on {cal.n_threshold} held-out in-distribution inputs)")
    echo(args, f"wrote {out}")
    return 0


def add_ood_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--n-images", type=int, default=256, help="scenes per split (segmenters)")
    p.set_defaults(func=_ood_eval)


def _ood_eval(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.ood import load_calibration

    check_range(args.n_images, "--n-images", 1, 100_000)
    rt = Runtime.from_pretrained(args.model)
    cals = load_calibration(rt.folder)  # type: ignore[arg-type]
    if rt.task == "classification":
        from tta_runtime.evaluation.ood_classifier import eval_ood_classifier

        with busy(args, "ood eval"):
            report = eval_ood_classifier(rt.model, cals)
        scorers = sorted(report["in_dist"])
        lines = [f"{'mean AUROC, severity 5':24}" + "".join(f"{n:>16}" for n in scorers)]
        for fam, per in report["families_mean_auroc"].items():
            lines.append(f"{fam:24}" + "".join(f"{per['5'][n]:>16.3f}" for n in scorers))
    else:
        from tta_runtime.evaluation.ood import eval_ood

        report = eval_ood(rt.model, cals, n_images=args.n_images, progress=progress(args), in_dist=_train_split(rt))
        scorers = sorted(next(iter(report["splits"].values())))
        width = max(14, *(len(n) + 2 for n in scorers))
        lines = [f"{'AUROC':22}" + "".join(f"{n:>{width}}" for n in scorers)]
        for split, per in report["splits"].items():
            lines.append(f"{split:22}" + "".join(f"{per[n]['auroc']:>{width}.3f}" for n in scorers))
    report["model"] = rt.name
    report["command"] = command_line(args)
    echo(args, *lines)
    write_json(args, report)
    return 0
