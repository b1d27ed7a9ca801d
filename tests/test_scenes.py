"""Tests for tta_runtime.scenes: determinism, the instance-map contract, and what each split shifts."""

from __future__ import annotations

import numpy as np
import pytest

from tta_runtime.errors import ConfigError, UnknownNameError
from tta_runtime.data.scenes import (
    OOD_SPLITS,
    SPLITS,
    Scene,
    generate_scene,
    generate_scenes,
    max_objects,
)

N = 60  # scenes per split in the per-split checks: enough to hit every branch, fast on CPU
MIN_OBJECTS = {"more_objects": 5}  # objects drawn; drops can lower the count, so tests assert >= 1


def hue_sat_val(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV of (..., 3) uint8 RGB: hue in degrees [0, 360), saturation and value in [0, 1]."""
    rgb = rgb.astype(np.float64) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.select(
        [mx == r, mx == g],
        [((g - b) / safe) % 6, (b - r) / safe + 2],
        (r - g) / safe + 4,
    )
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue, sat, mx


def object_colours(images: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """The colour (k, 3) uint8 of every object in flat-coloured scenes (checks that each is flat)."""
    colours = []
    for image, inst in zip(images, instances):
        for k in range(1, inst.max() + 1):
            pixels = image[inst == k]
            assert (pixels == pixels[0]).all(), "objects must be flat-coloured"
            colours.append(pixels[0])
    return np.array(colours)


def background_std(image: np.ndarray, instances: np.ndarray) -> float:
    """Spread of the background pixels, per channel then averaged, in uint8 levels."""
    return float(image[instances == 0].astype(np.float64).std(axis=0).mean())


def is_training_colour(rgb: np.ndarray) -> np.ndarray:
    """The documented in_dist rule, with a little slack for uint8 rounding."""
    hue, sat, val = hue_sat_val(rgb)
    return ((hue < 237.0) | (hue > 303.0)) & (sat >= 0.73) & (val >= 0.78)


# ------------------------------------------------------------------------------------------------
# Names and errors


def test_split_names() -> None:
    assert SPLITS[0] == "in_dist"
    assert OOD_SPLITS == SPLITS[1:]
    assert len(set(SPLITS)) == 7
    assert {s: max_objects(s) for s in SPLITS} == {s: 7 if s == "more_objects" else 4 for s in SPLITS}


def test_unknown_split_lists_names_and_closest_match() -> None:
    calls = (
        lambda: generate_scene("in_dst", 0, 0),
        lambda: generate_scenes("nope", 2, 0),
        lambda: max_objects("x"),
    )
    for call in calls:
        with pytest.raises(UnknownNameError) as info:
            call()
        message = str(info.value)
        assert all(name in message for name in SPLITS)
    with pytest.raises(UnknownNameError, match="Did you mean 'in_dist'"):
        generate_scene("in_dst", 0, 0)
    with pytest.raises(KeyError):  # UnknownNameError is also a KeyError, for registry-style callers
        generate_scene("unseen_colors", 0, 0)


@pytest.mark.parametrize("size", [15, 513, 32.0, True, "32", None])
def test_bad_size_raises_config_error(size: object) -> None:
    with pytest.raises(ConfigError, match=r"\[16, 512\]"):
        generate_scene("in_dist", 0, 0, size=size)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        generate_scenes("in_dist", 2, 0, size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"seed": -1}, "seed"), ({"index": -3}, "index"), ({"seed": 1.5}, "seed")]
)
def test_bad_seed_or_index_raises_config_error(kwargs: dict, name: str) -> None:
    args = {"split": "in_dist", "seed": 0, "index": 0} | kwargs
    with pytest.raises(ConfigError, match=name):
        generate_scene(**args)


def test_bad_count_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="n must"):
        generate_scenes("in_dist", -1, 0)
    with pytest.raises(ConfigError, match="start must"):
        generate_scenes("in_dist", 1, 0, start=-1)
    images, instances = generate_scenes("in_dist", 0, 0)
    assert images.shape == (0, 32, 32, 3) and instances.shape == (0, 32, 32)


# ------------------------------------------------------------------------------------------------
# Determinism and the output contract, for every split


@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_and_batch_matches_single(split: str) -> None:
    images, instances = generate_scenes(split, 6, seed=3, start=10)
    again_images, again_instances = generate_scenes(split, 6, seed=3, start=10)
    assert images.tobytes() == again_images.tobytes()
    assert instances.tobytes() == again_instances.tobytes()
    for i in (0, 5):
        scene = generate_scene(split, 3, 10 + i)
        assert isinstance(scene, Scene) and scene.split == split and scene.seed == 3
        assert np.array_equal(scene.image, images[i]) and np.array_equal(scene.instances, instances[i])
    other_images, _ = generate_scenes(split, 6, seed=4, start=10)
    assert all(not np.array_equal(a, b) for a, b in zip(images, other_images))
    assert not np.array_equal(images[0], images[1])  # different indices differ too


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("size", [32, 64])
def test_output_contract(split: str, size: int) -> None:
    n = N if size == 32 else 10
    images, instances = generate_scenes(split, n, seed=0, size=size)
    assert images.shape == (n, size, size, 3) and images.dtype == np.uint8
    assert instances.shape == (n, size, size) and instances.dtype == np.int64
    counts = []
    for image, inst in zip(images, instances):
        ids = np.unique(inst)
        count = int(inst.max())
        assert np.array_equal(ids, np.arange(count + 1)), "ids must be 0 plus consecutive 1..n"
        assert count >= 1 and count <= max_objects(split)
        pixels = np.bincount(inst.ravel())[1:]
        assert pixels.min() >= 6 * (size / 32) ** 2, "every object keeps a clearly visible area"
        counts.append(count)
    if size == 32:  # drops are rare: the drawn range shows up in the counts
        assert min(counts) <= MIN_OBJECTS.get(split, 2) and max(counts) == max_objects(split)
        assert min(counts) >= MIN_OBJECTS.get(split, 2) - 1


def test_instances_match_painted_pixels_in_dist() -> None:
    images, instances = generate_scenes("in_dist", N, seed=1)
    for image, inst in zip(images, instances):
        background = image[inst == 0]
        assert (background == background[0]).all(), "in_dist background is one flat colour"
        for k in range(1, inst.max() + 1):  # objects differ from the background colour everywhere
            assert not (image[inst == k] == background[0]).all(axis=-1).any()


# ------------------------------------------------------------------------------------------------
# Each split changes what it says


def test_in_dist_colours_follow_the_training_rule_and_differ_within_a_scene() -> None:
    images, instances = generate_scenes("in_dist", 300, seed=0)
    colours = object_colours(images, instances)
    assert is_training_colour(colours).all()
    hue, _, _ = hue_sat_val(colours)
    assert ((hue > 300) | (hue < 20)).any() and ((hue > 200) & (hue < 240)).any()  # both sides of the band
    for image, inst in zip(images, instances):
        scene_colours = object_colours(image[None], inst[None]).astype(np.float64) / 255.0
        dists = np.linalg.norm(scene_colours[:, None] - scene_colours[None], axis=-1)
        assert dists[np.triu_indices(len(scene_colours), 1)].min(initial=1.0) >= 0.34


def test_backgrounds_are_dim_and_desaturated() -> None:
    images, instances = generate_scenes("in_dist", N, seed=2)
    _, sat, val = hue_sat_val(np.array([image[inst == 0][0] for image, inst in zip(images, instances)]))
    assert (sat <= 0.27).all() and (val >= 0.13).all() and (val <= 0.47).all()


def test_unseen_colours_are_never_training_colours() -> None:
    images, instances = generate_scenes("unseen_colours", 300, seed=0)
    colours = object_colours(images, instances)
    assert not is_training_colour(colours).any()
    hue, sat, _ = hue_sat_val(colours)
    in_band = (hue >= 240) & (hue < 300) & (sat >= 0.73)
    pastel = (sat >= 0.18) & (sat <= 0.42)
    assert (in_band | pastel).all() and in_band.any() and pastel.any()
    train = object_colours(*generate_scenes("in_dist", 300, seed=0))
    assert not set(map(tuple, colours)) & set(map(tuple, train))


def test_textured_background_varies_and_objects_stay_flat() -> None:
    plain_images, plain_instances = generate_scenes("in_dist", N, seed=0)
    images, instances = generate_scenes("textured_background", N, seed=0)
    plain_std = [background_std(image, inst) for image, inst in zip(plain_images, plain_instances)]
    textured_std = [background_std(image, inst) for image, inst in zip(images, instances)]
    assert max(plain_std) == 0.0
    assert np.median(textured_std) > 8.0 and min(textured_std) > 1.0
    object_colours(images, instances)  # objects are still flat
    assert images[instances == 0].mean() < 150  # darkened on average, so objects stand out


def test_textured_objects_vary_and_background_stays_flat() -> None:
    images, instances = generate_scenes("textured_objects", N, seed=0)
    stds = []
    for image, inst in zip(images, instances):
        background = image[inst == 0]
        assert (background == background[0]).all()
        stds += [image[inst == k].astype(float).std() for k in range(1, inst.max() + 1)]
    assert np.median(stds) > 10.0


def test_noise_blur_corrupts_the_in_dist_scene_with_the_same_index() -> None:
    clean_images, clean_instances = generate_scenes("in_dist", N, seed=5)
    images, instances = generate_scenes("noise_blur", N, seed=5)
    assert np.array_equal(instances, clean_instances)
    diff = np.abs(images.astype(float) - clean_images.astype(float)).mean(axis=(1, 2, 3))
    assert (diff > 1.0).all(), "every scene is corrupted"
    # noise raises the background's spread, blur softens edges: both kinds occur
    bg_std = np.array([background_std(image, inst) for image, inst in zip(images, instances)])
    assert (bg_std > 10).any() and (bg_std < 10).any()


def test_unseen_shapes_differ_from_training_shapes() -> None:
    from skimage.morphology import convex_hull_image

    def top_object_solidity(split: str) -> np.ndarray:
        """Area / convex-hull area of the last-drawn object, the only one nothing occludes."""
        _, instances = generate_scenes(split, N, seed=0)
        masks = [inst == inst.max() for inst in instances]
        return np.array([mask.sum() / convex_hull_image(mask).sum() for mask in masks])

    # rasterised convex shapes score 0.82-1 at 32x32, the star, ring and cross 0.6-0.78
    assert top_object_solidity("in_dist").min() > 0.8
    assert (top_object_solidity("unseen_shapes") < 0.8).mean() > 0.5  # star, ring, cross are not
    colours = object_colours(*generate_scenes("unseen_shapes", N, seed=0))
    assert is_training_colour(colours).all()  # the colours are in_dist's


def test_size_scales_objects() -> None:
    _, small = generate_scenes("in_dist", 20, seed=0, size=32)
    _, large = generate_scenes("in_dist", 20, seed=0, size=64)
    # same layout fractions are drawn at either size, so object areas scale by ~4
    ratio = (large > 0).mean() / (small > 0).mean()
    assert 0.8 < ratio < 1.25
