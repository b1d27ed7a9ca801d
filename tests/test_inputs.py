"""The image door: every accepted input kind gives the same tensor, every bad one a specific error."""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest
import torch

from tta_runtime.errors import InvalidInputError
from tta_runtime.inputs import DEFAULT_MAX_PIXELS, PreparedImage, prepare_image, resize_image, resize_masks

S = 16


def _rgb(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    """A random (h, w, 3) uint8 RGB image."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _check(prepared: PreparedImage, hw: tuple[int, int] = (S, S)) -> torch.Tensor:
    """Shape, dtype, range and device checks shared by every accepted input; returns the tensor."""
    t = prepared.tensor
    assert t.shape == (1, 3, *hw)
    assert t.dtype == torch.float32
    assert t.device.type == "cpu" and t.is_contiguous()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert prepared.original_rgb.dtype == np.uint8
    assert prepared.original_rgb.shape == (*prepared.original_size, 3)
    return t


# ----------------------------------------------------------------------------------------------------
# Accepted inputs


def test_uint8_rgb_keeps_content_and_original():
    img = _rgb()
    p = prepare_image(img, size=S)
    t = _check(p)
    assert p.original_size == (24, 40)
    np.testing.assert_array_equal(p.original_rgb, img)
    expected = cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    np.testing.assert_allclose(t[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_same_size_input_is_not_resized():
    img = _rgb(S, S)
    t = _check(prepare_image(img, size=S))
    np.testing.assert_allclose(t[0].permute(1, 2, 0).numpy(), img / 255.0, atol=1e-6)


def test_bgr_frame_equals_rgb_after_swap():
    img = _rgb()
    rgb = prepare_image(img, size=S)
    bgr = prepare_image(np.ascontiguousarray(img[:, :, ::-1]), size=S, channel_order="bgr")
    torch.testing.assert_close(_check(bgr), rgb.tensor)
    np.testing.assert_array_equal(bgr.original_rgb, img)


def test_gray_is_replicated_for_2d_and_hxwx1():
    gray = _rgb()[:, :, 0]
    for arr in (gray, gray[:, :, None]):
        p = prepare_image(arr, size=S)
        t = _check(p)
        torch.testing.assert_close(t[:, 0], t[:, 1])
        torch.testing.assert_close(t[:, 0], t[:, 2])
        np.testing.assert_array_equal(p.original_rgb, np.repeat(gray[:, :, None], 3, axis=2))


def test_rgba_drops_alpha_and_bgra_swaps():
    img = _rgb()
    alpha = np.random.default_rng(1).integers(0, 256, size=img.shape[:2], dtype=np.uint8)
    rgba = np.dstack([img, alpha])
    bgra = np.dstack([img[:, :, ::-1], alpha])
    reference = prepare_image(img, size=S).tensor
    torch.testing.assert_close(_check(prepare_image(rgba, size=S)), reference)
    torch.testing.assert_close(_check(prepare_image(bgra, size=S, channel_order="bgr")), reference)
    rgba_float = rgba.astype(np.float32) / 255
    assert (_check(prepare_image(rgba_float, size=S)) - reference).abs().max() <= 1 / 255


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_and_uint8_agree_within_one_level(dtype):
    img = _rgb()
    p = prepare_image((img / 255.0).astype(dtype), size=S)
    t = _check(p)
    assert (t - prepare_image(img, size=S).tensor).abs().max() <= 1 / 255
    np.testing.assert_array_equal(p.original_rgb, img)  # round(x * 255) recovers the uint8 image


def test_float_within_tolerance_is_clipped():
    img = np.full((8, 8, 3), 1.0 + 5e-7, dtype=np.float64)
    img[0, 0] = -5e-7
    p = prepare_image(img, size=4)
    assert float(_check(p, (4, 4)).max()) == 1.0
    assert p.original_rgb[0, 0].tolist() == [0, 0, 0] and int(p.original_rgb.min(axis=2)[1:].min()) == 255


def test_uint16_divides_by_65535():
    img = _rgb()
    img16 = img.astype(np.uint16) * 257  # 255 * 257 = 65535
    p = prepare_image(img16, size=S)
    assert (_check(p) - prepare_image(img, size=S).tensor).abs().max() <= 1 / 255
    np.testing.assert_array_equal(p.original_rgb, img)


def test_other_integer_dtypes_in_0_255_are_read_as_uint8():
    img = _rgb()
    torch.testing.assert_close(
        _check(prepare_image(img.astype(np.int64), size=S)), prepare_image(img, size=S).tensor
    )


def test_torch_chw_float_equals_numpy_hwc():
    img = _rgb()
    reference = prepare_image(img, size=S)
    chw = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    for tensor in (chw, chw[None], chw.clone().requires_grad_(True)):
        p = prepare_image(tensor, size=S)
        assert (_check(p) - reference.tensor).abs().max() <= 1 / 255
        np.testing.assert_array_equal(p.original_rgb, img)
        assert not p.tensor.requires_grad


def test_torch_uint8_and_bgr_tensor():
    img = _rgb()
    reference = prepare_image(img, size=S).tensor
    chw_u8 = torch.from_numpy(img).permute(2, 0, 1)
    torch.testing.assert_close(_check(prepare_image(chw_u8, size=S)), reference)
    bgr = chw_u8.flip(0)
    torch.testing.assert_close(_check(prepare_image(bgr, size=S, channel_order="bgr")), reference)


def test_torch_gray_shapes_replicate():
    gray = torch.rand(24, 40)
    outs = [prepare_image(t, size=S).tensor for t in (gray, gray[None], gray[None, None])]
    for t in outs:
        _check(PreparedImage(t, (24, 40), np.zeros((24, 40, 3), np.uint8)))
        torch.testing.assert_close(t, outs[0])
        torch.testing.assert_close(t[:, 0], t[:, 2])


def test_non_square_input_and_size():
    img = _rgb(30, 50)
    p = prepare_image(img, size=(12, 20))
    _check(p, (12, 20))
    assert p.original_size == (30, 50)


def test_mixed_shrink_and_grow_axes():
    # Height grows and width shrinks: a horizontal gradient must stay monotone and in range.
    img = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (4, 1, 3))
    t = _check(prepare_image(img, size=(16, 8)), (16, 8))
    row = t[0, 0, 5].numpy()
    assert np.all(np.diff(row) > 0)


def test_png_file_round_trip(tmp_path: pathlib.Path):
    img = _rgb()
    path = tmp_path / "frame.png"
    assert cv2.imwrite(str(path), img[:, :, ::-1])  # cv2 writes BGR
    reference = prepare_image(img, size=S)
    for given in (path, str(path)):
        p = prepare_image(given, size=S)
        torch.testing.assert_close(_check(p), reference.tensor)
        np.testing.assert_array_equal(p.original_rgb, img)
    # The file defines the channel order; channel_order is ignored for paths.
    torch.testing.assert_close(prepare_image(path, size=S, channel_order="bgr").tensor, reference.tensor)


def test_gray16_and_rgba_png_files(tmp_path: pathlib.Path):
    gray = np.random.default_rng(2).integers(0, 65536, size=(20, 30), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), gray)
    torch.testing.assert_close(
        _check(prepare_image(tmp_path / "g16.png", size=S)), prepare_image(gray, size=S).tensor
    )
    img = _rgb()
    bgra = np.dstack([img[:, :, ::-1], np.full(img.shape[:2], 7, np.uint8)])
    assert cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    torch.testing.assert_close(
        _check(prepare_image(tmp_path / "rgba.png", size=S)), prepare_image(img, size=S).tensor
    )


def test_pil_images():
    pil = pytest.importorskip("PIL.Image")
    img = _rgb()
    reference = prepare_image(img, size=S).tensor
    torch.testing.assert_close(_check(prepare_image(pil.fromarray(img), size=S)), reference)
    torch.testing.assert_close(_check(prepare_image(pil.fromarray(img).convert("RGBA"), size=S)), reference)
    palette_image = pil.fromarray(img).convert("P")  # palette indices must not be read as gray levels
    expected = prepare_image(np.asarray(palette_image.convert("RGB")), size=S).tensor
    torch.testing.assert_close(_check(prepare_image(palette_image, size=S)), expected)


def test_callers_array_is_not_modified_or_aliased():
    for img, order in ((_rgb(), "rgb"), (_rgb(), "bgr"), (_rgb().astype(np.float32) / 255, "rgb")):
        before = img.copy()
        p = prepare_image(img, size=S, channel_order=order)
        np.testing.assert_array_equal(img, before)
        assert not np.shares_memory(p.original_rgb, img)
        p.original_rgb[:] = 0  # writing to the result must not reach the caller's array
        np.testing.assert_array_equal(img, before)


def test_read_only_and_non_contiguous_arrays():
    img = _rgb(48, 80)
    img.flags.writeable = False
    reference = prepare_image(np.ascontiguousarray(img[::2, ::-2]), size=S).tensor
    torch.testing.assert_close(_check(prepare_image(img[::2, ::-2], size=S)), reference)


# ----------------------------------------------------------------------------------------------------
# Refused inputs: InvalidInputError with the key facts in the message


def _refused(image: object, *needles: str, **kwargs: object) -> str:
    with pytest.raises(InvalidInputError) as info:
        prepare_image(image, size=kwargs.pop("size", S), **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_invalid_input_error_is_a_value_error():
    assert issubclass(InvalidInputError, ValueError)


def test_none():
    _refused(None, "None", "HxWxC")


def test_object_array():
    _refused(np.empty((4, 4, 3), dtype=object), "dtype=object", "(4, 4, 3)")


def test_bool_array_and_tensor():
    _refused(np.zeros((4, 4, 3), dtype=bool), "bool", "(4, 4, 3)")
    _refused(torch.zeros(3, 4, 4, dtype=torch.bool), "bool", "(3, 4, 4)")


def test_complex_array_and_tensor():
    _refused(np.zeros((4, 4, 3), dtype=np.complex64), "complex", "(4, 4, 3)")
    _refused(torch.zeros(3, 4, 4, dtype=torch.complex64), "complex")


def test_empty_string_is_not_a_path():
    _refused("", "not a path")


def test_missing_file(tmp_path: pathlib.Path):
    missing = tmp_path / "nope.png"
    _refused(missing, "no such file", str(missing))
    _refused(str(missing), "no such file", str(missing))


def test_directory(tmp_path: pathlib.Path):
    _refused(tmp_path, "directory", str(tmp_path))


def test_corrupt_and_empty_files(tmp_path: pathlib.Path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    _refused(corrupt, str(corrupt), "not a readable image", "PNG, JPEG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    _refused(empty, str(empty), "not a readable image")


@pytest.mark.parametrize("shape", [(10,), (1, 1, 4, 4, 3)])
def test_wrong_ndim(shape):
    _refused(np.zeros(shape, np.uint8), str(shape), "HxWxC")


def test_numpy_batch():
    _refused(np.zeros((1, 8, 8, 3), np.uint8), "(1, 8, 8, 3)", "arr[0]")
    _refused(np.zeros((2, 8, 8, 3), np.uint8), "(2, 8, 8, 3)", "one image")


@pytest.mark.parametrize("channels", [2, 5])
def test_wrong_channel_count(channels):
    _refused(np.zeros((8, 8, channels), np.uint8), f"(8, 8, {channels})", "HxWxC", f"C = {channels}")


def test_channels_first_numpy():
    _refused(np.zeros((3, 32, 32), np.uint8), "(3, 32, 32)", "channels-first", "transpose(1, 2, 0)")


def test_tensor_batch_channels_last_and_bad_channels():
    _refused(torch.rand(2, 3, 8, 8), "(2, 3, 8, 8)", "one image", "batch of 2")
    _refused(torch.rand(8, 8, 3), "(8, 8, 3)", "channels-last", "permute(2, 0, 1)")
    _refused(torch.rand(5, 8, 9), "(5, 8, 9)", "5 channels")
    _refused(torch.rand(3), "(3,)", "1-D")


@pytest.mark.parametrize("shape", [(0, 8, 3), (8, 0, 3), (0, 0)])
def test_empty_arrays(shape):
    _refused(np.zeros(shape, np.uint8), str(shape), "empty")
    _refused(torch.zeros(3, 0, 8), "(3, 0, 8)", "empty")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf(bad):
    img = np.zeros((8, 8, 3), np.float32)
    img[2, 3, 1] = bad
    word = "NaN" if np.isnan(bad) else "Inf"
    _refused(img, word, "(8, 8, 3)", "float32")
    _refused(torch.from_numpy(img).permute(2, 0, 1), word)


def test_float_out_of_range_suggests_dividing_by_255():
    msg = _refused(np.full((8, 8, 3), 200.0, np.float32), "[0, 1]", "255", "float32", "(8, 8, 3)")
    assert "200" in msg


def test_integers_out_of_range():
    img = np.full((8, 8, 3), 300, np.int64)
    _refused(img, "int64", "300", "uint8")
    _refused(img - 400, "-100")


def test_too_many_pixels():
    _refused(np.zeros((20, 20, 3), np.uint8), "max_pixels", "399", "20x20", max_pixels=399)
    _check(prepare_image(np.zeros((20, 20, 3), np.uint8), size=S, max_pixels=400))
    assert DEFAULT_MAX_PIXELS == 4096 * 4096


def test_lists_and_other_objects():
    _refused([[0, 0, 0]], "list", "np.asarray")
    _refused((1, 2, 3), "tuple", "np.asarray")
    _refused(42, "int")
    _refused(b"\x89PNG", "bytes", "imdecode")


def test_bad_arguments():
    _refused(_rgb(), "channel_order", "'rgba'", channel_order="rgba")
    _refused(_rgb(), "size", size=0)
    _refused(_rgb(), "size", size=(16, 16, 3))
    _refused(_rgb(), "max_pixels", max_pixels=0)


# ----------------------------------------------------------------------------------------------------
# resize_masks / resize_image


def _softmax_masks(k: int, h: int, w: int) -> np.ndarray:
    logits = np.random.default_rng(3).normal(size=(k, h, w)).astype(np.float32)
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


@pytest.mark.parametrize("target", [(32, 48), (5, 7), (16, 24), (8, 40)])
def test_resize_masks_is_a_distribution(target):
    out = resize_masks(_softmax_masks(5, 16, 24), target)
    assert out.shape == (5, *target) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out.sum(axis=0) - 1.0).max() < 1e-5


def test_resize_masks_preserves_blocky_argmax():
    labels = np.random.default_rng(4).integers(0, 4, size=(6, 8))
    masks = np.eye(4, dtype=np.float32)[labels].transpose(2, 0, 1)  # (4, 6, 8) one-hot
    got = resize_masks(masks, (24, 32)).argmax(axis=0)
    expected = np.kron(labels, np.ones((4, 4), int))
    # Bilinear weights give a block's own label >= 0.55 everywhere in its 4x4 tile except the four
    # corner pixels (0.39), where diagonal neighbours may win: those may round off, nothing else may.
    corner = np.zeros((4, 4), bool)
    corner[[0, 0, 3, 3], [0, 3, 0, 3]] = True
    keep = ~np.tile(corner, (6, 8))
    np.testing.assert_array_equal(got[keep], expected[keep])
    # Stripes have no corners: the argmax is preserved at every pixel.
    stripe_labels = np.tile(np.arange(8) % 3, (5, 1))  # (5, 8), label depends on the column only
    stripes = np.eye(3, dtype=np.float32)[stripe_labels].transpose(2, 0, 1)  # (3, 5, 8)
    up = resize_masks(stripes, (20, 32)).argmax(axis=0)
    np.testing.assert_array_equal(up, np.kron(stripe_labels, np.ones((4, 4), int)))


def test_resize_masks_fixes_negative_and_all_zero_pixels():
    masks = np.zeros((3, 4, 4), np.float32)
    masks[0, :2] = 1.0
    masks[1, 2:, :2] = -0.5  # clipped to 0; the pixel then has no mass and becomes uniform
    out = resize_masks(masks, (4, 4))
    np.testing.assert_allclose(out[:, 3, 3], 1 / 3, atol=1e-6)
    assert np.abs(out.sum(axis=0) - 1).max() < 1e-5 and out.min() >= 0


def test_resize_masks_and_image_validate():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        resize_masks(np.zeros((4, 4), np.float32), (8, 8))
    with pytest.raises(ValueError, match="size"):
        resize_masks(np.zeros((2, 4, 4), np.float32), (0, 8))
    with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
        resize_image(np.zeros((4, 4, 2), np.float32), (8, 8))


def test_resize_image_float():
    img = np.random.default_rng(5).random((10, 14, 3))
    out = resize_image(img, (20, 28))
    assert out.shape == (20, 28, 3) and out.dtype == np.float32
    assert img.min() - 1e-6 <= out.min() and out.max() <= img.max() + 1e-6
    np.testing.assert_allclose(resize_image(np.full((6, 6, 3), 0.25), (3, 9)), 0.25, atol=1e-6)


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_a_model_size_uint8_batch_is_converted_at_once_bit_for_bit(order):
    """The batch path (one conversion for an (N, S, S, 3) uint8 array) gives what image-by-image gives, owns
    its arrays, and leaves every other batch, and every bad one, to the per-image door."""
    from tta_runtime.config import Preprocessing
    from tta_runtime.inputs import prepare_images, split_batch

    pre = Preprocessing(size=S)
    batch = np.random.default_rng(3).integers(0, 256, (5, S, S, 3), dtype=np.uint8)
    batch[0], batch[1] = 255, 0
    before = batch.copy()
    fast = prepare_images(split_batch(batch), whole=batch, channel_order=order, preprocessing=pre)
    slow = prepare_images(split_batch(batch), channel_order=order, preprocessing=pre)
    for f, s in zip(fast, slow, strict=True):
        assert torch.equal(_check(f), s.tensor) and np.array_equal(f.original_rgb, s.original_rgb)
        assert not np.shares_memory(f.original_rgb, batch)
    assert float(fast[0].tensor.max()) == 1.0 and float(fast[1].tensor.min()) == 0.0
    np.testing.assert_array_equal(batch, before)
    bigger = np.zeros((2, S + 1, S + 1, 3), np.uint8)  # needs a resize: image by image
    assert prepare_images(split_batch(bigger), whole=bigger, preprocessing=pre)[0].tensor.shape == (1, 3, S, S)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        prepare_images(split_batch(batch), whole=batch, preprocessing=pre, max_pixels=S * S - 1)
    with pytest.raises(InvalidInputError, match="channel_order"):
        prepare_images(split_batch(batch), whole=batch, preprocessing=pre, channel_order="hsv")
