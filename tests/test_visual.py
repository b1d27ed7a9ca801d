"""Pictures: overlay colours and outlines, palette, mask tiles, loss curve, PNG round trip, panel layout."""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest

from tta_runtime.errors import ConfigError

from tta_runtime.visual import loss_curve, mask_grid, overlay_masks, palette, panel, save_png


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 20x30 RGB image and (3, 20, 30) soft masks: slot 0 background, slot 1 left box, slot 2 right box."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    labels = np.zeros((20, 30), int)
    labels[4:12, 3:10] = 1
    labels[8:18, 15:27] = 2
    masks = np.full((3, 20, 30), 0.1, np.float32)
    masks[labels, np.arange(20)[:, None], np.arange(30)[None, :]] = 0.8  # argmax = labels, sums to 1
    return image, masks, labels


def test_overlay_colour_is_the_blend_with_the_argmax_slot():
    image, masks, labels = _scene()
    alpha = 0.4
    out = overlay_masks(image, masks, alpha=alpha, outlines=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    colours = palette(3)
    expected = (1 - alpha) * image.astype(np.float64) + alpha * colours[labels].astype(np.float64)
    assert np.abs(out.astype(np.float64) - expected).max() <= 0.5 + 1e-4
    # One pixel per slot, written out: interior pixels of each region.
    for (y, x), j in (((1, 1), 0), ((7, 6), 1), ((12, 20), 2)):
        assert labels[y, x] == j
        want = np.round((1 - alpha) * image[y, x] + alpha * colours[j].astype(float))
        np.testing.assert_allclose(out[y, x], want, atol=1)


def test_overlay_outlines_on_boundaries_only():
    image, masks, labels = _scene()
    plain = overlay_masks(image, masks, outlines=False)
    out = overlay_masks(image, masks)  # outlines on by default
    changed = np.any(out != plain, axis=2)
    # Left box: its right edge (x = 9, boundary with x = 10) and the row above it (y = 3) are outlined.
    assert (out[5:11, 9] == 255).all() and (out[3, 4:9] == 255).all()
    # Interior and far-background pixels are untouched; outlines only where a neighbour differs.
    assert not changed[6:10, 5:8].any() and not changed[0:2, :].any()
    neighbour_differs = np.zeros_like(changed)
    neighbour_differs[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    neighbour_differs[:-1] |= labels[:-1] != labels[1:]
    assert (out[neighbour_differs] == 255).all()
    assert not changed[~neighbour_differs].any()


def test_overlay_alpha_extremes_and_validation():
    image, masks, labels = _scene()
    np.testing.assert_array_equal(overlay_masks(image, masks, alpha=0.0, outlines=False), image)
    np.testing.assert_array_equal(overlay_masks(image, masks, alpha=1.0, outlines=False), palette(3)[labels])
    with pytest.raises(ValueError, match=r"\(3, 10, 30\)"):
        overlay_masks(image, masks[:, :10], outlines=False)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        overlay_masks(image.astype(np.float32), masks)
    with pytest.raises(ValueError, match="alpha"):
        overlay_masks(image, masks, alpha=1.5)


def test_palette_is_fixed_distinct_and_prefix_stable():
    for k in (1, 12, 13, 64, 256):
        colours = palette(k)
        assert colours.shape == (k, 3) and colours.dtype == np.uint8
        assert len({tuple(c) for c in colours}) == k
    np.testing.assert_array_equal(palette(40)[:12], palette(12))
    np.testing.assert_array_equal(palette(40), palette(40))
    # The hand-picked colours are far apart, and none is white (the outline colour).
    base = palette(12).astype(int)
    distances = np.abs(base[:, None] - base[None]).sum(-1) + np.eye(12, dtype=int) * 999
    assert distances.min() >= 60
    assert not (palette(256) == 255).all(axis=1).any()
    assert palette(0).shape == (0, 3)
    with pytest.raises(ValueError):
        palette(-1)


def test_mask_grid_tiles():
    _, masks, _ = _scene()
    grid = mask_grid(masks)
    assert grid.shape == (20, 3 * 30 + 2 * 2, 3) and grid.dtype == np.uint8
    tile1 = grid[:, 32:62]
    np.testing.assert_array_equal(tile1[..., 0], tile1[..., 2])  # grayscale
    np.testing.assert_array_equal(tile1[..., 0], np.round(masks[1] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\(20, 30\)"):
        mask_grid(masks[0])


def test_loss_curve_draws_a_line():
    losses = [1.0, 0.7, 0.5, 0.4, 0.35, 0.3]
    img = loss_curve(losses, size=(120, 200), title="recon")
    assert img.shape == (120, 200, 3) and img.dtype == np.uint8
    r, b = img[..., 0].astype(int), img[..., 2].astype(int)
    line_pixels = b - r > 80  # the line is blue; background, box and labels are gray
    assert line_pixels.sum() > 50
    # The line goes down: its leftmost pixels sit higher (smaller y) than its rightmost ones.
    ys, xs = np.nonzero(line_pixels)
    assert ys[xs <= xs.min() + 3].mean() < ys[xs >= xs.max() - 3].mean()
    # Labels and axes are drawn in dark ink.
    assert (img.sum(axis=2) < 200).sum() > 50


def test_loss_curve_edge_cases():
    for losses in ([], [0.5], [0.5, 0.5, 0.5], [1.0, float("nan"), 0.5, float("inf"), 0.2], [float("nan")]):
        img = loss_curve(losses)
        assert img.shape == (160, 320, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="size"):
        loss_curve([1.0], size=(10, 10))


def test_save_png_round_trip(tmp_path: pathlib.Path):
    image, _, _ = _scene()
    path = save_png(tmp_path / "deep" / "dir" / "x.png", image)
    assert path == tmp_path / "deep" / "dir" / "x.png" and path.is_file()
    back = cv2.imread(str(path), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(back[:, :, ::-1], image)


def test_save_png_errors(tmp_path: pathlib.Path):
    image, _, _ = _scene()
    with pytest.raises(ValueError, match="png"):
        save_png(tmp_path / "x.jpg", image)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="Not a directory"):  # a typed error, and nothing written
        save_png(blocker / "x.png", image)
    assert blocker.read_text() == "not a directory"
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ConfigError, match="refusing to replace"):
        save_png(tmp_path / "d.png", image)
    with pytest.raises(ValueError, match=r"\(20, 30\)"):
        save_png(tmp_path / "y.png", image[:, :, 0])


def test_panel_dimensions_and_placement():
    a = np.full((20, 30, 3), (200, 0, 0), np.uint8)
    b = np.full((10, 50, 3), (0, 0, 200), np.uint8)
    out = panel([("a", a), ("b", b)], scale=2)
    assert out.dtype == np.uint8 and out.ndim == 3
    # Widths: margins 8 + 60 + 8 + 100 + 8; height: margins + caption band + tallest tile (40).
    assert out.shape[1] == 8 + 60 + 8 + 100 + 8
    assert out.shape[0] > 8 + 40 + 8
    red = np.all(out == (200, 0, 0), axis=2)
    blue = np.all(out == (0, 0, 200), axis=2)
    assert red.sum() == 40 * 60 and blue.sum() == 20 * 100
    # Tiles are top-aligned, below the captions; caption ink sits above the tiles.
    assert np.nonzero(red)[0].min() == np.nonzero(blue)[0].min()
    assert (out[: np.nonzero(red)[0].min()].sum(axis=2) < 300).any()


def test_panel_wide_caption_and_validation():
    tiny = np.zeros((4, 4, 3), np.uint8)
    out = panel([("a caption far wider than the tile", tiny)])
    assert out.shape[1] > 4 + 16  # the column grows to fit its caption
    assert panel([("gray", np.zeros((5, 6), np.uint8))]).ndim == 3
    with pytest.raises(ValueError):
        panel([])
    with pytest.raises(ValueError, match="scale"):
        panel([("a", tiny)], scale=0)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        panel([("a", np.zeros((4, 4), np.float32))])


def test_line_plot_draws_each_series_in_its_colour_and_refuses_bad_input():
    from tta_runtime.visual import line_plot, palette

    img = line_plot({"a": [0.0, 1.0, 0.5], "bb": [0.2, 0.2, 0.9]}, size=(160, 320), title="t", x_label="x")
    assert img.shape == (160, 320, 3) and img.dtype == np.uint8
    for colour in palette(2):
        assert (np.abs(img.astype(int) - colour.astype(int)).sum(axis=2) < 30).sum() > 20  # each line is drawn
    with pytest.raises(ValueError, match="finite"):
        line_plot({"a": [0.0, float("nan")]})
    with pytest.raises(ValueError, match="at least one"):
        line_plot({})
