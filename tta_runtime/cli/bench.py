"""`tta-runtime bench gate | adapt | tta | prune | stream | backends`: the benchmarks in `tta_runtime.evaluation`.

Each prints a summary and, with `--json PATH|-`, writes or prints its report (the report records the
command that made it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from tta_runtime.cli.common import (
    busy,
    check_range,
    command_line,
    csv,
    echo,
    numbers,
    progress,
    write_json,
)
from tta_runtime.cli.train import set_threads


def add_gate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--n-images", type=int, default=8, help="in-distribution images (as many shifted ones)")
    p.add_argument("--shifts", default=None, help="comma-separated shifted splits of the model's world (default: "
                   "textured_background,unseen_colours for a shapes-world model, "
                   "flat/photo_background,flat/unseen_shapes for a flat-world one)")
    p.add_argument("--recipe", default=None, help="the adaptation recipe (default: the model card's default_recipe)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    p.add_argument("--scorer", default=None, help="the calibrated OOD scorer that gates (default: recon_error)")
    p.set_defaults(func=_gate)


def _gate(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_gate import bench_gate

    check_range(args.n_images, "--n-images", 1, 100_000)
    report = bench_gate(
        args.model, n_images=args.n_images, shifts=csv(args.shifts) if args.shifts is not None else None,
        recipe=args.recipe, steps=args.steps,
        progress=progress(args), scorer=args.scorer,
    )
    report["command"] = command_line(args)
    f, kept = report["fg_ari"], report["gain_kept"]
    echo(
        args,
        f"stream: {args.n_images} in-distribution + {args.n_images} shifted ({','.join(report['stream']['shifts'])}); "
        f"gate {report['scorer']}",
        f"flagged OOD: in-distribution {report['flagged']['in_dist']:.0%}, shifted {report['flagged']['shifted']:.0%}",
        f"FG-ARI before {f['before']:.3f}, always-adapt {f['always']:.3f}, when_ood {f['when_ood']:.3f}",
        f"when_ood used {report['compute_share_seconds']:.0%} of the always-adapt time "
        f"({report['compute_share_steps']:.0%} of its steps) and kept "
        + (f"{kept:.0%}" if kept is not None else "n/a (no gain to keep)") + " of its FG-ARI gain",
    )
    write_json(args, report)
    return 0


def add_adapt(p: argparse.ArgumentParser) -> None:
    from tta_runtime.data.scenes import OOD_SPLITS, TEST_SEED

    p.add_argument("--model", default=None, help="model name or folder (default: the default shipped model)")
    p.add_argument("--splits", default=",".join(OOD_SPLITS), help="comma-separated scene splits (default: the OOD ones)")
    p.add_argument("--n-images", type=int, default=8, help="test images per split")
    p.add_argument("--seed", type=int, default=TEST_SEED, help="scene seed (default: the test seed 2026)")
    for flag, default, text in (  # comma-separated lists and names
        ("--baseline", "slot_tta", "the faithful recipe"),
        ("--fast", "slot_tta_fast", "the fast recipe whose levers are measured"),
        ("--extra-recipes", "", "more recipes to measure, comma-separated"),
        ("--batch-sizes", "8", "batched-path batch sizes ('' = no batched path)"),
        ("--exec-levers", "", "execution levers on the batched path (see bench_adapt.EXEC_LEVERS)"),
        ("--batched-recipes", "", "recipes for the batched path (default: the fast one)"),
        ("--configs", "", "measure only these configurations (plus 'faithful')"),
        ("--device", "cpu", "cpu or cuda[:N] (no fallback)"),
        ("--compile-backend", "inductor", "torch.compile backend for the compile/graphs levers"),
    ):
        p.add_argument(flag, default=default, help=text)
    for flag, text in (
        ("--no-levers", "skip the one-lever-at-a-time configurations"),
        ("--no-memory", "skip the CPU peak-memory subprocesses"),
        ("--no-quality", "skip the quality runs (with --timing-size: timing only)"),
    ):
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--timing-size", type=int, default=None, help="also time a random model of this size (paper: 128)")
    p.add_argument("--timing-slots", type=int, default=11)
    p.add_argument("--timing-images", type=int, default=4)
    p.set_defaults(func=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    from tta_runtime.data.scenes import OOD_SPLITS
    from tta_runtime.evaluation.bench_adapt import bench_adapt

    check_range(args.n_images, "--n-images", 1, 100_000)
    check_range(args.timing_size, "--timing-size", 8, 512)
    check_range(args.timing_slots, "--timing-slots", 2, 64)
    check_range(args.timing_images, "--timing-images", 1, 10_000)
    batch_sizes = numbers(args.batch_sizes, "--batch-sizes", int, 1, 4096)
    command = command_line(args)
    to_file = args.json is not None and args.json != "-"

    def checkpoint(report: dict[str, Any]) -> None:  # after every configuration, so a run cut short keeps its figures
        write_json(args, {"command": command, **report}, say=False)

    report = bench_adapt(
        args.model, splits=csv(args.splits) or list(OOD_SPLITS), n_images=args.n_images, seed=args.seed,
        baseline=args.baseline, fast=args.fast, extra_recipes=csv(args.extra_recipes), levers=not args.no_levers,
        batch_sizes=batch_sizes, exec_levers=csv(args.exec_levers),
        batched_recipes=csv(args.batched_recipes) or None, device=args.device, memory=not args.no_memory,
        timing_size=args.timing_size, timing_slots=args.timing_slots, timing_images=args.timing_images,
        configs=csv(args.configs) or None, quality=not args.no_quality, compile_backend=args.compile_backend,
        checkpoint=checkpoint if to_file else None, progress=progress(args),
    )
    echo(args, *_adapt_lines(report))
    write_json(args, {"command": command, **report})
    return 0


def _adapt_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if "configs" in report:
        p = report["protocol"]
        lines.append(f"FG-ARI before {report['before']['fg_ari_mean']:.3f} on {p['n_images']} images of "
                     f"{','.join(p['splits'])} (seed {p['seed']}), device {report['device']}")
        lines.append(f"{'config':34}{'after':>7}{'gain':>8}{'of faithful':>12}{'s/img':>8}{'ms/step':>9}{'img/s':>8}"
                     f"{'x time':>8}{'MiB':>7}")
        for name, r in report["configs"].items():
            frac, mem = r["gain_fraction_of_faithful"]["value"], r["peak_memory_mb"]
            lines.append(
                f"{name:34}{r['fg_ari_after']:>7.3f}{r['gain']['mean']:>+8.3f}{'-' if frac is None else f'{frac:.0%}':>12}"
                f"{r['seconds_per_image']:>8.3f}{r['ms_per_step']:>9.2f}{r['images_per_second']:>8.2f}"
                f"{r['time_ratio_vs_faithful']:>8.3f}{'-' if mem is None else f'{mem:.0f}':>7}"
            )
        t = report["target"]
        if "met" in t:
            kept = "an undefined share (the faithful gain is not positive)" if t["gain_fraction"] is None else f"{t['gain_fraction']:.0%}"
            verdict = {True: "MET", False: "NOT MET", None: "UNDEFINED"}[t["met"]]
            lines.append(f"target (>= {t['gain_fraction_min']:.0%} of the faithful gain at <= {t['time_ratio_max']:.2f} of its "
                         f"time): {t['recipe']} keeps {kept} at {t['time_ratio']:.3f} of the time -> {verdict}")
        for name, a in report["batched_vs_loop"].items():
            lines.append(f"{name} vs {a['loop']}: max |FG-ARI diff| {a['max_abs_fg_ari_diff']:.4f}, "
                         f"pixels agreeing {a['pixel_agreement']:.4f}")
    if "timing_model" in report:
        tm = report["timing_model"]
        res = tm["segmenter"]["resolution"]
        lines.append(f"timing on a random {res}x{res} model, {tm['segmenter']['num_slots']} slots:")
        for name, r in tm["configs"].items():
            if "skipped" in r:
                lines.append(f"  {name:32} skipped: {r['skipped']}")
            else:
                lines.append(f"  {name:32}{r['seconds_per_image']:>8.3f} s/img{r['ms_per_step']:>9.2f} ms/step"
                             f"{r['images_per_second']:>8.2f} img/s{r.get('time_ratio_vs_faithful', float('nan')):>8.3f} x time")
    return lines


def add_tta(p: argparse.ArgumentParser) -> None:
    from tta_runtime.evaluation.bench_tta import DEFAULT_METHODS

    p.add_argument("--model", default="digits-cnn-bn")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="recipe names; 'none' = no adaptation")
    p.add_argument("--corruptions", default="", help="comma list (default: the whole suite)")
    p.add_argument("--severities", default="5")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--n-images", type=int, default=None, help="first N test images (default: all 540)")
    p.add_argument("--continual-methods", default="tent_continual", help="recipes for the long continual run ('' = none)")
    p.add_argument("--continual-images", type=int, default=10_000)
    p.add_argument("--reset-every", type=int, default=1_000, help="continual reset policy (0 = off)")
    p.add_argument("--collapse-window", type=int, default=50, help="continual collapse monitor window (0 = off)")
    p.set_defaults(func=_tta)


def _tta(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_tta import bench_tta

    check_range(args.n_images, "--n-images", 1, 10**7)
    check_range(args.continual_images, "--continual-images", 0, 10**7)
    check_range(args.reset_every, "--reset-every", 0, 10**9)
    check_range(args.collapse_window, "--collapse-window", 0, 100_000)
    with tempfile.TemporaryDirectory() as tmp:  # bench_tta writes its JSON (and plots beside it) itself
        path = Path(tmp) / "bench_tta.json" if args.json in (None, "-") else Path(args.json)
        report = bench_tta(
            path, model=args.model, methods=csv(args.methods), corruptions=csv(args.corruptions) or None,
            severities=numbers(args.severities, "--severities", int, 1, 5),
            batch_sizes=numbers(args.batch_sizes, "--batch-sizes", int, 1, 4096),
            n_images=args.n_images, continual_methods=csv(args.continual_methods), continual_images=args.continual_images,
            reset_every=args.reset_every or None, collapse_window=args.collapse_window or None,
            command=command_line(args), progress=progress(args),
        )
    echo(args, *_tta_lines(report))
    if args.json == "-":
        write_json(args, report)
    elif args.json is not None:
        echo(args, f"wrote {args.json} (plots beside it)")
    return 0


def _tta_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for bs, rec in report["batch_sizes"].items():
        lines.append(f"batch size {bs} ({rec['protocol']}): mean error over corruptions, severities {report['severities']}")
        for name, m in rec["methods"].items():
            if "skipped" in m:
                lines.append(f"  {name:<10} skipped: {m['skipped']}")
                continue
            red = m["relative_reduction"]
            red_s = "" if red is None or name == "none" else f"  ({100 * red:+.1f}% vs none)"
            lines.append(f"  {name:<10} {100 * m['mean_error']:6.2f}%{red_s}  {1e3 * m['seconds_per_image']:.2f} ms/image")
    for name, c in report["continual"].items():
        errors = json.dumps({k: round(100 * v, 2) for k, v in c["mean_error"].items()})
        lines.append(
            f"continual {name} over {c['n_images']} images: mean error {errors}, max window gap to its episodic "
            f"counterpart {100 * c['max_gap_continual_minus_episodic']:+.2f} points, {c['resets']} resets"
        )
    return lines


def add_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits-cnn-bn")
    p.add_argument("--rs", default="0.5,0.6,0.65,0.7,0.8,0.9", help="comma-separated r values")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--static-quantile", type=float, default=0.8)
    p.add_argument("--bucket-quantiles", default="0.5,0.9", help="width buckets at these quantiles (plus full width)")
    p.add_argument("--calls", type=int, default=300, help="interleaved latency calls per path")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime paths")
    p.add_argument("--adapt-images", type=int, default=128, help="test images per corruption for the adaptation check")
    p.add_argument("--save-variant", type=float, default=None, help="also write the variant trained at this r to the model folder")
    p.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_prune import bench_prune, plot_prune

    check_range(args.epochs, "--epochs", 1, 10_000)
    check_range(args.static_quantile, "--static-quantile", 0, 1)
    check_range(args.calls, "--calls", 1, 10**6)
    check_range(args.adapt_images, "--adapt-images", 1, 10**6)
    if args.save_variant is not None:
        check_range(args.save_variant, "--save-variant", 1e-6, 1)
    set_threads(args.threads)
    with busy(args, "bench prune") as note:  # bench_prune reports stages as messages: shown in one bar
        report = bench_prune(
            args.model, rs=numbers(args.rs, "--rs", float, 1e-6, 1), epochs=args.epochs, static_quantile=args.static_quantile,
            bucket_quantiles=numbers(args.bucket_quantiles, "--bucket-quantiles", float, 0, 1), calls=args.calls,
            threads=args.threads, onnx=not args.no_onnx, save_variant=args.save_variant, adapt_images=args.adapt_images,
            command=command_line(args), progress=note,
        )
    lines = [
        f"{report['model']}: shipped test accuracy {report['baseline_test_accuracy']:.4f} ({report['n_test']} images)",
        f"{'r':>5} {'path':14}{'acc':>8}{'drop':>7}{'FLOPs-':>8}  latency vs shipped dense (batch 1)",
    ]
    for row in report["rows"]:
        lat = row["latency_ratio_vs_dense"]
        for path, lat_keys in (("mask_multiply", []), ("static", ["gather", "ort_gather"]), ("buckets", ["buckets", "ort_buckets"])):
            x = row[path]
            lat_s = ", ".join(f"{k} {lat[k]:.2f}x" for k in lat_keys if k in lat)
            lines.append(f"{row['r']:>5g} {path:14}{x['accuracy']:>8.4f}{x['accuracy_drop_points']:>+7.2f}"
                         f"{x['flops_reduction']:>8.1%}  {lat_s}")
        ad = row["with_adaptation"]
        lines.append(f"{'':>5} corrupted error % (none/bn_stats/tent): dense {'/'.join(str(v) for v in ad['dense'].values())}, "
                     f"pruned {'/'.join(str(v) for v in ad['pruned'].values())}")
        lines.append(f"{'':>5} {'dense':14}  folded {lat['dense_folded']:.2f}x"
                     + (f", ort_dense {lat['ort_dense']:.2f}x" if "ort_dense" in lat else ""))
    lines += [f"{k}: {'MET' if v['met'] else 'not met'} {v['at_r'] if v['met'] else ''}" for k, v in report["targets"].items()]
    echo(args, *lines)
    out = write_json(args, report)
    if out is not None:
        echo(args, f"wrote {plot_prune(report, out.with_suffix('.png'))}")
    return 0


def add_stream(p: argparse.ArgumentParser) -> None:
    from tta_runtime.video import DEFAULT_RECIPE

    p.add_argument("--model", default=None)
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--steps-per-frame", type=int, default=1)
    p.add_argument("--restore-prob", type=float, default=None, help="stochastic restore; default: the recipe's")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--warmup", type=int, default=100)
    p.set_defaults(func=_stream)


def _stream(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_stream import bench_stream

    check_range(args.warmup, "--warmup", 0, 10**7)
    check_range(args.frames, "--frames", 1, 10**7)
    report = bench_stream(
        args.model, frames=args.frames, steps_per_frame=args.steps_per_frame, size=args.size, recipe=args.recipe,
        warmup=args.warmup, progress=progress(args), restore_prob=args.restore_prob,
    )
    report["command"] = command_line(args)
    echo(
        args,
        f"{report['frames_processed']} frames at {report['fps']:.1f} fps, {report['steps_per_frame']} step(s)/frame: RSS "
        f"{report['rss_mb_at_warmup']:.1f} MiB at frame {report['warmup_frames']}, peak after "
        f"{report['peak_rss_mb_after_warmup']:.1f} MiB, growth {report['peak_rss_growth_mb']:+.1f} MiB "
        f"(target < {report['target_growth_mb']} MiB)",
    )
    write_json(args, report)
    return 0


def add_backends(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--part", default="predictor")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per backend and batch")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch and ONNX Runtime")
    p.set_defaults(func=_backends)


def _backends(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_backends import bench_backends

    with busy(args, "bench backends"):
        report = bench_backends(
            args.model, part=args.part, batches=tuple(numbers(args.batches, "--batches", int, 1, 1024)), repeats=args.repeats,
            warmup=args.warmup, threads=args.threads,
        )
    report["command"] = command_line(args)
    lines = []
    for name, entry in report["backends"].items():
        if entry["status"] != "ok":
            lines.append(f"{name:28}{entry['status']}")
            continue
        for b, r in entry["batches"].items():
            lines.append(
                f"{name:28}batch {b:>2}: median {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms  "
                f"{r['throughput_ips']:8.1f} img/s  max dev {r['max_abs_dev']:.1e}"
            )
    if report["ort_cpu_speedup_batch1"] is not None:
        lines.append(f"ONNX Runtime CPU vs PyTorch eager, batch 1: {report['ort_cpu_speedup_batch1']:.2f}x "
                     f"(target {report['target_speedup']}x)")
    echo(args, *lines)
    write_json(args, report)
    return 0


def add_overhead(p: argparse.ArgumentParser) -> None:
    from tta_runtime.evaluation.bench_overhead import SECTIONS

    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--calls", type=int, default=30, help="timed calls per candidate (Tent; x3 for the faster sections)")
    p.add_argument("--slot-calls", type=int, default=15, help="timed calls per candidate of the Slot-TTA section")
    p.add_argument("--busy-rounds", type=int, default=4, help="idle/busy pairs of the busy-core section")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every section but busy_core")
    p.set_defaults(func=_overhead)


def _overhead(args: argparse.Namespace) -> int:
    from tta_runtime.evaluation.bench_overhead import SECTIONS, bench_overhead

    from tta_runtime.errors import ConfigError

    sections = tuple(csv(args.sections))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise ConfigError(f"--sections: unknown {unknown} (choose from {', '.join(SECTIONS)})")
    for flag, value in (("--calls", args.calls), ("--slot-calls", args.slot_calls), ("--busy-rounds", args.busy_rounds),
                        ("--threads", args.threads)):
        check_range(value, flag, 1, 10_000)
    with busy(args, "bench overhead") as note:
        report = bench_overhead(sections=sections, calls=args.calls, slot_calls=args.slot_calls,
                                busy_rounds=args.busy_rounds, threads=args.threads, progress=note)
    report["command"] = command_line(args)
    echo(args, *_overhead_lines(report))
    write_json(args, report)
    return 0


def _overhead_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for b in ("batch_64", "batch_1"):
        entry = report.get("tent", {}).get(b)
        if entry:
            r, bn = entry["ratio_to_reference"], entry["bn_stats"]["ratio_to_reference"]
            lines.append(f"tent {b}: runtime {r['runtime']:.2f}x (OOD scored), {r['runtime_no_ood']:.2f}x (not), "
                         f"{r['runtime_adapted_prediction']:.2f}x predicting after the update; "
                         f"bn_stats {bn['runtime']:.2f}x, without OOD {bn['runtime_no_ood']:.2f}x")
    if "slot_tta_fast" in report:
        r = report["slot_tta_fast"]["ratio_to_reference"]
        lines.append(f"slot_tta_fast: runtime {r['runtime']:.2f}x")
    if "frozen_segmenter" in report:
        f = report["frozen_segmenter"]
        lines.append(f"segmenter predict, batch 1: {f['ratio_to_reference']['runtime']:.2f}x the eager decoder in a fresh "
                     f"process (max |diff| masks {f['max_abs_diff']['masks']:.1e})")
        if "after_batch64_work" in f:
            lines.append(f"  after batch-64 work in the same process: {f['after_batch64_work']['ratio_to_reference']['runtime']:.2f}x")
    for model, entry in report.get("pruning", {}).items():
        for b in ("batch_1", "batch_64"):
            if b in entry:
                ratio = entry[b]["ratio_to_reference"]
                lines.append(f"{model} {entry['variant']} {b}: {next(iter(ratio.values())):.2f}x dense (path {entry.get('path')})")
    if "busy_core" in report:
        for label in ("library_defaults", "one_thread_per_core"):
            e = report["busy_core"][label]
            lines.append(f"busy core, {label} ({e['threads_used']} thread(s)): {e['ratio_busy_to_idle']:.2f}x idle")
    return lines
