"""Textures for the scene family: procedural fills drawn from the scene's generator, and crops of the
photos bundled with scikit-image (nothing is downloaded).

`texture_gray` fills an object (a grey factor the object's colour is multiplied by); `background_texture`
replaces a plain background. `load_photo` is the one loader of the bundled photos, also used by the digits
corruptions (frost). scikit-image and OpenCV are imported when a photo is first needed.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from tta_runtime.data.drawing import pixel_grid
from tta_runtime.device import import_cv2, optional_import
from tta_runtime.errors import ConfigError

# Bundled with scikit-image (no download). The list is fixed, not probed, so scenes do not depend on
# what a machine happens to have; a missing one raises.
GRAY_PHOTOS = ("brick", "grass", "gravel", "camera", "moon")
COLOUR_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A photo bundled with scikit-image as float32 in its stored 0..255 range, read-only (shared by the cache).

    (h, w) for a grey photo, (h, w, 3) for a colour one (an alpha channel is dropped).
    """
    data = optional_import("skimage.data", "pip install scikit-image", "The bundled photos (texture scenes, frost)")
    loader = getattr(data, name, None)
    if loader is None:
        raise ConfigError(
            f"scikit-image has no bundled image {name!r}; the texture scenes and the frost corruption need "
            f"{GRAY_PHOTOS + COLOUR_PHOTOS} (scikit-image >= 0.19 bundles them all)."
        )
    photo = np.asarray(loader(), dtype=np.float32)
    if photo.ndim == 3:
        photo = np.ascontiguousarray(photo[..., :3])
    photo.flags.writeable = False
    return photo


@functools.cache
def _rgb_photo(name: str) -> np.ndarray:
    """``load_photo(name)`` as (h, w, 3) float32 in [0, 1] (grey replicated), read-only."""
    photo = load_photo(name) / 255.0
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    photo.flags.writeable = False
    return photo


def texture_gray(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey fill factor (H, W) float32 in [0.35, 1]: dark enough for contrast, never black."""
    kind = int(rng.integers(4))
    if kind == 0:
        t = _value_noise(rng, size, cells=max(4, size // 6))
    elif kind == 1:
        t = _stripes(rng, size, period=rng.uniform(0.08, 0.16) * size)
    elif kind == 2:
        t = _checker(rng, size, period=rng.uniform(0.06, 0.12) * size)
    else:
        name = GRAY_PHOTOS[int(rng.integers(3))]  # brick, grass, gravel: the texture-like ones
        t = _photo_crop(rng, name, size, side_fraction=(0.1, 0.25)).mean(axis=-1)
    return (0.35 + 0.65 * _normalise(t)).astype(np.float32)


def background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A darkened, desaturated texture (H, W, 3) float32 in [0.05, 0.55]."""
    if rng.random() < 0.5:
        names = GRAY_PHOTOS + COLOUR_PHOTOS
        rgb = _photo_crop(rng, names[int(rng.integers(len(names)))], size, side_fraction=(0.15, 0.6))
        rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-6)  # use the full range
    else:
        kind = int(rng.integers(3))
        if kind == 0:
            t = _value_noise(rng, size, cells=int(rng.integers(3, 9)))
        elif kind == 1:
            t = _stripes(rng, size, period=rng.uniform(0.1, 0.3) * size)
        else:
            t = _checker(rng, size, period=rng.uniform(0.08, 0.2) * size)
        c0, c1 = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
        rgb = c0 + (c1 - c0) * _normalise(t)[..., None]
    # halfway to grey and into [0.05, 0.55]: textured, yet the bright saturated objects stay visible
    rgb = 0.5 * rgb + 0.5 * rgb.mean(axis=-1, keepdims=True)
    return (0.05 + 0.5 * rgb).astype(np.float32)


def photo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A crop of a bundled photo (any of them) at its own colours and full range, (H, W, 3) float32 in [0, 1]."""
    names = GRAY_PHOTOS + COLOUR_PHOTOS
    return _photo_crop(rng, names[int(rng.integers(len(names)))], size, side_fraction=(0.15, 0.6))


def _normalise(t: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1]; a flat input becomes 0.5."""
    lo, hi = float(t.min()), float(t.max())
    if hi - lo < 1e-6:
        return np.full_like(t, 0.5, dtype=np.float32)
    return ((t - lo) / (hi - lo)).astype(np.float32)


def _value_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Multi-octave value noise (H, W) float32; ``cells`` lattice cells across at the coarsest octave."""
    out = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        n = cells * 2**octave
        lattice = rng.random((n + 1, n + 1), dtype=np.float32)
        pos = (np.arange(size, dtype=np.float32) + 0.5) * (n / size)  # pixel centres in lattice units
        i = np.minimum(pos.astype(np.int64), n - 1)
        f = pos - i
        f = f * f * (3 - 2 * f)  # smoothstep, so lattice lines do not show
        top = lattice[i][:, i] * (1 - f)[None, :] + lattice[i][:, i + 1] * f[None, :]
        bottom = lattice[i + 1][:, i] * (1 - f)[None, :] + lattice[i + 1][:, i + 1] * f[None, :]
        out += 0.5**octave * (top * (1 - f)[:, None] + bottom * f[:, None])
    return out


def _rotated_coords(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = pixel_grid(size)
    theta = rng.uniform(0, math.pi)
    return x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)


def _stripes(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    """Soft stripes (H, W) in [0, 1] at a random angle and phase; ``period`` in px."""
    u, _ = _rotated_coords(rng, size)
    return 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))


def _checker(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    """A rotated checkerboard (H, W) in {0, 1}; ``period`` is the square side in px."""
    u, v = _rotated_coords(rng, size)
    offset = rng.uniform(0, period, size=2)
    return ((np.floor((u + offset[0]) / period) + np.floor((v + offset[1]) / period)) % 2).astype(np.float32)


def _photo_crop(
    rng: np.random.Generator, name: str, size: int, side_fraction: tuple[float, float]
) -> np.ndarray:
    """A random square crop of a bundled photo, turned by k * 90 degrees, as (H, W, 3) float32 in [0, 1]."""
    cv2 = import_cv2()
    photo = _rgb_photo(name)
    h, w = photo.shape[:2]
    side = max(size, int(rng.uniform(*side_fraction) * min(h, w)))
    side = min(side, h, w)
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = np.rot90(photo[top : top + side, left : left + side], k=int(rng.integers(4)))
    # INTER_AREA averages the source pixels each output pixel covers, so downscaling does not alias
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
