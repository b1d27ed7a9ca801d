"""FTWT pruning of the slot segmenter's encoder (tta_runtime.prune.segmenter, tta_runtime.training.ftwt): masks, cost, training, variants."""

from __future__ import annotations

import pytest
import torch

from tta_runtime.adapt.loop import Adapter
from tta_runtime.config import AdaptConfig, SegmenterConfig
from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.models.segmenter import SlotSegmenter, reconstruction_loss
from tta_runtime.prune import (
    PrunedSegmenter,
    build_pruned,
    encoder_macs,
    encoder_predictor_macs,
    load_prune_card,
    model_macs,
    pruned_units,
    pruned_variants,
)
from tta_runtime.training import train_ftwt_segmenter

CFG = SegmenterConfig(
    resolution=16, num_slots=5, slot_dim=16, iters=2, encoder_channels=8, encoder_layers=4, encoder_kernel=3,
    decoder_width=16, decoder_blocks=1,
)


def _pair(seed: int = 0) -> tuple[SlotSegmenter, PrunedSegmenter]:
    torch.manual_seed(seed)
    base = SlotSegmenter(CFG).eval()
    return base, PrunedSegmenter.from_segmenter(base, seed=seed).eval()


def _random_decisions(model: PrunedSegmenter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.predictors:
        # pooled activations are small (~0.05): large weights so the decisions depend on the input
        torch.nn.init.normal_(p.fc.weight, 0.0, 20.0, generator=g)
        torch.nn.init.normal_(p.fc.bias, 0.0, 0.3, generator=g)


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, CFG.resolution, CFG.resolution, generator=torch.Generator().manual_seed(seed))


def test_state_dict_is_base_keys_plus_predictors() -> None:
    base, pruned = _pair()
    keys, base_keys = set(pruned.state_dict()), set(base.state_dict())
    assert base_keys <= keys
    extra = keys - base_keys
    assert extra == {f"predictors.{i}.fc.{w}" for i in range(2) for w in ("weight", "bias")}
    assert pruned_units(CFG) == [1, 2]
    fresh = PrunedSegmenter(CFG)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(base.state_dict(), strict=True)


def test_all_ones_masks_equal_the_dense_model_and_zero_masks_change_features() -> None:
    base, pruned = _pair()
    x = _x()
    with torch.no_grad():
        dense = base.encode(x)
        same = pruned.encode(x)  # fresh predictors: bias +3, every channel kept
        assert all(bool(m.all()) for m in pruned.last_masks)
        assert torch.equal(dense, same)
        assert torch.equal(base(x).masks, pruned(x).masks)
        zero = [torch.ones_like(m) for m in pruned.last_masks]
        zero[1] = torch.zeros_like(zero[1])
        pruned._fixed = zero  # the fixed-mask slot, set by hand: unit 1 fully pruned
        try:
            cut = pruned.encode(x)
        finally:
            pruned._fixed = None
    assert not torch.allclose(cut, dense, atol=1e-3)
    # unit 1 all zero: conv 2 sees only its bias, so every pixel's feature is the same function of position
    assert torch.allclose(cut[0], cut[1], atol=1e-6)


def test_masks_multiply_post_relu_activation() -> None:
    _, pruned = _pair()
    _random_decisions(pruned)
    x = _x()
    with torch.no_grad():
        feats = pruned.encode(x)
        masks = pruned.last_masks
        h = x
        for u in range(CFG.encoder_layers):
            h = torch.relu(pruned.encoder.convs[2 * u](h)) * masks[u][:, :, None, None]
        ref = h.flatten(2).transpose(1, 2) + pruned.encoder.pos(pruned.encoder.grid)
    assert torch.allclose(feats, ref, atol=1e-6)
    assert masks[0].all() and masks[3].all()  # unit 0 and the last conv keep full width
    assert 0 < float(torch.cat(masks[1:3], 1).mean()) < 1


def test_fixed_masks_reuses_masks_and_restores_on_exit() -> None:
    _, pruned = _pair()
    _random_decisions(pruned)
    x, other = _x(2, seed=1), _x(2, seed=7) * 0.2  # very different pooled inputs
    with torch.no_grad():
        pruned.encode(other)
        free = [m.clone() for m in pruned.last_masks]
        with pruned.fixed_masks(x) as fixed:
            pruned.encode(x)
            on_x = [m.clone() for m in pruned.last_masks]
            pruned.encode(other)
            for a, b in zip(pruned.last_masks, fixed):
                assert torch.equal(a, b)  # other's forward used x's masks
            pruned.encode(other[:1])  # broadcast from one image: the union over x
            assert torch.equal(pruned.last_masks[1][0], fixed[1].amax(0))
            with pytest.raises(ConfigError):
                with pruned.fixed_masks(x):
                    pass
        assert pruned._fixed is None
        pruned.encode(other)
    assert any(not torch.equal(a, b) for a, b in zip(free, on_x))  # the two inputs choose differently
    for a, b in zip(pruned.last_masks, free):
        assert torch.equal(a, b)  # back to predicting per input


def test_fixed_masks_restored_after_an_error() -> None:
    _, pruned = _pair()
    with pytest.raises(ValueError):
        with pruned.fixed_masks(_x()):
            raise ValueError("boom")
    assert pruned._fixed is None


def test_adaptation_inside_fixed_masks_keeps_the_channels() -> None:
    _, pruned = _pair()
    _random_decisions(pruned)
    x = _x(1)
    recipe = AdaptConfig(method="slot_reconstruction", params="all", optimizer="adam", lr=1e-2, steps=3)
    seen: list[list[torch.Tensor]] = []
    with pruned.fixed_masks(x) as fixed:
        Adapter(pruned, recipe).run(x, on_step=lambda i, out: seen.append([m.clone() for m in pruned.last_masks]))
    assert len(seen) == 4
    for masks in seen:
        for a, b in zip(masks, fixed):
            assert torch.equal(a, b)


def test_topk_keeps_exactly_k_and_validates_ks() -> None:
    base, _ = _pair()
    ks = [8, 3, 5, 16]
    pruned = PrunedSegmenter(CFG, masks="topk", ks=ks)
    pruned.load_state_dict(PrunedSegmenter.from_segmenter(base).state_dict())
    _random_decisions(pruned)
    with torch.no_grad():
        pruned.encode(_x(4))
    assert pruned.kept().tolist() == [ks] * 4
    for bad in ([8, 3, 5], [8, 0, 5, 16], [8, 9, 5, 16], [7, 3, 5, 16], [8, 3, 5, 15]):
        with pytest.raises(ConfigError):
            PrunedSegmenter(CFG, masks="topk", ks=bad)
    with pytest.raises(ConfigError):
        PrunedSegmenter(CFG, masks="topk")
    with pytest.raises(ConfigError):
        PrunedSegmenter(CFG, masks="dense")
    with pytest.raises(InvalidInputError):
        pruned.encode(torch.rand(1, 3, 8, 8))


def test_macs_fraction_matches_a_hand_computation() -> None:
    _, pruned = _pair()
    x = _x(2)
    with torch.no_grad():
        pruned.encode(x)
    s2k2 = CFG.resolution**2 * CFG.encoder_kernel**2
    dense = (3 * 8 + 8 * 8 + 8 * 8 + 8 * 16) * s2k2
    assert float(encoder_macs(CFG, torch.tensor([[8, 8, 8, 16]])).sum()) == dense
    predictors = 8 * 8 + 8 * 8  # Linear(8, 8) for units 1 and 2 on full inputs
    frac = pruned.macs_fraction()
    assert frac.shape == (2,)
    assert torch.allclose(frac, torch.full((2,), 1 + predictors / dense, dtype=torch.float64))
    assert float(frac[0]) == pytest.approx(1.0, abs=1e-2)

    ks = [8, 2, 4, 16]
    topk = PrunedSegmenter(CFG, masks="topk", ks=ks)
    with torch.no_grad():
        topk.encode(x)
    spent = (3 * 8 + 8 * 2 + 2 * 4 + 4 * 16) * s2k2 + (8 * 8 + 2 * 8)
    assert torch.allclose(topk.macs_fraction(), torch.full((2,), spent / dense, dtype=torch.float64))
    assert float(topk.macs_fraction()[0]) < 1
    assert float(encoder_predictor_macs(CFG, torch.tensor([ks])).item()) == 8 * 8 + 2 * 8


def test_encoder_macs_agree_with_pytorch_flop_counter() -> None:
    base, _ = _pair()
    counted = model_macs(base)
    assert counted["encoder_convs"] == float(encoder_macs(CFG, torch.tensor([[8, 8, 8, 16]])).sum())
    assert counted["total"] > counted["encoder_convs"]


def test_training_separates_predictor_and_task_gradients() -> None:
    _, pruned = _pair()
    pruned.train()
    x = _x(2)
    with torch.enable_grad():
        out = pruned.ftwt_forward(x, r=0.7)
        assert out.targets[0] is None and out.targets[1] is not None
        bce = sum(
            torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits[u], out.targets[u]) for u in (1, 2)
        )
        bce.backward()  # type: ignore[union-attr]
    for n, p in pruned.named_parameters():
        if n.startswith("predictors."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"predictor loss reached {n}"
    pruned.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = pruned.ftwt_forward(x, r=0.7)
        reconstruction_loss(out.out, x).backward()
    for n, p in pruned.named_parameters():
        if n.startswith("predictors."):
            assert p.grad is None, f"task loss reached {n}"
        elif n.startswith("encoder.convs"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_train_ftwt_segmenter_runs_and_leaves_the_base_untouched() -> None:
    torch.manual_seed(0)
    base = SlotSegmenter(CFG)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pruned, tlog = train_ftwt_segmenter(base, r=0.6, steps=4, batch=2, lr_predictor=0.5, log_every=2, attn_weight=1.0)
    assert not pruned.training
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert [line["step"] for line in tlog.lines] == [2, 4]
    assert [line["predictor_loss_weight"] for line in tlog.lines] == [1.0, 0.0]
    moved = [k for k, v in pruned.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    assert any(float(p.fc.bias.detach().mean()) < 3.0 for p in pruned.predictors)  # predictors trained in the first half
    control, _ = train_ftwt_segmenter(base, r=0.6, steps=2, batch=2, dense=True, attn_weight=1.0)
    assert all(float(p.fc.bias.detach().mean()) == 3.0 for p in control.predictors)
    with pytest.raises(ConfigError):
        train_ftwt_segmenter(base, r=0.6, steps=0)


def test_shipped_segmenter_variant_loads_strictly() -> None:
    from tta_runtime.hub import find_model, load_card, load_weights

    folder = find_model("slot-shapes-32")
    variants = [v for v in pruned_variants(folder) if load_prune_card(folder, v).part == "segmenter_encoder"]
    if not variants:
        pytest.skip("no pruned segmenter variant shipped in models/slot-shapes-32/prune/")
    card = load_card(folder)
    for name in variants:
        prune = load_prune_card(folder, name)
        model = build_pruned(card, prune)
        assert isinstance(model, PrunedSegmenter)
        model.load_state_dict(load_weights(folder / "prune" / name, card, prune.weights), strict=True)
        model.eval()
        from tta_runtime.data.scenes import generate_scenes
        from tta_runtime.models.segmenter import images_to_tensor

        images, _ = generate_scenes("in_dist", 4, seed=1000, size=card.segmenter.resolution)
        with torch.no_grad():
            model(images_to_tensor(images))
        frac = model.macs_fraction()
        assert frac.shape == (4,) and bool((frac < 1).all())
