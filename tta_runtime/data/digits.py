"""Real-image classification benchmark: scikit-learn's handwritten digits and a CIFAR-10-C-style corruption suite.

The images are the 1,797 real 8x8 scans bundled with scikit-learn (``sklearn.datasets.load_digits``, grey
levels 0..16, ten classes), so nothing is downloaded. ``load_digits`` splits them by a fixed permutation
into train (60 %), val (10 %) and test (30 %), upsamples each to ``size`` x ``size`` (bilinear) and returns
uint8 RGB (grey replicated). The classifiers in ``models/digits-cnn-*`` train on "train", select on "val",
and are reported on "test"; the corruptions are the distribution shift and are never trained on. What
each corruption does, and how it differs from CIFAR-10-C, is in `tta_runtime.data.corruptions`.

Determinism: image i of a call draws only from
``np.random.default_rng([seed, CORRUPTION_NAMES.index(name), severity, start + i])``, so an image is
corrupted the same alone or in a batch, and the order of ``CORRUPTIONS`` is part of that contract (add
new corruptions at the end). ``corruption_stream`` builds a continual test stream (the corruption changes
every ``segment`` images) from the same per-image streams.

Needs scikit-learn (the ``dev`` extra) for the images; OpenCV and scikit-image (core dependencies) are
imported when first used.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np

from tta_runtime.data.common import (
    check_known,
    check_non_negative_int,
    is_int,
    to_uint8,
)
from tta_runtime.data.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTION_NAMES,
    CORRUPTIONS,
    VALIDATION_CORRUPTIONS,
    corruption_function,
)
from tta_runtime.device import import_cv2, optional_import
from tta_runtime.errors import ConfigError, InvalidInputError

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "LABELS",
    "SEVERITIES",
    "SPLITS",
    "VALIDATION_CORRUPTIONS",
    "corrupt",
    "corruption_stream",
    "load_digits",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

N_IMAGES = 1_797  # sklearn's bundled digits
SPLIT_SEED = 0  # the fixed permutation behind the splits; changing it changes every reported number
_FRACTIONS = {"train": 0.6, "val": 0.1}  # test = the rest (30 %)
MIN_SIZE, MAX_SIZE = 8, 512

_STREAM_TAG = 1_000  # keeps the stream's own draws (order, severities) apart from the per-image streams


# --------------------------------------------------------------------------------------------------
# Public API


def load_digits(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` ("train", "val" or "test") of sklearn's digits at ``size`` x ``size``.

    Returns ``images`` (N, size, size, 3) uint8 RGB (grey replicated, background 0, strokes up to 255) and
    ``labels`` (N,) int64 in 0..9; N is 1078, 180 and 539. The splits are disjoint and always the same.
    Raises ``UnknownNameError`` for an unknown split and ``ConfigError`` for a bad size.
    """
    check_known(split, SPLITS, "digits split", "splits")
    _check_size(size)
    images, labels = _all_digits(int(size))
    idx = _split_indices(split)
    return images[idx], labels[idx]  # fancy indexing copies: callers may modify the arrays


def corrupt(images: np.ndarray, name: str, severity: int, *, seed: int = 0, start: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to each image.

    ``images``: (N, S, S, 3) uint8 RGB, S in [8, 512]. Returns a new (N, S, S, 3) uint8 array. Image i draws
    only from ``np.random.default_rng([seed, CORRUPTION_NAMES.index(name), severity, start + i])``: pass
    ``start`` to corrupt a slice of a larger set exactly as the whole set would be.
    """
    fn = corruption_function(name)
    _check_severity(severity)
    check_non_negative_int("seed", seed)
    check_non_negative_int("start", start)
    _check_images(images)
    index = CORRUPTION_NAMES.index(name)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng([int(seed), index, int(severity), int(start) + i])
        x = image.astype(np.float32) / 255.0
        out[i] = to_uint8(fn(x, int(severity), rng))
    return out


def corruption_stream(
    n_images: int,
    *,
    split: str = "test",
    segment: int = 500,
    severity: int | None = 5,
    seed: int = 0,
    size: int = 32,
    corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
) -> Iterator[tuple[np.ndarray, int, str, int]]:
    """A continual test stream of ``n_images`` corrupted digits, one at a time.

    Yields ``(image, label, corruption, severity)``: image (size, size, 3) uint8, label int in 0..9.
    Stream position k shows image ``k % N`` of ``split`` (cycling through it in its fixed order), corrupted
    by ``corrupt(..., seed=seed, start=k)``, so a repeated image gets fresh noise. The corruption changes
    every ``segment`` images, in one seeded permutation of ``corruptions`` that repeats; ``severity=None``
    draws a severity in 1..5 per segment. The same arguments give the same stream. Arguments are checked
    at the call; images are corrupted one segment at a time as the stream is consumed.
    """
    check_non_negative_int("n_images", n_images)
    if not is_int(segment) or int(segment) < 1:
        raise ConfigError(f"segment must be a positive int (images per corruption); got {segment!r}.")
    if severity is not None:
        _check_severity(severity)
    check_non_negative_int("seed", seed)
    if isinstance(corruptions, str):
        raise ConfigError(
            f"corruptions must be a sequence of names, e.g. ({corruptions!r},); got the string {corruptions!r}."
        )
    names = list(corruptions)
    if not names:
        raise ConfigError("corruptions must name at least one corruption; see tta_runtime.data.digits.CORRUPTIONS.")
    for name in names:
        corruption_function(name)
    images, labels = load_digits(split, size)  # also validates split and size, before the first image
    return _stream(images, labels, int(n_images), int(segment), severity, int(seed), names)


def _stream(
    images: np.ndarray,
    labels: np.ndarray,
    n_images: int,
    segment: int,
    severity: int | None,
    seed: int,
    names: list[str],
) -> Iterator[tuple[np.ndarray, int, str, int]]:
    order = np.random.default_rng([seed, _STREAM_TAG]).permutation(len(names))
    for seg_start in range(0, n_images, segment):
        k = seg_start // segment
        name = names[int(order[k % len(names)])]
        if severity is None:
            sev = int(np.random.default_rng([seed, _STREAM_TAG, k]).integers(1, 6))
        else:
            sev = int(severity)
        positions = np.arange(seg_start, min(seg_start + segment, n_images))
        idx = positions % len(images)
        batch = corrupt(images[idx], name, sev, seed=seed, start=seg_start)  # (n, S, S, 3), one segment at a time
        for image, i in zip(batch, idx):
            yield image, int(labels[i]), name, sev


# --------------------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=4)
def _all_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits, (N, size, size, 3) uint8 and (N,) int64, read-only (shared by the cache)."""
    datasets = optional_import(
        "sklearn.datasets", "pip install 'tta-runtime[dev]' (or scikit-learn)", "The digits benchmark"
    )
    bunch = datasets.load_digits()
    small = np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0)  # (N, 8, 8), 0..16 -> 0..255
    if small.shape != (N_IMAGES, 8, 8):
        raise ConfigError(f"sklearn's digits changed shape: expected ({N_IMAGES}, 8, 8), got {small.shape}")
    cv2 = import_cv2()
    # INTER_LINEAR on pixel centres is align_corners=False bilinear, as torch's interpolate
    big = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in small])
    grey = np.clip(np.rint(big), 0, 255).astype(np.uint8)  # (N, size, size)
    images = np.repeat(grey[..., None], 3, axis=-1)  # (N, size, size, 3)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _split_indices(split: str) -> np.ndarray:
    perm = np.random.default_rng(SPLIT_SEED).permutation(N_IMAGES)
    n_train = round(_FRACTIONS["train"] * N_IMAGES)
    n_val = round(_FRACTIONS["val"] * N_IMAGES)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, N_IMAGES)}
    lo, hi = bounds[split]
    return perm[lo:hi]


# --------------------------------------------------------------------------------------------------
# Validation


def _check_size(size: object) -> None:
    if not is_int(size) or not MIN_SIZE <= int(size) <= MAX_SIZE:  # type: ignore[arg-type]
        raise ConfigError(
            f"Digits size must be an int in [{MIN_SIZE}, {MAX_SIZE}] (image side in pixels; the scans are 8x8 "
            f"and are upsampled); got {size!r}. The shipped classifiers take 32."
        )


def _check_severity(severity: object) -> None:
    if not is_int(severity) or int(severity) not in SEVERITIES:  # type: ignore[arg-type]
        raise ConfigError(f"severity must be an int in 1..5 (1 = mildest); got {severity!r}.")


def _check_images(images: object) -> None:
    if not isinstance(images, np.ndarray):
        raise InvalidInputError(
            f"images must be a numpy array (N, S, S, 3) uint8; got {type(images).__name__}."
        )
    if images.dtype != np.uint8:
        raise InvalidInputError(
            f"images must be uint8 RGB in 0..255, shape (N, S, S, 3); got dtype {images.dtype}. "
            "Convert floats in [0, 1] with (x * 255).round().astype(np.uint8)."
        )
    shape = images.shape
    if images.ndim != 4 or shape[3] != 3 or shape[1] != shape[2] or not MIN_SIZE <= shape[1] <= MAX_SIZE:
        hint = " For one image pass images[None]." if images.ndim == 3 else ""
        raise InvalidInputError(
            f"images must have shape (N, S, S, 3) with square sides S in [{MIN_SIZE}, {MAX_SIZE}]; "
            f"got {shape}.{hint}"
        )
