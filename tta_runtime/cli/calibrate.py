"""`tta-runtime calibrate --model FOLDER --images DIR`: fit the OOD scorers (and EATA's Fisher) on your own
in-distribution images and write them into the model folder (`Runtime.calibrate`, then `ood/`)."""

from __future__ import annotations

import argparse

from tta_runtime.cli.common import check_range, command_line, echo, progress, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="classifier model name or folder (written by Runtime.save, or shipped)")
    p.add_argument("--images", required=True, help="folder of in-distribution images (searched recursively; "
                   + ", ".join(IMAGE_SUFFIXES) + ")")
    p.add_argument("--tpr", type=float, default=0.99, help="share of held-out in-distribution images kept below each threshold")
    p.add_argument("--holdout", type=float, default=0.2, help="share of the images that sets the thresholds (not fitted on)")
    p.add_argument("--max-images", type=int, default=20_000, help="refuse folders with more images than this")
    p.add_argument("--no-fisher", dest="fisher", action="store_false", help="do not compute EATA's Fisher")
    p.add_argument("--trust-code", action="store_true",
                   help="load a folder whose card names Python code ('python:package.module:function'): imports and runs it")
    p.set_defaults(func=_calibrate)


def image_files(folder: str, limit: int) -> list[str]:
    """The image files under `folder`, sorted; `ConfigError` when there are none or more than `limit`."""
    from pathlib import Path

    from tta_runtime.errors import ConfigError

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--images {folder!r} is not a folder; give a folder of in-distribution images")
    files = sorted(str(f) for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ConfigError(f"--images {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) > limit:
        raise ConfigError(f"--images {folder!r} holds {len(files):,} images, more than --max-images {limit:,}")
    return files


def _calibrate(args: argparse.Namespace) -> int:
    from tta_runtime import Runtime
    from tta_runtime.errors import ConfigError
    from tta_runtime.hub import find_model
    from tta_runtime.save import write_calibration

    if not 0 < args.tpr < 1:
        raise ConfigError(f"--tpr must be in (0, 1) (the share of in-distribution images kept below the threshold); got {args.tpr}")
    check_range(args.holdout, "--holdout", 0.01, 0.9)
    check_range(args.max_images, "--max-images", 3, 1_000_000)
    files = image_files(args.images, args.max_images)
    folder = find_model(args.model)
    rt = Runtime.from_pretrained(folder, trust_code=args.trust_code, load_calibration=False)  # a stale one is refitted
    bar = None
    if progress(args):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="calibrate", unit="img")

    def on_progress(done: int, total: int, stage: str) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(stage)
            bar.refresh()

    try:
        report = rt.calibrate(files, tpr=args.tpr, holdout=args.holdout, fisher=args.fisher, progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    written = write_calibration(folder, rt.card, report.calibrations, report.fisher)
    default = report.calibrations[report.default]
    echo(args, f"{len(files)} images: scorers fitted on {report.n_fit}, thresholds at TPR {args.tpr:.0%} on {report.n_threshold} "
         f"held out (labels: {report.labels})",
         *(f"{name:16} threshold {cal.threshold:.4g}" for name, cal in report.calibrations.items()),
         f"is_ood now uses {report.default} (threshold {default.threshold:.4g})",
         *(f"wrote {path}" for path in written))
    write_json(args, {**report.to_dict(), "model": rt.name, "images": len(files), "written": [str(p) for p in written],
                      "command": command_line(args)})
    return 0
