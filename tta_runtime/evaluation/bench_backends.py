"""Benchmark of the frozen path per backend: PyTorch eager, ONNX Runtime, TensorRT.

For each batch size: latency (median, p90, min) and throughput of every backend present, and its
largest deviation from PyTorch eager (CPU, float32) on the same random images. The backends take turns
call by call (`time_round_robin`), so a neighbour's load on a shared CPU slows all of them alike and the
ONNX Runtime / PyTorch ratio comes from one interleaved run.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_runtime.config import validate
from tta_runtime.deploy import (
    BackendUnavailableError,
    ExportOptions,
    OnnxRuntimeBackend,
    OrtOptions,
    TensorRTBackend,
    build_engine,
    doctor,
    export,
    export_kind,
    import_onnxruntime,
    import_tensorrt,
)
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.common import progress_bar
from tta_runtime.runtime import Runtime

__all__ = ["bench_backends", "percentile", "time_round_robin"]

TARGET_SPEEDUP = 2.0  # ONNX Runtime CPU vs PyTorch eager CPU, batch 1: the goal the report is checked against


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, int(np.ceil(q * len(sorted_values))) - 1))]


def _max_dev(got: Mapping[str, Any], ref: Mapping[str, np.ndarray]) -> float:
    dev = 0.0
    for k, r in ref.items():
        g = got[k]
        g = g.detach().float().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g, dtype=np.float32)
        dev = max(dev, float(np.abs(g.astype(np.float64) - r).max()))
    return dev


def time_round_robin(calls: Mapping[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
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


def _usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bench_backends(
    model: str | None = None, *, part: str = "predictor", batches: Sequence[int] = (1, 8), repeats: int = 50,
    warmup: int = 5, threads: int = 1, seed: int = 0, progress: bool = False,
) -> dict[str, Any]:
    """Latency (median, p90) and throughput of the frozen path per available backend, at each batch size,
    and each backend's max deviation from PyTorch eager (CPU, float32) on the same random images.

    Backends: PyTorch eager CPU and ONNX Runtime CPU always; PyTorch CUDA, ONNX Runtime CUDA (IOBinding)
    and TensorRT when present (else "skipped: <why>"). CPU backends use `threads` threads. GPU calls end
    with a synchronize, so their latency includes the device work. `progress`: one bar over the batch sizes.
    """
    if repeats < 3 or warmup < 0 or threads < 1 or not batches or min(batches) < 1:
        raise ConfigError(f"bench backends needs repeats >= 3, warmup >= 0, threads >= 1 and batches >= 1; got {repeats}, {warmup}, {threads}, {batches}")
    rt = Runtime.from_pretrained(model)
    card, net = rt.card, rt.model
    s = card.preprocessing.size
    gen = torch.Generator().manual_seed(seed)
    images = {b: torch.rand(b, 3, s, s, generator=gen) for b in batches}
    dynamic = {"batch": (1, max(batches))}
    opts = validate(ExportOptions, {"part": part, "dynamic": dynamic}, "bench export")
    kind = export_kind(card)
    names = [o.name for o in kind.io(card, part, opts)[1]]
    report: dict[str, Any] = {
        "model": card.name, "part": part, "image_size": s, "threads": threads, "repeats": repeats, "warmup": warmup,
        "timing": "backends take turns call by call (round robin); latency = wall time of one call; throughput = batch / median",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "usable_cpus": _usable_cpus(),
                    "load_average_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "versions": {k: v.get("version") for k, v in doctor().items() if isinstance(v, dict) and k != "python"},
        "backends": {},
    }
    runners: dict[str, dict[int, Callable[[], Any]]] = {}  # name -> {batch: call}
    cuda = torch.device("cuda", 0) if torch.cuda.is_available() else None

    def torch_runner(device: torch.device) -> dict[int, Callable[[], Any]]:
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

    def add(name: str, make: Callable[[], dict[int, Callable[[], Any]]]) -> None:
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

            def ort_cpu() -> dict[int, Callable[[], Any]]:
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
                    def ort_cuda() -> dict[int, Callable[[], Any]]:
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
                    def trt() -> dict[int, Callable[[], Any]]:
                        built = build_engine(onnx_file, Path(tmp) / "bench.engine", config={"cache_dir": tmp}, batch=1)
                        be = TensorRTBackend(built.path)
                        xs = {b: x.to(cuda) for b, x in images.items()}
                        return {b: (lambda b=b: be.run_torch(xs[b])) for b in batches}

                    add("tensorrt", trt)
            with progress_bar(len(batches), "bench backends", enabled=progress, unit="batch size") as bar:
                for b in batches:
                    bar.set_postfix_str(f"batch {b}")
                    _time_batch(b, {n: r[b] for n, r in runners.items()}, ref[b], warmup, repeats, report["backends"])
                    bar.update(1)
    finally:
        torch.set_num_threads(old_threads)
    report.update(_speedups(report["backends"], batches))
    return report


def _time_batch(
    b: int, calls: Mapping[str, Callable[[], Any]], ref: Mapping[str, np.ndarray], warmup: int, repeats: int,
    backends: dict[str, Any],
) -> None:
    """Time every backend at batch size `b` (round robin) and record its latency, throughput and deviation."""
    for n, t in time_round_robin(calls, warmup, repeats).items():
        t = sorted(t)
        med = statistics.median(t)
        entry = backends.setdefault(n, {"status": "ok", "batches": {}})
        entry["batches"][str(b)] = {
            "median_ms": round(med * 1e3, 4), "p90_ms": round(percentile(t, 0.9) * 1e3, 4),
            "min_ms": round(t[0] * 1e3, 4), "throughput_ips": round(b / med, 2),
            "max_abs_dev": _max_dev(calls[n](), ref),
        }


def _speedups(be: Mapping[str, Any], batches: Sequence[int]) -> dict[str, Any]:
    """PyTorch eager CPU median latency / ONNX Runtime CPU median latency, at batch 1 and per batch."""
    out: dict[str, Any] = {}
    both = all(be.get(n, {}).get("status") == "ok" for n in ("pytorch_eager_cpu", "onnxruntime_cpu"))
    ok = both and 1 in batches
    ratio = be["pytorch_eager_cpu"]["batches"]["1"]["median_ms"] / be["onnxruntime_cpu"]["batches"]["1"]["median_ms"] if ok else None
    out["ort_cpu_speedup_batch1"] = None if ratio is None else round(ratio, 3)
    if both:
        out["ort_cpu_speedup_per_batch"] = {
            b: round(be["pytorch_eager_cpu"]["batches"][b]["median_ms"] / be["onnxruntime_cpu"]["batches"][b]["median_ms"], 3)
            for b in be["onnxruntime_cpu"]["batches"]
        }
    out["target_speedup"] = TARGET_SPEEDUP
    out["meets_target"] = None if ratio is None else bool(ratio >= TARGET_SPEEDUP)
    out["definition"] = "ort_cpu_speedup_batch1 = PyTorch eager CPU median latency / ONNX Runtime CPU median latency, batch 1, same interleaved run"
    return out
