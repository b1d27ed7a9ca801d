"""Run exported graphs: ONNX Runtime and TensorRT backends, an environment doctor, a backend benchmark.

    exported .onnx (+ manifest)  -> OnnxRuntimeBackend(path, providers=[...], options=OrtOptions(...))
                                      .run(np batch) -> {name: array}; .run_torch(tensor) via IOBinding
                                 -> build_engine(path, ...) -> .engine + .engine.json (cache key, profiles)
                                      TensorRTBackend(engine).run(...); .refit(adapted weights)
    Runtime(backend="onnxruntime") -> OrtFrozenPath: the runtime's frozen path on ONNX Runtime

No silent fallback: providers are named explicitly and checked against
`onnxruntime.get_available_providers()`; a provider ONNX Runtime could not create (it would fall back to
the CPU with only a warning) raises, and `provider_used` records what runs. `onnxruntime` and `tensorrt`
are imported on first use; a missing one raises `BackendUnavailableError` naming the extra to install.

TensorRT 10 vs 11: TensorRT 11 removed the FP16/INT8 builder flags (precision follows the types in the
ONNX graph: "strongly typed"), and TensorRT 10 accepts strongly typed networks too. So there is one
path: every network is created STRONGLY_TYPED, a half-precision engine comes from a float16 ONNX file
(`export(..., half=True)`), and a precision that the ONNX file does not carry is refused, never
approximated. Engines are tied to the TensorRT version and the GPU: they are cached under a key of ONNX
sha256 + TensorRT version + GPU name and compute capability + precision + profile shapes (+ refit flag),
with their metadata in a side JSON (`model.engine.json`), never inside the engine.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tta_runtime.config import validate
from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.deploy.export import (
    BackendUnavailableError,
    ExportError,
    ExportOptions,
    TensorSpec,
    _atomic_write_bytes,
    _is_float,
    _sha256_bytes,
    _weights_digest,
    export_onnx_bytes,
    load_manifest,
    manifest_path,
    set_initializers,
)

if TYPE_CHECKING:
    from tta_runtime.config import ModelCard
    from tta_runtime.ood import Calibration
    from tta_runtime.models.segmenter import SegmenterOutput

log = logging.getLogger(__name__)

__all__ = [
    "BackendUnavailableError",
    "EngineBuild",
    "OnnxRuntimeBackend",
    "OrtFrozenPath",
    "OrtOptions",
    "TensorRTBackend",
    "TensorRTConfig",
    "bench_backends",
    "build_engine",
    "cached_engine",
    "doctor",
    "engine_cache_key",
    "import_onnxruntime",
    "import_tensorrt",
    "network_flags",
    "plan_engine",
    "profile_shapes",
    "providers_for_device",
    "refit_plan",
    "resolve_providers",
]


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "ONNX Runtime is not installed: pip install 'tta-runtime[onnx]' (CPU: onnxruntime; NVIDIA GPUs: "
            "onnxruntime-gpu instead, never both: they share the import name)"
        ) from None
    return onnxruntime


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed: pip install 'tta-runtime[tensorrt]' on a machine with an NVIDIA GPU "
            "(the wheel fetches NVIDIA's libraries from NVIDIA's index at install time); on Jetson it ships "
            "with JetPack. ONNX export works without it: format='onnx'"
        ) from None
    return tensorrt


# --------------------------------------------------------------------------------------------------
# ONNX Runtime: options and providers


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
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


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
            if full in _GPU_PROVIDERS and "CUDAExecutionProvider" not in available:
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
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int64": torch.int64,
                 "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


def _session_specs(nodes: Sequence[Any]) -> list[TensorSpec]:
    return [
        TensorSpec(n.name, _ORT_DTYPES.get(n.type, n.type), tuple(d if isinstance(d, int) else (d or f"dim{i}") for i, d in enumerate(n.shape)))
        for n in nodes
    ]


def _spec_text(spec: TensorSpec) -> str:
    return f"{spec.dtype} ({', '.join(str(d) for d in spec.shape)})"


def _check_input(spec: TensorSpec, shape: tuple[int, ...], dtype: str, ranges: Mapping[str, tuple[int, int]], what: str) -> dict[str, int]:
    """Validate one input against its spec; returns the values of its dynamic axes."""
    want = f"input {spec.name!r} must be {_spec_text(spec)}" + (f", {spec.description}" if spec.description else "")
    if dtype != spec.dtype:
        hint = " (divide uint8 images by 255 and cast)" if dtype == "uint8" else f" (cast with .astype(np.{spec.dtype}))"
        raise InvalidInputError(f"{want}; got {what} of dtype {dtype}{hint}")
    if len(shape) != len(spec.shape):
        raise InvalidInputError(f"{want}; got {what} of shape {shape} ({len(shape)} dims, expected {len(spec.shape)})")
    dims: dict[str, int] = {}
    for i, (got, exp) in enumerate(zip(shape, spec.shape, strict=True)):
        if isinstance(exp, int):
            if got != exp:
                raise InvalidInputError(f"{want}; got {what} of shape {shape}: dim {i} is {got}, the graph fixes it to {exp}")
            continue
        if exp in dims and dims[exp] != got:
            raise InvalidInputError(f"{want}; got {what} of shape {shape}: dims named {exp!r} disagree")
        dims[exp] = got
        axis = {"height": "size", "width": "size"}.get(exp, exp)
        if axis in ranges:
            lo, hi = ranges[axis]
            if not lo <= got <= hi:
                raise InvalidInputError(f"{want}; got {what} of shape {shape}: {exp} {got} is outside the exported range [{lo}, {hi}]")
        elif got < 1:
            raise InvalidInputError(f"{want}; got {what} of shape {shape}: empty {exp}")
    return dims


def _resolve_shape(spec: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...] | None:
    out = []
    for d in spec.shape:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(dims[d])
        else:
            return None
    return tuple(out)


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
            if not self.path.is_file():
                raise ConfigError(f"no such ONNX file: {self.path}")
            data = self.path.read_bytes()
            if manifest is None and manifest_path(self.path).is_file():
                manifest = load_manifest(self.path)
        if manifest is not None and manifest.get("sha256") not in (None, _sha256_bytes(data)):
            raise ExportError(
                f"{self.path or 'the ONNX bytes'} do not match the sha256 in the manifest: the file changed after export "
                f"(tta_runtime.export.write_weights keeps them in step); re-export, or delete the stale manifest"
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
            self.ranges = {k: tuple(v) for k, v in (self.manifest.get("dynamic") or {}).items() if v is not None}
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
                raise InvalidInputError(f"input {spec.name!r} must be a numpy array, {_spec_text(spec)}; got {kind}")
            _check_input(spec, x.shape, str(x.dtype), self.ranges, "an array")
            arrays[spec.name] = np.ascontiguousarray(x)
        values = self.session.run([o.name for o in self.outputs], arrays)
        return dict(zip([o.name for o in self.outputs], values, strict=True))

    def run_torch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-copy run through IOBinding: `x` stays where it is (CPU, or the CUDA device of a GPU
        provider) and the outputs are preallocated beside it."""
        spec = self._one_input(1)
        if not isinstance(x, torch.Tensor):
            raise InvalidInputError(f"run_torch takes a torch tensor, {_spec_text(spec)}; got {type(x).__name__} (use run)")
        dtype = str(x.dtype).removeprefix("torch.")
        dims = _check_input(spec, tuple(x.shape), dtype, self.ranges, f"a {x.device.type} tensor")
        on_gpu = x.device.type == "cuda"
        if on_gpu and self.provider_used not in _GPU_PROVIDERS:
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
            shape = _resolve_shape(o, dims)
            if shape is None:  # a foreign graph with an output axis we cannot derive: ORT allocates it
                binding.bind_output(o.name, device_type, device_id)
                unbound.append(o.name)
                continue
            t = torch.empty(shape, dtype=_TORCH_DTYPES[o.dtype], device=x.device)
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
        ins = ", ".join(f"{s.name}: {_spec_text(s)}" for s in self.inputs)
        outs = ", ".join(o.name for o in self.outputs)
        return f"OnnxRuntimeBackend({self.path or '<bytes>'}, provider_used={self.provider_used}, inputs [{ins}] -> [{outs}])"


# --------------------------------------------------------------------------------------------------
# The runtime's frozen path on ONNX Runtime


def _versions_of(model: nn.Module) -> tuple[int, ...]:
    """In-place version counters of every parameter and buffer: they move whenever an optimizer step or a
    snapshot restore writes a tensor (cheap to read; a change triggers a digest comparison)."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


class OrtFrozenPath:
    """`Runtime._frozen_path` on ONNX Runtime for the slot segmenter: (B, 3, S, S) tensor ->
    (SegmenterOutput, [(ood_score, scorer, is_ood, recon_mse) per image]), the PyTorch path's contract.

    Exports `predictor_ood` in memory (verified on 20 random images, no file written). Before each call
    it checks whether the model's weights changed (continual adaptation, reset) and, if so, writes them
    into the graph's initializers by name and reopens the session; the graph is never re-exported.
    """

    def __init__(
        self, model: nn.Module, card: ModelCard, *, calibration: Calibration | None, providers: Sequence[str | tuple[str, Mapping[str, Any]]],
        options: OrtOptions | Mapping[str, Any] | None = None, max_batch: int = 64, verify: bool = True,
    ) -> None:
        from tta_runtime.deploy.export import _kind, _verify_bytes

        self.model, self.card = model, card
        self._providers, self._options = providers, options
        opts = validate(ExportOptions, {"part": "predictor_ood", "dynamic": {"batch": (1, max_batch)}}, "frozen path export")
        data, inputs, outputs = export_onnx_bytes(model, card, opts, calibration=calibration)
        if verify:
            report = _verify_bytes(data, model, card, opts, inputs, outputs, calibration=calibration, n_images=20, seed=0)
            if not report["passed"]:
                raise ExportError(f"ONNX frozen path does not reproduce the model: {report['outputs']}")
        import onnx

        self._proto = onnx.load_from_string(data)
        self._manifest = {
            "inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
            "dynamic": opts.dynamic.model_dump(mode="json") if opts.dynamic else None,
        }
        self.ood = _kind(card).ood_info(card, "predictor_ood", calibration) or {}
        self._names = [n for n, v in model.state_dict().items() if v.is_floating_point()]
        self.backend = OnnxRuntimeBackend(data, providers=providers, options=options, manifest=self._manifest)
        self._versions = _versions_of(model)
        self._digest = self._state_digest()
        self.resyncs = 0

    @property
    def provider_used(self) -> str:
        return self.backend.provider_used

    def _state_digest(self) -> str:
        state = self.model.state_dict()
        return _weights_digest({n: state[n] for n in self._names})

    def sync(self) -> bool:
        """Push the model's current weights into the session if they changed; True if it did."""
        versions = _versions_of(self.model)
        if versions == self._versions:
            return False
        self._versions = versions
        digest = self._state_digest()
        if digest == self._digest:  # written but equal (an episodic restore)
            return False
        state = self.model.state_dict()
        set_initializers(self._proto, {n: state[n] for n in self._names})
        self.backend = OnnxRuntimeBackend(
            self._proto.SerializeToString(), providers=self._providers, options=self._options, manifest=self._manifest
        )
        self._digest = digest
        self.resyncs += 1
        return True

    def __call__(self, x: torch.Tensor) -> tuple[SegmenterOutput, list[tuple[float, str, bool | None, float]]]:
        """x (B, 3, S, S) float in [0, 1] -> (SegmenterOutput with masks (B, K, S*S), reconstruction
        (B, S*S, 3), slots; rgb / logits / attention empty), [(ood_score, scorer, is_ood, recon_mse)] per image.
        The graph's masks already follow the card's mask source (``segmentation_masks`` returns them as they are)."""
        from tta_runtime.models.segmenter import SegmenterOutput

        self.sync()
        outs = self.backend.run(x.detach().float().cpu().numpy())
        masks = torch.from_numpy(outs["masks"]).flatten(2).to(x.device)  # (B, K, P)
        recon = torch.from_numpy(outs["reconstruction"]).flatten(2).transpose(1, 2).to(x.device)  # (B, P, 3)
        slots = torch.from_numpy(outs["slots"]).to(x.device)
        empty = masks.new_zeros(0)  # per-slot RGB, logits and attention stay inside the graph
        out = SegmenterOutput(masks=masks, reconstruction=recon, rgb=empty, logits=empty, slots=slots, attention=empty)
        scorer, threshold = self.ood.get("scorer", "recon_mse"), self.ood.get("threshold")
        return out, [
            (float(score), scorer, None if threshold is None else bool(score > threshold), float(mse))
            for score, mse in zip(outs["ood_score"], outs["recon_mse"], strict=True)
        ]


# --------------------------------------------------------------------------------------------------
# TensorRT: configuration, profiles, cache keys (pure), then the builder, the runner and refit


class TensorRTConfig(BaseModel):
    """How `build_engine` builds (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto", description="'auto' = the ONNX file's; anything else must equal it (export half=True for fp16)"
    )
    workspace: float | None = Field(None, gt=0, description="builder workspace limit in GiB; None = TensorRT's default")
    refittable: bool = Field(True, description="build with BuilderFlag.REFIT so adapted weights can be pushed in (refit)")
    builder_optimization_level: int | None = Field(None, ge=0, le=5)
    cache_dir: str | None = Field(None, description="engines and timing caches; default ~/.cache/tta-runtime/tensorrt")
    timing_cache: bool = Field(True, description="reuse and update a timing cache per TensorRT version and GPU")
    device: int = Field(0, ge=0, description="CUDA device index")


def _cache_dir(cfg: TensorRTConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "tta-runtime" / "tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def profile_shapes(manifest: Mapping[str, Any], batch: int = 1) -> dict[str, dict[str, list[int]]]:
    """Optimisation-profile shapes per input from an ONNX manifest: {"image": {"min", "opt", "max"}}.

    Dynamic axes take the manifest's ranges (batch: (lo, hi), height/width: size (lo, hi)); the optimum
    is `batch` (clipped into its range) and the model's own size. Static axes are the same in all three.
    """
    ranges = {k: tuple(v) for k, v in (manifest.get("dynamic") or {}).items() if v is not None}
    model_size = int(manifest["model_size"])
    out = {}
    for spec in manifest["inputs"]:
        lo, opt, hi = [], [], []
        for d in spec["shape"]:
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
                continue
            axis = {"height": "size", "width": "size"}.get(d, d)
            if axis not in ranges:
                raise ExportError(f"input {spec['name']!r} axis {d!r} is dynamic but the manifest gives no range for it")
            a, b = ranges[axis]
            best = batch if axis == "batch" else model_size
            lo.append(a), opt.append(min(max(best, a), b)), hi.append(b)
        out[spec["name"]] = {"min": lo, "opt": opt, "max": hi}
    return out


def engine_cache_key(
    *, onnx_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str, precision: str,
    profiles: Mapping[str, Mapping[str, Sequence[int]]], refittable: bool,
) -> str:
    """sha256 of everything an engine is tied to; equal keys = an engine that may be reused as is."""
    doc = {
        "onnx_sha256": onnx_sha256, "tensorrt": tensorrt_version, "gpu": gpu_name, "sm": compute_capability,
        "precision": precision, "refittable": refittable,
        "profiles": {k: {m: list(v[m]) for m in ("min", "opt", "max")} for k, v in sorted(profiles.items())},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def network_flags(trt: Any) -> int:
    """Network creation flags: STRONGLY_TYPED (TensorRT 10: opt-in, needed so the ONNX types decide the
    precision; TensorRT 11: the only mode, flag accepted). EXPLICIT_BATCH is never set (default since 10)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        major = int(str(trt.__version__).split(".")[0])
        if major < 11:
            raise BackendUnavailableError(f"TensorRT {trt.__version__} has no strongly typed networks; tta-runtime needs TensorRT 10 or newer")
        return 0  # strong typing is unconditional
    return 1 << int(flag)


def refit_plan(
    weights: nn.Module | Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]], refittable: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The arrays to hand `Refitter.set_named_weights`, by ONNX initializer (= state-dict) name.

    `weights`: a module (its state-dict tensors the engine holds) or a state dict (exactly those tensors).
    `tensors`: the manifest's {"name": {"shape", "dtype"}}; every one must be given, with its shape;
    values are cast to its dtype (float16 engines take float16 weights) and must be finite.
    `refittable`: `Refitter.get_all_weights()`; a weight TensorRT does not expose by name is an error.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    state = {k: v for k, v in state.items() if _is_float(v)}
    if isinstance(weights, nn.Module):  # the whole model; the engine may hold one part of it
        state = {k: v for k, v in state.items() if k in tensors}
    missing, unknown = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
    if missing or unknown:
        raise ExportError(f"refit weights do not match the engine's: missing {missing[:3]} ({len(missing)}), unknown {unknown[:3]} ({len(unknown)})")
    if refittable is not None:
        hidden = sorted(set(tensors) - set(refittable))
        if hidden:
            raise ExportError(
                f"TensorRT exposes no refittable weights named {hidden[:3]} ({len(hidden)} in all): the engine was built "
                f"without refittable=True, or TensorRT fused those weights; rebuild with TensorRTConfig(refittable=True)"
            )
    plan = {}
    for name, spec in tensors.items():
        v = state[name]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if list(arr.shape) != list(spec["shape"]):
            raise ExportError(f"refit weight {name!r} has shape {list(arr.shape)}, the engine's {spec['shape']}")
        if not np.isfinite(arr).all():
            raise ExportError(f"refit weight {name!r} holds NaN or inf values; refusing to refit")
        plan[name] = np.ascontiguousarray(arr.astype(spec["dtype"], copy=False))
    return plan


def _gpu_identity(device: int) -> tuple[str, str]:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and torch.cuda.is_available() is False here")
    if device >= torch.cuda.device_count():
        raise BackendUnavailableError(f"CUDA device {device} requested; {torch.cuda.device_count()} present")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


@dataclass
class EngineBuild:
    """A built (or cached) engine: its path and its side-file metadata."""

    path: Path
    metadata: dict[str, Any]
    cached: bool


@dataclass
class EnginePlan:
    """Everything about an engine decided before TensorRT is called: where it goes, its cache key,
    profiles and precision, and the side-file metadata (completed after the build)."""

    onnx_path: Path
    onnx_bytes: bytes
    path: Path
    key: str
    profiles: dict[str, dict[str, list[int]]]
    precision: str
    timing_cache_path: Path | None
    metadata: dict[str, Any]

    @property
    def side_path(self) -> Path:
        return manifest_path(self.path)

    @property
    def dynamic(self) -> bool:
        return any(p["min"] != p["max"] for p in self.profiles.values())


def _onnx_for_engine(onnx_path: Path, cfg: TensorRTConfig) -> tuple[bytes, dict[str, Any]]:
    """The ONNX file and its manifest, checked (sha256, precision) before TensorRT is touched."""
    manifest = load_manifest(onnx_path)
    data = onnx_path.read_bytes()
    if _sha256_bytes(data) != manifest["sha256"]:
        raise ExportError(f"{onnx_path} does not match its manifest's sha256; re-export it")
    precision = manifest["precision"]
    if cfg.precision not in ("auto", precision):
        raise ConfigError(
            f"precision {cfg.precision!r} requested but {onnx_path.name} is a {precision} graph; TensorRT builds strongly "
            f"typed (precision = the ONNX types): export with half={cfg.precision == 'fp16'} for a {cfg.precision} engine"
        )
    return data, manifest


def plan_engine(
    onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str] | None = None, *,
    config: TensorRTConfig | Mapping[str, Any] | None = None, batch: int = 1, tensorrt_version: str, gpu_name: str,
    compute_capability: str,
) -> EnginePlan:
    """The engine's cache key, path (default: the cache folder, named by the key), profiles and side
    metadata for this TensorRT version and GPU. Pure: `build_engine` calls it with the real ones."""
    cfg = config if isinstance(config, TensorRTConfig) else validate(TensorRTConfig, dict(config or {}), "tensorrt options")
    onnx_path = Path(onnx_path)
    data, manifest = _onnx_for_engine(onnx_path, cfg)
    sha = manifest["sha256"]
    profiles = profile_shapes(manifest, batch)
    precision = manifest["precision"]
    key = engine_cache_key(
        onnx_sha256=sha, tensorrt_version=tensorrt_version, gpu_name=gpu_name, compute_capability=compute_capability,
        precision=precision, profiles=profiles, refittable=cfg.refittable,
    )
    cache = _cache_dir(cfg)
    path = Path(engine_path) if engine_path is not None else cache / f"{onnx_path.stem}-{key[:16]}.engine"
    timing = cache / f"timing-trt{_slug(tensorrt_version)}-{_slug(gpu_name)}-sm{compute_capability}.cache" if cfg.timing_cache else None
    metadata = {
        "format_version": 1, "kind": "tensorrt_engine", "file": path.name, "engine_sha256": None,
        "cache_key": key, "onnx_file": str(onnx_path), "onnx_sha256": sha, "tensorrt_version": tensorrt_version,
        "gpu": gpu_name, "compute_capability": compute_capability, "precision": precision, "profiles": profiles,
        "refittable": cfg.refittable, "workspace_gib": cfg.workspace, "builder_optimization_level": cfg.builder_optimization_level,
        "timing_cache": str(timing) if timing else None, "build_seconds": None, "created": None,
        "onnx_manifest": {k: manifest.get(k) for k in ("model", "part", "inputs", "outputs", "dynamic", "model_size", "ood", "weights")},
    }
    return EnginePlan(onnx_path, data, path, key, profiles, precision, timing, metadata)


def cached_engine(plan: EnginePlan) -> EngineBuild | None:
    """The engine at `plan.path` if its side file carries the same cache key and the engine's sha256."""
    if not (plan.path.is_file() and plan.side_path.is_file()):
        return None
    try:
        meta = json.loads(plan.side_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("cache_key") != plan.key or meta.get("engine_sha256") != _sha256_bytes(plan.path.read_bytes()):
        return None
    return EngineBuild(plan.path, meta, cached=True)


def _engine_dtype_name(trt: Any, dtype: Any) -> str:
    return np.dtype(trt.nptype(dtype)).name


def build_engine(
    onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str] | None = None, *,
    config: TensorRTConfig | Mapping[str, Any] | None = None, batch: int = 1,
) -> EngineBuild:
    """A serialized TensorRT engine for an exported ONNX file, reused from the cache when its key matches.

    Precision follows the ONNX file (strongly typed); `config.precision` must agree. The side file
    `<engine>.json` records the cache key and what it is made of, the profiles, the ONNX manifest's
    I/O and weight specs, and the build time. Steps before the TensorRT calls: `plan_engine`.
    """
    cfg = config if isinstance(config, TensorRTConfig) else validate(TensorRTConfig, dict(config or {}), "tensorrt options")
    _onnx_for_engine(Path(onnx_path), cfg)  # a wrong file or precision fails before TensorRT is needed
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
        _atomic_write_bytes(plan.timing_cache_path, bytes(bconf.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
    manifest = plan.metadata["onnx_manifest"]
    want = {s["name"]: s["dtype"] for s in (*manifest["inputs"], *manifest["outputs"])}
    got = {name: _engine_dtype_name(trt, engine.get_tensor_dtype(name)) for name in want}
    if got != want:
        raise ExportError(f"TensorRT did not honour the graph's precision: I/O types {got}, expected {want}")
    _atomic_write_bytes(plan.path, plan_bytes)
    meta = {**plan.metadata, "engine_sha256": _sha256_bytes(plan_bytes), "build_seconds": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write_bytes(plan.side_path, (json.dumps(meta, indent=2) + "\n").encode())
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
            raise ConfigError(f"{self.path} or its side file {side.name} is missing; build it with tta_runtime.backends.build_engine")
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
        self.ranges = {k: tuple(v) for k, v in (spec.get("dynamic") or {}).items() if v is not None}
        self.provider_used = f"TensorRT {trt.__version__}"

    def run_torch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.inputs[0]
        _check_input(spec, tuple(x.shape), str(x.dtype).removeprefix("torch."), self.ranges, "a tensor")
        x = x.detach().to(self.device).contiguous()
        self.context.set_input_shape(spec.name, tuple(x.shape))
        self.context.set_tensor_address(spec.name, x.data_ptr())
        outs = {}
        for o in self.outputs:
            shape = tuple(self.context.get_tensor_shape(o.name))
            t = torch.empty(shape, dtype=_TORCH_DTYPES[o.dtype], device=self.device)
            self.context.set_tensor_address(o.name, t.data_ptr())
            outs[o.name] = t
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed (see its log)")
        stream.synchronize()
        return outs

    def run(self, image_batch: np.ndarray) -> dict[str, np.ndarray]:
        if not isinstance(image_batch, np.ndarray):
            raise InvalidInputError(f"run takes a numpy array; got {type(image_batch).__name__} (use run_torch for tensors)")
        _check_input(self.inputs[0], image_batch.shape, str(image_batch.dtype), self.ranges, "an array")
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


# --------------------------------------------------------------------------------------------------
# Doctor: what this machine can run


def _probe(fn: Any) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:  # a broken install must be reported, not crash the doctor
        return {"present": False, "error": f"{type(e).__name__}: {e}"}


def doctor() -> dict[str, Any]:
    """Versions and capabilities of the optional stack (never raises)."""
    import importlib
    import importlib.util

    from tta_runtime import __version__

    def module(name: str) -> Any:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)

    def torch_info() -> dict[str, Any]:
        cuda = torch.cuda.is_available()
        return {
            "present": True, "version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
            "devices": [f"{torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                        for i in range(torch.cuda.device_count())] if cuda else [],
            "cudnn": torch.backends.cudnn.version() if cuda else None, "threads": torch.get_num_threads(),
        }

    def ort_info() -> dict[str, Any]:
        ort = module("onnxruntime")
        if ort is None:
            return {"present": False, "install": "pip install 'tta-runtime[onnx]'"}
        return {"present": True, "version": ort.__version__, "device": ort.get_device(), "providers": ort.get_available_providers()}

    def trt_info() -> dict[str, Any]:
        trt = module("tensorrt")
        if trt is None:
            return {"present": False, "install": "pip install 'tta-runtime[tensorrt]' (NVIDIA GPU machines; JetPack on Jetson)"}
        return {"present": True, "version": trt.__version__, "strongly_typed_only": int(trt.__version__.split(".")[0]) >= 11}

    def cv2_info() -> dict[str, Any]:
        cv2 = module("cv2")
        if cv2 is None:
            return {"present": False, "install": "pip install opencv-python-headless"}
        backends = sorted({cv2.videoio_registry.getBackendName(b) for b in cv2.videoio_registry.getBackends()})
        return {"present": True, "version": cv2.__version__, "video_backends": backends, "cuda_devices": cv2.cuda.getCudaEnabledDeviceCount() if hasattr(cv2, "cuda") else 0}

    def onnx_info() -> dict[str, Any]:
        onnx = module("onnx")
        if onnx is None:
            return {"present": False, "install": "pip install 'tta-runtime[onnx]'"}
        return {"present": True, "version": onnx.__version__, "max_opset": onnx.defs.onnx_opset_version()}

    return {
        "tta_runtime": {"version": __version__},
        "python": {"version": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                   "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "torch": _probe(torch_info),
        "onnx": _probe(onnx_info),
        "onnxruntime": _probe(ort_info),
        "tensorrt": _probe(trt_info),
        "opencv": _probe(cv2_info),
    }


# --------------------------------------------------------------------------------------------------
# Benchmark: the frozen path per backend


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, int(np.ceil(q * len(sorted_values))) - 1))]


def _max_dev(got: Mapping[str, Any], ref: Mapping[str, np.ndarray]) -> float:
    dev = 0.0
    for k, r in ref.items():
        g = got[k]
        g = g.detach().float().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g, dtype=np.float32)
        dev = max(dev, float(np.abs(g.astype(np.float64) - r).max()))
    return dev


def _time_round_robin(calls: Mapping[str, Any], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each backend, the backends taking turns call by call (rotating who goes
    first), so a neighbour's load on a shared CPU slows all of them alike and their ratio stays fair."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def bench_backends(
    model: str | None = None, *, part: str = "predictor", batches: Sequence[int] = (1, 8), repeats: int = 50,
    warmup: int = 5, threads: int = 1, seed: int = 0,
) -> dict[str, Any]:
    """Latency (median, p90) and throughput of the frozen path per available backend, at each batch size,
    and each backend's max deviation from PyTorch eager (CPU, float32) on the same random images.

    Backends: PyTorch eager CPU and ONNX Runtime CPU always; PyTorch CUDA, ONNX Runtime CUDA (IOBinding)
    and TensorRT when present (else "skipped: <why>"). CPU backends use `threads` threads. The backends
    take turns call by call (`_time_round_robin`), so the ONNX Runtime / PyTorch ratio comes from one
    interleaved run. GPU calls end with a synchronize, so their latency includes the device work.
    """
    from tta_runtime.deploy.export import _kind, export
    from tta_runtime.runtime import Runtime

    if repeats < 3 or warmup < 0 or threads < 1 or not batches or min(batches) < 1:
        raise ConfigError(f"bench backends needs repeats >= 3, warmup >= 0, threads >= 1 and batches >= 1; got {repeats}, {warmup}, {threads}, {batches}")
    rt = Runtime.from_pretrained(model)
    card, net = rt.card, rt.model
    s = card.preprocessing.size
    gen = torch.Generator().manual_seed(seed)
    images = {b: torch.rand(b, 3, s, s, generator=gen) for b in batches}
    dynamic = {"batch": (1, max(batches))}
    opts = validate(ExportOptions, {"part": part, "dynamic": dynamic}, "bench export")
    kind = _kind(card)
    names = [o.name for o in kind.io(card, part, opts)[1]]
    report: dict[str, Any] = {
        "model": card.name, "part": part, "image_size": s, "threads": threads, "repeats": repeats, "warmup": warmup,
        "timing": "backends take turns call by call (round robin); latency = wall time of one call; throughput = batch / median",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "load_average_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "versions": {k: v.get("version") for k, v in doctor().items() if isinstance(v, dict) and k != "python"},
        "backends": {},
    }
    runners: dict[str, Any] = {}  # name -> {batch: call}
    cuda = torch.device("cuda", 0) if torch.cuda.is_available() else None

    def torch_runner(device: torch.device) -> dict[int, Any]:
        net_d = net if device.type == "cpu" else copy.deepcopy(net).to(device)
        g = kind.wrap(net_d, card, part, opts, rt.calibration).eval()
        xs = {b: x.to(device) for b, x in images.items()}

        def call(b: int) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                out = dict(zip(names, g(xs[b]), strict=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        return {b: (lambda b=b: call(b)) for b in batches}

    def add(name: str, make: Any) -> None:
        try:
            runners[name] = make()
        except Exception as e:  # one backend failing must not hide the others' numbers
            report["backends"][name] = {"status": f"failed: {type(e).__name__}: {e}"}

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            g_ref = kind.wrap(net, card, part, opts, rt.calibration).eval()
            ref = {b: dict(zip(names, (t.numpy() for t in g_ref(x)), strict=True)) for b, x in images.items()}
        with tempfile.TemporaryDirectory() as tmp:
            onnx_file = Path(tmp) / "bench.onnx"
            exported = export(net, card, "onnx", onnx_file, part=part, dynamic=dynamic, calibration=rt.calibration)
            report["onnx_verification_max_abs"] = {k: v["max_abs"] for k, v in exported.verification["outputs"].items()}

            def ort_cpu() -> dict[int, Any]:
                be = OnnxRuntimeBackend(onnx_file, providers=["CPUExecutionProvider"],
                                        options=OrtOptions(intra_op_num_threads=threads, inter_op_num_threads=1))
                arrays = {b: x.numpy() for b, x in images.items()}
                return {b: (lambda b=b: be.run(arrays[b])) for b in batches}

            add("pytorch_eager_cpu", lambda: torch_runner(torch.device("cpu")))
            add("onnxruntime_cpu", ort_cpu)
            if cuda is None:
                for name in ("pytorch_eager_cuda", "onnxruntime_cuda_iobinding", "tensorrt"):
                    report["backends"][name] = {"status": "skipped: no CUDA device"}
            else:
                add("pytorch_eager_cuda", lambda: torch_runner(cuda))
                if "CUDAExecutionProvider" in import_onnxruntime().get_available_providers():
                    def ort_cuda() -> dict[int, Any]:
                        be = OnnxRuntimeBackend(onnx_file, providers=["CUDAExecutionProvider"])
                        xs = {b: x.to(cuda) for b, x in images.items()}

                        def call(b: int) -> dict[str, torch.Tensor]:
                            out = be.run_torch(xs[b])
                            torch.cuda.synchronize(cuda)
                            return out

                        return {b: (lambda b=b: call(b)) for b in batches}

                    add("onnxruntime_cuda_iobinding", ort_cuda)
                else:
                    report["backends"]["onnxruntime_cuda_iobinding"] = {
                        "status": "skipped: CUDAExecutionProvider not available (needs onnxruntime-gpu)"}
                try:
                    import_tensorrt()
                except BackendUnavailableError:
                    report["backends"]["tensorrt"] = {"status": "skipped: tensorrt not installed (tta-runtime[tensorrt])"}
                else:
                    def trt() -> dict[int, Any]:
                        built = build_engine(onnx_file, Path(tmp) / "bench.engine", config={"cache_dir": tmp}, batch=1)
                        be = TensorRTBackend(built.path)
                        xs = {b: x.to(cuda) for b, x in images.items()}
                        return {b: (lambda b=b: be.run_torch(xs[b])) for b in batches}

                    add("tensorrt", trt)
            for b in batches:
                calls = {n: r[b] for n, r in runners.items()}
                times = _time_round_robin(calls, warmup, repeats)
                for n, t in times.items():
                    t = sorted(t)
                    med = statistics.median(t)
                    entry = report["backends"].setdefault(n, {"status": "ok", "batches": {}})
                    entry["batches"][str(b)] = {
                        "median_ms": round(med * 1e3, 4), "p90_ms": round(_percentile(t, 0.9) * 1e3, 4),
                        "min_ms": round(t[0] * 1e3, 4), "throughput_ips": round(b / med, 2),
                        "max_abs_dev": _max_dev(calls[n](), ref[b]),
                    }
    finally:
        torch.set_num_threads(old_threads)
    be = report["backends"]
    ok = all(be.get(n, {}).get("status") == "ok" for n in ("pytorch_eager_cpu", "onnxruntime_cpu")) and 1 in batches
    ratio = be["pytorch_eager_cpu"]["batches"]["1"]["median_ms"] / be["onnxruntime_cpu"]["batches"]["1"]["median_ms"] if ok else None
    report["ort_cpu_speedup_batch1"] = None if ratio is None else round(ratio, 3)
    if all(be.get(n, {}).get("status") == "ok" for n in ("pytorch_eager_cpu", "onnxruntime_cpu")):
        report["ort_cpu_speedup_per_batch"] = {
            b: round(be["pytorch_eager_cpu"]["batches"][b]["median_ms"] / be["onnxruntime_cpu"]["batches"][b]["median_ms"], 3)
            for b in be["onnxruntime_cpu"]["batches"]
        }
    report["target_speedup"] = 2.0
    report["meets_target"] = None if ratio is None else bool(ratio >= 2.0)
    report["definition"] = "ort_cpu_speedup_batch1 = PyTorch eager CPU median latency / ONNX Runtime CPU median latency, batch 1, same interleaved run"
    return report
