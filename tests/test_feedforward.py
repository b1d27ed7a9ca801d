"""Tests of the U-Net baseline (tta_runtime.models.unet, tta_runtime.training.feedforward): it trains, saves,
loads and predicts.

Tiny models only (16x16, base 8 channels), so the whole file runs in a few seconds on one thread.
Training tests use K=5 because in_dist scenes hold up to 4 objects + background and the Hungarian
loss needs one channel per segment; the others use K=3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tta_runtime.data.scenes import generate_scenes
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError
from tta_runtime.models.segmenter import images_to_tensor as to_tensor
from tta_runtime.models.unet import (
    FeedForwardConfig,
    UNetSegmenter,
    load_feedforward,
    predict_segmentation,
)
from tta_runtime.training.feedforward import (
    FeedForwardTrainConfig,
    feedforward_loss,
    save_feedforward,
    train_feedforward,
)

TINY = FeedForwardConfig(resolution=16, num_slots=3, base_channels=8, depth=2)
TINY_TRAINABLE = TINY.model_copy(update={"num_slots": 5})


def _train_cfg(steps: int) -> FeedForwardTrainConfig:
    return FeedForwardTrainConfig(model=TINY_TRAINABLE, steps=steps, batch=4, eval_every=2, ckpt_every=2, val_images=4)


def _toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 3, 16, 16) images of two flat rectangles on a dark background, and their (4, 16, 16) ids."""
    inst = torch.zeros(4, 16, 16, dtype=torch.long)
    images = torch.full((4, 3, 16, 16), 0.2)
    for i in range(4):
        inst[i, i : i + 6, 1:7] = 1
        inst[i, 8:14, 2 * i + 6 : 2 * i + 10] = 2
        images[i, :, inst[i] == 1] = torch.tensor([0.9, 0.1, 0.1])[:, None]
        images[i, :, inst[i] == 2] = torch.tensor([0.1, 0.2, 0.9])[:, None]
    return images, inst


def test_forward_shapes_and_masks_sum_to_one() -> None:
    torch.manual_seed(0)
    model = UNetSegmenter(TINY)
    x = torch.rand(2, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (2, 3, 16, 16)
    torch.testing.assert_close(model.masks(x).sum(dim=1), torch.ones(2, 16, 16))


def test_prediction_does_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    model = UNetSegmenter(TINY).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_config_rejects_unknown_keys_and_indivisible_resolution() -> None:
    with pytest.raises(ValueError, match="extra"):
        FeedForwardConfig(resolution=16, channels=8)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="divisible"):
        FeedForwardConfig(resolution=20, depth=3)


def test_too_few_channels_for_the_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_slots=3"):
        train_feedforward(FeedForwardTrainConfig(model=TINY, steps=1), tmp_path, progress=False)


def test_predict_segmentation_shape_dtype_and_input_check() -> None:
    torch.manual_seed(0)
    model = UNetSegmenter(TINY).eval()
    images, _ = generate_scenes("in_dist", 5, seed=0, size=16)
    seg = predict_segmentation(model, images, batch=2)
    assert seg.shape == (5, 16, 16) and seg.dtype == np.int64
    assert seg.min() >= 0 and seg.max() < 3
    with torch.inference_mode():
        expected = model(to_tensor(images)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(seg, expected)
    with pytest.raises(InvalidInputError, match="uint8"):
        predict_segmentation(model, images.astype(np.float32))
    with pytest.raises(InvalidInputError, match=r"\(N, 16, 16, 3\)"):
        predict_segmentation(model, images[:, :8])


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = UNetSegmenter(TINY)
    images, inst = _toy_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = feedforward_loss(model(images), inst, ce_weight=1.0)[0].item()
    for _ in range(30):
        loss = feedforward_loss(model(images), inst, ce_weight=1.0)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = feedforward_loss(model(images), inst, ce_weight=1.0)[0].item()
    assert last < 0.7 * first, (first, last)


def test_train_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    cfg = _train_cfg(3)
    model = train_feedforward(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3] and all("val_fg_ari" in r for r in log)

    folder = save_feedforward(model, cfg, tmp_path / "ff", command="test", run_dir=tmp_path / "run", val_images=4)
    card = json.loads((folder / "card.json").read_text())
    assert card["training"]["steps_done"] == 3 and card["training"]["seed"] == 0
    assert card["training"]["seconds"] > 0 and "val_in_dist_4_fg_ari" in card["metrics"]

    loaded = load_feedforward(folder)
    assert loaded.cfg == cfg.model and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    images, _ = generate_scenes("in_dist", 3, seed=1, size=16)
    np.testing.assert_array_equal(predict_segmentation(model, images), predict_segmentation(loaded, images))


def test_resume_continues_exactly(tmp_path: Path) -> None:
    # Within the warm-up the lr does not depend on `steps`, so 2 + resume to 4 must equal 4 at once.
    straight = train_feedforward(_train_cfg(4), tmp_path / "a", progress=False)
    train_feedforward(_train_cfg(2), tmp_path / "b", progress=False)
    resumed = train_feedforward(_train_cfg(4), tmp_path / "b", progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_refuses_tampered_weights_and_cards(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _train_cfg(1)
    folder = save_feedforward(UNetSegmenter(cfg.model), cfg, tmp_path / "ff", val_images=2)
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_feedforward(folder)

    card = json.loads((folder / "card.json").read_text())
    card["unexpected"] = 1
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="unexpected"):
        load_feedforward(folder)
    with pytest.raises(ModelLoadError, match="card.json"):
        load_feedforward(tmp_path / "missing")


def test_checkpoint_is_safetensors_with_adam_moments(tmp_path: Path) -> None:
    from tta_runtime.training.checkpoint import load_checkpoint

    model = train_feedforward(_train_cfg(2), tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.safetensors", "config.json", "log.jsonl"]
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.safetensors")
    assert ckpt.step == 2 and ckpt.elapsed > 0 and FeedForwardTrainConfig.model_validate_json(ckpt.config) == _train_cfg(2)
    for name, p in model.named_parameters():
        assert torch.equal(ckpt.model[name], p.detach())
        assert ckpt.optimizers[0]["exp_avg"][name].shape == p.shape
        assert ckpt.optimizers[0]["exp_avg_sq"][name].shape == p.shape
        assert float(ckpt.optimizers[0]["step"][name]) == 2.0


def test_the_shared_schedule_warms_up_then_decays_to_the_final_fraction() -> None:
    from tta_runtime.training.schedule import Schedule

    s = Schedule(lr=1.0, steps=10, warmup=2, final_fraction=0.1)
    assert [s(0), s(1)] == [0.5, 1.0]
    assert s(2) == 1.0 and s(10) == pytest.approx(0.1) and s(50) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(2, 12))
    assert Schedule(lr=0.3, steps=5, final_fraction=1.0)(3) == 0.3  # final_fraction 1: constant
