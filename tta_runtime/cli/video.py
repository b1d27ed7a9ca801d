"""`tta-runtime stream` and `tta-runtime bench stream`: the command-line door to `tta_runtime.video` (printing lives here)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tta_runtime.video import _ADAPT, _POLICIES, DEFAULT_RECIPE, DEFAULT_STEPS_PER_FRAME, StreamFrame, StreamStats, bench_stream, stream

if TYPE_CHECKING:
    from tta_runtime.runtime import Runtime

# --------------------------------------------------------------------------------------------------
# Command line (added to `tta-runtime` by cli.build_parser)


def add_cli(commands: argparse._SubParsersAction, bench_commands: argparse._SubParsersAction) -> None:
    """`tta-runtime stream ...` and `tta-runtime bench stream ...`; nothing heavy is imported here."""
    from tta_runtime.data.video import SHIFT_KINDS

    s = commands.add_parser(
        "stream", help="segment a video (file, camera, URL) frame by frame with continual adaptation",
        description="Segment a video frame by frame with continual test-time adaptation; write an annotated "
        "video and statistics. With --generate, first write a procedural video with a distribution shift "
        "half-way (and its masks, OUT.npz) and stream that.",
    )
    s.add_argument("source", nargs="?", default=None, help="video file, camera index or URL (rtsp://, http://)")
    s.add_argument("--out", default=None, help="annotated video to write (.mp4, fourcc mp4v)")
    s.add_argument("--json", default=None, help="write the statistics here")
    s.add_argument("--model", default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"adaptation recipe (default {DEFAULT_RECIPE})")
    s.add_argument("--adapt", choices=_ADAPT, default="always")
    s.add_argument("--steps-per-frame", type=int, default=DEFAULT_STEPS_PER_FRAME)
    s.add_argument("--restore-prob", type=float, default=None,
                   help="stochastic restore per step and weight (CoTTA); default: the recipe's (slot_tta_stream: 0.01)")
    s.add_argument("--latency-budget-ms", type=float, default=None)
    s.add_argument("--no-reset-on-cut", dest="reset_on_cut", action="store_false")
    s.add_argument("--no-reset-on-collapse", dest="reset_on_collapse", action="store_false")
    s.add_argument("--reset-every", type=int, default=None, help="also reset the weights every N processed frames")
    s.add_argument("--policy", choices=_POLICIES, default=None, help="default: all for files, latest for cameras/URLs")
    s.add_argument("--stride", type=int, default=1)
    s.add_argument("--buffer", type=int, default=None, help="queue size (default 4 for all, 1 for latest)")
    s.add_argument("--max-frames", type=int, default=None)
    s.add_argument("--ground-truth", default=None, help=".npz with 'instances' (N, H, W): FG-ARI per frame")
    s.add_argument("--read-timeout-s", type=float, default=10.0)
    s.add_argument("--compare", action="store_true", help="also run predict-only (adapt=never) and report the margin")
    s.add_argument("--frame-png", default=None, help="save one annotated frame (with --compare: next to predict-only)")
    s.add_argument("--frame-index", type=int, default=None, help="which frame for --frame-png (default: late in the shift)")
    g = s.add_argument_group("generate a shifted test video")
    g.add_argument("--generate", default=None, metavar="OUT.mp4", help="write a procedural shifted video (+ OUT.npz masks) and stream it")
    g.add_argument("--generate-only", action="store_true", help="with --generate: write the video and stop")
    g.add_argument("--frames", type=int, default=300)
    g.add_argument("--shift-at", type=int, default=None, help="first shifted frame (default: frames // 2)")
    g.add_argument("--shift-kind", choices=SHIFT_KINDS, default="textured_background")
    g.add_argument("--size", type=int, default=128)
    g.add_argument("--fps", type=float, default=25.0)
    g.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_stream)

    b = bench_commands.add_parser("stream", help="memory over a long stream: peak RSS growth after the first 100 frames")
    b.add_argument("--model", default=None)
    b.add_argument("--frames", type=int, default=5000)
    b.add_argument("--steps-per-frame", type=int, default=1)
    b.add_argument("--restore-prob", type=float, default=None, help="stochastic restore; default: the recipe's")
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--recipe", default=DEFAULT_RECIPE)
    b.add_argument("--warmup", type=int, default=100)
    b.add_argument("--json", default=None)
    b.set_defaults(func=_cmd_bench_stream)


def _run_for_cli(
    rt: Runtime, source: str, frame_index: int | None, **kw: Any
) -> tuple[StreamStats, list[tuple[int, float]], StreamFrame | None]:
    """One pass: the stats, (index, FG-ARI) per frame, and the frame at `frame_index`."""
    scores: list[tuple[int, float]] = []
    kept = None
    with stream(rt, source, **kw) as s:
        for f in s:
            if f.fg_ari is not None:
                scores.append((f.index, f.fg_ari))
            if f.index == frame_index:
                kept = f
    return s.stats, scores, kept


def _segments(scores: list[tuple[int, float]], shift_at: int | None) -> dict[str, Any]:
    def mean(vals: list[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(vals)) if vals else None, "frames": len(vals)}

    out = {"all": mean([v for _, v in scores])}
    if shift_at is not None:
        out["before_shift"] = mean([v for i, v in scores if i < shift_at])
        out["after_shift"] = mean([v for i, v in scores if i >= shift_at])
    return out


def _cmd_stream(args: argparse.Namespace) -> int:
    import json
    import shlex
    import sys

    import torch

    from tta_runtime.runtime import Runtime
    from tta_runtime.visual import panel, save_png

    generated = None
    source, truth = args.source, args.ground_truth
    if args.generate:
        if source is not None:
            print("error: give a SOURCE or --generate OUT.mp4, not both", file=sys.stderr)
            return 2
        from tta_runtime.data.video import make_shifted_video

        generated = make_shifted_video(
            args.generate, args.frames, shift_at=args.shift_at, kind=args.shift_kind, size=args.size, fps=args.fps,
            seed=args.seed,
        )
        print(
            f"wrote {generated.video} ({generated.frames} frames, {generated.size}x{generated.size}, {generated.kind} "
            f"from frame {generated.shift_at}, seed {generated.seed}) and {generated.masks}"
        )
        if args.generate_only:
            return 0
        source, truth = str(generated.video), truth or str(generated.masks)
    elif source is None:
        print("error: give a SOURCE (video file, camera index, URL) or --generate OUT.mp4", file=sys.stderr)
        return 2
    elif args.generate_only:
        print("error: --generate-only needs --generate OUT.mp4", file=sys.stderr)
        return 2

    shift_at = None
    if truth is not None and str(truth).endswith(".npz"):
        with np.load(truth) as data:
            shift_at = int(data["shift_at"]) if "shift_at" in data else None
            n_truth = len(data["instances"]) if "instances" in data else None
    frame_index = args.frame_index
    if args.frame_png and frame_index is None:
        n = n_truth if truth is not None and n_truth else None
        frame_index = (shift_at + 3 * (n - shift_at) // 4) if shift_at is not None and n else 0

    rt = Runtime.from_pretrained(args.model, device=args.device)
    opts = {
        "recipe": args.recipe, "steps_per_frame": args.steps_per_frame, "latency_budget_ms": args.latency_budget_ms,
        "restore_prob": args.restore_prob,
        "reset_on_cut": args.reset_on_cut, "reset_on_collapse": args.reset_on_collapse, "reset_every": args.reset_every,
        "policy": args.policy,
        "stride": args.stride, "buffer": args.buffer, "max_frames": args.max_frames, "ground_truth": truth,
        "read_timeout_s": args.read_timeout_s,
    }
    stats, scores, kept = _run_for_cli(
        rt, source, frame_index, adapt=args.adapt, out=args.out, annotate=bool(args.frame_png), progress=True, **opts
    )
    d = stats.to_dict()
    report: dict[str, Any] = {
        "command": "tta-runtime " + shlex.join(args.argv),
        "model": rt.name,
        "video": generated.to_dict() if generated else {"source": stats.source},
        "stats": d,
    }
    _print_stats(stats)
    if scores:
        report["fg_ari"] = {args.adapt: _segments(scores, shift_at)}
    kept_never = None
    if args.compare:
        never_stats, never_scores, kept_never = _run_for_cli(
            rt, source, frame_index, adapt="never", annotate=bool(args.frame_png), progress=True, **opts
        )
        report["predict_only_stats"] = never_stats.to_dict()
        if scores:
            report["fg_ari"]["never"] = _segments(never_scores, shift_at)
            a, b = report["fg_ari"][args.adapt], report["fg_ari"]["never"]
            report["margin"] = {
                seg: (a[seg]["mean"] - b[seg]["mean"]) if a[seg]["mean"] is not None and b[seg]["mean"] is not None else None
                for seg in a
            }
            report["margin_note"] = (
                f"mean FG-ARI of adapt={args.adapt!r} minus predict-only (adapt='never') on the same frames; "
                "frames are strongly correlated, so no per-frame confidence interval is given"
            )
    if "fg_ari" in report:
        for name, segs in report["fg_ari"].items():
            print(f"FG-ARI {name:>8}: " + ", ".join(f"{k} {v['mean']:.3f} ({v['frames']} frames)" for k, v in segs.items() if v["mean"] is not None))
        if "margin" in report:
            print("margin (adapted - predict-only): " + ", ".join(f"{k} {v:+.3f}" for k, v in report["margin"].items() if v is not None))
    report["timing"] = {
        "device": str(rt.device),
        "hardware": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
    }
    if args.frame_png:
        if kept is None or kept.annotated is None:
            print(f"warning: frame {frame_index} was not processed; no {args.frame_png} written", file=sys.stderr)
        else:
            tiles = [("input", kept.result.image)]
            if kept_never is not None and kept_never.annotated is not None:
                tiles.append(("predict only", kept_never.annotated))
            tiles.append((f"adapt={args.adapt}, frame {kept.index}", kept.annotated))
            save_png(args.frame_png, panel(tiles, scale=2))
            print(f"wrote {args.frame_png}")
            report["frame_png"] = {"path": args.frame_png, "index": kept.index}
    if args.out:
        report["annotated"] = _check_output(args.out, source, stats)
        a = report["annotated"]
        print(
            f"wrote {args.out}: {a['frames']} frames {a['size'][1]}x{a['size'][0]} at {a['fps']:g} fps "
            f"(source: {a['source_frames']} frames {a['source_size'][1]}x{a['source_size'][0]})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _check_output(out: str, source: str, st: StreamStats) -> dict[str, Any]:
    """Read the annotated video back: its frame count, size and rate next to the source's."""
    from tta_runtime.inputs import _import_cv2

    cv2 = _import_cv2()

    def probe(path: str) -> tuple[int, list[int], float]:
        cap = cv2.VideoCapture(path)
        n, size = 0, [0, 0]
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            n, size = n + 1, list(frame.shape[:2])
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        cap.release()
        return n, size, fps

    n, size, fps = probe(out)
    src_n, src_size, _ = probe(source) if st.source_kind == "file" else (st.frames_processed, list(st.frame_size or (0, 0)), 0)
    return {
        "path": out, "frames": n, "size": size, "fps": fps, "source_frames": src_n, "source_size": src_size,
        "same_count_and_size": n == src_n and size == src_size,
    }


def _print_stats(st: StreamStats) -> None:
    d = st.to_dict()
    f, lat = d["frames"], d["latency_ms"]
    print(
        f"{st.source}: {f['in']} frames in, {f['processed']} processed, {f['dropped']} dropped, {f['invalid']} invalid, "
        f"{f['unreadable']} unreadable; stop: {st.stop_reason}"
    )
    if f["processed"]:
        print(
            f"latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms; {d['fps']:.1f} fps; "
            f"{d['adaptation']['steps_per_frame_mean']:.2f} steps/frame; resets {dict(st.resets) or 'none'}"
        )


def _cmd_bench_stream(args: argparse.Namespace) -> int:
    import json
    import shlex

    report = bench_stream(
        args.model, frames=args.frames, steps_per_frame=args.steps_per_frame, size=args.size, recipe=args.recipe,
        warmup=args.warmup, progress=True, restore_prob=args.restore_prob,
    )
    report["command"] = "tta-runtime " + shlex.join(args.argv)
    print(
        f"{report['frames_processed']} frames at {report['fps']:.1f} fps, {report['steps_per_frame']} step(s)/frame: RSS "
        f"{report['rss_mb_at_warmup']:.1f} MiB at frame {report['warmup_frames']}, peak after "
        f"{report['peak_rss_mb_after_warmup']:.1f} MiB, growth {report['peak_rss_growth_mb']:+.1f} MiB "
        f"(target < {report['target_growth_mb']} MiB)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
