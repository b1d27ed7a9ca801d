"""Tests of tta_runtime.metrics: hand-computed values, invariances, conventions, input errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tta_runtime.errors import InvalidInputError
from tta_runtime.metrics import (
    ari,
    bootstrap_ci,
    fg_ari,
    hungarian_match,
    matched_miou,
    paired_bootstrap_ci,
    recon_mse,
    segmentation_metrics,
)


def _three_object_scene() -> np.ndarray:
    """(8, 8) instance map: background 0 and three rectangular objects 1, 2, 3."""
    true = np.zeros((8, 8), dtype=np.int64)
    true[0:3, 0:3] = 1
    true[4:8, 0:2] = 2
    true[2:6, 5:8] = 3
    return true


# --------------------------------------------------------------------------------------------------
# ARI / FG-ARI
# --------------------------------------------------------------------------------------------------


def test_identical_partitions_score_one() -> None:
    true = _three_object_scene()
    assert ari(true, true) == 1.0
    assert fg_ari(true, true) == 1.0
    assert matched_miou(true, true) == 1.0
    assert segmentation_metrics(true, true) == {"fg_ari": 1.0, "ari": 1.0, "miou": 1.0}


def test_label_permutation_invariance() -> None:
    rng = np.random.default_rng(0)
    true = _three_object_scene()
    pred = rng.integers(0, 5, size=true.shape)
    relabel = np.array([40, 7, 1000, 3, 12])  # a permutation onto arbitrary labels
    pred_relabelled = relabel[pred]
    for metric in (ari, fg_ari, matched_miou):
        assert metric(true, pred_relabelled) == pytest.approx(metric(true, pred), abs=1e-12)
    # Relabelling the ground truth's objects (keeping 0 as background) changes nothing either.
    true_relabelled = np.array([0, 9, 5, 2])[true]
    assert fg_ari(true_relabelled, pred) == pytest.approx(fg_ari(true, pred), abs=1e-12)


def test_ari_hand_computed() -> None:
    # true [0,0,1,1], pred [0,0,1,2]: contingency pairs sum C(n_ij,2) = 1, rows 2, cols 1, total 6;
    # expected = 2*1/6 = 1/3, max = 1.5 -> ARI = (1 - 1/3) / (1.5 - 1/3) = 4/7.
    value = ari(np.array([[0, 0, 1, 1]]), np.array([[0, 0, 1, 2]]))
    assert value == pytest.approx(4 / 7, abs=1e-12)
    # true [0,0,0,1,1,1], pred [0,0,1,1,2,2]: index 2, rows 6, cols 3, total 15;
    # expected = 6*3/15 = 1.2, max = 4.5 -> ARI = 0.8 / 3.3 = 8/33.
    true = np.array([[0, 0, 0], [1, 1, 1]])
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    assert ari(true, pred) == pytest.approx(8 / 33, abs=1e-12)
    # Perfectly anti-correlated pairs: the sklearn docs' -0.5 example.
    assert ari(np.array([[0, 0, 1, 1]]), np.array([[0, 1, 0, 1]])) == pytest.approx(-0.5, abs=1e-12)


def test_ari_matches_sklearn_on_random_partitions() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for trial in range(30):
        h, w = rng.integers(1, 40, size=2)
        n_true, n_pred = rng.integers(1, 8, size=2)
        true = rng.integers(0, n_true, size=(h, w))
        # Half the trials: a noisy copy of the truth, so that values span the whole range.
        if trial % 2:
            pred = np.where(rng.random((h, w)) < 0.2, rng.integers(0, n_pred, size=(h, w)), true)
        else:
            pred = rng.integers(0, n_pred, size=(h, w))
        expected = sklearn_metrics.adjusted_rand_score(true.ravel(), pred.ravel())
        assert ari(true, pred) == pytest.approx(expected, abs=1e-12)
        fg = true.ravel() != 0
        expected_fg = sklearn_metrics.adjusted_rand_score(true.ravel()[fg], pred.ravel()[fg])
        assert fg_ari(true, pred) == pytest.approx(expected_fg, abs=1e-12)
    # A large image: the pair counts overflow int64 products unless handled (512*512 pixels).
    true = rng.integers(0, 6, size=(512, 512))
    pred = np.where(rng.random((512, 512)) < 0.3, rng.integers(0, 9, size=(512, 512)), true)
    expected = sklearn_metrics.adjusted_rand_score(true.ravel(), pred.ravel())
    assert ari(true, pred) == pytest.approx(expected, abs=1e-12)


def test_fg_ari_ignores_background_pixels() -> None:
    rng = np.random.default_rng(2)
    true = _three_object_scene()
    pred = rng.integers(0, 4, size=true.shape)
    before = fg_ari(true, pred)
    changed = pred.copy()
    background = true == 0
    changed[background] = rng.integers(0, 10, size=int(background.sum()))
    assert fg_ari(true, changed) == before
    # ARI (background included) does see the change.
    assert ari(true, changed) != ari(true, pred)


def test_all_in_one_cluster_prediction() -> None:
    true = _three_object_scene()
    pred = np.zeros_like(true)
    assert fg_ari(true, pred) == 0.0
    assert ari(true, pred) == 0.0
    # One predicted segment matches one GT segment; the other three GT segments count 0.
    sizes = np.bincount(true.ravel())
    assert matched_miou(true, pred) == pytest.approx(sizes.max() / true.size / 4, abs=1e-12)


def test_ari_degenerate_conventions() -> None:
    # Both partitions one cluster: 0/0 in the formula, defined as 1.0.
    assert ari(np.ones((3, 3), dtype=np.int64), np.full((3, 3), 5)) == 1.0
    # Both all singletons: also identical partitions.
    assert ari(np.arange(6).reshape(2, 3), np.arange(6).reshape(2, 3) + 10) == 1.0
    # One pixel: no pairs.
    assert ari(np.array([[3]]), np.array([[0]])) == 1.0
    # FG-ARI with no or one foreground pixel.
    assert fg_ari(np.zeros((4, 4), dtype=np.int64), np.arange(16).reshape(4, 4)) == 1.0
    one_fg = np.zeros((4, 4), dtype=np.int64)
    one_fg[1, 1] = 1
    assert fg_ari(one_fg, np.arange(16).reshape(4, 4)) == 1.0
    # One side one cluster, the other all singletons: 0.
    assert ari(np.zeros((2, 2), dtype=np.int64), np.arange(4).reshape(2, 2)) == 0.0
    # Bool label maps are accepted.
    mask = np.array([[True, False], [True, False]])
    assert ari(mask, mask) == 1.0


# --------------------------------------------------------------------------------------------------
# Matched mIoU
# --------------------------------------------------------------------------------------------------


def test_matched_miou_half_overlap() -> None:
    true = np.zeros((4, 4), dtype=np.int64)
    true[0:2, 0:2] = 1  # object: 4 pixels
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[0:2, 1:3] = 7  # the same object shifted by one column: half of it overlaps
    # object IoU = 2 / 6; background IoU = 10 / 14 (12 GT px, 12 predicted px, 10 shared).
    assert matched_miou(true, pred) == pytest.approx((2 / 6 + 10 / 14) / 2, abs=1e-12)


def test_matched_miou_uses_optimal_one_to_one_matching() -> None:
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[5, 5, 5, 6], [5, 5, 5, 6]])
    # IoU(0->5) = 4/6, IoU(1->6) = 2/4; matching both GT segments to 5 is not allowed.
    assert matched_miou(true, pred) == pytest.approx((4 / 6 + 2 / 4) / 2, abs=1e-12)
    # Extra predicted segments do not change the score beyond the IoU they take away.
    pred_extra = pred.copy()
    pred_extra[0, 3] = 9
    assert matched_miou(true, pred_extra) == pytest.approx((4 / 6 + 1 / 4) / 2, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Reconstruction MSE
# --------------------------------------------------------------------------------------------------


def test_recon_mse_values_and_uint8_scaling() -> None:
    image = np.zeros((2, 2, 3), dtype=np.float32)
    recon = np.full((2, 2, 3), 0.5, dtype=np.float32)
    assert recon_mse(image, recon) == pytest.approx(0.25, abs=1e-12)
    assert recon_mse(image, image) == 0.0
    image_u8 = np.full((2, 2, 3), 255, dtype=np.uint8)
    assert recon_mse(image_u8, np.ones((2, 2, 3))) == pytest.approx(0.0, abs=1e-12)
    assert recon_mse(image_u8, np.zeros((2, 2, 3), dtype=np.uint8)) == pytest.approx(1.0, abs=1e-12)


def test_recon_mse_validation() -> None:
    with pytest.raises(ValueError, match=r"same shape"):
        recon_mse(np.zeros((2, 2, 3)), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        recon_mse(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"uint16"):
        recon_mse(np.zeros((2, 2, 3), dtype=np.uint16), np.zeros((2, 2, 3)))


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def test_bootstrap_deterministic_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(3)
    few = rng.normal(0.6, 0.1, size=20)
    many = rng.normal(0.6, 0.1, size=2000)

    first = bootstrap_ci(few, seed=7)
    assert bootstrap_ci(few, seed=7) == first
    assert bootstrap_ci(list(few), seed=7) == first  # plain sequences work too
    assert bootstrap_ci(few, seed=8) != first

    mean, low, high = first
    assert mean == pytest.approx(float(few.mean()), abs=1e-15)
    assert low < mean < high

    _, low_many, high_many = bootstrap_ci(many, seed=7)
    assert (high_many - low_many) < (high - low) / 3  # ~sqrt(100) = 10x narrower in theory

    # A wider confidence gives a wider interval on the same resamples.
    _, low_99, high_99 = bootstrap_ci(few, seed=7, confidence=0.99)
    assert low_99 <= low and high_99 >= high


def test_bootstrap_single_value_and_errors() -> None:
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match=r"finite"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"confidence"):
        bootstrap_ci([0.1, 0.2], confidence=1.0)
    with pytest.raises(ValueError, match=r"n_boot"):
        bootstrap_ci([0.1, 0.2], n_boot=0)


def test_paired_bootstrap_constant_gain() -> None:
    rng = np.random.default_rng(4)
    before = rng.uniform(0.2, 0.8, size=50)  # large between-item variance...
    after = before + 0.05  # ...but the same gain on every item
    mean, low, high = paired_bootstrap_ci(after, before, seed=0)
    assert mean == pytest.approx(0.05, abs=1e-12)
    assert low > 0
    assert low == pytest.approx(0.05, abs=1e-12) and high == pytest.approx(0.05, abs=1e-12)
    with pytest.raises(ValueError, match=r"paired"):
        paired_bootstrap_ci([0.1, 0.2], [0.1])


# --------------------------------------------------------------------------------------------------
# Hungarian matching of masks
# --------------------------------------------------------------------------------------------------


def test_hungarian_match_recovers_permutation() -> None:
    rng = np.random.default_rng(5)
    n_pixels, n_gt, n_slots = 4096, 8, 12
    labels = rng.integers(0, n_gt, size=n_pixels)
    true_masks = np.eye(n_gt, dtype=np.float32)[labels].T  # (G, N) one-hot
    perm = rng.permutation(n_slots)
    pred_masks = rng.uniform(0.0, 0.1, size=(n_slots, n_pixels))  # unused slots: near empty
    pred_masks[perm[:n_gt]] = np.clip(
        true_masks + rng.normal(0.0, 0.1, size=true_masks.shape), 0.0, 1.0
    )
    rows, cols = hungarian_match(true_masks, pred_masks)
    np.testing.assert_array_equal(rows, np.arange(n_gt))
    np.testing.assert_array_equal(cols, perm[:n_gt])


def test_hungarian_match_validation() -> None:
    with pytest.raises(ValueError, match=r"G <= K"):
        hungarian_match(np.zeros((3, 10)), np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"same N"):
        hungarian_match(np.zeros((2, 10)), np.zeros((3, 9)))
    with pytest.raises(ValueError, match=r"2-D"):
        hungarian_match(np.zeros((2, 2, 5)), np.zeros((3, 10)))
    with pytest.raises(ValueError, match=r"finite"):
        hungarian_match(np.zeros((1, 4)), np.full((2, 4), np.nan))


# --------------------------------------------------------------------------------------------------
# Input validation of the segmentation metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [ari, fg_ari, matched_miou, segmentation_metrics])
def test_segmentation_input_validation(metric: Callable[[np.ndarray, np.ndarray], object]) -> None:
    good = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(InvalidInputError, match=r"\(4, 4\).*\(4, 5\)"):
        metric(good, np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(ValueError, match=r"2-D.*\(2, 4, 4\)"):
        metric(good, np.zeros((2, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"float32"):
        metric(good, np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"at least one pixel"):
        metric(np.zeros((0, 4), dtype=np.int64), np.zeros((0, 4), dtype=np.int64))
