"""`tta-runtime bench stream`: memory over a long stream, the check that continual adaptation leaks nothing.

Generates a shifted video (`tta_runtime.data.video.make_shifted_video`) in a temporary folder, streams it
with its ground truth through `tta_runtime.video.stream`, adapting on every frame and writing the
annotated video, and reads the process's resident set after every frame. The verdict: the peak growth
after the first `warmup` frames stays under the target in the report (`target_growth_mb`).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tta_runtime.data.video import make_shifted_video
from tta_runtime.errors import ConfigError
from tta_runtime.runtime import Runtime
from tta_runtime.video import DEFAULT_RECIPE, stream

__all__ = ["bench_stream"]

TARGET_GROWTH_MB = 50  # peak RSS growth after warm-up that still counts as "no leak"


def _rss_mb() -> tuple[float, str]:
    """This process's resident set size now, in MiB, and how it was read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, "/proc/self/statm"
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far is the best portable figure
        import resource  # POSIX only: imported here so that the module imports everywhere

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
        "target_growth_mb": TARGET_GROWTH_MB,
        "passes": peak - base < TARGET_GROWTH_MB,
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
