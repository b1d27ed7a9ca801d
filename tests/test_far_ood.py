"""Honest behaviour outside the training world (#18, item 5): the card's scope, the far-OOD warning and the
CLI's line, on a real photo and a real in-distribution scene."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tta_runtime
from tta_runtime.cli.main import main
from tta_runtime.config import ModelScope, validate
from tta_runtime.data.scenes import generate_scene
from tta_runtime.errors import ConfigError
from tta_runtime.visual import save_png

FAR = "far outside what {} was trained on"
# (model, its training split, the scene size): the default flat-world model and the small shapes-world one
WORLDS = [("slot-flat-64", "flat/in_dist", 64), ("slot-shapes-32", "in_dist", 32)]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut())


@pytest.fixture(autouse=True)
def _no_streak(monkeypatch) -> None:
    """Earlier tests' far inputs must not have started a warning streak this test continues."""
    monkeypatch.setattr("tta_runtime.frozen._far_streak", {})


@pytest.mark.parametrize(("model", "split", "size"), WORLDS)
def test_a_photo_logs_the_far_ood_warning_and_a_scene_does_not(model, split, size, photo, caplog) -> None:
    runtime = tta_runtime.Runtime.from_pretrained(model)
    scene = generate_scene(split, 2026, 0, size).image
    with caplog.at_level("WARNING", logger="tta_runtime.frozen"):
        far = runtime.predict(photo)
        assert FAR.format(model) in caplog.text and "masks are unreliable" in caplog.text
        caplog.clear()
        near = runtime.predict(scene)
        assert caplog.text == ""
    level = runtime.card.scope.far_ood_level
    assert far.ood_score > level >= near.ood_score and far.ood_scorer == runtime.card.scope.far_ood_scorer
    with caplog.at_level("WARNING", logger="tta_runtime.frozen"):
        runtime.predict(np.stack([scene, scene, np.asarray(_small(photo, size))]))
        assert "Input 2 of 3 scored far" in caplog.text
        caplog.clear()
        for _ in range(3):  # a stream of far frames: one warning for the streak, not one per frame
            runtime.predict(photo)
        assert caplog.text == ""


def _small(photo: np.ndarray, size: int) -> np.ndarray:
    step = 512 // size
    return photo[::step, ::step][:size, :size]


def test_the_cli_prints_one_line_for_a_far_input(tmp_path, photo, capsys) -> None:
    save_png(tmp_path / "photo.png", photo)
    save_png(tmp_path / "scene.png", generate_scene("flat/in_dist", 2026, 1, 64).image)  # the default model's world
    assert main(["predict", str(tmp_path / "photo.png"), "--json", str(tmp_path / "p.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and FAR.format("slot-flat-64") in err and "its masks are unreliable" in err
    assert "WARNING" not in err  # the library's record is not printed twice
    assert main(["predict", str(tmp_path / "scene.png"), "--json", str(tmp_path / "s.json")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--no-progress", "--json", str(tmp_path / "all.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "photo.png" in err
    assert main(["predict", str(tmp_path / "photo.png"), "-q", "--json", str(tmp_path / "q.json")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_info_shows_the_scope_and_bad_scopes_are_refused(capsys) -> None:
    assert main(["info", "--json", "-"]) == 0
    card = json.loads(capsys.readouterr().out)
    scope = card["scope"]
    assert scope["intended_use"] and scope["limitations"] and scope["far_ood_level"] == 614.0
    assert scope["far_ood_scorer"] == "mahalanobis" and scope["demo_sample"] == "demo_sample.png"
    assert "tools/release/far_ood_level.py" in scope["far_ood_evidence"]
    with pytest.raises(ConfigError, match="go together"):
        validate(ModelScope, {"far_ood_level": 3.0}, "scope")
    with pytest.raises(ConfigError):
        validate(ModelScope, {"limitations": "one string"}, "scope")
    assert tta_runtime.Runtime.from_pretrained("digits-cnn-bn").card.scope.far_ood_level is None
