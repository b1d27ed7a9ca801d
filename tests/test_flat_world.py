"""The flat world (tta_runtime.data.flat_world) and the semi-supervised training data (training.scenes_data)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from tta_runtime.data.flat_world import FLAT_OOD_SPLITS, FLAT_SPLITS, HELD_OUT_SPLITS, MIN_CONTRAST
from tta_runtime.data.scenes import generate_scene, generate_scenes, max_objects, world_splits
from tta_runtime.errors import ConfigError, UnknownNameError
from tta_runtime.training.scenes_data import batch_indices, is_labelled, labelled_batch_indices


@pytest.mark.parametrize("split", FLAT_SPLITS)
def test_every_split_is_deterministic_and_its_objects_are_visible(split):
    images, inst = generate_scenes(split, 4, seed=7, size=64, start=10)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8 and inst.shape == (4, 64, 64)
    for i in range(4):
        alone = generate_scene(split, 7, 10 + i, 64)
        assert np.array_equal(alone.image, images[i]) and np.array_equal(alone.instances, inst[i])
        ids = np.unique(inst[i])
        assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))  # consecutive, background present
        areas = np.bincount(inst[i].ravel())[1:]
        assert len(areas) <= max_objects(split) and areas.min() >= 2  # every object keeps pixels of its own


def test_in_dist_spans_dark_and_bright_backgrounds_and_one_to_six_objects():
    images, inst = generate_scenes("flat/in_dist", 200, seed=1, size=64)
    counts = inst.reshape(200, -1).max(1)
    assert counts.min() == 1 and counts.max() == 6
    values = []
    for img, ins in zip(images, inst):
        bg = img[ins == 0].astype(np.float32) / 255
        values.append(colorsys.rgb_to_hsv(*bg.mean(0))[2])
    values = np.array(values)
    assert (values < 0.3).mean() > 0.1 and (values > 0.8).mean() > 0.1


def test_objects_contrast_with_a_plain_background():
    for i in range(60):
        scene = generate_scene("flat/in_dist", 3, i, 64)
        bg = scene.image[scene.instances == 0].astype(np.float32) / 255
        if np.ptp(bg, axis=0).max() > 0.01:
            continue  # a graded background: its ends are checked by the generator, not recoverable here
        for k in range(1, scene.instances.max() + 1):
            colour = scene.image[scene.instances == k][0].astype(np.float32) / 255
            assert np.linalg.norm(colour - bg[0]) >= MIN_CONTRAST - 0.01


def test_held_out_variations_change_what_they_say():
    images, inst = generate_scenes("flat/bright_background", 40, seed=2, size=64)
    for img, ins in zip(images, inst):
        bg = img[ins == 0].astype(np.float32) / 255
        assert colorsys.rgb_to_hsv(*bg.mean(0))[2] >= 0.78
    _, six = generate_scenes("flat/six_objects", 40, seed=2, size=64)
    assert (six.reshape(40, -1).max(1) == 6).mean() > 0.8
    _, small = generate_scenes("flat/small_objects", 40, seed=2, size=64)
    _, wide = generate_scenes("flat/in_dist", 40, seed=2, size=64)

    def mean_area(x):
        return np.mean([np.bincount(s.ravel())[1:].mean() for s in x])

    assert mean_area(small) < 0.5 * mean_area(wide)
    assert set(HELD_OUT_SPLITS).isdisjoint(FLAT_OOD_SPLITS)


def test_noise_blur_keeps_the_in_dist_layout_and_crowding_holds_more_objects():
    clean = generate_scenes("flat/in_dist", 8, seed=5, size=64)
    noisy = generate_scenes("flat/noise_blur", 8, seed=5, size=64)
    assert np.array_equal(clean[1], noisy[1]) and not np.array_equal(clean[0], noisy[0])
    _, crowd = generate_scenes("flat/crowding", 8, seed=5, size=64)
    assert crowd.reshape(8, -1).max(1).min() > 6


def test_world_splits_and_unknown_names():
    assert world_splits("flat/in_dist") == FLAT_OOD_SPLITS
    assert "flat/in_dist" not in FLAT_OOD_SPLITS
    with pytest.raises(UnknownNameError, match="flat/in_dist"):
        generate_scene("flat/in_dst", 0, 0, 64)


# --------------------------------------------------------------------------------------------------
# Semi-supervised data


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1 / 3, 1.0])
def test_label_fraction_is_exact_and_the_feedforward_stream_sees_only_labelled_scenes(fraction):
    idx = np.arange(5, 5 + 3000)
    labelled = is_labelled(idx, 5, fraction)
    assert labelled.sum() == pytest.approx(3000 * fraction, abs=1)
    ff = np.concatenate([labelled_batch_indices(s, 32, 5, None, fraction) for s in range(4)])
    assert is_labelled(ff, 5, fraction).all()
    assert np.array_equal(ff, idx[labelled][: len(ff)])  # every labelled scene in order, none skipped


def test_a_fixed_dataset_is_cycled_and_labels_stay_with_their_scenes():
    first = batch_indices(0, 32, 100, dataset_size=64)
    assert np.array_equal(batch_indices(2, 32, 100, dataset_size=64), first)
    ff = np.concatenate([labelled_batch_indices(s, 4, 100, 64, 0.25) for s in range(8)])
    assert set(ff.tolist()) == set(np.arange(100, 164)[is_labelled(np.arange(100, 164), 100, 0.25)].tolist())
    with pytest.raises(ConfigError, match="labels no scene"):
        labelled_batch_indices(0, 4, 0, 3, 0.1)


def test_the_mask_loss_sees_only_labelled_scenes():
    from tta_runtime.config import SegmenterConfig
    from tta_runtime.models.segmenter import SlotSegmenter
    from tta_runtime.training.slot import scene_batch, slot_loss

    torch.manual_seed(0)
    model = SlotSegmenter(SegmenterConfig(resolution=32, num_slots=8, encoder_channels=8, slot_dim=16,
                                          decoder_width=16, decoder_blocks=1))
    kw = dict(batch=6, seed=0, size=32, data_start=0, pixel_fraction=0.5, split="flat/in_dist")
    b = scene_batch(0, **kw, label_fraction=0.5)
    assert b.labelled.tolist() == [False, True] * 3
    out = model(b.x, b.pixel_idx)
    _, _, mask = slot_loss(out, b, 1.0, 1.0)
    full = scene_batch(0, **kw)
    rows = torch.tensor([1, 3, 5])
    from dataclasses import replace

    sub = replace(out, masks=out.masks[rows], attention=out.attention[rows])
    _, _, expected = slot_loss(sub, replace(full, targets=full.targets[rows], instances=full.instances[[1, 3, 5]]), 1.0)
    assert torch.allclose(mask, expected)
    none = scene_batch(0, **{**kw, "batch": 1}, label_fraction=0.5)  # offset 0 carries no label at F = 0.5
    total, rec, mask0 = slot_loss(model(none.x, none.pixel_idx), none, 1.0, 1.0)
    assert mask0.item() == 0 and total.item() == rec.item()


def test_the_attention_cross_entropy_is_the_matched_slots_negative_log_attention():
    """`--attn-ce-weight`: -log of each pixel's attention on the slot its object was matched to, averaged over
    every pixel, added on top of the attention BCE under the same matching; its gradient reaches the slots."""
    from tta_runtime.config import SegmenterConfig
    from tta_runtime.models.segmenter import SlotSegmenter
    from tta_runtime.training.slot import hungarian_targets, scene_batch, slot_loss

    torch.manual_seed(0)
    model = SlotSegmenter(SegmenterConfig(resolution=32, num_slots=8, encoder_channels=8, slot_dim=16,
                                          decoder_width=16, decoder_blocks=1))
    b = scene_batch(0, batch=4, seed=0, size=32, data_start=0, pixel_fraction=0.5, split="flat/in_dist")
    out = model(b.x, b.pixel_idx)
    bce_only, _, _ = slot_loss(out, b, 2.0, 1.0)
    both, _, _ = slot_loss(out, b, 2.0, 1.0, 0.5)
    _, labels = hungarian_targets(out.attention, torch.from_numpy(b.instances.reshape(4, -1)))
    picked = out.attention.gather(1, labels[:, None]).squeeze(1)  # (B, P) attention on the matched slot
    assert torch.allclose(both - bce_only, 2.0 * 0.5 * -picked.log().mean(), atol=1e-5)
    ce_only, _, _ = slot_loss(out, b, 2.0, 0.0, 0.5)
    rec_only, _, _ = slot_loss(out, b, 2.0)
    assert torch.allclose(ce_only - rec_only, both - bce_only, atol=1e-5)
    model.zero_grad()
    (ce_only - rec_only).backward()
    assert model.slot_attention.slots_init.grad.abs().sum() > 0


def test_batches_generated_ahead_by_workers_are_the_loops_own(tmp_path):
    import functools

    from tta_runtime.training.scenes_data import Prefetcher
    from tta_runtime.training.slot import scene_batch

    fn = functools.partial(scene_batch, batch=3, seed=0, size=16, data_start=0, pixel_fraction=0.5,
                           split="flat/in_dist", label_fraction=0.5)
    with Prefetcher(fn, workers=1) as ahead:
        got = [ahead(s) for s in (0, 1, 3)]  # a skipped step too
    for s, b in zip((0, 1, 3), got):
        ref = fn(s)
        assert torch.equal(b.x, ref.x) and torch.equal(b.targets, ref.targets) and torch.equal(b.pixel_idx, ref.pixel_idx)
        assert np.array_equal(b.labelled, ref.labelled)
    with pytest.raises(ConfigError, match="workers"):
        Prefetcher(fn, workers=-1)


def test_a_time_limit_stops_checkpointed_and_the_next_call_resumes(tmp_path):
    from tta_runtime.config import SegmenterConfig
    from tta_runtime.training.checkpoint import checkpoint_progress
    from tta_runtime.training.slot import TrainConfig, train

    seg = SegmenterConfig(resolution=16, num_slots=7, encoder_channels=4, slot_dim=8, decoder_width=8, decoder_blocks=1)
    cfg = TrainConfig(name="t", segmenter=seg, steps=50, batch=2, train_split="flat/in_dist", val_images=2, eval_every=50)
    train(cfg, tmp_path, progress=False, time_limit=0.0)  # stops after its first step
    assert checkpoint_progress(tmp_path / "ckpt.safetensors")[0] == 1
    train(cfg, tmp_path, progress=False, stop_at=3)
    assert checkpoint_progress(tmp_path / "ckpt.safetensors")[0] == 3


def test_an_evaluation_covers_the_models_own_world():
    from tta_runtime.data.scenes import OOD_SPLITS, evaluation_splits, is_ood_split

    flat = evaluation_splits("flat/in_dist")
    assert flat[0] == "flat/in_dist" and set(FLAT_OOD_SPLITS) | set(HELD_OUT_SPLITS) == set(flat[1:])
    assert [s for s in flat if is_ood_split(s)] == list(FLAT_OOD_SPLITS)  # held-out variations are in-world
    assert evaluation_splits("in_dist") == ("in_dist", *OOD_SPLITS)
