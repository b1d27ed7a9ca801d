"""`tta-runtime demo | list | info | predict`: the shipped models, one image at a time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tta_runtime.cli.common import echo, output_path, quiet, step_bar, write_json


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name or folder (default: the default shipped model)")
    p.add_argument("--image", default=None, help="image file (default: the bundled OOD sample)")
    p.add_argument("--recipe", default=None, help="adaptation recipe name or .toml path (default: the card's)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/demo", help="folder for overlay.png, loss.png, result.json")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from tta_runtime import Runtime
    from tta_runtime.errors import ConfigError
    from tta_runtime.hub import sample_image_path
    from tta_runtime.visual import loss_curve, mask_grid, save_png

    output_path(str(Path(args.out) / "overlay.png"), "--out")
    image = args.image or sample_image_path()
    overrides: dict[str, Any] = {"device": args.device}
    if args.recipe:
        overrides["recipe"] = args.recipe
    if args.steps is not None:
        overrides["steps"] = args.steps
    rt = Runtime.from_pretrained(args.model, **overrides)
    if rt.task != "segmentation":
        raise ConfigError(f"the demo shows a slot segmenter's masks before and after adaptation; {rt.name!r} is a "
                          f"{rt.task} model: give --model slot-shapes-32 (or another segmenter), or use "
                          f"`tta-runtime predict IMAGE --model {rt.name} --adapt`")
    echo(
        args,
        f"model   {rt.name}  ({rt.card.segmenter.num_slots} slots, {rt.input_size}x{rt.input_size} input, device {rt.device})",
        f"recipe  {rt.recipe.name}: {rt.recipe.description}",
        f"image   {image}",
    )
    before = rt.predict(image)
    if before.is_ood is not None:  # calibrated: a threshold at 95% in-distribution TPR
        verdict = "OUT OF DISTRIBUTION" if before.is_ood else "in distribution"
        echo(args, f"OOD     score {before.ood_score:+.2f} ({before.ood_scorer}, threshold {rt.calibration.threshold:+.2f}) -> {verdict}")
    else:
        echo(args, f"OOD     score {before.ood_score:+.2f} ({before.ood_scorer}: z-score of the reconstruction error; no calibration)")
    after = rt.adapt_and_predict(image, on_step=step_bar(args, rt.recipe.steps, "adapting"))
    rep = after.adaptation
    assert rep is not None  # adapt_and_predict always reports
    after_mse = rep.final_loss if rep.method == "slot_reconstruction" else after.recon_mse
    changed = float((before.segmentation != after.segmentation).mean())
    echo(
        args,
        "",
        f"{'':14}{'before':>10}{'after':>10}",
        f"{'recon MSE':14}{before.recon_mse:>10.5f}{after_mse:>10.5f}",
        f"{'slots used':14}{len(np.unique(before.segmentation)):>10d}{len(np.unique(after.segmentation)):>10d}",
        f"{'pixels moved':14}{'':>10}{changed:>10.1%}",
        f"adapted {rep.params_adapted:,} parameters for {rep.steps_run} steps in {_fmt_seconds(rep.timings['adapt_s'])}"
        + (" (stopped early)" if rep.stopped_early else "")
        + (f"; ROLLED BACK: {rep.rollback_reason}" if rep.rolled_back else ""),
    )
    out = Path(args.out)
    result = {"before": before.to_dict(), "after": after.to_dict()}
    save_png(out / "overlay.png", demo_figure(before, after))
    save_png(out / "loss.png", loss_curve(rep.losses, title=f"{rep.method} loss per step"))
    save_png(out / "slots_after.png", mask_grid(after.masks))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    echo(args, f"wrote   {out / 'overlay.png'} (input | masks before | masks after | reconstruction | loss), loss.png, slots_after.png, result.json")
    write_json(args, result)
    return 0


def demo_figure(before: Any, after: Any, height: int = 192) -> Any:
    """One picture of an adaptation: input | masks before | masks after | reconstruction | loss curve.

    Returns (H, W, 3) uint8.
    """
    import numpy as np

    from tta_runtime.visual import loss_curve, panel

    def up(rgb: np.ndarray) -> np.ndarray:  # nearest-neighbour, so pixels stay pixels
        k = max(1, height // rgb.shape[0])
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


def add_list(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from tta_runtime.hub import DEFAULT_MODEL, list_models, list_recipes

    models, recipes = list_models(), list_recipes()
    if args.json != "-":  # the listing is the result: printed even with -q
        print("models:  " + ", ".join(f"{m}{' (default)' if m == DEFAULT_MODEL else ''}" for m in models))
        print("recipes: " + ", ".join(recipes))
    write_json(args, {"models": list(models), "default_model": DEFAULT_MODEL, "recipes": list(recipes)})
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model name or folder (default: the default shipped model)")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from tta_runtime.hub import find_model, load_card

    card = load_card(find_model(args.model)).model_dump(mode="json")
    if args.json is None:  # the card is the result: printed unless it goes to a file
        args.json = "-"
    write_json(args, card)
    return 0


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("--model", default=None)
    p.add_argument("--adapt", action="store_true", help="adapt on the image before predicting")
    p.add_argument("--recipe", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overlay", default=None, help="write the mask overlay PNG here")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import sys

    from tta_runtime import Runtime
    from tta_runtime.visual import save_png

    output_path(args.overlay, "--overlay", (".png",))
    rt = Runtime.from_pretrained(args.model, device=args.device, **({"recipe": args.recipe} if args.recipe else {}))
    res = rt.adapt_and_predict(args.image) if args.adapt else rt.predict(args.image)
    if args.json is None:  # the result is printed unless it goes to a file
        args.json = "-"
    write_json(args, res.to_dict())
    if args.overlay:
        save_png(args.overlay, res.overlay())
        if not quiet(args):
            print(f"wrote {args.overlay}", file=sys.stderr)
    return 0
