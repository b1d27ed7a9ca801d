"""torchvision / timm classifiers by name with local weights, adapted with Tent through the Runtime.

The adaptation tests run wherever the extra imports (torchvision needs its matching torch build, which
CI does not carry: see the README, "what runs where"); the missing-extra test runs where it does not.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tta_runtime
from tta_runtime.data.digits import corrupt, load_digits
from tta_runtime.errors import ConfigError, ModelLoadError


def _importable(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - e.g. torchvision beside a torch build it was not made for
        return False
    return True


HAVE = {"torchvision": _importable("torchvision"), "timm": _importable("timm")}
ARCH = {"torchvision": "resnet18", "timm": "resnet18"}


def _random_weights(source: str, tmp_path, num_classes: int = 10, suffix: str = ".safetensors"):
    if source == "torchvision":
        import torchvision

        net = torchvision.models.get_model(ARCH[source], weights=None, num_classes=num_classes)
    else:
        import timm

        net = timm.create_model(ARCH[source], pretrained=False, num_classes=num_classes)
    path = tmp_path / f"{source}{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return path


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_external_architecture_loads_local_weights_and_adapts_with_tent(source, tmp_path, state):
    if not HAVE[source]:
        pytest.skip(f"{source} is not importable here (optional extra '{source}'; see the README, 'what runs where')")
    weights = _random_weights(source, tmp_path)
    rt = tta_runtime.Runtime.from_architecture(source, ARCH[source], weights=weights, num_classes=10, input_size=32)
    images, _ = load_digits("val")
    x = corrupt(images[:4], "fog", 5, seed=1)
    snap = state.snapshot(rt.model)
    res = rt.adapt_and_predict(x, norm_stats="batch")
    assert len(res) == 4 and res[0].logits.shape == (10,) and res[0].adaptation.steps_run == 1
    assert res[0].adaptation.params_adapted > 0  # the norm layers
    state.assert_bit_exact(rt.model, snap)  # episodic
    cont = tta_runtime.Runtime.from_architecture(source, ARCH[source], weights=weights, num_classes=10, input_size=32, mode="continual")
    before = np.stack([r.logits for r in cont.predict(x)])
    cont.adapt_and_predict(x, norm_stats="batch", lr=1e-2)
    after = np.stack([r.logits for r in cont.predict(x)])
    assert np.abs(after - before).max() > 1e-6  # Tent changed the BatchNorm affine parameters
    pt = _random_weights(source, tmp_path, suffix=".pt")  # a plain state dict, read with weights_only=True
    assert tta_runtime.Runtime.from_architecture(source, ARCH[source], weights=pt, num_classes=10, input_size=32).predict(x[0]).label in range(10)
    wrong = _random_weights(source, tmp_path / "..", num_classes=5)
    with pytest.raises(ModelLoadError, match="shape mismatches"):
        tta_runtime.Runtime.from_architecture(source, ARCH[source], weights=wrong, num_classes=10, input_size=32)


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_a_missing_extra_is_named(source, tmp_path):
    if HAVE[source]:
        pytest.skip(f"{source} is installed here")
    with pytest.raises(ConfigError, match=rf"tta-runtime\[{source}\]"):
        tta_runtime.Runtime.from_architecture(source, "resnet18", weights=tmp_path / "w.safetensors", num_classes=10)


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="source"):
        tta_runtime.Runtime.from_architecture("keras", "resnet18", weights=tmp_path / "w.safetensors", num_classes=10)
