"""Devices and optional packages: the one place that resolves a device name or imports an extra.

A requested device that is missing raises (never a silent fallback to the CPU); a missing optional
package raises `MissingExtraError` naming what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from tta_runtime.errors import ConfigError, MissingExtraError


def resolve_device(name: str | torch.device, allowed: tuple[str, ...] = ("cpu", "cuda", "mps")) -> torch.device:
    """The requested device, or a clear `ConfigError`.

    `allowed`: the device types the caller supports (export and the GPU benchmarks: cpu and cuda only).
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {name!r} is not a torch device name ('cpu', 'cuda', 'cuda:1', 'mps'): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available here; use device='cpu'")
    if device.type not in allowed:
        raise ConfigError(f"device type {device.type!r} is not supported here; use one of {', '.join(map(repr, allowed))}")
    return device


def optional_import(module: str, install: str, purpose: str) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` saying what needs it and what to install.

    `install`: what the user runs, e.g. "pip install 'tta-runtime[onnx]'"; `purpose`: what needs the
    module, e.g. "ONNX export".
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{purpose} needs the {module!r} module, which is not installed: {install}") from error


def import_cv2() -> ModuleType:
    """OpenCV, which decodes, resizes and writes images and videos (a core dependency)."""
    return optional_import("cv2", "pip install opencv-python-headless", "Decoding and resizing images")
