"""Export a model's frozen path to ONNX (and TensorRT), verify it, and push adapted weights into it.

    model (its current weights: shipped or adapted)
      -> export wrapper for the card's architecture and the requested part (`EXPORTERS`)
      -> torch.onnx.export (TorchScript exporter, constant folding OFF)
      -> initializers renamed to the model's own state-dict names, one per parameter
      -> onnx.checker -> ONNX Runtime (CPU) against PyTorch on fresh random inputs -> `<file>.onnx.json`
      [-> TensorRT engine built from the ONNX file (`tta_runtime.backends.build_engine`)]

    >>> res = export(rt.model, rt.card, "onnx", "seg.onnx", part="predictor", dynamic={"batch": (1, 16)})
    >>> write_weights("seg.onnx", adapted_model)   # same graph, new initializer values, manifest sha256 updated

Parts of the slot segmenter (input "image": (B, 3, S, S) float in [0, 1], S = the card's size):

- `encoder`: -> "features" (B, S*S, D)
- `predictor`: -> "masks" (B, K, S, S) in [0, 1] summing to 1 over K, "reconstruction" (B, 3, S, S),
  "slots" (B, K, D)
- `predictor_ood`: the predictor plus "ood_score" (B,) float32 (higher = more OOD: the runtime's scorer,
  i.e. the calibration's when given, else the reconstruction-error z-score from the card) and
  "recon_mse" (B,) float32. Computed in float32 even in a half-precision graph.

Slot initialisation is the learned `slots_init` (no random op in the graph; checked).

**Image size.** The encoder's position embedding and the coordinate-MLP decoder are defined on the
card's S x S grid, so the model itself only runs at S x S. `dynamic={"size": (lo, hi)}` puts the
resizing into the graph: "image" is then (B, 3, H, W) for any lo <= H, W <= hi; the graph resizes it
to S x S (bilinear, half-pixel centres, no antialiasing: ONNX Resize has antialias only from opset 18,
and the runtime's area averaging has no ONNX op) and resizes "masks" and "reconstruction" back to
H x W (bilinear; masks stay a distribution over K). Without it the graph is S x S only and resizing
is the caller's (the runtime's `prepare_image`: area averaging when shrinking), which is what
`Runtime(backend="onnxruntime")` uses, so its results match the PyTorch path. Batch can be dynamic
either way (`dynamic={"batch": (lo, hi)}`).

**Why constant folding is off** (and why initializers are exported as inputs first, see
`_drop_initializer_inputs`). With folding on, the exporter pre-computes the transposed weight of
every Linear applied to a 3-D tensor and stores it as an unnamed initializer (`onnx::MatMul_406`):
18 of the shipped segmenter's 59 parameters lose their names and `write_weights` could not find
them. With folding off every parameter is exactly one initializer named like its state-dict key;
ONNX Runtime and TensorRT fold those transposes themselves when they load the graph.

**Opset.** 12 is the lowest that works: slot attention's `einsum` needs ONNX Einsum (opset 12);
opset 11 fails in the exporter. 17 (the default) also gives LayerNormalization as one node.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from tta_runtime.config import ModelCard, validate
from tta_runtime.errors import BackendUnavailableError, ConfigError, TTARuntimeError
from tta_runtime.registry import Registry
from tta_runtime.models.segmenter import segmentation_masks

if TYPE_CHECKING:
    import onnx

    from tta_runtime.ood import Calibration

log = logging.getLogger(__name__)

__all__ = [
    "EXPORTERS",
    "MAX_OPSET",
    "MIN_OPSET",
    "BackendUnavailableError",
    "DynamicShapes",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "ExportVerificationError",
    "TensorSpec",
    "export",
    "export_onnx_bytes",
    "initializer_map",
    "load_manifest",
    "manifest_path",
    "parse_dynamic",
    "verify",
    "write_weights",
]

MANIFEST_FORMAT = 1
# ONNX Einsum (slot attention's q.k and attention-weighted sum) exists from opset 12; the exporter
# refuses opset 11 with "aten::einsum ... Support for this operator was added in version 12".
MIN_OPSET = 12
MIN_OPSET_REASON = "slot attention's einsum needs ONNX Einsum, added in opset 12"
# The highest opset torch 2.13's exporter writes (torch.onnx._constants.ONNX_MAX_OPSET; 24 raises
# "Unsupported onnx_opset_version"). 12..23 all export and verify for the segmenter.
MAX_OPSET = 23
# Tolerances of the parity check, |onnx - torch| <= atol + rtol * |torch| elementwise, per precision.
# fp32: measured max abs 2e-6 on masks / reconstruction / slots (shipped model, 20 random images).
# fp16: measured 2.3e-3 (masks) against the float32 PyTorch model; 1e-2 leaves margin for other models.
TOLERANCES: dict[str, dict[str, float]] = {"fp32": {"atol": 1e-4, "rtol": 1e-4}, "fp16": {"atol": 1e-2, "rtol": 1e-2}}
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_WRAPPER_PREFIX = "model."


class ExportError(TTARuntimeError):
    """The exporter could not turn the model into a valid graph, or a file is not one of ours."""


class ExportVerificationError(ExportError):
    """The exported graph runs but does not reproduce the PyTorch model within the stated tolerance."""


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("ONNX export needs the onnx package: pip install 'tta-runtime[onnx]'") from None
    return onnx


# --------------------------------------------------------------------------------------------------
# Options


def _range(v: Any, what: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{what} must be (min, max) ints, got {v!r}")


class DynamicShapes(BaseModel):
    """Ranges of the dynamic axes: `batch` (B) and `size` (H and W, each), both inclusive (min, max).

    None = that axis is static (B = `batch`, H = W = the card's size).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: tuple[int, int] | None = Field(None, description="(min, max) batch size")
    size: tuple[int, int] | None = Field(None, description="(min, max) image height and width; the graph resizes to S")

    @field_validator("batch", "size", mode="before")
    @classmethod
    def _pair(cls, v: Any, info: Any) -> tuple[int, int] | None:
        return _range(v, info.field_name)

    @model_validator(mode="after")
    def _ordered(self) -> DynamicShapes:
        for name in ("batch", "size"):
            r = getattr(self, name)
            if r is None:
                continue
            lo, hi = r
            if lo < 1:
                raise ValueError(f"dynamic {name} range {r}: the minimum must be >= 1")
            if lo > hi:
                raise ValueError(f"dynamic {name} range {r} is inverted: min {lo} > max {hi}; write ({hi}, {lo})")
        if self.batch is None and self.size is None:
            raise ValueError("dynamic names no axis; give batch=(min, max) and/or size=(min, max), or dynamic=None")
        return self


def parse_dynamic(value: Any) -> DynamicShapes | None:
    """None, a `DynamicShapes`, a mapping {"batch": (lo, hi), "size": (lo, hi)} or the CLI's
    "batch=1:16,size=16:128" -> `DynamicShapes` (or None); errors are `ConfigError`s."""
    if value is None or isinstance(value, DynamicShapes):
        return value
    if isinstance(value, str):
        data: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, rng = part.partition("=")
            lo, sep2, hi = rng.partition(":")
            try:
                if not sep or not sep2:
                    raise ValueError
                data[key.strip()] = (int(lo), int(hi))
            except ValueError:
                raise ConfigError(
                    f"dynamic: cannot read {part!r}; expected AXIS=MIN:MAX, e.g. 'batch=1:16,size=16:128'"
                ) from None
        value = data
    if not isinstance(value, Mapping):
        raise ConfigError(f"dynamic must be None, a mapping like {{'batch': (1, 16)}} or 'batch=1:16', got {value!r}")
    return validate(DynamicShapes, dict(value), "dynamic shapes")


class ExportOptions(BaseModel):
    """One export request (the arguments `export` and `tta-runtime export` share)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["onnx", "tensorrt"] = "onnx"
    part: str = "predictor"
    half: bool = False
    dynamic: DynamicShapes | None = None
    opset: int = Field(17, description=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}")
    batch: int = Field(1, ge=1, description="static batch size, or the optimum inside a dynamic batch range")
    device: str = "cpu"
    workspace: float | None = Field(None, gt=0, description="TensorRT builder workspace in GiB (format='tensorrt' only)")

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        if v < MIN_OPSET:
            raise ValueError(f"opset {v} is too low: {MIN_OPSET_REASON}; use opset >= {MIN_OPSET} (default 17)")
        if v > MAX_OPSET:
            raise ValueError(f"opset {v} is above {MAX_OPSET}, the highest this torch's ONNX exporter writes")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExportOptions:
        if self.workspace is not None and self.format != "tensorrt":
            raise ValueError("workspace is the TensorRT builder's memory limit; it applies to format='tensorrt' only")
        if self.dynamic is not None and self.dynamic.batch is not None:
            lo, hi = self.dynamic.batch
            if not lo <= self.batch <= hi:
                raise ValueError(f"batch {self.batch} (the optimum) must lie in the dynamic batch range {self.dynamic.batch}")
        return self

    @property
    def precision(self) -> str:
        return "fp16" if self.half else "fp32"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: a name, a dtype and a shape whose str entries are dynamic axes."""

    name: str
    dtype: str  # "float32" | "float16"
    shape: tuple[int | str, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "description": self.description}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d.get("description", ""))


# --------------------------------------------------------------------------------------------------
# Export wrappers: one per model kind (card.architecture), each offering named parts


class ExportKind:
    """How one architecture becomes graphs: its parts, their wrappers and their I/O specs.

    A second model kind (the classifiers) registers its own subclass under its card's architecture.
    """

    architecture: str
    parts: dict[str, str]  # part -> one-line description

    def wrap(self, model: nn.Module, card: ModelCard, part: str, opts: ExportOptions, calibration: Calibration | None) -> nn.Module:
        raise NotImplementedError

    def io(self, card: ModelCard, part: str, opts: ExportOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
        raise NotImplementedError

    def weight_prefixes(self, part: str) -> tuple[str, ...] | None:
        """State-dict prefixes of the tensors the part's graph reads (None = all of them)."""
        return None

    def ood_info(self, card: ModelCard, part: str, calibration: Calibration | None) -> dict[str, Any] | None:
        return None


EXPORTERS: Registry[ExportKind] = Registry("exportable architecture")


class SegmenterGraph(nn.Module):
    """The slot segmenter's frozen path as a traceable module with tensor outputs (see module docstring)."""

    def __init__(self, model: nn.Module, part: str, *, resize: bool, ood: Callable[..., torch.Tensor] | None) -> None:
        super().__init__()
        self.model = model  # its parameters appear as "model.<name>"; export renames them to "<name>"
        self.part = part
        self.resize = resize
        self.size = int(model.cfg.resolution)
        self.ood = ood

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.size
        x = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False) if self.resize else image
        encoded = self.model.encode(x)  # (B, S*S, D)
        if self.part == "encoder":
            return (encoded,)
        out = self.model.forward_features(encoded)
        seg = segmentation_masks(self.model.cfg, out)  # the card's mask_source
        b, k, _ = seg.shape
        masks = seg.reshape(b, k, s, s)  # (B, K, S, S)
        recon = out.reconstruction.transpose(1, 2).reshape(b, 3, s, s)  # (B, 3, S, S)
        extra: tuple[torch.Tensor, ...] = ()
        if self.part == "predictor_ood":
            assert self.ood is not None  # set by the wrapper for this part
            extra = self.ood(x, out, encoded)
        if self.resize:
            hw = image.shape[-2:]
            masks = F.interpolate(masks, size=hw, mode="bilinear", align_corners=False)  # convex: still sums to 1
            recon = F.interpolate(recon, size=hw, mode="bilinear", align_corners=False)
        return (masks, recon, out.slots, *extra)


def _segmenter_ood_head(card: ModelCard, calibration: Calibration | None) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """(resized image, SegmenterOutput, encoded) -> (ood_score, recon_mse), float32, as `Runtime._frozen_path` scores."""
    from tta_runtime.ood import features_from_output

    stats = card.ood

    def head(x: torch.Tensor, out: Any, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 whatever the graph's precision: a z-score divides by a small std (~5e-3)
        out32 = dataclasses.replace(out, masks=out.masks.float(), reconstruction=out.reconstruction.float(), slots=out.slots.float())
        embedding = calibration.embedding if calibration is not None else "encoder"
        feats = features_from_output(None, x.float(), out32, encoded=encoded.float(), embedding=embedding)
        mse = feats.recon_mse  # (B,)
        if calibration is not None:
            score = calibration.torch_score(feats)
        elif stats is not None:
            score = (mse - stats.recon_mse_mean) / stats.recon_mse_std
        else:
            score = mse
        return score.float(), mse

    return head


class SegmenterExport(ExportKind):
    architecture = "slot_segmenter"
    parts = {
        "encoder": "image -> encoder features",
        "predictor": "image -> masks, reconstruction, slots (the frozen path)",
        "predictor_ood": "the predictor plus the runtime's OOD score",
    }

    def wrap(self, model: nn.Module, card: ModelCard, part: str, opts: ExportOptions, calibration: Calibration | None) -> nn.Module:
        resize = opts.dynamic is not None and opts.dynamic.size is not None
        ood = _segmenter_ood_head(card, calibration) if part == "predictor_ood" else None
        return SegmenterGraph(model, part, resize=resize, ood=ood)

    def io(self, card: ModelCard, part: str, opts: ExportOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
        cfg = card.segmenter
        assert cfg is not None  # a slot_segmenter card always has one (ModelCard validates)
        dt = "float16" if opts.half else "float32"
        dyn = opts.dynamic
        b: int | str = "batch" if dyn is not None and dyn.batch is not None else opts.batch
        sized = dyn is not None and dyn.size is not None
        h: int | str = "height" if sized else cfg.resolution
        w: int | str = "width" if sized else cfg.resolution
        s, k, d = cfg.resolution, cfg.num_slots, cfg.slot_dim
        inputs = [TensorSpec("image", dt, (b, 3, h, w), "RGB in [0, 1]" + ("; resized to the model size inside" if sized else ""))]
        if part == "encoder":
            return inputs, [TensorSpec("features", dt, (b, s * s, d), "encoder features at the model size, row-major positions")]
        outputs = [
            TensorSpec("masks", dt, (b, k, h, w), "soft slot masks in [0, 1], summing to 1 over K"),
            TensorSpec("reconstruction", dt, (b, 3, h, w), "mask-weighted RGB reconstruction"),
            TensorSpec("slots", dt, (b, k, d), "slot vectors"),
        ]
        if part == "predictor_ood":
            outputs += [
                TensorSpec("ood_score", "float32", (b,), "higher = more out of distribution (before adaptation)"),
                TensorSpec("recon_mse", "float32", (b,), "mean squared reconstruction error at the model size"),
            ]
        return inputs, outputs

    def weight_prefixes(self, part: str) -> tuple[str, ...] | None:
        return ("encoder.",) if part == "encoder" else None

    def ood_info(self, card: ModelCard, part: str, calibration: Calibration | None) -> dict[str, Any] | None:
        if part != "predictor_ood":
            return None
        if calibration is not None:
            return {"scorer": calibration.scorer, "threshold": calibration.threshold, "tpr": calibration.tpr,
                    "embedding": calibration.embedding, "calibration_weights_sha256": calibration.weights_sha256}
        if card.ood is not None:
            return {"scorer": "recon_mse_z", "threshold": None, "mean": card.ood.recon_mse_mean, "std": card.ood.recon_mse_std}
        return {"scorer": "recon_mse", "threshold": None}


EXPORTERS.register(SegmenterExport.architecture)(SegmenterExport())


def _kind(card: ModelCard) -> ExportKind:
    return EXPORTERS.get(card.architecture)


def _check_part(kind: ExportKind, part: str) -> None:
    if part not in kind.parts:
        from tta_runtime.registry import unknown_name_message

        raise ConfigError(unknown_name_message(f"{kind.architecture} export part", part, list(kind.parts)))


# --------------------------------------------------------------------------------------------------
# Export proper (in memory)


def _resolve_device(name: str) -> torch.device:
    from tta_runtime.device import resolve_device

    return resolve_device(name, allowed=("cpu", "cuda"))


def _example_shape(spec: TensorSpec, opts: ExportOptions, card_size: int) -> tuple[int, ...]:
    """Concrete shape for a spec: dynamic axes at their optimum (batch = opts.batch, H = W = card size)."""
    values = {"batch": opts.batch, "height": card_size, "width": card_size}
    return tuple(values[d] if isinstance(d, str) else d for d in spec.shape)


def _state_names(model: nn.Module, prefixes: tuple[str, ...] | None = None) -> dict[str, tuple[int, ...]]:
    """What adaptation can change and the graph must expose by name: the state dict's floating tensors
    (under `prefixes`, the part's modules, when given), with shapes."""
    return {
        k: tuple(v.shape) for k, v in model.state_dict().items()
        if v.is_floating_point() and (prefixes is None or k.startswith(prefixes))
    }


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
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


def _rename_initializers(proto: onnx.ModelProto, prefix: str) -> None:
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
    proto = _load_proto(onnx_model)
    if isinstance(model, nn.Module):
        names = _state_names(model, prefixes)
    else:
        names = {k: tuple(np.shape(v)) for k, v in model.items() if prefixes is None or k.startswith(prefixes)}
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    used = {n for node in proto.graph.node for n in node.input}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ExportError(
            f"{len(missing)} of {len(names)} parameters have no initializer of the same name in the graph, e.g. "
            f"{missing[:3]}: the graph was exported with constant folding or by another tool; re-export with "
            f"tta_runtime.export.export"
        )
    wrong = [f"{n}: model {names[n]}, graph {inits[n]}" for n in names if inits[n] != names[n]]
    if wrong:
        raise ExportError(f"initializer shapes differ from the model's: {wrong[:3]}")
    unused = [n for n in names if n not in used]
    if unused:
        raise ExportError(f"initializers {unused[:3]} are not read by any node: they would not carry the weights")
    return {n: n for n in names}


def _load_proto(source: onnx.ModelProto | str | os.PathLike[str] | bytes) -> onnx.ModelProto:
    onnx = _import_onnx()

    if isinstance(source, onnx.ModelProto):
        return source
    try:
        if isinstance(source, bytes):
            return onnx.load_from_string(source)
        return onnx.load(str(source), load_external_data=False)
    except OSError as e:
        raise ExportError(f"cannot read ONNX model {source}: {e}") from None
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        what = "<bytes>" if isinstance(source, bytes) else source
        raise ExportError(f"{what} is not an ONNX model: {type(e).__name__}: {e}") from None


def export_onnx_bytes(
    model: nn.Module, card: ModelCard, opts: ExportOptions, *, calibration: Calibration | None = None
) -> tuple[bytes, list[TensorSpec], list[TensorSpec]]:
    """The checked ONNX graph of `opts.part` with the model's current weights, and its I/O specs.

    The caller's model is not touched (a copy is moved to the export device and precision).
    """
    onnx = _import_onnx()

    kind = _kind(card)
    _check_part(kind, opts.part)
    device = _resolve_device(opts.device)
    dtype = torch.float16 if opts.half else torch.float32
    work = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    graph = kind.wrap(work, card, opts.part, opts, calibration).eval()
    inputs, outputs = kind.io(card, opts.part, opts)
    gen = torch.Generator().manual_seed(12345)  # tracing input; verification uses other, fresh images
    size = card.preprocessing.size
    example = tuple(torch.rand(_example_shape(s, opts, size), generator=gen).to(device=device, dtype=dtype) for s in inputs)
    dynamic_axes = {
        spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in (*inputs, *outputs)
    }
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter warns about traced shapes and constants it keeps on purpose.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, example, buf, dynamo=False, opset_version=opts.opset, do_constant_folding=False,
                export_params=True, keep_initializers_as_inputs=True, training=torch.onnx.TrainingMode.EVAL,
                input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                dynamic_axes=dynamic_axes or None,
            )
    except Exception as e:  # the exporter raises many types; all mean "this graph cannot be written"
        msg = str(e).split("\n")[0]
        raise ExportError(f"torch.onnx.export failed for part {opts.part!r} at opset {opts.opset}: {type(e).__name__}: {msg}") from None
    proto = onnx.load_from_string(buf.getvalue())
    _drop_initializer_inputs(proto)
    _rename_initializers(proto, _WRAPPER_PREFIX)
    random_ops = sorted({n.op_type for n in proto.graph.node} & _RANDOM_OPS)
    if random_ops:
        raise ExportError(f"the graph contains random ops {random_ops}: slot initialisation must use the learned value")
    initializer_map(proto, work, prefixes=kind.weight_prefixes(opts.part))
    for key, value in (("tta_runtime.model", card.name), ("tta_runtime.part", opts.part), ("tta_runtime.precision", opts.precision)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "tta-runtime"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from None
    return proto.SerializeToString(), inputs, outputs


# --------------------------------------------------------------------------------------------------
# Verification against PyTorch


def _verification_shapes(inputs: list[TensorSpec], dyn: DynamicShapes | None, opts_batch: int, size: int, n_images: int) -> list[tuple[int, ...]]:
    """Input shapes covering `n_images` images: batches spread over the dynamic batch range (or the
    static batch), sizes at both ends of the dynamic size range, non-square, and at the model size."""
    shape = inputs[0].shape
    if dyn is not None and dyn.batch is not None:
        lo, hi = dyn.batch
        cycle = sorted({lo, hi, opts_batch, min(hi, max(lo, 3))})
    else:
        cycle = [opts_batch]
    if dyn is not None and dyn.size is not None:
        lo, hi = dyn.size
        sizes = [(size, size), (lo, hi), (hi, lo), (lo, lo), (hi, hi)]
    else:
        sizes = [(size, size)]
    out, done, i = [], 0, 0
    while done < n_images:
        b = cycle[i % len(cycle)]
        h, w = sizes[i % len(sizes)]
        values = {"batch": b, "height": h, "width": w}
        out.append(tuple(values[d] if isinstance(d, str) else d for d in shape))
        done += out[-1][0]
        i += 1
    return out


def _compare(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tol: Mapping[str, float]) -> dict[str, dict[str, float]]:
    stats = {}
    for name, r in ref.items():
        g = got[name].astype(np.float64)
        r = r.astype(np.float64)
        if g.shape != r.shape:
            raise ExportVerificationError(f"output {name!r}: ONNX shape {g.shape} vs PyTorch {r.shape}")
        err = np.abs(g - r)
        allowed = tol["atol"] + tol["rtol"] * np.abs(r)
        stats[name] = {
            "max_abs": float(err.max(initial=0.0)),
            "max_rel": float((err / np.maximum(np.abs(r), 1e-12)).max(initial=0.0)),
            "worst_ratio": float((err / allowed).max(initial=0.0)),  # <= 1 passes
            "finite": bool(np.isfinite(g).all()),
        }
    return stats


def _verify_bytes(
    onnx_bytes: bytes, model: nn.Module, card: ModelCard, opts: ExportOptions, inputs: list[TensorSpec],
    outputs: list[TensorSpec], *, calibration: Calibration | None, n_images: int, seed: int,
) -> dict[str, Any]:
    """Run the graph on ONNX Runtime's CPU provider and the float32 PyTorch model on the same fresh
    random images; the report says the largest deviations and whether they meet `TOLERANCES`."""
    from tta_runtime.deploy.backends import import_onnxruntime

    ort = import_onnxruntime()
    tol = TOLERANCES[opts.precision]
    kind = _kind(card)
    ref_model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    ref_opts = opts.model_copy(update={"half": False, "device": "cpu"})
    ref_graph = kind.wrap(ref_model, card, opts.part, ref_opts, calibration).eval()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # verification runs beside other work (tests, a training job)
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own error types: an opset or op it does not implement
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported graph (opset {opts.opset}): {type(e).__name__}: {e}") from None
    gen = torch.Generator().manual_seed(seed)
    np_dtype = np.float16 if opts.half else np.float32
    worst: dict[str, dict[str, float]] = {}
    shapes = _verification_shapes(inputs, opts.dynamic, opts.batch, card.preprocessing.size, n_images)
    for shape in shapes:
        x = torch.rand(shape, generator=gen)
        if opts.half:  # both sides see the same (fp16-representable) image
            x = x.half().float()
        with torch.no_grad():
            ref = dict(zip([o.name for o in outputs], (t.numpy() for t in ref_graph(x)), strict=True))
        got = dict(zip([o.name for o in outputs], sess.run(None, {inputs[0].name: x.numpy().astype(np_dtype)}), strict=True))
        for name, s in _compare(got, ref, tol).items():
            w = worst.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "worst_ratio": 0.0, "finite": True})
            w.update({k: max(w[k], s[k]) for k in ("max_abs", "max_rel", "worst_ratio")}, finite=w["finite"] and s["finite"])
    passed = all(s["finite"] and s["worst_ratio"] <= 1.0 for s in worst.values())
    return {
        "passed": passed, "n_images": sum(s[0] for s in shapes), "seed": seed, "input_shapes": [list(s) for s in shapes],
        "inputs": "uniform random in [0, 1]", "reference": "PyTorch float32 on CPU, same weights",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "tolerance": {**tol, "rule": "|onnx - torch| <= atol + rtol * |torch|, elementwise"}, "outputs": worst,
    }


# --------------------------------------------------------------------------------------------------
# Manifest


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The side JSON of an exported file: `model.onnx` -> `model.onnx.json`."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest beside an exported file (`ExportError` if it is missing or unreadable)."""
    mp = manifest_path(path)
    try:
        return json.loads(mp.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} has no manifest {mp.name} beside it; export with tta_runtime.export.export") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read manifest {mp}: {e}") from None


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_digest(state: Mapping[str, Any]) -> str:
    """sha256 over the named float32 tensors, in name order: equal for equal weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        v = state[name]
        arr = v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32)
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from tta_runtime import __version__

    out: dict[str, str | None] = {"tta_runtime": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> Path:
    mp = manifest_path(path)
    _atomic_write_bytes(mp, (json.dumps(manifest, indent=2) + "\n").encode())
    return mp


# --------------------------------------------------------------------------------------------------
# The public door


@dataclass
class ExportResult:
    """What `export` wrote: `path` (the .onnx or the .engine), the ONNX file, their manifests, the check."""

    path: Path
    onnx_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    engine_path: Path | None = None
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, detail)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest["verification"]

    def next_command(self) -> str:
        if self.engine_path is not None:
            return (f"python -c \"from tta_runtime.backends import TensorRTBackend; "
                    f"b = TensorRTBackend('{self.engine_path}'); print(b)\"")
        return (f"python -c \"from tta_runtime.backends import OnnxRuntimeBackend; "
                f"b = OnnxRuntimeBackend('{self.onnx_path}', providers=['CPUExecutionProvider']); print(b)\"")


def _default_path(card: ModelCard, opts: ExportOptions) -> Path:
    suffix = ".engine" if opts.format == "tensorrt" else ".onnx"
    return Path(f"{card.name}-{opts.part}{'-fp16' if opts.half else ''}{suffix}")


def export(
    model: nn.Module, card: ModelCard, format: str = "onnx", path: str | os.PathLike[str] | None = None, *,
    part: str = "predictor", half: bool = False, dynamic: Any = None, opset: int = 17, batch: int = 1,
    device: str = "cpu", workspace: float | None = None, calibration: Calibration | None = None,
    verify: bool = True, n_verify: int = 20, verify_seed: int = 0, metadata: Mapping[str, Any] | None = None,
    tensorrt: Any = None,
) -> ExportResult:
    """Export `part` of `model` (its current weights) to `path` and check it against PyTorch.

    Args:
        model: the model to export (`Runtime.model`: shipped weights, or adapted ones after continual
            adaptation). Not modified.
        card: its card (architecture, input size, OOD statistics).
        format: "onnx", or "tensorrt" (an ONNX file beside the engine, then the engine; needs the
            `tensorrt` package, `pip install 'tta-runtime[tensorrt]'`).
        path: output file (default `<model>-<part>[-fp16].onnx|.engine` in the current folder); its
            manifest goes to `<path>.json`.
        part: "encoder" | "predictor" | "predictor_ood" for the slot segmenter.
        half: float16 weights, input and outputs (the OOD outputs stay float32).
        dynamic: None (static shapes), or {"batch": (lo, hi), "size": (lo, hi)} (either key optional;
            also "batch=1:16,size=16:128"). See the module docstring for what a dynamic size means.
        opset: ONNX opset, 12..23 (12 is the lowest our ops allow, 23 the highest torch writes).
        batch: the static batch size, or the optimum within a dynamic batch range (TensorRT profile).
        device: where the export traces ("cpu" or "cuda").
        workspace: TensorRT builder memory limit in GiB (format="tensorrt" only).
        calibration: the OOD calibration whose scorer `predictor_ood` carries (`Runtime.calibration`);
            None = the card's reconstruction-error z-score.
        verify: run the ONNX graph on ONNX Runtime (CPU) against PyTorch on `n_verify` fresh random
            images (seed `verify_seed`); a miss raises `ExportVerificationError` (the files are kept,
            the manifest says "passed": false).
        metadata: extra JSON-able facts for the manifest (e.g. {"weights": "adapted, continual, 12 calls"}).
        tensorrt: a `tta_runtime.backends.TensorRTConfig` (or a dict of its fields) for format="tensorrt".

    Raises:
        ConfigError: a bad request (unknown part, opset too low, inverted dynamic range, TensorRT missing...).
        ExportError / ExportVerificationError: the graph could not be written / does not match PyTorch.
    """
    opts = validate(
        ExportOptions,
        {"format": format, "part": part, "half": half, "dynamic": parse_dynamic(dynamic), "opset": opset,
         "batch": batch, "device": device, "workspace": workspace},
        "export request",
    )
    kind = _kind(card)
    _check_part(kind, opts.part)
    trt_cfg = None
    if opts.format == "tensorrt":
        from tta_runtime.deploy.backends import TensorRTConfig, import_tensorrt

        import_tensorrt()  # fail before any work when TensorRT is missing
        trt_cfg = tensorrt if isinstance(tensorrt, TensorRTConfig) else validate(TensorRTConfig, dict(tensorrt or {}), "tensorrt options")
        if opts.workspace is not None:
            trt_cfg = trt_cfg.model_copy(update={"workspace": opts.workspace})
    elif tensorrt is not None:
        raise ConfigError("tensorrt options apply to format='tensorrt' only")
    if n_verify < 1:
        raise ConfigError(f"n_verify must be >= 1, got {n_verify}")

    out_path = Path(path) if path is not None else _default_path(card, opts)
    onnx_path = out_path.with_suffix(".onnx") if opts.format == "tensorrt" else out_path
    if opts.format == "tensorrt" and onnx_path == out_path:
        raise ConfigError(f"format='tensorrt' writes an ONNX file beside the engine; give the engine a suffix other than .onnx: {out_path}")
    stages: list[tuple[str, float, str]] = []

    def stage(name: str, t0: float, detail: str) -> None:
        stages.append((name, time.perf_counter() - t0, detail))
        log.info("export %-8s %5.2fs  %s", name, stages[-1][1], detail)

    t0 = time.perf_counter()
    data, inputs, outputs = export_onnx_bytes(model, card, opts, calibration=calibration)
    stage("onnx", t0, f"{opts.part} at opset {opts.opset}, {opts.precision}, {len(data) / 1e6:.2f} MB, onnx.checker passed")

    state = model.state_dict()
    names = _state_names(model, kind.weight_prefixes(opts.part))
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT,
        "kind": "onnx",
        "file": onnx_path.name,
        "sha256": _sha256_bytes(data),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": card.name,
        "architecture": card.architecture,
        "part": opts.part,
        "request": opts.model_dump(mode="json"),
        "precision": opts.precision,
        "opset": opts.opset,
        "exporter": "torch.onnx.export (TorchScript), do_constant_folding=False, initializers named by state-dict key",
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "dynamic": opts.dynamic.model_dump(mode="json") if opts.dynamic is not None else None,
        "resize_in_graph": bool(opts.dynamic is not None and opts.dynamic.size is not None),
        "model_size": card.preprocessing.size,
        "ood": kind.ood_info(card, opts.part, calibration),
        "weights": {
            "tensors": {n: {"shape": list(s), "dtype": "float16" if opts.half else "float32"} for n, s in names.items()},
            "digest": _weights_digest({n: state[n] for n in names}),
            "source": "export",
        },
        "versions": _versions(),
        "card": card.model_dump(mode="json"),
        "metadata": dict(metadata or {}),
    }
    if verify:
        t0 = time.perf_counter()
        report = _verify_bytes(data, model, card, opts, inputs, outputs, calibration=calibration, n_images=n_verify, seed=verify_seed)
        worst = max(report["outputs"].items(), key=lambda kv: kv[1]["worst_ratio"])
        stage("verify", t0, f"{report['n_images']} random images, max abs {max(s['max_abs'] for s in report['outputs'].values()):.2e} "
              f"(worst {worst[0]}: {worst[1]['worst_ratio']:.2f} of the {opts.precision} tolerance) -> "
              f"{'passed' if report['passed'] else 'FAILED'}")
    else:
        report = {"passed": None, "skipped": "verify=False"}
    manifest["verification"] = report

    t0 = time.perf_counter()
    _atomic_write_bytes(onnx_path, data)
    mp = _write_manifest(onnx_path, manifest)
    stage("write", t0, f"{onnx_path} and {mp.name}")
    if report.get("passed") is False:
        raise ExportVerificationError(
            f"{onnx_path} does not reproduce the PyTorch model within the {opts.precision} tolerance "
            f"(atol {TOLERANCES[opts.precision]['atol']}, rtol {TOLERANCES[opts.precision]['rtol']}): "
            + ", ".join(f"{k} max abs {v['max_abs']:.3g}" for k, v in report["outputs"].items())
            + f"; files kept for inspection, manifest {mp} says passed: false"
        )
    result = ExportResult(path=onnx_path, onnx_path=onnx_path, manifest_path=mp, manifest=manifest, stages=stages)
    if opts.format == "tensorrt":
        from tta_runtime.deploy.backends import build_engine

        t0 = time.perf_counter()
        built = build_engine(onnx_path, out_path, config=trt_cfg, batch=opts.batch)
        stage("tensorrt", t0, f"{built.path} ({'cache hit' if built.cached else 'built'}, {built.metadata['precision']})")
        result.path, result.engine_path = built.path, built.path
    log.info("export done; next: %s", result.next_command())
    return result


def verify(
    onnx_path: str | os.PathLike[str], model: nn.Module, card: ModelCard, *, calibration: Calibration | None = None,
    n_images: int = 20, seed: int = 0, update_manifest: bool = True,
) -> dict[str, Any]:
    """Re-check an exported file (e.g. after `write_weights`) against `model`, as `export` does.

    Rebuilds the request from the manifest; with `update_manifest` the report replaces the manifest's
    "verification". Raises `ExportVerificationError` on a miss.
    """
    manifest = load_manifest(onnx_path)
    opts = validate(ExportOptions, manifest["request"], f"request in {manifest_path(onnx_path)}")
    data = Path(onnx_path).read_bytes()
    inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
    outputs = [TensorSpec.from_dict(d) for d in manifest["outputs"]]
    report = _verify_bytes(data, model, card, opts, inputs, outputs, calibration=calibration, n_images=n_images, seed=seed)
    if update_manifest:
        manifest["verification"] = report
        _write_manifest(Path(onnx_path), manifest)
    if not report["passed"]:
        raise ExportVerificationError(
            f"{onnx_path} does not reproduce the model: "
            + ", ".join(f"{k} max abs {v['max_abs']:.3g}" for k, v in report["outputs"].items())
        )
    return report


# --------------------------------------------------------------------------------------------------
# Writing adapted weights into an existing graph


def set_initializers(proto: onnx.ModelProto, weights: Mapping[str, Any]) -> list[str]:
    """Replace initializer values in `proto` by name (cast to each initializer's dtype); returns the names.

    Refuses unknown names, shape changes and non-finite values. In memory: `write_weights` and the
    runtime's ONNX Runtime path (`backends.OrtFrozenPath`) both use it.
    """
    from onnx import helper, numpy_helper

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
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if tuple(arr.shape) != tuple(init.dims):
            raise ExportError(f"weight {name!r} has shape {tuple(arr.shape)}, the graph's initializer {tuple(init.dims)}")
        if not np.isfinite(arr).all():
            raise ExportError(f"weight {name!r} holds NaN or inf values; refusing to write it")
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype, copy=False)), name))
        written.append(name)
    return written


def _is_float(v: Any) -> bool:
    return v.is_floating_point() if isinstance(v, torch.Tensor) else np.asarray(v).dtype.kind == "f"


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
    if _sha256_bytes(old) != manifest["sha256"]:
        raise ExportError(f"{path} does not match the sha256 in its manifest: it was changed by something else; re-export it")
    expected = set(manifest["weights"]["tensors"])
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    state = {k: v for k, v in state.items() if _is_float(v)}  # integer buffers (counters) are not weights
    if isinstance(weights, nn.Module) or not strict:
        state = {k: v for k, v in state.items() if k in expected}
    if strict:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ExportError(
                f"weights do not match the graph's tensors: missing {missing[:3]} ({len(missing)}), "
                f"unknown {extra[:3]} ({len(extra)}); pass strict=False to write a subset"
            )
    proto = _load_proto(old)
    written = set_initializers(proto, state)
    data = proto.SerializeToString()
    _atomic_write_bytes(path, data)
    previous = manifest["sha256"]
    manifest["sha256"] = _sha256_bytes(data)
    manifest["weights"].update(
        digest=_weights_digest(state) if len(written) == len(expected) else None,
        source="write_weights",
        written=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        n_written=len(written),
    )
    ver = manifest.get("verification") or {}
    ver["stale"] = "weights were written after this check; run tta_runtime.export.verify(...) to re-check"
    manifest["verification"] = ver
    _write_manifest(path, manifest)
    log.info("wrote %d weight tensors into %s (sha256 %s -> %s)", len(written), path, previous[:12], manifest["sha256"][:12])
    return {"written": written, "sha256": manifest["sha256"], "previous_sha256": previous}
