"""The corruption suite of the digits benchmark: 17 image corruptions at five severities.

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

Every corruption takes ``x`` (S, S, 3) float32 in [0, 1], the severity (1..5) and the image's generator,
and returns (S, S, 3) float (clipped and rounded to uint8 by `tta_runtime.data.digits.corrupt`, which
also seeds the generator). OpenCV and scikit-image (core dependencies) are imported when first used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from tta_runtime.data.common import check_known, to_uint8
from tta_runtime.data.textures import load_photo
from tta_runtime.device import import_cv2

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "VALIDATION_CORRUPTIONS",
    "CorruptionFn",
    "corruption_function",
]

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

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def corruption_function(name: object) -> CorruptionFn:
    """The function of corruption ``name``, or ``UnknownNameError`` naming the known ones and the closest."""
    check_known(name, CORRUPTION_NAMES, "corruption", "corruptions")
    return _FUNCTIONS[name]  # type: ignore[index]


# --------------------------------------------------------------------------------------------------
# Helpers


def _px(x: np.ndarray, value: float) -> float:
    """A length given in pixels at 32x32, for this image's side (never shorter: a pixel is the floor)."""
    return value * max(x.shape[0], 32) / 32.0


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (edges replicated, truncated at 4 sigma), like skimage.filters.gaussian(mode='nearest')."""
    cv2 = import_cv2()
    k = 2 * math.ceil(4 * sigma) + 1
    return cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom in about the image centre by ``factor`` >= 1, keeping the size (bilinear)."""
    cv2 = import_cv2()
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
    cv2 = import_cv2()
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
    cv2 = import_cv2()
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
    cv2 = import_cv2()
    photo = _frost_photo(_FROST_PHOTOS[int(rng.integers(len(_FROST_PHOTOS)))])
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
    cv2 = import_cv2()
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
    cv2 = import_cv2()
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
    cv2 = import_cv2()
    s = x.shape[0]
    small = cv2.resize(x, (int(s * c), int(s * c)), interpolation=cv2.INTER_AREA)  # box filter, like PIL BOX
    return cv2.resize(small, (s, s), interpolation=cv2.INTER_NEAREST)


def _jpeg_compression(x: np.ndarray, sev: int, rng: np.random.Generator) -> np.ndarray:
    quality = (80, 65, 58, 50, 40)[sev - 1]
    cv2 = import_cv2()
    bgr = cv2.cvtColor(to_uint8(x), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")  # not reachable with a valid uint8 image
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


_FUNCTIONS: dict[str, CorruptionFn] = {
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
    raise ImportError("tta_runtime.data.corruptions: _FUNCTIONS and CORRUPTIONS disagree")


@functools.cache
def _frost_photo(name: str) -> np.ndarray:
    """A bundled photo as (h, w) float32 grey, stretched to [0, 1], read-only."""
    photo = load_photo(name)
    if photo.ndim == 3:
        photo = photo[..., :3].mean(axis=-1)
    photo = (photo - photo.min()) / max(float(photo.max() - photo.min()), 1e-6)
    photo.flags.writeable = False
    return photo
