"""Procedural multi-object scenes with exact instance masks, for training and shift-testing a segmenter.

A scene is a small RGB image of a few flat-coloured shapes on a plain background, and its instance map.
"in_dist" is the training family; each other split changes ONE factor of it:

=====================  =====================================================================
split                  what changes relative to ``in_dist``
=====================  =====================================================================
in_dist                nothing: 2-4 circles / squares / triangles, training colours, flat dim background
textured_objects       objects are filled with a grey texture tinted by their (training) colour
textured_background    background is a texture: half skimage photos/textures, half procedural
unseen_colours         object colours from the held-out hue band or pastels; never an in_dist colour
noise_blur             the in_dist scene with the same (seed, index), blurred and/or with Gaussian noise
more_objects           5-7 objects, same 40 % visible-area rule (drops stay rare, see below)
unseen_shapes          star, ring, plus-shaped cross, thin ellipse instead of circle/square/triangle
=====================  =====================================================================

Colour rule (HSV, hue in degrees). ``in_dist`` objects take hue outside the held-out band
[240, 300) by a 5-degree guard, i.e. in [305, 360) or [0, 235], with saturation in [0.75, 1] and value
in [0.8, 1]. ``unseen_colours`` objects take, with equal odds, a hue in [245, 295] with the same
saturation and value, or a pastel: any hue, saturation in [0.2, 0.4], value in [0.85, 1]. The two sets
are disjoint with a margin that survives uint8 rounding. Backgrounds have saturation <= 0.25 and value
in [0.15, 0.45], so objects (value >= 0.8) stand out.

Occlusion: objects are drawn in order, later over earlier. A placement is rejected when it would leave
an earlier object with less than 40 % of its own in-image area visible; after 30 tries the object
is dropped, so a scene can hold fewer objects than it drew. At 32x32 that is rare: no drop in 6,000
in_dist objects and 1 in 12,000 more_objects objects (measured), so the 40 % rule was kept for
more_objects too and only the count changes. Every object in the output is therefore visible, with
ids consecutive 1..n in drawing order. Rendering is hard-edged on the pixel-centre grid, so the
instance map is exact.

Determinism: each scene draws only from ``np.random.default_rng([seed, SPLITS.index(split), index])``,
so scene ``index`` is the same alone or in a batch. ``noise_blur`` takes its layout from the
``in_dist`` stream and only its corruption from its own stream, so its instance maps EQUAL the in_dist
ones for the same seed: evaluate shifts on a seed you did not train on. The in_dist path needs numpy
only; texture splits import scikit-image (bundled photos, no download) and OpenCV lazily.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

from tta_runtime.errors import ConfigError, UnknownNameError

__all__ = ["OOD_SPLITS", "SPLITS", "Scene", "generate_scene", "generate_scenes", "max_objects"]

SPLITS: tuple[str, ...] = (
    "in_dist",
    "textured_objects",
    "textured_background",
    "unseen_colours",
    "noise_blur",
    "more_objects",
    "unseen_shapes",
)
OOD_SPLITS: tuple[str, ...] = tuple(s for s in SPLITS if s != "in_dist")

# Seeds of the three scene sets: training, validation (recipes, calibration, model selection) and the
# reported test scenes. Nothing is ever tuned on TEST_SEED.
TRAIN_SEED = 0
VAL_SEED = 1_000
TEST_SEED = 2_026

MIN_SIZE, MAX_SIZE = 16, 512

# Hues (degrees) that in_dist never produces; unseen_colours draws from inside it. The guard keeps
# the two hue sets apart after colours are rounded to uint8.
HELD_OUT_HUE_BAND: tuple[float, float] = (240.0, 300.0)
_HUE_GUARD = 5.0
_TRAIN_SAT, _TRAIN_VAL = (0.75, 1.0), (0.8, 1.0)
_PASTEL_SAT, _PASTEL_VAL = (0.2, 0.4), (0.85, 1.0)
_BACKGROUND_SAT, _BACKGROUND_VAL = (0.0, 0.25), (0.15, 0.45)

_RADIUS_FRACTION = (0.12, 0.22)  # nominal object radius / image side
_PLACEMENT_TRIES = 30  # per object, before it is dropped
_MIN_COLOUR_DISTANCE = 0.35  # Euclidean, RGB in [0, 1]; below this two objects look alike
_COLOUR_TRIES = 50


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields cannot be compared or hashed as a tuple
class Scene:
    """One generated scene.

    ``image``: (H, W, 3) uint8 RGB. ``instances``: (H, W) int64, 0 = background, 1..n = the visible
    objects in drawing order. ``split`` and ``seed`` are the arguments it was generated from.
    """

    image: np.ndarray
    instances: np.ndarray
    split: str
    seed: int


@dataclass(frozen=True)
class _Recipe:
    """What a split draws; every split is in_dist with one field changed."""

    n_objects: tuple[int, int]  # inclusive range of objects drawn (before any are dropped)
    shapes: tuple[str, ...]
    palette: str  # "training" | "unseen"
    min_visible: float  # fraction of its own area an earlier object must keep visible
    object_fill: str = "flat"  # "flat" | "texture"
    background: str = "flat"  # "flat" | "texture"
    corrupt: bool = False  # blur and/or noise after rendering; layout taken from in_dist


_IN_DIST = _Recipe(
    n_objects=(2, 4), shapes=("circle", "square", "triangle"), palette="training", min_visible=0.4
)
_RECIPES: dict[str, _Recipe] = {
    "in_dist": _IN_DIST,
    "textured_objects": replace(_IN_DIST, object_fill="texture"),
    "textured_background": replace(_IN_DIST, background="texture"),
    "unseen_colours": replace(_IN_DIST, palette="unseen"),
    "noise_blur": replace(_IN_DIST, corrupt=True),
    # 40 % still places almost every object at 32x32 (see the module docstring), so it is not relaxed
    "more_objects": replace(_IN_DIST, n_objects=(5, 7)),
    # hexagons are left out: at 8-14 px they are indistinguishable from circles
    "unseen_shapes": replace(_IN_DIST, shapes=("star", "ring", "cross", "ellipse")),
}


# --------------------------------------------------------------------------------------------------
# Public API


def generate_scene(split: str, seed: int, index: int, size: int = 32) -> Scene:
    """Generate scene ``index`` of ``split`` for ``seed``, as a ``size`` x ``size`` image.

    Raises ``UnknownNameError`` for an unknown split and ``ConfigError`` for a bad seed, index or size.
    """
    recipe = _recipe(split)
    _check_size(size)
    _check_non_negative_int("seed", seed)
    _check_non_negative_int("index", index)

    layout_split = "in_dist" if recipe.corrupt else split  # noise_blur shares in_dist layouts
    image, instances = _render(recipe, _scene_rng(seed, layout_split, index), size)
    if recipe.corrupt:
        image = _corrupt(image, _scene_rng(seed, split, index), size)
    return Scene(image=_to_uint8(image), instances=instances, split=split, seed=int(seed))


def generate_scenes(
    split: str, n: int, seed: int, size: int = 32, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate scenes ``start .. start + n - 1`` of ``split``.

    Returns ``images`` (n, size, size, 3) uint8 RGB and ``instances`` (n, size, size) int64.
    Scene i is identical to ``generate_scene(split, seed, i, size)``.
    """
    _recipe(split)
    _check_size(size)
    _check_non_negative_int("n", n)
    _check_non_negative_int("start", start)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    instances = np.empty((n, size, size), dtype=np.int64)
    for i in range(n):
        scene = generate_scene(split, seed, start + i, size)
        images[i], instances[i] = scene.image, scene.instances
    return images, instances


def max_objects(split: str) -> int:
    """The largest number of objects a scene of ``split`` can hold (to choose a slot count)."""
    return _recipe(split).n_objects[1]


# --------------------------------------------------------------------------------------------------
# Validation


def _recipe(split: str) -> _Recipe:
    if not isinstance(split, str) or split not in _RECIPES:
        close = difflib.get_close_matches(str(split), SPLITS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown split {split!r}.{hint} Known splits: {', '.join(SPLITS)}.")
    return _RECIPES[split]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_size(size: object) -> None:
    if not _is_int(size) or not MIN_SIZE <= int(size) <= MAX_SIZE:  # type: ignore[arg-type]
        raise ConfigError(
            f"Scene size must be an int in [{MIN_SIZE}, {MAX_SIZE}] (image side in pixels); got {size!r}. "
            "The objects are sized relative to the side; 32 is the training default."
        )


def _check_non_negative_int(name: str, value: object) -> None:
    if not _is_int(value) or int(value) < 0:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a non-negative int; got {value!r}.")


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


# --------------------------------------------------------------------------------------------------
# Layout and rendering


def _render(recipe: _Recipe, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene. Returns ``image`` (H, W, 3) float32 in [0, 1] and ``instances`` (H, W) int64."""
    n_drawn = int(rng.integers(recipe.n_objects[0], recipe.n_objects[1] + 1))
    colours = _distinct_colours(rng, n_drawn, recipe.palette)
    if recipe.background == "texture":
        image = _background_texture(rng, size)
    else:
        image = np.empty((size, size, 3), dtype=np.float32)
        hue, sat, val = rng.uniform(0, 360), rng.uniform(*_BACKGROUND_SAT), rng.uniform(*_BACKGROUND_VAL)
        image[:] = _hsv_to_rgb(hue, sat, val)

    instances = np.zeros((size, size), dtype=np.int64)
    areas: list[int] = [0]  # areas[k] = in-image pixel count of object k as drawn; index 0 unused
    for colour in colours:
        mask = _place(recipe, rng, size, instances, areas)
        if mask is None:
            continue  # no placement kept every object visible enough: drop this one
        areas.append(int(mask.sum()))
        instances[mask] = len(areas) - 1  # ids stay consecutive because dropped objects take none
        if recipe.object_fill == "texture":
            tint = colour * _texture_gray(rng, size)[..., None]  # (H, W, 3)
            image[mask] = tint[mask]
        else:
            image[mask] = colour
    return image, instances


def _place(
    recipe: _Recipe, rng: np.random.Generator, size: int, instances: np.ndarray, areas: list[int]
) -> np.ndarray | None:
    """Find a mask (H, W) bool for a new object that leaves earlier objects visible enough, or None."""
    min_pixels = max(6, round(6 * (size / 32) ** 2))
    for _ in range(_PLACEMENT_TRIES):
        shape = recipe.shapes[int(rng.integers(len(recipe.shapes)))]
        radius = rng.uniform(*_RADIUS_FRACTION) * size
        # the nominal radius as margin keeps the body inside; corners and spikes may clip a little
        cy, cx = rng.uniform(radius, size - radius, size=2)
        mask = _shape_mask(shape, size, cy, cx, radius, rng)
        if mask.sum() < min_pixels:
            continue
        visible = np.bincount(instances.ravel(), minlength=len(areas))
        covered = np.bincount(instances[mask], minlength=len(areas))
        remaining = visible[1:] - covered[1:]
        if np.all(remaining >= recipe.min_visible * np.asarray(areas[1:])):
            return mask
    return None


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: ``y`` (H, 1) and ``x`` (1, W) float64, in pixels."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    return centres[:, None], centres[None, :]


def _shape_mask(
    shape: str, size: int, cy: float, cx: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    """A hard-edged mask (H, W) bool of ``shape`` centred at (cy, cx) with nominal radius ``r`` px.

    Sizes are chosen so that every shape covers 75-105 % of the area of a circle of radius ``r``
    (the triangle is the smallest), so shape and size do not shift together.
    """
    y, x = _pixel_grid(size)
    dy, dx = y - cy, x - cx  # (H, 1), (1, W): broadcast to (H, W) below
    if shape == "square" and rng.random() < 0.5:
        theta = 0.0  # half the squares are axis-aligned
    else:
        theta = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(theta), math.sin(theta)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # shape-frame coordinates, (H, W)

    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return _regular_polygon(u, v, sides=4, apothem=0.9 * r)
    if shape == "triangle":
        return _regular_polygon(u, v, sides=3, apothem=0.5 * 1.35 * r)  # circumradius 1.35 r
    if shape == "star":
        return _star(u, v, points=5, outer=1.45 * r, inner=0.7 * r)
    if shape == "ring":
        rho2 = u * u + v * v
        outer = 1.15 * r
        return (rho2 <= outer * outer) & (rho2 >= (0.55 * outer) ** 2)
    if shape == "cross":
        arm, half_width = 1.2 * r, 0.42 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= half_width)) | ((au <= half_width) & (av <= arm))
    if shape == "ellipse":
        a, b = 1.55 * r, 0.55 * r  # axis ratio ~2.8, eccentricity ~0.93
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    raise AssertionError(f"no mask for shape {shape!r}")  # recipes only name the shapes above


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    """Inside a regular polygon iff the projection on every edge normal is within the apothem."""
    mask = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for k in range(sides):
        phi = 2 * math.pi * k / sides
        mask &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return mask


def _star(u: np.ndarray, v: np.ndarray, points: int, outer: float, inner: float) -> np.ndarray:
    """A filled star with tips at radius ``outer`` and notches at radius ``inner``.

    Folded by symmetry onto the half-sector between a tip P = (outer, 0) and a notch Q; a point is
    inside iff it lies on the centre's side of the edge PQ.
    """
    half = math.pi / points
    phi = np.abs(np.mod(np.arctan2(v, u) + half, 2 * half) - half)  # angle from nearest tip, [0, half]
    rho = np.hypot(u, v)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    qx, qy = inner * math.cos(half), inner * math.sin(half)
    # cross((Q - P), (p - P)) has the same sign as for the centre (which is positive) when inside
    return (qx - outer) * py - qy * (px - outer) >= 0


# --------------------------------------------------------------------------------------------------
# Colours


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (hue in degrees, s and v in [0, 1]) to RGB (3,) float32 in [0, 1]."""
    h6 = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h6 % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h6) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m], dtype=np.float32)


def _training_colour(rng: np.random.Generator) -> np.ndarray:
    lo, hi = HELD_OUT_HUE_BAND
    start, span = hi + _HUE_GUARD, 360.0 - (hi - lo) - 2 * _HUE_GUARD  # from 305 round to 235
    return _hsv_to_rgb(start + rng.uniform(0, span), rng.uniform(*_TRAIN_SAT), rng.uniform(*_TRAIN_VAL))


def _unseen_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        lo, hi = HELD_OUT_HUE_BAND
        hue = rng.uniform(lo + _HUE_GUARD, hi - _HUE_GUARD)
        return _hsv_to_rgb(hue, rng.uniform(*_TRAIN_SAT), rng.uniform(*_TRAIN_VAL))
    return _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(*_PASTEL_SAT), rng.uniform(*_PASTEL_VAL))


def _distinct_colours(rng: np.random.Generator, n: int, palette: str) -> list[np.ndarray]:
    """``n`` colours (3,) float32 from ``palette``, resampled until no two are closer than the minimum."""
    draw = _training_colour if palette == "training" else _unseen_colour
    colours: list[np.ndarray] = []
    for _ in range(n):
        for _ in range(_COLOUR_TRIES):  # bounded; the last draw is kept if all were too close
            colour = draw(rng)
            if all(np.linalg.norm(colour - c) >= _MIN_COLOUR_DISTANCE for c in colours):
                break
        colours.append(colour)
    return colours


# --------------------------------------------------------------------------------------------------
# Textures (procedural from the scene RNG, and skimage's bundled photos)

# Bundled with scikit-image (no download). The list is fixed, not probed, so scenes do not depend on
# what a machine happens to have; a missing one raises.
_GRAY_PHOTOS = ("brick", "grass", "gravel", "camera", "moon")
_COLOUR_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


def _texture_gray(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey fill factor (H, W) float32 in [0.35, 1]: dark enough for contrast, never black."""
    kind = int(rng.integers(4))
    if kind == 0:
        t = _value_noise(rng, size, cells=max(4, size // 6))
    elif kind == 1:
        t = _stripes(rng, size, period=rng.uniform(0.08, 0.16) * size)
    elif kind == 2:
        t = _checker(rng, size, period=rng.uniform(0.06, 0.12) * size)
    else:
        name = _GRAY_PHOTOS[int(rng.integers(3))]  # brick, grass, gravel: the texture-like ones
        t = _photo_crop(rng, name, size, side_fraction=(0.1, 0.25)).mean(axis=-1)
    return (0.35 + 0.65 * _normalise(t)).astype(np.float32)


def _background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A darkened, desaturated texture (H, W, 3) float32 in [0.05, 0.55]."""
    if rng.random() < 0.5:
        names = _GRAY_PHOTOS + _COLOUR_PHOTOS
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
    y, x = _pixel_grid(size)
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
    cv2 = _import_optional("cv2", "opencv-python-headless")
    photo = _load_photo(name)
    h, w = photo.shape[:2]
    side = max(size, int(rng.uniform(*side_fraction) * min(h, w)))
    side = min(side, h, w)
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = np.rot90(photo[top : top + side, left : left + side], k=int(rng.integers(4)))
    # INTER_AREA averages the source pixels each output pixel covers, so downscaling does not alias
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> np.ndarray:
    """A bundled skimage image as (h, w, 3) float32 in [0, 1], read-only (it is shared by the cache)."""
    data = _import_optional("skimage.data", "scikit-image")
    loader = getattr(data, name, None)
    if loader is None:
        raise ConfigError(
            f"scikit-image has no bundled image {name!r}; the texture splits need "
            f"{_GRAY_PHOTOS + _COLOUR_PHOTOS} (scikit-image >= 0.19 bundles them all)."
        )
    photo = np.asarray(loader(), dtype=np.float32) / 255.0
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    photo = np.ascontiguousarray(photo[..., :3])
    photo.flags.writeable = False
    return photo


def _import_optional(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The texture splits need {package!r}: pip install {package}. in_dist needs numpy only."
        ) from error


# --------------------------------------------------------------------------------------------------
# Corruptions (noise_blur)


def _corrupt(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Blur, Gaussian noise, or both (one in three each). ``image`` (H, W, 3) float32 in [0, 1]."""
    mode = int(rng.integers(3))  # 0 blur, 1 noise, 2 both
    if mode in (0, 2):
        image = _gaussian_blur(image, sigma=rng.uniform(0.6, 1.0) * size / 32)
    if mode in (1, 2):
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0.08, 0.15))
        image = image + noise
    return np.clip(image, 0.0, 1.0)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C) with reflected borders, in numpy (small kernels)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    h, w = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
    image = sum(t * padded[k : k + h] for k, t in enumerate(taps))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    return sum(t * padded[:, k : k + w] for k, t in enumerate(taps))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
