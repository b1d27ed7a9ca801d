"""The classifier methods through the public Runtime, on the shipped digits models and real digit images.

Each method: batch size 1 and a batch work, results are well formed, episodic calls leave every tensor
bit-exact, and the method's loss is the published one (recomputed here from its definition).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tta_runtime
from tta_runtime.data.digits import corrupt, load_digits
from tta_runtime.errors import ConfigError
from tta_runtime.adapt.methods import MethodContext, get_method
from tta_runtime.adapt.methods.memo import augment
from tta_runtime.adapt.methods.rotation import rotations

CLASSIFIER_RECIPES = ["bn_stats", "tent", "eata", "sar", "memo", "rotation"]


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits("val")
    return corrupt(images[:16], "gaussian_noise", 5, seed=1), labels[:16]


@pytest.fixture(scope="module", params=["digits-cnn-bn", "digits-cnn-gn"])
def model_name(request):
    return request.param


def entropy_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=1)


@pytest.mark.parametrize("recipe", CLASSIFIER_RECIPES)
def test_every_method_works_at_batch_1_and_in_a_batch_and_resets(recipe, model_name, digits, state):
    images, _ = digits
    rt = tta_runtime.Runtime.from_pretrained(model_name, recipe=recipe)
    before = state.snapshot(rt.model)
    one = rt.adapt_and_predict(images[0])
    assert isinstance(one, tta_runtime.Result) and one.task == "classification"
    assert one.logits.shape == (10,) and one.probs.shape == (10,)
    assert one.probs.sum() == pytest.approx(1.0, abs=1e-5) and one.label == int(one.probs.argmax())
    assert one.adaptation is not None and one.adaptation.method == rt.recipe.method
    assert np.isfinite(one.adaptation.final_loss)
    batch = rt.adapt_and_predict(images[:4])
    assert isinstance(batch, list) and len(batch) == 4 and all(r.logits.shape == (10,) for r in batch)
    state.assert_bit_exact(rt.model, before)
    state.assert_all_require_grad(rt.model)


def test_predict_takes_gray_batches_and_a_batch_equals_single_images(digits):
    images, _ = digits
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn")
    gray = images[:3, :, :, :1]  # (N, H, W, 1)
    batch = rt.predict(gray)
    singles = [rt.predict(g) for g in gray]
    for b, s in zip(batch, singles):
        np.testing.assert_allclose(b.logits, s.logits, atol=1e-5)
    assert batch[0].ood_scorer in ("energy",) or batch[0].is_ood is not None


def test_tent_lowers_the_batch_entropy(digits):
    images, _ = digits
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", steps=3)
    res = rt.adapt_and_predict(images, norm_stats="batch")
    # Frozen logits under the same batch statistics, for the "before" entropy:
    before = rt.adapt_and_predict(images, norm_stats="batch", steps=0)
    ent_before = entropy_np(np.stack([r.logits for r in before])).mean()
    assert res[0].adaptation.losses[0] == pytest.approx(ent_before, rel=1e-4)
    assert res[0].adaptation.final_loss < ent_before


def test_bn_stats_changes_predictions_but_no_tensor(digits, state):
    images, _ = digits
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="bn_stats")
    snap = state.snapshot(rt.model)
    frozen = np.stack([r.logits for r in rt.predict(images)])
    adapted = np.stack([r.logits for r in rt.adapt_and_predict(images, norm_stats="batch")])
    assert np.abs(adapted - frozen).max() > 1e-3
    assert rt.adapt_and_predict(images[0]).adaptation.steps_run == 0
    state.assert_bit_exact(rt.model, snap)


def test_eata_loss_matches_its_definition():
    torch.manual_seed(0)
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="eata")
    model = rt.model
    x = torch.rand(6, 3, 32, 32)
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters() if "stages.0" in n}
    source = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = get_method("eata", MethodContext(fisher=fisher, source=source, num_classes=10))
    with torch.no_grad():  # move the weights so the Fisher term is not zero
        for n, p in model.named_parameters():
            if n in fisher:
                p.add_(0.01)
    loss = method.loss(model, x, torch.Generator())
    logits = model(x).logits.detach().numpy()
    ent = entropy_np(logits)
    margin = 0.4 * math.log(10)
    keep = ent < margin
    expected = (ent[keep] * np.exp(-(ent[keep] - margin))).mean() if keep.any() else 0.0
    expected += 2000.0 * sum(float((fisher[n] * 0.01**2).sum()) for n in fisher) if keep.any() else 0.0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert method.info["kept"] == int(keep.sum())


def test_eata_takes_no_step_when_no_sample_is_reliable(state):
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="eata", mode="continual")
    snap = state.snapshot(rt.model)
    noise = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    res = rt.adapt_and_predict(noise)
    if res[0].adaptation.method_info["kept"] == 0:
        state.assert_bit_exact(rt.model, snap)
    else:  # the model was confident on noise: then it must have stepped
        assert state.changed(rt.model, snap)


def test_sar_resets_a_collapsed_model_in_continual_mode(digits, state):
    images, _ = digits
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="sar", mode="continual", lr=0.05)
    snap = state.snapshot(rt.model)
    rt.adapt_and_predict(images[:8])
    assert state.changed(rt.model, snap)  # SAM stepped the norm layers
    method = rt._adapter._methods["sar"]
    method.ema = 0.0  # a collapsed history: the next loss keeps the average under 0.2
    res = rt.adapt_and_predict(images[:8])
    assert res[0].adaptation.reset
    state.assert_bit_exact(rt.model, snap)


def test_sam_step_differs_from_a_plain_sgd_step(digits):
    images, _ = digits
    outs = {}
    for opt in ("sgd", "sam"):
        rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", optimizer=opt, lr=0.05, mode="continual")
        rt.adapt_and_predict(images[:8])
        outs[opt] = np.stack([r.logits for r in rt.predict(images[:8])])
    assert np.abs(outs["sgd"] - outs["sam"]).max() > 1e-5


def test_memo_loss_is_the_entropy_of_the_marginal_over_augmentations():
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn")
    x = torch.rand(1, 3, 32, 32)
    method = get_method("memo")
    loss = method.loss(rt.model, x, torch.Generator().manual_seed(3))
    views = augment(x, method.n_aug, torch.Generator().manual_seed(3))
    probs = F.softmax(rt.model(views).logits, dim=1).detach().numpy().mean(axis=0)
    assert float(loss.detach()) == pytest.approx(float(-(probs * np.log(probs)).sum()), rel=1e-5)
    again = augment(x, 4, torch.Generator().manual_seed(3))
    assert torch.equal(again, augment(x, 4, torch.Generator().manual_seed(3)))  # seeded, deterministic
    assert again.min() >= 0 and again.max() <= 1


def test_rotation_loss_is_cross_entropy_of_the_rotation_head():
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn")
    x = torch.rand(2, 3, 32, 32)
    loss = get_method("rotation").loss(rt.model, x, torch.Generator())
    views, labels = rotations(x)
    assert torch.equal(views[2], torch.rot90(x[0], 1, dims=(1, 2))) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(rt.model.rotation_logits(views), labels).detach()), rel=1e-6)


def test_reset_every_returns_to_the_loaded_weights(digits, state):
    images, _ = digits
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", mode="continual", reset_every=3)
    snap = state.snapshot(rt.model)
    reports = [rt.adapt_and_predict(images[i]).adaptation for i in range(3)]
    assert [r.reset for r in reports] == [False, False, True]
    state.assert_bit_exact(rt.model, snap)


def test_a_method_for_the_other_kind_of_model_is_refused(ood_image):
    with pytest.raises(ConfigError, match="classification"):
        tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="slot_tta")
    seg = tta_runtime.Runtime.from_pretrained("slot-shapes-32")
    with pytest.raises(ConfigError, match="segmentation"):
        seg.adapt_and_predict(ood_image, recipe="tent")


def test_bench_tta_writes_json_and_plot(tmp_path):
    from tta_runtime.cli.main import main

    out = tmp_path / "tta.json"
    rc = main([
        "bench", "tta", "--json", str(out), "--n-images", "16", "--corruptions", "gaussian_noise,fog",
        "--methods", "none,tent,bn_stats", "--batch-sizes", "1,8", "--continual-images", "40", "--reset-every", "10", "--continual-methods", "tent",
        "--no-progress",
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    for bs in ("1", "8"):
        methods = report["batch_sizes"][bs]["methods"]
        assert set(methods) == {"none", "tent", "bn_stats"}
        for m in methods.values():
            assert set(m["errors"]) == {"gaussian_noise", "fog"}
            assert all(0 <= e <= 1 for per in m["errors"].values() for e in per.values())
            assert m["seconds_per_image"] > 0
    cont = report["continual"]["tent"]
    assert set(cont["error_over_time"]) == {"continual", "episodic:tent", "none"}
    assert cont["window"] == 40 and len(cont["error_over_time"]["continual"]) == 1 and cont["resets"] >= 3
    assert (tmp_path / cont["plot"]).is_file()
