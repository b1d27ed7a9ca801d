"""The stream: one frame at a time through checks, scene cuts, continual adaptation, monitors and output.

`stream()` validates every option at once (a bad option is a `ConfigError`, an unusable source a
`StreamError`, both before any thread starts) and returns a `Stream`, an iterator of `StreamFrame`s
that owns the reader thread, the video writer and one progress bar for the whole stream, and releases
all three however the stream ends (see the package docstring for what is decided on which error).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tta_runtime.device import import_cv2
from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.video.annotate import GroundTruth, _open_writer, annotate_frame, load_ground_truth
from tta_runtime.video.monitors import CollapseMonitor, SceneCutDetector
from tta_runtime.video.sources import (
    _JOIN_TIMEOUT_S, AUTO_POLICY, Source, StreamError, _End, _Failure, _Frame, _Reader, _resolve_source, _Source,
)
from tta_runtime.video.stats import StreamStats

if TYPE_CHECKING:
    import os

    from tta_runtime.config import AdaptConfig
    from tta_runtime.result import Result

log = logging.getLogger(__name__)

# Constant lr, 50 % pixels per step, frozen encoder (adapters/slot_tta_stream.toml). Not slot_tta_fast:
# that per-image preset warms up and decays its lr within each call, i.e. within every frame here.
DEFAULT_RECIPE = "slot_tta_stream"
# Chosen on a generated tuning video, never on the reported seed: with stochastic restore, more steps per
# frame helped the shifted half up to this many; slot_tta_fast's per-call lr schedule and the
# full-parameter slot_tta recipe (which drifts) did worse. `latency_budget_ms` caps the cost per frame.
DEFAULT_STEPS_PER_FRAME = 10
POLICIES = ("all", "latest")  # 'all': every frame is processed; 'latest': stale frames are dropped
ADAPT_MODES = ("always", "never", "when_ood")
_WARN_EVERY = 100  # after the first 5, one invalid-frame warning per this many


class StreamRuntime(Protocol):
    """What a stream uses of a `tta_runtime.Runtime` (spelled out so that video/ never imports runtime.py)."""

    folder: Any
    recipe: AdaptConfig
    calibration: Any

    def reset(self) -> None: ...

    def adapt_and_predict(self, image: Any, *, adapt: str | None = None, **overrides: Any) -> Any: ...


@dataclass
class StreamFrame:
    """One processed frame.

    `index`: the frame's position in the source (0-based; stride and drops leave gaps). `result`: the
    runtime's `Result` at the frame's own size. `latency_ms`: capture -> result; `process_ms`:
    dequeue -> result. `steps`: adaptation steps run on this frame. `reset`: why the model was reset
    while processing it ("scene cut" before adapting, "collapse: ..." after), else None. `fg_ari`:
    against the ground truth, when given. `annotated`: (H, W, 3) uint8 RGB when `out` (or `annotate`)
    is set, else None.
    """

    index: int
    result: Result
    latency_ms: float
    process_ms: float
    steps: int
    reset: str | None = None
    fg_ari: float | None = None
    annotated: np.ndarray | None = field(default=None, repr=False)


class Stream:
    """An iterator of `StreamFrame`s over a video source; `stats` fills as it runs.

    Use it as a context manager (or call `close()`) to stop early: the reader thread is joined, the
    annotated video is finalised and the runtime is reset to its loaded weights. Leaving a `for` loop
    with `break` does not close a plain iterator; the `with` block does. Not thread-safe: iterate it
    from one thread.
    """

    def __init__(self, runtime: StreamRuntime, source: _Source, opts: dict[str, Any]) -> None:
        self.runtime, self.source, self._opts = runtime, source, opts
        self.stats = StreamStats(
            source=source.name, source_kind=source.kind, policy=opts["policy"], stride=opts["stride"],
            buffer=opts["buffer"], adapt=opts["adapt"], recipe=opts["recipe_cfg"].name,
            steps_per_frame=opts["steps_per_frame"], latency_budget_ms=opts["latency_budget_ms"],
            reset_every=opts["reset_every"], restore_prob=opts["recipe_cfg"].restore_prob,
        )
        self._recipe = opts["recipe_cfg"].model_dump()
        self._cut = SceneCutDetector(opts["cut_threshold"])
        self._collapse = CollapseMonitor()
        self._truth: Callable[[int], np.ndarray | None] | None = None
        self._shape: tuple[int, ...] | None = None  # of the first valid frame; every frame must match it
        options = getattr(runtime, "options", None)
        self._max_pixels = int(getattr(options, "max_pixels", None) or 2**62)  # larger frames are skipped
        self._writer: Any = None
        self._bar: Any = None
        self._latched = False  # 'when_ood': adapting since the loaded model flagged a frame (until a reset)
        self._adapted = False  # steps were taken since the last reset
        self._overhead_ms: float | None = None  # per-frame time outside the adaptation loop (EMA)
        self._fps: float | None = None  # frames out per second (EMA), for the HUD
        self._last_done: float | None = None
        self._gen = self._frames()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamFrame:
        return next(self._gen)

    def close(self) -> None:
        """Stop the stream now; safe to call more than once, and before the first frame."""
        self._gen.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a stream dropped half-way still joins its reader
        try:
            self._gen.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # -- the loop: one frame at a time, top to bottom -------------------------------------------------
    def _frames(self) -> Iterator[StreamFrame]:
        o, st = self._opts, self.stats
        reader = _Reader(
            self.source, policy=o["policy"], stride=o["stride"], buffer=o["buffer"],
            read_timeout_s=o["read_timeout_s"], reconnect=o["reconnect"], backoff_s=o["backoff_s"],
            buffer_given=o["buffer_given"],
        )
        t_start = time.perf_counter()
        self.runtime.reset()  # a stream starts from the loaded weights
        reader.start()
        try:
            if o["ground_truth"] is not None:
                self._truth = load_ground_truth(o["ground_truth"])
            while True:
                item = reader.next()
                self._sync(reader)
                if isinstance(item, _Failure):
                    st.stop_reason = f"error: {item.error}"
                    if isinstance(item.error, StreamError):
                        raise item.error
                    raise StreamError(f"video source {self.source.name!r} failed: {item.error!r}") from item.error
                if isinstance(item, _End):
                    st.stop_reason = item.reason
                    if item.warning:
                        st.warn(item.warning)
                    break
                t_deq = time.perf_counter()
                rgb = self._check_frame(item)
                if rgb is None:
                    continue
                if self._shape is None:
                    self._first_frame(rgb, reader)
                reset = self._reset_on_cut(rgb)
                res, steps = self._adapt_and_predict(rgb, item.index)
                why = self._reset_on_collapse(res, item.index)
                if why is not None:
                    reset = f"collapse: {why}" if reset is None else f"{reset}; collapse: {why}"
                score = self._score(item.index, res)
                annotated = self._annotate_and_write(res, steps, reset, t_deq)
                t_done = time.perf_counter()
                frame = StreamFrame(
                    item.index, res, 1000 * (t_done - item.t_capture), 1000 * (t_done - t_deq), steps, reset, score, annotated,
                )
                self._record(frame, t_done)
                st.wall_s = time.perf_counter() - t_start
                yield frame
                if o["max_frames"] is not None and st.frames_processed >= o["max_frames"]:
                    st.stop_reason = "max_frames"
                    break
        except GeneratorExit:
            st.stop_reason = st.stop_reason or "closed by the caller"
            raise
        except BaseException as e:
            st.stop_reason = st.stop_reason or f"error: {e!r}"
            raise
        finally:
            joined = reader.close()
            self._sync(reader)
            if not joined:
                st.warn(
                    f"the reader of {self.source.name!r} is still blocked inside the source after "
                    f"{_JOIN_TIMEOUT_S:g} s; left behind as a daemon thread"
                )
            if self._writer is not None:
                self._writer.release()
            if self._bar is not None:
                self._bar.close()
            self.runtime.reset()  # the runtime leaves the stream with its loaded weights
            st.wall_s = time.perf_counter() - t_start

    # -- the steps ------------------------------------------------------------------------------------
    def _check_frame(self, item: _Frame) -> np.ndarray | None:
        """The frame as (H, W, 3) uint8 RGB, or None (skipped, counted, warned) if it does not fit."""
        frame, shape, st = item.image, self._shape, self.stats
        problem = None
        if not isinstance(frame, np.ndarray):
            problem = f"a {type(frame).__name__}, not a numpy array"
        elif frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) < 1:
            problem = f"dtype {frame.dtype}, shape {frame.shape}"
        elif frame.shape[0] * frame.shape[1] > self._max_pixels:
            problem = (f"{frame.shape[0]}x{frame.shape[1]} = {frame.shape[0] * frame.shape[1]:,} pixels, above the "
                       f"runtime's max_pixels {self._max_pixels:,}")
        elif shape is not None and frame.shape != shape:
            problem = f"shape {frame.shape}"
        if problem is not None:
            st.frames_invalid += 1
            expected = f"{shape} uint8 like the first frame" if shape is not None else "(H, W, 3) uint8"
            if st.frames_invalid <= 5 or st.frames_invalid % _WARN_EVERY == 0:
                st.warn(f"frame {item.index} skipped: {problem}; expected {expected} ({st.frames_invalid} skipped so far)")
            return None
        if self._opts["channel_order"] == "bgr":
            cv2 = import_cv2()
            return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return frame

    def _first_frame(self, rgb: np.ndarray, reader: _Reader) -> None:
        """The first valid frame fixes the stream's size; the source's rate and length are known now."""
        o, st = self._opts, self.stats
        self._shape = rgb.shape
        st.frame_size = (rgb.shape[0], rgb.shape[1])
        st.source_fps, st.source_frames = reader.info.get("fps"), reader.info.get("frame_count")
        if o["progress"]:
            from tqdm.auto import tqdm

            total = None if st.source_frames is None else -(-st.source_frames // o["stride"])
            if o["max_frames"] is not None:
                total = o["max_frames"] if total is None else min(total, o["max_frames"])
            self._bar = tqdm(total=total, desc="stream", unit="frame")

    def _reset(self) -> None:
        self.runtime.reset()
        self._collapse.reset()
        self._latched = self._adapted = False

    def _reset_on_cut(self, rgb: np.ndarray) -> str | None:
        """Reset before adapting on a frame that starts a new scene (or every `reset_every` frames)."""
        n, every = self.stats.frames_processed, self._opts["reset_every"]
        if self._opts["reset_on_cut"] and self._cut.update(rgb) and n > 0:
            self._reset()
            self.stats.resets["scene_cut"] += 1
            return "scene cut"
        if every is not None and n > 0 and n % every == 0:
            self._reset()
            self.stats.resets["periodic"] += 1
            return "periodic"
        return None

    def _adapt_and_predict(self, rgb: np.ndarray, index: int) -> tuple[Result, int]:
        """Warm-started continual adaptation within the step / latency budget and the OOD gate."""
        o = self._opts
        gate = o["adapt"]
        if gate == "when_ood":  # the gate is asked only while the weights are still the loaded ones
            gate = "always" if self._latched else "when_ood"
        call = dict(self._recipe, seed=index)  # new pixel subsets every frame, reproducibly
        if o["latency_budget_ms"] is not None and gate != "never":
            left = o["latency_budget_ms"] - (self._overhead_ms or 0.0)
            if left <= 0:
                gate = "never"  # the frame's fixed cost already fills the budget
            else:
                call["time_budget_ms"] = left
        res = self.runtime.adapt_and_predict(rgb, adapt=gate, **call)
        steps = res.adaptation.steps_run if res.adaptation is not None else 0
        self._adapted |= steps > 0
        if o["adapt"] == "when_ood" and (steps > 0 or res.is_ood):
            self._latched = True
        return res, steps

    def _reset_on_collapse(self, res: Result, index: int) -> str | None:
        why = self._collapse.update(res) if self._opts["reset_on_collapse"] else None
        if why is None or not self._adapted:  # nothing adapted since the last reset: nothing to undo
            return None
        self._reset()  # takes effect from the next frame; this frame's result stands
        self.stats.resets["collapse"] += 1
        log.info("frame %d: reset after collapse: %s", index, why)
        return why

    def _score(self, index: int, res: Result) -> float | None:
        gt = self._truth(index) if self._truth is not None else None
        if gt is None:
            return None
        from tta_runtime.metrics import fg_ari

        if gt.shape != res.segmentation.shape:
            raise InvalidInputError(f"ground truth for frame {index} is {gt.shape}, the frame is {res.segmentation.shape}")
        return fg_ari(gt, res.segmentation)

    def _annotate_and_write(self, res: Result, steps: int, reset: str | None, t_deq: float) -> np.ndarray | None:
        o = self._opts
        if o["out"] is None and not o["annotate"]:
            return None
        ms = 1000 * (time.perf_counter() - t_deq)
        hud = [f"{self._fps:.1f} fps {ms:.0f} ms" if self._fps else f"{ms:.0f} ms", f"OOD {res.ood_score:+.1f} steps {steps}"]
        if reset:
            hud.append("RESET " + reset.split(":")[0])
        annotated = annotate_frame(res, hud)
        if o["out"] is not None:
            cv2 = import_cv2()
            if self._writer is None:
                self._writer = _open_writer(o["out"], o["fps"] or self.stats.source_fps, o["stride"], annotated.shape)
            self._writer.write(cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))  # the writer takes BGR
            self.stats.frames_written += 1
        return annotated

    def _record(self, f: StreamFrame, t_done: float) -> None:
        st, rep = self.stats, f.result.adaptation
        loop_ms = 1000 * (rep.timings.get("adapt_s", 0.0) if rep is not None else 0.0)
        fixed = f.process_ms - loop_ms
        self._overhead_ms = fixed if self._overhead_ms is None else 0.8 * self._overhead_ms + 0.2 * fixed
        if self._last_done is not None:
            rate = 1.0 / max(t_done - self._last_done, 1e-6)
            self._fps = rate if self._fps is None else 0.9 * self._fps + 0.1 * rate
        self._last_done = t_done
        st.frames_processed += 1
        st.adapt_steps += f.steps
        st.frames_adapted += f.steps > 0
        st.steps_hist[f.steps] += 1
        st.steps_series.add(f.index, f.steps)
        st.latency.add(f.latency_ms)
        st.process.add(f.process_ms)
        st.latency_series.add(f.index, f.latency_ms)
        st.ood_sum += f.result.ood_score
        st.ood_flagged += bool(f.result.is_ood)
        if f.fg_ari is not None:
            st.fg_ari_sum += f.fg_ari
            st.fg_ari_n += 1
            st.fg_ari_series.add(f.index, f.fg_ari)
        if self._bar is not None:
            self._bar.update(1)

    def _sync(self, reader: _Reader) -> None:
        st = self.stats
        st.frames_in, st.frames_dropped = reader.frames_in, reader.dropped
        st.policy, st.buffer = reader.policy, reader.queue.maxsize  # a URL's 'auto' is decided once it is open
        st.frames_skipped_stride, st.frames_unreadable, st.reconnects = reader.skipped_stride, reader.unreadable, reader.reconnects


def stream(
    runtime: StreamRuntime, source: Source, *, adapt: str | None = None, recipe: str | None = DEFAULT_RECIPE,
    steps_per_frame: int = DEFAULT_STEPS_PER_FRAME, latency_budget_ms: float | None = None,
    reset_on_cut: bool = True, reset_on_collapse: bool = True, reset_every: int | None = None,
    policy: str | None = None, stride: int = 1, buffer: int | None = None, max_frames: int | None = None, ground_truth: GroundTruth | None = None,
    channel_order: str | None = None, out: str | os.PathLike[str] | None = None, fps: float | None = None,
    annotate: bool = False, cut_threshold: float = 0.3, read_timeout_s: float = 10.0, reconnect: int = 5,
    backoff_s: float = 0.5, progress: bool = False, restore_prob: float | None = None, **unknown: Any,
) -> Stream:
    """Segment a video frame by frame, adapting continually; returns a `Stream` of `StreamFrame`s.

    Args:
        runtime: the model; used in continual mode, reset to its loaded weights at the start and the end
            of the stream (and on scene cuts and collapse). Do not share it with other callers meanwhile.
        source: a video file, a camera index, a URL OpenCV opens (rtsp://, http(s)://), an iterable of
            (H, W, 3) uint8 frames, or an (N, H, W, 3) array.
        adapt: "always", "never" (predict only), or "when_ood": adapt from the first frame the loaded
            model's calibrated OOD gate flags until the next reset (the gate is not asked again once the
            weights have moved: an adapted model fits the shift and would stop flagging it). Default:
            "always" ("when_ood" saves steps on a shifted stretch but gives up the gain on
            in-distribution frames, where adaptation also helps).
        recipe: adaptation recipe (name or .toml; default slot_tta_stream); None: the runtime's own. Its
            mode becomes "continual" and its `steps` `steps_per_frame`.
        steps_per_frame: adaptation steps per frame (at most; the latency budget may stop earlier).
        restore_prob: stochastic restore (CoTTA): after every step each adapted weight returns to its loaded
            value with this probability, which bounds how far thousands of frames can pull the model.
            None: the recipe's (slot_tta_stream: 0.01, CoTTA's value).
        latency_budget_ms: per-frame budget; the loop gets what the frame's other work (measured on
            previous frames) leaves, and stops after the step that crosses it.
        reset_on_cut / reset_on_collapse: reset the weights on a scene cut (`SceneCutDetector`,
            `cut_threshold`) / when `CollapseMonitor` signals. reset_every: also reset every n processed
            frames (as RDumb does), a bound on drift over long streams; None: never.
        policy: "all" (every frame; default for files, file:// URLs, iterables, and http(s):// or ftp://
            URLs that declare a frame count once open: files served over the network) or "latest" (drop
            stale frames; default for cameras, rtsp:// and other live streams). buffer: frames waiting in the queue (default 4 for "all", 1
            for "latest": a frame then waits for at most the one being processed). stride: process
            every n-th frame.
        max_frames: stop after this many processed frames.
        ground_truth: per-frame instance maps (see `load_ground_truth`) -> `fg_ari` per frame and in stats.
        channel_order: of an iterable's frames, "rgb" (default) or "bgr"; OpenCV sources are always BGR.
        out: write the annotated video here (mp4v), at the source's size and rate (`fps` when the source
            has none; divided by `stride`). annotate: fill `StreamFrame.annotated` without writing.
        read_timeout_s: no frame for this long is a stall (`StreamError`). reconnect / backoff_s: reopen
            attempts for a live source that drops, waiting backoff_s, 2x, 4x ... (at most 8 s) before each.
        progress: one tqdm bar for the whole stream (its total: the frames to process, when known).

    Raises (immediately): `ConfigError` for a bad option (an unknown keyword included), `StreamError` for a source that cannot be used
    (a missing file, an unusable object). While iterating: `StreamError` (cannot open, stall, lost).
    """
    from tta_runtime.config import check_keywords, keywords_of, with_overrides
    from tta_runtime.hub import load_recipe

    check_keywords(unknown, keywords_of(stream, skip=2), "stream()")
    src = _resolve_source(source)
    adapt = "always" if adapt is None else adapt
    if adapt not in ADAPT_MODES:
        raise ConfigError(f"adapt must be one of {ADAPT_MODES}, got {adapt!r}")
    if adapt == "when_ood" and runtime.calibration is None:
        raise ConfigError(
            f"adapt='when_ood' needs an OOD calibration in the model folder ({runtime.folder}/ood); "
            "run `tta-runtime ood fit`, or use adapt='always'"
        )
    if policy is not None and policy not in POLICIES:
        raise ConfigError(f"policy must be 'all' (every frame) or 'latest' (drop stale frames), got {policy!r}")
    # an http(s)/ftp URL is decided once it is open: one that declares a frame count is a file (every frame)
    policy = policy or ("all" if not src.opencv or src.kind == "file" else AUTO_POLICY if src.served_file else "latest")
    buffer_given = buffer is not None
    buffer = (1 if policy == "latest" else 4) if buffer is None else buffer
    for name, value, lo in (("stride", stride, 1), ("buffer", buffer, 1), ("steps_per_frame", steps_per_frame, 0), ("reconnect", reconnect, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
    if reset_every is not None and (isinstance(reset_every, bool) or not isinstance(reset_every, (int, np.integer)) or reset_every < 1):
        raise ConfigError(f"reset_every must be an int >= 1 or None, got {reset_every!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
        raise ConfigError(f"max_frames must be an int >= 1 or None, got {max_frames!r}")
    for name, value in (("latency_budget_ms", latency_budget_ms), ("fps", fps)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
    for name, value in (("read_timeout_s", read_timeout_s), ("backoff_s", backoff_s)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    if channel_order is None:
        channel_order = "bgr" if src.opencv else "rgb"
    elif channel_order not in ("rgb", "bgr"):
        raise ConfigError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    elif src.opencv and channel_order != "bgr":
        raise ConfigError("channel_order applies to iterables of frames; OpenCV sources always deliver BGR")
    base = runtime.recipe if recipe is None else load_recipe(recipe)
    overrides: dict[str, Any] = {"mode": "continual", "steps": int(steps_per_frame), "time_budget_ms": None}
    if restore_prob is not None:
        overrides["restore_prob"] = restore_prob
    recipe_cfg = with_overrides(base, overrides, "recipe")
    SceneCutDetector(cut_threshold)  # validates the threshold now rather than at the first frame
    opts = {
        "adapt": adapt, "recipe_cfg": recipe_cfg, "steps_per_frame": int(steps_per_frame),
        "latency_budget_ms": latency_budget_ms, "reset_on_cut": bool(reset_on_cut),
        "reset_on_collapse": bool(reset_on_collapse), "reset_every": None if reset_every is None else int(reset_every),
        "policy": policy, "stride": int(stride), "buffer": int(buffer), "buffer_given": buffer_given,
        "max_frames": None if max_frames is None else int(max_frames), "ground_truth": ground_truth,
        "channel_order": channel_order, "out": out, "fps": fps, "annotate": bool(annotate),
        "cut_threshold": cut_threshold, "read_timeout_s": float(read_timeout_s), "reconnect": int(reconnect),
        "backoff_s": float(backoff_s), "progress": bool(progress),
    }
    return Stream(runtime, src, opts)
