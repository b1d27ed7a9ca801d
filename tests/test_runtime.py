"""The Runtime's public door: the Result contract, the OOD score, every input kind (good and bad), config
errors, devices, and loading a model folder.

The shared `runtime` is the default shipped model in episodic mode; tests that could change its weights
check them against `source_state` afterwards.
"""

from __future__ import annotations

import json
import pathlib

import cv2
import numpy as np
import pytest
import torch

import tta_runtime

H, W = 40, 56  # a non-square input, neither side the model's size


def non_square(image: np.ndarray) -> np.ndarray:
    """`image` resized to (H, W, 3) uint8."""
    return cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR)


def check_result(res: tta_runtime.Result, hw: tuple[int, int], num_slots: int) -> None:
    """Every documented shape, dtype and range of a Result for an input of size `hw`."""
    assert res.masks.shape == (num_slots, *hw) and res.masks.dtype == np.float32
    assert res.masks.min() >= 0.0 and res.masks.max() <= 1.0
    np.testing.assert_allclose(res.masks.sum(axis=0), 1.0, atol=1e-5)
    assert res.segmentation.shape == hw and res.segmentation.dtype == np.int64
    assert np.array_equal(res.segmentation, res.masks.argmax(axis=0))
    assert res.reconstruction.shape == (*hw, 3) and res.reconstruction.dtype == np.float32
    assert res.reconstruction.min() >= 0.0 and res.reconstruction.max() <= 1.0
    assert isinstance(res.ood_score, float) and np.isfinite(res.ood_score)
    assert res.num_slots == num_slots


# ----------------------------------------------------------------------------------------------------
# The Result contract


@pytest.mark.parametrize("call", ["predict", "adapt_and_predict"])
def test_result_is_at_the_inputs_own_non_square_resolution(runtime, ood_image, call):
    image = non_square(ood_image)
    res = runtime.predict(image) if call == "predict" else runtime.adapt_and_predict(image, steps=2)
    check_result(res, (H, W), runtime.card.segmenter.num_slots)
    assert np.array_equal(res.image, image)
    assert res.model == runtime.name == "slot-shapes-32"
    assert res.device == "cpu" and res.backend == "torch"


def test_square_input_at_model_size_keeps_its_size(runtime, ood_image):
    res = runtime.adapt_and_predict(ood_image, steps=2)
    s = runtime.input_size
    check_result(res, (s, s), runtime.card.segmenter.num_slots)


def test_predict_has_no_adaptation_report(runtime, ood_image):
    res = runtime.predict(ood_image)
    assert res.adaptation is None
    assert res.to_dict()["adaptation"] is None


def test_to_dict_is_json_and_carries_the_adaptation_report(runtime, ood_image):
    res = runtime.adapt_and_predict(non_square(ood_image), steps=2)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["image_size"] == [H, W]
    assert d["num_slots"] == runtime.card.segmenter.num_slots
    assert d["slots_used"] >= 1 and d["slots_used"] <= d["num_slots"]
    expected_scorer = runtime.calibration.scorer if runtime.calibration is not None else "recon_mse_z"
    assert d["ood_score"] == res.ood_score and d["ood_scorer"] == expected_scorer
    report = d["adaptation"]
    assert report["recipe"] == "slot_tta" and report["method"] == "slot_reconstruction"
    assert report["steps_requested"] == 2 and report["steps_run"] == 2 and len(report["losses"]) == 2
    assert report["final_loss"] == res.adaptation.final_loss
    with_arrays = json.loads(json.dumps(res.to_dict(arrays=True)))
    assert np.array_equal(np.asarray(with_arrays["segmentation"]), res.segmentation)


def test_overlay_is_an_rgb_picture_of_the_input_size(runtime, ood_image):
    image = non_square(ood_image)
    over = runtime.predict(image).overlay()
    assert over.shape == (H, W, 3) and over.dtype == np.uint8
    assert not np.array_equal(over, image)  # the slots are drawn on it


def test_ood_score_is_the_z_score_of_the_reconstruction_error(runtime, ood_image):
    res = runtime.predict(ood_image)
    if runtime.calibration is not None:  # the shipped calibration's recon_error scorer: fitted mean and std
        assert runtime.calibration.scorer == "recon_error"
        mean, std = (float(runtime.calibration.state[k]) for k in ("mean", "std"))
    else:
        mean, std = runtime.card.ood.recon_mse_mean, runtime.card.ood.recon_mse_std
    assert res.ood_score == pytest.approx((res.recon_mse - mean) / std, rel=1e-5)


def test_ood_score_is_the_same_before_and_after_adaptation(runtime, ood_image):
    # The score describes the input as the loaded model sees it, not the adapted model.
    assert runtime.adapt_and_predict(ood_image, steps=3).ood_score == runtime.predict(ood_image).ood_score


def test_textured_backgrounds_score_more_out_of_distribution_than_training_scenes(runtime, scene):
    ood = [runtime.predict(scene("textured_background", i)).ood_score for i in range(8)]
    ind = [runtime.predict(scene("in_dist", i)).ood_score for i in range(8)]
    assert np.mean(ood) > np.mean(ind)


# ----------------------------------------------------------------------------------------------------
# Accepted input kinds


def _as_file(image: np.ndarray, tmp_path: pathlib.Path) -> str:
    path = tmp_path / "scene.png"
    assert cv2.imwrite(str(path), image[..., ::-1])  # OpenCV writes BGR
    return str(path)


GOOD_INPUTS = {
    "uint8_rgb": lambda img, tmp: img,
    "gray_hw": lambda img, tmp: img.mean(axis=2).astype(np.uint8),
    "gray_hw1": lambda img, tmp: img.mean(axis=2, keepdims=True).astype(np.uint8),
    "rgba": lambda img, tmp: np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]),
    "float_unit": lambda img, tmp: img.astype(np.float32) / 255,
    "uint16": lambda img, tmp: img.astype(np.uint16) * 257,
    "int64_8bit": lambda img, tmp: img.astype(np.int64),
    "tensor_chw": lambda img, tmp: torch.from_numpy(img).permute(2, 0, 1).float() / 255,
    "tensor_1chw": lambda img, tmp: torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255,
    "tensor_uint8": lambda img, tmp: torch.from_numpy(img).permute(2, 0, 1).contiguous(),
    "file_str": lambda img, tmp: _as_file(img, tmp),
    "file_path": lambda img, tmp: pathlib.Path(_as_file(img, tmp)),
}

# Kinds that carry exactly the same pixels as the uint8 RGB image give the same masks, bit for bit; the
# float and 16-bit kinds carry the same picture but are resized at their own precision, so nearly the same.
SAME_PIXELS = {"uint8_rgb", "rgba", "int64_8bit", "tensor_uint8", "file_str", "file_path"}
SAME_PICTURE = {"float_unit", "uint16", "tensor_chw", "tensor_1chw"}


CALLS = {
    "predict": lambda rt, x: rt.predict(x),
    "adapt_and_predict": lambda rt, x: rt.adapt_and_predict(x, steps=1),
}


@pytest.fixture(scope="module")
def reference_masks(runtime, ood_image) -> dict[str, np.ndarray]:
    """Masks of the non-square uint8 RGB image, per call, to compare the other input kinds with."""
    return {call: run(runtime, non_square(ood_image)).masks for call, run in CALLS.items()}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("kind", list(GOOD_INPUTS))
def test_every_input_kind_gives_masks_at_its_size(runtime, ood_image, reference_masks, tmp_path, kind, call):
    given = GOOD_INPUTS[kind](non_square(ood_image), tmp_path)
    res = CALLS[call](runtime, given)
    check_result(res, (H, W), runtime.card.segmenter.num_slots)
    if kind in SAME_PIXELS:
        np.testing.assert_array_equal(res.masks, reference_masks[call])
    elif kind in SAME_PICTURE:  # <= half a grey level apart; Adam's normalised first step amplifies that a little
        np.testing.assert_allclose(res.masks, reference_masks[call], atol=1e-2 if call == "predict" else 5e-2)
        assert (res.masks.argmax(0) == reference_masks[call].argmax(0)).mean() > 0.98


@pytest.mark.parametrize("call", ["predict", "adapt_and_predict"])
def test_bgr_input_with_channel_order_bgr_equals_rgb(runtime, ood_image, call):
    run = runtime.predict if call == "predict" else (lambda x, **kw: runtime.adapt_and_predict(x, steps=2, **kw))
    rgb = run(ood_image)
    bgr = run(np.ascontiguousarray(ood_image[..., ::-1]), channel_order="bgr")
    assert np.array_equal(rgb.masks, bgr.masks)
    assert np.array_equal(bgr.image, ood_image)  # the result keeps the RGB picture


def test_bgr_input_read_as_rgb_is_a_different_image(runtime, ood_image):
    swapped = runtime.predict(np.ascontiguousarray(ood_image[..., ::-1]))
    assert not np.array_equal(swapped.masks, runtime.predict(ood_image).masks)


# ----------------------------------------------------------------------------------------------------
# Refused inputs: InvalidInputError naming what was received, for both calls, state untouched


def _corrupt_png(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "corrupt.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return str(path)


def _with(value: float) -> np.ndarray:
    img = np.full((8, 8, 3), 0.5, np.float32)
    img[3, 4, 1] = value
    return img


# name: (make(tmp_path), a piece of the message that shows what was received)
BAD_INPUTS = {
    "none": (lambda tmp: None, "None"),
    "object_array": (lambda tmp: np.full((8, 8, 3), None, dtype=object), "dtype=object"),
    "one_d": (lambda tmp: np.zeros(10, np.uint8), "shape=(10,)"),
    "five_d": (lambda tmp: np.zeros((1, 1, 8, 8, 3), np.uint8), "shape=(1, 1, 8, 8, 3)"),
    "two_channels": (lambda tmp: np.zeros((8, 8, 2), np.uint8), "shape=(8, 8, 2)"),
    "empty": (lambda tmp: np.zeros((0, 10, 3), np.uint8), "shape=(0, 10, 3)"),
    "nan": (lambda tmp: _with(np.nan), "NaN"),
    "inf": (lambda tmp: _with(np.inf), "Inf"),
    "float_0_255": (lambda tmp: _with(200.0), "200"),
    "complex": (lambda tmp: np.zeros((8, 8, 3), np.complex64), "complex64"),
    "bool": (lambda tmp: np.zeros((8, 8, 3), bool), "dtype=bool"),
    "int64_over_255": (lambda tmp: np.full((8, 8, 3), 300, np.int64), "300"),
    "chw_numpy": (lambda tmp: np.zeros((3, 32, 32), np.uint8), "shape=(3, 32, 32)"),
    "empty_batch": (lambda tmp: np.zeros((0, 32, 32, 3), np.uint8), "at least one image"),
    "bad_image_in_batch": (lambda tmp: [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 2), np.uint8)], "image 1 of the batch"),
    "hwc_tensor": (lambda tmp: torch.zeros(32, 32, 3), "shape=(32, 32, 3)"),
    "bool_tensor": (lambda tmp: torch.zeros(3, 8, 8, dtype=torch.bool), "torch.bool"),
    "missing_file": (lambda tmp: str(tmp / "nope.png"), "nope.png"),
    "corrupt_file": (lambda tmp: _corrupt_png(tmp), "corrupt.png"),
    "directory": (lambda tmp: str(tmp), "directory"),
    "not_a_path": (lambda tmp: "a cat on a mat", "a cat on a mat"),
    "empty_string": (lambda tmp: "", "''"),
    "list": (lambda tmp: [[0, 0, 0]], "list"),
    "bytes": (lambda tmp: b"\x89PNG", "bytes"),
    "dict": (lambda tmp: {"image": 1}, "dict"),
}


@pytest.mark.parametrize("call", ["predict", "adapt_and_predict"])
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_invalid_input_and_leaves_the_runtime_intact(
    runtime, source_state, state, ood_image, tmp_path, kind, call
):
    make, shown = BAD_INPUTS[kind]
    with pytest.raises(tta_runtime.InvalidInputError) as err:
        getattr(runtime, call)(make(tmp_path))
    assert shown in str(err.value)
    state.assert_bit_exact(runtime.model, source_state)
    state.assert_all_require_grad(runtime.model)
    assert runtime.predict(ood_image).masks.shape[0] == runtime.card.segmenter.num_slots


@pytest.mark.parametrize("call", ["predict", "adapt_and_predict"])
def test_a_batch_gives_one_result_per_image_equal_to_single_calls(runtime, source_state, state, ood_image, call):
    other = np.ascontiguousarray(ood_image[::-1])
    kw = {"steps": 2} if call == "adapt_and_predict" else {}
    singles = [getattr(runtime, call)(im, **kw) for im in (ood_image, other)]
    for batch in (np.stack([ood_image, other]), [ood_image, other], torch.from_numpy(np.stack([ood_image, other])).permute(0, 3, 1, 2)):
        results = getattr(runtime, call)(batch, **kw)
        assert isinstance(results, list) and len(results) == 2
        for res, single in zip(results, singles):
            np.testing.assert_allclose(res.masks, single.masks, atol=1e-5)
            assert res.ood_score == pytest.approx(single.ood_score, abs=1e-5)
    assert isinstance(getattr(runtime, call)(ood_image[None], **kw), list)  # numpy (1, H, W, C) is a batch of one
    state.assert_bit_exact(runtime.model, source_state)


@pytest.mark.parametrize("call", ["predict", "adapt_and_predict"])
def test_image_over_max_pixels_is_refused(ood_image, call):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", max_pixels=100)
    with pytest.raises(tta_runtime.InvalidInputError, match=r"32x32 = 1024 pixels .* max_pixels = 100"):
        getattr(rt, call)(ood_image)
    assert rt.predict(ood_image[:10, :10]).masks.shape[1:] == (10, 10)  # 100 pixels is still fine


def test_bad_channel_order_is_refused(runtime, ood_image):
    with pytest.raises(tta_runtime.InvalidInputError, match="'rbg'"):
        runtime.adapt_and_predict(ood_image, channel_order="rbg", steps=2)


def test_invalid_input_error_is_a_value_error_and_a_runtime_error():
    assert issubclass(tta_runtime.InvalidInputError, ValueError)
    assert issubclass(tta_runtime.InvalidInputError, tta_runtime.TTARuntimeError)


# ----------------------------------------------------------------------------------------------------
# Config errors


def test_unknown_option_at_load_names_it_and_the_valid_ones():
    with pytest.raises(tta_runtime.ConfigError) as err:
        tta_runtime.Runtime.from_pretrained("slot-shapes-32", stpes=3)
    msg = str(err.value)
    assert "stpes" in msg
    for valid in ("device", "max_pixels", "mode", "steps", "lr", "params"):
        assert valid in msg


def test_unknown_option_in_a_call_names_it_and_the_valid_ones(runtime, ood_image):
    with pytest.raises(tta_runtime.ConfigError) as err:
        runtime.adapt_and_predict(ood_image, learning_rate=1e-3)
    msg = str(err.value)
    assert "learning_rate" in msg and "lr" in msg and "steps" in msg


def test_runtime_only_option_in_a_call_is_refused(runtime, ood_image):
    # device / max_pixels belong to the runtime; a call cannot change them.
    with pytest.raises(tta_runtime.ConfigError, match="max_pixels"):
        runtime.adapt_and_predict(ood_image, max_pixels=10)


BAD_VALUES = [
    ("steps", -1),
    ("lr", 0),
    ("lr", 100.0),
    ("params", "bogus"),
    ("params", "re:(unclosed"),
    ("optimizer", "lbfgs"),
    ("momentum", 1.0),
    ("pixel_fraction", 0.0),
    ("early_stop_patience", 0),
    ("mode", "sometimes"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_at_load_names_the_field_and_value(field, value):
    with pytest.raises(tta_runtime.ConfigError) as err:
        tta_runtime.Runtime.from_pretrained("slot-shapes-32", **{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_in_a_call_names_the_field_and_value(runtime, source_state, state, ood_image, field, value):
    with pytest.raises(tta_runtime.ConfigError) as err:
        runtime.adapt_and_predict(ood_image, **{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)
    state.assert_bit_exact(runtime.model, source_state)


@pytest.mark.parametrize("where", ["load", "call"])
def test_unknown_recipe_lists_the_known_ones_and_suggests_the_closest(runtime, ood_image, where):
    with pytest.raises(tta_runtime.UnknownNameError) as err:
        if where == "load":
            tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_ta")
        else:
            runtime.adapt_and_predict(ood_image, recipe="slot_ta")
    msg = str(err.value)
    assert "'slot_ta'" in msg
    assert all(name in msg for name in tta_runtime.list_recipes())
    assert "did you mean 'slot_tta'" in msg


def test_shipped_recipes_are_listed_and_load(runtime):
    assert {"slot_tta", "slot_tta_fast", "entropy"} <= set(tta_runtime.list_recipes())
    fast = tta_runtime.load_recipe("slot_tta_fast")
    faithful = tta_runtime.load_recipe("slot_tta")
    # The fast preset freezes the encoder, decodes a subset of pixels and takes fewer steps than the paper's.
    assert fast.name == "slot_tta_fast" and fast.params == "no_encoder" and fast.pixel_fraction < 1
    assert fast.steps < faithful.steps == 150
    assert runtime.recipe.name == "slot_tta"  # the fixture's; the card's default is the one a plain load gets
    assert tta_runtime.Runtime.from_pretrained("slot-shapes-32").recipe.name == runtime.card.default_recipe == "slot_tta_fast"


def test_load_overrides_become_the_runtimes_recipe(ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="entropy", steps=2, lr=1e-3)
    assert (rt.recipe.name, rt.recipe.steps, rt.recipe.lr) == ("entropy", 2, 1e-3)
    report = rt.adapt_and_predict(ood_image).adaptation
    assert report.recipe == "entropy" and report.method == "slot_mask_entropy" and report.steps_run == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_an_error_not_a_fallback():
    with pytest.raises(tta_runtime.ConfigError, match="'cuda'.*not available"):
        tta_runtime.Runtime.from_pretrained("slot-shapes-32", device="cuda")


@pytest.mark.parametrize("device", ["banana", "tpu"])
def test_unknown_device_is_a_config_error(device):
    with pytest.raises(tta_runtime.ConfigError, match=device):
        tta_runtime.Runtime.from_pretrained("slot-shapes-32", device=device)


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(tta_runtime.UnknownNameError, match="did you mean 'slot-shapes-32'"):
        tta_runtime.Runtime.from_pretrained("slot-shape-32")


# ----------------------------------------------------------------------------------------------------
# Loading a model folder (the tiny random model)


def test_tiny_model_folder_loads_and_segments(tiny_model_dir, ood_image):
    rt = tta_runtime.Runtime.from_pretrained(tiny_model_dir, steps=2)
    assert rt.name == "tiny-test" and rt.input_size == 16
    res = rt.adapt_and_predict(non_square(ood_image))
    check_result(res, (H, W), num_slots=3)
    # No OOD stats in the card: the score is the raw reconstruction error of the input before adaptation.
    assert res.ood_scorer == "recon_mse"
    assert res.ood_score == pytest.approx(rt.predict(non_square(ood_image)).recon_mse, rel=1e-5)


def test_tiny_model_loads_by_card_and_by_weights_path(tiny_model_dir, state):
    by_folder = tta_runtime.Runtime.from_pretrained(tiny_model_dir)
    for path in (tiny_model_dir / "card.json", tiny_model_dir / "weights.safetensors"):
        state.assert_bit_exact(tta_runtime.Runtime.from_pretrained(path).model, state.snapshot(by_folder.model))


def test_changed_weights_file_is_refused_by_its_checksum(tiny_model_dir):
    weights = tiny_model_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(tta_runtime.ModelLoadError, match="sha256"):
        tta_runtime.Runtime.from_pretrained(tiny_model_dir)


def test_missing_weights_file_is_a_model_load_error(tiny_model_dir):
    (tiny_model_dir / "weights.safetensors").unlink()
    with pytest.raises(tta_runtime.ModelLoadError, match="missing"):
        tta_runtime.Runtime.from_pretrained(tiny_model_dir)


def test_card_with_unknown_field_is_a_model_load_error(tiny_model_dir):
    card = json.loads((tiny_model_dir / "card.json").read_text())
    card["segmenter"]["num_slotz"] = 4
    (tiny_model_dir / "card.json").write_text(json.dumps(card))
    with pytest.raises(tta_runtime.ModelLoadError, match="num_slotz"):
        tta_runtime.Runtime.from_pretrained(tiny_model_dir)


def test_mask_source_attention_makes_the_attention_maps_the_segmentation(tiny_model_dir, tmp_path) -> None:
    """A card with mask_source='attention': Result.masks, the eval's segmentation and the exported 'masks'
    come from the last slot-attention maps; the reconstruction still from the decoder."""
    import json
    import shutil

    import torch

    from tta_runtime.models.segmenter import images_to_tensor, segmentation_masks

    folder = tmp_path / "tiny-attn"
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "card.json").read_text())
    card["segmenter"]["mask_source"] = "attention"
    (folder / "card.json").write_text(json.dumps(card))
    rt = tta_runtime.Runtime.from_pretrained(folder)
    assert rt.model.cfg.mask_source == "attention"
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    res = rt.predict(image)
    with torch.no_grad():
        out = rt.model(images_to_tensor(image[None]))
    s = rt.input_size
    np.testing.assert_allclose(res.masks, out.attention[0].reshape(-1, s, s).numpy(), atol=1e-6)
    assert not np.allclose(res.masks, out.masks[0].reshape(-1, s, s).numpy(), atol=1e-3)  # the source matters
    np.testing.assert_allclose(res.reconstruction, out.reconstruction[0].reshape(s, s, 3).clamp(0, 1).numpy(), atol=1e-6)
    assert torch.equal(segmentation_masks(rt.model.cfg, out), out.attention)
    # exported: the 'masks' output follows the card too
    exported = rt.export(tmp_path / "attn.onnx", part="predictor")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    x = images_to_tensor(image[None]).numpy()
    onnx_masks = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))["masks"]
    np.testing.assert_allclose(onnx_masks[0], res.masks, atol=1e-4)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_mask_source_product_is_the_renormalised_product_of_decoder_and_attention(tiny_model_dir, tmp_path, power) -> None:
    """mask_source='product': per pixel, decoder mask x attention map ** attention_power renormalised over
    the slots, the same in Result.masks and in the exported graph."""
    import shutil

    import torch

    from tta_runtime.models.segmenter import images_to_tensor

    folder = tmp_path / "tiny-product"
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "card.json").read_text())
    card["segmenter"]["mask_source"] = "product"
    card["segmenter"]["attention_power"] = power
    (folder / "card.json").write_text(json.dumps(card))
    rt = tta_runtime.Runtime.from_pretrained(folder)
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    res = rt.predict(image)
    with torch.no_grad():
        out = rt.model(images_to_tensor(image[None]))
    s = rt.input_size
    dec = out.masks[0].reshape(-1, s, s).double().numpy()
    att = out.attention[0].reshape(-1, s, s).double().numpy()
    expected = dec * att**power / (dec * att**power).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(res.masks, expected, atol=1e-5)
    np.testing.assert_allclose(res.masks.sum(axis=0), 1.0, atol=1e-5)
    exported = rt.export(tmp_path / "product.onnx", part="predictor")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    x = images_to_tensor(image[None]).numpy()
    onnx_masks = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))["masks"]
    np.testing.assert_allclose(onnx_masks[0], res.masks, atol=1e-4)
