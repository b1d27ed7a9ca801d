"""FTWT dynamic pruning (tta_runtime.pruning): targets, FLOPs accounting, mask-multiply and gather paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tta_runtime.classifier import build_classifier, set_norm_mode
from tta_runtime.config import ClassifierConfig
from tta_runtime.errors import ConfigError
from tta_runtime.pruning import (
    FTWTClassifier,
    GatheredClassifier,
    conv_units,
    ftwt_targets,
    static_ks,
    train_ftwt,
    unit_macs,
)


def _tiny(seed: int = 0) -> FTWTClassifier:
    cfg = ClassifierConfig(resolution=16, in_channels=3, num_classes=10, widths=(4, 8), norm="batch")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_classifier(cfg)
    # non-trivial BatchNorm statistics and affine parameters, so folding them is actually tested
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    ftwt = FTWTClassifier(model.eval())
    for p in ftwt.predictors:  # random decisions instead of "keep all"
        torch.nn.init.normal_(p.fc.bias, 0.0, 1.0, generator=g)
    return ftwt.eval()


def test_targets_follow_cumulative_mass_definition() -> None:
    act = torch.zeros(2, 4, 2, 2)
    # input 0: peaks 4, 3, 2, 1 at filters 2, 0, 3, 1 -> scores 0.4, 0.3, 0.2, 0.1 (sum 1)
    act[0, 2, 0, 1], act[0, 0, 1, 1], act[0, 3, 0, 0], act[0, 1, 1, 0] = 4.0, 3.0, 2.0, 1.0
    act[0, 0, 0, 0] = 1.0  # not the max of filter 0: ignored by the spatial max
    # input 1: one filter dead, the rest equal (1/3 each)
    act[1, :3] = 1.0
    # r = 0.5: 0.4 < 0.5 -> keep next; mass before the 2nd is 0.4 < 0.5 (kept), before the 3rd 0.7 (dropped)
    assert ftwt_targets(act, 0.5).tolist() == [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert ftwt_targets(act, 0.4).tolist() == [[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert ftwt_targets(act, 0.75).tolist() == [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    # r = 1 drops exactly the dead filters
    assert ftwt_targets(act, 1.0).tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ConfigError):
        ftwt_targets(act, 0.0)


def test_macs_match_a_hand_count() -> None:
    units = conv_units(_tiny().backbone)  # 16x16: 3->4, 4->4; pool; 8x8: 4->8, 8->8
    dense = unit_macs(units, torch.tensor([[4, 4, 8, 8]]))
    hand = [3 * 4 * 9 * 256, 4 * 4 * 9 * 256, 4 * 8 * 9 * 64, 8 * 8 * 9 * 64]
    assert dense.tolist() == [hand]
    pruned = unit_macs(units, torch.tensor([[4, 2, 5, 3]]))
    assert pruned.tolist() == [[3 * 4 * 9 * 256, 4 * 2 * 9 * 256, 2 * 5 * 9 * 64, 5 * 3 * 9 * 64]]


def test_all_ones_masks_equal_the_dense_model() -> None:
    model = _tiny()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model.backbone(x).logits
        assert torch.allclose(model(x, masks="dense").logits, dense, atol=1e-6)
        ones = [torch.ones(3, u.conv.out_channels) for u in model.units]
        assert torch.allclose(model(x, masks=ones).logits, dense, atol=1e-6)
        # the predicted masks really prune something here, and change the output
        pred = model(x)
        assert any(float(m.mean()) < 1 for m in pred.masks[1:])


def test_gather_path_equals_mask_multiply() -> None:
    model = _tiny()
    ks = [4, 2, 5, 3]
    gather = GatheredClassifier(model, ks)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(3):
            x = torch.rand(1, 3, 16, 16, generator=gen)
            out = model(x, masks="topk", ks=ks)
            masks = out.masks
            assert [int(m.sum()) for m in masks] == ks
            ref = model(x, masks=masks).logits  # explicit masks: the same numbers
            assert torch.allclose(out.logits, ref, atol=1e-6)
            assert torch.allclose(gather(x), ref, atol=1e-5)
            # the indices it picks are the top-k masks
            for u, idx in enumerate(gather.select(x)[1:], start=1):
                assert sorted(idx.tolist()) == torch.nonzero(masks[u][0]).flatten().tolist()
        # dense folded path (no pruning) equals the backbone
        x = torch.rand(1, 3, 16, 16, generator=gen)
        assert torch.allclose(GatheredClassifier(model, None)(x), model.backbone(x).logits, atol=1e-5)


def test_predictor_loss_does_not_reach_the_backbone() -> None:
    model = _tiny()
    set_norm_mode(model.backbone, "batch")
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = model(x, r=0.7)
    bce = sum(F.binary_cross_entropy_with_logits(z, t) for z, t in zip(out.mask_logits[1:], out.targets[1:]))
    bce.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.predictors.parameters())
    # and the task loss does not reach the predictors (the applied masks carry no gradient)
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None for p in model.predictors.parameters())
    assert any(p.grad is not None for p in model.backbone.parameters())


def test_static_ks_and_short_training() -> None:
    kept = torch.tensor([[4, 1, 3, 8], [4, 2, 5, 8], [4, 4, 8, 2]])
    assert static_ks(kept, [4, 4, 8, 8], 0.5) == [4, 2, 5, 8]
    model = _tiny().backbone
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 32)
    ftwt, log = train_ftwt(model, images, labels, r=0.7, epochs=2, batch=16, predictor_optimizer="adam", lr_predictor=1e-2)
    assert [e["predictor_loss_weight"] for e in log.epochs] == [1.0, 0.0]
    assert not ftwt.training
    assert all(np.isfinite(e["ce"]) and np.isfinite(e["bce"]) for e in log.epochs)
    # static-k fine-tuning: k fixed when the predictor loss switches off, within the widths
    _, log = train_ftwt(_tiny().backbone, images, labels, r=0.7, epochs=2, batch=16, static_quantile=0.5)
    assert log.static_k is not None and log.static_k[0] == 4
    assert all(1 <= k <= w for k, w in zip(log.static_k, [4, 4, 8, 8]))
