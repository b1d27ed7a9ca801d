"""Run an exported graph on ONNX Runtime: explicit providers, checked inputs, named outputs.

    exported .onnx (+ manifest) -> OnnxRuntimeBackend(path, providers=[...], options=OrtOptions(...))
                                     .run(np batch) -> {name: array}; .run_torch(tensor) via IOBinding

No silent fallback: providers are named explicitly and checked against
`onnxruntime.get_available_providers()`; a provider ONNX Runtime could not create (it would fall back to
the CPU with only a warning) raises, and `provider_used` records what runs. `onnxruntime` is imported
on first use; a missing one raises `MissingExtraError` (a `BackendUnavailableError`) naming the extra.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tta_runtime.config import validate
from tta_runtime.deploy.graph import (
    MAX_GRAPH_BYTES,
    GraphFileError,
    check_initializers,
    load_manifest,
    load_proto,
    manifest_path,
    sha256_bytes,
)
from tta_runtime.deploy.options import (
    TORCH_DTYPES,
    ExportError,
    TensorSpec,
    check_input,
    dynamic_ranges,
    resolve_shape,
    spec_text,
)
from tta_runtime.device import optional_import
from tta_runtime.errors import BackendUnavailableError, ConfigError, InvalidInputError
from tta_runtime.files import read_bytes

__all__ = [
    "GPU_PROVIDERS",
    "OnnxRuntimeBackend",
    "OrtOptions",
    "import_onnxruntime",
    "providers_for_device",
    "resolve_providers",
]


def import_onnxruntime() -> ModuleType:
    """The `onnxruntime` package, or `MissingExtraError` naming the extra."""
    return optional_import(
        "onnxruntime",
        "pip install 'tta-runtime[onnx]' (CPU: onnxruntime; NVIDIA GPUs: onnxruntime-gpu instead, never both: "
        "they share the import name)",
        "The ONNX Runtime backend",
    )


# --------------------------------------------------------------------------------------------------
# Options and providers


class OrtOptions(BaseModel):
    """ONNX Runtime session options (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_num_threads: int = Field(0, ge=0, description="threads inside one op; 0 = ONNX Runtime's default (one per core)")
    inter_op_num_threads: int = Field(0, ge=0, description="threads across ops (parallel mode only); 0 = default")
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="'all' folds the weight transposes the exported graph keeps unfused, in memory only"
    )
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    log_severity_level: int = Field(3, ge=0, le=4, description="0 verbose .. 4 fatal")
    optimized_model_filepath: str | None = Field(None, description="write the optimised graph here (for inspection)")
    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per provider (full name, e.g. 'CUDAExecutionProvider'): its options"
    )


_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"})


def resolve_providers(providers: Sequence[str | tuple[str, Mapping[str, Any]]], options: OrtOptions | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Full provider names with their options, each checked against `get_available_providers()`.

    Accepts full names ("CUDAExecutionProvider") or aliases ("cuda"), optionally as (name, options).
    """
    ort = import_onnxruntime()
    options = options or OrtOptions()
    if isinstance(providers, str) or not providers:
        raise ConfigError(
            f"providers must be a non-empty list naming each execution provider, e.g. ['CPUExecutionProvider'], got {providers!r}"
        )
    available = ort.get_available_providers()
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in providers:
        name, opts = (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))
        full = _PROVIDER_ALIASES.get(name.lower(), name) if isinstance(name, str) else name
        if full not in available:
            hint = ""
            if full in GPU_PROVIDERS and "CUDAExecutionProvider" not in available:
                hint = "; GPU providers need onnxruntime-gpu instead of onnxruntime (uninstall onnxruntime first: they share the import name)"
            elif full not in _PROVIDER_ALIASES.values():
                close = difflib.get_close_matches(str(name), [*available, *_PROVIDER_ALIASES], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BackendUnavailableError(
                f"execution provider {name!r} is not available in onnxruntime {ort.__version__} here; available: "
                f"{', '.join(available)}{hint}"
            )
        if any(f == full for f, _ in out):
            raise ConfigError(f"provider {full} is named twice")
        out.append((full, {**options.provider_options.get(full, {}), **opts}))
    stray = sorted(set(options.provider_options) - {f for f, _ in out})
    if stray:
        raise ConfigError(f"provider_options name providers that are not requested: {stray}; requested: {[f for f, _ in out]}")
    return out


def providers_for_device(device: str | torch.device) -> list[str | tuple[str, dict[str, Any]]]:
    """The provider list a torch device means: cpu -> CPU; cuda[:N] -> CUDA on device N. (ONNX Runtime
    always registers the CPU provider too, for single ops a GPU provider lacks; `providers_used` shows it.)"""
    dev = torch.device(device)
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0})]
    raise ConfigError(f"no ONNX Runtime provider for device {str(device)!r}; use 'cpu' or 'cuda'")


def _session_options(ort: Any, options: OrtOptions) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_num_threads
    so.inter_op_num_threads = options.inter_op_num_threads
    so.execution_mode = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}[options.execution_mode]
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization_level]
    so.enable_cpu_mem_arena = options.enable_cpu_mem_arena
    so.enable_mem_pattern = options.enable_mem_pattern
    so.log_severity_level = options.log_severity_level
    if options.optimized_model_filepath:
        so.optimized_model_filepath = options.optimized_model_filepath
    return so


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _session_specs(nodes: Sequence[Any]) -> list[TensorSpec]:
    return [
        TensorSpec(n.name, _ORT_DTYPES.get(n.type, n.type), tuple(d if isinstance(d, int) else (d or f"dim{i}") for i, d in enumerate(n.shape)))
        for n in nodes
    ]


# --------------------------------------------------------------------------------------------------
# The backend


class OnnxRuntimeBackend:
    """An ONNX Runtime session over an exported graph, with validated inputs and named outputs.

    >>> be = OnnxRuntimeBackend("seg.onnx", providers=["CPUExecutionProvider"], options=OrtOptions(intra_op_num_threads=1))
    >>> out = be.run(batch)        # batch: (B, 3, S, S) float32 in [0, 1] -> {"masks": (B, K, S, S), ...}
    >>> be.provider_used           # 'CPUExecutionProvider'

    `onnx` is a path (its manifest `<path>.json`, when present, gives the declared dynamic ranges and
    must match the file's sha256) or the serialized bytes (with an optional `manifest`).
    """

    def __init__(
        self, onnx: str | os.PathLike[str] | bytes, *, providers: Sequence[str | tuple[str, Mapping[str, Any]]],
        options: OrtOptions | Mapping[str, Any] | None = None, manifest: Mapping[str, Any] | None = None,
    ) -> None:
        ort = import_onnxruntime()
        self.options: OrtOptions = options if isinstance(options, OrtOptions) else validate(OrtOptions, dict(options or {}), "ONNX Runtime options")
        requested = resolve_providers(providers, self.options)
        if isinstance(onnx, (bytes, bytearray)):
            data, self.path = bytes(onnx), None
        else:
            self.path = Path(onnx)
            data = read_bytes(self.path, "ONNX model", limit=MAX_GRAPH_BYTES, error=GraphFileError)
            if manifest is None and manifest_path(self.path).is_file():
                manifest = load_manifest(self.path)
        check_initializers(load_proto(data), str(self.path or "the ONNX bytes"))  # no NaN/Inf weights run
        if manifest is not None and manifest.get("sha256") not in (None, sha256_bytes(data)):
            raise ExportError(
                f"{self.path or 'the ONNX bytes'} do not match the sha256 in the manifest: the file changed after export "
                f"(tta_runtime.deploy.write_weights keeps them in step); re-export, or delete the stale manifest"
            )
        self.manifest = dict(manifest) if manifest is not None else None
        try:
            self.session = ort.InferenceSession(
                data, _session_options(ort, self.options), providers=[name for name, _ in requested],
                provider_options=[opts for _, opts in requested],
            )
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise ExportError(f"ONNX Runtime cannot load {self.path or 'the graph'}: {type(e).__name__}: {e}") from None
        self.providers_used: list[str] = list(self.session.get_providers())
        lost = [name for name, _ in requested if name not in self.providers_used]
        if lost:
            raise BackendUnavailableError(
                f"ONNX Runtime could not create {', '.join(lost)} for this session (it would silently run on "
                f"{self.providers_used[0]}): check the CUDA / cuDNN / TensorRT libraries that provider needs"
            )
        self.provider_used: str = self.providers_used[0]
        if self.manifest is not None:
            self.inputs = [TensorSpec.from_dict(d) for d in self.manifest["inputs"]]
            self.outputs = [TensorSpec.from_dict(d) for d in self.manifest["outputs"]]
            self.ranges = dynamic_ranges(self.manifest.get("dynamic"))
        else:
            self.inputs = _session_specs(self.session.get_inputs())
            self.outputs = _session_specs(self.session.get_outputs())
            self.ranges = {}
        declared = [i.name for i in self.session.get_inputs()]
        if [s.name for s in self.inputs] != declared:
            raise ExportError(f"manifest inputs {[s.name for s in self.inputs]} differ from the graph's {declared}")
        self._device_id = int(dict(requested[0][1]).get("device_id", 0))

    # -- running -----------------------------------------------------------------------------------
    def _one_input(self, n: int) -> TensorSpec:
        if n != 1 or len(self.inputs) != 1:
            raise InvalidInputError(f"this graph takes {len(self.inputs)} inputs ({[s.name for s in self.inputs]}); use run_feeds")
        return self.inputs[0]

    def run(self, image_batch: np.ndarray) -> dict[str, np.ndarray]:
        """One batch through the graph: (B, 3, S, S) (or the exported H x W range) -> {output: array}."""
        spec = self._one_input(1)
        return self.run_feeds({spec.name: image_batch})

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input by name (numpy), validated; every output by name."""
        if set(feeds) != {s.name for s in self.inputs}:
            raise InvalidInputError(f"inputs {sorted(feeds)} given; the graph takes {[s.name for s in self.inputs]}")
        arrays = {}
        for spec in self.inputs:
            x = feeds[spec.name]
            if not isinstance(x, np.ndarray):
                kind = "a torch tensor (use run_torch)" if isinstance(x, torch.Tensor) else type(x).__name__
                raise InvalidInputError(f"input {spec.name!r} must be a numpy array, {spec_text(spec)}; got {kind}")
            check_input(spec, x.shape, str(x.dtype), self.ranges, "an array")
            arrays[spec.name] = np.ascontiguousarray(x)
        values = self.session.run([o.name for o in self.outputs], arrays)
        return dict(zip([o.name for o in self.outputs], values, strict=True))

    def run_torch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-copy run through IOBinding: `x` stays where it is (CPU, or the CUDA device of a GPU
        provider) and the outputs are preallocated beside it."""
        spec = self._one_input(1)
        if not isinstance(x, torch.Tensor):
            raise InvalidInputError(f"run_torch takes a torch tensor, {spec_text(spec)}; got {type(x).__name__} (use run)")
        dtype = str(x.dtype).removeprefix("torch.")
        dims = check_input(spec, tuple(x.shape), dtype, self.ranges, f"a {x.device.type} tensor")
        on_gpu = x.device.type == "cuda"
        if on_gpu and self.provider_used not in GPU_PROVIDERS:
            raise InvalidInputError(f"the input is on {x.device} but this session runs on {self.provider_used}; pass a CPU tensor or use a GPU provider")
        if on_gpu and (x.device.index or 0) != self._device_id:
            raise InvalidInputError(f"the input is on {x.device} but the session's provider uses device {self._device_id}")
        device_type, device_id = ("cuda", x.device.index or 0) if on_gpu else ("cpu", 0)
        x = x.detach().contiguous()
        binding = self.session.io_binding()
        binding.bind_input(spec.name, device_type, device_id, np.dtype(spec.dtype), list(x.shape), x.data_ptr())
        outs: dict[str, torch.Tensor] = {}
        unbound = []
        for o in self.outputs:
            shape = resolve_shape(o, dims)
            if shape is None:  # a foreign graph with an output axis we cannot derive: ORT allocates it
                binding.bind_output(o.name, device_type, device_id)
                unbound.append(o.name)
                continue
            t = torch.empty(shape, dtype=TORCH_DTYPES[o.dtype], device=x.device)
            binding.bind_output(o.name, device_type, device_id, np.dtype(o.dtype), list(shape), t.data_ptr())
            outs[o.name] = t
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if unbound:  # copies every output, in binding order (= self.outputs); keep the unbound ones
            for o, value in zip(self.outputs, binding.copy_outputs_to_cpu(), strict=True):
                if o.name in unbound:
                    outs[o.name] = torch.from_numpy(value).to(x.device)
        return {o.name: outs[o.name] for o in self.outputs}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

    def __enter__(self) -> OnnxRuntimeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {spec_text(s)}" for s in self.inputs)
        outs = ", ".join(o.name for o in self.outputs)
        return f"OnnxRuntimeBackend({self.path or '<bytes>'}, provider_used={self.provider_used}, inputs [{ins}] -> [{outs}])"
