"""Real-image classification benchmark: scikit-learn's handwritten digits and a CIFAR-10-C-style corruption suite.

The images are the 1,797 real 8x8 scans bundled with scikit-learn (``sklearn.datasets.load_digits``, grey
levels 0..16, ten classes), so nothing is downloaded. ``load_digits`` splits them by a fixed permutation
into train (60 %), val (10 %) and test (30 %), upsamples each to ``size`` x ``size`` (bilinear) and returns
uint8 RGB (grey replicated). The classifiers in ``models/digits-cnn-*`` train on "train", select on "val",
and are reported on "test"; the corruptions below are the distribution shift and are never trained on.

The corruptions follow ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019): the 15 benchmark
corruptions plus two of the four extra ones they released for validation (``VALIDATION_CORRUPTIONS``;
tune on those, report on ``BENCHMARK_CORRUPTIONS``). Parameters are the CIFAR-10-C tables (those were made
for 32x32 images), with spatial ones (blur radii, displacements, crop sides) scaled by ``size / 32`` for
larger images and kept as they are for smaller ones (below a pixel a blur does nothing).
Images are processed as float in [0, 1], clipped and rounded back to uint8.

=================  ========  ======================================================================
corruption         family    what severity 1 -> 5 controls (at size 32)
=================  ========  ======================================================================
gaussian_noise     noise     additive N(0, s^2) per pixel and channel, s = 0.04 .. 0.10
shot_noise         noise     Poisson photon noise, Poisson(x * lam) / lam, lam = 500 .. 50
impulse_noise      noise     salt-and-pepper on a fraction 0.01 .. 0.07 of the values
speckle_noise      noise     multiplicative x + x * N(0, s^2), s = 0.06 .. 0.20 (validation)
gaussian_blur      blur      Gaussian blur, sigma = 0.4 .. 1.0 px (validation)
defocus_blur       blur      disk kernel radius 0.3 .. 1.5 px, anti-aliased by a small Gaussian
glass_blur         blur      blur sigma 0.05 .. 0.4, 1 .. 2 passes of swapping each pixel with a neighbour
                             up to 1 px away, blur again
motion_blur        blur      one-sided Gaussian streak (ImageMagick style), sigma 1 .. 3 px, random angle
zoom_blur          blur      mean of the image zoomed about its centre by 1 .. 1.05 (sev. 1) .. 1.25 (sev. 5)
snow               weather   thresholded, zoomed, motion-blurred Gaussian snow layer (and its 180-degree
                             turn) added; the image is brightened towards grey by 5 .. 20 %
frost              weather   a x image + b x ice texture, (a, b) = (1, 0.2) .. (0.75, 0.45); the texture
                             is a random crop of skimage's bundled "gravel" / "grass" photos
fog                weather   plasma-fractal haze of strength 0.2 .. 1.5 (rougher at low severity, as in
                             CIFAR-10-C), then rescaled to the image's maximum
brightness         weather   HSV value + 0.05 .. 0.30
contrast           digital   (x - mean) x c + mean per channel, c = 0.75 .. 0.15
elastic_transform  digital   random affine (corners moved up to 0.6 .. 1.3 px) then a smooth random
                             displacement field of RMS 0.4 .. 1.2 px (smoothing sigma 2 px)
pixelate           digital   box-downsample to 1/2 .. 1/5 of the side (16 .. 6 px), nearest-upsample back
jpeg_compression   digital   JPEG round trip at quality 80 .. 40
=================  ========  ======================================================================

Changes from CIFAR-10-C:

- ``elastic_transform`` is re-parameterised so that severity means strength: CIFAR-10-C's affine part
  SHRINKS with severity while its elastic part grows; here both grow.
- ``pixelate`` keeps 1/2 .. 1/5 of the side instead of 0.95 .. 0.65: the digits hold only 8x8 pixels of
  information, which CIFAR-10-C's factors leave nearly intact, and at 30 or 28 px the nearest-neighbour
  upsampling misregisters more than it pixelates (severity 1 moved pixels as much as severity 5).
- ``glass_blur`` swaps with offsets in [-d, d] (the original's ``randint(-d, d)`` never draws +d).
- ``motion_blur`` (and the snow streaks) is ImageMagick's one-sided Gaussian streak, drawn with whole-pixel
  shifts in numpy instead of calling ImageMagick.
- ``frost`` uses skimage's bundled photos instead of the frost pictures (nothing is downloaded).
- ``saturate`` and ``spatter`` (the other two extras) are left out: saturation does nothing to grey digits,
  and spatter needs ImageMagick-style liquid rendering.

Not every corruption hurts a digits classifier: blurs barely touch images that were upsampled from 8x8.
That is part of the benchmark, as brightness is on CIFAR-10-C.

Determinism: image i of a call draws only from
``np.random.default_rng([seed, CORRUPTION_NAMES.index(name), severity, start + i])``, so an image is
corrupted the same alone or in a batch, and the order of ``CORRUPTIONS`` is part of that contract (add
new corruptions at the end). ``corruption_stream`` builds a continual test stream (the corruption changes
every ``segment`` images) from the same per-image streams.

Needs scikit-learn (the ``dev`` extra) for the images; OpenCV and scikit-image (core dependencies) are
imported when first used.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import numpy as np

from tta_runtime.errors import ConfigError, InvalidInputError, UnknownNameError

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

# name -> family. The ORDER is part of the determinism contract (the index seeds each image): append only.
CORRUPTIONS: dict[str, str] = {
    "gaussian_noise": "noise",
    "shot_noise": "noise",
    "impulse_noise": "noise",
    "defocus_blur": "blur",
    "glass_blur": "blur",
    "motion_blur": "blur",
    "zoom_blur": "blur",
    "snow": "weather",
    "frost": "weather",
    "fog": "weather",
    "brightness": "weather",
    "contrast": "digital",
    "elastic_transform": "digital",
    "pixelate": "digital",
    "jpeg_compression": "digital",
    "speckle_noise": "noise",
    "gaussian_blur": "blur",
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)
# Hendrycks & Dietterich's extra corruptions are meant for tuning; the 15 others are the reported benchmark.
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur")
BENCHMARK_CORRUPTIONS: tuple[str, ...] = tuple(n for n in CORRUPTION_NAMES if n not in VALIDATION_CORRUPTIONS)

_STREAM_TAG = 1_000  # keeps the stream's own draws (order, severities) apart from the per-image streams


# --------------------------------------------------------------------------------------------------
# Public API


def load_digits(split: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` ("train", "val" or "test") of sklearn's digits at ``size`` x ``size``.

    Returns ``images`` (N, size, size, 3) uint8 RGB (grey replicated, background 0, strokes up to 255) and
    ``labels`` (N,) int64 in 0..9; N is 1078, 180 and 539. The splits are disjoint and always the same.
    Raises ``UnknownNameError`` for an unknown split and ``ConfigError`` for a bad size.
    """
    _check_split(split)
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
    fn = _corruption_fn(name)
    _check_severity(severity)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("start", start)
    _check_images(images)
    index = CORRUPTION_NAMES.index(name)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng([int(seed), index, int(severity), int(start) + i])
        x = image.astype(np.float32) / 255.0
        out[i] = _to_uint8(fn(x, int(severity), rng))
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
    _check_non_negative_int("n_images", n_images)
    if not _is_int(segment) or int(segment) < 1:
        raise ConfigError(f"segment must be a positive int (images per corruption); got {segment!r}.")
    if severity is not None:
        _check_severity(severity)
    _check_non_negative_int("seed", seed)
    if isinstance(corruptions, str):
        raise ConfigError(
            f"corruptions must be a sequence of names, e.g. ({corruptions!r},); got the string {corruptions!r}."
        )
    names = list(corruptions)
    if not names:
        raise ConfigError("corruptions must name at least one corruption; see tta_runtime.digits.CORRUPTIONS.")
    for name in names:
        _corruption_fn(name)
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
    datasets = _import_optional(
        "sklearn.datasets", "scikit-learn", "pip install 'tta-runtime[dev]' (or scikit-learn)"
    )
    bunch = datasets.load_digits()
    small = np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0)  # (N, 8, 8), 0..16 -> 0..255
    if small.shape != (N_IMAGES, 8, 8):
        raise ConfigError(f"sklearn's digits changed shape: expected ({N_IMAGES}, 8, 8), got {small.shape}")
    cv2 = _cv2()
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


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_split(split: object) -> None:
    if not isinstance(split, str) or split not in SPLITS:
        close = difflib.get_close_matches(str(split), SPLITS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown digits split {split!r}.{hint} Known splits: {', '.join(SPLITS)}.")


def _check_size(size: object) -> None:
    if not _is_int(size) or not MIN_SIZE <= int(size) <= MAX_SIZE:  # type: ignore[arg-type]
        raise ConfigError(
            f"Digits size must be an int in [{MIN_SIZE}, {MAX_SIZE}] (image side in pixels; the scans are 8x8 "
            f"and are upsampled); got {size!r}. The shipped classifiers take 32."
        )


def _check_severity(severity: object) -> None:
    if not _is_int(severity) or int(severity) not in SEVERITIES:  # type: ignore[arg-type]
        raise ConfigError(f"severity must be an int in 1..5 (1 = mildest); got {severity!r}.")


def _check_non_negative_int(name: str, value: object) -> None:
    if not _is_int(value) or int(value) < 0:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a non-negative int; got {value!r}.")


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


def _corruption_fn(name: object) -> Callable[[np.ndarray, int, np.random.Generator], np.ndarray]:
    if not isinstance(name, str) or name not in _FUNCTIONS:
        close = difflib.get_close_matches(str(name), CORRUPTION_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(
            f"Unknown corruption {name!r}.{hint} Known corruptions: {', '.join(CORRUPTION_NAMES)}."
        )
    return _FUNCTIONS[name]


# --------------------------------------------------------------------------------------------------
# Helpers. Every corruption takes x (S, S, 3) float32 in [0, 1], the severity and the image's generator,
# and returns (S, S, 3) float (clipped and rounded by the caller).


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _px(x: np.ndarray, value: float) -> float:
    """A length given in pixels at 32x32, for this image's side (never shorter: a pixel is the floor)."""
    return value * max(x.shape[0], 32) / 32.0


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (edges replicated, truncated at 4 sigma), like skimage.filters.gaussian(mode='nearest')."""
    cv2 = _cv2()
    k = 2 * math.ceil(4 * sigma) + 1
    return cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom in about the image centre by ``factor`` >= 1, keeping the size (bilinear)."""
    cv2 = _cv2()
    c = (x.shape[0] - 1) / 2.0
    m = np.array([[factor, 0, (1 - factor) * c], [0, factor, (1 - factor) * c]], dtype=np.float64)
    return cv2.warpAffine(x, m, (x.shape[1], x.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's -motion-blur: a one-sided Gaussian streak towards ``angle`` (degrees), edges replicated."""
    width = 2 * int(round(radius)) + 1
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    h, w = x.shape[:2]
    pad = width
    padded = np.pad(x, [(pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    out = np.zeros_like(x, dtype=np.float32)
    for i, weight in enumerate(kernel):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break
        # out[r, c] += weight * x[r - dy, c - dx]: the image moved by (dy, dx) whole pixels
        out += np.float32(weight) * padded[pad - dy : pad - dy + h, pad - dx : pad - dx + w]
    return out


def _plasma_fractal(rng: np.random.Generator, mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square plasma (mapsize, mapsize) in [0, 1], as in CIFAR-10-C's fog (its quirks kept)."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize, wibble = mapsize, 100.0

    def wibbled_mean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: the centre of each square gets the mean of its corners, plus noise
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbled_mean(square)
        # diamonds: edge midpoints get the mean of their two corners and two centres, plus noise
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        top = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbled_mean(top)
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbled_mean(left)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


# --------------------------------------------------------------------------------------------------
# The corruptions (parameters per severity 1..5; CIFAR-10-C's values unless the module docstring says so)


def _gaussian_noise(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    s = (0.04, 0.06, 0.08, 0.09, 0.10)[sev - 1]
    return x + rng.normal(0.0, s, x.shape)


def _shot_noise(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    lam = (500, 250, 100, 75, 50)[sev - 1]
    return rng.poisson(x * lam) / lam


def _impulse_noise(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[sev - 1]
    hit, salt = rng.random(x.shape) < amount, rng.random(x.shape) < 0.5  # per value, like skimage's s&p
    return np.where(hit, salt.astype(np.float32), x)


def _speckle_noise(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    s = (0.06, 0.10, 0.12, 0.16, 0.20)[sev - 1]
    return x + x * rng.normal(0.0, s, x.shape)


def _gaussian_blur(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[sev - 1]
    return _gaussian(x, _px(x, sigma))


def _defocus_blur(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[sev - 1]
    radius = _px(x, radius)
    cv2 = _cv2()
    half = max(8, math.ceil(radius))
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    ksize = (3, 3) if radius <= 8 else (5, 5)
    kernel = cv2.GaussianBlur(disk, ksize, sigmaX=alias_blur)
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _glass_blur(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    sigma, delta, passes = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[sev - 1]
    sigma, delta = _px(x, sigma), max(1, round(_px(x, delta)))
    s = x.shape[0]
    # CIFAR-10-C rounds to uint8 between the blurs; keep that so the swaps move quantised pixels
    y = np.rint(np.clip(_gaussian(x, sigma), 0, 1) * 255).astype(np.float32) / 255.0
    # The swaps are sequential (a pixel can move several times), so they are played on a list of pixel
    # indices (fast in pure Python) and applied to the image once: where[k] = source pixel now at k.
    rows = range(s - delta - 1, delta - 1, -1)  # bottom-right to top-left, as the original
    offsets = rng.integers(-delta, delta + 1, size=(passes, len(rows), len(rows), 2)).tolist()
    where = list(range(s * s))
    for p in range(passes):
        for a, h in enumerate(rows):
            for b, w in enumerate(rows):
                dy, dx = offsets[p][a][b]
                i, j = h * s + w, (h + dy) * s + (w + dx)
                where[i], where[j] = where[j], where[i]
    y = y.reshape(s * s, -1)[where].reshape(x.shape)
    return _gaussian(y, sigma)


def _motion_blur_corruption(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0))[sev - 1]
    return _motion_blur(x, _px(x, radius), _px(x, sigma), angle=rng.uniform(-45, 45))


def _zoom_blur(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    n = (6, 11, 16, 21, 26)[sev - 1]  # zoom factors 1, 1.01, ..., 1 + 0.01 (n - 1)
    out = x.copy()
    for k in range(n):
        out += _zoom(x, 1.0 + 0.01 * k)
    return out / (n + 1)


def _snow(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1.0, 0.5, 10, 4, 0.90),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.90),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.80),
    )[sev - 1]
    cv2 = _cv2()
    layer = rng.normal(loc, scale, x.shape[:2]).astype(np.float32)
    layer = _zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.clip(layer, 0, 1)
    layer = _motion_blur(layer, _px(x, radius), _px(x, sigma), angle=rng.uniform(-135, -45))
    layer = np.rint(layer * 255) / 255.0  # the original round-trips the layer through an 8-bit image
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return x + layer[..., None] + np.rot90(layer, k=2)[..., None]


_FROST_PHOTOS = ("gravel", "grass")


def _frost(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    a, b = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[sev - 1]
    cv2 = _cv2()
    photo = _load_photo(_FROST_PHOTOS[int(rng.integers(len(_FROST_PHOTOS)))])
    s = x.shape[0]
    # CIFAR-10-C shrinks its frost pictures to a fifth and crops 32 px: a 32 px crop covers 160 source px
    side = min(photo.shape[0], photo.shape[1], max(s, round(5 * s)))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = np.rot90(photo[top : top + side, left : left + side], k=int(rng.integers(4)))
    ice = cv2.resize(np.ascontiguousarray(crop), (s, s), interpolation=cv2.INTER_AREA)
    return a * x + b * ice[..., None]


def _fog(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[sev - 1]
    s = x.shape[0]
    mapsize = 1 << max(1, (s - 1).bit_length())  # smallest power of two >= s
    max_val = float(x.max())
    haze = _plasma_fractal(rng, mapsize, decay)[:s, :s, None].astype(np.float32)
    return (x + strength * haze) * max_val / (max_val + strength)


def _brightness(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[sev - 1]
    cv2 = _cv2()
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _contrast(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[sev - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _elastic_transform(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    affine, rms = ((0.6, 0.4), (0.75, 0.6), (0.9, 0.8), (1.1, 1.0), (1.3, 1.2))[sev - 1]
    affine, rms, smooth = _px(x, affine), _px(x, rms), _px(x, 2.0)
    cv2 = _cv2()
    s = x.shape[0]
    # random affine: three points around the centre each move by up to `affine` px
    c, d = s // 2, s // 3
    src = np.float32([[c + d, c + d], [c + d, c - d], [c - d, c - d]])
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(src, dst), (s, s), borderMode=cv2.BORDER_REFLECT_101)
    # elastic: smoothed uniform noise, rescaled so the displacement has RMS `rms` px in each axis
    fields = []
    for _ in range(2):
        f = _gaussian(rng.uniform(-1, 1, (s, s)).astype(np.float32), smooth)
        fields.append(f * (rms / max(float(np.sqrt(np.mean(f**2))), 1e-8)))
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij")
    return cv2.remap(
        x, xx + fields[1], yy + fields[0], interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def _pixelate(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.5, 0.4, 0.33, 0.25, 0.2)[sev - 1]  # CIFAR-10-C: 0.95 .. 0.65 (see the module docstring)
    cv2 = _cv2()
    s = x.shape[0]
    small = cv2.resize(x, (int(s * c), int(s * c)), interpolation=cv2.INTER_AREA)  # box filter, like PIL BOX
    return cv2.resize(small, (s, s), interpolation=cv2.INTER_NEAREST)


def _jpeg_compression(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    quality = (80, 65, 58, 50, 40)[sev - 1]
    cv2 = _cv2()
    bgr = cv2.cvtColor(_to_uint8(x), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")  # not reachable with a valid uint8 image
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
}
if tuple(_FUNCTIONS) != CORRUPTION_NAMES:  # the table and the implementations must list the same names
    raise ImportError("tta_runtime.digits: _FUNCTIONS and CORRUPTIONS disagree")


# --------------------------------------------------------------------------------------------------
# Optional imports and bundled photos


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
    """A bundled skimage photo as (h, w) float32 in [0, 1], stretched to the full range, read-only."""
    data = _import_optional("skimage.data", "scikit-image", "pip install scikit-image")
    photo = np.asarray(getattr(data, name)(), dtype=np.float32)
    if photo.ndim == 3:
        photo = photo[..., :3].mean(axis=-1)
    photo = (photo - photo.min()) / max(float(photo.max() - photo.min()), 1e-6)
    photo.flags.writeable = False
    return photo


def _cv2() -> ModuleType:
    return _import_optional("cv2", "opencv-python-headless", "pip install opencv-python-headless")


def _import_optional(module: str, package: str, how: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"tta_runtime.digits needs {package!r}: {how}.") from error
