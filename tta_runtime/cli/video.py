"""`tta-runtime stream`: segment a video frame by frame with continual adaptation (`tta_runtime.video`).

The command draws its own progress bar, one for the whole command (both passes with `--compare`),
and asks the library for none.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tta_runtime.cli.common import (
    add_threads,
    command_line,
    echo,
    fail,
    output_path,
    progress,
    write_json,
)
from tta_runtime.errors import ConfigError

_VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")  # what the annotated-video writer (fourcc mp4v) writes
_MAX_GENERATED_FRAMES = 100_000

if TYPE_CHECKING:
    from tta_runtime.runtime import Runtime
    from tta_runtime.video import StreamFrame, StreamStats


def add_stream(s: argparse.ArgumentParser) -> None:
    from tta_runtime.data.video import SHIFT_KINDS
    from tta_runtime.video import (
        ADAPT_MODES,
        DEFAULT_RECIPE,
        DEFAULT_STEPS_PER_FRAME,
        POLICIES,
    )

    s.description = (
        "Segment a video frame by frame with continual test-time adaptation; write an annotated video and "
        "statistics. With --generate, first write a procedural video with a distribution shift half-way (and its "
        "masks, OUT.npz) and stream that."
    )
    s.add_argument("source", nargs="?", default=None, help="video file, camera index or URL (rtsp://, http://)")
    s.add_argument("--out", default=None, help="annotated video to write (.mp4, fourcc mp4v)")
    s.add_argument("--model", default=None)
    s.add_argument("--device", default="cpu")
    add_threads(s)
    s.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"adaptation recipe (default {DEFAULT_RECIPE})")
    s.add_argument("--adapt", choices=ADAPT_MODES, default="always")
    s.add_argument("--steps-per-frame", type=int, default=DEFAULT_STEPS_PER_FRAME)
    s.add_argument("--restore-prob", type=float, default=None,
                   help="stochastic restore per step and weight (CoTTA); default: the recipe's (slot_tta_stream: 0.01)")
    s.add_argument("--latency-budget-ms", type=float, default=None)
    s.add_argument("--no-reset-on-cut", dest="reset_on_cut", action="store_false")
    s.add_argument("--no-reset-on-collapse", dest="reset_on_collapse", action="store_false")
    s.add_argument("--reset-every", type=int, default=None, help="also reset the weights every N processed frames")
    s.add_argument("--policy", choices=POLICIES, default=None, help="default: all for files, latest for cameras/URLs")
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
    s.set_defaults(func=_stream)


class _FrameBar:
    """One bar over every processed frame of every pass; its length is known once a file's first frame is read."""

    def __init__(self, args: argparse.Namespace, passes: int) -> None:
        self.bar: Any = None
        if progress(args):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, desc="stream", unit="frame")
        self.passes, self.stride, self.max_frames = passes, args.stride, args.max_frames
        self.sized = False

    def frame(self, st: StreamStats) -> None:
        if self.bar is None:
            return
        if not self.sized:
            self.sized = True
            per_pass = None if st.source_frames is None else -(-st.source_frames // self.stride)
            if self.max_frames is not None:
                per_pass = self.max_frames if per_pass is None else min(per_pass, self.max_frames)
            if per_pass is not None:
                self.bar.total = per_pass * self.passes
                self.bar.refresh()
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(
    rt: Runtime, source: str, frame_index: int | None, bar: _FrameBar, **kw: Any
) -> tuple[StreamStats, list[tuple[int, float]], StreamFrame | None]:
    """One pass: the stats, (index, FG-ARI) per frame, and the frame at `frame_index`."""
    from tta_runtime.video import stream

    scores: list[tuple[int, float]] = []
    kept = None
    with stream(rt, source, progress=False, **kw) as s:
        for f in s:
            bar.frame(s.stats)
            if f.fg_ari is not None:
                scores.append((f.index, f.fg_ari))
            if f.index == frame_index:
                kept = f
    return s.stats, scores, kept


def _segments(scores: list[tuple[int, float]], shift_at: int | None) -> dict[str, Any]:
    import numpy as np

    def mean(vals: list[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(vals)) if vals else None, "frames": len(vals)}

    out = {"all": mean([v for _, v in scores])}
    if shift_at is not None:
        out["before_shift"] = mean([v for i, v in scores if i < shift_at])
        out["after_shift"] = mean([v for i, v in scores if i >= shift_at])
    return out


def _source(args: argparse.Namespace) -> tuple[str | None, str | None, Any, int]:
    """The video to stream and its ground truth (generating them with --generate); an exit status != 0 on misuse."""
    if args.generate:
        if args.source is not None:
            return None, None, None, fail("give a SOURCE or --generate OUT.mp4, not both")
        from tta_runtime.data.video import make_shifted_video

        gen = make_shifted_video(
            args.generate, args.frames, shift_at=args.shift_at, kind=args.shift_kind, size=args.size, fps=args.fps,
            seed=args.seed,
        )
        echo(
            args,
            f"wrote {gen.video} ({gen.frames} frames, {gen.size}x{gen.size}, {gen.kind} from frame {gen.shift_at}, "
            f"seed {gen.seed}) and {gen.masks}",
        )
        return str(gen.video), args.ground_truth or str(gen.masks), gen, 0
    if args.source is None:
        return None, None, None, fail("give a SOURCE (video file, camera index, URL) or --generate OUT.mp4")
    if args.generate_only:
        return None, None, None, fail("--generate-only needs --generate OUT.mp4")
    return args.source, args.ground_truth, None, 0


def _stream(args: argparse.Namespace) -> int:
    import platform

    import torch

    from tta_runtime.runtime import Runtime

    for value, flag, suffixes in ((args.frame_png, "--frame-png", (".png",)), (args.out, "--out", _VIDEO_SUFFIXES),
                                  (args.generate, "--generate", (".mp4",))):
        output_path(value, flag, suffixes)
    if args.generate and args.frames > _MAX_GENERATED_FRAMES:
        raise ConfigError(f"--frames must be at most {_MAX_GENERATED_FRAMES:,} for a generated video; got {args.frames}")
    source, truth, generated, status = _source(args)
    if status or args.generate_only:
        return status
    shift_at, n_truth = _truth_info(truth) if truth is not None else (None, None)
    frame_index = args.frame_index
    if args.frame_png and frame_index is None:
        frame_index = (shift_at + 3 * (n_truth - shift_at) // 4) if shift_at is not None and n_truth else 0

    rt = Runtime.from_pretrained(args.model, device=args.device, threads=args.threads)
    opts = {
        "recipe": args.recipe, "steps_per_frame": args.steps_per_frame, "latency_budget_ms": args.latency_budget_ms,
        "restore_prob": args.restore_prob, "reset_on_cut": args.reset_on_cut, "reset_on_collapse": args.reset_on_collapse,
        "reset_every": args.reset_every, "policy": args.policy, "stride": args.stride, "buffer": args.buffer,
        "max_frames": args.max_frames, "ground_truth": truth, "read_timeout_s": args.read_timeout_s,
        "annotate": bool(args.frame_png),
    }
    bar = _FrameBar(args, passes=2 if args.compare else 1)
    try:
        stats, scores, kept = _run(rt, source, frame_index, bar, adapt=args.adapt, out=args.out, **opts)
        if args.compare:
            never_stats, never_scores, kept_never = _run(rt, source, frame_index, bar, adapt="never", **opts)
    finally:
        bar.close()
    report: dict[str, Any] = {
        "command": command_line(args),
        "model": rt.name,
        "video": generated.to_dict() if generated else {"source": stats.source},
        "stats": stats.to_dict(),
    }
    echo(args, *_stats_lines(stats))
    if scores:
        report["fg_ari"] = {args.adapt: _segments(scores, shift_at)}
    if not args.compare:
        kept_never = None
    else:
        report["predict_only_stats"] = never_stats.to_dict()
        if scores:
            _add_margin(report, args.adapt, _segments(never_scores, shift_at))
    for name, segs in report.get("fg_ari", {}).items():
        echo(args, f"FG-ARI {name:>8}: " + ", ".join(
            f"{k} {v['mean']:.3f} ({v['frames']} frames)" for k, v in segs.items() if v["mean"] is not None))
    if "margin" in report:
        echo(args, "margin (adapted - predict-only): " + ", ".join(
            f"{k} {v:+.3f}" for k, v in report["margin"].items() if v is not None))
    report["timing"] = {
        "device": str(rt.device),
        "hardware": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
    }
    if args.frame_png:
        _frame_png(args, report, kept, kept_never, frame_index)
    if args.out:
        a = report["annotated"] = _check_output(args.out, source, stats)
        echo(
            args,
            f"wrote {args.out}: {a['frames']} frames {a['size'][1]}x{a['size'][0]} at {a['fps']:g} fps "
            f"(source: {a['source_frames']} frames {a['source_size'][1]}x{a['source_size'][0]})",
        )
    write_json(args, report)
    return 0


def _truth_info(truth: str) -> tuple[int | None, int | None]:
    """The shift frame and the frame count of a ground-truth .npz (what --generate writes), checked."""
    import numpy as np

    from tta_runtime.errors import InvalidInputError
    from tta_runtime.video import load_ground_truth

    load_ground_truth(truth)  # a missing, special, pickled or malformed file fails here, with what it expects
    if not str(truth).endswith(".npz"):
        return None, None
    with np.load(truth, allow_pickle=False) as data:
        n_truth = len(data["instances"])
        if "shift_at" not in data:
            return None, n_truth
        shift = data["shift_at"]
        if shift.shape != () or shift.dtype.kind not in "iu" or not 0 <= int(shift) <= n_truth:
            raise InvalidInputError(f"ground truth {truth!r}: 'shift_at' must be one frame index in 0..{n_truth}, "
                                    f"got {shift.dtype} of shape {shift.shape}")
        return int(shift), n_truth


def _add_margin(report: dict[str, Any], adapt: str, never: dict[str, Any]) -> None:
    report["fg_ari"]["never"] = never
    a, b = report["fg_ari"][adapt], never
    report["margin"] = {
        seg: (a[seg]["mean"] - b[seg]["mean"]) if a[seg]["mean"] is not None and b[seg]["mean"] is not None else None
        for seg in a
    }
    report["margin_note"] = (
        f"mean FG-ARI of adapt={adapt!r} minus predict-only (adapt='never') on the same frames; "
        "frames are strongly correlated, so no per-frame confidence interval is given"
    )


def _frame_png(args: argparse.Namespace, report: dict[str, Any], kept: Any, kept_never: Any, index: int | None) -> None:
    import sys

    from tta_runtime.visual import panel, save_png

    if kept is None or kept.annotated is None:
        print(f"warning: frame {index} was not processed; no {args.frame_png} written", file=sys.stderr)
        return
    tiles = [("input", kept.result.image)]
    if kept_never is not None and kept_never.annotated is not None:
        tiles.append(("predict only", kept_never.annotated))
    tiles.append((f"adapt={args.adapt}, frame {kept.index}", kept.annotated))
    save_png(args.frame_png, panel(tiles, scale=2))
    echo(args, f"wrote {args.frame_png}")
    report["frame_png"] = {"path": args.frame_png, "index": kept.index}


def _check_output(out: str, source: str, st: StreamStats) -> dict[str, Any]:
    """Read the annotated video back: its frame count, size and rate next to the source's."""
    from tta_runtime.device import import_cv2

    cv2 = import_cv2()

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


def _stats_lines(st: StreamStats) -> list[str]:
    d = st.to_dict()
    f, lat = d["frames"], d["latency_ms"]
    lines = [
        (f"{st.source}: {f['in']} frames in, {f['processed']} processed, {f['dropped']} dropped, {f['invalid']} invalid, "
         f"{f['unreadable']} unreadable; stop: {st.stop_reason}")
    ]
    if f["processed"]:
        lines.append(
            f"latency p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms; {d['fps']:.1f} fps; "
            f"{d['adaptation']['steps_per_frame_mean']:.2f} steps/frame; resets {dict(st.resets) or 'none'}"
        )
    return lines
