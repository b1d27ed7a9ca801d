"""The adaptation loop through the Runtime: episodic reset, loss, determinism, continual mode, rollback,
parameter selection, early stop, pixel subsets, and the methods registry.

Step counts are kept small (2-10) so the file runs in seconds on a CPU; the shipped model is shared by the
session and every test that may change it in place either restores it (episodic) or builds its own runtime.
"""

from __future__ import annotations

import concurrent.futures
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta_runtime
from tta_runtime.adapt.methods import METHODS, SlotReconstruction

RECIPES = ("slot_tta", "entropy", "slot_tta_fast")


def mean_mask_entropy(masks: np.ndarray) -> float:
    """Mean over pixels of the entropy (nats) of the (K, H, W) slot distribution."""
    m = np.clip(masks.astype(np.float64), 1e-12, 1.0)
    return float(-(m * np.log(m)).sum(axis=0).mean())


# ----------------------------------------------------------------------------------------------------
# Episodic mode leaves the model bit-exact


def test_hundred_episodic_calls_leave_every_tensor_bit_exact(runtime, source_state, state, scene, ood_image):
    images = [ood_image, scene("in_dist", 0), scene("unseen_colours", 0), scene("noise_blur", 0)]
    recipes = itertools.cycle(RECIPES)
    first: dict[tuple[int, str], np.ndarray] = {}  # 12 (image, recipe) pairs, each met 8 or 9 times
    for i in range(100):
        key = (i % len(images), next(recipes))
        res = runtime.adapt_and_predict(images[key[0]], recipe=key[1], steps=2)
        assert res.adaptation.steps_run == 2
        # Every call starts from the loaded weights, so a repeat gives the first answer bit for bit.
        assert np.array_equal(res.masks, first.setdefault(key, res.masks))
    state.assert_bit_exact(runtime.model, source_state)
    state.assert_all_require_grad(runtime.model)
    assert all(p.grad is None for p in runtime.model.parameters())


def test_exception_mid_loop_restores_weights_and_next_call_matches(runtime, source_state, state, ood_image):
    reference = runtime.adapt_and_predict(ood_image, steps=3)

    def explode(step: int, out) -> None:
        if step == 1:  # after one real update: the weights have moved when this raises
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        runtime.adapt_and_predict(ood_image, steps=3, on_step=explode)
    state.assert_bit_exact(runtime.model, source_state)
    state.assert_all_require_grad(runtime.model)

    again = runtime.adapt_and_predict(ood_image, steps=3)
    assert again.adaptation.losses == reference.adaptation.losses
    assert np.array_equal(again.masks, reference.masks)


def test_requires_grad_flags_are_restored_as_the_user_left_them(fresh_runtime, state, ood_image):
    model = fresh_runtime.model
    model.slot_attention.slots_init.requires_grad_(False)  # a user's own freeze
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for params in ("all", "decoder", "re:slot_attention\\.gru"):
        fresh_runtime.adapt_and_predict(ood_image, steps=2, params=params)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before


# ----------------------------------------------------------------------------------------------------
# Adaptation does something


def test_reconstruction_adaptation_lowers_its_loss(runtime, ood_image):
    # lr 1e-4 rather than the recipe's 5e-4: Adam's first, sign-sized step at 5e-4 raises the loss of the
    # provisional model on most images, and 10 steps are too few to recover (150 are the recipe's budget).
    res = runtime.adapt_and_predict(ood_image, steps=10, lr=1e-4)
    report = res.adaptation
    assert report.method == "slot_reconstruction"
    assert len(report.losses) == 10 and report.steps_run == 10
    assert not report.rolled_back and not report.stopped_early
    assert report.final_loss < report.losses[0]


def test_first_loss_is_the_unadapted_reconstruction_error(runtime, ood_image):
    res = runtime.adapt_and_predict(ood_image, steps=2)
    assert res.adaptation.losses[0] == pytest.approx(runtime.predict(ood_image).recon_mse, rel=1e-5)
    # ...and the result's own error is the adapted reconstruction's, the loss after the last step.
    assert res.recon_mse == pytest.approx(res.adaptation.final_loss, rel=1e-5)


def test_adapted_prediction_differs_from_the_unadapted_one(runtime, ood_image):
    frozen = runtime.predict(ood_image)
    adapted = runtime.adapt_and_predict(ood_image, steps=3)
    assert np.abs(adapted.masks - frozen.masks).max() > 1e-4


def test_entropy_recipe_lowers_mask_entropy(runtime, ood_image):
    frozen = runtime.predict(ood_image)
    adapted = runtime.adapt_and_predict(ood_image, recipe="entropy", steps=3)
    assert adapted.adaptation.method == "slot_mask_entropy"
    assert adapted.adaptation.final_loss < adapted.adaptation.losses[0]
    assert mean_mask_entropy(adapted.masks) < mean_mask_entropy(frozen.masks)


def test_zero_steps_predicts_like_predict(runtime, ood_image):
    frozen = runtime.predict(ood_image)
    res = runtime.adapt_and_predict(ood_image, steps=0)
    assert res.adaptation.steps_run == 0 and res.adaptation.losses == []
    np.testing.assert_allclose(res.masks, frozen.masks, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Determinism and thread safety


def test_repeated_calls_are_identical(runtime, ood_image):
    a = runtime.adapt_and_predict(ood_image, recipe="slot_tta_fast", steps=4)
    b = runtime.adapt_and_predict(ood_image, recipe="slot_tta_fast", steps=4)
    assert a.adaptation.losses == b.adaptation.losses
    assert np.array_equal(a.masks, b.masks)


def test_eight_threads_on_one_runtime_match_sequential_calls(runtime, source_state, state, scene):
    images = [scene(split, i) for split, i in zip(["textured_background", "in_dist"] * 4, range(8))]
    sequential = [runtime.adapt_and_predict(img, steps=3) for img in images]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda img: runtime.adapt_and_predict(img, steps=3), images))
    for seq, thr in zip(sequential, threaded, strict=True):
        assert np.array_equal(seq.masks, thr.masks)
        assert seq.adaptation.losses == thr.adaptation.losses
    state.assert_bit_exact(runtime.model, source_state)


# ----------------------------------------------------------------------------------------------------
# Continual mode


def test_continual_runtime_keeps_and_continues_adapting_until_reset(state, ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    source = state.snapshot(rt.model)

    first = rt.adapt_and_predict(ood_image, steps=2)
    assert first.adaptation.mode == "continual"
    after_first = state.snapshot(rt.model)
    assert state.changed(rt.model, source)

    rt.adapt_and_predict(ood_image, steps=2)
    assert state.changed(rt.model, source)
    assert state.changed(rt.model, after_first)

    rt.reset()
    state.assert_bit_exact(rt.model, source)


def test_continual_calls_carry_the_optimizer_like_one_long_call(runtime, state, ood_image):
    long = runtime.adapt_and_predict(ood_image, steps=4)  # episodic, on the shared runtime
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    first = rt.adapt_and_predict(ood_image, steps=2)
    second = rt.adapt_and_predict(ood_image, steps=2)
    # Same weights and same Adam moments: two calls of 2 steps are one call of 4 steps.
    carried = first.adaptation.losses + second.adaptation.losses
    assert carried == pytest.approx(long.adaptation.losses, rel=1e-5)
    assert second.adaptation.losses[0] == pytest.approx(first.adaptation.final_loss, rel=1e-5)


def test_continual_per_call_override_keeps_weights(fresh_runtime, state, ood_image):
    source = state.snapshot(fresh_runtime.model)
    fresh_runtime.adapt_and_predict(ood_image, steps=2, mode="continual")
    assert state.changed(fresh_runtime.model, source)
    fresh_runtime.reset()
    state.assert_bit_exact(fresh_runtime.model, source)


def test_continual_runtime_stays_continual_when_a_call_switches_recipe(state, ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    source = state.snapshot(rt.model)
    res = rt.adapt_and_predict(ood_image, recipe="entropy", steps=2)
    assert res.adaptation.mode == "continual"
    assert state.changed(rt.model, source)


def _adapted_elements(model: torch.nn.Module, spec: str) -> dict[str, torch.Tensor]:
    from tta_runtime.adapt.loop import select_parameters

    return {n: p.detach().clone() for n, p in select_parameters(model, spec).items()}


def test_stochastic_restore_of_one_returns_every_weight_to_the_loaded_model(state, ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    source = state.snapshot(rt.model)
    res = rt.adapt_and_predict(ood_image, steps=3, restore_prob=1.0)
    assert res.adaptation.steps_run == 3
    state.assert_bit_exact(rt.model, source)
    # every update started again from the loaded weights: the same loss each step
    assert res.adaptation.losses == pytest.approx([res.adaptation.losses[0]] * 3, rel=1e-6)


def test_stochastic_restore_resets_about_that_share_of_the_adapted_elements(ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    loaded = _adapted_elements(rt.model, "all")
    rt.adapt_and_predict(ood_image, steps=1, restore_prob=0.3)
    after = _adapted_elements(rt.model, "all")
    same = sum(int((after[n] == loaded[n]).sum()) for n in loaded)
    total = sum(t.numel() for t in loaded.values())
    moved_without_restore = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    moved_without_restore.adapt_and_predict(ood_image, steps=1)
    free = _adapted_elements(moved_without_restore.model, "all")
    unchanged_anyway = sum(int((free[n] == loaded[n]).sum()) for n in loaded) / total
    # restored elements are the loaded ones; the rest moved as without restore
    expected = 0.3 + 0.7 * unchanged_anyway
    assert abs(same / total - expected) < 0.01, (same / total, expected)


def test_stochastic_restore_masks_continue_across_continual_calls(ood_image):
    """Two calls of 2 steps equal one call of 4: the restore masks are not redrawn from the seed per call."""
    one = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    one.adapt_and_predict(ood_image, steps=4, restore_prob=0.2)
    two = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    two.adapt_and_predict(ood_image, steps=2, restore_prob=0.2)
    two.adapt_and_predict(ood_image, steps=2, restore_prob=0.2)
    a, b = _adapted_elements(one.model, "all"), _adapted_elements(two.model, "all")
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_stochastic_restore_out_of_range_is_a_config_error(runtime, ood_image):
    with pytest.raises(tta_runtime.ConfigError, match="restore_prob"):
        runtime.adapt_and_predict(ood_image, steps=1, restore_prob=1.5)


# ----------------------------------------------------------------------------------------------------
# Rollback on non-finite loss, gradient or weights

EXPLODING = {"sgd": dict(optimizer="sgd", lr=10.0, momentum=0.0), "adam": dict(optimizer="adam", lr=10.0)}


@pytest.mark.parametrize("optimizer", sorted(EXPLODING))
def test_exploding_lr_is_rolled_back_and_reported(runtime, source_state, state, ood_image, optimizer):
    res = runtime.adapt_and_predict(ood_image, steps=6, **EXPLODING[optimizer])
    report = res.adaptation
    assert report.rolled_back
    assert report.rollback_reason and "non-finite" in report.rollback_reason
    assert report.steps_run < 6
    assert not np.isfinite(report.losses[-1])  # the loss that triggered it is recorded
    state.assert_bit_exact(runtime.model, source_state)
    state.assert_all_require_grad(runtime.model)
    assert runtime.adapt_and_predict(ood_image, steps=2).adaptation.rolled_back is False


@pytest.mark.parametrize("optimizer", sorted(EXPLODING))
def test_rolled_back_result_is_finite(runtime, ood_image, optimizer):
    res = runtime.adapt_and_predict(ood_image, steps=6, **EXPLODING[optimizer])
    assert res.adaptation.rolled_back
    assert np.isfinite(res.masks).all()
    np.testing.assert_allclose(res.masks.sum(axis=0), 1.0, atol=1e-5)
    assert np.isfinite(res.adaptation.final_loss)


class NanGradient:
    """Reconstruction MSE plus a term whose value is 0 but whose gradient is NaN (0 * d sqrt(x)/dx at 0)."""

    task = "segmentation"
    default_params = "all"

    def __init__(self, context=None):
        pass

    def loss(self, out, target):
        zero = out.reconstruction.sum() * 0.0
        return F.mse_loss(out.reconstruction, target) + 0.0 * torch.sqrt(zero)


@pytest.fixture
def nan_gradient_method(monkeypatch):
    # Registered only for this test (the registry itself refuses to replace or remove names).
    monkeypatch.setitem(METHODS._items, "test_nan_gradient", NanGradient)
    return "test_nan_gradient"


def test_nan_gradient_rolls_back_to_the_source_weights(runtime, source_state, state, ood_image, nan_gradient_method):
    frozen = runtime.predict(ood_image)
    res = runtime.adapt_and_predict(ood_image, method=nan_gradient_method, steps=3)
    report = res.adaptation
    assert report.rolled_back and report.rollback_reason == "non-finite gradient at step 0"
    assert report.steps_run == 0 and len(report.losses) == 1 and np.isfinite(report.losses[0])
    np.testing.assert_allclose(res.masks, frozen.masks, atol=1e-6)  # the prediction of the untouched model
    state.assert_bit_exact(runtime.model, source_state)


def test_nan_gradient_in_continual_mode_keeps_the_source_weights(state, ood_image, nan_gradient_method):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    source = state.snapshot(rt.model)
    res = rt.adapt_and_predict(ood_image, method=nan_gradient_method, steps=3)
    assert res.adaptation.rolled_back
    state.assert_bit_exact(rt.model, source)


# ----------------------------------------------------------------------------------------------------
# Which parameters are adapted


def _layer_norm_params(model: nn.Module) -> set[str]:
    return {
        f"{mod_name}.{p_name}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for p_name, _ in mod.named_parameters(recurse=False)
    }


SELECTIONS = {
    "all": lambda name, model: True,
    "no_encoder": lambda name, model: not name.startswith("encoder."),
    "decoder": lambda name, model: name.startswith("decoder."),
    "norm": lambda name, model: name in _layer_norm_params(model),
    "re:slot_attention\\.gru": lambda name, model: name.startswith("slot_attention.gru."),
}


@pytest.mark.parametrize("params", list(SELECTIONS))
def test_only_selected_parameters_change(state, ood_image, params):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    model = rt.model
    selected = {n for n, _ in model.named_parameters() if SELECTIONS[params](n, model)}
    source = state.snapshot(model)

    report = rt.adapt_and_predict(ood_image, steps=2, params=params).adaptation

    changed = state.changed(model, source)
    assert changed, "nothing was adapted"
    assert changed <= selected, f"unselected tensors changed: {sorted(changed - selected)[:5]}"
    assert report.params == params
    assert report.params_adapted == sum(p.numel() for n, p in model.named_parameters() if n in selected)


def test_no_encoder_keeps_every_encoder_weight_and_moves_the_rest(state, ood_image):
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", mode="continual")
    source = state.snapshot(rt.model)
    rt.adapt_and_predict(ood_image, steps=2, params="no_encoder")
    changed = state.changed(rt.model, source)
    assert not {n for n in changed if n.startswith("encoder.")}
    assert {n.split(".")[0] for n in changed} == {"slot_attention", "decoder"}


def test_norm_selects_only_layer_norm_affine_parameters(runtime, scene):
    report = runtime.adapt_and_predict(scene("in_dist", 1), steps=1, params="norm").adaptation
    norms = _layer_norm_params(runtime.model)
    assert norms and all(n.rsplit(".", 1)[-1] in ("weight", "bias") for n in norms)
    assert report.params_adapted == sum(p.numel() for n, p in runtime.model.named_parameters() if n in norms)


def test_regex_matching_nothing_raises_and_leaves_the_model_alone(runtime, source_state, state, ood_image):
    with pytest.raises(ValueError, match="selects no parameter"):
        runtime.adapt_and_predict(ood_image, steps=2, params="re:no_such_layer")
    state.assert_bit_exact(runtime.model, source_state)
    state.assert_all_require_grad(runtime.model)


def test_regex_matching_nothing_is_a_config_error(runtime, ood_image):
    with pytest.raises(tta_runtime.ConfigError, match="params"):
        runtime.adapt_and_predict(ood_image, steps=2, params="re:no_such_layer")


# ----------------------------------------------------------------------------------------------------
# Early stop and pixel subsets


def test_early_stop_when_the_loss_stops_improving(runtime, ood_image):
    report = runtime.adapt_and_predict(ood_image, steps=6, lr=1e-12, early_stop_patience=1).adaptation
    assert report.stopped_early
    assert report.steps_run < 6
    assert len(report.losses) == report.steps_run


def test_pixel_fraction_decodes_a_subset_but_reports_full_size_masks(runtime, ood_image):
    seen: list[int] = []
    res = runtime.adapt_and_predict(
        ood_image, steps=3, pixel_fraction=0.25, on_step=lambda i, out: seen.append(out.masks.shape[-1])
    )
    s = runtime.input_size
    assert res.masks.shape == (runtime.card.segmenter.num_slots, s, s)
    np.testing.assert_allclose(res.masks.sum(axis=0), 1.0, atol=1e-5)
    assert res.adaptation.steps_run == 3 and all(np.isfinite(res.adaptation.losses))
    assert seen == [s * s] * 4  # the callback always sees every pixel, also after the last step
    full = runtime.adapt_and_predict(ood_image, steps=1)
    assert res.adaptation.losses[0] != full.adaptation.losses[0]  # scored on a quarter of the pixels


def test_pixel_subsets_are_seeded(runtime, ood_image):
    a = runtime.adapt_and_predict(ood_image, steps=3, pixel_fraction=0.25, seed=1)
    b = runtime.adapt_and_predict(ood_image, steps=3, pixel_fraction=0.25, seed=1)
    c = runtime.adapt_and_predict(ood_image, steps=3, pixel_fraction=0.25, seed=2)
    assert a.adaptation.losses == b.adaptation.losses
    assert a.adaptation.losses != c.adaptation.losses


# ----------------------------------------------------------------------------------------------------
# The methods registry


def test_registering_a_method_name_twice_is_refused():
    with pytest.raises(ValueError, match="slot_reconstruction"):

        @METHODS.register("slot_reconstruction")
        class Impostor:
            default_params = "all"

    assert METHODS.get("slot_reconstruction") is SlotReconstruction


def test_unknown_method_in_a_call_names_the_closest(runtime, source_state, state, ood_image):
    with pytest.raises(tta_runtime.UnknownNameError) as err:
        runtime.adapt_and_predict(ood_image, steps=2, method="slot_reconstrution")
    msg = str(err.value)
    assert "slot_reconstrution" in msg and "slot_mask_entropy" in msg
    assert "did you mean 'slot_reconstruction'" in msg
    state.assert_bit_exact(runtime.model, source_state)


def test_unknown_method_at_load_names_the_closest():
    with pytest.raises(tta_runtime.UnknownNameError, match="did you mean 'slot_mask_entropy'"):
        tta_runtime.Runtime.from_pretrained("slot-shapes-32", method="slot_mask_entropi")


def test_lr_schedule_warms_up_then_decays_to_the_final_fraction():
    from tta_runtime.adapt.loop import lr_at
    from tta_runtime.hub import load_recipe

    cfg = load_recipe("slot_tta", lr=1e-3, steps=20, warmup_steps=4, lr_schedule="cosine", lr_final_fraction=0.1)
    lrs = [lr_at(cfg, i) for i in range(20)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-4)
    flat = load_recipe("slot_tta", lr=1e-3, steps=5)
    assert [lr_at(flat, i) for i in range(5)] == [1e-3] * 5
