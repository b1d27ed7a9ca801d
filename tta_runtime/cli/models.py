"""`tta-runtime demo | list | info | predict`: the shipped models, and predict on images (files, folders, globs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tta_runtime.cli.common import add_threads, command_line, far_ood_note, echo, fail, output_path, quiet, step_bar, write_json


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name or folder (default: the default shipped model)")
    p.add_argument("--image", default=None, help="image file (default: the bundled OOD sample)")
    p.add_argument("--recipe", default=None, help="adaptation recipe name or .toml path (default: the card's)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/demo", help="folder for overlay.png, loss.png, result.json")
    add_threads(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from tta_runtime import Runtime
    from tta_runtime.errors import ConfigError
    from tta_runtime.hub import sample_image_path
    from tta_runtime.visual import loss_curve, mask_grid, save_png

    output_path(str(Path(args.out) / "overlay.png"), "--out")
    overrides: dict[str, Any] = {"device": args.device, "threads": args.threads}
    if args.recipe:
        overrides["recipe"] = args.recipe
    if args.steps is not None:
        overrides["steps"] = args.steps
    rt = Runtime.from_pretrained(args.model, **overrides)
    if rt.task != "segmentation":
        raise ConfigError(f"the demo shows a slot segmenter's masks before and after adaptation; {rt.name!r} is a "
                          f"{rt.task} model: give --model slot-shapes-32 (or another segmenter), or use "
                          f"`tta-runtime predict IMAGE --model {rt.name} --adapt`")
    image = args.image or sample_image_path(rt.folder)
    echo(
        args,
        f"model   {rt.name}  ({rt.card.segmenter.num_slots} slots, {rt.input_size}x{rt.input_size} input, device {rt.device})",
        f"recipe  {rt.recipe.name}: {rt.recipe.description}",
        f"image   {image}",
    )
    before = rt.predict(image)
    far_ood_note(args, rt.card, before, str(image))
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
    """One picture of an adaptation: input | masks before | masks after | reconstruction | loss curve, the images
    enlarged by an integer factor to at least `height` pixels.

    Returns (H, W, 3) uint8.
    """
    import numpy as np

    from tta_runtime.visual import loss_curve, panel

    k = max(1, -(-height // before.image.shape[0]))  # an integer scale to at least `height` pixels

    def up(rgb: np.ndarray) -> np.ndarray:  # nearest-neighbour, so pixels stay pixels
        return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)

    rep = after.adaptation
    return panel(
        [
            (_input_caption(before), up(before.image)),
            ("masks before", up(before.overlay())),
            (f"masks after {rep.steps_run} steps", up(after.overlay())),
            ("reconstruction after", up((after.reconstruction * 255).round().astype(np.uint8))),
            ("loss per step", loss_curve(rep.losses + [rep.final_loss], size=(k * before.image.shape[0], 300), title=rep.method)),
        ]
    )


def _input_caption(result: Any) -> str:
    """The input tile's caption: the OOD verdict (when calibrated) and the score the image really got."""
    verdict = "score" if result.is_ood is None else ("OOD" if result.is_ood else "in-dist")
    return f"input: {verdict} {result.ood_score:.2f}"  # short enough for the tile's width


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

    from tta_runtime.errors import ModelLoadError
    from tta_runtime.files import read_json

    folder = find_model(args.model)
    if read_json(folder / "card.json", "model card", error=ModelLoadError).get("task") == "encoder":  # its own card
        from tta_runtime.models.encoder_folder import load_encoder

        card = load_encoder(folder)[0].model_dump(mode="json")
    else:
        card = load_card(folder).model_dump(mode="json")
    if args.json is None:  # the card is the result: printed unless it goes to a file
        args.json = "-"
    write_json(args, card)
    return 0


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="+", metavar="IMAGE",
        help=f"an image file, a folder (its {' '.join(IMAGE_EXTENSIONS)} files, sorted) or a quoted glob pattern "
             "('shots/*.jpg'); give as many as you like",
    )
    p.add_argument("--recursive", action="store_true", help="folders: their subfolders too; patterns: '**' matches any depth")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="write per image NAME.json (segmenters also NAME.labels.png, the slot ids as a gray PNG, and "
                        "NAME.overlay.png), and DIR/summary.json")
    p.add_argument("--model", default=None)
    p.add_argument("--adapt", action="store_true", help="adapt on each image before predicting")
    p.add_argument("--recipe", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overlay", default=None, help="one image: write its mask overlay PNG here (several: use --save)")
    add_threads(p)
    p.epilog = (
        "One image without --save prints its result as JSON. Several images (or --save) make a summary: per image "
        "ok or error, OOD score, label or slots, time; it is printed, or written to DIR/summary.json with --save. "
        "NAME is the image's file name without extension; a name met again gets -2, -3, ... An image that cannot "
        "be read is reported on one stderr line and in the summary, and the others go on. Exit status: 0 when "
        "every image succeeded, 2 when any failed or on a usage error."
    )
    p.set_defaults(func=_predict)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Images per predict call: the per-call overhead shared, at most 8 full-size Results in memory. Not for a
# segmenter on the CPU, whose batched decoder is slower per image (64 images of 64x64, one thread: 1.3 s one
# by one, 1.9 s in batches of 8), nor with --adapt (each image is adapted alone).
PREDICT_BATCH = 8


def _predict(args: argparse.Namespace) -> int:
    import sys

    from tta_runtime import Runtime
    from tta_runtime.errors import ConfigError
    from tta_runtime.visual import save_png

    output_path(args.overlay, "--overlay", (".png",))
    images = _image_list(args.images, args.recursive)
    if args.overlay and len(images) > 1:
        raise ConfigError(f"--overlay writes one image's overlay; {len(images)} images were given: use --save DIR "
                          "(one NAME.overlay.png per image)")
    save = _save_dir(args.save)
    rt = Runtime.from_pretrained(args.model, device=args.device, threads=args.threads,
                                 **({"recipe": args.recipe} if args.recipe else {}))
    if args.overlay and rt.task != "segmentation":
        raise ConfigError(f"--overlay draws a segmenter's slot masks; {rt.name!r} is a {rt.task} model, whose result "
                          "is its JSON: drop --overlay")
    if save is None and len(args.images) == 1 and images == [Path(args.images[0])]:  # one plain file: its result
        res = rt.adapt_and_predict(args.images[0]) if args.adapt else rt.predict(args.images[0])
        far_ood_note(args, rt.card, res, args.images[0])
        if args.json is None:  # the result is printed unless it goes to a file
            args.json = "-"
        write_json(args, res.to_dict())
        if args.overlay:
            save_png(args.overlay, res.overlay())
            if not quiet(args):
                print(f"wrote {args.overlay}", file=sys.stderr)
        return 0
    summary = _predict_many(args, rt, images, save)
    totals = summary["totals"]
    if save is not None:
        from tta_runtime.files import atomic_write

        atomic_write(save / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(), "summary file")
    elif args.json is None:  # no files asked for: the summary is the result
        args.json = "-"
    n = totals["images"]
    echo(args, f"{n} image{'s' * (n != 1)}: {totals['ok']} ok, {totals['failed']} failed, {totals['ood']} flagged OOD "
               f"in {_fmt_seconds(totals['time_s'])}")
    if save is not None:
        per_image = "NAME.labels.png, NAME.overlay.png, NAME.json" if rt.task == "segmentation" else "NAME.json"
        echo(args, f"wrote   {per_image} per image and {save / 'summary.json'}")
    write_json(args, summary)
    return 2 if totals["failed"] else 0


def _image_list(arguments: list[str], recursive: bool) -> list[Path]:
    """The image files the arguments name, in order, each file once: a file as given, a folder's image files
    (sorted; hidden ones skipped; subfolders with `recursive`), a glob pattern's image files (sorted).
    A missing file, an empty folder or a pattern matching no image is a `ConfigError`."""
    import glob
    import os

    from tta_runtime.errors import ConfigError

    kinds = ", ".join(IMAGE_EXTENSIONS)
    found: list[Path] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            candidates = path.rglob("*") if recursive else path.iterdir()
            matches = sorted(p for p in candidates if _is_image(p) and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            if not matches:
                deeper = "" if recursive else "; --recursive looks in its subfolders too"
                raise ConfigError(f"folder {arg!r} holds no image file ({kinds}){deeper}")
        elif path.exists() or path.is_symlink():
            matches = [path]  # named by the user: taken whatever its extension (predict says if it is no image)
        elif any(c in arg for c in "*?["):
            matches = sorted(p for p in map(Path, glob.glob(arg, recursive=recursive)) if _is_image(p))
            if not matches:
                deeper = "" if recursive else ", or add --recursive for '**'"
                raise ConfigError(f"pattern {arg!r} matches no image file ({kinds}); check the pattern (quoted, so "
                                  f"that tta-runtime expands it){deeper}")
        else:
            raise ConfigError(f"image {arg!r} does not exist; give an image file, a folder or a quoted glob pattern")
        found += matches
    unique: dict[str, Path] = {}
    for p in found:  # a file named twice (a folder and a pattern) is predicted once, where it came first
        unique.setdefault(os.path.abspath(p), p)
    return list(unique.values())


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _save_dir(value: str | None) -> Path | None:
    """`--save DIR` as a folder to write into (made when missing); checked before any work starts."""
    from tta_runtime.errors import ConfigError
    from tta_runtime.files import path_arg, writable_path

    if value is None:
        return None
    folder = path_arg(value, "--save")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--save {value!r} exists and is not a folder; give a folder for the outputs (made if missing)")
    writable_path(folder / "summary.json", "--save summary file")
    return folder


def _output_names(images: list[Path]) -> list[str]:
    """A distinct output name per image: its file name's stem, then `-2`, `-3`, ... for a stem met again
    (compared ignoring case, for file systems that do); "summary" is taken by summary.json."""
    used = {"summary"}
    names = []
    for path in images:
        name, k = path.stem, 1
        while name.lower() in used:
            k += 1
            name = f"{path.stem}-{k}"
        used.add(name.lower())
        names.append(name)
    return names


def _predict_many(args: argparse.Namespace, rt: Any, images: list[Path], save: Path | None) -> dict[str, Any]:
    """Predict (or adapt and predict) every image, `PREDICT_BATCH` per call where that is faster; save each
    result under `save`; return the summary."""
    import time

    from tta_runtime.result_io import finite

    names = _output_names(images)
    tick = step_bar(args, len(images), "predicting")
    one_by_one = args.adapt or (rt.task == "segmentation" and rt.device.type == "cpu")
    batch = 1 if one_by_one else PREDICT_BATCH
    entries: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        part = images[start : start + batch]
        for k, outcome in enumerate(_outcomes(rt, [str(p) for p in part], args.adapt)):
            target = None if save is None else save / f"{names[start + k]}.json"
            if outcome[0] is not None:
                far_ood_note(args, rt.card, outcome[0], str(part[k]))
            entries.append(_entry(part[k], outcome, target, args.overlay))
            if tick:
                tick(start + k, None)
    if tick:
        tick(len(images), None)
    failed = sum(e["status"] == "error" for e in entries)
    totals = {"images": len(entries), "ok": len(entries) - failed, "failed": failed,
              "ood": sum(e.get("is_ood") is True for e in entries), "time_s": time.perf_counter() - t0}
    summary = {"command": command_line(args), "model": rt.name, "task": rt.task, "device": str(rt.device),
               "adapt": args.adapt, "recipe": rt.recipe.name if args.adapt else None,
               "output_dir": None if save is None else str(save), "images": entries, "totals": totals}
    return finite(summary)


def _entry(path: Path, outcome: tuple[Any, str | None, float], target: Path | None, overlay: str | None) -> dict[str, Any]:
    """The summary's entry for one image; its result saved as `target` (`Result.save`) and its overlay as
    `overlay`, when given. A failure is said on one stderr line."""
    from tta_runtime.errors import TTARuntimeError
    from tta_runtime.visual import save_png

    result, error, seconds = outcome
    entry: dict[str, Any] = {"file": str(path), "status": "ok"}
    if result is not None:
        d = result.to_dict()
        keys = ("ood_score", "is_ood", "label", "label_name", "confidence", "num_slots", "slots_used")
        entry.update({key: d[key] for key in keys if key in d}, time_s=seconds)
        if result.adaptation is not None:
            entry["adapt_steps"] = result.adaptation.steps_run
        try:
            if target is not None:
                entry["outputs"] = {kind: p.name for kind, p in result.save(target).items()}
            if overlay:
                save_png(overlay, result.overlay())
        except (TTARuntimeError, OSError) as e:
            error = f"saving its result: {e}"
    if error is None:
        return entry
    fail(error if str(path) in error else f"{path}: {error}")
    return {"file": str(path), "status": "error", "error": error}


def _outcomes(rt: Any, part: list[str], adapt: bool) -> list[tuple[Any, str | None, float]]:
    """(result or None, error message or None, seconds) per image of `part`: one call for all of them, or,
    when it fails, one call per image, so that a bad image costs only its own result."""
    import time

    from tta_runtime.errors import TTARuntimeError

    t0 = time.perf_counter()
    try:
        results = rt.adapt_and_predict(part) if adapt else rt.predict(part)  # a list in, a list out
    except (TTARuntimeError, OSError) as e:
        if len(part) == 1:
            return [(None, str(e), time.perf_counter() - t0)]
        return [o for p in part for o in _outcomes(rt, [p], adapt)]
    seconds = (time.perf_counter() - t0) / len(part)
    return [(r, None, seconds) for r in results]
