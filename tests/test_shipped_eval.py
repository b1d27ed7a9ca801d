"""The committed evaluations of the shipped segmenters reproduce: its first images, re-run here, give the
same per-image numbers as the JSON in the model folder (the full run is `tta-runtime eval`, see README)."""

from __future__ import annotations

import json

import pytest

import tta_runtime as tta
from tta_runtime.config import AdaptConfig
from tta_runtime.evaluation.segmentation import evaluate, evaluate_split
from tta_runtime.hub import find_model

CASES = [("slot-shapes-32", "unseen_colours"), ("slot-shapes-32", "textured_background"), ("slot-flat-64", "flat/crowding")]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "split"), CASES)
def test_first_image_of_a_split_reproduces_the_committed_numbers(model: str, split: str) -> None:
    eval_json = find_model(model) / "eval.json"
    report = json.loads(eval_json.read_text())
    rt = tta.Runtime.from_pretrained(model)
    assert report["model"] == rt.name
    expected = report["splits"][split]
    part = evaluate_split(rt, split, 1, seed=expected["seed"], adapt=AdaptConfig(**report["recipe"]), baseline=None)
    for variant in ("before", "slot_tta", "oracle"):
        for metric in ("fg_ari", "ari", "miou"):
            assert part["per_image"][variant][metric][0] == expected["per_image"][variant][metric][0], (variant, metric)


def test_evaluate_shows_one_progress_bar_naming_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    """One bar for the whole call (not one per split), its postfix naming the split being evaluated."""
    rt = tta.Runtime.from_pretrained("slot-shapes-32")
    report = evaluate(rt, splits=("in_dist", "unseen_colours"), n_images=1, steps=2, baseline=None, progress=True)
    assert list(report["splits"]) == ["in_dist", "unseen_colours"]
    err = capsys.readouterr().err
    assert "2/2" in err and "unseen_colours" in err
    assert {line.split(":")[0].strip() for line in err.replace("\r", "\n").splitlines() if "%|" in line} == {"eval"}
