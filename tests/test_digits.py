"""Tests for tta_runtime.data.digits (and its corruptions): the splits, the corruption suite, the continual stream."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tta_runtime.data.digits import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTION_NAMES,
    CORRUPTIONS,
    SEVERITIES,
    VALIDATION_CORRUPTIONS,
    corrupt,
    corruption_stream,
    load_digits,
)
from tta_runtime.errors import ConfigError, InvalidInputError, UnknownNameError

SIZES = {"train": 1078, "val": 180, "test": 539}
# corruptions that draw nothing from the generator (same output for every seed)
DETERMINISTIC = {"defocus_blur", "zoom_blur", "contrast", "pixelate", "jpeg_compression", "gaussian_blur", "brightness"}


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    """Six (32, 32, 3) uint8 test digits."""
    return load_digits("test")[0][:6]


# ----------------------------------------------------------------------------------------------------
# Splits


def test_split_sizes_dtypes_and_ranges():
    for split, n in SIZES.items():
        images, labels = load_digits(split)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert set(labels.tolist()) == set(range(10))  # every class in every split
        assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()  # grey
        assert images.min() == 0 and images.max() == 255  # 0..16 scans stretched to 0..255
    assert sum(SIZES.values()) == 1797


def test_splits_partition_the_sklearn_digits():
    """At size 8 the images are the scans themselves: the three splits together are the dataset, once."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    expected = np.rint(bunch.images * 255.0 / 16.0).astype(np.uint8)
    full = Counter((im.tobytes(), int(y)) for im, y in zip(expected, bunch.target))
    parts = Counter()
    for split in SIZES:
        images, labels = load_digits(split, size=8)
        parts.update((im[..., 0].tobytes(), int(y)) for im, y in zip(images, labels))
    assert parts == full


def test_splits_are_disjoint_and_fixed():
    train, val, test = (load_digits(s, size=8)[0] for s in ("train", "val", "test"))
    keys = [{im.tobytes() for im in x} for x in (train, val, test)]
    assert [len(k) for k in keys] == list(SIZES.values())  # sklearn's scans hold no exact duplicates
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    np.testing.assert_array_equal(test, load_digits("test", size=8)[0])


def test_returned_arrays_are_private_copies():
    images, labels = load_digits("val")
    images[:] = 7
    labels[:] = 3
    fresh_images, fresh_labels = load_digits("val")
    assert fresh_images.max() == 255 and set(fresh_labels.tolist()) == set(range(10))


def test_upsampling_is_bilinear_and_sizes_follow():
    small, _ = load_digits("val", size=8)
    big, _ = load_digits("val", size=16)
    assert big.shape == (180, 16, 16, 3)
    # 2x bilinear with pixel-centre alignment: output (1, 1) is 3/4 of input (0, 0) + 1/4 of its neighbours
    s = small[..., 0].astype(np.float64)
    expected = 0.5625 * s[:, 0, 0] + 0.1875 * s[:, 0, 1] + 0.1875 * s[:, 1, 0] + 0.0625 * s[:, 1, 1]
    assert np.abs(big[:, 1, 1, 0] - expected).max() <= 1.0  # the 8x8 are rounded to uint8 first


def test_bad_split_and_size():
    with pytest.raises(UnknownNameError, match="Did you mean 'test'") as err:
        load_digits("tset")
    assert "train, val, test" in str(err.value)
    for size in (4, 1000, 32.0, True, "32"):
        with pytest.raises(ConfigError, match="size must be an int"):
            load_digits("test", size=size)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# The corruption suite


def test_registry():
    assert len(CORRUPTIONS) >= 14
    assert set(CORRUPTIONS.values()) == {"noise", "blur", "weather", "digital"}
    for family in ("noise", "blur", "weather", "digital"):
        assert sum(f == family for f in CORRUPTIONS.values()) >= 3
    assert len(BENCHMARK_CORRUPTIONS) == 15  # Hendrycks & Dietterich's benchmark set
    assert set(BENCHMARK_CORRUPTIONS) | set(VALIDATION_CORRUPTIONS) == set(CORRUPTION_NAMES)
    assert not set(BENCHMARK_CORRUPTIONS) & set(VALIDATION_CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_corruption_contract(name: str, test_images: np.ndarray):
    before = test_images.copy()
    mad = {}
    for severity in SEVERITIES:
        out = corrupt(test_images, name, severity, seed=3)
        assert out.shape == test_images.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, corrupt(test_images, name, severity, seed=3))  # deterministic
        # image i alone, with start=i, is image i of the batch
        for i in (0, 4):
            np.testing.assert_array_equal(corrupt(test_images[i : i + 1], name, severity, seed=3, start=i)[0], out[i])
        diff = np.abs(out.astype(np.int64) - test_images).reshape(len(out), -1).mean(axis=1)
        assert (diff > 0).all(), f"{name} severity {severity} left image(s) {np.flatnonzero(diff == 0)} unchanged"
        mad[severity] = diff.mean()
    np.testing.assert_array_equal(test_images, before)  # the input is not modified
    assert mad[5] > mad[1], f"{name}: severity 5 should be farther from clean than 1, got {mad}"


@pytest.mark.parametrize("name", sorted(set(CORRUPTION_NAMES) - DETERMINISTIC))
def test_random_corruptions_depend_on_seed_and_start(name: str, test_images: np.ndarray):
    a = corrupt(test_images[:2], name, 3, seed=0)
    assert not np.array_equal(a, corrupt(test_images[:2], name, 3, seed=1))
    # the same image at another position of a set gets other draws
    assert not np.array_equal(a[0], corrupt(test_images[:1], name, 3, seed=0, start=1)[0])


def test_strength_grows_with_severity_where_it_is_one_knob(test_images: np.ndarray):
    """For single-parameter corruptions every step up is a stronger corruption (mean abs difference)."""
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "zoom_blur", "brightness", "contrast", "pixelate"):
        mads = [np.abs(corrupt(test_images, name, s).astype(np.int64) - test_images).mean() for s in SEVERITIES]
        assert all(b > a for a, b in zip(mads, mads[1:])), f"{name}: {mads}"


def test_noise_level_and_flat_contrast():
    # gaussian noise severity 5 has sigma 0.10 -> 25.5 levels; background pixels (0) are clipped at 0, so test
    # on mid-grey images where nothing clips
    grey = np.full((4, 32, 32, 3), 128, np.uint8)
    noisy = corrupt(grey, "gaussian_noise", 5).astype(np.float64)
    assert abs(noisy.std() - 25.5) < 1.0 and abs(noisy.mean() - 128) < 1.0
    contrast = corrupt(grey, "contrast", 5)
    np.testing.assert_array_equal(contrast, grey)  # a flat image has no contrast to reduce


def test_bad_corruption_inputs(test_images: np.ndarray):
    with pytest.raises(UnknownNameError, match="Did you mean 'gaussian_noise'") as err:
        corrupt(test_images, "gausian_noise", 1)
    assert "jpeg_compression" in str(err.value)  # lists the known names
    for severity in (0, 6, 2.0, True, None):
        with pytest.raises(ConfigError, match="severity must be an int in 1..5"):
            corrupt(test_images, "fog", severity)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="uint8"):
        corrupt(test_images.astype(np.float32) / 255, "fog", 1)
    with pytest.raises(InvalidInputError, match=r"images\[None\]"):
        corrupt(test_images[0], "fog", 1)
    with pytest.raises(InvalidInputError, match=r"\(N, S, S, 3\)"):
        corrupt(test_images[:, :, :30], "fog", 1)  # not square
    with pytest.raises(InvalidInputError, match=r"\(N, S, S, 3\)"):
        corrupt(test_images[..., :1], "fog", 1)  # one channel
    with pytest.raises(InvalidInputError, match="numpy array"):
        corrupt(test_images.tolist(), "fog", 1)  # type: ignore[arg-type]
    for kw in ({"seed": -1}, {"start": -2}, {"seed": 1.5}):
        with pytest.raises(ConfigError, match="non-negative int"):
            corrupt(test_images, "fog", 1, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [16, 64])
def test_other_sizes(size: int):
    images, _ = load_digits("test", size=size)
    for name in CORRUPTION_NAMES:
        out = corrupt(images[:2], name, 5)
        assert out.shape == (2, size, size, 3)
        assert (np.abs(out.astype(np.int64) - images[:2]).reshape(2, -1).mean(axis=1) > 0).all(), name


# ----------------------------------------------------------------------------------------------------
# The continual stream


def test_stream_segments_labels_and_repeats():
    images, labels = load_digits("val")
    items = list(corruption_stream(200, split="val", segment=50, severity=4, seed=2))
    assert len(items) == 200
    names = [name for _, _, name, _ in items]
    segments = [names[i : i + 50] for i in range(0, 200, 50)]
    assert all(len(set(s)) == 1 for s in segments)  # one corruption per segment
    assert all(a[0] != b[0] for a, b in zip(segments, segments[1:]))  # and it changes at each boundary
    assert set(names) <= set(BENCHMARK_CORRUPTIONS)
    assert [sev for *_, sev in items] == [4] * 200
    assert [lab for _, lab, _, _ in items] == [int(labels[k % 180]) for k in range(200)]  # cycles through val
    # position k is corrupt(image k % N, start=k): the repeat of image 0 at k=180 gets its own draws
    for k in (0, 57, 180):
        expected = corrupt(images[k % 180][None], names[k], 4, seed=2, start=k)[0]
        np.testing.assert_array_equal(items[k][0], expected)
    again = list(corruption_stream(200, split="val", segment=50, severity=4, seed=2))
    assert all(np.array_equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(items, again))


def test_stream_random_severity_and_order():
    three = ("fog", "contrast", "snow")
    items = list(corruption_stream(60, split="val", segment=5, severity=None, seed=0, corruptions=three))
    sevs = [sev for *_, sev in items]
    assert set(sevs) <= set(SEVERITIES) and len(set(sevs)) > 1
    assert all(len(set(sevs[i : i + 5])) == 1 for i in range(0, 60, 5))
    names = [name for _, _, name, _ in items][::5]
    assert names[:3] == names[3:6]  # one seeded permutation, repeated
    assert sorted(names[:3]) == ["contrast", "fog", "snow"]


def test_stream_bad_arguments_fail_at_the_call():
    with pytest.raises(ConfigError, match="segment"):
        corruption_stream(10, segment=0)
    with pytest.raises(UnknownNameError, match="Did you mean 'snow'"):
        corruption_stream(10, corruptions=("snwo",))
    with pytest.raises(ConfigError, match="severity"):
        corruption_stream(10, severity=7)
    with pytest.raises(UnknownNameError, match="Did you mean 'val'"):
        corruption_stream(10, split="vall")
    with pytest.raises(ConfigError, match="at least one"):
        corruption_stream(10, corruptions=())
    assert list(corruption_stream(0)) == []
