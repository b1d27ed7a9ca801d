"""`tta-runtime`: the command line. `COMMANDS` below is the whole table; `tta-runtime COMMAND --help` for each.

    tta-runtime demo                     adapt the default model on the bundled OOD sample; print, write an overlay
    tta-runtime list | info [MODEL]      shipped models and recipes | a model's card
    tta-runtime predict IMAGE|DIR|GLOB... [--save DIR] [--adapt]   predict on your own images
    tta-runtime eval                     before/after adaptation metrics per split, with bootstrap intervals
    tta-runtime ood fit | ood eval       calibrate the OOD scorers | their AUROC per split
    tta-runtime calibrate --model M --images DIR   fit OOD scorers (and EATA's Fisher) on your own images
    tta-runtime train segmenter | unet | classifier | ftwt    train a model (resumable where it says so)
    tta-runtime serve [--model M]        the HTTP API and a page to try it (embedded uvicorn server)
    tta-runtime stream SOURCE            segment a video frame by frame with continual adaptation
    tta-runtime export | doctor          the frozen path to ONNX / TensorRT | what is installed
    tta-runtime bench gate | adapt | tta | prune | stream | backends | serve

Every command takes -v/--verbose and -q/--quiet (before or after its name); those with a JSON result take
`--json PATH` (write) or `--json -` (print); long ones show one progress bar and take `--no-progress`.
Errors are one line on stderr and exit status 2 (usage errors, bad values, unreadable files, our own typed
errors); a missing optional extra names the extra to install. Anything else is a bug: its traceback is shown,
after a line asking to report it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tta_runtime.cli import bench, bench_serve, calibrate, evaluate, export, models, serve, train, video
from tta_runtime.cli.common import (
    EXTRAS,
    Command,
    Parser,
    add_command,
    common_options,
    configure_logging,
    fail,
    output_path,
)
from tta_runtime.errors import TTARuntimeError

log = logging.getLogger("tta_runtime")

COMMANDS: tuple[Command, ...] = (
    Command("demo", models.add_demo, "adapt the default model on the bundled OOD sample image", json=True, long=True),
    Command("list", models.add_list, "shipped models and recipes", json=True),
    Command("info", models.add_info, "print a model's card (JSON)", json=True),
    Command("predict", models.add_predict, "predict (optionally adapting first) on image files, folders or globs; "
            "prints the result as JSON, or --save DIR writes label maps, overlays, JSON and a summary", json=True, long=True),
    Command("eval", evaluate.add_eval, "before/after adaptation metrics per split", json=True, long=True),
    Command("ood fit", evaluate.add_ood_fit, "calibrate the OOD scorers on in-distribution inputs; saved in the model folder", long=True),
    Command("ood eval", evaluate.add_ood_eval, "AUROC / FPR@95 / AUPR per OOD split and scorer", json=True, long=True),
    Command("calibrate", calibrate.add_calibrate, "fit the OOD scorers (and EATA's Fisher) on your own in-distribution images; "
            "saved in the model folder", json=True, long=True),
    Command("train segmenter", train.add_segmenter, "train a slot segmenter on generated scenes (resumable)", long=True),
    Command("train unet", train.add_unet, "train the supervised U-Net baseline (no slot bottleneck; resumable)", long=True),
    Command("train encoder", train.add_encoder, "pretrain a U-Net encoder without labels (masked image modelling; resumable)", long=True),
    Command("train classifier", train.add_classifier, "train a digits CNN classifier", long=True, extra="digits"),
    Command("train ftwt", train.add_ftwt, "train FTWT channel-pruning predictors: a pruned variant into the model folder",
            long=True, extra="digits"),
    Command("serve", serve.add_serve, "the HTTP API and a page to try it, on the embedded uvicorn server", extra="serve"),
    Command("stream", video.add_stream, "segment a video (file, camera, URL) frame by frame with continual adaptation",
            json=True, long=True),
    Command("export", export.add_export, "export a model's frozen path to ONNX or TensorRT, verified against PyTorch",
            json=True, long=True, extra="onnx"),
    Command("doctor", export.add_doctor, "versions of torch/CUDA, ONNX Runtime (providers), TensorRT, OpenCV, onnx", json=True),
    Command("bench gate", bench.add_gate, "always-adapt vs adapt='when_ood' on a mixed stream: compute and gain shares",
            json=True, long=True),
    Command("bench adapt", bench.add_adapt, "fast-adaptation levers vs the faithful recipe: quality, time, memory",
            json=True, long=True),
    Command("bench tta", bench.add_tta, "TTA methods on the digits corruption suite, plus a continual run (plots beside the JSON)",
            json=True, long=True, extra="digits"),
    Command("bench prune", bench.add_prune, "FTWT pruning per r: accuracy, FLOPs, batch-1 CPU latency (plot beside the JSON)",
            json=True, long=True, extra="digits"),
    Command("bench stream", bench.add_stream, "memory over a long stream: peak RSS growth after the warm-up frames",
            json=True, long=True),
    Command("bench serve", bench_serve.add_serve, "HTTP load on a local server: throughput, p50/p95/p99, status counts, RSS, "
            "beside an in-process predict loop", json=True, long=True, extra="serve"),
    Command("bench overhead", bench.add_overhead, "the runtime beside the reference loops (Tent, BN stats, Slot-TTA), the "
            "frozen segmenter, pruning and a busy core: ratios in one run", json=True, long=True, extra="digits"),
    Command("bench backends", bench.add_backends, "latency/throughput of the frozen path per backend (PyTorch, ONNX Runtime, TensorRT)",
            json=True, long=True, extra="onnx"),
)

GROUPS = {"ood": "fit and evaluate OOD scorers", "train": "train a model", "bench": "benchmarks that write JSON"}

# Spellings from before the `train` group, still accepted (model cards record commands made with them):
# `train --out ...` -> `train segmenter`, `train-feedforward` -> `train unet`, `prune train` -> `train ftwt`.
_GROUP_FLAGS = {"--help", "--verbose", "--quiet"}


def build_parser() -> argparse.ArgumentParser:
    options = common_options()
    p = Parser(
        prog="tta-runtime", description="Test-time adaptation runtime for slot-centric segmenters.", parents=[options]
    )
    top = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        *group, name = cmd.path.split()
        parent = top
        if group:
            if group[0] not in groups:
                g = top.add_parser(group[0], help=GROUPS[group[0]], description=GROUPS[group[0]], parents=[options])
                groups[group[0]] = g.add_subparsers(dest=f"{group[0]}_command", required=True, metavar="COMMAND")
            parent = groups[group[0]]
        add_command(parent, cmd, name, options)
    return p


def modern_spelling(argv: list[str]) -> list[str]:
    """`argv` with a legacy command spelling replaced by today's (see above)."""
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))  # the command, after -v/-q
    head = argv[i : i + 2]
    if head[:1] == ["train-feedforward"]:
        new, n = ["train", "unet"], 1
    elif head == ["prune", "train"]:
        new, n = ["train", "ftwt"], 2
    elif head[:1] == ["train"] and len(head) == 2 and head[1].startswith("--") and head[1] not in _GROUP_FLAGS:
        new, n = ["train", "segmenter"], 1
    else:
        return argv
    return [*argv[:i], *new, *argv[i + n :]]


def main(argv: list[str] | None = None) -> int:
    argv = modern_spelling(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.argv = argv
    configure_logging(args)
    try:
        output_path(getattr(args, "json", None), "--json")  # before the work, not after it
        return int(args.func(args))
    except TTARuntimeError as e:  # our own errors already say what to do (a missing extra: which one)
        return fail(str(e))
    except ModuleNotFoundError as e:  # an optional package imported without our guard
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        return fail(f"`tta-runtime {args.command_path}` needs the {e.name!r} module, which is not installed: "
                    f"pip install 'tta-runtime[{extra}]'")
    except (OSError, json.JSONDecodeError) as e:  # a file argument that cannot be read or parsed
        return fail(str(e))
    except Exception as e:
        from pydantic import ValidationError

        from tta_runtime.config import format_validation_error

        if isinstance(e, ValidationError):  # options validated by a config model built directly
            return fail(format_validation_error(e, f"`{args.command_path}` options"))
        print(f"error: `tta-runtime {args.command_path}` failed unexpectedly ({type(e).__name__}); this is a bug, "
              "please report it with the command line and the traceback below", file=sys.stderr)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
