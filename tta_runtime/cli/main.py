"""`tta-runtime`: the command line.

    tta-runtime demo                 adapt the default model on the bundled OOD sample; print, write an overlay
    tta-runtime list                 shipped models and recipes
    tta-runtime info [MODEL]         a model's card
    tta-runtime predict IMAGE ...    segment (and optionally adapt on) your own image
    tta-runtime eval --json PATH     before/after adaptation metrics per split, with bootstrap intervals
    tta-runtime train --out DIR      train a slot segmenter on generated scenes (resumable)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tta_runtime.errors import TTARuntimeError
from tta_runtime.hub import sample_image_path

log = logging.getLogger("tta_runtime")


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _cmd_demo(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.visual import loss_curve, mask_grid, save_png

    image = args.image or sample_image_path()
    overrides: dict[str, Any] = {"device": args.device}
    if args.recipe:
        overrides["recipe"] = args.recipe
    if args.steps is not None:
        overrides["steps"] = args.steps
    rt = Runtime.from_pretrained(args.model, **overrides)
    print(f"model   {rt.name}  ({rt.card.segmenter.num_slots} slots, {rt.input_size}x{rt.input_size} input, device {rt.device})")
    print(f"recipe  {rt.recipe.name}: {rt.recipe.description}")
    print(f"image   {image}")
    before = rt.predict(image)
    if before.is_ood is not None:  # calibrated: a threshold at 95% in-distribution TPR
        verdict = "OUT OF DISTRIBUTION" if before.is_ood else "in distribution"
        print(f"OOD     score {before.ood_score:+.2f} ({before.ood_scorer}, threshold {rt.calibration.threshold:+.2f}) -> {verdict}")
    else:
        print(f"OOD     score {before.ood_score:+.2f} ({before.ood_scorer}: z-score of the reconstruction error; no calibration)")
    after = rt.adapt_and_predict(image, on_step=_progress_callback(rt.recipe.steps) if args.progress else None)
    rep = after.adaptation
    assert rep is not None  # adapt_and_predict always reports
    print()
    print(f"{'':14}{'before':>10}{'after':>10}")
    print(f"{'recon MSE':14}{before.recon_mse:>10.5f}{rep.final_loss if rep.method == 'slot_reconstruction' else after.recon_mse:>10.5f}")
    print(f"{'slots used':14}{len(np.unique(before.segmentation)):>10d}{len(np.unique(after.segmentation)):>10d}")
    changed = float((before.segmentation != after.segmentation).mean())
    print(f"{'pixels moved':14}{'':>10}{changed:>10.1%}")
    print(
        f"adapted {rep.params_adapted:,} parameters for {rep.steps_run} steps in {_fmt_seconds(rep.timings['adapt_s'])}"
        + (" (stopped early)" if rep.stopped_early else "")
        + (f"; ROLLED BACK: {rep.rollback_reason}" if rep.rolled_back else "")
    )
    out = Path(args.out)
    save_png(out / "overlay.png", demo_figure(before, after))
    save_png(out / "loss.png", loss_curve(rep.losses, title=f"{rep.method} loss per step"))
    save_png(out / "slots_after.png", mask_grid(after.masks))
    (out / "result.json").write_text(json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2))
    print(f"wrote   {out / 'overlay.png'} (input | masks before | masks after | reconstruction | loss), loss.png, slots_after.png, result.json")
    return 0


def demo_figure(before: Any, after: Any, height: int = 192) -> np.ndarray:
    """One picture of an adaptation: input | masks before | masks after | reconstruction | loss curve."""
    from tta_runtime.visual import loss_curve, panel

    def up(rgb: np.ndarray) -> np.ndarray:  # nearest-neighbour, so pixels stay pixels
        h, w = rgb.shape[:2]
        k = max(1, height // h)
        return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)

    rep = after.adaptation
    return panel(
        [
            ("input", up(before.image)),
            ("masks before", up(before.overlay())),
            (f"masks after {rep.steps_run} steps", up(after.overlay())),
            ("reconstruction after", up((after.reconstruction * 255).round().astype(np.uint8))),
            ("loss per step", loss_curve(rep.losses + [rep.final_loss], size=(height, 300), title=rep.method)),
        ]
    )


def _progress_callback(total: int):  # noqa: ANN202 - returns a closure
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="adapting", leave=False)

    def on_step(step: int, out: Any) -> None:
        if step < total:
            bar.update(1)
        else:
            bar.close()

    return on_step


def _cmd_list(args: argparse.Namespace) -> int:
    from tta_runtime.hub import DEFAULT_MODEL, list_models, list_recipes

    print("models:  " + ", ".join(f"{m}{' (default)' if m == DEFAULT_MODEL else ''}" for m in list_models()))
    print("recipes: " + ", ".join(list_recipes()))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from tta_runtime.hub import find_model, load_card

    card = load_card(find_model(args.model))
    print(json.dumps(card.model_dump(mode="json"), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.visual import save_png

    rt = Runtime.from_pretrained(args.model, device=args.device, **({"recipe": args.recipe} if args.recipe else {}))
    res = rt.adapt_and_predict(args.image) if args.adapt else rt.predict(args.image)
    print(json.dumps(res.to_dict(), indent=2))
    if args.overlay:
        save_png(args.overlay, res.overlay())
        print(f"wrote {args.overlay}", file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.evaluation.segmentation import TEST_SEED, evaluate, strip_timing
    from tta_runtime.data.scenes import SPLITS

    expected = json.loads(Path(args.check).read_text()) if args.check else None  # before --json may overwrite it
    rt = Runtime.from_pretrained(args.model, device=args.device)
    splits = args.splits.split(",") if args.splits else list(SPLITS)
    feedforward = None
    ff_folder = Path(args.feedforward) if args.feedforward else (rt.folder / "feedforward" if rt.folder else None)
    if ff_folder is not None and (ff_folder / "card.json").is_file():
        feedforward = ff_folder
    elif args.feedforward:
        print(f"error: no feed-forward baseline at {ff_folder} (expected card.json there)", file=sys.stderr)
        return 2
    report = evaluate(
        rt, splits=splits, n_images=args.n_images, seed=args.seed if args.seed is not None else TEST_SEED,
        recipe=args.recipe or rt.recipe.name, baseline=None if args.baseline == "none" else args.baseline, steps=args.steps,
        progress=True,
        feedforward=feedforward, jobs=args.jobs,
    )
    report["command"] = "tta-runtime " + shlex.join(args.argv)
    _print_eval_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if expected is not None:
        a, b = strip_timing(expected), strip_timing(report)
        a.pop("command", None)
        b.pop("command", None)
        if a != b:
            print(f"MISMATCH: the evaluation differs from {args.check}", file=sys.stderr)
            return 1
        print(f"reproduced {args.check} exactly (timings excluded)")
    return 0


def _print_eval_table(report: dict[str, Any]) -> None:
    head = (
        f"{'split':22}{'n':>4}  {'FG-ARI before':>14}{'Slot-TTA':>10}{'entropy':>10}{'oracle':>10}{'U-Net':>8}  "
        f"{'gain 95% CI':>20}{'s/img':>8}"
    )
    print(head)
    print("-" * len(head))
    for split, r in report["splits"].items():
        def cell(v: str) -> str:
            return f"{r[v]['fg_ari']['mean']:.3f}" if v in r else "-"

        g = r["slot_tta_gain_fg_ari"]
        ci = f"{g['mean']:+.3f} [{g['ci95'][0]:+.3f},{g['ci95'][1]:+.3f}]"
        print(
            f"{split:22}{r['n_images']:>4}  {cell('before'):>14}{cell('slot_tta'):>10}{cell('entropy'):>10}{cell('oracle'):>10}"
            f"{cell('feedforward'):>8}  "
            f"{ci:>20}{r['timing'].get('slot_tta_seconds_per_image', 0):>8.2f}"
        )


def _cmd_ood_fit(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.hub import find_model
    from tta_runtime.ood import fit_ood, save_calibration

    folder = find_model(args.model)
    rt = Runtime.from_pretrained(folder, load_calibration=False)  # an old calibration may be stale: refit it
    if rt.task == "classification":
        from tta_runtime.evaluation.ood_classifier import fit_ood_classifier

        cals = fit_ood_classifier(rt.model, tpr=args.tpr, weights_sha256=rt.card.weights.sha256)
    else:
        cals = fit_ood(rt.model, n_images=args.n_images, tpr=args.tpr, weights_sha256=rt.card.weights.sha256, progress=True)
    out = save_calibration(folder, cals)
    for name, cal in cals.items():
        print(f"{name:14} threshold {cal.threshold:.4g} (TPR {cal.tpr:.0%} on {cal.n_threshold} held-out in-distribution inputs)")
    print(f"wrote {out}")
    return 0


def _cmd_ood_eval(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.ood import eval_ood, load_calibration

    rt = Runtime.from_pretrained(args.model)
    if rt.task == "classification":
        return _ood_eval_classifier(rt, args)
    report = eval_ood(rt.model, load_calibration(rt.folder), n_images=args.n_images, progress=True)  # type: ignore[arg-type]
    report["model"] = rt.name
    report["command"] = "tta-runtime " + shlex.join(args.argv)
    scorers = sorted(next(iter(report["splits"].values())))
    width = max(14, *(len(n) + 2 for n in scorers))
    print(f"{'AUROC':22}" + "".join(f"{n:>{width}}" for n in scorers))
    for split, per in report["splits"].items():
        print(f"{split:22}" + "".join(f"{per[n]['auroc']:>{width}.3f}" for n in scorers))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _ood_eval_classifier(rt: Any, args: argparse.Namespace) -> int:
    from tta_runtime.ood import load_calibration
    from tta_runtime.evaluation.ood_classifier import eval_ood_classifier

    report = eval_ood_classifier(rt.model, load_calibration(rt.folder))
    report["model"] = rt.name
    report["command"] = "tta-runtime " + shlex.join(args.argv)
    fams = report["families_mean_auroc"]
    scorers = sorted(report["in_dist"])
    print(f"{'mean AUROC, severity 5':24}" + "".join(f"{n:>16}" for n in scorers))
    for fam, per in fams.items():
        print(f"{fam:24}" + "".join(f"{per['5'][n]:>16.3f}" for n in scorers))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_bench_gate(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_gate import bench_gate

    report = bench_gate(
        args.model, n_images=args.n_images, shifts=args.shifts.split(","), recipe=args.recipe, steps=args.steps,
        progress=True, scorer=args.scorer,
    )
    report["command"] = "tta-runtime " + shlex.join(args.argv)
    f = report["fg_ari"]
    print(f"stream: {args.n_images} in-distribution + {args.n_images} shifted ({args.shifts}); gate {report['scorer']}")
    print(f"flagged OOD: in-distribution {report['flagged']['in_dist']:.0%}, shifted {report['flagged']['shifted']:.0%}")
    print(f"FG-ARI before {f['before']:.3f}, always-adapt {f['always']:.3f}, when_ood {f['when_ood']:.3f}")
    kept = report["gain_kept"]
    print(
        f"when_ood used {report['compute_share_seconds']:.0%} of the always-adapt time "
        f"({report['compute_share_steps']:.0%} of its steps) and kept "
        + (f"{kept:.0%}" if kept is not None else "n/a (no gain to keep)") + " of its FG-ARI gain"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tta_runtime.config import SegmenterConfig, validate
    from tta_runtime.training.slot import TrainConfig, train, write_model_folder

    seg = validate(
        SegmenterConfig,
        {
            "resolution": args.resolution, "num_slots": args.slots, "encoder_channels": args.encoder_channels,
            "decoder_fourier_bands": args.fourier_bands,
        },
        "train options",
    )
    cfg = validate(
        TrainConfig,
        {
            "name": args.name, "segmenter": seg, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "pixel_fraction": args.pixel_fraction, "mask_weight": args.mask_weight,
            "mask_weight_final": args.mask_weight_final, "attn_weight": args.attn_weight, "eval_every": args.eval_every, "ckpt_every": args.ckpt_every,
            "warmup": args.warmup, "lr_final_fraction": args.lr_final_fraction, "val_images": args.val_images,
            "init_from": args.init_from, "data_start": args.data_start,
        },
        "train options",
    )
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    model = train(cfg, run_dir, progress=True, stop_at=args.stop_at)
    command = "tta-runtime " + shlex.join(args.argv)
    out = write_model_folder(model, cfg, Path(args.out), command=command, run_dir=run_dir)
    print(f"wrote model folder {out}")
    return 0


def _cmd_train_feedforward(args: argparse.Namespace) -> int:
    from tta_runtime.training.feedforward import main_train

    main_train(args.out, args.run_dir, args.steps, command="tta-runtime " + shlex.join(args.argv))
    print(f"wrote baseline folder {args.out}")
    return 0


# Stage modules that define `add_cli(commands, bench_commands)` (argparse subparser actions for top-level
# commands and for `bench ...`); a stage not built yet is simply absent.
_CLI_MODULES = (
    "tta_runtime.cli.video", "tta_runtime.cli.export", "tta_runtime.cli.classify", "tta_runtime.cli.bench_adapt",
    "tta_runtime.cli.prune",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-runtime", description="Test-time adaptation runtime for slot-centric segmenters.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="adapt the default model on the bundled OOD sample image")
    d.add_argument("--model", default=None, help="model name or folder (default: the default shipped model)")
    d.add_argument("--image", default=None, help="image file (default: the bundled OOD sample)")
    d.add_argument("--recipe", default=None, help="adaptation recipe name or .toml path (default: the card's)")
    d.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    d.add_argument("--device", default="cpu")
    d.add_argument("--out", default="out/demo", help="folder for overlay.png, loss.png, result.json")
    d.add_argument("--no-progress", dest="progress", action="store_false")
    d.set_defaults(func=_cmd_demo)

    sub.add_parser("list", help="shipped models and recipes").set_defaults(func=_cmd_list)

    i = sub.add_parser("info", help="print a model's card")
    i.add_argument("model", nargs="?", default=None)
    i.set_defaults(func=_cmd_info)

    pr = sub.add_parser("predict", help="segment one image (optionally adapting first)")
    pr.add_argument("image")
    pr.add_argument("--model", default=None)
    pr.add_argument("--adapt", action="store_true", help="adapt on the image before predicting")
    pr.add_argument("--recipe", default=None)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--overlay", default=None, help="write the mask overlay PNG here")
    pr.set_defaults(func=_cmd_predict)

    e = sub.add_parser("eval", help="before/after adaptation metrics per split")
    e.add_argument("--model", default=None)
    e.add_argument("--splits", default=None, help="comma-separated (default: all)")
    e.add_argument("--n-images", type=int, default=24)
    e.add_argument("--seed", type=int, default=None, help="test-scene seed (default 2026)")
    e.add_argument("--recipe", default=None, help="the adaptation recipe (default: the model card's default_recipe)")
    e.add_argument("--baseline", default="entropy", help="baseline recipe, or 'none'")
    e.add_argument("--steps", type=int, default=None, help="override both recipes' step count")
    e.add_argument(
        "--feedforward", default=None, help="feed-forward baseline folder (default: MODEL/feedforward when present)"
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--jobs", type=int, default=1, help="worker processes, one split each (same numbers for any value)")
    e.add_argument("--json", default=None, help="write the report here")
    e.add_argument("--check", default=None, help="compare with this report (timings excluded); exit 1 if it differs")
    e.set_defaults(func=_cmd_eval)

    o = sub.add_parser("ood", help="fit and evaluate OOD scorers")
    osub = o.add_subparsers(dest="ood_command", required=True)
    of = osub.add_parser("fit", help="calibrate the OOD scorers on generated in-distribution scenes; saved in the model folder")
    of.add_argument("--model", default=None)
    of.add_argument("--n-images", type=int, default=256, help="fit scenes (as many again set the threshold)")
    of.add_argument("--tpr", type=float, default=0.95, help="fraction of in-distribution inputs kept below the threshold")
    of.set_defaults(func=_cmd_ood_fit)
    oe = osub.add_parser("eval", help="AUROC / FPR@95 / AUPR per OOD split and scorer")
    oe.add_argument("--model", default=None)
    oe.add_argument("--n-images", type=int, default=256)
    oe.add_argument("--json", default=None)
    oe.set_defaults(func=_cmd_ood_eval)

    b = sub.add_parser("bench", help="benchmarks that write JSON")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bg = bsub.add_parser("gate", help="always-adapt vs adapt='when_ood' on a mixed stream: compute and gain shares")
    bg.add_argument("--model", default=None)
    bg.add_argument("--n-images", type=int, default=8, help="in-distribution images (as many shifted ones)")
    bg.add_argument("--shifts", default="textured_background,unseen_colours")
    bg.add_argument("--recipe", default=None, help="the adaptation recipe (default: the model card's default_recipe)")
    bg.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    bg.add_argument("--scorer", default=None, help="the calibrated OOD scorer that gates (default: recon_error)")
    bg.add_argument("--json", default=None)
    bg.set_defaults(func=_cmd_bench_gate)

    t = sub.add_parser("train", help="train a slot segmenter on generated scenes (resumable)")
    t.add_argument("--out", required=True, help="model folder to write (card.json + weights.safetensors)")
    t.add_argument("--name", default="slot-shapes-32")
    t.add_argument("--run-dir", default=None, help="checkpoints and logs (default runs/NAME); re-run to resume")
    t.add_argument("--steps", type=int, default=6_000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--resolution", type=int, default=32)
    t.add_argument("--slots", type=int, default=8)
    t.add_argument("--encoder-channels", type=int, default=32)
    t.add_argument("--fourier-bands", type=int, default=5, help="decoder coordinate encodings (paper: 0)")
    t.add_argument("--pixel-fraction", type=float, default=0.25)
    t.add_argument("--mask-weight", type=float, default=1.0)
    t.add_argument("--mask-weight-final", type=float, default=0.1)
    t.add_argument("--attn-weight", type=float, default=0.0, help="matched mask loss on the attention maps too (paper: 0)")
    t.add_argument("--warmup", type=int, default=500, help="linear lr warm-up steps")
    t.add_argument("--lr-final-fraction", type=float, default=0.1, help="cosine decay to lr x this at the end")
    t.add_argument("--init-from", default=None, help="start from a checkpoint (ckpt.pt) or model folder: a fine-tuning stage")
    t.add_argument("--data-start", type=int, default=0, help="first training scene index")
    t.add_argument("--val-images", type=int, default=64)
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; re-run to resume)")
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--ckpt-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_train)

    tf = sub.add_parser("train-feedforward", help="train the supervised U-Net baseline (no slot bottleneck)")
    tf.add_argument("--out", default="models/slot-shapes-32/feedforward")
    tf.add_argument("--run-dir", default="runs/feedforward")
    tf.add_argument("--steps", type=int, default=4000)
    tf.set_defaults(func=_cmd_train_feedforward)
    for module in _CLI_MODULES:  # each stage module adds its own commands; heavy imports stay in the handlers
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_cli(sub, bsub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TTARuntimeError as e:  # our own errors already say what to do: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as e:  # a file argument that cannot be read or parsed
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
