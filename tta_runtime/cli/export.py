"""`tta-runtime export | doctor`: the frozen path to ONNX / TensorRT (`tta_runtime.deploy`), and what is installed."""

from __future__ import annotations

import argparse

from tta_runtime.cli.common import busy, command_line, echo, output_path, write_json


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model name or folder (default: the default shipped model)")
    p.add_argument("--format", default="onnx", choices=["onnx", "tensorrt"], help="tensorrt needs the [tensorrt] extra")
    p.add_argument("--part", default="predictor", help="encoder | predictor | predictor_ood (classifiers: predictor | predictor_ood)")
    p.add_argument("--out", default=None, help="output file (default <model>-<part>.onnx); the manifest goes to OUT.json")
    p.add_argument("--half", action="store_true", help="float16 graph")
    p.add_argument("--dynamic", default=None,
                   help="dynamic axes, e.g. 'batch=1:16' or 'batch=1:16,size=16:128' (batch <= 1024, size <= 4096)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workspace", type=float, default=None, help="TensorRT workspace in GiB")
    p.add_argument("--n-verify", type=int, default=20, help="random images in the parity check (1..1000)")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--trust-code", action="store_true",
                   help="export a folder whose card names Python code ('python:package.module:function'): imports and runs it")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    import json

    from tta_runtime.deploy import export
    from tta_runtime.deploy.options import check_n_verify, parse_dynamic
    from tta_runtime.runtime import Runtime

    check_n_verify(args.n_verify)  # the request's limits, before loading anything
    output_path(args.out, "--out")
    parse_dynamic(args.dynamic)
    rt = Runtime.from_pretrained(args.model, device=args.device, trust_code=args.trust_code)
    with busy(args, f"export {args.format}"):
        res = export(
            rt.model, rt.card, args.format, args.out, part=args.part, half=args.half, dynamic=args.dynamic,
            opset=args.opset, batch=args.batch, device=args.device, workspace=args.workspace,
            calibration=rt.calibration, verify=not args.no_verify, n_verify=args.n_verify,
            metadata={"command": command_line(args)},
        )
    echo(args, *(f"{name:9}{seconds:6.2f}s  {detail}" for name, seconds, detail in res.stages))
    echo(args, f"wrote    {res.path} (manifest {res.manifest_path.name})", f"next:    {res.next_command()}")
    write_json(args, json.loads(res.manifest_path.read_text()))
    return 0


def add_doctor(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from tta_runtime.deploy import doctor

    report = doctor()
    if args.json != "-":  # the listing is the result: printed even with -q
        for section, info in report.items():
            if isinstance(info, dict):
                summary = ", ".join(f"{k} {v}" for k, v in info.items() if v not in (None, "", [], {}))
                print(f"{section:12}{summary}")
            else:
                print(f"{section:12}{info}")
    write_json(args, report)
    return 0
