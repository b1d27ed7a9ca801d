"""Streaming video: per-frame segmentation with continual test-time adaptation.

One frame's way through, top to bottom, with the module that does each step on the left:

    sources    source (video file | camera index | rtsp:// or http(s):// URL | iterable of frames)
               -> reader thread: read, keep every `stride`-th frame, bounded queue with a policy
               ('all': wait for room, every frame is processed; 'latest': drop the oldest, for live
               sources), reconnect with back-off when a live source drops, end at the end of a file
    streaming  -> check: (H, W, 3) uint8 like the first frame, else skipped with a warning; BGR -> RGB
    monitors   -> scene-cut test (colour-histogram distance to the previous frame) -> runtime.reset()
               (and, optionally, every `reset_every` frames)
    streaming  -> runtime.adapt_and_predict(frame, mode="continual", steps=steps_per_frame,
               time_budget_ms=..., adapt=...): warm start from the previous frame's weights, a step
               and a latency budget per frame
    monitors   -> collapse monitor (non-finite rollback, a sustained loss blow-up, RankMe of the slot
               masks) -> runtime.reset()
    annotate   -> FG-ARI against ground truth when given -> annotated frame (masks, outlines, HUD)
               -> VideoWriter
    stats      -> statistics (bounded memory) -> yield a `StreamFrame`

`stream()` returns a `Stream` (an iterator of `StreamFrame`, a context manager, `.stats`). The memory
benchmark over a long stream lives in the lab: `tta_runtime.evaluation.bench_stream`.

Errors and robustness, decided once:
- a source that cannot be opened: `StreamError` naming the source and what is accepted;
- a file that stops decoding early (truncated or corrupt): a few unreadable frames in a row are skipped
  and counted, then the stream ends with a warning and `stats.stop_reason` saying so;
- a frame of another size, channel count or dtype than the first one: skipped, counted in
  `stats.frames_invalid`, warned about (the first few times);
- a source that delivers nothing for `read_timeout_s` (stall): `StreamError`, never a hang;
- a live source that drops: reconnect with exponential back-off (`reconnect` attempts), then `StreamError`;
- whatever happens (normal end, `close()`, an exception in the caller's loop or in the model), the
  reader thread is stopped and joined, the video writer is released, the progress bar (one for the
  whole stream, never one per frame) is closed and the runtime is reset to its loaded weights.

`import tta_runtime.video` is light: OpenCV, tqdm, scipy (metrics) are imported when a stream runs.
"""

from tta_runtime.video.annotate import annotate_frame, load_ground_truth
from tta_runtime.video.monitors import CollapseMonitor, SceneCutDetector
from tta_runtime.video.sources import StreamError
from tta_runtime.video.stats import StreamStats
from tta_runtime.video.streaming import (
    ADAPT_MODES,
    DEFAULT_RECIPE,
    DEFAULT_STEPS_PER_FRAME,
    POLICIES,
    Stream,
    StreamFrame,
    stream,
)

__all__ = [
    "ADAPT_MODES",
    "DEFAULT_RECIPE",
    "DEFAULT_STEPS_PER_FRAME",
    "POLICIES",
    "CollapseMonitor",
    "SceneCutDetector",
    "Stream",
    "StreamError",
    "StreamFrame",
    "StreamStats",
    "annotate_frame",
    "load_ground_truth",
    "stream",
]
