"""What this machine can run: versions and capabilities of torch, onnx, ONNX Runtime, TensorRT, OpenCV.

`doctor()` never raises: a package that is missing says what to install, one that fails to import or
to answer reports the error in its own section, and the other sections still come back.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from tta_runtime.deploy.graph import tta_runtime_version

__all__ = ["doctor"]


def _module(name: str) -> ModuleType | None:
    """The module if it is installed, else None (an installed one that fails to import raises)."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _probe(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:  # a broken install must be reported, not crash the doctor
        return {"present": False, "error": f"{type(e).__name__}: {e}"}


def _torch_info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "present": True, "version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
        "devices": [f"{torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                    for i in range(torch.cuda.device_count())] if cuda else [],
        "cudnn": torch.backends.cudnn.version() if cuda else None, "threads": torch.get_num_threads(),
    }


def _ort_info() -> dict[str, Any]:
    ort = _module("onnxruntime")
    if ort is None:
        return {"present": False, "install": "pip install 'tta-runtime[onnx]'"}
    return {"present": True, "version": ort.__version__, "device": ort.get_device(), "providers": ort.get_available_providers()}


def _trt_info() -> dict[str, Any]:
    trt = _module("tensorrt")
    if trt is None:
        return {"present": False, "install": "pip install 'tta-runtime[tensorrt]' (NVIDIA GPU machines; JetPack on Jetson)"}
    return {"present": True, "version": trt.__version__, "strongly_typed_only": int(trt.__version__.split(".")[0]) >= 11}


def _cv2_info() -> dict[str, Any]:
    cv2 = _module("cv2")
    if cv2 is None:
        return {"present": False, "install": "pip install opencv-python-headless"}
    backends = sorted({cv2.videoio_registry.getBackendName(b) for b in cv2.videoio_registry.getBackends()})
    return {"present": True, "version": cv2.__version__, "video_backends": backends, "cuda_devices": cv2.cuda.getCudaEnabledDeviceCount() if hasattr(cv2, "cuda") else 0}


def _onnx_info() -> dict[str, Any]:
    onnx = _module("onnx")
    if onnx is None:
        return {"present": False, "install": "pip install 'tta-runtime[onnx]'"}
    return {"present": True, "version": onnx.__version__, "max_opset": onnx.defs.onnx_opset_version()}


def doctor() -> dict[str, Any]:
    """Versions and capabilities of the optional stack (never raises)."""
    return {
        "tta_runtime": {"version": tta_runtime_version()},
        "python": {"version": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                   "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "torch": _probe(_torch_info),
        "onnx": _probe(_onnx_info),
        "onnxruntime": _probe(_ort_info),
        "tensorrt": _probe(_trt_info),
        "opencv": _probe(_cv2_info),
    }
