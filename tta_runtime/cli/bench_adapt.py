"""`tta-runtime bench adapt`: the command-line door to `tta_runtime.bench_adapt` (printing lives here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tta_runtime.evaluation.bench_adapt import EXEC_LEVERS, bench_adapt
from tta_runtime.errors import ConfigError
from tta_runtime.data.scenes import OOD_SPLITS, TEST_SEED

# -- command line ----------------------------------------------------------------------------------------


def _cmd_bench_adapt(args: Any) -> int:
    import shlex

    def csv(s: str | None) -> list[str]:
        return [x for x in (s or "").split(",") if x]

    try:
        batch_sizes = [int(b) for b in csv(args.batch_sizes)]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    command = "tta-runtime " + shlex.join(args.argv)

    def write(report: dict[str, Any]) -> None:  # after every configuration, so a run cut short keeps its figures
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"command": command, **report}, indent=2) + "\n")

    report = bench_adapt(
        args.model, splits=csv(args.splits) or list(OOD_SPLITS), n_images=args.n_images, seed=args.seed,
        baseline=args.baseline, fast=args.fast, extra_recipes=csv(args.extra_recipes), levers=not args.no_levers,
        batch_sizes=batch_sizes, exec_levers=csv(args.exec_levers),
        batched_recipes=csv(args.batched_recipes) or None, device=args.device, memory=not args.no_memory,
        timing_size=args.timing_size, timing_slots=args.timing_slots, timing_images=args.timing_images,
        configs=csv(args.configs) or None, quality=not args.no_quality, compile_backend=args.compile_backend,
        checkpoint=write if args.json else None, progress=args.progress,
    )
    write(report)
    _print_report(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _print_report(report: dict[str, Any]) -> None:
    if "configs" in report:
        p = report["protocol"]
        print(f"FG-ARI before {report['before']['fg_ari_mean']:.3f} on {p['n_images']} images of {','.join(p['splits'])} "
              f"(seed {p['seed']}), device {report['device']}")
        print(f"{'config':34}{'after':>7}{'gain':>8}{'of faithful':>12}{'s/img':>8}{'ms/step':>9}{'img/s':>8}{'x time':>8}{'MiB':>7}")
        for name, r in report["configs"].items():
            frac = r["gain_fraction_of_faithful"]["value"]
            mem = r["peak_memory_mb"]
            print(f"{name:34}{r['fg_ari_after']:>7.3f}{r['gain']['mean']:>+8.3f}{'-' if frac is None else f'{frac:.0%}':>12}"
                  f"{r['seconds_per_image']:>8.3f}{r['ms_per_step']:>9.2f}{r['images_per_second']:>8.2f}"
                  f"{r['time_ratio_vs_faithful']:>8.3f}{'-' if mem is None else f'{mem:.0f}':>7}")
        t = report["target"]
        if "met" in t:
            kept = "an undefined share (the faithful gain is not positive)" if t["gain_fraction"] is None else f"{t['gain_fraction']:.0%}"
            verdict = {True: "MET", False: "NOT MET", None: "UNDEFINED"}[t["met"]]
            print(f"target (>= {t['gain_fraction_min']:.0%} of the faithful gain at <= {t['time_ratio_max']:.2f} of its time): "
                  f"{t['recipe']} keeps {kept} at {t['time_ratio']:.3f} of the time -> {verdict}")
        for name, a in report["batched_vs_loop"].items():
            print(f"{name} vs {a['loop']}: max |FG-ARI diff| {a['max_abs_fg_ari_diff']:.4f}, pixels agreeing {a['pixel_agreement']:.4f}")
    if "timing_model" in report:
        tm = report["timing_model"]
        print(f"timing on a random {tm['segmenter']['resolution']}x{tm['segmenter']['resolution']} model, {tm['segmenter']['num_slots']} slots:")
        for name, r in tm["configs"].items():
            if "skipped" in r:
                print(f"  {name:32} skipped: {r['skipped']}")
            else:
                print(f"  {name:32}{r['seconds_per_image']:>8.3f} s/img{r['ms_per_step']:>9.2f} ms/step"
                      f"{r['images_per_second']:>8.2f} img/s{r.get('time_ratio_vs_faithful', float('nan')):>8.3f} x time")


def add_cli(commands: Any, bench_commands: Any) -> None:
    """Add `bench adapt` (see cli.py's `_CLI_MODULES`)."""
    b = bench_commands.add_parser("adapt", help="fast-adaptation levers alone and together vs the faithful recipe: quality, time, memory")
    b.add_argument("--model", default=None, help="model name or folder (default: the default shipped model)")
    b.add_argument("--splits", default=",".join(OOD_SPLITS), help="comma-separated scene splits (default: the OOD ones)")
    b.add_argument("--n-images", type=int, default=8, help="test images per split")
    b.add_argument("--seed", type=int, default=TEST_SEED, help="scene seed (default: the test seed 2026)")
    b.add_argument("--baseline", default="slot_tta", help="the faithful recipe")
    b.add_argument("--fast", default="slot_tta_fast", help="the fast recipe whose levers are measured")
    b.add_argument("--extra-recipes", default="", help="more recipes to measure, comma-separated")
    b.add_argument("--no-levers", action="store_true", help="skip the one-lever-at-a-time configurations")
    b.add_argument("--batch-sizes", default="8", help="batched-path batch sizes ('' = no batched path)")
    b.add_argument("--exec-levers", default="", help=f"execution levers on the batched path: {','.join(EXEC_LEVERS)}")
    b.add_argument("--batched-recipes", default="", help="recipes for the batched path (default: the fast one)")
    b.add_argument("--configs", default="", help="measure only these configurations (plus 'faithful')")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] (no fallback)")
    b.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the compile/graphs levers")
    b.add_argument("--no-quality", action="store_true", help="skip the quality runs (with --timing-size: timing only)")
    b.add_argument("--timing-size", type=int, default=None, help="also time a random model of this size (paper: 128)")
    b.add_argument("--timing-slots", type=int, default=11)
    b.add_argument("--timing-images", type=int, default=4)
    b.add_argument("--json", default=None, help="write the report here")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    b.set_defaults(func=_cmd_bench_adapt)
