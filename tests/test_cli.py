"""The command line: every subcommand run for real, its output files read back, its errors without tracebacks.

Most tests call `tta_runtime.cli.main.main(argv)` in-process (fast); two run the real entry points in a
subprocess to check that the installed command and `python -m tta_runtime.cli` behave the same. The
options every command shares are in test_cli_options.py, every `--help` in test_cli_help.py.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tta_runtime.training.slot as train_mod
from tta_runtime import Runtime
from tta_runtime.cli.main import main
from tta_runtime.evaluation.segmentation import strip_timing
from tta_runtime.hub import (
    DEFAULT_MODEL,
    find_model,
    list_recipes,
    load_card,
    sample_image_path,
    sha256_file,
)
from tta_runtime.training.checkpoint import CKPT_FILE, checkpoint_progress


@pytest.fixture(autouse=True)
def _no_user_repositories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTA_RUNTIME_MODELS", raising=False)
    monkeypatch.delenv("TTA_RUNTIME_ADAPTERS", raising=False)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TTA_RUNTIME_MODELS", "TTA_RUNTIME_ADAPTERS")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def quick_recipe(tmp_path: pathlib.Path) -> pathlib.Path:
    """A 2-step Slot-TTA recipe file, so that `--adapt` runs take a fraction of a second."""
    path = tmp_path / "quick.toml"
    path.write_text('method = "slot_reconstruction"\nparams = "all"\nsteps = 2\n')
    return path


@pytest.fixture
def wide_image(tmp_path: pathlib.Path) -> pathlib.Path:
    """A 40x60 PNG cut from the bundled sample: not square and not the model's size."""
    bgr = cv2.imread(str(sample_image_path()), cv2.IMREAD_COLOR)
    path = tmp_path / "wide.png"
    assert cv2.imwrite(str(path), bgr[10:50, 20:80])
    return path


# ----------------------------------------------------------------------------------------------------
# demo


def test_demo_prints_before_after_and_writes_its_files(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"model   {DEFAULT_MODEL}" in out
    assert re.search(r"^\s+before\s+after$", out, re.M)
    assert re.search(r"^recon MSE\s+\d+\.\d{5}\s+\d+\.\d{5}$", out, re.M)
    assert "for 3 steps in" in out
    # Calibrated models name the scorer and threshold; uncalibrated ones report the card's z-score.
    ood = re.search(r"^OOD\s+score ([+-]\d+\.\d\d) \((\w+, threshold|recon_mse_z:)", out, re.M)
    assert ood is not None

    result = json.loads((out_dir / "result.json").read_text())
    before, after = result["before"], result["after"]
    assert before["adaptation"] is None
    assert after["adaptation"]["steps_run"] == 3 and len(after["adaptation"]["losses"]) == 3
    sample = cv2.imread(str(sample_image_path(DEFAULT_MODEL)), cv2.IMREAD_COLOR)  # the default model's own sample
    side = sample.shape[0]
    assert before["image_size"] == after["image_size"] == [side, side] and "demo_sample.png" in out
    assert f"{before['ood_score']:+.2f}" == ood.group(1)

    overlay = cv2.imread(str(out_dir / "overlay.png"), cv2.IMREAD_UNCHANGED)
    assert overlay is not None and overlay.ndim == 3 and overlay.shape[2] == 3
    scale = -(-192 // side)  # demo_figure's integer nearest-neighbour scale to at least 192 pixels
    tile, margin = scale * side, 8  # the sample is shown in five tiles side by side
    h, w = overlay.shape[:2]
    assert w >= 4 * tile + 300 + 6 * margin and tile + 2 * margin < h < 2 * tile
    # The first tile is the input itself, enlarged (nearest neighbour), under its caption.
    big = np.repeat(np.repeat(sample, scale, axis=0), scale, axis=1)
    np.testing.assert_array_equal(overlay[h - margin - tile : h - margin, margin : margin + tile], big)

    loss = cv2.imread(str(out_dir / "loss.png"), cv2.IMREAD_UNCHANGED)
    assert loss is not None and loss.ndim == 3 and loss.shape[2] == 3
    assert (out_dir / "slots_after.png").is_file()


# ----------------------------------------------------------------------------------------------------
# list, info


def test_list_prints_models_and_recipes(capsys: pytest.CaptureFixture[str]):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("models:") and f"{DEFAULT_MODEL} (default)" in lines[0]
    assert lines[1] == "recipes: " + ", ".join(list_recipes())
    assert {"slot_tta", "slot_tta_fast", "entropy"} <= set(lines[1].removeprefix("recipes: ").split(", "))


def test_info_prints_the_card_as_json(capsys: pytest.CaptureFixture[str]):
    assert main(["info"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == DEFAULT_MODEL
    assert card == load_card(find_model(DEFAULT_MODEL)).model_dump(mode="json")


def test_info_unknown_model_is_an_error_line(capsys: pytest.CaptureFixture[str]):
    assert main(["info", "slot-shapes-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'slot-shapes-3'")
    assert "did you mean 'slot-shapes-32'?" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------
# predict


def test_predict_adapt_writes_overlay_at_image_size(
    tmp_path: pathlib.Path, wide_image: pathlib.Path, quick_recipe: pathlib.Path, capsys: pytest.CaptureFixture[str]
):
    overlay = tmp_path / "x.png"
    argv = ["predict", str(wide_image), "--adapt", "--recipe", str(quick_recipe), "--overlay", str(overlay)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["model"] == DEFAULT_MODEL and res["image_size"] == [40, 60]
    assert res["adaptation"]["recipe"] == "quick" and res["adaptation"]["steps_run"] == 2
    assert f"wrote {overlay}" in captured.err
    picture = cv2.imread(str(overlay), cv2.IMREAD_UNCHANGED)
    assert picture is not None and picture.shape == (40, 60, 3)


def test_predict_without_adapt_reports_no_adaptation(wide_image: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    assert main(["predict", str(wide_image)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["adaptation"] is None and res["image_size"] == [40, 60]
    assert res["num_slots"] == load_card(find_model(DEFAULT_MODEL)).segmenter.num_slots


def test_predict_missing_file_is_an_error_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "missing.png"
    assert main(["predict", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and "missing.png" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_entry_point_missing_file_exits_2_without_traceback(tmp_path: pathlib.Path):
    proc = subprocess.run(
        [sys.executable, "-m", "tta_runtime.cli", "predict", "missing.png"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "missing.png" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_console_script_points_at_main():
    script = pathlib.Path(sys.executable).with_name("tta-runtime")
    if not script.is_file():
        pytest.skip("the tta-runtime console script is not installed in this environment")
    text = script.read_text()
    assert "from tta_runtime.cli.main import main" in text and "main()" in text


# ----------------------------------------------------------------------------------------------------
# eval

EVAL_MODEL = "slot-shapes-32"  # the small segmenter: its world's splits, its U-Net baseline
EVAL_ARGS = ["eval", "--model", EVAL_MODEL, "--splits", "in_dist,textured_background", "--n-images", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The report of one small evaluation, written by `eval --json`."""
    path = tmp_path_factory.mktemp("eval") / "e.json"
    assert main([*EVAL_ARGS, "--json", str(path)]) == 0
    return path


def test_eval_json_has_every_variant_and_gain_intervals(eval_json: pathlib.Path):
    report = json.loads(eval_json.read_text())
    assert report["model"] == EVAL_MODEL
    # no --recipe: the model card's default recipe
    assert report["recipe"]["name"] == load_card(find_model(EVAL_MODEL)).default_recipe and report["recipe"]["steps"] == 2
    # the fair baselines by default: entropy on the norm layers; the U-Net with and without its own Tent
    assert report["baseline"]["name"] == "entropy_norm" and report["baseline"]["steps"] == 2
    assert report["baseline"]["params"] == "norm"
    assert report["feedforward_recipe"]["name"] == "unet_tent" and report["feedforward_recipe"]["params"] == "norm"
    assert list(report["splits"]) == ["in_dist", "textured_background"]
    for split in report["splits"].values():
        assert split["n_images"] == 2
        for variant in ("before", "slot_tta", "entropy", "oracle", "feedforward", "feedforward_tta"):
            for metric in ("fg_ari", "ari", "miou"):
                s = split[variant][metric]
                lo, hi = s["ci95"]
                assert lo <= s["mean"] <= hi
                assert len(split["per_image"][variant][metric]) == 2
                assert s["mean"] == pytest.approx(np.mean(split["per_image"][variant][metric]), abs=1e-5)
        for gain in ("slot_tta_gain_fg_ari", "entropy_gain_fg_ari", "feedforward_tta_gain_fg_ari"):
            lo, hi = split[gain]["ci95"]
            assert lo <= split[gain]["mean"] <= hi
        # The oracle picks the best step by FG-ARI, so it is never worse than the last step.
        for a, b in zip(split["per_image"]["oracle"]["fg_ari"], split["per_image"]["slot_tta"]["fg_ari"], strict=True):
            assert a >= b
    assert "slot_tta_fg_ari_mean_over_ood_splits" in report["summary"]
    assert "feedforward_tta_fg_ari_mean_over_ood_splits" in report["summary"]
    for variant in ("feedforward", "feedforward_tta"):  # the claim's paired test against each feed-forward variant
        diff = report["summary"][f"slot_tta_minus_{variant}_fg_ari_pooled_ood_images"]
        slot = report["splits"]["textured_background"]["per_image"]["slot_tta"]["fg_ari"]
        other = report["splits"]["textured_background"]["per_image"][variant]["fg_ari"]
        assert diff["n_images"] == 2 and diff["mean"] == pytest.approx(np.mean(slot) - np.mean(other), abs=1e-5)
    for split in report["splits"].values():
        assert split["timing"]["feedforward_tta_seconds_per_image"] > 0


def test_eval_report_records_a_runnable_command(eval_json: pathlib.Path):
    assert json.loads(eval_json.read_text())["command"] == "tta-runtime " + " ".join(
        [*EVAL_ARGS, "--json", str(eval_json)]
    )


def test_eval_check_reproduces_exactly(eval_json: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    again = tmp_path / "again.json"
    assert main([*EVAL_ARGS, "--json", str(again), "--check", str(eval_json)]) == 0
    assert f"reproduced {eval_json} exactly" in capsys.readouterr().out
    a, b = strip_timing(json.loads(eval_json.read_text())), strip_timing(json.loads(again.read_text()))
    a.pop("command"), b.pop("command")
    assert a == b


def test_eval_check_detects_a_changed_number(eval_json: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    report = json.loads(eval_json.read_text())
    report["splits"]["in_dist"]["per_image"]["before"]["fg_ari"][0] += 0.001
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(report))
    assert main([*EVAL_ARGS, "--check", str(changed)]) == 1
    assert f"MISMATCH: the evaluation differs from {changed}" in capsys.readouterr().err


def test_eval_check_is_not_fooled_by_json_to_the_same_path(eval_json: pathlib.Path, tmp_path: pathlib.Path):
    report = json.loads(eval_json.read_text())
    tampered = copy.deepcopy(report)
    tampered["splits"]["in_dist"]["before"]["fg_ari"]["mean"] += 0.5
    path = tmp_path / "e.json"
    path.write_text(json.dumps(tampered))
    # Writing the new report over the one being checked must still compare against the old one. (A smaller
    # evaluation than the fixture's keeps this quick: it differs from the tampered file either way.)
    small = ["eval", "--model", EVAL_MODEL, "--splits", "in_dist", "--n-images", "1", "--steps", "1", "--baseline", "none"]
    assert main([*small, "--json", str(path), "--check", str(path)]) == 1


# ----------------------------------------------------------------------------------------------------
# train

BATCH = 8


def _train_args(tmp: pathlib.Path, steps: int) -> list[str]:
    return [
        "train", "segmenter", "--out", str(tmp / "m"), "--run-dir", str(tmp / "run"), "--steps", str(steps), "--batch", str(BATCH),
        "--resolution", "16", "--slots", "5", "--encoder-channels", "8", "--eval-every", "3", "--ckpt-every", "1",
        "--name", "tiny-trained",
    ]


def _ckpt_step(run_dir: pathlib.Path) -> int:
    return checkpoint_progress(run_dir / CKPT_FILE)[0]


_REAL_LOAD_SCENES = train_mod.load_scenes


class _Killed(Exception):
    """Stands in for the process being killed in the middle of training."""


def _spy_scenes(monkeypatch: pytest.MonkeyPatch, starts: list[int], kill_at: int | None = None) -> None:
    """Record the first scene index of every training batch (validation does not go through `load_scenes`)."""
    real = _REAL_LOAD_SCENES  # not the attribute: an earlier spy may still be patched in

    def spy(split: str, indices, seed: int, size: int):
        start = int(indices[0])
        if start == kill_at:
            raise _Killed
        starts.append(start)
        return real(split, indices, seed, size)

    monkeypatch.setattr(train_mod, "load_scenes", spy)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """`train --steps 3` run to completion; returns its temp folder (model in m/, run in run/)."""
    tmp = tmp_path_factory.mktemp("train")
    assert main(_train_args(tmp, 3)) == 0
    return tmp


def test_train_writes_a_loadable_model_folder(trained: pathlib.Path):
    folder, run = trained / "m", trained / "run"
    card = load_card(folder)
    assert card.name == "tiny-trained"
    assert (card.segmenter.resolution, card.segmenter.num_slots, card.segmenter.encoder_channels) == (16, 5, 8)
    assert card.preprocessing.size == 16
    assert card.weights.sha256 == sha256_file(folder / card.weights.file)
    assert card.training["config"]["steps"] == 3 and card.training["config"]["batch"] == BATCH
    assert card.ood is not None and card.ood.n_images == 256
    assert (folder / "train_log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()

    rt = Runtime.from_pretrained(folder)
    res = rt.predict(np.full((16, 16, 3), 128, np.uint8))
    assert res.masks.shape == (5, 16, 16)
    np.testing.assert_allclose(res.masks.sum(0), 1.0, atol=1e-5)
    assert _ckpt_step(run) == 3
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3] and "val" in records[0]  # logged at the eval step only


def test_train_card_records_a_runnable_command(trained: pathlib.Path):
    assert load_card(trained / "m").training["command"] == "tta-runtime " + " ".join(_train_args(trained, 3))


def test_train_legacy_spelling_resumes_the_same_run(trained: pathlib.Path, tmp_path: pathlib.Path):
    # `tta-runtime train --out ...` (before the `train` group; shipped cards record it) is `train segmenter`
    shutil.copytree(trained / "run", tmp_path / "run")
    legacy = [a for a in _train_args(tmp_path, 3) if a != "segmenter"]
    assert main(legacy) == 0  # the finished run: nothing left to train, the folder is written
    assert load_card(tmp_path / "m").training["command"] == "tta-runtime " + " ".join(_train_args(tmp_path, 3))
    straight = load_file(str(trained / "m" / "weights.safetensors"))
    again = load_file(str(tmp_path / "m" / "weights.safetensors"))
    for k in straight:
        torch.testing.assert_close(again[k], straight[k], rtol=0, atol=0)


def test_train_resumes_an_interrupted_run(trained: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    starts: list[int] = []
    _spy_scenes(monkeypatch, starts, kill_at=2 * BATCH)  # dies while fetching step 3's batch
    with pytest.raises(_Killed):
        main(_train_args(tmp_path, 3))
    assert starts == [0, BATCH] and _ckpt_step(tmp_path / "run") == 2
    assert not (tmp_path / "m").exists()

    starts.clear()
    _spy_scenes(monkeypatch, starts)
    assert main(_train_args(tmp_path, 3)) == 0
    assert starts == [2 * BATCH]  # only step 3 was trained: the run picked up at its checkpoint
    assert _ckpt_step(tmp_path / "run") == 3
    # Resuming is exact: the same weights as the run that was never interrupted.
    resumed, straight = load_file(str(tmp_path / "m" / "weights.safetensors")), load_file(str(trained / "m" / "weights.safetensors"))
    assert set(resumed) == set(straight)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)


def test_train_with_more_steps_continues_from_the_checkpoint(trained: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copytree(trained / "run", tmp_path / "run")  # leave the module's run untouched
    starts: list[int] = []
    _spy_scenes(monkeypatch, starts)
    assert main(_train_args(tmp_path, 5)) == 0
    assert starts == [3 * BATCH, 4 * BATCH]  # steps 4 and 5 only, not a restart from 0
    assert _ckpt_step(tmp_path / "run") == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 5]  # the first run's eval, then the final one
    assert load_card(tmp_path / "m").training["config"]["steps"] == 5


def test_train_resume_with_other_settings_is_an_error_line(
    trained: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
):
    shutil.copytree(trained / "run", tmp_path / "run")
    args = _train_args(tmp_path, 3)
    args[args.index("--encoder-channels") + 1] = "16"  # another architecture: the checkpoint cannot fit
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and CKPT_FILE in err


def test_train_invalid_flag_is_an_error_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    args = _train_args(tmp_path, 3)
    args[args.index("--resolution") + 1] = "7"  # below SegmenterConfig's minimum of 8
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "resolution" in err


def test_train_with_too_few_slots_for_the_scenes_fails_cleanly(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]):
    # in_dist scenes hold up to 4 objects + background: the matched mask loss needs K >= 5.
    args = _train_args(tmp_path, 3)
    args[args.index("--slots") + 1] = "3"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "num_slots=3" in err and "--slots 5" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / "run").exists()  # refused before creating the run folder


def test_eval_in_worker_processes_gives_the_same_numbers(tmp_path: pathlib.Path) -> None:
    args = ["eval", "--model", EVAL_MODEL, "--splits", "in_dist,unseen_colours", "--n-images", "2", "--steps", "2", "--baseline", "none"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    assert main([*args, "--jobs", "2", "--check", str(tmp_path / "one.json")]) == 0


def test_train_init_from_starts_a_fine_tuning_stage_from_the_weights(
    trained: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    starts: list[int] = []
    _spy_scenes(monkeypatch, starts)
    # a learning rate too small to move anything: the stage must end where its initial weights are
    args = _train_args(tmp_path, 2) + ["--init-from", str(trained / "run" / CKPT_FILE), "--data-start", "1000",
                                       "--warmup", "0", "--lr", "1e-12"]
    assert main(args) == 0
    stage0 = load_file(str(trained / "m" / "weights.safetensors"))
    stage1 = load_file(str(tmp_path / "m" / "weights.safetensors"))
    for k in stage0:
        torch.testing.assert_close(stage1[k], stage0[k], rtol=0, atol=1e-6)
    assert starts == [1000, 1000 + BATCH]  # fresh scenes from --data-start
    assert load_card(tmp_path / "m").training["config"]["init_from"] == str(trained / "run" / CKPT_FILE)
    # a file that is not a checkpoint: one error line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(_train_args(tmp_path / "b", 2) + ["--init-from", str(bad)]) == 2
    assert "init_from" in capsys.readouterr().err


def test_train_stop_at_then_resume_equals_the_straight_run(trained: pathlib.Path, tmp_path: pathlib.Path):
    assert main(_train_args(tmp_path, 3) + ["--stop-at", "2"]) == 0
    assert _ckpt_step(tmp_path / "run") == 2
    assert main(_train_args(tmp_path, 3)) == 0  # the schedule is the 3-step one throughout
    resumed, straight = load_file(str(tmp_path / "m" / "weights.safetensors")), load_file(str(trained / "m" / "weights.safetensors"))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)
    assert main(_train_args(tmp_path / "x", 3) + ["--stop-at", "4"]) == 2
