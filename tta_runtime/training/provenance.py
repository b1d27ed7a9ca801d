"""What a model folder records about how its weights were made: the hardware, and the run's progress and log."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from tta_runtime.training.checkpoint import CKPT_FILE, LOG_FILE, checkpoint_progress


def hardware() -> str:
    """The CPU's model name, torch's thread count and version, e.g. "<cpu>, 1 torch thread(s), torch 2.x"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def copy_run(run_dir: str | Path | None, out_dir: Path) -> tuple[float | None, int | None]:
    """(training seconds, steps done) from `run_dir`'s checkpoint, and its `log.jsonl` copied to
    `out_dir/train_log.jsonl`; (None, None) when there is no run folder or no checkpoint in it."""
    if run_dir is None or not (Path(run_dir) / CKPT_FILE).exists():
        return None, None
    steps_done, elapsed = checkpoint_progress(Path(run_dir) / CKPT_FILE)
    (out_dir / "train_log.jsonl").write_bytes((Path(run_dir) / LOG_FILE).read_bytes())
    return elapsed, steps_done
