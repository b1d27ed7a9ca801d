"""Classifiers from other libraries: torchvision and timm architectures by name, weights from a local file.

Nothing downloads: the architecture is built with random weights (`weights=None` / `pretrained=False`)
and the user's own file is loaded into it (safetensors, or a state dict read with
`torch.load(weights_only=True)`). The wrapper gives the runtime what it needs from any classifier:

- input (B, 3, S, S) in [0, 1], normalised inside with the card's mean/std (ImageNet's by default);
- `ClassifierOutput(logits, features)`, `features` being the input of the last `nn.Linear` (a forward
  pre-hook reads it, so any torchvision/timm classifier works without knowing its head's name);
- every `nn.BatchNorm2d` swapped for `AdaptiveBatchNorm2d` (same state dict), so recipes choose
  source / batch / prior statistics exactly as for our own CNNs.

torchvision only imports beside the torch build it was made for; see the README ("what runs where").
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta_runtime.models.classifier import AdaptiveBatchNorm2d, ClassifierOutput
from tta_runtime.config import ExternalConfig
from tta_runtime.errors import ConfigError, ModelLoadError

__all__ = ["ExternalClassifier", "build_external", "load_state_dict_file"]

_EXTRA = {"torchvision": "torchvision", "timm": "timm"}


def _import(source: str) -> Any:
    try:
        return importlib.import_module(source)
    except ImportError as e:  # includes torchvision's operator errors beside a mismatched torch build
        raise ConfigError(
            f"architecture source {source!r} needs the '{_EXTRA[source]}' extra: pip install 'tta-runtime[{_EXTRA[source]}]' "
            f"(with a matching torch build; see the README, 'what runs where'). Import failed: {e}"
        ) from None


def convert_batchnorm(module: nn.Module) -> int:
    """Replace every plain `nn.BatchNorm2d` by an `AdaptiveBatchNorm2d` with the same state; returns how many."""
    n = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AdaptiveBatchNorm2d(
                child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
            n += 1
        else:
            n += convert_batchnorm(child)
    return n


class ExternalClassifier(nn.Module):
    """A torchvision/timm classifier behind our classifier interface (see the module docstring)."""

    def __init__(self, net: nn.Module, cfg: ExternalConfig) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"{cfg.source} model {cfg.name!r} has no nn.Linear head to read features from")
        self._features: list[torch.Tensor] = []
        linears[-1].register_forward_pre_hook(lambda _m, args: self._features.append(args[0]))

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        self._features.clear()
        logits = self.net((x - self.mean) / self.std)
        features = self._features.pop() if self._features else logits
        self._features.clear()
        return ClassifierOutput(logits=logits, features=features.flatten(1))


def build_external(cfg: ExternalConfig) -> ExternalClassifier:
    """The named architecture with random weights (nothing downloads), wrapped."""
    lib = _import(cfg.source)
    try:
        if cfg.source == "torchvision":
            net = lib.models.get_model(cfg.name, weights=None, num_classes=cfg.num_classes, **cfg.kwargs)
        else:
            net = lib.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, **cfg.kwargs)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ConfigError(f"cannot build {cfg.source} architecture {cfg.name!r}: {e}") from None
    convert_batchnorm(net)
    return ExternalClassifier(net, cfg)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pt/.pth with `torch.load(weights_only=True)` (never a bare unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise ModelLoadError(f"cannot read {path} as safetensors: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors, truncated files, refused globals
        raise ModelLoadError(f"cannot read {path} as a weights-only state dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict (name -> tensor)")
    return state


def load_into(model: ExternalClassifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load into the wrapped network, with the mismatched keys and shapes named."""
    own = model.net.state_dict()
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or shapes:
        raise ModelLoadError(
            f"weights in {source} do not fit {model.cfg.source} {model.cfg.name!r} with num_classes={model.cfg.num_classes}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:3]}"
        )
    model.net.load_state_dict(state, strict=True)
