"""Latency measurement for the benchmarks: interleaved calls, so that machine drift hits every candidate alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_latency"]


def interleaved_latency(fns: dict[str, Callable[[], object]], *, calls: int = 300, warmup: int = 30) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (A B C A B C ...) so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
