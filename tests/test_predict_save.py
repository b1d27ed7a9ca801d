"""`Result.save` and `tta-runtime predict` over files, folders and globs with `--save DIR`.

The files written are read back (the label map with OpenCV, the JSON with json) and compared with what the
runtime returns for the same image; the CLI runs in-process through `main(argv)` except one subprocess run
of the installed module (issue #19, acceptance 5).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tta_runtime import Runtime
from tta_runtime.cli.main import main
from tta_runtime.data.scenes import generate_scene
from tta_runtime.errors import ConfigError
from tta_runtime.hub import DEFAULT_MODEL
from tta_runtime.result import Result

SEGMENTER, CLASSIFIER = "slot-shapes-32", "digits-cnn-bn"


@pytest.fixture(autouse=True)
def _no_user_repositories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTA_RUNTIME_MODELS", raising=False)
    monkeypatch.delenv("TTA_RUNTIME_ADAPTERS", raising=False)


@pytest.fixture(scope="module")
def segmenter() -> Runtime:
    return Runtime.from_pretrained(SEGMENTER)


@pytest.fixture(scope="module")
def classifier() -> Runtime:
    return Runtime.from_pretrained(CLASSIFIER)


def _scene_png(path: pathlib.Path, index: int, size: int = 32) -> pathlib.Path:
    """A generated scene (RGB) written as a PNG (BGR on disk, as cv2 writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = generate_scene("in_dist", seed=7, index=index, size=size).image
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _digit_png(path: pathlib.Path, digit: int) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((32, 32, 3), np.uint8)
    cv2.putText(img, str(digit), (7, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
    assert cv2.imwrite(str(path), img)
    return path


def _labels(path: pathlib.Path) -> np.ndarray:
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert labels is not None and labels.dtype == np.uint8 and labels.ndim == 2, path  # single channel, 8 bit
    return labels


# ----------------------------------------------------------------------------------------------------
# Result.save


def test_segmenter_result_save_writes_lossless_labels_overlay_and_json(segmenter: Runtime, tmp_path: pathlib.Path) -> None:
    image = generate_scene("in_dist", seed=3, index=0, size=48).image
    res = segmenter.predict(image)
    files = res.save(tmp_path / "out" / "cat")  # a stem; its folder is made
    assert files == {
        "labels": tmp_path / "out" / "cat.labels.png",
        "overlay": tmp_path / "out" / "cat.overlay.png",
        "json": tmp_path / "out" / "cat.json",
    }
    assert np.array_equal(_labels(files["labels"]), res.segmentation)
    overlay = cv2.imread(str(files["overlay"]), cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.cvtColor(overlay, cv2.COLOR_BGR2RGB), res.overlay())
    doc = json.loads(files["json"].read_text())
    assert doc.pop("files") == {"labels": "cat.labels.png", "overlay": "cat.overlay.png"}
    assert doc == res.to_dict() and doc["image_size"] == [48, 48]


def test_result_save_path_forms(segmenter: Runtime, tmp_path: pathlib.Path) -> None:
    res = segmenter.predict(generate_scene("in_dist", seed=3, index=1).image)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert res.save(folder)["json"] == folder / "result.json"  # an existing folder: folder/result.*
    assert res.save(f"{tmp_path}/new/")["labels"] == tmp_path / "new" / "result.labels.png"  # trailing separator
    by_json = res.save(tmp_path / "x.v2.json", overlay=False)  # a .json path: the PNGs beside it, no overlay
    assert by_json == {"labels": tmp_path / "x.v2.labels.png", "json": tmp_path / "x.v2.json"}
    assert not (tmp_path / "x.v2.overlay.png").exists()
    assert json.loads(by_json["json"].read_text())["files"] == {"labels": "x.v2.labels.png"}
    assert res.save(tmp_path / "plain.v2")["json"] == tmp_path / "plain.v2.json"  # any other suffix is the stem's
    with pytest.raises(ConfigError, match=r"not the image file .*give e\.g\. .*'"):
        res.save(tmp_path / "mask.png")
    (tmp_path / "busy.json").mkdir()  # a folder where the JSON goes: refused before any file is written
    with pytest.raises(ConfigError, match="is a directory; refusing to replace it"):
        res.save(tmp_path / "busy.json")
    assert not (tmp_path / "busy.labels.png").exists()
    with pytest.raises(ConfigError, match="overlay must be True or False"):
        res.save(tmp_path / "y", overlay="yes")  # type: ignore[arg-type]


def test_classifier_result_save_writes_the_json_with_probabilities(classifier: Runtime, tmp_path: pathlib.Path) -> None:
    res = classifier.predict(cv2.imread(str(_digit_png(tmp_path / "seven.png", 7)), cv2.IMREAD_COLOR)[..., ::-1])
    files = res.save(tmp_path / "seven")
    assert files == {"json": tmp_path / "seven.json"}  # no label map, no overlay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seven.json", "seven.png"]
    doc = json.loads(files["json"].read_text())
    assert doc.pop("files") == {}
    assert doc == res.to_dict(arrays=True) and math.isclose(sum(doc["probs"]), 1.0, rel_tol=1e-5)


def test_result_save_refuses_what_does_not_fit_and_writes_json_without_nan(segmenter: Runtime, tmp_path: pathlib.Path) -> None:
    many = Result(masks=np.zeros((300, 2, 2), np.float32), segmentation=np.array([[0, 1], [256, 299]]))
    with pytest.raises(ConfigError, match=r"slot ids 0\.\.299 of 300 slots; an 8-bit PNG holds ids 0\.\.255"):
        many.save(tmp_path / "many")
    with pytest.raises(ConfigError, match=r"no label map to save \(segmentation shape \(0, 0\)\)"):
        Result().save(tmp_path / "empty")
    assert list(tmp_path.iterdir()) == []
    res = segmenter.predict(generate_scene("in_dist", seed=3, index=2).image)
    res.ood_score = float("nan")  # JSON has no NaN: written as null, and the file stays standard JSON
    text = res.save(tmp_path / "nan")["json"].read_text()
    assert "NaN" not in text and json.loads(text)["ood_score"] is None


# ----------------------------------------------------------------------------------------------------
# predict over many images


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_folder_save_isolates_a_corrupt_image(segmenter: Runtime, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "scenes"
    good = [_scene_png(src / f"s{i}.png", i, size=32 + 8 * i) for i in range(4)]
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing readable
    (src / "notes.txt").write_text("not an image")  # not an image extension: not picked up from a folder
    out = tmp_path / "out"
    code, stdout, stderr = _run(["predict", str(src), "--model", SEGMENTER, "--save", str(out)], capsys)
    assert code == 2  # one image failed
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "Traceback" not in stderr
    assert "5 images: 4 ok, 1 failed" in stdout
    summary = json.loads((out / "summary.json").read_text())
    entries = {pathlib.Path(e["file"]).name: e for e in summary["images"]}
    assert list(entries) == ["broken.png", "s0.png", "s1.png", "s2.png", "s3.png"]  # sorted
    assert entries["broken.png"]["status"] == "error" and "not a readable image" in entries["broken.png"]["error"]
    assert summary["totals"] == {**summary["totals"], "images": 5, "ok": 4, "failed": 1}
    assert summary["model"] == SEGMENTER and summary["adapt"] is False
    for path in good:  # each saved result is the one predict gives for that file alone
        entry, res = entries[path.name], segmenter.predict(str(path))
        assert entry["status"] == "ok" and entry["outputs"] == {
            "labels": f"{path.stem}.labels.png", "overlay": f"{path.stem}.overlay.png", "json": f"{path.stem}.json"}
        assert np.array_equal(_labels(out / entry["outputs"]["labels"]), res.segmentation)
        assert entry["ood_score"] == pytest.approx(res.ood_score, rel=1e-5) and entry["is_ood"] == res.is_ood
        assert entry["num_slots"] == res.num_slots and entry["time_s"] > 0
        assert json.loads((out / f"{path.stem}.json").read_text())["image_size"] == list(res.segmentation.shape)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"s{i}{kind}" for i in range(4) for kind in (".labels.png", ".overlay.png", ".json")] + ["summary.json"])


def test_predict_glob_on_a_classifier_matches_one_by_one_predictions(
    classifier: Runtime, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [_digit_png(tmp_path / "digits" / f"d{i:02d}.png", i % 10) for i in range(11)]  # > one batch of 8
    (tmp_path / "digits" / "d05b.png").write_bytes(b"GIF89a")  # in the first batch: that call fails, then one by one
    _digit_png(tmp_path / "digits" / "other.jpg", 3)  # not matched by the pattern
    code, stdout, stderr = _run(["predict", str(tmp_path / "digits" / "d*.png"), "--model", CLASSIFIER, "-q"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "d05b.png" in stderr
    summary = json.loads(stdout)  # no --save: the summary is printed
    assert [e["file"] for e in summary["images"]] == [str(p) for p in paths[:6]] + [str(tmp_path / "digits" / "d05b.png")] + [
        str(p) for p in paths[6:]]
    assert summary["images"].pop(6)["status"] == "error" and summary["totals"]["failed"] == 1
    for entry, path in zip(summary["images"], paths):
        res = classifier.predict(str(path))
        assert entry["label"] == res.label and entry["confidence"] == pytest.approx(float(res.probs[res.label]), rel=1e-4)
        assert "num_slots" not in entry and "outputs" not in entry


def test_predict_names_cannot_collide(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    a1, a2 = _scene_png(tmp_path / "x" / "a.png", 0), _scene_png(tmp_path / "y" / "a.png", 1)
    a3 = tmp_path / "y" / "A.bmp"
    assert cv2.imwrite(str(a3), cv2.imread(str(a2)))
    summary_img = _scene_png(tmp_path / "y" / "summary.png", 2)  # "summary" is taken by summary.json
    out = tmp_path / "out"
    # the same file twice (a path and a pattern) is predicted once
    argv = ["predict", str(a1), str(tmp_path / "y"), str(tmp_path / "y" / "*.png"), "--save", str(out), "-q"]
    code, stdout, stderr = _run(argv, capsys)
    assert (code, stdout, stderr) == (0, "", "")
    summary = json.loads((out / "summary.json").read_text())
    names = {e["file"]: e["outputs"]["json"] for e in summary["images"]}
    assert names == {str(a1): "a.json", str(a3): "A-2.json", str(a2): "a-3.json", str(summary_img): "summary-2.json"}
    for entry in summary["images"]:  # each JSON is its own image's
        saved = json.loads((out / entry["outputs"]["json"]).read_text())
        assert saved["ood_score"] == pytest.approx(entry["ood_score"], rel=1e-9)


def test_predict_recursive_and_adapt(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    _scene_png(tmp_path / "in" / "top.png", 0)
    _scene_png(tmp_path / "in" / "sub" / "deep.png", 1)
    _scene_png(tmp_path / "in" / ".hidden" / "skip.png", 2)
    recipe = tmp_path / "quick.toml"
    recipe.write_text('method = "slot_reconstruction"\nparams = "all"\nsteps = 2\n')
    code, stdout, _ = _run(["predict", str(tmp_path / "in"), "--json", "-", "-q"], capsys)
    assert code == 0 and [pathlib.Path(e["file"]).name for e in json.loads(stdout)["images"]] == ["top.png"]
    argv = ["predict", str(tmp_path / "in"), "--recursive", "--adapt", "--recipe", str(recipe), "--save", str(tmp_path / "o"), "-q"]
    assert _run(argv, capsys)[0] == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [pathlib.Path(e["file"]).name for e in summary["images"]] == ["deep.png", "top.png"]
    assert summary["adapt"] is True and summary["recipe"] == "quick"
    assert [e["adapt_steps"] for e in summary["images"]] == [2, 2]
    assert json.loads((tmp_path / "o" / "deep.json").read_text())["adaptation"]["steps_run"] == 2


@pytest.mark.parametrize(
    "case", ["empty folder", "no match", "missing", "overlay with several", "save is a file", "overlay on a classifier"])
def test_predict_usage_errors_are_one_line_and_exit_2(case: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    _scene_png(tmp_path / "imgs" / "a.png", 0)
    _scene_png(tmp_path / "imgs" / "b.png", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    t = str(tmp_path)
    argv, expected = {
        "empty folder": ([f"{t}/empty"], "folder '.*empty' holds no image file"),
        "no match": ([f"{t}/imgs/*.jpg"], r"pattern '.*\*\.jpg' matches no image file"),
        "missing": ([f"{t}/imgs/c.png"], "image '.*c.png' does not exist"),
        "overlay with several": ([f"{t}/imgs", "--overlay", f"{t}/o.png"], "2 images were given: use --save DIR"),
        "save is a file": ([f"{t}/imgs", "--save", f"{t}/file"], "--save '.*file' exists and is not a folder"),
        "overlay on a classifier": ([f"{t}/imgs/a.png", "--model", CLASSIFIER, "--overlay", f"{t}/o.png"],
                                    "--overlay draws a segmenter's slot masks; 'digits-cnn-bn' is a classification model"),
    }[case]
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = _run(["predict", *argv], capsys)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert re.search(expected, stderr), stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_predict_help_says_what_the_exit_status_means(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--save DIR" in text and "--recursive" in text and "2 when any failed" in text


def test_entry_point_predict_folder_save(tmp_path: pathlib.Path) -> None:
    """Issue #19, acceptance 5: `tta-runtime predict FOLDER --save OUT`, through the installed module."""
    for i in range(3):
        _scene_png(tmp_path / "in" / f"img{i}.png", i)
    env = {k: v for k, v in os.environ.items() if k not in ("TTA_RUNTIME_MODELS", "TTA_RUNTIME_ADAPTERS")}
    proc = subprocess.run(
        [sys.executable, "-m", "tta_runtime.cli", "predict", "in", "--save", "out"],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 images: 3 ok, 0 failed" in proc.stdout and "out/summary.json" in proc.stdout
    out = tmp_path / "out"
    for i in range(3):
        assert _labels(out / f"img{i}.labels.png").shape == (32, 32)
        assert cv2.imread(str(out / f"img{i}.overlay.png")).shape == (32, 32, 3)
        assert json.loads((out / f"img{i}.json").read_text())["model"] == DEFAULT_MODEL  # no --model: the default
    assert json.loads((out / "summary.json").read_text())["totals"]["ok"] == 3
