"""A Result on disk: the files `Result.save` writes, and where.

For an output stem S (see `output_stem` for how a path becomes one):

- `S.labels.png` (segmenters): the (H, W) slot-id map, `Result.segmentation`, as a single-channel 8-bit
  PNG: lossless, the pixel value is the slot id (0..K-1). Read it back with
  `cv2.imread(path, cv2.IMREAD_UNCHANGED)`. Slot ids above 255 do not fit and are refused.
- `S.overlay.png` (segmenters, unless `overlay=False`): `Result.overlay()`, (H, W, 3) RGB.
- `S.json` (every task): `Result.to_dict()` (a classifier's with its `logits` and `probs`; a segmenter's
  arrays are the PNGs), plus `"files"`: the PNGs' names, relative to the JSON's folder. JSON has no NaN
  or infinity: a non-finite number is written as null.

Every path is checked before the first file is written (`tta_runtime.files.writable_path`: a new path or
a regular file, never a folder, device, FIFO or link), and each file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from tta_runtime.errors import ConfigError
from tta_runtime.files import atomic_write, path_arg, writable_path
from tta_runtime.visual import encode_png, save_png

MAX_SLOT_ID = 255  # what one uint8 PNG channel holds
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_STEM = "result"


def output_stem(target: Any) -> Path:
    """The stem S of the files `save_result` writes, from what the caller gave:

    - a path ending in a separator: `folder/result`
    - a path ending in `.json`: that JSON file, the PNGs beside it (`out/cat.json` -> `out/cat`)
    - an existing folder: `folder/result`
    - a path ending in an image extension (`.png`, `.jpg`, ...): refused, since it is one of several files
    - anything else is the stem itself, suffix and all (`out/cat` -> `out/cat.json`, `out/cat.labels.png`)
    """
    p = path_arg(target, "Result.save path")
    if os.fspath(target).endswith(("/", os.sep)):
        return p / DEFAULT_STEM
    suffix = p.suffix.lower()
    if suffix == ".json":  # before the folder test: a folder named x.json is refused by writable_path, not entered
        return p.with_suffix("")
    if p.is_dir():
        return p / DEFAULT_STEM
    if suffix in IMAGE_SUFFIXES:
        raise ConfigError(
            f"Result.save writes several files (S.labels.png, S.overlay.png, S.json), so it takes a stem S, a .json "
            f"path or a folder, not the image file {os.fspath(target)!r}; give e.g. {os.fspath(p.with_suffix(''))!r}"
        )
    return p


def label_png(result: Any) -> bytes:
    """`result.segmentation` encoded as a single-channel 8-bit PNG; `ConfigError` when it is empty or its
    slot ids do not fit 0..255."""
    seg = result.segmentation
    if seg.ndim != 2 or seg.size == 0:
        raise ConfigError(f"this Result has no label map to save (segmentation shape {tuple(seg.shape)}); "
                          "save a Result returned by a segmenter's predict or adapt_and_predict")
    lo, hi = int(seg.min()), int(seg.max())
    if lo < 0 or hi > MAX_SLOT_ID or result.num_slots > MAX_SLOT_ID + 1:
        raise ConfigError(
            f"the label map holds slot ids {lo}..{hi} of {result.num_slots} slots; an 8-bit PNG holds ids 0..{MAX_SLOT_ID} "
            f"(at most {MAX_SLOT_ID + 1} slots): save result.segmentation yourself (e.g. np.save) for larger models"
        )
    return encode_png(seg.astype(np.uint8))


def finite(value: Any) -> Any:
    """`value` (JSON-ready dicts, lists, numbers) with every NaN or infinity replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def save_result(result: Any, target: Any, *, overlay: bool = True) -> dict[str, Path]:
    """Write `result` (a `tta_runtime.result.Result`, which imports this module) as the files in this module's
    docstring; return them by kind ("labels", "overlay", "json"). Errors (a path that cannot be written, a
    label map that does not fit) are `ConfigError`, raised before anything is written where they can be known
    in advance."""
    if not isinstance(overlay, bool):
        raise ConfigError(f"overlay must be True or False, got {type(overlay).__name__} {overlay!r}")
    stem = output_stem(target)
    files: dict[str, Path] = {}
    labels = b""
    if result.task == "segmentation":
        labels = label_png(result)
        files["labels"] = stem.with_name(stem.name + ".labels.png")
        if overlay:
            files["overlay"] = stem.with_name(stem.name + ".overlay.png")
    files["json"] = stem.with_name(stem.name + ".json")
    for path in files.values():
        writable_path(path, "Result.save output file")
    doc = result.to_dict(arrays=result.task == "classification")
    doc["files"] = {kind: path.name for kind, path in files.items() if kind != "json"}
    text = json.dumps(finite(doc), indent=2, allow_nan=False) + "\n"
    if "labels" in files:
        atomic_write(files["labels"], labels, "label map PNG")
    if "overlay" in files:
        save_png(files["overlay"], result.overlay())
    atomic_write(files["json"], text.encode("utf-8"), "result JSON")  # last: it names the PNGs
    return files
