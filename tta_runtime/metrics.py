"""Evaluation metrics for slot segmenters, and the mask matching the training loss uses.

What Slot-TTA reports (its evaluation section): ARI with the background
included, FG-ARI with it excluded (both on the argmax of the slot masks), Hungarian-matched mean IoU
and reconstruction MSE. Per-image numbers are averaged over a test set with a bootstrap confidence
interval, and the gain of adaptation is the paired difference after - before on the same images.

Everything here is plain numpy/scipy on CPU: metrics run once per image after the model, so clarity
and exactness beat speed. The one function on a hot path is :func:`hungarian_match` (called per
training image), which stays a single matrix product plus a tiny assignment problem.

Public names: :func:`ari`, :func:`fg_ari`, :func:`matched_miou`, :func:`recon_mse`,
:func:`segmentation_metrics`, :func:`bootstrap_ci`, :func:`paired_bootstrap_ci`,
:func:`hungarian_match`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from tta_runtime.errors import InvalidInputError

__all__ = [
    "ari",
    "bootstrap_ci",
    "fg_ari",
    "hungarian_match",
    "matched_miou",
    "paired_bootstrap_ci",
    "recon_mse",
    "segmentation_metrics",
]

# Bootstrap resamples are drawn in chunks so that memory stays bounded (about 32 MiB of int64
# indices) however many items are resampled.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _check_label_maps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label maps and return them flattened to 1-D int64.

    Args:
        true: (H, W) integer or bool ground-truth instance ids.
        pred: (H, W) integer or bool predicted cluster ids.

    Returns:
        ``(true_flat, pred_flat)``, each (H*W,) int64.

    Raises:
        InvalidInputError (a ValueError): not 2-D, shapes differ, empty, or not integer/bool.
    """
    true_arr = np.asarray(true)
    pred_arr = np.asarray(pred)
    for name, arr in (("true", true_arr), ("pred", pred_arr)):
        if arr.ndim != 2:
            raise InvalidInputError(
                f"{name} must be a 2-D (H, W) label map; got shape {arr.shape} ({arr.ndim}-D). "
                "Take the argmax over slots first for soft masks."
            )
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise InvalidInputError(
                f"{name} must have an integer or bool dtype (label ids); got dtype {arr.dtype}. "
                "Float label maps are refused because rounding would be a silent guess."
            )
    if true_arr.shape != pred_arr.shape:
        raise InvalidInputError(
            f"true and pred must have the same (H, W) shape; got true {true_arr.shape} "
            f"and pred {pred_arr.shape}."
        )
    if true_arr.size == 0:
        raise InvalidInputError(
            f"label maps must contain at least one pixel; got shape {true_arr.shape}."
        )
    return true_arr.reshape(-1).astype(np.int64), pred_arr.reshape(-1).astype(np.int64)


def _contingency(
    true_flat: np.ndarray, pred_flat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two labelings of the same pixels.

    Only the non-zero cells are built: a prediction may use many labels (e.g. one per pixel), and a
    dense G x K table could then be far larger than the image.

    Args:
        true_flat: (N,) int64 labels.
        pred_flat: (N,) int64 labels, same N.

    Returns:
        ``(rows, cols, counts, true_sizes, pred_sizes)``: for each non-empty cell its true-segment
        index, predicted-segment index and pixel count (all int64, same length), then the (G,) pixel
        count of each true segment and the (K,) count of each predicted segment. Segment indices are
        positions in ``np.unique`` order of the labels.
    """
    _, true_idx = np.unique(true_flat, return_inverse=True)
    pred_values, pred_idx = np.unique(pred_flat, return_inverse=True)
    # reshape(-1): some numpy 2.0.x releases return the inverse in the input's shape.
    true_idx = true_idx.reshape(-1).astype(np.int64)
    pred_idx = pred_idx.reshape(-1).astype(np.int64)
    n_pred = np.int64(pred_values.size)
    # One int64 code per (true, pred) pair; at most G*K <= N**2, which int64 holds for any image.
    codes, counts = np.unique(true_idx * n_pred + pred_idx, return_counts=True)
    rows, cols = np.divmod(codes, n_pred)
    true_sizes = np.bincount(true_idx).astype(np.int64)
    pred_sizes = np.bincount(pred_idx).astype(np.int64)
    return rows, cols, counts.astype(np.int64), true_sizes, pred_sizes


# --------------------------------------------------------------------------------------------------
# Segmentation metrics
# --------------------------------------------------------------------------------------------------


def _ari_flat(true_flat: np.ndarray, pred_flat: np.ndarray) -> float:
    """ARI of two 1-D int64 labelings (already validated); see :func:`ari` for the conventions."""
    n = int(true_flat.size)
    if n < 2:
        # No pair of pixels to agree or disagree on: identical partitions (sklearn says so too).
        return 1.0
    _, _, counts, true_sizes, pred_sizes = _contingency(true_flat, pred_flat)
    # Pair confusion matrix over ordered pixel pairs, computed exactly as sklearn's
    # pair_confusion_matrix does so that values match it bit for bit. Every term is <= N**2, which
    # fits int64 (N = 512*512 gives ~6.9e10).
    sum_squares = int(np.sum(counts * counts))
    together_both = sum_squares - n  # tp: same segment in true and in pred
    together_pred_only = int(np.sum(pred_sizes * pred_sizes)) - sum_squares  # fp
    together_true_only = int(np.sum(true_sizes * true_sizes)) - sum_squares  # fn
    apart_both = n * n - together_pred_only - together_true_only - sum_squares  # tn
    tp, fp, fn, tn = together_both, together_pred_only, together_true_only, apart_both
    if fn == 0 and fp == 0:
        # Identical partitions up to relabelling. This also covers the two cases where the ARI
        # formula is 0/0 (both partitions one cluster, or both all singletons).
        return 1.0
    # Python ints: the products reach ~N**4 (~4.7e21 at 512x512), beyond int64.
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def ari(true: np.ndarray, pred: np.ndarray, *, ignore_background: bool = False) -> float:
    """Adjusted Rand Index between a ground-truth instance map and a predicted segmentation.

    Computed from the contingency table over pixels (pair-counting form), with the same arithmetic
    as ``sklearn.metrics.adjusted_rand_score``, whose values it reproduces.

    Args:
        true: (H, W) integer (or bool) instance ids; 0 is the background.
        pred: (H, W) integer (or bool) cluster ids, any labels (e.g. the argmax of the slot masks);
            only which pixels share a label matters.
        ignore_background: if True, only pixels with ``true != 0`` count (FG-ARI, as in Slot
            Attention and Slot-TTA); the prediction on background pixels is then irrelevant.

    Returns:
        The ARI, a float at most 1.0: 1.0 for identical partitions (up to relabelling), about 0.0
        for chance-level agreement, negative (down to -0.5) for worse than chance.

    Degenerate cases (the same conventions as sklearn):
        * Fewer than 2 counted pixels (e.g. FG-ARI on an image with 0 or 1 foreground pixels):
          1.0, there is no pair of pixels to disagree on. A caller averaging FG-ARI over scenes that
          may be empty should filter those scenes out if a free 1.0 would bias the mean.
        * Both partitions put every counted pixel in one cluster (or both put every pixel in its
          own cluster): 1.0, the partitions are identical; the textbook formula is 0/0 here.
        * Only one side is a single cluster (e.g. predicting one segment for a scene with
          several objects): exactly 0.0.

    Raises:
        InvalidInputError (a ValueError): inputs not 2-D, of different shapes, empty, or not of an
        integer/bool dtype.
    """
    true_flat, pred_flat = _check_label_maps(true, pred)
    if ignore_background:
        foreground = true_flat != 0
        true_flat, pred_flat = true_flat[foreground], pred_flat[foreground]
    return _ari_flat(true_flat, pred_flat)


def fg_ari(true: np.ndarray, pred: np.ndarray) -> float:
    """Foreground ARI: :func:`ari` over the pixels where ``true != 0`` only.

    Args:
        true: (H, W) integer instance ids, 0 = background.
        pred: (H, W) integer cluster ids, any labels.

    Returns:
        The FG-ARI (at most 1.0); 1.0 when fewer than 2 foreground pixels exist (see :func:`ari`).
    """
    return ari(true, pred, ignore_background=True)


def _matched_miou_flat(true_flat: np.ndarray, pred_flat: np.ndarray) -> float:
    """Hungarian-matched mIoU of two 1-D int64 labelings (already validated)."""
    rows, cols, counts, true_sizes, pred_sizes = _contingency(true_flat, pred_flat)
    intersection = np.zeros((true_sizes.size, pred_sizes.size), dtype=np.float64)  # (G, K)
    intersection[rows, cols] = counts
    union = true_sizes[:, None] + pred_sizes[None, :] - intersection  # (G, K), >= 1 everywhere
    iou = intersection / union
    matched_rows, matched_cols = linear_sum_assignment(iou, maximize=True)
    # Divide by G, not by the number of matches: a GT segment left unmatched (K < G) scores 0.
    return float(iou[matched_rows, matched_cols].sum() / true_sizes.size)


def matched_miou(true: np.ndarray, pred: np.ndarray) -> float:
    """Hungarian-matched mean IoU over ground-truth segments.

    Every ground-truth segment, the background (id 0) included as one segment, is matched one-to-one
    to a predicted segment so that the total IoU is maximal
    (``scipy.optimize.linear_sum_assignment``); the result is the mean over ground-truth segments of
    the matched IoU.

    Args:
        true: (H, W) integer instance ids, 0 = background (treated like any other segment).
        pred: (H, W) integer cluster ids, any labels.

    Returns:
        Mean matched IoU in [0, 1]; 1.0 for a prediction identical up to relabelling. When the
        prediction has fewer segments than the ground truth, the unmatched ground-truth segments
        count 0; predicted segments left unmatched (more predicted than GT segments) are not
        penalised beyond the IoU they take away from their matched partners.

    Raises:
        InvalidInputError (a ValueError): inputs not 2-D, of different shapes, empty, or not of an
        integer/bool dtype.
    """
    true_flat, pred_flat = _check_label_maps(true, pred)
    return _matched_miou_flat(true_flat, pred_flat)


def segmentation_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All segmentation metrics of one image, validating the inputs once.

    Args:
        true: (H, W) integer instance ids, 0 = background.
        pred: (H, W) integer cluster ids, any labels (the argmax of the slot masks).

    Returns:
        ``{"fg_ari": ..., "ari": ..., "miou": ...}`` with the conventions of :func:`ari` and
        :func:`matched_miou`.
    """
    true_flat, pred_flat = _check_label_maps(true, pred)
    foreground = true_flat != 0
    return {
        "fg_ari": _ari_flat(true_flat[foreground], pred_flat[foreground]),
        "ari": _ari_flat(true_flat, pred_flat),
        "miou": _matched_miou_flat(true_flat, pred_flat),
    }


# --------------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------------


def _as_unit_float(name: str, arr: np.ndarray) -> np.ndarray:
    """Return ``arr`` as float64 on the [0, 1] scale: uint8 divided by 255, floats as they are."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float64)
    raise InvalidInputError(
        f"{name} must be float in [0, 1] or uint8 in [0, 255]; got dtype {arr.dtype}. "
        "Other integer dtypes are refused because their scale is ambiguous."
    )


def recon_mse(image: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean squared error between an image and its reconstruction, on the [0, 1] pixel scale.

    Args:
        image: (H, W, 3) float in [0, 1], or uint8 in [0, 255] (divided by 255).
        reconstruction: (H, W, 3) float (the decoder output is not clamped, so values slightly
            outside [0, 1] are taken as they are), or uint8 (divided by 255).

    Returns:
        The mean over all H*W*3 values of the squared difference, as a float (nan if an input holds
        nan, so that a diverged reconstruction is visible rather than hidden).

    Note:
        The Slot-TTA model sees pixels / 256, not / 255. To score the loss the model minimised
        exactly, pass the float image the model was given rather than the uint8 original.

    Raises:
        InvalidInputError (a ValueError): shapes differ or are not (H, W, 3), or an unsupported
        dtype.
    """
    image_arr = np.asarray(image)
    recon_arr = np.asarray(reconstruction)
    for name, arr in (("image", image_arr), ("reconstruction", recon_arr)):
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.size == 0:
            raise InvalidInputError(
                f"{name} must have shape (H, W, 3) with H, W >= 1; got {arr.shape}."
            )
    if image_arr.shape != recon_arr.shape:
        raise InvalidInputError(
            f"image and reconstruction must have the same shape; got image {image_arr.shape} "
            f"and reconstruction {recon_arr.shape}."
        )
    diff = _as_unit_float("image", image_arr) - _as_unit_float("reconstruction", recon_arr)
    return float(np.mean(diff * diff))


# --------------------------------------------------------------------------------------------------
# Confidence intervals over a test set
# --------------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of the mean of per-item values.

    Items (e.g. per-image FG-ARI) are resampled with replacement ``n_boot`` times; the interval is
    given by the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled means.

    Args:
        values: (n,) finite per-item values, n >= 1.
        n_boot: number of bootstrap resamples, >= 1.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling generator; the same values and seed give the same interval.

    Returns:
        ``(mean, low, high)``: the sample mean of ``values`` and the interval bounds. A single value
        v gives ``(v, v, v)``.

    Raises:
        InvalidInputError (a ValueError): ``values`` is empty, not 1-D or not finite, or
        ``n_boot`` / ``confidence`` is out of range.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise InvalidInputError(
            f"values must be a 1-D sequence of per-item numbers; got shape {arr.shape}."
        )
    if arr.size == 0:
        raise InvalidInputError("bootstrap_ci needs at least one value; got an empty sequence.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InvalidInputError(f"values must be finite; got {bad} nan/inf of {arr.size} values.")
    if n_boot < 1:
        raise InvalidInputError(f"n_boot must be >= 1; got {n_boot}.")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be in (0, 1); got {confidence}.")

    mean = float(arr.mean())
    n = arr.size
    if n == 1:
        return mean, mean, mean

    rng = np.random.default_rng(seed)
    boot_means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n) resampled item indices
        boot_means[start:stop] = arr[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(boot_means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean, float(low), float(high)


def paired_bootstrap_ci(
    after: Sequence[float] | np.ndarray,
    before: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Bootstrap confidence interval of the mean paired difference ``after - before``.

    Items are resampled as pairs (the same image before and after adaptation), which removes the
    between-image variance that an unpaired comparison would carry.

    Args:
        after: (n,) per-item values after adaptation.
        before: (n,) per-item values before adaptation, same items in the same order.
        n_boot, confidence, seed: as in :func:`bootstrap_ci`.

    Returns:
        ``(mean_diff, low, high)``; ``low > 0`` means a gain at the given confidence.

    Raises:
        InvalidInputError (a ValueError): the two sequences differ in shape, or any error of
        :func:`bootstrap_ci`.
    """
    after_arr = np.asarray(after, dtype=np.float64)
    before_arr = np.asarray(before, dtype=np.float64)
    if after_arr.shape != before_arr.shape:
        raise InvalidInputError(
            f"after and before must be paired per item (same shape); got after {after_arr.shape} "
            f"and before {before_arr.shape}."
        )
    return bootstrap_ci(after_arr - before_arr, n_boot=n_boot, confidence=confidence, seed=seed)


# --------------------------------------------------------------------------------------------------
# Mask matching for the training loss
# --------------------------------------------------------------------------------------------------


def hungarian_match(
    true_masks: np.ndarray, pred_masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Match ground-truth masks one-to-one to predicted masks, as Slot-TTA's mask loss does.

    The cost of a pair is the squared L2 distance between the two masks; the assignment minimises
    the summed cost (``scipy.optimize.linear_sum_assignment``). The distance matrix is one matrix
    product, ||t||^2 + ||p||^2 - 2 t.p, so a G=8, K=12, N=4096 call takes well under a millisecond.

    Args:
        true_masks: (G, N) binary ground-truth masks (float or bool), one row per segment with the
            background as one segment, N = H*W flattened pixels. Pass detached CPU arrays
            (``tensor.detach().cpu().numpy()``).
        pred_masks: (K, N) soft predicted masks, float in [0, 1]; K >= G.

    Returns:
        ``(rows, cols)``: (G,) int arrays; ``rows`` is ``0..G-1`` in order and ground-truth mask
        ``rows[i]`` is matched to predicted mask ``cols[i]``.

    Raises:
        InvalidInputError (a ValueError): not 2-D, different N, G > K, non-numeric or non-finite
        values.
    """
    true_arr = np.asarray(true_masks)
    pred_arr = np.asarray(pred_masks)
    for name, arr in (("true_masks", true_arr), ("pred_masks", pred_arr)):
        if arr.ndim != 2:
            raise InvalidInputError(f"{name} must be 2-D (masks, pixels); got shape {arr.shape}.")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise InvalidInputError(f"{name} must be numeric or bool; got dtype {arr.dtype}.")
    if true_arr.shape[1] != pred_arr.shape[1]:
        raise InvalidInputError(
            f"true_masks (G, N) and pred_masks (K, N) must have the same N; got true_masks "
            f"{true_arr.shape} and pred_masks {pred_arr.shape}."
        )
    if true_arr.shape[0] > pred_arr.shape[0]:
        raise InvalidInputError(
            f"need at least as many predicted masks as ground-truth masks (G <= K) so that every "
            f"ground-truth mask is matched; got G={true_arr.shape[0]}, K={pred_arr.shape[0]}. "
            "Use more slots or fewer ground-truth segments."
        )
    true64 = true_arr.astype(np.float64)
    pred64 = pred_arr.astype(np.float64)
    if not (np.all(np.isfinite(true64)) and np.all(np.isfinite(pred64))):
        raise InvalidInputError("true_masks and pred_masks must be finite; got nan or inf.")
    cost = (
        np.einsum("gn,gn->g", true64, true64)[:, None]
        + np.einsum("kn,kn->k", pred64, pred64)[None, :]
        - 2.0 * (true64 @ pred64.T)
    )  # (G, K) squared L2 distances
    rows, cols = linear_sum_assignment(cost)
    return rows, cols
