"""The slot segmenter's U-Net encoder (SegmenterConfig.encoder = "unet"): trains, loads, adapts, exports with
ONNX Runtime parity, and is refused by the FTWT pruner with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tta_runtime import Runtime
from tta_runtime.cli.main import main
from tta_runtime.config import SegmenterConfig
from tta_runtime.data.scenes import generate_scenes
from tta_runtime.errors import ConfigError
from tta_runtime.models.segmenter import SlotSegmenter


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet-enc")
    out = root / "model"
    rc = main([
        "-q", "train", "segmenter", "--out", str(out), "--run-dir", str(root / "run"), "--name", "unet-enc",
        "--steps", "3", "--resolution", "32", "--encoder", "unet", "--encoder-channels", "8", "--world", "flat",
        "--val-images", "4", "--eval-every", "3", "--label-fraction", "0.5", "--no-progress",
    ])
    assert rc == 0
    return out


def test_the_config_checks_the_unet_fits():
    assert SegmenterConfig(resolution=32, encoder="unet").encoder == "unet"
    with pytest.raises(ValidationError, match="divisible by 4"):
        SegmenterConfig(resolution=30, encoder="unet")
    model = SlotSegmenter(SegmenterConfig(resolution=32, num_slots=7, encoder="unet", encoder_channels=8))
    out = model(torch.rand(2, 3, 32, 32))
    assert out.masks.shape == (2, 7, 32 * 32) and out.attention.shape == (2, 7, 32 * 32)


def test_a_trained_unet_encoder_model_loads_adapts_and_resets(folder):
    rt = Runtime.from_pretrained(folder, recipe="slot_tta", steps=2)
    assert rt.card.segmenter.encoder == "unet"
    image = generate_scenes("flat/photo_background", 1, seed=5, size=32)[0][0]
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    res = rt.adapt_and_predict(image)
    assert res.segmentation.shape == (32, 32) and res.adaptation.steps_run == 2 and not res.adaptation.rolled_back
    assert all(torch.equal(before[k], v) for k, v in rt.model.state_dict().items())  # episodic: reset


def test_the_unet_encoder_exports_with_onnxruntime_parity(folder, tmp_path):
    pytest.importorskip("onnxruntime", reason="parity checks run on ONNX Runtime (dev extra)")
    from tta_runtime.deploy import export

    rt = Runtime.from_pretrained(folder)
    report = export(rt.model, rt.card, "onnx", tmp_path / "m.onnx", part="predictor")
    rt_ort = Runtime.from_pretrained(folder, backend="onnxruntime")
    images = generate_scenes("flat/in_dist", 3, seed=9, size=32)[0]
    for img in images:
        a, b = rt.predict(img), rt_ort.predict(img)
        assert np.abs(a.masks - b.masks).max() < 1e-4
    assert report.onnx_path.exists()


def test_pruning_refuses_the_unet_encoder(folder):
    from tta_runtime.prune.segmenter import PrunedSegmenter

    rt = Runtime.from_pretrained(folder)
    with pytest.raises(ConfigError, match="encoder='conv'"):
        PrunedSegmenter.from_segmenter(rt.model)
