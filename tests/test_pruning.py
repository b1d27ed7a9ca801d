"""FTWT dynamic pruning (tta_runtime.prune, tta_runtime.training.ftwt): targets, FLOPs accounting, mask-multiply and gather paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tta_runtime.config import ClassifierConfig
from tta_runtime.errors import ConfigError
from tta_runtime.models.classifier import build_classifier, set_norm_mode
from tta_runtime.prune import (
    BucketedClassifier,
    FTWTClassifier,
    GatheredClassifier,
    PrunedClassifier,
    conv_units,
    fit_buckets,
    ftwt_targets,
    pruned_variants,
    save_pruned,
    static_ks,
    unit_macs,
)
from tta_runtime.training import train_ftwt


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
    # bucket fine-tuning: buckets fitted when the predictor loss switches off
    _, log = train_ftwt(_tiny().backbone, images, labels, r=0.7, epochs=2, batch=16, bucket_quantiles=(0.5,))
    assert log.buckets is not None and log.buckets.widths[-1] == [4, 4, 8, 8]
    with pytest.raises(ConfigError, match="not both"):
        train_ftwt(_tiny().backbone, images, labels, r=0.7, epochs=2, static_quantile=0.5, bucket_quantiles=(0.5,))


# --------------------------------------------------------------------------------------------------
# The deployable module, variants in the model folder, Runtime(prune=...), buckets and ONNX paths


def test_pruned_classifier_equals_ftwt_mask_multiply() -> None:
    ftwt = _tiny()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    dyn = PrunedClassifier.from_ftwt(ftwt)
    ks = [4, 2, 5, 3]
    top = PrunedClassifier.from_ftwt(ftwt, masks="topk", ks=ks)
    with torch.no_grad():
        ref_dyn, ref_top = ftwt(x), ftwt(x, masks="topk", ks=ks)
        assert torch.allclose(dyn(x).logits, ref_dyn.logits, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(dyn.last_masks, ref_dyn.masks))
        assert torch.allclose(top(x).logits, ref_top.logits, atol=1e-6)
    assert top.kept()[:, 1:].tolist() == [ks[1:]] * 6
    # parameter names are the base model's plus predictors.*: recipes and EATA's Fisher keep working
    base_keys = set(ftwt.backbone.state_dict())
    assert set(dyn.state_dict()) == base_keys | {f"predictors.{k}" for k in ftwt.predictors.state_dict()}
    # cost accounting agrees with unit_macs + predictor_macs by hand
    units = conv_units(top)
    full = torch.tensor([[4, 4, 8, 8]], dtype=torch.float64)
    kept = torch.tensor([ks], dtype=torch.float64)
    hand = (unit_macs(units, kept).sum() + sum(kept[0, u - 1] * units[u].conv.out_channels for u in range(1, 4)))
    assert float(top.macs_fraction()[0]) == pytest.approx(float(hand / unit_macs(units, full).sum()))
    with pytest.raises(ConfigError, match="ks"):
        PrunedClassifier(ftwt.backbone.cfg, masks="topk", ks=[4, 9, 1, 1])


def test_fixed_masks_are_reused_and_released() -> None:
    model = PrunedClassifier.from_ftwt(_tiny())
    for p in model.predictors:  # input-dependent decisions (the bias alone would decide the same for all)
        torch.nn.init.normal_(p.fc.weight, 0.0, 5.0, generator=torch.Generator().manual_seed(5))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    other = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(other)
        own_other = [m.clone() for m in model.last_masks]
        with model.fixed_masks(x) as fixed:
            model(other)  # masks of x, not of `other`
            assert all(torch.equal(a, b) for a, b in zip(model.last_masks, fixed))
            model(other[:1].expand(8, -1, -1, -1))  # another batch size: the union of x's masks
            assert all(torch.equal(a[0], b.amax(0)) for a, b in zip(model.last_masks, fixed))
            with pytest.raises(ConfigError, match="nest"):
                with model.fixed_masks(x):
                    pass
        model(other)
    assert all(torch.equal(a, b) for a, b in zip(model.last_masks, own_other))
    assert any(not torch.equal(a, b) for a, b in zip(fixed, own_other))  # the test has teeth


def _variant_folder(tmp_path):
    """A copy of the shipped digits BN model with a quickly trained pruned variant in it."""
    import shutil

    from tta_runtime.hub import find_model

    folder = tmp_path / "digits-cnn-bn"
    shutil.copytree(find_model("digits-cnn-bn"), folder, ignore=shutil.ignore_patterns("prune"))
    from tta_runtime.models.classifier import load_classifier

    backbone, _ = load_classifier(folder)
    ftwt = FTWTClassifier(backbone)
    for p in ftwt.predictors:  # untrained predictors with input-dependent decisions (training is tested above)
        torch.nn.init.normal_(p.fc.weight, 0.0, 1.0, generator=torch.Generator().manual_seed(6))
    ks = [16, 8, 16, 16, 32, 32]  # half of every pruned unit
    model = PrunedClassifier.from_ftwt(ftwt, masks="topk", ks=ks)
    save_pruned(model, folder, "r0.6", part="classifier", r=0.6, masks="topk", ks=ks)
    return folder, model


def test_runtime_loads_a_pruned_variant_and_adapts_with_fixed_masks(tmp_path) -> None:
    from tta_runtime import Runtime
    from tta_runtime.data.digits import corrupt, load_digits
    from tta_runtime.errors import ModelLoadError

    folder, model = _variant_folder(tmp_path)
    assert pruned_variants(folder) == ["r0.6"]
    rt = Runtime.from_pretrained(folder, prune="r0.6", recipe="tent")
    assert isinstance(rt.model, PrunedClassifier) and rt.model.ks == model.ks
    x, _ = load_digits("test")
    xs = corrupt(x[:8], "gaussian_noise", 5, seed=0)
    with torch.no_grad():
        ref = model(torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255).logits
    res = rt.predict(xs)
    assert np.allclose(np.stack([r.logits for r in res]), ref.numpy(), atol=1e-5)
    info = res[0].pruning
    assert info["variant"] == "r0.6" and 0 < info["macs_fraction"] < 1 and info["kept_fraction"][0] == 1.0
    assert res[0].to_dict()["pruning"] == info
    # adaptation: masks predicted once on the batch, reused by the steps; episodic reset is bit-exact
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    seen = []
    rt.adapt_and_predict(xs, on_step=lambda *a, **k: seen.append([m.clone() for m in rt.model.last_masks]), steps=3)
    assert len(seen) >= 3 and all(torch.equal(a, b) for s in seen for a, b in zip(s, seen[0]))
    assert all(torch.equal(before[k], v) for k, v in rt.model.state_dict().items())
    assert rt.model._fixed is None
    with pytest.raises(ModelLoadError, match="r0.6"):
        Runtime.from_pretrained(folder, prune="r0.9")
    with pytest.raises(ConfigError, match="prune"):
        Runtime.from_pretrained(folder, prune="r0.6", backend="onnxruntime")


def test_a_variant_made_from_other_weights_is_refused(tmp_path) -> None:
    import json

    from tta_runtime import Runtime
    from tta_runtime.errors import ModelLoadError

    folder, _ = _variant_folder(tmp_path)
    card_path = folder / "prune" / "r0.6" / "prune.json"
    card = json.loads(card_path.read_text())
    card["base_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="other weights"):
        Runtime.from_pretrained(folder, prune="r0.6")


def test_buckets_and_onnx_paths_match_pytorch() -> None:
    pytest.importorskip("onnxruntime")
    from tta_runtime.evaluation.bench_prune import _GatherGraph, ort_session

    ftwt = _tiny()
    for p in ftwt.predictors:  # input-dependent decisions
        torch.nn.init.normal_(p.fc.weight, 0.0, 5.0, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    wb = fit_buckets(ftwt, images, (0.3, 0.7))
    buckets = BucketedClassifier(ftwt, wb)
    assert len(wb.widths) == 3 and wb.widths[-1] == [4, 4, 8, 8]
    assert all(a <= b for w0, w1 in zip(wb.widths, wb.widths[1:]) for a, b in zip(w0, w1))
    assert all(sorted(o.tolist()) == list(range(len(o))) for o in wb.order)  # each order is a permutation
    xs = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # the bucket path computes exactly the mask-multiply forward with bucket masks, input by input
        ref = ftwt(xs, masks="buckets", buckets=wb).logits
        got = torch.cat([buckets(xs[i : i + 1]) for i in range(len(xs))])
        assert torch.allclose(got, ref, atol=1e-5)
        # the full-width bucket is the dense model (filters only reordered)
        x = xs[:1]
        full = buckets.run_bucket(len(wb.widths) - 1, buckets.stem(x))
        assert torch.allclose(full, ftwt(x, masks="dense").logits, atol=1e-5)
        # a bucket's masks keep exactly its width of the most frequent filters
        m = wb.masks(2, torch.tensor([0, 1]))
        assert m.sum(1).tolist() == [wb.widths[0][2], wb.widths[1][2]]
        assert m[0, wb.order[2][: wb.widths[0][2]]].min() == 1
        gather = GatheredClassifier(ftwt, [4, 2, 5, 3])
        sess = ort_session(_GatherGraph(gather), x, threads=1)
        for seed in range(5):  # fresh inputs: the graph's TopK picks the channels, not the traced ones
            xi = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(10 + seed))
            assert np.abs(sess(xi.numpy()) - gather(xi).numpy()).max() < 1e-5


def test_cli_bench_prune_writes_report_plot_and_variant(tmp_path, capsys) -> None:
    import json
    import shutil

    from tta_runtime.cli.main import main
    from tta_runtime.hub import find_model

    folder = tmp_path / "digits-cnn-bn"
    shutil.copytree(find_model("digits-cnn-bn"), folder, ignore=shutil.ignore_patterns("prune"))
    out = tmp_path / "bench" / "prune.json"
    rc = main(["bench", "prune", "--model", str(folder), "--rs", "0.6", "--epochs", "1", "--calls", "3",
               "--adapt-images", "4", "--save-variant", "0.6", "--json", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert row["r"] == 0.6 and 0 <= row["static"]["accuracy"] <= 1
    assert set(row["latency_ms_batch1"]) >= {"dense", "dense_folded", "gather", "buckets", "ort_dense", "ort_gather"}
    assert max(row["max_abs_logit_diff"].values()) < 1e-4  # every path computes what it claims to
    assert set(row["with_adaptation"]["pruned"]) == {"none", "bn_stats", "tent"}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert pruned_variants(folder) == ["r0.6"]
    assert "load" not in capsys.readouterr().err
    assert main(["prune", "train", "--model", str(folder), "--r", "1.5"]) == 2  # a clear error, no traceback
    assert "--r must be in (0, 1]" in capsys.readouterr().err
