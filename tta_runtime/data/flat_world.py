"""The flat world: flat-coloured objects on plain or gently varying backgrounds of any colour.

A broader training family than `tta_runtime.data.scenes` ("shapes", dark backgrounds and bright objects
only). Split names carry the world's prefix, ``flat/``, and go through the same
`tta_runtime.data.scenes.generate_scenes`, so every evaluation that takes a split name takes these too.

==========================  ===================================================================================
split                       what it draws
==========================  ===================================================================================
flat/in_dist                the training family: 1-6 objects (circle, square, triangle, pentagon, hexagon,
                            blob, glyph-like stroke), diameters about 8-45 % of the side, occlusion (every
                            object keeps half its area visible), any object colour at a minimum contrast to
                            the background and to the other objects, a plain or gently graded background of
                            any hue, saturation and brightness
flat/textured_objects       objects filled with a grey texture tinted by their colour
flat/photo_background       the background is a crop of a photo scikit-image ships, at its own colours
flat/unseen_shapes          star, ring, crescent and hollow square: shape families never drawn in training
flat/noise_blur             the in_dist scene with the same (seed, index), blurred and/or with Gaussian noise
flat/crowding               9-12 objects (training draws at most 6), sizes in the training range's lower part
==========================  ===================================================================================

Held-out variations (``HELD_OUT_SPLITS``): inside the training family's range, but never used to train or
select anything, to check that a model generalises within its world rather than fitting the sampler:

==========================  ===================================================================================
flat/bright_background      backgrounds of brightness (HSV value) 0.8-1 only
flat/small_objects          diameters about 8-16 % of the side only
flat/six_objects            six objects drawn in every scene
==========================  ===================================================================================

Determinism: scene ``index`` draws only from ``np.random.default_rng([seed, 100 + k, index])`` (k the split's
position in ``FLAT_SPLITS``), apart from the old world's streams, so it is the same alone or in a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from tta_runtime.data.drawing import hsv_to_rgb, pixel_grid, place_object
from tta_runtime.data.textures import photo_background, texture_gray

__all__ = ["FLAT_OOD_SPLITS", "FLAT_SPLITS", "HELD_OUT_SPLITS", "PREFIX", "render_flat_scene"]

PREFIX = "flat/"
TRAIN_SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "blob", "stroke")
UNSEEN_SHAPES = ("star", "ring", "crescent", "frame")
RADIUS_FRACTION = (0.04, 0.225)  # nominal radius / side: diameters of about 8-45 % of the side
MIN_CONTRAST = 0.3  # RGB distance (in [0, 1] units) of an object to the background and to other objects
GRADIENT_SPAN = 0.15  # per channel: how far a graded background's far end may differ from its near end
_COLOUR_TRIES = 50


@dataclass(frozen=True)
class _FlatRecipe:
    n_objects: tuple[int, int] = (1, 6)
    shapes: tuple[str, ...] = TRAIN_SHAPES
    radius_fraction: tuple[float, float] = RADIUS_FRACTION
    background: str = "any"  # "any" | "bright" | "photo"
    object_fill: str = "flat"  # "flat" | "texture"
    corrupt: bool = False
    min_visible: float = 0.5


_IN = _FlatRecipe()
_RECIPES: dict[str, _FlatRecipe] = {
    "flat/in_dist": _IN,
    "flat/textured_objects": replace(_IN, object_fill="texture"),
    "flat/photo_background": replace(_IN, background="photo"),
    "flat/unseen_shapes": replace(_IN, shapes=UNSEEN_SHAPES),
    "flat/noise_blur": replace(_IN, corrupt=True),
    "flat/crowding": replace(_IN, n_objects=(9, 12), radius_fraction=(0.04, 0.12)),
    "flat/bright_background": replace(_IN, background="bright"),
    "flat/small_objects": replace(_IN, radius_fraction=(0.04, 0.08)),
    "flat/six_objects": replace(_IN, n_objects=(6, 6)),
}
FLAT_SPLITS: tuple[str, ...] = tuple(_RECIPES)
HELD_OUT_SPLITS: tuple[str, ...] = ("flat/bright_background", "flat/small_objects", "flat/six_objects")
FLAT_OOD_SPLITS: tuple[str, ...] = tuple(s for s in FLAT_SPLITS if s != "flat/in_dist" and s not in HELD_OUT_SPLITS)


def recipe_of(split: str) -> _FlatRecipe:
    return _RECIPES[split]


def render_flat_scene(split: str, seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Draw scene ``index`` of flat-world ``split`` (a name in ``FLAT_SPLITS``, checked by the caller).

    Returns ``image`` (H, W, 3) float32 in [0, 1], ``instances`` (H, W) int64 and whether the caller should
    corrupt the image (``flat/noise_blur``, with `flat_rng(seed, split, index)`)."""
    recipe = _RECIPES[split]
    layout = "flat/in_dist" if recipe.corrupt else split
    rng = flat_rng(seed, layout, index)
    n_drawn = int(rng.integers(recipe.n_objects[0], recipe.n_objects[1] + 1))
    image, anchors = _background(recipe.background, rng, size)
    instances = np.zeros((size, size), dtype=np.int64)
    areas: list[int] = [0]
    colours: list[np.ndarray] = []
    # the smallest object in the range still covers about 60 % of its disc
    min_pixels = max(4, round(0.6 * math.pi * (recipe.radius_fraction[0] * size) ** 2))
    for _ in range(n_drawn):
        colour = _object_colour(rng, anchors, colours)
        mask = place_object(
            rng, size, instances, areas, shapes=recipe.shapes, radius_fraction=recipe.radius_fraction,
            min_visible=recipe.min_visible, min_pixels=min_pixels,
        )
        if mask is None:
            continue
        colours.append(colour)
        areas.append(int(mask.sum()))
        instances[mask] = len(areas) - 1
        if recipe.object_fill == "texture":
            image[mask] = (colour * texture_gray(rng, size)[..., None])[mask]
        else:
            image[mask] = colour
    return image, instances, recipe.corrupt


def flat_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 100 + FLAT_SPLITS.index(split), int(index)])


def _background(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The background (H, W, 3) float32 and the colours an object must contrast with (empty for a photo)."""
    if kind == "photo":
        return photo_background(rng, size).astype(np.float32), []
    value = rng.uniform(0.8, 1.0) if kind == "bright" else rng.uniform(0.03, 1.0)
    near = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 1), value)
    image = np.empty((size, size, 3), dtype=np.float32)
    if rng.random() < 0.5:
        image[:] = near
        return image, [near]
    # a gentle linear grade at a random angle from `near` to `far`
    far = np.clip(near + rng.uniform(-GRADIENT_SPAN, GRADIENT_SPAN, size=3), 0, 1).astype(np.float32)
    y, x = pixel_grid(size)
    theta = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(theta) + y * math.sin(theta)) / size
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-9)).astype(np.float32)
    image[:] = near + (far - near) * t[..., None]
    return image, [near, far]


def _object_colour(rng: np.random.Generator, background: list[np.ndarray], others: list[np.ndarray]) -> np.ndarray:
    """Any colour at least MIN_CONTRAST from the background's colours and the other objects' (the last
    draw is kept if none of the bounded tries is)."""
    for _ in range(_COLOUR_TRIES):
        colour = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.03, 1.0))
        if all(np.linalg.norm(colour - c) >= MIN_CONTRAST for c in (*background, *others)):
            break
    return colour
