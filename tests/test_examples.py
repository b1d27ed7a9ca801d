"""The examples run against the public API and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_quickstart_adapts_the_bundled_sample() -> None:
    out = _run("quickstart.py", "--steps", "3")
    assert "OOD score" in out
    assert "in 3 steps" in out
    assert "masks (8, 128, 128)" in out  # masks come back at the default model sample's own 128x128 size


@pytest.mark.slow
def test_continual_stream_runs_every_frame_and_resets() -> None:
    out = _run("continual_stream.py", "--frames", "3", "--steps", "2")
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("frame")] == ["frame 0", "frame 1", "frame 2"]
    assert "reset to the shipped weights" in out


@pytest.mark.slow
def test_pruned_classifier_compares_dense_and_pruned() -> None:
    out = _run("pruned_classifier.py", "--n", "32")
    lines = out.splitlines()
    assert lines[0].startswith("32 test digits")
    assert lines[1].startswith("dense") and lines[2].startswith("pruned r0.6")
    assert "of the dense multiply-accumulates" in lines[2]


@pytest.mark.slow
def test_custom_model_adapts_calibrates_saves_and_exports(tmp_path) -> None:
    out = _run("custom_model.py", "--epochs", "4", "--out", str(tmp_path))
    assert out.splitlines()[0].startswith("calibrated 9 OOD scorers") and "is_ood uses stem_mahalanobis" in out
    assert "identical predictions True" in out and "parity passed" in out
