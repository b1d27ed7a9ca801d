"""Export a model's frozen path to ONNX (and TensorRT), and verify it against PyTorch.

    model (its current weights: shipped or adapted)
      -> export wrapper for the card's architecture and the requested part (`EXPORTERS`, kinds.py)
      -> torch.onnx.export (TorchScript exporter, constant folding OFF)
      -> initializers renamed to the model's own state-dict names, one per parameter (graph.py)
      -> onnx.checker -> ONNX Runtime (CPU) against PyTorch on fresh random inputs -> `<file>.onnx.json`
      [-> TensorRT engine built from the ONNX file (`build_engine`, tensorrt.py)]

    >>> res = export(rt.model, rt.card, "onnx", "seg.onnx", part="predictor", dynamic={"batch": (1, 16)})
    >>> write_weights("seg.onnx", adapted_model)   # same graph, new initializer values, manifest sha256 updated

The parts, their shapes and what a dynamic image size means are in kinds.py. Batch can be dynamic
either way (`dynamic={"batch": (lo, hi)}`).

**Why constant folding is off** (and why initializers are exported as inputs first, see
`drop_initializer_inputs`). With folding on, the exporter pre-computes the transposed weight of
every Linear applied to a 3-D tensor and stores it as an unnamed initializer (`onnx::MatMul_406`):
those parameters lose their names and `write_weights` could not find them. With folding off every
parameter is exactly one initializer named like its state-dict key; ONNX Runtime and TensorRT fold
those transposes themselves when they load the graph.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tta_runtime.config import ModelCard, validate
from tta_runtime.deploy.engine_plan import TensorRTConfig
from tta_runtime.deploy.graph import (
    MANIFEST_FORMAT,
    MAX_GRAPH_BYTES,
    GraphFileError,
    atomic_write_bytes,
    drop_initializer_inputs,
    import_onnx,
    initializer_map,
    load_manifest,
    load_proto,
    manifest_path,
    package_versions,
    rename_initializers,
    sha256_bytes,
    state_names,
    utc_now,
    weights_digest,
    write_manifest,
)
from tta_runtime.deploy.kinds import WRAPPER_PREFIX, check_part, export_kind
from tta_runtime.deploy.onnxruntime import import_onnxruntime
from tta_runtime.deploy.options import TOLERANCES, DynamicShapes, ExportError, ExportOptions, ExportVerificationError
from tta_runtime.deploy.options import TensorSpec, check_n_verify, parse_dynamic
from tta_runtime.deploy.tensorrt import build_engine, import_tensorrt
from tta_runtime.device import resolve_device
from tta_runtime.errors import ConfigError
from tta_runtime.files import read_bytes, writable_path

if TYPE_CHECKING:
    from tta_runtime.ood import Calibration

log = logging.getLogger(__name__)

__all__ = ["ExportResult", "export", "export_onnx_bytes", "verify", "verify_onnx_bytes"]

_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


# --------------------------------------------------------------------------------------------------
# Export proper (in memory)


def _example_shape(spec: TensorSpec, opts: ExportOptions, card_size: int) -> tuple[int, ...]:
    """Concrete shape for a spec: dynamic axes at their optimum (batch = opts.batch, H = W = card size)."""
    values = {"batch": opts.batch, "height": card_size, "width": card_size}
    return tuple(values[d] if isinstance(d, str) else d for d in spec.shape)


def export_onnx_bytes(
    model: nn.Module, card: ModelCard, opts: ExportOptions, *, calibration: Calibration | None = None
) -> tuple[bytes, list[TensorSpec], list[TensorSpec]]:
    """The checked ONNX graph of `opts.part` with the model's current weights, and its I/O specs.

    The caller's model is not touched (a copy is moved to the export device and precision).
    """
    onnx = import_onnx()
    kind = export_kind(card)
    check_part(kind, opts.part)
    device = resolve_device(opts.device, allowed=("cpu", "cuda"))
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
    drop_initializer_inputs(proto)
    rename_initializers(proto, WRAPPER_PREFIX)
    random_ops = sorted({n.op_type for n in proto.graph.node} & _RANDOM_OPS)
    if random_ops:
        raise ExportError(f"the graph contains random ops {random_ops}: slot initialisation must use the learned value")
    initializer_map(proto, work, prefixes=kind.model_prefixes(work, opts.part))
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
        err = np.where(np.isnan(err), np.inf, err)  # a NaN on either side is a miss, never a 0 deviation
        allowed = tol["atol"] + tol["rtol"] * np.abs(r)
        stats[name] = {
            "max_abs": float(err.max(initial=0.0)),
            "max_rel": float((err / np.maximum(np.abs(r), 1e-12)).max(initial=0.0)),
            "worst_ratio": float((err / allowed).max(initial=0.0)),  # <= 1 passes
            "finite": bool(np.isfinite(g).all()),
        }
    return stats


def verify_onnx_bytes(
    onnx_bytes: bytes, model: nn.Module, card: ModelCard, opts: ExportOptions, inputs: list[TensorSpec],
    outputs: list[TensorSpec], *, calibration: Calibration | None, n_images: int, seed: int,
) -> dict[str, Any]:
    """Run the graph on ONNX Runtime's CPU provider and the float32 PyTorch model on the same fresh
    random images; the report says the largest deviations and whether they meet `TOLERANCES`."""
    ort = import_onnxruntime()
    tol = TOLERANCES[opts.precision]
    kind = export_kind(card)
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


def _misses(report: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} max abs {v['max_abs']:.3g}" for k, v in report["outputs"].items())


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
            return (f"python -c \"from tta_runtime.deploy import TensorRTBackend; "
                    f"b = TensorRTBackend('{self.engine_path}'); print(b)\"")
        return (f"python -c \"from tta_runtime.deploy import OnnxRuntimeBackend; "
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
            also "batch=1:16,size=16:128"). See kinds.py for what a dynamic size means.
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
        tensorrt: a `TensorRTConfig` (or a dict of its fields) for format="tensorrt".

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
    kind = export_kind(card)
    check_part(kind, opts.part)
    trt_cfg = None
    if opts.format == "tensorrt":
        import_tensorrt()  # fail before any work when TensorRT is missing
        trt_cfg = tensorrt if isinstance(tensorrt, TensorRTConfig) else validate(TensorRTConfig, dict(tensorrt or {}), "tensorrt options")
        if opts.workspace is not None:
            trt_cfg = trt_cfg.model_copy(update={"workspace": opts.workspace})
    elif tensorrt is not None:
        raise ConfigError("tensorrt options apply to format='tensorrt' only")
    check_n_verify(n_verify)

    out_path = writable_path(path, "export path") if path is not None else _default_path(card, opts)
    onnx_path = out_path.with_suffix(".onnx") if opts.format == "tensorrt" else out_path
    if opts.format == "tensorrt" and onnx_path == out_path:
        raise ConfigError(f"format='tensorrt' writes an ONNX file beside the engine; give the engine a suffix other than .onnx: {out_path}")
    for target in (onnx_path, manifest_path(onnx_path)):  # refused before any work, so nothing is written
        writable_path(target, "export path")
    stages: list[tuple[str, float, str]] = []

    def stage(name: str, t0: float, detail: str) -> None:
        stages.append((name, time.perf_counter() - t0, detail))
        log.info("export %-8s %5.2fs  %s", name, stages[-1][1], detail)

    t0 = time.perf_counter()
    data, inputs, outputs = export_onnx_bytes(model, card, opts, calibration=calibration)
    stage("onnx", t0, f"{opts.part} at opset {opts.opset}, {opts.precision}, {len(data) / 1e6:.2f} MB, onnx.checker passed")

    state = model.state_dict()
    names = state_names(model, kind.model_prefixes(model, opts.part))
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT,
        "kind": "onnx",
        "file": onnx_path.name,
        "sha256": sha256_bytes(data),
        "created": utc_now(),
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
        "preprocessing": kind.input_info(card, opts),
        "ood": kind.ood_info(card, opts.part, calibration),
        "weights": {
            "tensors": {n: {"shape": list(s), "dtype": "float16" if opts.half else "float32"} for n, s in names.items()},
            "digest": weights_digest({n: state[n] for n in names}),
            "source": "export",
        },
        "versions": package_versions(),
        "card": card.model_dump(mode="json"),
        "metadata": dict(metadata or {}),
    }
    if verify:
        t0 = time.perf_counter()
        report = verify_onnx_bytes(data, model, card, opts, inputs, outputs, calibration=calibration, n_images=n_verify, seed=verify_seed)
        worst = max(report["outputs"].items(), key=lambda kv: kv[1]["worst_ratio"])
        stage("verify", t0, f"{report['n_images']} random images, max abs {max(s['max_abs'] for s in report['outputs'].values()):.2e} "
              f"(worst {worst[0]}: {worst[1]['worst_ratio']:.2f} of the {opts.precision} tolerance) -> "
              f"{'passed' if report['passed'] else 'FAILED'}")
    else:
        report = {"passed": None, "skipped": "verify=False"}
    manifest["verification"] = report

    t0 = time.perf_counter()
    atomic_write_bytes(onnx_path, data)
    mp = write_manifest(onnx_path, manifest)
    stage("write", t0, f"{onnx_path} and {mp.name}")
    if report.get("passed") is False:
        raise ExportVerificationError(
            f"{onnx_path} does not reproduce the PyTorch model within the {opts.precision} tolerance "
            f"(atol {TOLERANCES[opts.precision]['atol']}, rtol {TOLERANCES[opts.precision]['rtol']}): "
            f"{_misses(report)}; files kept for inspection, manifest {mp} says passed: false"
        )
    result = ExportResult(path=onnx_path, onnx_path=onnx_path, manifest_path=mp, manifest=manifest, stages=stages)
    if opts.format == "tensorrt":
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
    data = read_bytes(onnx_path, "ONNX model", limit=MAX_GRAPH_BYTES, error=GraphFileError)
    if sha256_bytes(data) != manifest["sha256"]:
        raise GraphFileError(f"{onnx_path} does not match the sha256 in its manifest: it was changed after export; re-export it")
    load_proto(data)  # refuses NaN / infinite initializers
    inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
    outputs = [TensorSpec.from_dict(d) for d in manifest["outputs"]]
    report = verify_onnx_bytes(data, model, card, opts, inputs, outputs, calibration=calibration, n_images=n_images, seed=seed)
    if update_manifest:
        manifest["verification"] = report
        write_manifest(Path(onnx_path), manifest)
    if not report["passed"]:
        raise ExportVerificationError(f"{onnx_path} does not reproduce the model: {_misses(report)}")
    return report
