"""Pictures of what the segmenter did: mask overlays, per-slot mask tiles, loss curves, labelled panels.

Everything here takes and returns uint8 RGB numpy arrays (H, W, 3) and draws with OpenCV only (no
matplotlib), so a headless server can render README figures and debugging images. OpenCV is imported on
first use.
"""

from __future__ import annotations

import colorsys
import math
import os
import pathlib
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from tta_runtime.device import import_cv2
from tta_runtime.files import atomic_write

# 12 hand-picked colours that stay apart from each other and from white (outlines) and black (background);
# after these, hues step by the golden ratio so that consecutive slots are far apart on the colour wheel.
# red, green, blue, yellow, purple, cyan, orange, magenta, lime, teal, brown, maroon
_BASE_PALETTE = np.array(
    [230, 25, 75, 60, 180, 75, 0, 130, 200, 255, 225, 25, 145, 30, 180, 70, 240, 240,
     245, 130, 48, 240, 50, 230, 210, 245, 60, 0, 128, 128, 170, 110, 40, 128, 0, 0],
    dtype=np.uint8,
).reshape(-1, 3)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# (saturation, value) cycled every full turn of the golden-ratio hues, so that large k stays distinct.
_SAT_VAL = ((0.85, 0.95), (0.55, 0.80), (0.95, 0.65), (0.40, 0.95))

_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX, spelled out so that importing this module does not import cv2
_TEXT = (30, 30, 30)  # near-black for captions and labels
_BACKGROUND = 255  # white canvas
_OUTLINE = 255  # white 1-px slot boundaries
_GAP_COLOUR = (70, 90, 160)  # muted blue between grayscale tiles: distinct from both 0 and 1 masks
_LINE = (31, 119, 180)  # the blue of the plotted loss line


def palette(k: int) -> np.ndarray:
    """Fixed, deterministic colours for k slots.

    Args:
        k: number of colours, >= 0.

    Returns:
        (k, 3) uint8 RGB. The first 12 are hand-picked; later ones use golden-ratio hues. palette(k) is a
        prefix of palette(k + 1), so slot j keeps its colour whatever K is.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    k = int(k)
    colours = [tuple(int(c) for c in row) for row in _BASE_PALETTE[:k]]
    for i in range(len(_BASE_PALETTE), k):
        j = i - len(_BASE_PALETTE)
        sat, val = _SAT_VAL[(j // 7) % len(_SAT_VAL)]  # ~7 golden steps make one pass round the wheel
        r, g, b = colorsys.hsv_to_rgb((0.05 + j * _GOLDEN) % 1.0, sat, val)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.array(colours, dtype=np.uint8).reshape(k, 3)


def overlay_masks(
    image: np.ndarray, masks: np.ndarray, *, alpha: float = 0.5, outlines: bool = True
) -> np.ndarray:
    """Colour each pixel by its most likely slot, blended over the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (K, H, W) float in [0, 1], summing to 1 over K (only the argmax is used).
        alpha: weight of the slot colour, in [0, 1]; 0 shows the image, 1 flat colours.
        outlines: draw 1-px white lines where the argmax slot changes between neighbouring pixels (on
            the left / upper pixel of each differing pair).

    Returns:
        (H, W, 3) uint8 RGB: ``round((1 - alpha) * image + alpha * palette(K)[argmax])``, outlines in
        white.
    """
    _check_rgb(image, "image")
    if not isinstance(masks, np.ndarray) or masks.ndim != 3 or masks.shape[0] < 1:
        raise ValueError(f"masks must be a (K, H, W) numpy array with K >= 1, got {_shape_of(masks)}")
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks (K, H, W) = {tuple(masks.shape)} must match the image's (H, W) = {image.shape[:2]}; "
            "resize them first (tta_runtime.inputs.resize_masks)"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")

    labels = masks.argmax(axis=0)  # (H, W) slot index
    colours = palette(masks.shape[0])[labels].astype(np.float32)  # (H, W, 3)
    blended = image.astype(np.float32) * np.float32(1.0 - alpha) + colours * np.float32(alpha)
    out = (blended + 0.5).astype(np.uint8)  # round half up; values stay within [0, 255]
    if outlines:
        out[_boundaries(labels)] = _OUTLINE
    return out


def mask_grid(masks: np.ndarray) -> np.ndarray:
    """Each slot's mask as a grayscale tile, side by side.

    Args:
        masks: (K, H, W) float in [0, 1] (values outside are clipped).

    Returns:
        (H, K * W + (K - 1) * 2, 3) uint8 RGB: tile j is slot j (white = 1), tiles separated by 2-px
        blue-gray gaps.
    """
    if not isinstance(masks, np.ndarray) or masks.ndim != 3 or min(masks.shape) < 1:
        raise ValueError(f"masks must be a non-empty (K, H, W) numpy array, got {_shape_of(masks)}")
    k, height, width = masks.shape
    gap = 2
    grid = np.empty((height, k * width + (k - 1) * gap, 3), dtype=np.uint8)
    grid[:] = _GAP_COLOUR
    tiles = (np.clip(masks.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # (K, H, W)
    for j in range(k):
        x0 = j * (width + gap)
        grid[:, x0 : x0 + width] = tiles[j][:, :, None]
    return grid


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> pathlib.Path:
    """Write an RGB image as PNG, creating parent directories.

    Args:
        path: destination; must end in ``.png``.
        rgb: (H, W, 3) uint8 RGB.

    Returns:
        The path written, as a pathlib.Path.

    Raises:
        ValueError: bad array or a path that does not end in .png.
        OSError: the file could not be written (the message names the path).
    """
    _check_rgb(rgb, "rgb")
    target = pathlib.Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files; the path must end in .png, got {str(target)!r}")
    # Writing the encoded bytes ourselves (rather than cv2.imwrite) gives a clear error with the reason on
    # failure, works for non-ASCII paths on every platform, and never writes into a special file.
    return atomic_write(target, encode_png(rgb), "PNG file")


def encode_png(image: np.ndarray) -> bytes:
    """The bytes of a lossless PNG of `image`: (H, W, 3) uint8 RGB, or (H, W) uint8 / uint16 gray (a label map).

    Raises:
        ValueError: any other array.
        OSError: OpenCV could not encode it.
    """
    cv2 = import_cv2()
    if isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype in (np.uint8, np.uint16):
        bgr = image
    else:
        _check_rgb(image, "image")
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise OSError(f"OpenCV could not encode a PNG of shape {image.shape}")
    return encoded.tobytes()


def loss_curve(
    losses: Sequence[float], *, size: tuple[int, int] = (160, 320), title: str = "loss"
) -> np.ndarray:
    """A small line plot of losses per step, drawn with OpenCV.

    Args:
        losses: one value per step; NaN / Inf values are left out of the line and counted in the title.
        size: (H, W) of the picture, at least (64, 96).
        title: text drawn above the plot (ASCII; OpenCV's fonts have no other glyphs).

    Returns:
        (H, W, 3) uint8 RGB: white background, axes box, blue line, the max and min loss labelled on the
        left, the first and last step below.
    """
    cv2 = import_cv2()
    height, width = _check_hw(size, "size")
    if height < 64 or width < 96:
        raise ValueError(f"size must be at least (64, 96) to fit the labels, got {size!r}")
    values = np.asarray(losses, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    n = values.size

    canvas = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    font_scale = 0.4
    text_h = cv2.getTextSize("0", _FONT, font_scale, 1)[0][1]
    if finite.any():
        low, high = float(values[finite].min()), float(values[finite].max())
        top_label, bottom_label = f"{high:.4g}", f"{low:.4g}"
    else:
        low = high = 0.0
        top_label = bottom_label = ""
    label_w = max(cv2.getTextSize(s, _FONT, font_scale, 1)[0][0] for s in (top_label, bottom_label, "0"))

    # Plot area inside margins that fit the labels: title above, y labels left, step numbers below.
    left, right = label_w + 8, width - 8
    top, bottom = text_h + 12, height - text_h - 10
    cv2.rectangle(canvas, (left, top), (right, bottom), (120, 120, 120), 1)

    skipped = int(n - finite.sum())
    heading = title if not skipped else f"{title} ({skipped} non-finite)"
    _put_text(cv2, canvas, heading, (left, top - 6), font_scale * 1.2)
    if n == 0 or not finite.any():
        _put_text(cv2, canvas, "no data", (left + 6, (top + bottom) // 2), font_scale)
        return canvas

    if high > low:
        _put_text(cv2, canvas, top_label, (left - 4, top + text_h), font_scale, align="right")
        _put_text(cv2, canvas, bottom_label, (left - 4, bottom), font_scale, align="right")
    else:  # a flat curve: one label, level with the line through the middle
        _put_text(cv2, canvas, top_label, (left - 4, (top + bottom + text_h) // 2), font_scale, align="right")
    _put_text(cv2, canvas, "0", (left, bottom + text_h + 6), font_scale)
    _put_text(cv2, canvas, str(n - 1), (right, bottom + text_h + 6), font_scale, align="right")

    # Inset the line by 3 px so it never sits on the box; a flat curve is drawn through the middle.
    x0, x1, y0, y1 = left + 3, right - 3, top + 3, bottom - 3
    xs = x0 + (x1 - x0) * (np.arange(n) / max(n - 1, 1))
    span = high - low
    if span == 0:
        ys = np.where(finite, (y0 + y1) / 2, np.nan)
    else:
        ys = y1 - (y1 - y0) * (values - low) / span
    shift = 4  # sub-pixel precision: coordinates in 1/16 px
    points = np.stack([xs, ys], axis=1) * (1 << shift)
    # A NaN splits the line into runs of finite values, each drawn on its own.
    runs = np.split(np.arange(n), np.flatnonzero(~finite))
    for run in runs:
        run = run[finite[run]]
        if run.size == 1:
            cx, cy = points[run[0]].round().astype(np.int32)
            cv2.circle(canvas, (int(cx), int(cy)), 2 << shift, _LINE, -1, cv2.LINE_AA, shift)
        elif run.size > 1:
            poly = points[run].round().astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [poly], False, _LINE, 1, cv2.LINE_AA, shift)
    return canvas



def line_plot(
    series: dict[str, Sequence[float]], *, size: tuple[int, int] = (240, 480), title: str = "",
    x_label: str = "",
) -> np.ndarray:
    """Several named lines on shared axes with a legend, drawn with OpenCV (error over time, curves over r).

    Args:
        series: name -> values (one per x position 0..n-1); every series must be finite and non-empty.
        size: (H, W) of the picture, at least (120, 200).
        title, x_label: ASCII text above the plot and under its x axis.

    Returns:
        (H, W, 3) uint8 RGB: white background, axes box, one coloured line per series (colours from
        `palette`), the y range labelled on the left, the legend in the top-right corner.
    """
    cv2 = import_cv2()
    height, width = _check_hw(size, "size")
    if height < 120 or width < 200:
        raise ValueError(f"size must be at least (120, 200), got {size!r}")
    if not series:
        raise ValueError("line_plot needs at least one series")
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in series.items()}
    for k, v in arrays.items():
        if v.size == 0 or not np.isfinite(v).all():
            raise ValueError(f"series {k!r} must be non-empty and finite")
    low = min(float(v.min()) for v in arrays.values())
    high = max(float(v.max()) for v in arrays.values())
    if high == low:
        high = low + 1.0
    n = max(v.size for v in arrays.values())
    canvas = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    fs = 0.4
    text_h = cv2.getTextSize("0", _FONT, fs, 1)[0][1]
    labels = (f"{high:.3g}", f"{low:.3g}")
    label_w = max(cv2.getTextSize(t, _FONT, fs, 1)[0][0] for t in labels)
    left, right = label_w + 8, width - 8
    top, bottom = text_h + 14, height - 2 * text_h - 14
    cv2.rectangle(canvas, (left, top), (right, bottom), (120, 120, 120), 1)
    _put_text(cv2, canvas, title, (left, top - 6), fs * 1.1)
    _put_text(cv2, canvas, labels[0], (left - 4, top + text_h), fs, align="right")
    _put_text(cv2, canvas, labels[1], (left - 4, bottom), fs, align="right")
    _put_text(cv2, canvas, "0", (left, bottom + text_h + 6), fs)
    _put_text(cv2, canvas, str(n - 1), (right, bottom + text_h + 6), fs, align="right")
    if x_label:
        _put_text(cv2, canvas, x_label, ((left + right) // 2, bottom + 2 * text_h + 10), fs, align="center")
    colours = palette(len(arrays))
    legend_x = right - 8 - 24 - max(cv2.getTextSize(k, _FONT, fs, 1)[0][0] for k in arrays)
    x0, x1, y0, y1 = left + 3, right - 3, top + 3, bottom - 3
    shift = 4
    for i, (name, v) in enumerate(arrays.items()):
        xs = x0 + (x1 - x0) * (np.arange(v.size) / max(n - 1, 1))
        ys = y1 - (y1 - y0) * (v - low) / (high - low)
        colour = tuple(int(c) for c in colours[i])
        pts = (np.stack([xs, ys], axis=1) * (1 << shift)).round().astype(np.int32)
        if v.size == 1:
            cv2.circle(canvas, (int(pts[0, 0]), int(pts[0, 1])), 3 << shift, colour, -1, cv2.LINE_AA, shift)
        else:
            cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA, shift)
    # The legend last, on a white box, so no line runs through its text.
    box_bottom = top + 6 + len(arrays) * (text_h + 6) + 4
    cv2.rectangle(canvas, (legend_x - 4, top + 2), (right - 2, box_bottom), (255, 255, 255), -1)
    cv2.rectangle(canvas, (legend_x - 4, top + 2), (right - 2, box_bottom), (200, 200, 200), 1)
    for i, name in enumerate(arrays):
        colour = tuple(int(c) for c in colours[i])
        ly = top + 6 + (i + 1) * (text_h + 6)
        cv2.line(canvas, (legend_x, ly - text_h // 2), (legend_x + 18, ly - text_h // 2), colour, 2, cv2.LINE_AA)
        _put_text(cv2, canvas, name, (legend_x + 22, ly), fs)
    return canvas


def panel(tiles: Sequence[tuple[str, np.ndarray]], *, scale: int = 1) -> np.ndarray:
    """Lay out captioned RGB tiles left to right, e.g. "input | masks before | masks after | loss".

    Args:
        tiles: (caption, image) pairs; each image (h, w, 3) uint8 RGB (or (h, w) uint8 gray). Captions
            should be ASCII: OpenCV's fonts have no other glyphs.
        scale: integer enlargement of every tile, nearest-neighbour (keeps small masks crisp).

    Returns:
        (H, W, 3) uint8 RGB on white: each tile under its caption, tiles top-aligned, 8-px margins.
    """
    cv2 = import_cv2()
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    if len(tiles) == 0:
        raise ValueError("panel needs at least one (caption, image) tile")

    margin, font_scale = 8, 0.5
    images, captions = [], []
    for i, tile in enumerate(tiles):
        if not isinstance(tile, tuple) or len(tile) != 2 or not isinstance(tile[0], str):
            raise ValueError(f"tile {i} must be a (caption, image) pair, got {type(tile).__name__}")
        caption, image = tile
        if isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype == np.uint8:
            image = np.repeat(image[:, :, None], 3, axis=2)
        _check_rgb(image, f"tile {i} ({caption!r})")
        if scale > 1:
            image = cv2.resize(
                image, (image.shape[1] * scale, image.shape[0] * scale), interpolation=cv2.INTER_NEAREST
            )
        images.append(image)
        captions.append(caption)

    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, font_scale, 1)
    caption_h = text_h + baseline + 6
    # A column is as wide as its tile or its caption, whichever is wider; the tile is centred in it.
    widths = [max(img.shape[1], _text_w(cv2, cap, font_scale)) for img, cap in zip(images, captions)]
    height = margin + caption_h + max(img.shape[0] for img in images) + margin
    width = margin + sum(widths) + margin * (len(images) - 1) + margin
    canvas = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)

    x = margin
    for image, caption, col_w in zip(images, captions, widths):
        _put_text(cv2, canvas, caption, (x + col_w // 2, margin + text_h), font_scale, align="center")
        tx, ty = x + (col_w - image.shape[1]) // 2, margin + caption_h
        canvas[ty : ty + image.shape[0], tx : tx + image.shape[1]] = image
        x += col_w + margin
    return canvas


# ----------------------------------------------------------------------------------------------------
# Helpers


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W) bool, True on the left/upper pixel of each pair that differs."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def _check_rgb(image: object, name: str) -> None:
    """Raise ValueError unless `image` is a non-empty (H, W, 3) uint8 array."""
    if (
        not isinstance(image, np.ndarray)
        or image.ndim != 3
        or image.shape[2] != 3
        or image.dtype != np.uint8
        or image.size == 0
    ):
        raise ValueError(f"{name} must be a non-empty (H, W, 3) uint8 RGB array, got {_shape_of(image)}")


def _check_hw(size: object, name: str) -> tuple[int, int]:
    """(H, W) of positive ints -> (H, W)."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{name} must be (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _shape_of(x: object) -> str:
    """Type, dtype and shape of an array (or just the type), for error messages."""
    if isinstance(x, np.ndarray):
        return f"numpy array dtype={x.dtype} shape={tuple(x.shape)}"
    return type(x).__name__


def _text_w(cv2: ModuleType, text: str, font_scale: float) -> int:
    """Width in pixels of `text` in the panel font (0 for an empty string)."""
    if not text:
        return 0
    return int(cv2.getTextSize(text, _FONT, font_scale, 1)[0][0])


def _put_text(
    cv2: ModuleType,
    canvas: np.ndarray,
    text: str,
    anchor: tuple[int, int],
    font_scale: float,
    *,
    align: str = "left",
) -> None:
    """Draw anti-aliased text on its baseline at anchor's y; anchor's x is its left, right or centre."""
    if not text:
        return
    x, y = anchor
    if align != "left":
        width = _text_w(cv2, text, font_scale)
        x -= width if align == "right" else width // 2
    cv2.putText(canvas, text, (x, y), _FONT, font_scale, _TEXT, 1, cv2.LINE_AA)
