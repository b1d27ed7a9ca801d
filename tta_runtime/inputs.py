"""The image door: whatever a user hands to ``predict`` becomes one model-sized RGB tensor.

``prepare_image`` takes one image in any of the forms people actually have at hand and returns a
:class:`PreparedImage`: a ``(1, 3, H, W)`` float32 tensor in [0, 1] at the model's input size, plus the
image at its own resolution as uint8 RGB for overlays. Anything it cannot take raises
:class:`~tta_runtime.errors.InvalidInputError` naming what was received (type, dtype, shape) and what
is expected, before any model work starts.

Accepted inputs
---------------
* numpy ``HxWx3`` (RGB, or BGR with ``channel_order="bgr"``), ``HxW`` / ``HxWx1`` grayscale (replicated
  to three channels), ``HxWx4`` RGBA (BGRA with ``"bgr"``). The alpha channel is ignored: the colour
  channels are used as they are, not composited over any background.
* dtypes: uint8 (0..255), uint16 (0..65535, divided by 65535), float16/32/64 in [0, 1], and other
  integer dtypes when every value is in 0..255 (read as uint8). bool, complex and object are refused.
* torch tensors ``(3, H, W)``, ``(1, 3, H, W)``, grayscale ``(H, W)``, ``(1, H, W)``, ``(1, 1, H, W)``
  and ``(4, H, W)`` / ``(1, 4, H, W)`` with alpha ignored; float in [0, 1] or uint8. Any device, with or
  without grad: the tensor is detached and copied to the CPU. ``channel_order`` applies to tensors as
  to numpy arrays.
* a path (``str`` or ``os.PathLike``) to an image file OpenCV can decode (PNG, JPEG, BMP, TIFF, WebP,
  ...), 8 or 16 bit, gray or colour, EXIF orientation applied. ``channel_order`` is ignored for files:
  the file format defines the channel order.
* PIL images (PIL is only touched when the object comes from PIL). Their order is always RGB, so
  ``channel_order`` is ignored for them too.

Files and PIL images are decoded by `tta_runtime.decode`; OpenCV, which resizes and decodes, is imported
on first use so that ``import tta_runtime`` works without it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from tta_runtime.config import Preprocessing
from tta_runtime.decode import EXPECTED, check_numpy_layout, check_pixels, describe, pil_to_array, read_file
from tta_runtime.device import import_cv2
from tta_runtime.errors import InvalidInputError

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest accepted image, in pixels (H * W), unless the ``max_pixels`` runtime option raises it."""

_FLOAT_TOLERANCE = 1e-6  # float images slightly outside [0, 1] from rounding are clipped, not refused
_CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the model, and the same image at its own size for drawing.

    Attributes:
        tensor: (1, 3, S_h, S_w) float32 in [0, 1], RGB, on the CPU, resized to the model's input size.
        original_size: (H, W) of the input as given.
        original_rgb: (H, W, 3) uint8 RGB at the input's own resolution (``round(x * 255)`` for float
            input). It is never a view of the caller's array.
    """

    tensor: torch.Tensor
    original_size: tuple[int, int]
    original_rgb: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Public functions


def prepare_image(
    image: Any,
    *,
    size: int | tuple[int, int] | None = None,
    channel_order: str = "rgb",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    preprocessing: Preprocessing | None = None,
) -> PreparedImage:
    """Turn one user image into the model's input tensor.

    Args:
        image: one image, in any of the forms listed in this module's docstring.
        size: the model's input size, ``S`` for S x S or ``(S_h, S_w)`` (or None with ``preprocessing``).
        channel_order: ``"rgb"`` or ``"bgr"`` (OpenCV frames); the order of the colour channels of a
            numpy array or tensor. Ignored for file paths and PIL images, whose order is known.
        max_pixels: largest accepted H * W; bigger images are refused before they are converted.
        preprocessing: a model card's `Preprocessing` (resize mode, interpolation); its ``size`` is the
            output size. None: the whole image resized to ``size`` with area averaging (as the default card).

    Returns:
        A :class:`PreparedImage` with ``tensor`` (1, 3, S_h, S_w) float32 in [0, 1], RGB.

    Raises:
        InvalidInputError: the image (or an argument) is not something this function can take.

    Resizing (default) uses area averaging on an axis that shrinks and bilinear interpolation on an axis that
    grows; ``preprocessing.describe()`` says what another preprocessing does. The caller's array is never modified.
    """
    if preprocessing is not None:
        if size is not None and _check_size(size) != (preprocessing.size, preprocessing.size):
            raise InvalidInputError(f"size {size!r} disagrees with preprocessing.size {preprocessing.size}; give one of them")
        size = preprocessing.size
    out_hw = _check_size(size)
    _check_options(channel_order, max_pixels)

    array, order, what = _to_array(image, channel_order, max_pixels)
    return _prepare_array(array, order, out_hw, max_pixels, what, preprocessing)


def prepare_images(
    items: list[Any], *, whole: Any = None, channel_order: str = "rgb", max_pixels: int = DEFAULT_MAX_PIXELS,
    preprocessing: Preprocessing | None = None,
) -> list[PreparedImage]:
    """Every image of a request through `prepare_image` (an error in a batch names the image's index).

    `whole`: the batch `items` came from (`split_batch`). A uint8 (N, S_h, S_w, 3) numpy batch already at the
    model's size under a square resize is converted in one pass (the same tensors, bit for bit, as image by
    image: geometry is then the identity)."""
    _check_options(channel_order, max_pixels)
    if (preprocessing is not None and preprocessing.resize == "square" and isinstance(whole, np.ndarray)
            and whole.shape[1:] == (preprocessing.size, preprocessing.size, 3) and whole.dtype == np.uint8
            and len(whole) == len(items)):
        out_hw = (preprocessing.size, preprocessing.size)
        check_pixels(out_hw, max_pixels, describe(whole))
        own = (whole if channel_order == "rgb" else whole[..., ::-1]).copy()  # ours, C-contiguous, RGB
        chw = _unit_chw(own, 1.0 / 255.0)
        return [PreparedImage(tensor=chw[i : i + 1], original_size=out_hw, original_rgb=own[i]) for i in range(len(own))]
    prepared = []
    for i, item in enumerate(items):
        try:
            prepared.append(prepare_image(item, preprocessing=preprocessing, channel_order=channel_order, max_pixels=max_pixels))
        except InvalidInputError as e:
            if len(items) == 1:
                raise
            raise InvalidInputError(f"image {i} of the batch of {len(items)}: {e}") from None
    return prepared


def split_batch(images: Any) -> list[Any] | None:
    """The images of a batch, one by one, or None when `images` is a single image.

    A batch is a numpy array (N, H, W, C) (any N, even 1), a dense torch tensor (N, C, H, W) with N > 1 (a
    (1, C, H, W) tensor stays one image, as `prepare_image` reads it), or a list/tuple of images (arrays,
    tensors, paths or PIL images). Each item is then checked by `prepare_image` like a single image.
    A 3-D numpy array is always one image (H, W, C), for classifiers as for segmenters: an (N, H, W) stack
    of gray images is ambiguous with a channels-first or many-channel image, and is refused by
    `prepare_image` with the forms it takes (a gray batch is (N, H, W, 1)).
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise InvalidInputError(f"got {describe(images)}; a batch needs at least one image")
            return list(images)
        return None
    if isinstance(images, torch.Tensor):
        dense = not (images.is_nested or images.layout != torch.strided or images.is_meta)
        return list(images) if dense and images.ndim == 4 and images.shape[0] > 1 else None
    if isinstance(images, (list, tuple)) and images and all(
        isinstance(x, (np.ndarray, torch.Tensor, str, os.PathLike)) or type(x).__module__.startswith("PIL")
        for x in images
    ):
        return list(images)
    return None


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize slot masks to another resolution, keeping them a distribution over slots.

    Args:
        masks: (K, h, w) float probabilities (K >= 1), normally summing to 1 over K.
        size: target (H, W).

    Returns:
        (K, H, W) float32 in [0, 1], summing to 1 over K at every pixel (|sum - 1| < 1e-5). Bilinear
        interpolation per slot, then clipped to >= 0 and renormalised; a pixel where every slot is 0
        becomes uniform 1/K.
    """
    cv2 = import_cv2()
    if not isinstance(masks, np.ndarray) or masks.ndim != 3 or masks.size == 0:
        raise ValueError(f"masks must be a non-empty (K, h, w) numpy array, got {describe(masks)}")
    if masks.dtype.kind not in "fiu":
        raise ValueError(f"masks must be float probabilities, got dtype {masks.dtype}")
    out_h, out_w = _check_size(size, error=ValueError)
    k = masks.shape[0]
    src = masks.astype(np.float32, copy=False)

    out = np.empty((k, out_h, out_w), dtype=np.float32)
    if src.shape[1:] == (out_h, out_w):
        out[...] = src
    else:
        # One channel at a time, written straight into the (K, H, W) result: no HxWxK transpose at the
        # large size, and no limit on K from OpenCV's channel count.
        for i in range(k):
            cv2.resize(
                np.ascontiguousarray(src[i]), (out_w, out_h), dst=out[i], interpolation=cv2.INTER_LINEAR
            )
    np.maximum(out, 0.0, out=out)
    total = out.sum(axis=0, keepdims=True)  # (1, H, W)
    empty = total <= 0.0
    if empty.any():
        out[:, empty[0]] = 1.0 / k
        total[empty] = 1.0
    out /= total
    return out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float image, e.g. a model reconstruction, to another resolution.

    Args:
        image: (h, w, 3) float (any real dtype; the values are not range-checked).
        size: target (H, W).

    Returns:
        (H, W, 3) float32: bilinear on an axis that grows, area averaging on an axis that shrinks (plain
        bilinear aliases badly when shrinking by more than 2x).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(f"image must be a non-empty (h, w, 3) numpy array, got {describe(image)}")
    if image.dtype.kind not in "fiu":
        raise ValueError(f"image must be a real-valued array, got dtype {image.dtype}")
    out_hw = _check_size(size, error=ValueError)
    return _resize(np.ascontiguousarray(image, dtype=np.float32), out_hw)


# ----------------------------------------------------------------------------------------------------
# Every input kind becomes (array, channel order, description)


def _to_array(image: Any, channel_order: str, max_pixels: int) -> tuple[np.ndarray, str, str]:
    """Dispatch on the kind of input; return an (H, W) or (H, W, C) array with C in (1, 3, 4).

    The array may be a view of the caller's data; later steps only read it.
    """
    if image is None:
        raise InvalidInputError(f"got None; {EXPECTED}")
    if isinstance(image, torch.Tensor):
        return _tensor_to_array(image, channel_order, max_pixels)
    if isinstance(image, np.ndarray):
        return check_numpy_layout(image, describe(image)), channel_order, describe(image)
    if isinstance(image, (str, os.PathLike)):
        return read_file(image, max_pixels)
    if type(image).__module__.startswith("PIL"):
        return pil_to_array(image, max_pixels)
    if isinstance(image, (list, tuple)):
        raise InvalidInputError(
            f"got a {type(image).__name__} of length {len(image)}; {EXPECTED}. "
            "For nested lists of pixel values use np.asarray(x, dtype=np.uint8); predict takes one image "
            "at a time, not a list of images"
        )
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise InvalidInputError(
            f"got {type(image).__name__}; {EXPECTED}. For encoded image bytes use "
            "cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) and channel_order='bgr'"
        )
    raise InvalidInputError(f"got {describe(image)}; {EXPECTED}")


def _tensor_to_array(tensor: torch.Tensor, channel_order: str, max_pixels: int) -> tuple[np.ndarray, str, str]:
    """A (C, H, W) / (1, C, H, W) / (H, W) tensor -> an (H, W, C) numpy view on the CPU."""
    what = describe(tensor)
    if tensor.is_nested or tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
        raise InvalidInputError(
            f"got {what}; images must be dense tensors with data (not nested, sparse, meta or quantized): "
            "convert with t.to_dense() / t.dequantize(), or pass one image of a nested tensor at a time"
        )
    t = tensor.detach()
    if t.dtype == torch.bool:
        raise InvalidInputError(
            f"got {what}; bool images are ambiguous (0/1 or 0/255?): convert to uint8 or float"
        )
    if t.is_complex():
        raise InvalidInputError(f"got {what}; complex images are not accepted: pass the real part or abs()")
    if not (t.is_floating_point() or t.dtype in _TORCH_INT_DTYPES):
        raise InvalidInputError(f"got {what}; numeric pixels are expected (uint8 or float)")

    if t.ndim == 4:
        if t.shape[0] != 1:
            raise InvalidInputError(
                f"got {what}; predict takes one image, not a batch of {t.shape[0]}: pass t[i] "
                "(batches come later)"
            )
        t = t[0]
    if t.ndim == 2:
        t = t[None]  # (1, H, W) gray
    if t.ndim != 3:
        raise InvalidInputError(f"got {what}; tensors must be (3, H, W) or (1, 3, H, W), got {tensor.ndim}-D")
    if t.shape[0] not in (1, 3, 4):
        if t.shape[-1] in (1, 3, 4):
            raise InvalidInputError(
                f"got {what}; it looks channels-last; tensors must be CxHxW — use t.permute(2, 0, 1)"
            )
        raise InvalidInputError(
            f"got {what}; tensors must be (3, H, W) or (1, 3, H, W) (or 1 gray / 4 RGBA channels), "
            f"got {t.shape[0]} channels"
        )
    if t.numel() == 0:
        raise InvalidInputError(f"got {what}; the image is empty (a zero-sized axis)")
    check_pixels((int(t.shape[1]), int(t.shape[2])), max_pixels, what)  # before the copy to the CPU

    t = t.cpu()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()  # numpy has no bfloat16; float16 is widened later anyway
    return t.numpy().transpose(1, 2, 0), channel_order, what  # (H, W, C) view


_TORCH_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------
# One array -> PreparedImage


def _prepare_array(
    arr: np.ndarray, order: str, out_hw: tuple[int, int], max_pixels: int, what: str,
    preprocessing: Preprocessing | None = None,
) -> PreparedImage:
    """Validate pixel values, convert to RGB, resize, and build the PreparedImage."""
    cv2 = import_cv2()
    given = arr  # may be (a view of) the caller's data: read it, never write it or hand it back
    height, width = int(arr.shape[0]), int(arr.shape[1])
    check_pixels((height, width), max_pixels, what)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # OpenCV reads native byte order only

    # Bring the pixels to a dtype OpenCV resizes natively (uint8, uint16, float32) and note the factor
    # that maps that dtype to [0, 1]. uint8 stays uint8 through the resize: 4x less memory traffic.
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif arr.dtype == np.uint16:
        scale = 1.0 / 65535.0
    elif kind == "f":
        _check_float_values(arr, what)
        arr = arr.astype(np.float32, copy=False)
        scale = 1.0
    else:  # other integer dtypes, e.g. int64 from user code: fine when they hold 8-bit values
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 255:
            raise InvalidInputError(
                f"got {what} with values in [{low}, {high}]; integer images must be uint8 (0..255) or "
                "uint16 (0..65535): convert with arr.astype(np.uint8) if the values are 8-bit"
            )
        arr = arr.astype(np.uint8)
        scale = 1.0 / 255.0

    # OpenCV's Python binding cannot take every numpy layout (negative strides, sliced channels).
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)

    rgb = _to_rgb(cv2, arr, order)  # (H, W, 3), the caller's own array when no conversion was needed
    resized = _geometry(rgb, out_hw, preprocessing)  # (S_h, S_w, 3), same dtype

    tensor = _unit_chw(resized, scale)[None]  # (1, 3, S_h, S_w)

    if rgb.dtype == np.uint8:
        original = rgb.copy() if rgb is given else rgb  # an array we converted is already our own
    else:
        # round(x * 255) with saturation in one pass; abs() is harmless, values are >= -1e-6.
        original = cv2.convertScaleAbs(rgb, alpha=255.0 * scale)
    return PreparedImage(tensor=tensor, original_size=(height, width), original_rgb=original)


def _check_options(channel_order: str, max_pixels: int) -> None:
    if channel_order not in _CHANNEL_ORDERS:
        raise InvalidInputError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InvalidInputError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _unit_chw(hwc: np.ndarray, scale: float) -> torch.Tensor:
    """(..., H, W, C) pixels -> a fresh contiguous float32 (..., C, H, W) tensor: times `scale`, clipped to [0, 1]
    (float input may sit up to 1e-6 outside it)."""
    chw = np.moveaxis(hwc, -1, -3).astype(np.float32, order="C")
    if scale != 1.0:
        chw *= np.float32(scale)
    np.clip(chw, 0.0, 1.0, out=chw)
    return torch.from_numpy(chw)


def _check_float_values(arr: np.ndarray, what: str) -> None:
    """Refuse NaN, Inf and values outside [0, 1] (with a small tolerance) in a float image."""
    low, high = float(np.min(arr)), float(np.max(arr))  # min/max propagate NaN, so two passes suffice
    if math.isnan(low) or math.isnan(high):
        count = int(np.isnan(arr).sum())
        raise InvalidInputError(f"got {what} containing {count} NaN values; images must be finite")
    if math.isinf(low) or math.isinf(high):
        count = int(np.isinf(arr).sum())
        raise InvalidInputError(f"got {what} containing {count} Inf values; images must be finite")
    if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
        raise InvalidInputError(
            f"got {what} with values in [{low:.6g}, {high:.6g}]; float images must be in [0, 1]. "
            "For 0..255 data divide by 255 (arr.astype(np.float32) / 255) or pass the uint8 array"
        )


def _to_rgb(cv2: ModuleType, arr: np.ndarray, order: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) in `order` -> (H, W, 3) RGB, same dtype."""
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if channels == 3 and order == "rgb":
        return arr
    if channels == 1:
        code = cv2.COLOR_GRAY2RGB
    elif channels == 3:
        code = cv2.COLOR_BGR2RGB
    else:  # alpha is dropped, not composited: the colour channels are used as they are
        code = cv2.COLOR_RGBA2RGB if order == "rgb" else cv2.COLOR_BGRA2RGB
    return cv2.cvtColor(arr, code)


def _resize(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize (h, w, C) to out_hw: area averaging on a shrinking axis, bilinear on a growing one.

    Returns a new array (never `image` itself), same dtype.
    """
    cv2 = import_cv2()
    out_h, out_w = out_hw
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return image.copy()
    if out_h <= in_h and out_w <= in_w:
        return _keep_channels(cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA), image)
    if out_h >= in_h and out_w >= in_w:
        return _keep_channels(cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR), image)
    # One axis shrinks, the other grows: average along the shrinking axis first, then interpolate.
    mid = cv2.resize(image, (min(in_w, out_w), min(in_h, out_h)), interpolation=cv2.INTER_AREA)
    mid = _keep_channels(mid, image)
    return _keep_channels(cv2.resize(mid, (out_w, out_h), interpolation=cv2.INTER_LINEAR), image)


_FLAGS = {"bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC", "nearest": "INTER_NEAREST"}


def _geometry(image: np.ndarray, out_hw: tuple[int, int], pre: Preprocessing | None) -> np.ndarray:
    """The card's resize (see `Preprocessing`): (h, w, C) -> (S_h, S_w, C), same dtype, a new array."""
    if pre is None or (pre.resize == "square" and pre.interpolation == "area"):
        return _resize(image, out_hw)
    cv2 = import_cv2()
    in_h, in_w = image.shape[:2]
    if pre.resize == "square":
        mid_hw = out_hw
    else:  # shorter side to resize_to, aspect kept (never below the crop)
        short = pre.shorter_side
        scale = short / min(in_h, in_w)
        mid_hw = (max(out_hw[0], round(in_h * scale)), max(out_hw[1], round(in_w * scale)))
        if in_h <= in_w:
            mid_hw = (short, mid_hw[1])
        else:
            mid_hw = (mid_hw[0], short)
    if pre.interpolation == "area":
        mid = _resize(image, mid_hw)
    elif mid_hw == (in_h, in_w):
        mid = image.copy()
    else:
        flag = getattr(cv2, _FLAGS[pre.interpolation])
        mid = _keep_channels(cv2.resize(image, (mid_hw[1], mid_hw[0]), interpolation=flag), image)
    top, left = (mid_hw[0] - out_hw[0]) // 2, (mid_hw[1] - out_hw[1]) // 2
    return np.ascontiguousarray(mid[top : top + out_hw[0], left : left + out_hw[1]])


def _keep_channels(resized: np.ndarray, source: np.ndarray) -> np.ndarray:
    """cv2.resize drops a trailing axis of size 1; put it back so shapes stay (H, W, C)."""
    if source.ndim == 3 and resized.ndim == 2:
        return resized[:, :, None]
    return resized


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _check_size(
    size: object, *, error: type[ValueError] = InvalidInputError
) -> tuple[int, int]:
    """``S`` or ``(H, W)`` of positive ints -> (H, W)."""
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(pair) != 2 or not all(_is_positive_int(v) for v in pair):
        raise error(f"size must be an int S or a pair (H, W) of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def _is_positive_int(value: object) -> bool:
    """True for a positive int or numpy integer (bool excluded: True is not a size)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return is_int and int(value) > 0  # type: ignore[call-overload]




_import_cv2 = import_cv2  # transitional alias for modules not yet moved to tta_runtime.device
