"""Per-stream statistics in bounded memory, however long the stream runs.

Latencies go into a log-spaced histogram (percentiles to within one 2 % bin), values over time into a
fixed number of buckets that merge in pairs when full; `StreamStats` holds the counts, both, and turns
them into the JSON-ready dict the CLI writes.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_MAX_WARNINGS = 20  # warnings kept in the stats (the log has them all, rate-limited)


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
