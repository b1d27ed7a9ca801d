"""The feed-forward U-Net's own test-time adaptation (Tent on its GroupNorm layers) through the one
adaptation loop: it lowers the per-pixel entropy it minimises, touches only the norm layers' affine
parameters, restores the weights bit for bit, and refuses a continual recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tta_runtime.adapt.loop import Adapter
from tta_runtime.data.scenes import VAL_SEED, generate_scenes
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.feedforward_tta import PixelClassifier, adapt_feedforward
from tta_runtime.hub import find_model, load_recipe
from tta_runtime.models.segmenter import images_to_tensor
from tta_runtime.models.unet import load_feedforward, predict_segmentation

UNET = find_model(None) / "feedforward"


@pytest.fixture(scope="module")
def unet():
    if not (UNET / "card.json").is_file():
        pytest.skip(f"no feed-forward baseline shipped at {UNET}")
    return load_feedforward(UNET)


@pytest.fixture(scope="module")
def scenes(unet):
    return generate_scenes("textured_background", 3, seed=VAL_SEED, size=unet.cfg.resolution)


def test_tent_on_the_unet_lowers_pixel_entropy_and_changes_only_norm_parameters(unet, scenes) -> None:
    recipe = load_recipe("unet_tent", steps=5, lr=1e-2)
    model = PixelClassifier(unet)
    adapter = Adapter(model, recipe)
    x = images_to_tensor(scenes[0][:1])
    seen: dict[str, torch.Tensor] = {}

    def spy(step: int, out) -> None:  # the weights as they are during the call, after the updates
        if step == recipe.steps:
            seen.update({k: v.detach().clone() for k, v in unet.state_dict().items()})

    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out, report = adapter.run(x, on_step=spy)
    assert report.steps_run == 5 and not report.rolled_back
    assert report.final_loss < report.losses[0]  # Tent minimises the mean per-pixel entropy
    assert out.logits.shape == (1, unet.cfg.num_slots, unet.cfg.resolution, unet.cfg.resolution)
    changed = {k for k in before if not torch.equal(before[k], seen[k])}
    assert changed
    norm_names = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert {k.rsplit(".", 1)[0] for k in changed} <= norm_names
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # episodic: restored bit for bit


def test_adapt_feedforward_segments_every_image_and_reports_every_step(unet, scenes) -> None:
    images, _ = scenes
    recipe = load_recipe("unet_tent", steps=3)
    calls: list[tuple[int, int]] = []
    segs, seconds = adapt_feedforward(unet, images, recipe, on_step=lambda i, step, seg: calls.append((i, step)))
    assert segs.shape == images.shape[:3] and segs.dtype == np.int64
    assert segs.min() >= 0 and segs.max() < unet.cfg.num_slots
    assert len(seconds) == len(images) and all(s > 0 for s in seconds)
    assert calls == [(i, s) for i in range(len(images)) for s in range(recipe.steps + 1)]
    # Step 0 is the unadapted prediction: the same as the feed-forward path's.
    first: list[np.ndarray] = []
    adapt_feedforward(unet, images[:1], recipe, on_step=lambda i, step, seg: first.append(seg) if step == 0 else None)
    assert np.array_equal(first[0], predict_segmentation(unet, images[:1])[0])


def test_adapt_feedforward_refuses_a_continual_recipe(unet, scenes) -> None:
    with pytest.raises(ConfigError, match="episodic"):
        adapt_feedforward(unet, scenes[0], load_recipe("tent_continual"))
