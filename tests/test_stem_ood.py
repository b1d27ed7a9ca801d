"""The default classifier OOD scorer reads the first convolution's channel statistics (`stem_mahalanobis`).

Shown on the shipped digits models and on a user's network: the scores do not depend on which pass computed
them (the full frozen pass, the one-convolution pass that adapt='always' runs, the loaded weights' pass after
continual adaptation), that pass runs one convolution and nothing after it, and a network without a
convolution is calibrated with the fallback scorer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tta_runtime
from tta_runtime.data.digits import corrupt, load_digits
from tta_runtime.errors import ConfigError
from tta_runtime.frozen import first_conv


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    clean = load_digits("test")[0][:12]
    return np.concatenate([clean[:6], corrupt(clean[6:], "gaussian_noise", 5, seed=0)])


def _counting(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_adapting_every_input_scores_it_from_the_first_convolution_alone(images) -> None:
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent")
    assert rt.calibration.scorer == "stem_mahalanobis"
    reference = rt.predict(images)  # the full frozen pass
    head, conv = _counting(rt.model.head), _counting(first_conv(rt.model))
    adapted = rt.adapt_and_predict(images)
    # Tent's one step: its forward reaches the head and is the prediction (Tent's semantics); the scoring pass
    # stops at the first convolution, which therefore runs once more than the head
    assert head[0] == 1 and conv[0] == 2
    np.testing.assert_allclose([r.ood_score for r in adapted], [r.ood_score for r in reference], rtol=1e-6)
    assert [r.is_ood for r in adapted] == [r.is_ood for r in reference]
    assert not any(r.is_ood for r in reference[:6]) and all(r.is_ood for r in reference[6:])
    # the same work with a scorer that reads the pooled features: the whole frozen pass runs first
    full = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent", ood_scorer="mahalanobis")
    full.predict(images)  # as above: the first call's one-off work is not counted
    head = _counting(full.model.head)
    full.adapt_and_predict(images)
    assert head[0] == 2


def test_scores_after_continual_adaptation_describe_the_input(images) -> None:
    """Once continual Tent has moved the weights, the score still comes from the loaded ones."""
    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="tent_continual", lr=0.05)
    before = [r.ood_score for r in rt.adapt_and_predict(images)]
    for _ in range(3):
        rt.adapt_and_predict(images[::-1])
    assert rt._weights_moved
    np.testing.assert_allclose([r.ood_score for r in rt.adapt_and_predict(images)], before, rtol=1e-6)


def test_a_network_without_a_convolution_is_calibrated_with_the_fallback_scorer() -> None:
    x = load_digits("train")[0][:200]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32), nn.ReLU(), nn.Linear(32, 10))
    rt = tta_runtime.Runtime.from_module(mlp, input_size=32, labels=[str(d) for d in range(10)], recipe="bn_stats")
    report = rt.calibrate(x, fisher=False)
    assert report.default == rt.calibration.scorer == "mahalanobis"
    assert "stem_mahalanobis" not in report.calibrations
    with pytest.raises(ConfigError, match="first nn.Conv2d.*has none"):
        rt.calibrate(x, scorers=["mahalanobis", "stem_mahalanobis"], fisher=False)
    with pytest.raises(ConfigError, match="first nn.Conv2d.*has none"):
        tta_runtime.Runtime.from_module(mlp, input_size=32, recipe="bn_stats", ood_scorer="stem_mahalanobis").calibrate(x, fisher=False)


def test_the_scorer_catches_noise_that_the_pooled_features_miss() -> None:
    """On the shipped model: clean test digits against gaussian noise at severity 3 (a near shift)."""
    from tta_runtime.ood import auroc

    rt = tta_runtime.Runtime.from_pretrained("digits-cnn-bn")
    clean = load_digits("test")[0][:100]
    noisy = corrupt(clean, "gaussian_noise", 3, seed=0)
    stem = auroc([r.ood_score for r in rt.predict(clean)], [r.ood_score for r in rt.predict(noisy)])
    pooled = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", ood_scorer="mahalanobis")
    maha = auroc([r.ood_score for r in pooled.predict(clean)], [r.ood_score for r in pooled.predict(noisy)])
    assert stem > 0.95 and stem > maha + 0.2
    with torch.inference_mode():
        assert first_conv(rt.model) is rt.model.stages[0].conv1
