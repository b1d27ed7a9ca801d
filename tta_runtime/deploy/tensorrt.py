"""TensorRT: build an engine from an exported ONNX file, run it, refit adapted weights into it.

    exported .onnx (+ manifest) -> build_engine(path, ...) -> .engine + .engine.json (cache key, profiles)
                                     TensorRTBackend(engine).run(...); .refit(adapted weights)

Only the TensorRT calls live here (TensorRT 10 and 11 Python API: `Builder`, `OnnxParser`,
`IBuilderConfig`, `IExecutionContext.execute_async_v3`, `Refitter`); what they are given (precision,
profiles, cache key, refit arrays) is decided in engine_plan.py. `tensorrt` is imported on first use;
a missing one raises `MissingExtraError` (a `BackendUnavailableError`) naming the extra.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from tta_runtime.deploy.engine_plan import (
    EngineBuild,
    TensorRTConfig,
    cached_engine,
    check_onnx_for_engine,
    network_flags,
    plan_engine,
    refit_plan,
    tensorrt_config,
)
from tta_runtime.deploy.graph import atomic_write_bytes, manifest_path, sha256_bytes
from tta_runtime.deploy.options import TORCH_DTYPES, ExportError, TensorSpec, check_input, dynamic_ranges
from tta_runtime.device import optional_import
from tta_runtime.errors import BackendUnavailableError, ConfigError, InvalidInputError

log = logging.getLogger(__name__)

__all__ = ["TensorRTBackend", "build_engine", "import_tensorrt"]


def import_tensorrt() -> ModuleType:
    """The `tensorrt` package, or `MissingExtraError` naming the extra."""
    return optional_import(
        "tensorrt",
        "pip install 'tta-runtime[tensorrt]' on a machine with an NVIDIA GPU (the wheel fetches NVIDIA's libraries "
        "from NVIDIA's index at install time); on Jetson it ships with JetPack. ONNX export works without it: format='onnx'",
        "The TensorRT backend",
    )


def _gpu_identity(device: int) -> tuple[str, str]:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and torch.cuda.is_available() is False here")
    if device >= torch.cuda.device_count():
        raise BackendUnavailableError(f"CUDA device {device} requested; {torch.cuda.device_count()} present")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def build_engine(
    onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str] | None = None, *,
    config: TensorRTConfig | Mapping[str, Any] | None = None, batch: int = 1,
) -> EngineBuild:
    """A serialized TensorRT engine for an exported ONNX file, reused from the cache when its key matches.

    Precision follows the ONNX file (strongly typed); `config.precision` must agree. The side file
    `<engine>.json` records the cache key and what it is made of, the profiles, the ONNX manifest's
    I/O and weight specs, and the build time. Steps before the TensorRT calls: `plan_engine`.
    """
    cfg = tensorrt_config(config)
    check_onnx_for_engine(Path(onnx_path), cfg)  # a wrong file or precision fails before TensorRT is needed
    trt = import_tensorrt()
    gpu, sm = _gpu_identity(cfg.device)
    plan = plan_engine(onnx_path, engine_path, config=cfg, batch=batch, tensorrt_version=trt.__version__, gpu_name=gpu, compute_capability=sm)
    hit = cached_engine(plan)
    if hit is not None:
        log.info("TensorRT engine cache hit: %s", plan.path)
        return hit

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(plan.onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {plan.onnx_path}: {'; '.join(errors[:3])}")
    bconf = builder.create_builder_config()
    if cfg.workspace is not None:
        bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace * (1 << 30)))
    if cfg.refittable:
        bconf.set_flag(trt.BuilderFlag.REFIT)
    if cfg.builder_optimization_level is not None:
        bconf.builder_optimization_level = cfg.builder_optimization_level
    if plan.dynamic:
        profile = builder.create_optimization_profile()
        for name, p in plan.profiles.items():
            profile.set_shape(name, p["min"], p["opt"], p["max"])
        bconf.add_optimization_profile(profile)
    if plan.timing_cache_path is not None:
        cached = plan.timing_cache_path.read_bytes() if plan.timing_cache_path.is_file() else b""
        bconf.set_timing_cache(bconf.create_timing_cache(cached), False)  # ignore_mismatch=False: refuse a foreign cache
    serialized = builder.build_serialized_network(network, bconf)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {plan.onnx_path} (see the TensorRT log above)")
    plan_bytes = bytes(serialized)
    if plan.timing_cache_path is not None:
        atomic_write_bytes(plan.timing_cache_path, bytes(bconf.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
    manifest = plan.metadata["onnx_manifest"]
    want = {s["name"]: s["dtype"] for s in (*manifest["inputs"], *manifest["outputs"])}
    got = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name for name in want}
    if got != want:
        raise ExportError(f"TensorRT did not honour the graph's precision: I/O types {got}, expected {want}")
    atomic_write_bytes(plan.path, plan_bytes)
    meta = {**plan.metadata, "engine_sha256": sha256_bytes(plan_bytes), "build_seconds": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(plan.side_path, (json.dumps(meta, indent=2) + "\n").encode())
    log.info("built TensorRT engine %s in %.1fs", plan.path, meta["build_seconds"])
    return EngineBuild(plan.path, meta, cached=False)


class TensorRTBackend:
    """A TensorRT engine with its side file: validated inputs, named outputs, `refit(weights)`.

    Inputs may be numpy (copied to the GPU) or CUDA tensors (`run_torch`, zero-copy); outputs are
    allocated with torch on the engine's device.
    """

    def __init__(self, engine_path: str | os.PathLike[str], *, device: int = 0) -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.path = Path(engine_path)
        side = manifest_path(self.path)
        if not self.path.is_file() or not side.is_file():
            raise ConfigError(f"{self.path} or its side file {side.name} is missing; build it with tta_runtime.deploy.build_engine")
        self.metadata = json.loads(side.read_text())
        gpu, sm = _gpu_identity(device)
        if (self.metadata["tensorrt_version"], self.metadata["gpu"], self.metadata["compute_capability"]) != (trt.__version__, gpu, sm):
            raise ConfigError(
                f"{self.path.name} was built with TensorRT {self.metadata['tensorrt_version']} for {self.metadata['gpu']} "
                f"(sm {self.metadata['compute_capability']}); this machine has TensorRT {trt.__version__} and {gpu} (sm {sm}). "
                f"Engines are tied to both: rebuild it here (build_engine)"
            )
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ConfigError(f"TensorRT could not deserialize {self.path} (see its log); rebuild it")
        self.context = self.engine.create_execution_context()
        spec = self.metadata["onnx_manifest"]
        self.inputs = [TensorSpec.from_dict(d) for d in spec["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in spec["outputs"]]
        self.ranges = dynamic_ranges(spec.get("dynamic"))
        self.provider_used = f"TensorRT {trt.__version__}"

    def run_torch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch, a tensor (moved to the engine's GPU if elsewhere) -> {output: CUDA tensor}."""
        spec = self.inputs[0]
        check_input(spec, tuple(x.shape), str(x.dtype).removeprefix("torch."), self.ranges, "a tensor")
        x = x.detach().to(self.device).contiguous()
        self.context.set_input_shape(spec.name, tuple(x.shape))
        self.context.set_tensor_address(spec.name, x.data_ptr())
        outs = {}
        for o in self.outputs:
            shape = tuple(self.context.get_tensor_shape(o.name))
            t = torch.empty(shape, dtype=TORCH_DTYPES[o.dtype], device=self.device)
            self.context.set_tensor_address(o.name, t.data_ptr())
            outs[o.name] = t
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed (see its log)")
        stream.synchronize()
        return outs

    def run(self, image_batch: np.ndarray) -> dict[str, np.ndarray]:
        """One batch, a numpy array -> {output: numpy array}."""
        if not isinstance(image_batch, np.ndarray):
            raise InvalidInputError(f"run takes a numpy array; got {type(image_batch).__name__} (use run_torch for tensors)")
        check_input(self.inputs[0], image_batch.shape, str(image_batch.dtype), self.ranges, "an array")
        return {k: v.cpu().numpy() for k, v in self.run_torch(torch.from_numpy(np.ascontiguousarray(image_batch))).items()}

    def refit(self, weights: nn.Module | Mapping[str, Any]) -> list[str]:
        """Push weights (e.g. `Runtime.model` after adaptation) into the engine by name; contexts stay valid."""
        trt = self._trt
        if not self.metadata.get("refittable"):
            raise ConfigError(f"{self.path.name} was built with refittable=False; rebuild with TensorRTConfig(refittable=True)")
        refitter = trt.Refitter(self.engine, self._logger)
        plan = refit_plan(weights, self.metadata["onnx_manifest"]["weights"]["tensors"], refitter.get_all_weights())
        for name, arr in plan.items():  # `plan` keeps the arrays alive until the refit is done
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise ExportError(f"TensorRT refused weights {name!r} (shape {arr.shape}, {arr.dtype})")
        missing = refitter.get_missing_weights()
        if missing:
            raise ExportError(f"TensorRT still misses weights {list(missing)[:3]} after the refit; nothing was changed")
        if not refitter.refit_cuda_engine():
            raise ExportError("TensorRT refit_cuda_engine failed (see its log)")
        return list(plan)

    def __repr__(self) -> str:
        return f"TensorRTBackend({self.path}, provider_used={self.provider_used})"
