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
    if shape == "pentagon":
        return regular_polygon(u, v, sides=5, apothem=0.88 * r)
    if shape == "hexagon":
        return regular_polygon(u, v, sides=6, apothem=0.92 * r)
    if shape == "crescent":
        outer = 1.1 * r
        return (u * u + v * v <= outer * outer) & ((u - 0.55 * outer) ** 2 + v * v > (0.85 * outer) ** 2)
    if shape == "frame":
        return regular_polygon(u, v, sides=4, apothem=1.0 * r) & ~regular_polygon(u, v, sides=4, apothem=0.5 * r)
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


def place_object(
    rng: np.random.Generator, size: int, instances: np.ndarray, areas: list[int], *, shapes: tuple[str, ...],
    radius_fraction: tuple[float, float], min_visible: float, min_pixels: int, tries: int = 30,
) -> np.ndarray | None:
    """A mask (H, W) bool for a new object that leaves every earlier object at least ``min_visible`` of its
    own drawn area visible, or None after ``tries`` rejected draws (the caller drops the object).

    ``instances`` (H, W) int64 holds the objects drawn so far (0 = background) and ``areas[k]`` object k's
    drawn in-image area (``areas[0]`` unused). Each try draws, in this order: the shape, the nominal radius
    (a fraction of the side), the centre (the radius as margin) and the shape's own random parameters.
    """
    for _ in range(tries):
        shape = shapes[int(rng.integers(len(shapes)))]
        radius = rng.uniform(*radius_fraction) * size
        # the nominal radius as margin keeps the body inside; corners and spikes may clip a little
        cy, cx = rng.uniform(radius, size - radius, size=2)
        mask = random_shape_mask(shape, size, cy, cx, radius, rng)
        if mask.sum() < min_pixels:
            continue
        visible = np.bincount(instances.ravel(), minlength=len(areas))
        covered = np.bincount(instances[mask], minlength=len(areas))
        remaining = visible[1:] - covered[1:]
        if np.all(remaining >= min_visible * np.asarray(areas[1:])):
            return mask
    return None


def random_shape_mask(
    shape: str, size: int, cy: float, cx: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    """A mask (H, W) bool of ``shape`` centred at (cy, cx) with nominal radius ``r`` px, at a random turn
    (half the squares axis-aligned); shapes with random parameters of their own draw them after the turn."""
    if shape == "square" and rng.random() < 0.5:
        theta = 0.0
    else:
        theta = rng.uniform(0, 2 * math.pi)
    u, v = shape_frame(size, cy, cx, theta)
    if shape in RANDOM_SHAPES:
        return RANDOM_SHAPES[shape](u, v, r, rng)
    return shape_mask(shape, u, v, r)


def blob(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth star-convex blob: radius r x (1 + sum of 2nd-4th harmonics, amplitudes up to 0.18 each)."""
    phi = np.arctan2(v, u)
    boundary = np.ones_like(phi)
    for k in (2, 3, 4):
        boundary += rng.uniform(0, 0.18) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    return np.hypot(u, v) <= r * boundary


def stroke(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """A glyph-like stroke: a polyline of 2-3 segments with vertices inside the r-box, half-width
    0.2-0.3 r (at least 0.75 px so it stays connected on the pixel grid)."""
    n_vertices = int(rng.integers(3, 5))
    points = rng.uniform(-r, r, size=(n_vertices, 2))
    half_width = max(0.75, rng.uniform(0.2, 0.3) * r)
    mask = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for (au, av), (bu, bv) in zip(points[:-1], points[1:]):
        du, dv = bu - au, bv - av
        t = np.clip(((u - au) * du + (v - av) * dv) / max(du * du + dv * dv, 1e-9), 0.0, 1.0)
        mask |= (u - au - t * du) ** 2 + (v - av - t * dv) ** 2 <= half_width * half_width
    return mask


RANDOM_SHAPES = {"blob": blob, "stroke": stroke}


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
