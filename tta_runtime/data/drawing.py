"""Shapes and colours of the scene family, shared by the still scenes and the moving video.

Shapes are hard-edged masks on the pixel-centre grid, computed in the shape's own frame (u along its
rotated x axis, v along its y axis), so the instance maps are exact. Colours are HSV draws with hue in
degrees and saturation and value in [0, 1], returned as RGB (3,) float32 in [0, 1].

Colour rule. Training objects take a hue outside the held-out band [240, 300) by a 5-degree guard,
i.e. in [305, 360) or [0, 235], with saturation in [0.75, 1] and value in [0.8, 1]. Unseen objects take,
with equal odds, a hue in [245, 295] with the same saturation and value, or a pastel: any hue,
saturation in [0.2, 0.4], value in [0.85, 1]. The two sets are disjoint with a margin that survives
uint8 rounding. Backgrounds have saturation <= 0.25 and value in [0.15, 0.45], so objects (value >= 0.8)
stand out.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# Hues (degrees) that the training colours never take; unseen colours draw from inside it. The guard
# keeps the two hue sets apart after colours are rounded to uint8.
HELD_OUT_HUE_BAND: tuple[float, float] = (240.0, 300.0)
HUE_GUARD = 5.0
TRAIN_SAT, TRAIN_VAL = (0.75, 1.0), (0.8, 1.0)
PASTEL_SAT, PASTEL_VAL = (0.2, 0.4), (0.85, 1.0)
BACKGROUND_SAT, BACKGROUND_VAL = (0.0, 0.25), (0.15, 0.45)

RADIUS_FRACTION = (0.12, 0.22)  # nominal object radius / image side
MIN_COLOUR_DISTANCE = 0.35  # Euclidean, RGB in [0, 1]; below this two objects look alike
COLOUR_TRIES = 50


# --------------------------------------------------------------------------------------------------
# Geometry


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: ``y`` (H, 1) and ``x`` (1, W) float64, in pixels."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    return centres[:, None], centres[None, :]


def shape_frame(size: int, cy: float, cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Shape-frame coordinates ``u``, ``v`` (H, W) float64 of every pixel centre, for a shape centred at
    (cy, cx) px and turned by ``theta`` radians."""
    y, x = pixel_grid(size)
    dy, dx = y - cy, x - cx  # (H, 1), (1, W): broadcast to (H, W) below
    cos, sin = math.cos(theta), math.sin(theta)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """A hard-edged mask (H, W) bool of ``shape`` with nominal radius ``r`` px, in shape-frame coordinates.

    Sizes are chosen so that every shape covers 75-105 % of the area of a circle of radius ``r``
    (the triangle is the smallest), so shape and size do not shift together.
    """
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return regular_polygon(u, v, sides=4, apothem=0.9 * r)
    if shape == "triangle":
        return regular_polygon(u, v, sides=3, apothem=0.5 * 1.35 * r)  # circumradius 1.35 r
    if shape == "star":
        return star(u, v, points=5, outer=1.45 * r, inner=0.7 * r)
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
    raise AssertionError(f"no mask for shape {shape!r}")  # callers only name the shapes above


def regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    """Inside a regular polygon iff the projection on every edge normal is within the apothem."""
    mask = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for k in range(sides):
        phi = 2 * math.pi * k / sides
        mask &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return mask


def star(u: np.ndarray, v: np.ndarray, points: int, outer: float, inner: float) -> np.ndarray:
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


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (hue in degrees, s and v in [0, 1]) to RGB (3,) float32 in [0, 1]."""
    h6 = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h6 % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h6) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m], dtype=np.float32)


def background_colour(rng: np.random.Generator) -> np.ndarray:
    """A dim, desaturated background colour (3,) float32."""
    return hsv_to_rgb(rng.uniform(0, 360), rng.uniform(*BACKGROUND_SAT), rng.uniform(*BACKGROUND_VAL))


def training_colour(rng: np.random.Generator) -> np.ndarray:
    lo, hi = HELD_OUT_HUE_BAND
    start, span = hi + HUE_GUARD, 360.0 - (hi - lo) - 2 * HUE_GUARD  # from 305 round to 235
    return hsv_to_rgb(start + rng.uniform(0, span), rng.uniform(*TRAIN_SAT), rng.uniform(*TRAIN_VAL))


def unseen_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        lo, hi = HELD_OUT_HUE_BAND
        hue = rng.uniform(lo + HUE_GUARD, hi - HUE_GUARD)
        return hsv_to_rgb(hue, rng.uniform(*TRAIN_SAT), rng.uniform(*TRAIN_VAL))
    return hsv_to_rgb(rng.uniform(0, 360), rng.uniform(*PASTEL_SAT), rng.uniform(*PASTEL_VAL))


def distinct_colours(rng: np.random.Generator, n: int, palette: str) -> list[np.ndarray]:
    """``n`` colours (3,) float32 from ``palette`` ("training" or "unseen"), resampled until no two are
    closer than the minimum."""
    draw = training_colour if palette == "training" else unseen_colour
    colours: list[np.ndarray] = []
    for _ in range(n):
        for _ in range(COLOUR_TRIES):  # bounded; the last draw is kept if all were too close
            colour = draw(rng)
            if all(np.linalg.norm(colour - c) >= MIN_COLOUR_DISTANCE for c in colours):
                break
        colours.append(colour)
    return colours
