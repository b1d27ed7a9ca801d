"""The lean paths of #22: the tiled frozen decoder, fused BatchNorm statistics, the thread policy,
`prediction="last_forward"` and `score_ood=False`. Each is checked against the plain computation it replaces."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import tta_runtime
from tta_runtime.adapt.methods.base import entropy
from tta_runtime.errors import ConfigError
from tta_runtime.models.classifier import AdaptiveBatchNorm2d, images_to_tensor, set_norm_mode
from tta_runtime.models.segmenter import _frozen_call, eager_decoder
from tta_runtime.threads import ThreadPolicy, usable_cores


@pytest.mark.parametrize("batch", [1, 3])
def test_tiled_decoder_matches_the_eager_one(runtime: tta_runtime.Runtime, batch: int) -> None:
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    idx = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))[:300]
    for pixels in (None, idx):
        with torch.inference_mode():
            fast = runtime.model(x, pixels)
            with eager_decoder():
                eager = runtime.model(x, pixels)
        with torch.enable_grad():  # the autograd path never tiles
            graph = runtime.model(x, pixels)
        for name in ("masks", "reconstruction", "rgb", "logits", "slots", "attention"):
            assert torch.allclose(getattr(fast, name), getattr(eager, name), atol=1e-4, rtol=0), name
            assert torch.allclose(getattr(graph, name).detach(), getattr(eager, name), atol=1e-4, rtol=0), name


def test_tiled_path_only_without_autograd_tracing_or_vmap() -> None:
    t = torch.ones(2)
    with torch.no_grad():
        assert _frozen_call(t)
        seen = []
        torch.func.vmap(lambda v: seen.append(_frozen_call(v)) or v)(torch.ones(3, 2))
        assert seen == [False]
        with eager_decoder():
            assert not _frozen_call(t)
    with torch.enable_grad():
        assert not _frozen_call(t)


@pytest.mark.parametrize("mode", ["batch", "prior"])
def test_batchnorm_statistics_match_the_written_out_formula(mode: str) -> None:
    torch.manual_seed(0)
    bn = AdaptiveBatchNorm2d(5, stat_mode=mode, prior=4.0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(7, 5, 6, 6) * 3 + 2

    def reference(x: torch.Tensor) -> torch.Tensor:
        var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        w = x.shape[0] / (4.0 + x.shape[0]) if mode == "prior" else 1.0
        mean = (1 - w) * bn.running_mean + w * mean_b
        var = (1 - w) * bn.running_var + w * var_b
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + bn.eps)[None, :, None, None]
        return y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]

    with torch.no_grad():
        assert torch.allclose(bn(x), reference(x), atol=1e-5)
    xg = x.clone().requires_grad_()
    (bn(xg) ** 2).sum().backward()
    grads = (xg.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone())
    xg.grad, bn.weight.grad, bn.bias.grad = None, None, None
    (reference(xg) ** 2).sum().backward()
    for mine, ref in zip(grads, (xg.grad, bn.weight.grad, bn.bias.grad), strict=True):
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-4)


def test_default_threads_are_one_for_small_models_and_the_callers_setting_comes_back() -> None:
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent")
    before = torch.get_num_threads()
    seen: list[int] = []
    rt.adapt_and_predict(np.zeros((32, 32, 3), np.uint8), on_step=lambda _i, _o: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    fixed = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", threads=2)
    seen.clear()
    fixed.adapt_and_predict(np.zeros((32, 32, 3), np.uint8), on_step=lambda _i, _o: seen.append(torch.get_num_threads()))
    assert set(seen) == {2} and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        tta_runtime.Runtime.from_pretrained("digits-cnn-bn", threads=0)


def test_thread_policy_sizes_by_work_and_shares_cores() -> None:
    policy = ThreadPolicy(torch.nn.Identity(), 8, torch.device("cpu"), None)
    policy._flops = 1e6  # a tiny model: one thread whatever the machine
    assert policy.choose(1) == 1 and policy.choose(64) == 1
    policy._flops = 1e12  # a large one: the cores, shared between the Runtimes at work
    cores = usable_cores()
    assert policy.choose(1, active=1) == cores
    assert policy.choose(1, active=2) == max(1, cores // 2)
    assert policy.choose(1, active=10 * cores) == 1
    policy._flops = math.inf  # not countable: as large
    assert policy.choose(1) == cores
    assert ThreadPolicy(torch.nn.Identity(), 8, torch.device("cpu"), 3).choose(1, active=99) == 3


def test_last_forward_is_tents_own_loop(state) -> None:
    """prediction='last_forward' returns what Tent's loop returns: the outputs of its one forward."""
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", prediction="last_forward", score_ood=False)
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    snap = state.snapshot(rt.model)
    results = rt.adapt_and_predict(images)
    state.assert_bit_exact(rt.model, snap)
    model = copy.deepcopy(rt.model)
    set_norm_mode(model, rt.recipe.norm_stats, rt.recipe.norm_prior)
    with torch.no_grad():
        logits = model(images_to_tensor(images)).logits
    probs = torch.stack([torch.as_tensor(r.probs) for r in results])
    assert torch.allclose(probs, logits.softmax(1), atol=1e-5)
    assert results[0].adaptation.steps_run == 1
    assert math.isclose(results[0].adaptation.final_loss, float(entropy(logits).mean()), rel_tol=1e-5)
    assert math.isnan(results[0].ood_score) and results[0].is_ood is None and results[0].ood_scorer == "off"
    # the shipped recipe has Tent's semantics (and an OOD score); prediction='adapted' answers after the update
    shipped = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent").adapt_and_predict(images)
    assert shipped[0].adaptation.steps_run == 1 and shipped[0].ood_scorer != "off"
    np.testing.assert_allclose(np.stack([r.probs for r in shipped]), probs.numpy(), atol=1e-5)
    after = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", prediction="adapted").adapt_and_predict(images)
    assert not np.allclose(np.stack([r.probs for r in after]), probs.numpy(), atol=1e-6)


def test_last_forward_is_refused_where_it_means_nothing(runtime: tta_runtime.Runtime) -> None:
    with pytest.raises(ConfigError, match="last_forward"):
        runtime.adapt_and_predict(np.zeros((32, 32, 3), np.uint8), prediction="last_forward", steps=1)
    memo = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="memo")
    with pytest.raises(ConfigError, match="other views"):
        memo.adapt_and_predict(np.zeros((32, 32, 3), np.uint8), prediction="last_forward")


def test_score_ood_off_skips_the_frozen_pass_and_changes_no_answer(ood_image: np.ndarray) -> None:
    on = tta_runtime.Runtime.from_pretrained("slot-shapes-32", steps=3)
    off = tta_runtime.Runtime.from_pretrained("slot-shapes-32", steps=3, score_ood=False)
    a, b = on.adapt_and_predict(ood_image), off.adapt_and_predict(ood_image)
    assert np.array_equal(a.segmentation, b.segmentation) and np.allclose(a.masks, b.masks, atol=1e-5)
    assert math.isnan(b.ood_score) and b.is_ood is None and not math.isnan(b.recon_mse)
    assert "forward_s" in b.timings and b.timings["forward_s"] < a.timings["forward_s"]
    p = off.predict(ood_image)
    assert np.array_equal(p.segmentation, on.predict(ood_image).segmentation) and math.isnan(p.ood_score)
    with pytest.raises(ConfigError, match="score_ood"):
        off.adapt_and_predict(ood_image, adapt="when_ood")


def test_score_ood_off_on_onnxruntime_exports_no_ood_part(ood_image: np.ndarray) -> None:
    on = tta_runtime.Runtime.from_pretrained("slot-shapes-32", backend="onnxruntime")
    off = tta_runtime.Runtime.from_pretrained("slot-shapes-32", backend="onnxruntime", score_ood=False)
    assert "ood_score" not in [o["name"] for o in off._ort._manifest["outputs"]]
    a, b = on.predict(ood_image), off.predict(ood_image)
    assert math.isnan(b.ood_score) and b.is_ood is None and not math.isnan(a.ood_score)
    assert np.array_equal(a.segmentation, b.segmentation) and np.allclose(a.masks, b.masks, atol=1e-5)


def test_bench_overhead_writes_its_ratios(tmp_path, capsys) -> None:
    import json

    from tta_runtime.cli.main import main

    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--sections", "frozen_segmenter", "--calls", "2", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    seg = report["frozen_segmenter"]
    assert seg["ratio_to_reference"]["runtime"] > 0 and seg["max_abs_diff"]["masks"] < 1e-4 and seg["same_segmentation"]
    assert report["command"].startswith("tta-runtime bench overhead") and "the eager decoder" in capsys.readouterr().out
    assert main(["bench", "overhead", "--sections", "tent,nope", "--no-progress"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_counting_flops_leaves_the_models_buffers_alone() -> None:
    from tta_runtime.threads import forward_flops

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.conv(x)

    m = Counting()
    flops = forward_flops(m, 8, torch.device("cpu"))
    assert flops == 2 * 4 * 3 * 9 * 6 * 6 and float(m.calls) == 0.0
