"""What an export request may ask for, and the graph inputs and outputs it declares.

`ExportOptions` is one request (format, part, precision, dynamic axes, opset, batch, device); the
`TensorSpec`s are a graph's declared inputs and outputs, which the backends check every input against
before running (`check_input`), so a wrong dtype, rank or size fails with a message, not inside a session.

**Limits on work per request.** A dynamic batch range at most `MAX_DYNAMIC_BATCH`, a dynamic image size
at most `MAX_DYNAMIC_SIZE` pixels a side (the parity check runs images at the top of each range), a static
batch at most `MAX_DYNAMIC_BATCH`, and at most `MAX_VERIFY_IMAGES` images in the parity check (`n_verify`).

**Opset.** 12 is the lowest that works: slot attention's `einsum` needs ONNX Einsum (opset 12);
opset 11 fails in the exporter. 17 (the default) also gives LayerNormalization as one node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tta_runtime.config import validate
from tta_runtime.errors import ConfigError, InvalidInputError, TTARuntimeError

__all__ = [
    "MAX_DYNAMIC_BATCH",
    "MAX_DYNAMIC_SIZE",
    "MAX_OPSET",
    "MAX_VERIFY_IMAGES",
    "MIN_OPSET",
    "TOLERANCES",
    "TORCH_DTYPES",
    "DynamicShapes",
    "ExportError",
    "ExportOptions",
    "ExportVerificationError",
    "TensorSpec",
    "check_input",
    "check_n_verify",
    "dynamic_ranges",
    "parse_dynamic",
    "resolve_shape",
    "spec_text",
]

# ONNX Einsum (slot attention's q.k and attention-weighted sum) exists from opset 12; the exporter
# refuses opset 11 with "aten::einsum ... Support for this operator was added in version 12".
MIN_OPSET = 12
MIN_OPSET_REASON = "slot attention's einsum needs ONNX Einsum, added in opset 12"
# The highest opset this torch's exporter writes (torch.onnx._constants.ONNX_MAX_OPSET; one more raises
# "Unsupported onnx_opset_version"); a test keeps the two equal.
MAX_OPSET = 23
# Tolerances of the parity check, |onnx - torch| <= atol + rtol * |torch| elementwise, per precision.
# fp16 is compared against the float32 PyTorch model, hence the wider bound.
TOLERANCES: dict[str, dict[str, float]] = {"fp32": {"atol": 1e-4, "rtol": 1e-4}, "fp16": {"atol": 1e-2, "rtol": 1e-2}}
# Caps on the work one export request may ask for (see the module docstring).
MAX_DYNAMIC_BATCH = 1024
MAX_DYNAMIC_SIZE = 4096
MAX_VERIFY_IMAGES = 1000
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int64": torch.int64,
                "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


class ExportError(TTARuntimeError):
    """The exporter could not turn the model into a valid graph, or a file is not one of ours."""


class ExportVerificationError(ExportError):
    """The exported graph runs but does not reproduce the PyTorch model within the stated tolerance."""


# --------------------------------------------------------------------------------------------------
# The request


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

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    batch: tuple[int, int] | None = Field(None, description=f"(min, max) batch size, within 1..{MAX_DYNAMIC_BATCH}")
    size: tuple[int, int] | None = Field(
        None, description=f"(min, max) image height and width, within 1..{MAX_DYNAMIC_SIZE}; the graph resizes to S"
    )

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
            cap = MAX_DYNAMIC_BATCH if name == "batch" else MAX_DYNAMIC_SIZE
            if hi > cap:
                raise ValueError(f"dynamic {name} range {r}: the maximum must be <= {cap} (the cap on work per export)")
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

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    format: Literal["onnx", "tensorrt"] = "onnx"
    part: str = Field("predictor", max_length=64)
    half: bool = False
    dynamic: DynamicShapes | None = None
    opset: int = Field(17, description=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}")
    batch: int = Field(
        1, ge=1, le=MAX_DYNAMIC_BATCH,
        description=f"static batch size, or the optimum inside a dynamic batch range; 1..{MAX_DYNAMIC_BATCH}",
    )
    device: str = Field("cpu", max_length=64)
    workspace: float | None = Field(
        None, gt=0, le=1024, description="TensorRT builder workspace in GiB, at most 1024 (format='tensorrt' only)"
    )

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


def check_n_verify(n_verify: Any) -> int:
    """`n_verify` (random images in an export's parity check) as an int in 1..`MAX_VERIFY_IMAGES`, or `ConfigError`."""
    if isinstance(n_verify, bool) or not isinstance(n_verify, int) or not 1 <= n_verify <= MAX_VERIFY_IMAGES:
        raise ConfigError(
            f"n_verify must be an int from 1 to {MAX_VERIFY_IMAGES} (random images in the parity check), got {n_verify!r}"
        )
    return n_verify


# --------------------------------------------------------------------------------------------------
# Declared inputs and outputs, and the check of an input against them


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


def spec_text(spec: TensorSpec) -> str:
    """'float32 (batch, 3, 32, 32)': how messages show a spec."""
    return f"{spec.dtype} ({', '.join(str(d) for d in spec.shape)})"


def check_input(spec: TensorSpec, shape: tuple[int, ...], dtype: str, ranges: Mapping[str, tuple[int, int]], what: str) -> dict[str, int]:
    """Validate one input against its spec (`ranges`: the exported dynamic ranges, {"batch", "size"});
    returns the values of its dynamic axes. Raises `InvalidInputError` naming what was expected."""
    want = f"input {spec.name!r} must be {spec_text(spec)}" + (f", {spec.description}" if spec.description else "")
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


def resolve_shape(spec: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...] | None:
    """The spec's shape with its dynamic axes filled from `dims`; None if one of them is unknown."""
    out = []
    for d in spec.shape:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(dims[d])
        else:
            return None
    return tuple(out)


def dynamic_ranges(dynamic: Mapping[str, Any] | None) -> dict[str, tuple[int, int]]:
    """A manifest's "dynamic" entry -> {axis: (lo, hi)} for the axes that have a range."""
    return {k: tuple(v) for k, v in (dynamic or {}).items() if v is not None}  # type: ignore[misc]
