"""`tta-runtime export`, `tta-runtime doctor`, `tta-runtime bench backends`: the command-line door to `tta_runtime.export` and `tta_runtime.backends` (printing lives here)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from tta_runtime.deploy.export import export

# --------------------------------------------------------------------------------------------------
# Command line: `tta-runtime export`, `tta-runtime doctor`, `tta-runtime bench backends`


def _cmd_export(args: argparse.Namespace) -> int:
    from tta_runtime.runtime import Runtime

    rt = Runtime.from_pretrained(args.model, device=args.device)
    res = export(
        rt.model, rt.card, args.format, args.out, part=args.part, half=args.half, dynamic=args.dynamic,
        opset=args.opset, batch=args.batch, device=args.device, workspace=args.workspace,
        calibration=rt.calibration, verify=not args.no_verify, n_verify=args.n_verify,
        metadata={"command": "tta-runtime " + shlex.join(args.argv)},
    )
    for name, seconds, detail in res.stages:
        print(f"{name:9}{seconds:6.2f}s  {detail}")
    print(f"wrote    {res.path} (manifest {res.manifest_path.name})")
    print(f"next:    {res.next_command()}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from tta_runtime.deploy.backends import doctor

    report = doctor()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for section, info in report.items():
        if isinstance(info, dict):
            summary = ", ".join(f"{k} {v}" for k, v in info.items() if v not in (None, "", [], {}))
            print(f"{section:12}{summary}")
        else:
            print(f"{section:12}{info}")
    return 0


def _cmd_bench_backends(args: argparse.Namespace) -> int:
    from tta_runtime.deploy.backends import bench_backends

    report = bench_backends(
        args.model, part=args.part, batches=tuple(int(b) for b in args.batches.split(",")), repeats=args.repeats,
        warmup=args.warmup, threads=args.threads,
    )
    report["command"] = "tta-runtime " + shlex.join(args.argv)
    for name, entry in report["backends"].items():
        if entry["status"] != "ok":
            print(f"{name:28}{entry['status']}")
            continue
        for b, r in entry["batches"].items():
            print(
                f"{name:28}batch {b:>2}: median {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms  "
                f"{r['throughput_ips']:8.1f} img/s  max dev {r['max_abs_dev']:.1e}"
            )
    ratio = report["ort_cpu_speedup_batch1"]
    if ratio is not None:
        print(f"ONNX Runtime CPU vs PyTorch eager, batch 1: {ratio:.2f}x faster (target {report['target_speedup']}x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_cli(commands: Any, bench_commands: Any) -> None:
    """Add `export` and `doctor` to the top-level commands and `backends` to `bench` (see cli.py)."""
    ex = commands.add_parser("export", help="export a model's frozen path to ONNX or TensorRT, verified against PyTorch")
    ex.add_argument("model", nargs="?", default=None, help="model name or folder (default: the default shipped model)")
    ex.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"])
    ex.add_argument("--part", default="predictor", help="encoder | predictor | predictor_ood")
    ex.add_argument("--out", default=None, help="output file (default <model>-<part>.onnx); the manifest goes to OUT.json")
    ex.add_argument("--half", action="store_true", help="float16 graph")
    ex.add_argument("--dynamic", default=None, help="dynamic axes, e.g. 'batch=1:16' or 'batch=1:16,size=16:128'")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--batch", type=int, default=1)
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--workspace", type=float, default=None, help="TensorRT workspace in GiB")
    ex.add_argument("--n-verify", type=int, default=20, help="random images in the parity check")
    ex.add_argument("--no-verify", action="store_true")
    ex.set_defaults(func=_cmd_export)

    doc = commands.add_parser("doctor", help="versions of torch/CUDA, ONNX Runtime (providers), TensorRT, OpenCV, onnx")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(func=_cmd_doctor)

    bb = bench_commands.add_parser("backends", help="latency/throughput of the frozen path per backend (PyTorch, ONNX Runtime, TensorRT)")
    bb.add_argument("--model", default=None)
    bb.add_argument("--part", default="predictor")
    bb.add_argument("--batches", default="1,8")
    bb.add_argument("--repeats", type=int, default=50, help="timed runs per backend and batch")
    bb.add_argument("--warmup", type=int, default=5)
    bb.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch and ONNX Runtime")
    bb.add_argument("--json", default=None)
    bb.set_defaults(func=_cmd_bench_backends)


def _main() -> int:  # pragma: no cover - `python -m tta_runtime.cli_export` is a shortcut for the CLI
    from tta_runtime.cli.main import main

    return main(["export", *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())

