"""Streaming video: per-frame segmentation with continual test-time adaptation.

One frame's way through, top to bottom:

    source (video file | camera index | rtsp:// or http(s):// URL | iterable of frames)
      -> reader thread: read, keep every `stride`-th frame, bounded queue with a policy
         ('all': wait for room, every frame is processed; 'latest': drop the oldest, for live sources),
         reconnect with back-off when a live source drops, end at the end of a file
      -> check: (H, W, 3) uint8 like the first frame, else skipped with a warning; BGR -> RGB
      -> scene-cut test (colour-histogram distance to the previous frame) -> runtime.reset()
         (and, optionally, every `reset_every` frames)
      -> runtime.adapt_and_predict(frame, mode="continual", steps=steps_per_frame, time_budget_ms=...,
         adapt=...): warm start from the previous frame's weights, a step and a latency budget per frame
      -> collapse monitor (non-finite rollback, a sustained loss blow-up, RankMe of the slot masks)
         -> runtime.reset()
      -> FG-ARI against ground truth when given -> annotated frame (masks, outlines, HUD) -> VideoWriter
      -> statistics (bounded memory) -> yield a `StreamFrame`

Public: `stream()` returning a `Stream` (an iterator of `StreamFrame`, a context manager, `.stats`),
`StreamStats`, `StreamFrame`, `StreamError`, `SceneCutDetector`, `CollapseMonitor`, `annotate_frame`,
`load_ground_truth`, `bench_stream`, and `add_cli` (the `stream` command and `bench stream`).

Errors and robustness, decided once:
- a source that cannot be opened: `StreamError` naming the source and what is accepted;
- a file that stops decoding early (truncated or corrupt): up to `_MAX_BAD_READS` unreadable frames in
  a row are skipped and counted, then the stream ends with a warning and `stats.stop_reason` saying so;
- a frame of another size, channel count or dtype than the first one: skipped, counted in
  `stats.frames_invalid`, warned about (the first few times);
- a source that delivers nothing for `read_timeout_s` (stall): `StreamError`, never a hang;
- a live source that drops: reconnect with exponential back-off (`reconnect` attempts), then `StreamError`;
- whatever happens (normal end, `close()`, an exception in the caller's loop or in the model), the
  reader thread is stopped and joined, the video writer is released and the runtime is reset to its
  loaded weights.

`import tta_runtime.video` is light: OpenCV, tqdm, scipy (metrics) are imported when a stream runs.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import queue
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from tta_runtime.errors import ConfigError, InvalidInputError, TTARuntimeError

if TYPE_CHECKING:

    from tta_runtime.result import Result
    from tta_runtime.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = [
    "CollapseMonitor",
    "SceneCutDetector",
    "Stream",
    "StreamError",
    "StreamFrame",
    "StreamStats",
    "annotate_frame",
    "bench_stream",
    "load_ground_truth",
    "stream",
]

Source = Union[str, os.PathLike, int, Iterable[np.ndarray]]
GroundTruth = Union[str, os.PathLike, np.ndarray, Sequence[np.ndarray], Callable[[int], "np.ndarray | None"]]

# Constant lr, 50 % pixels per step, frozen encoder (adapters/slot_tta_stream.toml). Not slot_tta_fast:
# that per-image preset warms up and decays its lr within each call, i.e. within every frame here.
DEFAULT_RECIPE = "slot_tta_stream"
# Chosen on the seed-1 generated video (textured background from frame 150), never on the reported
# seed (scripts/stream_demo.sh, docs/stream/tune.json), with the current default model: slot_tta_stream
# (stochastic restore 0.01) at 10 steps per frame gave the shifted half FG-ARI 0.838 (2 steps 0.763,
# 5 steps 0.787, 5 steps without restore 0.787, predict-only 0.717); slot_tta_fast's per-call lr schedule
# 0.749; the full-parameter slot_tta recipe drifted (0.434). Ten steps cost about 0.3 s a frame at
# 128x128 on one CPU core: `latency_budget_ms` caps it.
DEFAULT_STEPS_PER_FRAME = 10
_POLICIES = ("all", "latest")
_ADAPT = ("always", "never", "when_ood")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_MAX_BAD_READS = 10  # unreadable frames in a row before a file is declared truncated / corrupt
_JOIN_TIMEOUT_S = 5.0  # how long close() waits for a reader blocked inside the source
_MAX_WARNINGS = 20  # warnings kept in the stats (the log has them all, rate-limited)
_WARN_EVERY = 100  # after the first 5, one invalid-frame warning per this many
_EXPECTED = (
    "a video file path, a camera index (int or digit string), an rtsp://, http(s):// or other URL OpenCV "
    "can open, or an iterable of (H, W, 3) uint8 frames"
)


class StreamError(TTARuntimeError):
    """A video source cannot be opened, stalled, dropped for good or failed; the message names it."""


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "file" | "camera" | "url" | "iterable"
    name: str  # for messages
    target: Any  # path str, camera index, URL, or the iterable

    @property
    def opencv(self) -> bool:
        return self.kind != "iterable"


def _resolve_source(source: Any) -> _Source:
    """What kind of source this is; a missing file or an unusable object raises here, before any thread."""
    if isinstance(source, (bool, np.bool_)):
        raise StreamError(f"cannot use {source!r} as a video source; expected {_EXPECTED}")
    if isinstance(source, (int, np.integer)):
        if source < 0:
            raise StreamError(f"camera index must be >= 0, got {source}; expected {_EXPECTED}")
        return _Source("camera", f"camera {int(source)}", int(source))
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode()
        if text.strip().isdigit():
            return _Source("camera", f"camera {int(text)}", int(text))
        if _URL.match(text):
            return _Source("url", _redact(text), text)
        path = Path(text)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise StreamError(f"cannot open video source {text!r}: the file {what}; expected {_EXPECTED}")
        return _Source("file", text, str(path))
    if isinstance(source, np.ndarray):
        if source.ndim == 4:  # (N, H, W, 3): frames stacked in one array
            return _Source("iterable", f"array of {source.shape[0]} frames", source)
        raise StreamError(
            f"cannot use a numpy array of shape {source.shape} as a video source; pass frames stacked as "
            f"(N, H, W, 3), or {_EXPECTED}"
        )
    if isinstance(source, Iterable):
        return _Source("iterable", f"{type(source).__name__} of frames", source)
    raise StreamError(f"cannot use a {type(source).__name__} as a video source; expected {_EXPECTED}")


def _redact(url: str) -> str:
    """The URL without a password, for messages and JSON (rtsp://user:secret@host -> rtsp://user:***@host)."""
    return re.sub(r"(//[^/:@]+:)[^/@]*@", r"\1***@", url)


def _open_capture(source: _Source, timeout_ms: int) -> Any:
    """An opened cv2.VideoCapture for `source`, or StreamError. (A seam for tests that fake live sources.)"""
    from tta_runtime.inputs import _import_cv2

    cv2 = _import_cv2()
    if source.kind == "url":  # FFmpeg honours these: a dead host or stream cannot block a read forever
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        cap = cv2.VideoCapture(source.target, cv2.CAP_FFMPEG, params)
    else:
        cap = cv2.VideoCapture(source.target)
    if not cap.isOpened():
        cap.release()
        hint = {
            "file": "a video file OpenCV can decode (mp4, avi, mkv, ...); it may be corrupt, truncated (an mp4 "
            "cut short loses its index) or not a video",
            "camera": "a connected camera at that index",
            "url": "a reachable stream (check the address, credentials and that the stream is live)",
        }[source.kind]
        raise StreamError(f"OpenCV could not open video source {source.name!r}; expected {hint}")
    return cap


# --------------------------------------------------------------------------------------------------
# The reader thread


@dataclass
class _Frame:
    index: int  # position in the source (0-based, before stride / drops)
    image: Any
    t_capture: float  # time.perf_counter() when the reader got it


@dataclass
class _End:
    reason: str
    warning: str | None = None


@dataclass
class _Failure:
    error: BaseException


class _Reader:
    """Reads the source in a thread into a bounded queue, by `policy`; never blocks the consumer."""

    def __init__(
        self, source: _Source, *, policy: str, stride: int, buffer: int, read_timeout_s: float, reconnect: int,
        backoff_s: float,
    ) -> None:
        self.source, self.policy, self.stride = source, policy, stride
        self.read_timeout_s, self.reconnect, self.backoff_s = read_timeout_s, reconnect, backoff_s
        self.queue: queue.Queue[_Frame | _End | _Failure] = queue.Queue(maxsize=buffer)
        self.stop = threading.Event()
        self.info: dict[str, Any] = {}  # fps, frame_count: set before the first frame is queued
        self.frames_in = self.dropped = self.skipped_stride = self.unreadable = self.reconnects = 0
        self.last_alive = time.monotonic()  # the reader's last sign of progress (a read, a reconnect attempt)
        self.thread = threading.Thread(target=self._run, name="tta-stream-reader", daemon=True)

    # -- thread body ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            end = self._read_iterable() if self.source.kind == "iterable" else self._read_capture()
        except BaseException as e:  # noqa: BLE001 - whatever the source raised reaches the consumer
            end = _Failure(e)
        self._put_final(end)

    def _read_iterable(self) -> _End | None:
        self.info = {"fps": None, "frame_count": len(self.source.target) if hasattr(self.source.target, "__len__") else None}
        index = 0
        for frame in self.source.target:
            self.last_alive = time.monotonic()
            if self.stop.is_set():
                return None
            self._take(index, frame)
            index += 1
        return _End("end of source")

    def _read_capture(self) -> _End | _Failure | None:
        from tta_runtime.inputs import _import_cv2

        cv2 = _import_cv2()
        timeout_ms = max(1, int(self.read_timeout_s * 1000))
        cap = _open_capture(self.source, timeout_ms)
        try:
            fps = float(cap.get(cv2.CAP_PROP_FPS))
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            # a URL with a frame count is a file served over the network: it ends, it does not drop
            live = self.source.kind == "camera" or (self.source.kind == "url" and count <= 0)
            self.info = {
                "fps": fps if math.isfinite(fps) and 0 < fps < 1000 else None,  # 0 or NaN on many streams
                "frame_count": count if count > 0 and not live else None,
            }
            index, bad = 0, 0
            while not self.stop.is_set():
                keep = index % self.stride == 0
                if keep:
                    ok, frame = cap.read()
                else:  # grab without decoding: stride costs no decode time on files
                    ok, frame = cap.grab(), None
                self.last_alive = time.monotonic()
                if ok:
                    bad = 0
                    if keep:
                        self._take(index, frame)
                    else:
                        self.frames_in += 1
                        self.skipped_stride += 1
                    index += 1
                    continue
                if live:
                    cap.release()
                    cap = self._reconnect(cv2)
                    if cap is None:
                        return None if self.stop.is_set() else _Failure(StreamError(
                            f"lost video source {self.source.name!r}; {self.reconnect} reconnect attempts failed"
                        ))
                    continue
                count = self.info["frame_count"]
                if count is not None and index >= count:
                    return _End("end of file")
                bad += 1
                if bad > _MAX_BAD_READS or count is None:
                    if index == 0 and self.frames_in == 0:
                        return _Failure(StreamError(
                            f"opened video source {self.source.name!r} but could not decode any frame: the file is "
                            "corrupt, truncated or in a codec this OpenCV build lacks"
                        ))
                    if count is None:
                        return _End("end of file")
                    return _End(
                        "truncated or corrupt file",
                        f"{self.source.name}: no frame could be decoded after frame {index - bad + 1} of the "
                        f"{count} the file declares (truncated or corrupt); stopping",
                    )
                self.unreadable += 1  # a damaged frame inside the file: the decoder usually recovers
                index += 1
            return None
        finally:
            if cap is not None:
                cap.release()

    def _reconnect(self, cv2: Any) -> Any:
        """Reopen a live source with exponential back-off; None when every attempt failed (or we stop)."""
        for attempt in range(self.reconnect):
            delay = min(self.backoff_s * 2**attempt, 8.0)
            log.warning("%s dropped; reconnecting in %.1f s (attempt %d of %d)", self.source.name, delay, attempt + 1, self.reconnect)
            if self.stop.wait(delay):
                return None
            self.last_alive = time.monotonic()
            try:
                cap = _open_capture(self.source, max(1, int(self.read_timeout_s * 1000)))
            except StreamError:
                self.last_alive = time.monotonic()
                continue
            self.reconnects += 1
            self.last_alive = time.monotonic()
            return cap
        return None

    def _take(self, index: int, frame: Any) -> None:
        self.frames_in += 1
        if index % self.stride:
            self.skipped_stride += 1
            return
        item = _Frame(index, frame, time.perf_counter())
        if self.policy == "latest":
            while True:
                try:
                    self.queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self.queue.get_nowait()  # the oldest waiting frame is stale: drop it
                        self.dropped += 1
                    except queue.Empty:
                        pass
        while not self.stop.is_set():  # 'all': wait for room, but never past a stop
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _put_final(self, item: _End | _Failure | None) -> None:
        if item is None:  # stopped by the consumer: nobody reads the queue any more
            return
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    # -- consumer side -------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def next(self) -> _Frame | _End | _Failure:
        """The next item; a reader without any progress for `read_timeout_s` is a stall (StreamError)."""
        waited_from = time.monotonic()
        while True:
            try:
                return self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
            now = time.monotonic()
            if not self.thread.is_alive() and self.queue.empty():
                return _Failure(StreamError(f"the reader of {self.source.name!r} ended without a reason (a bug)"))
            if now - max(waited_from, self.last_alive) > self.read_timeout_s:
                return _Failure(StreamError(
                    f"video source {self.source.name!r} stalled: no frame for {self.read_timeout_s:g} s "
                    "(read_timeout_s); stopping"
                ))

    def close(self) -> bool:
        """Stop and join the thread; False if it is still blocked inside the source after the timeout."""
        self.stop.set()
        while True:  # free a reader waiting for room
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive():
            self.thread.join(_JOIN_TIMEOUT_S)
        return not self.thread.is_alive()


# --------------------------------------------------------------------------------------------------
# Statistics with bounded memory


class _LogHistogram:
    """Percentiles of positive values (ms) in fixed memory: bins 2 % wide from 0.01 ms to ~10 min."""

    _LO, _RATIO, _BINS = 0.01, 1.02, 900

    def __init__(self) -> None:
        self.counts = np.zeros(self._BINS + 2, np.int64)  # [0]: below the range, [-1]: above
        self.n, self.total, self.max = 0, 0.0, 0.0

    def add(self, value: float) -> None:
        v = max(float(value), 0.0)
        i = 0 if v < self._LO else min(self._BINS + 1, 1 + int(math.log(v / self._LO) / math.log(self._RATIO)))
        self.counts[i] += 1
        self.n += 1
        self.total += v
        self.max = max(self.max, v)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (q in [0, 100]), to within one bin (2 %); None when empty."""
        if self.n == 0:
            return None
        rank = max(1, math.ceil(q / 100 * self.n))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        if i == 0:
            return self._LO
        if i > self._BINS:
            return self.max
        lo = self._LO * self._RATIO ** (i - 1)
        return min(lo * math.sqrt(self._RATIO), self.max)  # the bin's geometric middle

    def summary(self) -> dict[str, float | None]:
        return {
            "p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
            "mean": self.total / self.n if self.n else None, "max": self.max if self.n else None,
        }


class _Series:
    """A value over time (source frame index) in at most `capacity` buckets: when full, pairs merge."""

    def __init__(self, capacity: int = 128) -> None:
        self.capacity, self.width = capacity, 1
        self.sums = np.zeros(capacity)
        self.counts = np.zeros(capacity, np.int64)

    def add(self, index: int, value: float) -> None:
        while index // self.width >= self.capacity:
            half = self.capacity // 2
            self.sums[:half] = self.sums.reshape(half, 2).sum(1)
            self.counts[:half] = self.counts.reshape(half, 2).sum(1)
            self.sums[half:], self.counts[half:] = 0, 0
            self.width *= 2
        b = index // self.width
        self.sums[b] += value
        self.counts[b] += 1

    def to_dict(self) -> dict[str, Any]:
        used = int(np.flatnonzero(self.counts).max() + 1) if self.counts.any() else 0
        means = [None if c == 0 else round(float(s / c), 5) for s, c in zip(self.sums[:used], self.counts[:used])]
        return {"frames_per_bucket": self.width, "mean": means}


@dataclass
class StreamStats:
    """Per-stream statistics; memory stays bounded however long the stream (histograms, buckets).

    Counts: `frames_in` read from the source; `frames_processed` through the model; `frames_dropped`
    by the 'latest' policy; `frames_skipped_stride`; `frames_invalid` (wrong size / channels / dtype);
    `frames_unreadable` (damaged frames a file could not decode); `frames_written` to the annotated video.
    `latency_ms` is capture -> result (queue wait included: with policy 'all' on a file, frames wait
    behind the model, so this grows with `buffer`), `process_ms` dequeue -> result; both as
    p50 / p90 / p99 / mean / max. `ood` summarises each frame's score before its own adaptation, i.e.
    with the weights carried from the previous frames (an adapted model scores its shift lower).
    """

    source: str
    source_kind: str
    policy: str
    stride: int
    buffer: int
    adapt: str
    recipe: str
    steps_per_frame: int
    latency_budget_ms: float | None
    reset_every: int | None = None
    restore_prob: float = 0.0
    source_fps: float | None = None
    source_frames: int | None = None
    frame_size: tuple[int, int] | None = None
    frames_in: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    frames_skipped_stride: int = 0
    frames_invalid: int = 0
    frames_unreadable: int = 0
    frames_written: int = 0
    frames_adapted: int = 0
    adapt_steps: int = 0
    reconnects: int = 0
    resets: Counter = field(default_factory=Counter)
    ood_flagged: int = 0
    wall_s: float = 0.0
    stop_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    latency: _LogHistogram = field(default_factory=_LogHistogram, repr=False)
    process: _LogHistogram = field(default_factory=_LogHistogram, repr=False)
    steps_hist: Counter = field(default_factory=Counter, repr=False)
    ood_sum: float = field(default=0.0, repr=False)
    fg_ari_sum: float = field(default=0.0, repr=False)
    fg_ari_n: int = field(default=0, repr=False)
    fg_ari_series: _Series = field(default_factory=_Series, repr=False)
    steps_series: _Series = field(default_factory=_Series, repr=False)
    latency_series: _Series = field(default_factory=_Series, repr=False)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)

    @property
    def fg_ari_mean(self) -> float | None:
        return self.fg_ari_sum / self.fg_ari_n if self.fg_ari_n else None

    def to_dict(self) -> dict[str, Any]:
        n = self.frames_processed
        return {
            "source": self.source, "source_kind": self.source_kind, "source_fps": self.source_fps,
            "source_frames": self.source_frames, "frame_size": list(self.frame_size) if self.frame_size else None,
            "options": {
                "policy": self.policy, "stride": self.stride, "buffer": self.buffer, "adapt": self.adapt,
                "recipe": self.recipe, "steps_per_frame": self.steps_per_frame,
                "latency_budget_ms": self.latency_budget_ms, "reset_every": self.reset_every,
                "restore_prob": self.restore_prob,
            },
            "frames": {
                "in": self.frames_in, "processed": n, "dropped": self.frames_dropped,
                "skipped_stride": self.frames_skipped_stride, "invalid": self.frames_invalid,
                "unreadable": self.frames_unreadable, "written": self.frames_written,
            },
            "latency_ms": self.latency.summary(),
            "process_ms": self.process.summary(),
            "fps": n / self.wall_s if self.wall_s > 0 else None,
            "wall_s": self.wall_s,
            "adaptation": {
                "steps_total": self.adapt_steps, "steps_per_frame_mean": self.adapt_steps / n if n else None,
                "frames_adapted": self.frames_adapted,
                "steps_histogram": {str(k): v for k, v in sorted(self.steps_hist.items())},
                "resets": dict(self.resets), "steps_over_time": self.steps_series.to_dict(),
            },
            "ood": {"mean_score": self.ood_sum / n if n else None, "flagged_fraction": self.ood_flagged / n if n else None},
            "fg_ari": None if not self.fg_ari_n else {
                "mean": self.fg_ari_mean, "frames": self.fg_ari_n, "over_time": self.fg_ari_series.to_dict(),
            },
            "latency_over_time_ms": self.latency_series.to_dict(),
            "reconnects": self.reconnects,
            "stop_reason": self.stop_reason,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------------------
# Monitors: scene cuts and collapse


class SceneCutDetector:
    """A cut when the colour histogram of a frame is far from the previous frame's.

    Frames are shrunk to 32x32 (area average); each RGB channel gets a 16-bin histogram; the distance is
    Hellinger's, sqrt(1 - sum sqrt(p q)) averaged over channels, in [0, 1]. Objects moving across a fixed
    background move it little (< 0.1 on the generated videos); a new scene, a new background or a
    lighting change moves it far (0.66 when the generated background turns textured).
    """

    def __init__(self, threshold: float = 0.3) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"cut threshold must be in (0, 1] (a Hellinger distance), got {threshold!r}")
        self.threshold = threshold
        self._previous: np.ndarray | None = None
        self.distance: float | None = None

    def update(self, rgb: np.ndarray) -> bool:
        """Feed the next (H, W, 3) uint8 frame; True if it starts a new scene."""
        from tta_runtime.inputs import _import_cv2

        cv2 = _import_cv2()
        small = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA) if rgb.shape[:2] != (32, 32) else rgb
        bins = (small.reshape(-1, 3) >> 4).astype(np.int64) + np.array([0, 16, 32])  # (1024, 3) bin ids
        hist = np.bincount(bins.ravel(), minlength=48).reshape(3, 16) / (small.shape[0] * small.shape[1])
        previous, self._previous = self._previous, hist
        if previous is None:
            self.distance = None
            return False
        bc = np.sqrt(hist * previous).sum(axis=1)  # Bhattacharyya coefficient per channel
        self.distance = float(np.sqrt(np.clip(1.0 - bc, 0.0, 1.0)).mean())
        return self.distance > self.threshold

    def reset(self) -> None:
        self._previous, self.distance = None, None


class CollapseMonitor:
    """Signals that continual adaptation went wrong, so that the stream resets to the loaded weights.

    Three signals, checked on every processed frame's `Result`:
    - rollback: the adaptation loop met a non-finite loss, gradient or weight (`adaptation.rolled_back`);
    - loss: the frame's reconstruction error (after adaptation) stays above `loss_ratio` x the median of
      the previous `window` frames for `patience` frames in a row (divergence);
    - mask RankMe: the effective number of slots in use, RankMe (`tta_runtime.ood.rankme`) of the
      (K, pixels) mask matrix, averaged over the last `window` frames, falls below `min_rank`: the
      masks are collapsing onto fewer slots than the scene has parts. The shipped model, unadapted,
      scores at least 2.46 on 400 generated frames (2-4 objects, every shift kind; median 2.88); one
      slot everywhere scores 1. Continual adaptation at 1 step per frame drifts there over thousands
      of frames (FG-ARI 0.05 at frames 4500-5000 of the memory benchmark's video without this check).
      A scene with a single object can legitimately score below 2: adaptation is then reset every
      `window` frames, i.e. it is held close to the loaded weights.
    """

    def __init__(self, window: int = 8, min_rank: float = 2.0, loss_ratio: float = 3.0, patience: int = 3) -> None:
        if window < 2 or patience < 1 or min_rank < 1 or loss_ratio <= 1:
            raise ConfigError(
                f"CollapseMonitor needs window >= 2, patience >= 1, min_rank >= 1 and loss_ratio > 1; got "
                f"window={window}, patience={patience}, min_rank={min_rank}, loss_ratio={loss_ratio}"
            )
        self.window, self.min_rank, self.loss_ratio, self.patience = window, min_rank, loss_ratio, patience
        self.ranks: deque[float] = deque(maxlen=window)
        self.losses: deque[float] = deque(maxlen=window)
        self._high = 0
        self.rank: float | None = None

    def update(self, result: Result) -> str | None:
        """Feed one frame's result; the reason to reset, or None."""
        from tta_runtime.ood import rankme

        rep = result.adaptation
        if rep is not None and rep.rolled_back:
            return f"rollback ({rep.rollback_reason})"
        k, h, w = result.masks.shape
        step = max(1, min(h, w) // 32)  # about the model's own resolution is enough for a rank
        self.rank = rankme(result.masks[:, ::step, ::step].reshape(k, -1))
        self.ranks.append(self.rank)
        loss = float(result.recon_mse)
        baseline = float(np.median(self.losses)) if len(self.losses) == self.window else None
        self.losses.append(loss)
        self._high = self._high + 1 if baseline is not None and loss > self.loss_ratio * baseline else 0
        if self._high >= self.patience:
            return f"loss {loss:.4g} > {self.loss_ratio:g} x recent median {baseline:.4g} for {self.patience} frames"
        if len(self.ranks) == self.window and (mean_rank := float(np.mean(self.ranks))) < self.min_rank:
            return f"mask RankMe {mean_rank:.2f} < {self.min_rank:g} over {self.window} frames (slots collapsed)"
        return None

    def reset(self) -> None:
        self.ranks.clear()
        self.losses.clear()
        self._high = 0


# --------------------------------------------------------------------------------------------------
# Annotation and ground truth


def annotate_frame(result: Result, hud: Sequence[str] = (), *, alpha: float = 0.45) -> np.ndarray:
    """The frame with its masks overlaid, slot outlines in white, and `hud` lines top-left.

    Returns (H, W, 3) uint8 RGB at the frame's own size (convert to BGR for cv2.VideoWriter).
    """
    from tta_runtime.inputs import _import_cv2
    from tta_runtime.visual import overlay_masks

    cv2 = _import_cv2()
    out = overlay_masks(result.image, result.masks, alpha=alpha, outlines=True)
    if hud:
        h, w = out.shape[:2]
        scale = max(0.3, min(1.0, w / 400))
        (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        line = th + base + 2
        band = min(h, 3 + line * len(hud))
        out[:band] = (out[:band].astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken behind the text
        for i, text in enumerate(hud):
            cv2.putText(out, text, (3, 2 + th + i * line), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def load_ground_truth(truth: GroundTruth) -> Callable[[int], np.ndarray | None]:
    """Per-frame instance maps as a lookup `index -> (H, W) int map or None`.

    Accepts an ``.npz`` with ``instances`` (N, H, W) (what `make_shifted_video` writes), an (N, H, W)
    array, a sequence of (H, W) maps, or a callable index -> map (None = no truth for that frame).
    Indices are source frame indices (stride and drops do not shift them).
    """
    if callable(truth):
        return truth
    if isinstance(truth, (str, os.PathLike)):
        path = Path(truth)
        try:
            with np.load(path) as data:
                if "instances" not in data:
                    raise InvalidInputError(f"ground truth {str(path)!r} has no 'instances' array (keys: {list(data)})")
                maps = data["instances"]
        except (OSError, ValueError) as e:
            if isinstance(e, InvalidInputError):
                raise
            raise InvalidInputError(f"cannot read ground truth {str(path)!r}: {e}") from None
    else:
        maps = truth
    if isinstance(maps, np.ndarray) and maps.ndim != 3:
        raise InvalidInputError(f"ground truth must be (N, H, W) instance maps, got shape {maps.shape}")
    n = len(maps)

    def lookup(index: int) -> np.ndarray | None:
        return np.asarray(maps[index]) if 0 <= index < n else None

    return lookup


# --------------------------------------------------------------------------------------------------
# The stream


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

    def __init__(self, runtime: Runtime, source: _Source, opts: dict[str, Any]) -> None:
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
        elif shape is not None and frame.shape != shape:
            problem = f"shape {frame.shape}"
        if problem is not None:
            st.frames_invalid += 1
            expected = f"{shape} uint8 like the first frame" if shape is not None else "(H, W, 3) uint8"
            if st.frames_invalid <= 5 or st.frames_invalid % _WARN_EVERY == 0:
                st.warn(f"frame {item.index} skipped: {problem}; expected {expected} ({st.frames_invalid} skipped so far)")
            return None
        if self._opts["channel_order"] == "bgr":
            from tta_runtime.inputs import _import_cv2

            cv2 = _import_cv2()
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
            from tta_runtime.inputs import _import_cv2

            cv2 = _import_cv2()
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
        st.frames_skipped_stride, st.frames_unreadable, st.reconnects = reader.skipped_stride, reader.unreadable, reader.reconnects


def _open_writer(path: str | os.PathLike[str], fps: float | None, stride: int, shape: tuple[int, ...]) -> Any:
    """cv2.VideoWriter (fourcc mp4v) at the frames' size; at the source's rate divided by the stride."""
    from tta_runtime.inputs import _import_cv2

    cv2 = _import_cv2()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = (fps or 25.0) / stride
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), rate, (shape[1], shape[0]))
    if not writer.isOpened():
        raise StreamError(
            f"OpenCV could not open {str(out)!r} for writing with fourcc mp4v; use a writable path ending in "
            ".mp4 (or .avi / .mkv / .mov)"
        )
    return writer


def stream(
    runtime: Runtime, source: Source, *, adapt: str | None = None, recipe: str | None = DEFAULT_RECIPE,
    steps_per_frame: int = DEFAULT_STEPS_PER_FRAME, latency_budget_ms: float | None = None,
    reset_on_cut: bool = True, reset_on_collapse: bool = True, reset_every: int | None = None,
    policy: str | None = None, stride: int = 1, buffer: int | None = None, max_frames: int | None = None, ground_truth: GroundTruth | None = None,
    channel_order: str | None = None, out: str | os.PathLike[str] | None = None, fps: float | None = None,
    annotate: bool = False, cut_threshold: float = 0.3, read_timeout_s: float = 10.0, reconnect: int = 5,
    backoff_s: float = 0.5, progress: bool = False, restore_prob: float | None = None,
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
            "always" (on the tuning video "when_ood" matched it on the shifted half with half the steps,
            but gave up the gain on in-distribution frames, where this model also improves).
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
        policy: "all" (every frame; default for files and iterables) or "latest" (drop stale frames;
            default for cameras and URLs). buffer: frames waiting in the queue (default 4 for "all", 1
            for "latest": a frame then waits for at most the one being processed). stride: process
            every n-th frame.
        max_frames: stop after this many processed frames.
        ground_truth: per-frame instance maps (see `load_ground_truth`) -> `fg_ari` per frame and in stats.
        channel_order: of an iterable's frames, "rgb" (default) or "bgr"; OpenCV sources are always BGR.
        out: write the annotated video here (mp4v), at the source's size and rate (`fps` when the source
            has none; divided by `stride`). annotate: fill `StreamFrame.annotated` without writing.
        read_timeout_s: no frame for this long is a stall (`StreamError`). reconnect / backoff_s: reopen
            attempts for a live source that drops, waiting backoff_s, 2x, 4x ... (at most 8 s) before each.
        progress: a tqdm bar (with the frame count for files).

    Raises (immediately): `ConfigError` for a bad option, `StreamError` for a source that cannot be used
    (a missing file, an unusable object). While iterating: `StreamError` (cannot open, stall, lost).
    """
    from tta_runtime.config import with_overrides
    from tta_runtime.hub import load_recipe

    src = _resolve_source(source)
    adapt = "always" if adapt is None else adapt
    if adapt not in _ADAPT:
        raise ConfigError(f"adapt must be one of {_ADAPT}, got {adapt!r}")
    if adapt == "when_ood" and runtime.calibration is None:
        raise ConfigError(
            f"adapt='when_ood' needs an OOD calibration in the model folder ({runtime.folder}/ood); "
            "run `tta-runtime ood fit`, or use adapt='always'"
        )
    policy = policy or ("latest" if src.kind in ("camera", "url") else "all")
    if policy not in _POLICIES:
        raise ConfigError(f"policy must be 'all' (every frame) or 'latest' (drop stale frames), got {policy!r}")
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
        "policy": policy, "stride": int(stride), "buffer": int(buffer),
        "max_frames": None if max_frames is None else int(max_frames), "ground_truth": ground_truth,
        "channel_order": channel_order, "out": out, "fps": fps, "annotate": bool(annotate),
        "cut_threshold": cut_threshold, "read_timeout_s": float(read_timeout_s), "reconnect": int(reconnect),
        "backoff_s": float(backoff_s), "progress": bool(progress),
    }
    return Stream(runtime, src, opts)


# --------------------------------------------------------------------------------------------------
# Memory benchmark


def _rss_mb() -> tuple[float, str]:
    """This process's resident set size now, in MiB, and how it was read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, "/proc/self/statm"
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far is the best portable figure
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10), "getrusage ru_maxrss (peak)"


def bench_stream(
    model: str | None = None, *, frames: int = 5000, steps_per_frame: int = 1, size: int = 64,
    recipe: str = DEFAULT_RECIPE, warmup: int = 100, seed: int = 0, progress: bool = False,
    restore_prob: float | None = None,
) -> dict[str, Any]:
    """Memory over a long stream: peak RSS growth after the first `warmup` frames.

    Generates a `frames`-frame shifted video (textured background from half-way) in a temporary folder,
    then streams it with its ground truth, adapting on every frame (`adapt="always"`, `steps_per_frame`
    steps, so that every frame builds and frees an autograd graph) and writing the annotated video.
    RSS is read after every frame; growth = peak RSS after `warmup` frames - RSS at frame `warmup`.
    """
    import resource
    import tempfile

    import torch

    from tta_runtime.runtime import Runtime
    from tta_runtime.data.video import make_shifted_video

    if frames <= warmup:
        raise ConfigError(f"frames ({frames}) must exceed warmup ({warmup})")
    rt = Runtime.from_pretrained(model)
    samples: list[tuple[int, float]] = []
    base = peak = 0.0
    how = ""
    with tempfile.TemporaryDirectory(prefix="tta-bench-stream-") as tmp:
        t0 = time.perf_counter()
        video = make_shifted_video(Path(tmp) / "bench.mp4", frames, size=size, seed=seed)
        t_gen = time.perf_counter() - t0
        with stream(
            rt, video.video, adapt="always", recipe=recipe, steps_per_frame=steps_per_frame, ground_truth=video.masks,
            out=Path(tmp) / "annotated.mp4", progress=progress, restore_prob=restore_prob,
        ) as s:
            for i, _frame in enumerate(s, start=1):
                rss, how = _rss_mb()
                if i == warmup:
                    base = peak = rss
                elif i > warmup:
                    peak = max(peak, rss)
                if i == 1 or i % 250 == 0:
                    samples.append((i, round(rss, 2)))
            stats = s.stats
    d = stats.to_dict()
    return {
        "model": rt.name,
        "frames": frames,
        "frame_size": [size, size],
        "recipe": stats.recipe,
        "adapt": "always",
        "steps_per_frame": steps_per_frame,
        "restore_prob": stats.restore_prob,
        "adapt_steps_total": stats.adapt_steps,
        "warmup_frames": warmup,
        "rss_mb_at_warmup": round(base, 2),
        "peak_rss_mb_after_warmup": round(peak, 2),
        "peak_rss_growth_mb": round(peak - base, 2),
        "target_growth_mb": 50,
        "passes": peak - base < 50,
        "rss_source": how,
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 2),
        "rss_mb_every_250_frames": samples,
        "frames_processed": stats.frames_processed,
        "frames_written": stats.frames_written,
        "fps": d["fps"],
        "latency_ms": d["latency_ms"],
        "fg_ari_mean": stats.fg_ari_mean,
        "fg_ari_over_time": stats.fg_ari_series.to_dict(),
        "resets": dict(stats.resets),
        "stop_reason": stats.stop_reason,
        "generate_s": t_gen,
        "stream_s": stats.wall_s,
        "timing": {
            "device": str(rt.device),
            "hardware": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        },
    }
