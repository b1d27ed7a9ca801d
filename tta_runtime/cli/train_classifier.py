"""`python -m tta_runtime.train_classifier`: the command-line door to `tta_runtime.train_classifier`
(printing lives here; the module's `__main__` calls `main`)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from tta_runtime.config import ClassifierConfig, validate
from tta_runtime.errors import TTARuntimeError
from tta_runtime.training import classifier as _module
from tta_runtime.training.classifier import DEFAULT_CONFIG, train_classifier


def main(argv: list[str] | None = None) -> int:
    """``python -m tta_runtime.train_classifier --norm batch|group --out DIR [--epochs N] [--seed S]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m tta_runtime.train_classifier", description=(_module.__doc__ or '').splitlines()[0])
    p.add_argument("--norm", choices=("batch", "group", "layer"), default="batch")
    p.add_argument("--out", required=True, help="model folder to write; its name is the model's name")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--widths", default=",".join(map(str, DEFAULT_CONFIG.widths)), help="channels per stage, e.g. 16,32,64"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        p.error(f"--widths must be comma-separated ints, got {args.widths!r}")
    try:
        fields = {**DEFAULT_CONFIG.model_dump(), "norm": args.norm, "widths": widths}
        out = train_classifier(
            validate(ClassifierConfig, fields, "--norm/--widths"),
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            out=Path(args.out),
            command="python -m tta_runtime.train_classifier " + shlex.join(argv),
            progress=not args.no_progress,
        )
    except TTARuntimeError as e:  # our errors say what to do: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    card = json.loads((out / "card.json").read_text())
    clean, shifted = card["metrics"]["clean"], card["metrics"]["corruption_error_severity5"]
    print(
        f"wrote {out}: clean test accuracy {clean['test_accuracy']:.4f}, mean severity-5 error "
        f"{shifted['mean_benchmark']:.4f} (15 benchmark corruptions), {card['training']['seconds']:.0f} s training "
        f"({card['training']['cpu_seconds']:.0f} s CPU)"
    )
    return 0
