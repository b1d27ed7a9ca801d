"""The pruned models' frozen path computes only the kept channels (the gather path) and gives the numbers of
the mask-multiply path: shipped variants (digits-cnn-bn r0.6, slot-shapes-32 r0.8) at batch 1 and on batches
whose images keep different channels, after the weights change (continual adaptation, in-place edits, weights
swapped in by functional_call), and in the corner cases (nothing kept, batch statistics, fixed masks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tta_runtime import Runtime
from tta_runtime.data.digits import corrupt, load_digits
from tta_runtime.data.scenes import generate_scenes
from tta_runtime.models.classifier import images_to_tensor, set_norm_mode
from tta_runtime.prune import PrunedClassifier, PrunedSegmenter

ATOL = 1e-4


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    x, _ = load_digits("test")
    return images_to_tensor(np.concatenate([x[:6], corrupt(x[6:12], "gaussian_noise", 5, seed=0)]))


@pytest.fixture(scope="module")
def scenes() -> torch.Tensor:
    imgs, _ = generate_scenes("in_dist", 3, seed=3)
    ood, _ = generate_scenes("unseen_colours", 3, seed=3)
    return images_to_tensor(np.concatenate([imgs, ood]))


def _both(model: torch.nn.Module, run, x: torch.Tensor):  # noqa: ANN001, ANN202 - a test helper
    """(gather output, its masks, its kept/macs) and the same from the mask-multiply path (autograd on)."""
    out = []
    for grad, path in ((False, "gather"), (True, "mask-multiply")):
        with torch.set_grad_enabled(grad):
            y = run(x)
        assert model.last_path == path
        out.append((y, [m.detach().clone() for m in model.last_masks], model.kept(), model.macs_fraction()))
    return out


def _same(gather, multiply, close) -> None:  # noqa: ANN001 - a test helper
    (yg, mg, kg, fg), (ym, mm, km, fm) = gather, multiply
    close(yg, ym)
    assert len(mg) == len(mm) and all(torch.equal(a, b) for a, b in zip(mg, mm))
    assert torch.equal(kg, km) and torch.allclose(fg, fm, rtol=0, atol=1e-12)


def _close_classifier(a, b) -> None:  # noqa: ANN001 - a test helper
    assert torch.allclose(a.logits, b.logits.detach(), atol=ATOL) and torch.allclose(a.features, b.features.detach(), atol=ATOL)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b.detach(), atol=ATOL)


def _differ(masks: list[torch.Tensor]) -> bool:
    """Some unit keeps different channels for different images (so the batch runs a union and zeroes)."""
    return any(bool((m != m[:1]).any()) for m in masks)


# --------------------------------------------------------------------------------------------------
# Classifier (digits-cnn-bn, prune="r0.6": static top-k, BatchNorm folded)


def test_classifier_gather_matches_mask_multiply(digits: torch.Tensor) -> None:
    rt = Runtime.from_pretrained("digits-cnn-bn", prune="r0.6")
    model = rt.model
    assert isinstance(model, PrunedClassifier)
    for x in (digits[:1], digits[7:8], digits):
        gather, multiply = _both(model, model, x)
        _same(gather, multiply, _close_classifier)
    assert _differ(gather[1])  # the batch's images keep different channels: the union path ran
    assert 0.2 < float(gather[3].mean()) < 0.5  # about a third of the MACs
    # through the public API: the runtime's frozen path is the gather path, with the same logits
    res = rt.predict((digits.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    assert model.last_path == "gather"
    assert np.allclose(np.stack([r.logits for r in res]), multiply[0].logits.detach().numpy(), atol=ATOL)
    # batch statistics do not fold: the mask-multiply path
    set_norm_mode(model, "batch")
    with torch.no_grad():
        model(digits)
    assert model.last_path == "mask-multiply"
    set_norm_mode(model, "source")


def test_classifier_gather_follows_continual_adaptation_and_swapped_weights(digits: torch.Tensor) -> None:
    rt = Runtime.from_pretrained("digits-cnn-bn", prune="r0.6", recipe="tent", mode="continual")
    model = rt.model
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        before = model(digits[:4]).logits.clone()  # folds and caches the loaded weights
    rt.adapt_and_predict((digits[6:] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), steps=3)
    assert any(not torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # the weights moved
    gather, multiply = _both(model, model, digits)
    _same(gather, multiply, _close_classifier)
    assert not torch.allclose(gather[0].logits[:4], before, atol=1e-3)  # not the stale fold
    # the loaded weights swapped in (as the runtime's OOD pass does): folded for them, not for the model's own
    with torch.inference_mode():
        swapped = torch.func.functional_call(model, loaded, (digits[:4],), strict=True).logits
        again = model(digits[:4]).logits
    assert model.last_path == "gather"
    assert torch.allclose(swapped, before, atol=ATOL) and torch.allclose(again, gather[0].logits[:4], atol=ATOL)


def test_classifier_fixed_masks_and_nothing_kept(digits: torch.Tensor) -> None:
    rt = Runtime.from_pretrained("digits-cnn-bn", prune="r0.6")
    model = rt.model
    with torch.no_grad(), model.fixed_masks(digits[:1]) as fixed:  # one image's masks on a batch of 12
        gather, multiply = _both(model, model, digits)
        assert all(torch.equal(a, b) for a, b in zip(gather[1], fixed))
    _same(gather, multiply, _close_classifier)
    with torch.no_grad(), model.fixed_masks(digits[:3]):  # per-image fixed masks
        _same(*_both(model, model, digits[3:6]), _close_classifier)
    # threshold masks that keep nothing in a unit, for one image or all: that unit's output is zero
    dyn = PrunedClassifier(model.cfg)
    dyn.load_state_dict(model.state_dict())
    dyn.eval()
    with torch.no_grad():
        dyn.predictors[1].fc.bias.fill_(-1e4)
        dyn.predictors[3].fc.bias[:] = torch.where(torch.arange(64) % 2 == 0, -1e4, 0.0)
    for x in (digits[:1], digits):
        gather, multiply = _both(dyn, dyn, x)
        _same(gather, multiply, _close_classifier)
        assert float(gather[2][:, 2].max()) == 0


# --------------------------------------------------------------------------------------------------
# Segmenter (slot-shapes-32, prune="r0.8": threshold masks on the encoder)


def test_segmenter_encoder_gather_matches_mask_multiply(scenes: torch.Tensor) -> None:
    rt = Runtime.from_pretrained("slot-shapes-32", prune="r0.8")
    model = rt.model
    assert isinstance(model, PrunedSegmenter)
    for x in (scenes[:1], scenes):
        gather, multiply = _both(model, model.encode, x)
        _same(gather, multiply, _close)
    assert _differ(gather[1])
    with torch.no_grad():  # the whole model on the gathered features
        out_g, out_m = model.forward_features(gather[0]), model.forward_features(multiply[0].detach())
    assert torch.allclose(out_g.masks, out_m.masks, atol=ATOL) and torch.allclose(out_g.reconstruction, out_m.reconstruction, atol=ATOL)
    # weights edited in place, or swapped in: the slices are cut again
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.encoder.convs[2].weight.mul_(1.5)
        model.encoder.convs[4].bias.add_(0.1)
    gather, multiply = _both(model, model.encode, scenes)
    _same(gather, multiply, _close)
    with torch.inference_mode():
        swapped = torch.func.functional_call(model, loaded, (scenes[:1],))
    fresh = PrunedSegmenter(model.cfg, masks=model.mask_mode)
    fresh.load_state_dict(loaded)
    with torch.enable_grad():
        ref = fresh.eval()(scenes[:1])
    assert torch.allclose(swapped.masks, ref.masks.detach(), atol=ATOL)
    # fixed masks (the adaptation loop's final forward runs without autograd inside the block)
    with torch.no_grad(), model.fixed_masks(scenes[3:4]):
        _same(*_both(model, model.encode, scenes), _close)
