"""ONNX graph tools: initializers named by state-dict key, weights written into a graph, manifests.

Every floating tensor of the model's state dict is exactly one initializer of the same name (the export
renames the wrapper's prefix away and keeps equal-valued tensors apart), so adapted weights go into an
exported file by name (`write_weights`, `set_initializers`) without re-exporting. Beside each exported
file lies its manifest `<file>.json`: the request, the I/O specs, the sha256 of the file, a digest of
the weights it holds, the verification report and the package versions.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from tta_runtime.config import format_validation_error
from tta_runtime.deploy.options import ExportError
from tta_runtime.device import optional_import
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.files import atomic_write, read_bytes, read_json

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FORMAT",
    "MAX_GRAPH_BYTES",
    "GraphFileError",
    "atomic_write_bytes",
    "check_initializers",
    "drop_initializer_inputs",
    "float_weights",
    "import_onnx",
    "initializer_map",
    "load_manifest",
    "load_proto",
    "manifest_path",
    "package_versions",
    "rename_initializers",
    "set_initializers",
    "sha256_bytes",
    "state_names",
    "tta_runtime_version",
    "utc_now",
    "weight_array",
    "weights_digest",
    "write_manifest",
    "write_weights",
]

MANIFEST_FORMAT = 1
MAX_GRAPH_BYTES = 2 << 30  # protobuf's own limit on one message
_FLOAT_TYPES = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


class GraphFileError(ExportError, ModelLoadError):
    """An exported graph or its manifest is missing, malformed or tampered with (an `ExportError` and a
    `ModelLoadError`: loading it failed)."""


def import_onnx() -> ModuleType:
    """The `onnx` package, or `MissingExtraError` naming the extra."""
    return optional_import("onnx", "pip install 'tta-runtime[onnx]'", "ONNX export")


def load_proto(source: onnx.ModelProto | str | os.PathLike[str] | bytes) -> onnx.ModelProto:
    """A ModelProto from a proto (returned as is), serialized bytes or a path (a regular file);
    `GraphFileError` if it is not one, or if a floating initializer holds NaN or infinite values."""
    onnx = import_onnx()
    if isinstance(source, onnx.ModelProto):
        return source
    what = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else read_bytes(source, "ONNX model", limit=MAX_GRAPH_BYTES, error=GraphFileError)
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise GraphFileError(f"{what} is not an ONNX model: {type(e).__name__}: {e}") from None
    check_initializers(proto, str(what))
    return proto


def check_initializers(proto: onnx.ModelProto, where: str = "the graph") -> None:
    """Refuse (`GraphFileError`) a graph whose embedded floating initializers hold NaN or infinite values."""
    onnx = import_onnx()
    for init in proto.graph.initializer:
        if init.data_location == 1 or init.data_type not in _FLOAT_TYPES:  # external data; integer tensors
            continue
        try:
            arr = onnx.numpy_helper.to_array(init)
        except Exception as e:  # a malformed tensor proto
            raise GraphFileError(f"initializer {init.name!r} of {where} cannot be read: {type(e).__name__}: {e}") from None
        if not np.isfinite(arr).all():
            raise GraphFileError(
                f"initializer {init.name!r} of {where} holds NaN or infinite values: the file was damaged or "
                f"tampered with; re-export it"
            )


# --------------------------------------------------------------------------------------------------
# Initializers named by state-dict key


def state_names(model: nn.Module, prefixes: tuple[str, ...] | None = None) -> dict[str, tuple[int, ...]]:
    """What adaptation can change and the graph must expose by name: the state dict's floating tensors
    (under `prefixes`, the part's modules, when given), with shapes."""
    return {
        k: tuple(v.shape) for k, v in model.state_dict().items()
        if v.is_floating_point() and (prefixes is None or k.startswith(prefixes))
    }


def drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Make the weights plain initializers again (graph inputs only for the image).

    The export keeps initializers as graph inputs because that is the only way to switch off the
    exporter's deduplication pass, which merges parameters with equal values into one initializer
    (e.g. untrained LayerNorm weights, all ones): a later write of adapted weights would then change
    both. As plain initializers they are constants ONNX Runtime and TensorRT can fold.
    """
    inits = {i.name for i in proto.graph.initializer}
    kept = [vi for vi in proto.graph.input if vi.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


def rename_initializers(proto: onnx.ModelProto, prefix: str) -> None:
    """Drop the wrapper's attribute prefix so initializer names equal the model's state-dict keys."""
    graph = proto.graph
    renames = {i.name: i.name[len(prefix):] for i in graph.initializer if i.name.startswith(prefix)}
    taken = {i.name for i in graph.initializer} - set(renames)
    clash = sorted(set(renames.values()) & taken)
    if clash:
        raise ExportError(f"cannot rename initializers {clash[:3]}: a graph tensor already has that name")
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in graph.input:
        if vi.name in renames:
            vi.name = renames[vi.name]


def initializer_map(
    onnx_model: onnx.ModelProto | str | os.PathLike[str], model: nn.Module | Mapping[str, Any], *,
    prefixes: tuple[str, ...] | None = None,
) -> dict[str, str]:
    """State-dict name -> ONNX initializer name (identical by construction) for every floating tensor of
    `model` (a module or a state dict; under `prefixes`, the exported part's modules, when given);
    raises `ExportError` if one is missing, reshaped or read by no node."""
    proto = load_proto(onnx_model)
    if isinstance(model, nn.Module):
        names = state_names(model, prefixes)
    else:
        names = {k: tuple(np.shape(v)) for k, v in model.items() if prefixes is None or k.startswith(prefixes)}
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    used = {n for node in proto.graph.node for n in node.input}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ExportError(
            f"{len(missing)} of {len(names)} parameters have no initializer of the same name in the graph, e.g. "
            f"{missing[:3]}: the graph was exported with constant folding or by another tool; re-export with "
            f"tta_runtime.deploy.export"
        )
    wrong = [f"{n}: model {names[n]}, graph {inits[n]}" for n in names if inits[n] != names[n]]
    if wrong:
        raise ExportError(f"initializer shapes differ from the model's: {wrong[:3]}")
    unused = [n for n in names if n not in used]
    if unused:
        raise ExportError(f"initializers {unused[:3]} are not read by any node: they would not carry the weights")
    return {n: n for n in names}


# --------------------------------------------------------------------------------------------------
# Writing weights into a graph


def float_weights(weights: nn.Module | Mapping[str, Any], names: Any, *, subset: bool = False) -> dict[str, Any]:
    """The floating tensors of `weights` (a module's state dict, or a state dict): integer buffers
    (counters) are not weights. A module, or `subset`, keeps only those in `names` (the graph's)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    state = {k: v for k, v in state.items() if _is_float(v)}
    if isinstance(weights, nn.Module) or subset:
        state = {k: v for k, v in state.items() if k in names}
    return state


def _is_float(v: Any) -> bool:
    return v.is_floating_point() if isinstance(v, torch.Tensor) else np.asarray(v).dtype.kind == "f"


def weight_array(name: str, value: Any, shape: Any, dtype: Any, owner: str) -> np.ndarray:
    """`value` (tensor or array) as a C-contiguous array of `dtype`; refused (`ExportError`) unless it has
    `shape` (the `owner`'s: "the graph's initializer", "the engine's") and only finite values."""
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if tuple(arr.shape) != tuple(shape):
        raise ExportError(f"weight {name!r} has shape {tuple(arr.shape)}, {owner} {tuple(shape)}")
    if not np.isfinite(arr).all():
        raise ExportError(f"weight {name!r} holds NaN or inf values; refusing to write it")
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


def set_initializers(proto: onnx.ModelProto, weights: Mapping[str, Any]) -> list[str]:
    """Replace initializer values in `proto` by name (cast to each initializer's dtype); returns the names.

    Refuses unknown names, shape changes and non-finite values. In memory: `write_weights` and the
    runtime's ONNX Runtime path (`OrtFrozenPath`) both use it.
    """
    onnx = import_onnx()
    inits = {i.name: i for i in proto.graph.initializer}
    unknown = sorted(set(weights) - set(inits))
    if unknown:
        raise ExportError(
            f"{len(unknown)} weight(s) have no initializer of that name in the graph, e.g. {unknown[:3]}; "
            f"the graph was exported from another architecture or part"
        )
    written = []
    for name, value in weights.items():
        init = inits[name]
        if init.data_location == 1:  # onnx.TensorProto.EXTERNAL
            raise ExportError(f"initializer {name!r} is stored as external data; write_weights handles embedded initializers only")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(onnx.numpy_helper.from_array(weight_array(name, value, init.dims, dtype, "the graph's initializer"), name))
        written.append(name)
    return written


def write_weights(
    onnx_path: str | os.PathLike[str], weights: nn.Module | Mapping[str, Any], *, strict: bool = True
) -> dict[str, Any]:
    """Write `weights` (a module, e.g. `Runtime.model` after adaptation, or a state dict) into the
    initializers of an exported ONNX file by name, without re-exporting; updates the manifest.

    A module gives the manifest's tensors from its state dict (a part reads only its own modules'); a
    mapping must, with `strict` (default), hold every tensor the manifest lists and nothing else.
    The manifest's sha256 and weights digest are updated and its verification is marked stale (it was
    run on the old weights); call `verify(...)` to re-check. Returns {"written", "sha256", "previous_sha256"}.
    """
    path = Path(onnx_path)
    manifest = load_manifest(path)
    old = path.read_bytes()
    if sha256_bytes(old) != manifest["sha256"]:
        raise ExportError(f"{path} does not match the sha256 in its manifest: it was changed by something else; re-export it")
    expected = set(manifest["weights"]["tensors"])
    state = float_weights(weights, expected, subset=not strict)
    if strict:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ExportError(
                f"weights do not match the graph's tensors: missing {missing[:3]} ({len(missing)}), "
                f"unknown {extra[:3]} ({len(extra)}); pass strict=False to write a subset"
            )
    proto = load_proto(old)
    written = set_initializers(proto, state)
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    previous = manifest["sha256"]
    manifest["sha256"] = sha256_bytes(data)
    manifest["weights"].update(
        digest=weights_digest(state) if len(written) == len(expected) else None,
        source="write_weights",
        written=utc_now(),
        n_written=len(written),
    )
    ver = manifest.get("verification") or {}
    ver["stale"] = "weights were written after this check; run tta_runtime.deploy.verify(...) to re-check"
    manifest["verification"] = ver
    write_manifest(path, manifest)
    log.info("wrote %d weight tensors into %s (sha256 %s -> %s)", len(written), path, previous[:12], manifest["sha256"][:12])
    return {"written": written, "sha256": manifest["sha256"], "previous_sha256": previous}


# --------------------------------------------------------------------------------------------------
# Manifests, digests, files


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The side JSON of an exported file: `model.onnx` -> `model.onnx.json`."""
    p = Path(path)
    return p.with_name(p.name + ".json")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    dtype: str
    shape: list[int | str]


class _Weights(BaseModel):
    model_config = ConfigDict(extra="allow")
    tensors: dict[str, Any]


class _Manifest(BaseModel):
    """What the readers of a manifest rely on (everything else is kept as written)."""

    model_config = ConfigDict(extra="allow")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[_Spec] = Field(min_length=1)
    outputs: list[_Spec] = Field(min_length=1)
    request: dict[str, Any]
    precision: str
    model_size: int
    weights: _Weights
    dynamic: dict[str, Annotated[list[int], Field(min_length=2, max_length=2)] | None] | None = None


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest beside an exported file (`GraphFileError` if it is missing, unreadable, not a JSON
    object or lacks the keys its readers use)."""
    mp = manifest_path(path)
    if not mp.exists() and not mp.is_symlink():
        raise GraphFileError(f"{path} has no manifest {mp.name} beside it; export with tta_runtime.deploy.export")
    data = read_json(mp, "manifest", error=GraphFileError, allow_nan=True)
    try:
        _Manifest.model_validate(data)
    except ValidationError as e:
        raise GraphFileError(format_validation_error(e, f"manifest {mp}") + "\n(re-export the model to rewrite it)") from None
    return data


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> Path:
    """Write the manifest beside `path` (atomically); returns its path."""
    mp = manifest_path(path)
    atomic_write_bytes(mp, (json.dumps(manifest, indent=2) + "\n").encode())
    return mp


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_digest(state: Mapping[str, Any]) -> str:
    """sha256 over the named float32 tensors, in name order: equal for equal weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        v = state[name]
        arr = v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32)
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def tta_runtime_version() -> str | None:
    """This package's version from its installed metadata (None when it is not installed).

    Not `tta_runtime.__version__`: importing the top-level package from deploy/ would close an import
    cycle (it imports the runtime, which imports deploy)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tta-runtime")
    except PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of the packages an exported file depends on (None = not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"tta_runtime": tta_runtime_version(), "python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder: readers never see half a file.
    Only a new path or a regular file is written (`tta_runtime.files.atomic_write`; `ConfigError` otherwise)."""
    atomic_write(path, data, "output file", ConfigError)
