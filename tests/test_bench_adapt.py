"""Batched adaptation (several images at once, each with its own weights) and `tta-runtime bench adapt`.

The batched path must give what the one loop gives for the same recipe, image by image: the same losses,
steps, stops, rollbacks and adapted masks (up to float summation order), and never touch the model.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from tta_runtime.adapt.loop import Adapter
from tta_runtime.adapt.batched import BatchedAdapter, ExecutionOptions, adam_update
from tta_runtime.evaluation.bench_adapt import bench_adapt, build_configs
from tta_runtime.cli.main import main
from tta_runtime.config import AdaptConfig
from tta_runtime.errors import ConfigError, UnknownNameError
from tta_runtime.hub import load_optimizer_state, load_recipe
from tta_runtime.data.scenes import generate_scenes
from tta_runtime.models.segmenter import images_to_tensor, segmentation_masks

# In float64 the two paths agree to far below any visible difference. (In float32 they agree to a few
# ulps per step, but Adam divides each gradient by its own magnitude, so a weight whose gradient is
# within rounding error of zero can take a +lr or -lr step either way: float32 runs drift apart like two
# thread counts do. The bench reports their agreement on real runs.)
TOL64 = 1e-9
MASK_TOL = 1e-4  # float32, same arithmetic on both sides (batch of one vs batch member, compiled vs eager)

RECIPES = {
    "all_params_all_pixels": dict(steps=4, lr=1e-3),
    "frozen_encoder_pixels_cosine_clip": dict(
        steps=5, lr=3e-3, params="no_encoder", pixel_fraction=0.5, lr_schedule="cosine", warmup_steps=2, grad_clip=0.05
    ),
    "training_moments_weight_decay": dict(steps=4, lr=2e-3, optimizer_state="training", weight_decay=1e-4),
    "early_stop_at_different_steps": dict(steps=25, lr=5e-4, params="no_encoder", early_stop_patience=2, early_stop_min_delta=0.0),
}


@pytest.fixture(scope="module")
def ood_batch() -> torch.Tensor:
    """(3, 3, 32, 32) float in [0, 1]: three different OOD scenes."""
    images = np.concatenate([
        generate_scenes("textured_background", 2, seed=0, size=32)[0], generate_scenes("unseen_colours", 1, seed=0, size=32)[0]
    ])
    return images_to_tensor(images)


@pytest.fixture(scope="module")
def model64(runtime):
    """The shipped model in float64, and its training moments."""
    moments = load_optimizer_state(runtime.folder, runtime.card)
    return copy.deepcopy(runtime.model).double(), {k: v.double() for k, v in moments.items()}


@pytest.mark.parametrize(("adam", "sync_every"), [("functional", 1), ("functional", 3), ("fused", 3)])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_batched_matches_the_one_loop_image_by_image(model64, ood_batch, state, name, adam, sync_every):
    """Also when the host reads the guard back only every 3 steps: stops and rollbacks are decided on the device
    (with fused Adam, on flat copies of the weights)."""
    model, moments = model64
    cfg = load_recipe("slot_tta", **RECIPES[name])
    images = ood_batch.double()
    before = state.snapshot(model)
    ex = ExecutionOptions(adam=adam, sync_every=sync_every)
    out, reports = BatchedAdapter(model, cfg, execution=ex, training_optimizer_state=moments).run(images)
    state.assert_bit_exact(model, before)  # the batched path never writes the model
    loop = Adapter(model, cfg, training_optimizer_state=moments)
    for i in range(len(images)):
        ref_out, ref = loop.run(images[i : i + 1])
        assert reports[i].steps_run == ref.steps_run
        assert reports[i].stopped_early == ref.stopped_early
        assert reports[i].rolled_back == ref.rolled_back and reports[i].rollback_reason == ref.rollback_reason
        np.testing.assert_allclose(reports[i].losses, ref.losses, rtol=1e-9, atol=0)  # also inf/nan in place
        assert reports[i].final_loss == pytest.approx(ref.final_loss, rel=1e-9)
        torch.testing.assert_close(out.masks[i], ref_out.masks[0], atol=TOL64, rtol=1e-9)
        torch.testing.assert_close(out.reconstruction[i], ref_out.reconstruction[0], atol=TOL64, rtol=1e-9)
    if name == "early_stop_at_different_steps":
        assert len({r.steps_run for r in reports}) > 1, "the images should stop at different steps"
        assert all(r.stopped_early for r in reports)


@pytest.mark.parametrize(("adam", "sync_every"), [("functional", 1), ("fused", 1), ("functional", 2), ("fused", 5)])
def test_an_image_that_fails_rolls_back_alone_like_in_the_loop(model64, ood_batch, adam, sync_every):
    """A NaN pixel makes that image's loss non-finite at step 0: it rolls back, its batch mates go on."""
    model, _ = model64
    cfg = load_recipe("slot_tta", steps=3, lr=1e-3, params="no_encoder")
    images = ood_batch.double().clone()
    images[1, :, 5, 5] = float("nan")
    out, reports = BatchedAdapter(model, cfg, execution=ExecutionOptions(adam=adam, sync_every=sync_every)).run(images)
    assert [r.rolled_back for r in reports] == [False, True, False]
    assert reports[1].rollback_reason == "non-finite loss at step 0" and reports[1].steps_run == 0
    loop = Adapter(model, cfg)
    for i in range(len(images)):
        ref_out, ref = loop.run(images[i : i + 1])
        assert (reports[i].rolled_back, reports[i].rollback_reason, reports[i].steps_run) == (
            ref.rolled_back, ref.rollback_reason, ref.steps_run
        )
        torch.testing.assert_close(out.masks[i], ref_out.masks[0], atol=TOL64, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize(("adam", "sync_every"), [("functional", 1), ("fused", 1), ("fused", 4)])
def test_exploding_lr_rolls_back_to_finite_predictions(runtime, ood_batch, adam, sync_every):
    cfg = load_recipe("slot_tta", steps=6, lr=10.0)
    ex = ExecutionOptions(adam=adam, sync_every=sync_every)
    out, reports = BatchedAdapter(runtime.model, cfg, execution=ex).run(ood_batch)
    assert all(r.rolled_back and "non-finite" in (r.rollback_reason or "") for r in reports)
    assert all(r.steps_run < 6 and np.isfinite(r.final_loss) for r in reports)
    assert torch.isfinite(out.masks).all()


def test_each_image_is_independent_of_its_batch_mates(runtime, ood_batch):
    """A batch of one, and batches cut into chunks of `batch_size`, give the same as the whole batch.

    On one thread: with several, oneDNN splits a reduction differently for different batch sizes on some
    CPUs (seen on an Intel Xeon with 2 threads: 2e-3 apart after 4 steps), which is not batch mates leaking."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _independent_of_batch_mates(runtime, ood_batch)
    finally:
        torch.set_num_threads(threads)


def _independent_of_batch_mates(runtime, ood_batch):
    cfg = load_recipe("slot_tta", steps=4, lr=2e-3, params="no_encoder", pixel_fraction=0.5)
    together, _ = BatchedAdapter(runtime.model, cfg).run(ood_batch)
    alone, _ = BatchedAdapter(runtime.model, cfg).run(ood_batch[1:2])
    torch.testing.assert_close(alone.masks[0], together.masks[1], atol=MASK_TOL, rtol=0)
    chunked, reports = BatchedAdapter(runtime.model, cfg, execution=ExecutionOptions(batch_size=2)).run(ood_batch)
    assert chunked.masks.shape == together.masks.shape and len(reports) == 3
    torch.testing.assert_close(chunked.masks, together.masks, atol=MASK_TOL, rtol=0)


def test_fused_adam_and_compiled_step_match_the_functional_step(runtime, ood_batch):
    cfg = load_recipe("slot_tta", steps=3, lr=2e-3, params="no_encoder", pixel_fraction=0.5)
    ref, ref_reps = BatchedAdapter(runtime.model, cfg).run(ood_batch[:2])
    for ex in (ExecutionOptions(adam="fused"), ExecutionOptions(compile="default", compile_backend="eager")):
        out, reps = BatchedAdapter(runtime.model, cfg, execution=ex).run(ood_batch[:2])
        torch.testing.assert_close(out.masks, ref.masks, atol=MASK_TOL, rtol=0)
        assert [r.steps_run for r in reps] == [r.steps_run for r in ref_reps]


def test_bf16_autocast_runs_and_stays_close(runtime, ood_batch):
    cfg = load_recipe("slot_tta", steps=2, lr=1e-3, params="no_encoder")
    ref, _ = BatchedAdapter(runtime.model, cfg).run(ood_batch[:1])
    out, reps = BatchedAdapter(runtime.model, cfg, execution=ExecutionOptions(autocast="bf16")).run(ood_batch[:1])
    assert out.masks.dtype == torch.float32 and reps[0].steps_run == 2
    assert (out.masks - ref.masks).abs().mean() < 0.02  # 16-bit maths: close, not equal
    assert (out.masks.argmax(1) == ref.masks.argmax(1)).float().mean() > 0.9


def test_adam_update_equals_torch_adam():
    torch.manual_seed(0)
    p = torch.randn(4, 5)
    opt_p = p.clone().requires_grad_(True)
    opt = torch.optim.Adam([opt_p], lr=3e-3, weight_decay=1e-2)
    w, m, v = [p.clone()], [torch.zeros_like(p)], [torch.zeros_like(p)]
    for step in range(1, 6):
        g = torch.randn(4, 5)
        opt_p.grad = g.clone()
        opt.step()
        w, m, v = adam_update(w, [g], m, v, torch.tensor(float(step), dtype=torch.float64), torch.tensor(3e-3, dtype=torch.float64), 1e-2)
    torch.testing.assert_close(w[0], opt_p.detach(), atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(optimizer="sgd"), "per-image Adam"),
        (dict(mode="continual"), "episodic"),
        (dict(method="slot_mask_entropy"), "slot_reconstruction"),
        (dict(restore_prob=0.01), "restore_prob"),
    ],
)
def test_unsupported_recipes_are_refused(runtime, overrides, words):
    with pytest.raises(ConfigError, match=words):
        BatchedAdapter(runtime.model, load_recipe("slot_tta", **overrides))


def test_training_moments_without_moments_are_refused(runtime):
    with pytest.raises(ConfigError, match="fresh"):
        BatchedAdapter(runtime.model, load_recipe("slot_tta", optimizer_state="training"))


def test_bad_images_and_execution_options_are_refused(runtime):
    ad = BatchedAdapter(runtime.model, load_recipe("slot_tta", steps=1))
    with pytest.raises(ConfigError, match=r"\(B, 3, S, S\)"):
        ad.run(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="compile"):
        ExecutionOptions(compile="fast")
    with pytest.raises(ValueError, match="batch_size"):
        ExecutionOptions(batch_size=0)


def test_bench_rejects_unknown_names_and_missing_devices():
    with pytest.raises(UnknownNameError, match="unseen_colours"):
        bench_adapt(splits=["unseen_colour"], n_images=1)
    with pytest.raises(UnknownNameError, match="compile"):
        build_configs(AdaptConfig(), AdaptConfig(steps=10), exec_levers=["compiled"])
    with pytest.raises(UnknownNameError, match="fast"):
        bench_adapt(configs=["fats"], n_images=1)
    with pytest.raises(ConfigError, match="twice"):
        build_configs(AdaptConfig(), AdaptConfig(steps=10), batch_sizes=(8, 8))
    with pytest.raises(ConfigError, match="cuda"):
        bench_adapt(device="tpu0", n_images=1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            bench_adapt(device="cuda", n_images=1)


def test_cli_bad_option_is_one_error_line(capsys):
    assert main(["bench", "adapt", "--batch-sizes", "eight"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--batch-sizes" in err


# ----------------------------------------------------------------------------------------------------
# The bench on a tiny setting


def test_bench_adapt_cli_writes_well_formed_json(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path, capsys):
    faithful = tmp_path / "tiny_faithful.toml"
    faithful.write_text('method = "slot_reconstruction"\nparams = "all"\nlr = 5e-4\nsteps = 4\n')
    fast = tmp_path / "tiny_fast.toml"
    fast.write_text(
        'method = "slot_reconstruction"\nparams = "no_encoder"\npixel_fraction = 0.5\nlr = 2e-3\nsteps = 2\n'
        'lr_schedule = "cosine"\nwarmup_steps = 1\n'
    )
    out = tmp_path / "bench.json"
    argv = ["bench", "adapt", "--model", str(tiny_model_dir), "--baseline", str(faithful), "--fast", str(fast),
            "--splits", "unseen_colours,more_objects", "--n-images", "2", "--batch-sizes", "2",
            "--timing-size", "16", "--timing-slots", "2", "--timing-images", "1",
            "--no-memory", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "target" in printed and "wrote" in printed
    report = json.loads(out.read_text())
    assert report["command"].startswith("tta-runtime bench adapt")
    assert report["model"]["weights_sha256"] and report["model"]["resolution"] == 16
    assert report["hardware"]["torch"] == torch.__version__ and report["date"]
    assert report["protocol"]["n_images"] == 4
    names = list(report["configs"])
    assert names == ["faithful", "lever:frozen_encoder", "lever:pixel_subset", "lever:schedule", "fast", "fast:batched2"]
    for name, r in report["configs"].items():
        assert len(r["per_image_fg_ari"]) == 4
        assert r["gain"]["mean"] == pytest.approx(r["fg_ari_after"] - r["fg_ari_before"], abs=1e-5)
        for key in ("seconds_per_image", "ms_per_step", "images_per_second", "time_ratio_vs_faithful"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
    assert report["configs"]["faithful"]["time_ratio_vs_faithful"] == 1.0
    assert report["configs"]["lever:schedule"]["recipe_changes_vs_faithful"] == {
        "lr": 2e-3, "steps": 2, "lr_schedule": "cosine", "warmup_steps": 1
    }
    assert report["configs"]["fast:batched2"]["execution"]["batch_size"] == 2
    agree = report["batched_vs_loop"]["fast:batched2"]
    assert agree["loop"] == "fast" and agree["pixel_agreement"] == 1.0 and agree["max_abs_fg_ari_diff"] == 0.0
    assert set(report["target"]) >= {"gain_fraction_min", "time_ratio_max", "time_ratio", "met"}
    timing = report["timing_model"]
    assert timing["segmenter"]["resolution"] == 16 and timing["segmenter"]["num_slots"] == 2
    assert list(timing["configs"]) == names
    assert all(r["seconds_per_image"] > 0 and r["peak_memory_mb"] is None for r in timing["configs"].values())


def test_bench_measures_cpu_peak_memory_in_a_fresh_process(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path):
    faithful = tmp_path / "f.toml"
    faithful.write_text('method = "slot_reconstruction"\nsteps = 2\n')
    report = bench_adapt(
        str(tiny_model_dir), splits=["unseen_colours"], n_images=1, baseline=str(faithful), fast=str(faithful),
        levers=False, batch_sizes=(), configs=["faithful"],
    )
    mem = report["configs"]["faithful"]["peak_memory_mb"]
    assert mem is not None and mem >= 0


# -- the recipe's [execution] table: Runtime.adapt_and_predict on a batch -----------------------------


def test_a_recipe_with_execution_adapts_a_batch_at_once_through_the_runtime(ood_batch) -> None:
    from tta_runtime import Runtime

    rt = Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta_batched", steps=3)
    assert rt.recipe.execution is not None and rt.recipe.execution.batch_size == 8
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    images = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in ood_batch]
    results = rt.adapt_and_predict(images)
    # exactly what BatchedAdapter gives on the same tensor: the runtime routes the batch there
    ref, reports = BatchedAdapter(rt.model, rt.recipe).run(images_to_tensor(np.stack(images)))
    for i, r in enumerate(results):
        assert r.adaptation.steps_run == 3 and r.adaptation.skipped is None
        assert np.allclose(r.adaptation.losses, reports[i].losses, rtol=1e-5)  # the runtime's /255 rounds differently
        assert np.allclose(r.masks, segmentation_masks(rt.model.cfg, ref)[i].reshape(-1, 32, 32).numpy(), atol=MASK_TOL)
    assert all(torch.equal(before[k], v) for k, v in rt.model.state_dict().items())
    # gated off: every image keeps the frozen prediction and says why
    skipped = rt.adapt_and_predict(images, adapt="never")
    plain = rt.predict(images)
    assert all(s.adaptation.skipped == "adapt='never'" and np.array_equal(s.masks, p.masks) for s, p in zip(skipped, plain))
    # execution=None per call: the one loop, image by image
    assert rt.adapt_and_predict(images, execution=None)[0].adaptation.timings.get("batch") is None
    with pytest.raises(ConfigError, match="per-step callback"):
        rt.adapt_and_predict(images, on_step=lambda *a, **k: None)
    with pytest.raises(ConfigError, match="episodic"):
        rt.adapt_and_predict(images, mode="continual")
    with pytest.raises(ConfigError, match="execution"):
        Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta_batched", execution={"batch_size": 0})


def test_exec_lever_configs_pair_async_with_the_same_levers_without_it():
    names = [c.name for c in build_configs(
        AdaptConfig(), AdaptConfig(steps=10), levers=False, batch_sizes=(1,), exec_levers=["graphs", "bf16", "fused", "async"]
    )]
    assert "fast:batched1+graphs+bf16+fused+async" in names
    assert "fast:batched1+graphs+bf16+fused" in names  # measured in the same process, for the async ratio
    two = [c.name for c in build_configs(AdaptConfig(), AdaptConfig(steps=10), levers=False, batch_sizes=(1,),
                                         exec_levers=["fused", "async"])]
    assert two == ["faithful", "fast", "fast:batched1", "fast:batched1+fused", "fast:batched1+async",
                   "fast:batched1+fused+async"]
