"""Classifiers from other libraries: torchvision and timm architectures by name, weights from a local file.

Nothing downloads: the architecture is built with random weights (`weights=None` / `pretrained=False`)
and the user's own file is loaded into it (safetensors, or a state dict read with
`torch.load(weights_only=True)`). The wrapper gives the runtime what it needs from any classifier:

- input (B, 3, S, S) in [0, 1], normalised inside with the card's mean/std (ImageNet's by default);
- `ClassifierOutput(logits, features)`, `features` being the input of the last `nn.Linear`;
- every `nn.BatchNorm2d` swapped for `AdaptiveBatchNorm2d` (same state dict), so recipes choose
  source / batch / prior statistics exactly as for our own CNNs.

The wrapper is `tta_runtime.models.wrapped.WrappedClassifier`, which `Runtime.from_module` uses for any module.

torchvision only imports beside the torch build it was made for; see the README ("what runs where").
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta_runtime.config import ExternalConfig, Preprocessing
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.models.wrapped import WrappedClassifier, convert_batchnorm, load_into

__all__ = ["ExternalClassifier", "build_external", "convert_batchnorm", "load_into", "load_state_dict_file"]

_EXTRA = {"torchvision": "torchvision", "timm": "timm"}


def _import(source: str) -> Any:
    try:
        return importlib.import_module(source)
    except ImportError as e:  # includes torchvision's operator errors beside a mismatched torch build
        raise ConfigError(
            f"architecture source {source!r} needs the '{_EXTRA[source]}' extra: pip install 'tta-runtime[{_EXTRA[source]}]' "
            f"(with a matching torch build; see the README, 'what runs where'). Import failed: {e}"
        ) from None


class ExternalClassifier(WrappedClassifier):
    """A torchvision/timm classifier behind our classifier interface (see the module docstring)."""

    def __init__(self, net: nn.Module, cfg: ExternalConfig, preprocessing: Preprocessing | None = None) -> None:
        pre = preprocessing or Preprocessing(size=cfg.resolution, mean=cfg.mean, std=cfg.std)
        super().__init__(net, pre, what=f"{cfg.source} model {cfg.name!r} with num_classes={cfg.num_classes}")
        self.cfg = cfg
        self.num_classes = cfg.num_classes


def build_external(cfg: ExternalConfig, preprocessing: Preprocessing | None = None) -> ExternalClassifier:
    """The named architecture with random weights (nothing downloads), wrapped (normalised with `preprocessing`'s
    mean/std and channel order when given, else `cfg`'s mean/std)."""
    lib = _import(cfg.source)
    try:
        if cfg.source == "torchvision":
            net = lib.models.get_model(cfg.name, weights=None, num_classes=cfg.num_classes, **cfg.kwargs)
        else:
            net = lib.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, **cfg.kwargs)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ConfigError(f"cannot build {cfg.source} architecture {cfg.name!r}: {e}") from None
    convert_batchnorm(net)
    return ExternalClassifier(net, cfg, preprocessing)


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
