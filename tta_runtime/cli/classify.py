"""CLI commands of the classifier stage: `tta-runtime bench tta` (the method zoo on digits corruptions)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _cmd_bench_tta(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_tta import bench_tta

    report = bench_tta(
        args.json, model=args.model, methods=_csv(args.methods), corruptions=_csv(args.corruptions) or None,
        severities=[int(s) for s in _csv(args.severities)], batch_sizes=[int(b) for b in _csv(args.batch_sizes)],
        n_images=args.n_images, continual_methods=_csv(args.continual_methods), continual_images=args.continual_images,
        reset_every=args.reset_every or None, collapse_window=args.collapse_window or None, command="tta-runtime " + shlex.join(sys.argv[1:]), progress=args.progress,
    )
    _print_summary(report)
    print(f"wrote {args.json}")
    return 0


def _print_summary(report: dict[str, Any]) -> None:
    for bs, rec in report["batch_sizes"].items():
        print(f"batch size {bs} ({rec['protocol']}): mean error over corruptions, severities {report['severities']}")
        for name, m in rec["methods"].items():
            if "skipped" in m:
                print(f"  {name:<10} skipped: {m['skipped']}")
                continue
            red = m["relative_reduction"]
            red_s = "" if red is None or name == "none" else f"  ({100 * red:+.1f}% vs none)"
            print(f"  {name:<10} {100 * m['mean_error']:6.2f}%{red_s}  {1e3 * m['seconds_per_image']:.2f} ms/image")
    for name, c in report["continual"].items():
        print(
            f"continual {name} over {c['n_images']} images: mean error {json.dumps({k: round(100 * v, 2) for k, v in c['mean_error'].items()})}"
            f", max window gap to its episodic counterpart {100 * c['max_gap_continual_minus_episodic']:+.2f} points, {c['resets']} resets"
        )


def add_cli(commands: Any, bench_commands: Any) -> None:
    from tta_runtime.evaluation.bench_tta import DEFAULT_METHODS

    b = bench_commands.add_parser("tta", help="TTA methods on the digits corruption suite, batch 1 and 64, plus a continual run")
    b.add_argument("--json", required=True, help="where to write the JSON (plots go beside it)")
    b.add_argument("--model", default="digits-cnn-bn")
    b.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="recipe names; 'none' = no adaptation")
    b.add_argument("--corruptions", default="", help="comma list (default: the whole suite)")
    b.add_argument("--severities", default="5")
    b.add_argument("--batch-sizes", default="1,64")
    b.add_argument("--n-images", type=int, default=None, help="first N test images (default: all 540)")
    b.add_argument("--continual-methods", default="tent_continual", help="recipes for the long continual run ('' = none)")
    b.add_argument("--continual-images", type=int, default=10_000)
    b.add_argument("--reset-every", type=int, default=1_000, help="continual reset policy (0 = off)")
    b.add_argument("--collapse-window", type=int, default=50, help="continual collapse monitor window (0 = off)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    b.set_defaults(func=_cmd_bench_tta)
