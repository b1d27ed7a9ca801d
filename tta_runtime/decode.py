"""Decoding: image files and PIL images to numpy arrays, and the layout check every numpy image passes.

Each function returns or checks an (H, W) or (H, W, C) array, C in (1, 3, 4), and raises
`InvalidInputError` naming what was received and what is expected.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from tta_runtime.device import import_cv2
from tta_runtime.errors import InvalidInputError

EXPECTED = (
    "expected one image: a numpy HxWxC array (C = 3 RGB, 1 gray, 4 RGBA; or HxW gray) of uint8, uint16 "
    "or float in [0, 1], a torch tensor (3, H, W) or (1, 3, H, W), a PIL image, or a path to an image file"
)


def read_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, str, str]:
    """Decode an image file with OpenCV; return (H, W) or (H, W, 3) BGR, 8 or 16 bit."""
    cv2 = import_cv2()
    name = os.fspath(path)
    if not isinstance(name, str):
        raise InvalidInputError(f"got a bytes path {name!r}; pass the path as str or pathlib.Path")
    if name == "" or name.isspace():
        raise InvalidInputError(f"got the string {name!r}, which is not a path; {EXPECTED}")
    if not os.path.exists(name):
        raise InvalidInputError(f"no such file: {name!r}")
    if os.path.isdir(name):
        raise InvalidInputError(f"{name!r} is a directory, not an image file")
    try:
        # fromfile + imdecode rather than imread: same decoders, but non-ASCII paths work everywhere.
        data = np.fromfile(name, dtype=np.uint8)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {name!r}: {exc}") from exc
    decoded = None
    if data.size:
        try:
            # ANYDEPTH keeps 16-bit files 16-bit; ANYCOLOR keeps gray files gray and drops alpha. Unlike
            # IMREAD_UNCHANGED, these flags apply the EXIF orientation, so phone photos come out upright.
            decoded = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        except cv2.error:
            decoded = None
    if decoded is None:
        raise InvalidInputError(
            f"{name!r} is not a readable image (PNG, JPEG, BMP, TIFF, WebP, ...): OpenCV could not decode "
            f"its {data.size} bytes"
        )
    what = f"file {name!r} ({decoded.dtype}, shape {tuple(decoded.shape)})"
    return check_numpy_layout(decoded, what), "bgr", what


# PIL modes whose numpy view is already something _prepare_array understands; everything else (palette,
# 1-bit, CMYK, YCbCr, LA, ...) is converted to RGB by PIL first.
_PIL_DIRECT_MODES = ("RGB", "RGBA", "L", "I;16", "I;16L", "I;16B", "I", "F")


def pil_to_array(image: Any) -> tuple[np.ndarray, str, str]:
    """A PIL image -> (H, W) or (H, W, 3|4) numpy array, RGB."""
    mode = getattr(image, "mode", None)
    what = f"PIL image mode={mode!r} size={getattr(image, 'size', None)}"
    try:
        if mode not in _PIL_DIRECT_MODES:
            image = image.convert("RGB")
        arr = np.asarray(image)
    except Exception as exc:  # PIL loads lazily: a truncated file fails here, with its own error types
        raise InvalidInputError(f"could not read {what}: {exc}") from exc
    return check_numpy_layout(arr, what), "rgb", what


def check_numpy_layout(arr: np.ndarray, what: str) -> np.ndarray:
    """Check dtype kind, ndim, channel count and emptiness of a numpy image; return it unchanged."""
    kind = arr.dtype.kind
    if kind == "b":
        raise InvalidInputError(
            f"got {what}; bool images are ambiguous (0/1 or 0/255?): convert to uint8 (x * 255) or float"
        )
    if kind == "c":
        raise InvalidInputError(f"got {what}; complex images are not accepted: pass the real part or abs()")
    if kind not in "uif":
        raise InvalidInputError(f"got {what}; numeric pixels are expected (uint8, uint16 or float)")
    if arr.ndim == 4 and arr.shape[0] == 1:
        raise InvalidInputError(
            f"got {what}; numpy images must be HxWxC without a batch axis: pass arr[0]"
        )
    if arr.ndim == 4:
        raise InvalidInputError(
            f"got {what}; predict takes one image, not a batch of {arr.shape[0]}: pass one HxWxC image"
        )
    if arr.ndim not in (2, 3):
        raise InvalidInputError(f"got {what}; numpy images must be HxWxC (or HxW gray), got {arr.ndim}-D")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        if arr.shape[0] in (1, 3, 4):
            raise InvalidInputError(
                f"got {what}; it looks channels-first; numpy images must be HxWxC — use "
                "arr.transpose(1, 2, 0)"
            )
        raise InvalidInputError(
            f"got {what}; numpy images must be HxWxC with C = 3 (RGB), 1 (gray) or 4 (RGBA), "
            f"got C = {arr.shape[2]}"
        )
    if arr.size == 0:
        raise InvalidInputError(f"got {what}; the image is empty (a zero-sized axis)")
    return arr


def describe(x: object) -> str:
    """What a value is, for error messages: type, and dtype / shape / device where it has them."""
    if isinstance(x, np.ndarray):
        return f"numpy array dtype={x.dtype} shape={tuple(x.shape)}"
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor dtype={x.dtype} shape={tuple(x.shape)} device={x.device}"
    if isinstance(x, str):
        return f"str {x!r}"
    return "an object of type " + f"{type(x).__module__}.{type(x).__qualname__}".removeprefix("builtins.")
