"""What every command shares, run for real: `--json PATH|-`, `-q`, one progress bar, one-line errors,
missing extras, and the legacy spellings of the training commands."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tqdm.std

from tta_runtime.cli import models
from tta_runtime.cli.main import main, modern_spelling
from tta_runtime.errors import MissingExtraError
from tta_runtime.hub import (
    DEFAULT_MODEL,
    find_model,
    list_recipes,
    load_card,
    sample_image_path,
)


@pytest.fixture(autouse=True)
def _no_user_repositories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTA_RUNTIME_MODELS", raising=False)
    monkeypatch.delenv("TTA_RUNTIME_ADAPTERS", raising=False)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The description of every tqdm bar created (any tqdm class, however it was imported)."""
    made: list[str] = []
    real = tqdm.std.tqdm.__init__

    def init(self, *args, **kwargs):
        made.append(str(kwargs.get("desc")))
        real(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", init)
    return made


# ----------------------------------------------------------------------------------------------------
# --json PATH writes, --json - prints (stdout is the JSON alone)


def test_list_json_to_stdout_and_to_a_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json", "-"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == {"models": listed["models"], "default_model": DEFAULT_MODEL, "recipes": list(list_recipes())}
    assert DEFAULT_MODEL in listed["models"]
    path = tmp_path / "sub" / "list.json"
    assert main(["list", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("models:") and f"wrote {path}" in out
    assert json.loads(path.read_text()) == listed


def test_info_and_predict_print_json_or_write_it(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = load_card(find_model(None)).model_dump(mode="json")
    assert main(["info", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == card
    assert main(["info", "-q", "--json", str(tmp_path / "card.json")]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "card.json").read_text()) == card
    assert main(["predict", str(sample_image_path()), "--json", str(tmp_path / "res.json")]) == 0
    assert f"wrote {tmp_path / 'res.json'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "res.json").read_text())["model"] == DEFAULT_MODEL


def test_eval_json_dash_keeps_stdout_for_the_json(capsys: pytest.CaptureFixture[str], bars: list[str]) -> None:
    argv = ["eval", "--splits", "in_dist", "--n-images", "1", "--steps", "1", "--baseline", "none", "--json", "-"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but the report on stdout
    assert report["command"] == "tta-runtime " + " ".join(argv) and list(report["splits"]) == ["in_dist"]
    assert "FG-ARI before" in captured.err  # the table went to stderr
    assert len(bars) == 1, bars  # one bar for the whole evaluation


def test_doctor_json_dash_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "torch" in report and "present" in report["opencv"]


# ----------------------------------------------------------------------------------------------------
# progress: one bar per command, none with --no-progress or -q


def _stream_argv(tmp_path: pathlib.Path) -> list[str]:
    return ["stream", "--generate", str(tmp_path / "g.mp4"), "--frames", "4", "--size", "32", "--steps-per-frame", "1"]


def test_stream_shows_one_bar_for_both_passes(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], bars: list[str]) -> None:
    assert main([*_stream_argv(tmp_path), "--compare"]) == 0
    assert bars == ["stream"]
    err = capsys.readouterr().err
    assert "8/8" in err  # both passes of 4 frames on the one bar


def test_quiet_stream_prints_nothing_but_the_json(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], bars: list[str]) -> None:
    assert main([*_stream_argv(tmp_path), "-q", "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["stats"]["frames"]["processed"] == 4
    assert bars == [] and captured.err == ""
    assert main([*_stream_argv(tmp_path), "--no-progress", "--json", str(tmp_path / "s.json")]) == 0
    assert bars == [] and (tmp_path / "s.json").is_file()


# ----------------------------------------------------------------------------------------------------
# errors: one line, exit 2, no traceback; a missing extra says what to install


def test_our_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(args):
        raise MissingExtraError("ONNX export needs the 'onnx' module, which is not installed: pip install 'tta-runtime[onnx]'")

    monkeypatch.setattr(models, "_list", missing)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "tta-runtime[onnx]" in err


@pytest.mark.parametrize("module, extra", [("onnxruntime", "onnx"), ("tensorrt", "tensorrt"), ("sklearn.datasets", "digits")])
def test_an_unguarded_missing_extra_names_the_extra(
    module: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(models, "_list", handler)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install 'tta-runtime[{extra}]'" in err and "`tta-runtime list`" in err


def test_a_missing_module_that_is_no_extra_is_a_bug_not_an_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(args):
        raise ModuleNotFoundError("No module named 'tta_runtime.nowhere'", name="tta_runtime.nowhere")

    monkeypatch.setattr(models, "_list", handler)
    with pytest.raises(ModuleNotFoundError):
        main(["list"])


def test_export_without_onnx_stays_in_help_and_names_the_extra(tmp_path: pathlib.Path) -> None:
    script = (
        "import sys\n"
        "for m in ('onnx', 'onnxruntime', 'tensorrt'):\n"
        "    sys.modules[m] = None  # as if not installed\n"
        "from tta_runtime.cli.main import main\n"
        "try:\n"
        "    main(['export', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"sys.exit(main(['export', '-q', '--out', {str(tmp_path / 'x.onnx')!r}]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TTA_RUNTIME_MODELS", "TTA_RUNTIME_ADAPTERS")}
    proc = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "usage: tta-runtime export" in proc.stdout
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install 'tta-runtime[onnx]'" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------
# legacy spellings of the training commands


@pytest.mark.parametrize(
    "old, new",
    [
        (["train", "--out", "m", "--steps", "3"], ["train", "segmenter", "--out", "m", "--steps", "3"]),
        (["-v", "train", "--out", "m"], ["-v", "train", "segmenter", "--out", "m"]),
        (["train-feedforward", "--steps", "3"], ["train", "unet", "--steps", "3"]),
        (["prune", "train", "--r", "0.6"], ["train", "ftwt", "--r", "0.6"]),
        (["train", "--help"], ["train", "--help"]),
        (["train", "-v", "unet"], ["train", "-v", "unet"]),
        (["train", "classifier", "--out", "m"], ["train", "classifier", "--out", "m"]),
        (["eval", "--n-images", "2"], ["eval", "--n-images", "2"]),
    ],
)
def test_legacy_spellings_map_to_the_train_group(old: list[str], new: list[str]) -> None:
    assert modern_spelling(old) == new


def test_legacy_prune_train_still_validates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "train", "--r", "1.5"]) == 2
    assert "--r must be in (0, 1]" in capsys.readouterr().err
