"""OOD calibration in the model folder, `Result.is_ood`, and adaptation gated by it (adapt="when_ood")."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

import tta_runtime as tta
from tta_runtime.cli.main import main
from tta_runtime.hub import find_model
from tta_runtime.data.scenes import generate_scene


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the small shapes-world segmenter, calibrated by the real CLI on a few generated scenes."""
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(find_model("slot-shapes-32"), folder, ignore=shutil.ignore_patterns("ood", "feedforward"))
    assert main(["ood", "fit", "--model", str(folder), "--n-images", "24"]) == 0
    assert (folder / "ood" / "calibration.json").is_file()
    return folder


def _image(split: str, index: int) -> np.ndarray:
    return generate_scene(split, seed=77, index=index, size=32).image


def test_calibrated_model_reports_scorer_and_verdict(calibrated_dir: Path) -> None:
    rt = tta.Runtime.from_pretrained(calibrated_dir)
    res = rt.predict(_image("in_dist", 0))
    assert res.ood_scorer == "recon_error"
    assert isinstance(res.is_ood, bool)
    assert res.is_ood == (res.ood_score > rt.calibration.threshold)
    assert res.to_dict()["is_ood"] == res.is_ood


def test_when_ood_adapts_only_inputs_above_the_threshold(calibrated_dir: Path) -> None:
    rt = tta.Runtime.from_pretrained(calibrated_dir, adapt="when_ood", steps=3)
    a, b = _image("in_dist", 1), _image("textured_background", 1)
    sa, sb = rt.predict(a).ood_score, rt.predict(b).ood_score
    lo, hi = (a, b) if sa < sb else (b, a)
    # Put the threshold between the two scores so the test fixes which one the gate must pass.
    rt.calibration = dataclasses.replace(rt.calibration, threshold=(sa + sb) / 2)

    skipped = rt.adapt_and_predict(lo)
    assert skipped.is_ood is False
    assert skipped.adaptation.steps_run == 0 and "in distribution" in skipped.adaptation.skipped
    np.testing.assert_array_equal(skipped.masks, rt.predict(lo).masks)  # the predict path, exactly

    adapted = rt.adapt_and_predict(hi)
    assert adapted.is_ood is True
    assert adapted.adaptation.skipped is None and adapted.adaptation.steps_run == 3


def test_adapt_never_takes_the_predict_path(calibrated_dir: Path) -> None:
    rt = tta.Runtime.from_pretrained(calibrated_dir)
    img = _image("unseen_shapes", 2)
    res = rt.adapt_and_predict(img, adapt="never")
    assert res.adaptation.steps_run == 0 and res.adaptation.skipped == "adapt='never'"
    np.testing.assert_array_equal(res.masks, rt.predict(img).masks)


def test_when_ood_without_calibration_says_how_to_fit_one(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(find_model("slot-shapes-32"), folder, ignore=shutil.ignore_patterns("ood", "feedforward"))
    with pytest.raises(tta.ModelLoadError, match="tta-runtime ood fit"):
        tta.Runtime.from_pretrained(folder, adapt="when_ood")
    rt = tta.Runtime.from_pretrained(folder)
    assert rt.predict(_image("in_dist", 0)).is_ood is None  # no calibration: a score, no verdict
    with pytest.raises(tta.ModelLoadError, match="tta-runtime ood fit"):
        rt.adapt_and_predict(_image("in_dist", 0), adapt="when_ood")


def test_bad_gate_value_is_a_config_error(calibrated_dir: Path) -> None:
    rt = tta.Runtime.from_pretrained(calibrated_dir)
    with pytest.raises(tta.ConfigError, match="when_ood"):
        rt.adapt_and_predict(_image("in_dist", 0), adapt="sometimes")
    with pytest.raises(tta.ConfigError, match="adapt"):
        tta.Runtime.from_pretrained(calibrated_dir, adapt="sometimes")


def test_ood_eval_cli_writes_auroc_per_split(calibrated_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ood.json"
    assert main(["ood", "eval", "--model", str(calibrated_dir), "--n-images", "8", "--json", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    for split in ("textured_background", "unseen_shapes"):
        for scorer in ("recon_error", "mask_entropy", "knn"):
            assert 0.0 <= report["splits"][split][scorer]["auroc"] <= 1.0


def test_bench_gate_reports_compute_and_gain_shares(calibrated_dir: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "gate.json"
    args = ["bench", "gate", "--model", str(calibrated_dir), "--n-images", "2", "--steps", "2", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    rows = report["per_image"]
    assert [r["split"] == "in_dist" for r in rows] == [True, False, True, False]  # interleaved stream
    assert all(r["steps_always"] == 2 for r in rows)
    assert all(r["steps_gated"] == (2 if r["is_ood"] else 0) for r in rows)  # the gate decides, per image
    assert report["compute_share_steps"] == sum(r["steps_gated"] for r in rows) / 8
    for r in rows:  # episodic and deterministic: a gated image that adapted matches always-adapt exactly
        if r["is_ood"]:
            assert r["fg_ari_gated"] == r["fg_ari_always"]
        else:
            assert r["fg_ari_gated"] == r["fg_ari_before"]
    by_split = report["per_split"]
    assert {k: v["n"] for k, v in by_split.items()} == {"in_dist": 2, "textured_background": 1, "unseen_colours": 1}
    ind = [r for r in rows if r["split"] == "in_dist"]
    assert by_split["in_dist"]["gain_always"] == pytest.approx(
        sum(r["fg_ari_always"] - r["fg_ari_before"] for r in ind) / 2
    )


def test_bench_gate_scorer_option_picks_the_gating_scorer(
    calibrated_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    out = tmp_path / "gate.json"
    args = ["bench", "gate", "--model", str(calibrated_dir), "--n-images", "1", "--steps", "1", "--scorer", "knn",
            "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["scorer"] == "knn"
    bad = ["bench", "gate", "--model", str(calibrated_dir), "--n-images", "1", "--steps", "1", "--scorer", "mahalanobiz"]
    assert main(bad) == 2
    assert "did you mean 'mahalanobis'" in capsys.readouterr().err


def test_continual_adaptation_leaves_the_ood_score_of_an_input_unchanged(calibrated_dir: Path) -> None:
    """The calibration describes the loaded weights: once continual adaptation has moved them, an input is
    still scored by the loaded ones (the same input scores the same), while the prediction uses the adapted."""
    rt = tta.Runtime.from_pretrained(calibrated_dir, recipe="slot_tta_stream", mode="continual", steps=10)
    probe = _image("in_dist", 0)
    before = rt.predict(probe)
    for i in range(4):
        rt.adapt_and_predict(_image("noise_blur", i))
    after = rt.predict(probe)
    assert after.recon_mse != before.recon_mse  # the weights did move: the prediction changed
    assert (after.ood_score, after.is_ood, after.ood_scorer) == (before.ood_score, before.is_ood, before.ood_scorer)
    gated = rt.adapt_and_predict(probe, adapt="when_ood")  # the gate reads the same score
    assert gated.ood_score == before.ood_score
    rt.reset()
    assert rt.predict(probe).ood_score == pytest.approx(before.ood_score, abs=1e-9)
