"""Is ONNX Runtime's dynamic int8 quantisation a way to a faster CPU frozen path? (README, export section.)

Exports the shipped segmenter's predictor, quantises its weights with
``onnxruntime.quantization.quantize_dynamic`` (QInt8) and times, at batch 1 on one thread and interleaved call
by call: PyTorch eager, ONNX Runtime float32, ONNX Runtime int8; then the int8 graph's largest deviation
from float32 on the masks over 8 random inputs. Prints JSON.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/ort_int8_check.py
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from tta_runtime import Runtime
from tta_runtime.prune.ftwt import interleaved_latency


def main(calls: int = 40) -> dict:
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser suggests pre-processing on every call
    torch.set_num_threads(1)
    rt = Runtime.from_pretrained()
    with tempfile.TemporaryDirectory() as tmp:
        f32, i8 = Path(tmp) / "seg.onnx", Path(tmp) / "seg_int8.onnx"
        rt.export(f32, part="predictor")
        quantize_dynamic(str(f32), str(i8), weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        s32 = ort.InferenceSession(str(f32), so, providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(str(i8), so, providers=["CPUExecutionProvider"])
    name = s32.get_inputs()[0].name
    x = torch.rand(1, 3, rt.input_size, rt.input_size, generator=torch.Generator().manual_seed(0))

    def torch_eager() -> None:
        with torch.inference_mode():
            rt.model(x)

    fns = {"pytorch": torch_eager, "onnxruntime_fp32": lambda: s32.run(None, {name: x.numpy()}),
           "onnxruntime_int8": lambda: s8.run(None, {name: x.numpy()})}
    med = {k: round(v * 1e3, 3) for k, v in interleaved_latency(fns, calls=calls, warmup=5).items()}
    g = torch.Generator().manual_seed(1)
    dev = max(
        float(np.abs(s32.run(None, {name: xi})[0] - s8.run(None, {name: xi})[0]).max())
        for xi in (torch.rand(1, 3, rt.input_size, rt.input_size, generator=g).numpy() for _ in range(8))
    )
    return {
        "model": rt.name, "part": "predictor", "batch": 1, "threads": 1, "calls": calls, "median_ms": med,
        "speedup_vs_pytorch": {k: round(med["pytorch"] / v, 3) for k, v in med.items()},
        "int8_max_abs_mask_deviation_vs_fp32": round(dev, 4),
        "hardware": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, onnxruntime {ort.__version__}",
        "command": "OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python scripts/ort_int8_check.py",
    }


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=2)
    print()
