"""What the evaluations and benchmarks share: thread pinning, progress, intervals, hardware notes.

Adaptation runs many chaotic steps: a different thread count changes float sums in the last bit and,
sometimes, a mask pixel. So every evaluation on the CPU runs single-threaded (`one_thread`), and its
numbers reproduce on any machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_on_cpu(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """`one_thread` on the CPU (numbers independent of the core count); a GPU as it is."""
    return one_thread() if device.type == "cpu" else contextlib.nullcontext()


@contextlib.contextmanager
def progress_bar(total: int, desc: str, *, enabled: bool, bar: tqdm | None = None, unit: str = "it") -> Iterator[tqdm]:
    """The one progress bar of a long call: `bar` when the caller already shows one (this work is a part
    of it: it is not closed here), else a new bar (a disabled one, whose methods do nothing, unless
    `enabled`), closed at the end. Name the current split or configuration with `set_postfix_str`."""
    if bar is not None:
        yield bar
        return
    own = tqdm(total=total, desc=desc, disable=not enabled, unit=unit, dynamic_ncols=True)
    try:
        yield own
    finally:
        own.close()


def interval(estimate: tuple[float, float, float], digits: int = 6) -> dict[str, Any]:
    """``(mean, lo, hi)`` of a bootstrap as ``{"mean": mean, "ci95": [lo, hi]}``, rounded to `digits`."""
    mean, lo, hi = estimate
    return {"mean": round(mean, digits), "ci95": [round(lo, digits), round(hi, digits)]}


def hardware(device: torch.device) -> dict[str, Any]:
    """Where a benchmark ran: machine, CPU model and affinity, torch and its thread count, GPU if used."""
    hw = {"machine": platform.machine(), "processor": platform.processor() or None, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        hw["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["cuda"] = torch.version.cuda
    return hw
