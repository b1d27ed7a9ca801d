"""TensorRT engines, decided before TensorRT is called: options, profiles, cache keys, refit arrays.

Everything here is pure (no TensorRT import), so it is tested where TensorRT cannot be installed;
tensorrt.py makes the TensorRT calls with what these functions decide.

Precision: every network is created STRONGLY_TYPED (TensorRT 11 removed the FP16/INT8 builder flags,
and TensorRT 10 accepts strongly typed networks too), so an engine's precision is the ONNX file's: a
half-precision engine comes from a float16 ONNX file (`export(..., half=True)`), and a precision the
ONNX file does not carry is refused, never approximated. Engines are tied to the TensorRT version and
the GPU: they are cached under a key of ONNX sha256 + TensorRT version + GPU name and compute capability
+ precision + profile shapes (+ refit flag), with their metadata in a side JSON (`model.engine.json`),
never inside the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tta_runtime.config import validate
from tta_runtime.deploy.graph import float_weights, load_manifest, manifest_path, sha256_bytes, weight_array
from tta_runtime.deploy.options import ExportError, dynamic_ranges
from tta_runtime.errors import BackendUnavailableError, ConfigError

__all__ = [
    "EngineBuild",
    "EnginePlan",
    "TensorRTConfig",
    "cached_engine",
    "engine_cache_key",
    "network_flags",
    "plan_engine",
    "profile_shapes",
    "refit_plan",
    "tensorrt_config",
]


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


def tensorrt_config(config: TensorRTConfig | Mapping[str, Any] | None) -> TensorRTConfig:
    """A `TensorRTConfig` as is, or one validated from a mapping of its fields (None = the defaults)."""
    return config if isinstance(config, TensorRTConfig) else validate(TensorRTConfig, dict(config or {}), "tensorrt options")


def _cache_dir(cfg: TensorRTConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "tta-runtime" / "tensorrt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def profile_shapes(manifest: Mapping[str, Any], batch: int = 1) -> dict[str, dict[str, list[int]]]:
    """Optimisation-profile shapes per input from an ONNX manifest: {"image": {"min", "opt", "max"}}.

    Dynamic axes take the manifest's ranges (batch: (lo, hi), height/width: size (lo, hi)); the optimum
    is `batch` (clipped into its range) and the model's own size. Static axes are the same in all three.
    """
    ranges = dynamic_ranges(manifest.get("dynamic"))
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
    state = float_weights(weights, tensors)  # a whole model: the engine may hold one part of it
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
    return {name: weight_array(name, state[name], spec["shape"], spec["dtype"], "the engine's") for name, spec in tensors.items()}


# --------------------------------------------------------------------------------------------------
# The plan of one engine, and the cache


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


def check_onnx_for_engine(onnx_path: Path, cfg: TensorRTConfig) -> tuple[bytes, dict[str, Any]]:
    """The ONNX file and its manifest, checked (sha256, precision) before TensorRT is touched."""
    manifest = load_manifest(onnx_path)
    data = onnx_path.read_bytes()
    if sha256_bytes(data) != manifest["sha256"]:
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
    cfg = tensorrt_config(config)
    onnx_path = Path(onnx_path)
    data, manifest = check_onnx_for_engine(onnx_path, cfg)
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
    if meta.get("cache_key") != plan.key or meta.get("engine_sha256") != sha256_bytes(plan.path.read_bytes()):
        return None
    return EngineBuild(plan.path, meta, cached=True)
