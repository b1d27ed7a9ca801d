"""Tests for tta_runtime.classifier (the CNN, its switchable BatchNorm) and the shipped digits models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.models.classifier import (
    AdaptiveBatchNorm2d,
    ClassifierOutput,
    build_classifier,
    images_to_tensor,
    load_classifier,
    norm_parameters,
    rotate_quarters,
    set_norm_mode,
)
from tta_runtime.config import ClassifierConfig
from tta_runtime.data.digits import LABELS, corrupt, load_digits
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError
from tta_runtime.hub import find_model, load_card, load_weights

SHIPPED = ("digits-cnn-bn", "digits-cnn-gn")
TINY = ClassifierConfig(resolution=16, widths=(8, 16), groups=4)  # 2 stages: feature maps 16x16 and 8x8


def tiny(norm: str = "batch", **kw: object) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_classifier(TINY.model_copy(update={"norm": norm, **kw}))


def randomise_bn(bn: AdaptiveBatchNorm2d, seed: int = 0) -> None:
    """Give a BN layer non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))


# ----------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_output_shapes_and_types(norm: str):
    model = tiny(norm)
    x = torch.rand(3, 3, 16, 16)
    out = model(x)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (3, 10) and out.features.shape == (3, 16)
    assert out.logits.dtype == torch.float32
    assert model.rotation_logits(x).shape == (3, 4)
    torch.testing.assert_close(model.features(x), out.features)
    torch.testing.assert_close(model.head(out.features), out.logits)  # features are the head's input
    kinds = {type(m) for m in model.modules()}
    assert (AdaptiveBatchNorm2d in kinds) == (norm == "batch") and (nn.GroupNorm in kinds) == (norm != "batch")


def test_default_config_is_the_documented_architecture():
    model = build_classifier(ClassifierConfig())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert model.head.in_features == 128 and model.rot_head is not None and model.rot_head.out_features == 4
    assert len(norm_parameters(model)) == 12 and set_norm_mode(model, "batch") == 6


def test_input_is_standardised_inside_the_model():
    """A (B, 3, S, S) input in [0, 1] is mapped to [-1, 1] before the first conv."""
    model = tiny("group")
    seen = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["x"] = args[0]

    model.stages[0].conv1.register_forward_hook(hook)
    x = torch.rand(2, 3, 16, 16)
    model(x)
    torch.testing.assert_close(seen["x"], x * 2 - 1)


def test_no_rotation_head_and_bad_inputs():
    model = tiny("batch", rotation_head=False)
    assert model.rot_head is None
    with pytest.raises(ConfigError, match="rotation head"):
        model.rotation_logits(torch.rand(1, 3, 16, 16))
    with pytest.raises(InvalidInputError, match=r"\(B, 3, S, S\)"):
        model(torch.rand(1, 16, 16, 3))
    with pytest.raises(InvalidInputError, match=r"\(B, 3, S, S\)"):
        model(torch.rand(3, 16, 16))


def test_gradients_flow_to_norm_parameters_in_every_mode():
    """No forward disables grad: a Tent-style loss reaches the norm affine parameters."""
    for norm, modes in (("batch", ("source", "batch", "prior")), ("group", ("source",))):
        model = tiny(norm)
        x = images_to_tensor(load_digits("val", size=16)[0][:4])
        for mode in modes:
            set_norm_mode(model, mode)
            model.zero_grad()
            logits = model(x).logits
            (-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()).backward()
            grads = [p.grad for p in norm_parameters(model).values()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(float(g.abs().sum()) > 0 for g in grads)


def test_channels_last_input_gives_the_same_result():
    """HWC numpy images permuted without a copy (channels-last strides) work for forward and backward."""
    model = tiny("group")
    hwc = torch.rand(2, 16, 16, 3)
    x_cl, x = hwc.permute(0, 3, 1, 2), hwc.permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(model(x_cl).logits, model(x).logits)
    logits = model(x_cl).logits
    grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), list(norm_parameters(model).values()))
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------------
# AdaptiveBatchNorm2d


def manual_bn(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: AdaptiveBatchNorm2d) -> torch.Tensor:
    c = (1, -1, 1, 1)
    return (x - mean.view(c)) / torch.sqrt(var.view(c) + bn.eps) * bn.weight.view(c) + bn.bias.view(c)


@pytest.mark.parametrize("module_training", [True, False])
def test_stat_modes_match_the_formulas_and_ignore_train_eval(module_training: bool):
    bn = AdaptiveBatchNorm2d(5)
    randomise_bn(bn)
    bn.train(module_training)  # must not matter: the statistics source is stat_mode
    x = torch.randn(4, 5, 3, 3, dtype=torch.float32) * 2 + 1
    xn = x.double().numpy()
    mu_b = torch.from_numpy(xn.mean(axis=(0, 2, 3))).float()
    var_b = torch.from_numpy(xn.var(axis=(0, 2, 3))).float()  # biased, over (N, H, W)
    mu_s, var_s = bn.running_mean.clone(), bn.running_var.clone()
    buffers = {k: v.clone() for k, v in bn.named_buffers()}
    with torch.no_grad():
        bn.stat_mode = "source"
        torch.testing.assert_close(bn(x), manual_bn(x, mu_s, var_s, bn))
        bn.stat_mode = "batch"
        torch.testing.assert_close(bn(x), manual_bn(x, mu_b, var_b, bn))
        for prior in (16.0, 2.0):
            bn.stat_mode, bn.prior = "prior", prior
            n = 4
            mean = (prior * mu_s + n * mu_b) / (prior + n)
            var = (prior * var_s + n * var_b) / (prior + n)
            torch.testing.assert_close(bn(x), manual_bn(x, mean, var, bn))
    for k, v in bn.named_buffers():  # source, batch and prior never write the running statistics
        assert torch.equal(v, buffers[k]), k


def test_train_mode_is_plain_batchnorm():
    bn, ref = AdaptiveBatchNorm2d(5), nn.BatchNorm2d(5)
    randomise_bn(bn)
    ref.load_state_dict(bn.state_dict())  # same state dict layout
    x = torch.randn(6, 5, 4, 4)
    bn.stat_mode = "train"
    for training in (True, False):
        bn.train(training), ref.train(training)
        torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert not torch.equal(bn.running_mean, AdaptiveBatchNorm2d(5).running_mean)  # train() did update them


def test_prior_mode_interpolates_between_source_and_batch():
    bn = AdaptiveBatchNorm2d(3)
    randomise_bn(bn)
    x = torch.randn(8, 3, 4, 4) * 3
    with torch.no_grad():
        outs = {}
        for mode in ("source", "batch"):
            bn.stat_mode = mode
            outs[mode] = bn(x)
        bn.stat_mode = "prior"
        bn.prior = 1e-6
        torch.testing.assert_close(bn(x), outs["batch"], rtol=1e-4, atol=1e-4)
        bn.prior = 1e9
        torch.testing.assert_close(bn(x), outs["source"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["source", "batch", "prior", "train"])
def test_batch_size_one_works_in_every_mode(mode: str):
    model = tiny("batch")
    model.train()  # the worst case for plain BatchNorm with one image
    for m in model.modules():
        if isinstance(m, AdaptiveBatchNorm2d):
            randomise_bn(m)
            m.running_var.abs_()
    set_norm_mode(model, mode)
    x = images_to_tensor(load_digits("val", size=16)[0][:1])
    out = model(x)
    assert out.logits.shape == (1, 10) and torch.isfinite(out.logits).all()
    if mode in ("batch", "prior"):
        set_norm_mode(model, "source")
        assert not torch.allclose(model(x).logits, out.logits)  # the statistics really differ


def test_set_norm_mode_counts_and_checks():
    bn_model, gn_model = tiny("batch"), tiny("group")
    assert set_norm_mode(bn_model, "prior", prior=4.0) == 4
    layers = [m for m in bn_model.modules() if isinstance(m, AdaptiveBatchNorm2d)]
    assert all(m.stat_mode == "prior" and m.prior == 4.0 for m in layers)
    assert set_norm_mode(gn_model, "batch") == 0
    with pytest.raises(ConfigError, match="unknown BatchNorm stat_mode 'bacth'; known: source, batch, prior, ema, train"):
        set_norm_mode(bn_model, "bacth")
    with pytest.raises(ConfigError, match="prior must be > 0"):
        set_norm_mode(bn_model, "prior", prior=0.0)
    with pytest.raises(ConfigError, match="unknown BatchNorm stat_mode"):
        AdaptiveBatchNorm2d(4, stat_mode="eval")
    assert all(m.stat_mode == "prior" for m in bn_model.modules() if isinstance(m, AdaptiveBatchNorm2d))  # unchanged


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_norm_parameters(norm: str):
    model = tiny(norm)
    params = norm_parameters(model)
    expected = [f"stages.{s}.norm{k}.{p}" for s in range(2) for k in (1, 2) for p in ("weight", "bias")]
    assert list(params) == expected
    named = dict(model.named_parameters())
    assert all(params[n] is named[n] for n in params)


def test_rotate_quarters_and_images_to_tensor():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = rotate_quarters(x, torch.tensor([1, 2]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(1, 2)))
    torch.testing.assert_close(out[1], torch.rot90(x[1], 2, dims=(1, 2)))
    torch.testing.assert_close(rotate_quarters(x, torch.tensor([0, 0])), x)
    with pytest.raises(InvalidInputError, match="one rotation per image"):
        rotate_quarters(x, torch.tensor([1]))
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    t = images_to_tensor(images)
    assert t.shape == (2, 3, 5, 5) and t.is_contiguous()
    torch.testing.assert_close(t[1, 2, 3, 4], torch.tensor(images[1, 3, 4, 2] / 255.0, dtype=torch.float32))
    with pytest.raises(InvalidInputError, match="uint8"):
        images_to_tensor(images.astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# The shipped digits models


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    return load_digits("test")


def loaded(name: str):
    """Load a shipped model the long way: card, checked weights, build, strict state dict."""
    folder = find_model(name)
    card = load_card(folder)
    assert card.classifier is not None
    model = build_classifier(card.classifier)
    model.load_state_dict(load_weights(folder, card), strict=True)
    set_norm_mode(model, "source")
    return folder, card, model.eval()


def predictions(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        batches = [model(images_to_tensor(images[i : i + 128])).logits for i in range(0, len(images), 128)]
    return torch.cat(batches).argmax(1).numpy()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card(name: str):
    folder, card, _ = loaded(name)
    assert card.name == name and card.task == "classification" and card.architecture == "cnn_classifier"
    assert card.labels == list(LABELS) and card.default_recipe == "tent"
    assert card.preprocessing.size == card.classifier.resolution == 32
    assert card.classifier.norm == ("batch" if name.endswith("-bn") else "group")
    assert card.classifier.rotation_head
    for key in ("command", "seed", "epochs", "data", "seconds", "cpu_seconds", "hardware", "torch"):
        assert key in card.training, key
    assert (folder / "train_log.jsonl").is_file()
    assert (folder / card.weights.file).stat().st_size < 600_000  # a few hundred KB


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reaches_its_card_accuracy(name: str, test_split: tuple[np.ndarray, np.ndarray]):
    _, card, model = loaded(name)
    images, labels = test_split
    correct = int((predictions(model, images) == labels).sum())
    clean = card.metrics["clean"]
    assert correct == clean["test_correct"] and correct / len(labels) == clean["test_accuracy"]
    assert clean["test_accuracy"] >= 0.95


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_corruption_metrics_reproduce(name: str, test_split: tuple[np.ndarray, np.ndarray]):
    """Golden values: two of the card's severity-5 errors, recomputed (catches drift in the corruptions)."""
    _, card, model = loaded(name)
    images, labels = test_split
    errors = card.metrics["corruption_error_severity5"]["per_corruption"]
    for corruption in ("contrast", "gaussian_noise"):
        shifted = corrupt(images, corruption, 5, seed=0)
        error = 1.0 - float((predictions(model, shifted) == labels).mean())
        assert error == pytest.approx(errors[corruption], abs=1e-6), corruption


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_fisher(name: str):
    folder, card, model = loaded(name)
    assert card.fisher is not None
    fisher = load_weights(folder, card, card.fisher)
    params = norm_parameters(model)
    assert set(fisher) == set(params)
    for n, p in params.items():
        assert fisher[n].shape == p.shape and fisher[n].dtype == torch.float32
        assert torch.isfinite(fisher[n]).all() and (fisher[n] >= 0).all()
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_batch_statistics_undo_a_contrast_shift(test_split: tuple[np.ndarray, np.ndarray]):
    """The BN model's switch is meaningful: on low-contrast digits the test batch's statistics (BN adapt,
    Schneider et al. 2020) recover most of the accuracy the source statistics lose."""
    _, _, model = loaded("digits-cnn-bn")
    images, labels = test_split
    shifted = corrupt(images[:256], "contrast", 5)
    acc = {}
    for mode in ("source", "batch"):
        set_norm_mode(model, mode)
        acc[mode] = float((predictions(model, shifted) == labels[:256]).mean())
    assert acc["batch"] > acc["source"] + 0.3, acc


def test_load_classifier(tmp_path):
    model, card = load_classifier("digits-cnn-gn")
    assert not model.training and card.name == "digits-cnn-gn"
    _, _, reference = loaded("digits-cnn-gn")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match="not a classifier"):
        load_classifier("slot-shapes-32")


def test_ema_mode_moves_the_running_statistics_once_per_activation():
    torch.manual_seed(0)
    bn = AdaptiveBatchNorm2d(3)
    bn.running_mean.fill_(1.0)
    x = torch.randn(2, 3, 4, 4) + 5.0
    set_norm_mode(bn, "ema", ema_momentum=0.1)
    y = bn(x)
    mean_b = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, 0.9 * torch.ones(3) + 0.1 * mean_b)
    expected = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    torch.testing.assert_close(y, expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    before = bn.running_mean.clone()
    bn(x)  # a second forward in the same activation: no second update
    torch.testing.assert_close(bn.running_mean, before)
    set_norm_mode(bn, "ema", ema_momentum=0.1)
    bn(x)
    assert not torch.allclose(bn.running_mean, before)
