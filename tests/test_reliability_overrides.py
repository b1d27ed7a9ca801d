"""Issue #23, overrides, CLI and streams: every bad value ends in a typed error (CLI: one line, exit 2).

Regression tests for the cases the issue lists (strict types, ranges, the cap on work per call, card
bounds, unknown keywords, on_step, the streams' first frame / file:// URLs / FIFOs / pickled ground
truth, the CLI tracebacks), then property-based fuzzing (hypothesis, derandomized) of the overrides of
`from_pretrained`, `adapt_and_predict`, `load_recipe` and of the CLI's argv, in-process. Every case must
end in `ConfigError`/`InvalidInputError`/`ModelLoadError` (or another `TTARuntimeError`), exit status 2
with one error line, or a success; the weights stay bit-exact.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tta_runtime as tta
from tta_runtime.cli.main import main
from tta_runtime.config import (
    MAX_STEPS,
    AdaptConfig,
    ClassifierConfig,
    ModelCard,
    Preprocessing,
    SegmenterConfig,
    WeightsSpec,
    validate,
)
from tta_runtime.options import RuntimeOptions
from tta_runtime.deploy.options import check_n_verify, parse_dynamic
from tta_runtime.errors import ConfigError, InvalidInputError, TTARuntimeError
from tta_runtime.hub import list_recipes, load_recipe, sha256_file
from tta_runtime.video import StreamError, load_ground_truth, stream

TYPED = (TTARuntimeError,)
TINY = SegmenterConfig(resolution=16, num_slots=3, slot_dim=16, encoder_channels=8, encoder_layers=2, decoder_width=16,
                       decoder_blocks=1)


def _tiny_folder(folder: pathlib.Path) -> pathlib.Path:
    from tta_runtime.models.segmenter import SlotSegmenter

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SlotSegmenter(TINY)
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = ModelCard(name="tiny-test", segmenter=TINY, preprocessing=Preprocessing(size=16),
                     weights=WeightsSpec(file=weights.name, sha256=sha256_file(weights)))
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json")))
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Thousands of tiny calls: one intra-op thread each is faster than several contending for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return _tiny_folder(tmp_path_factory.mktemp("tiny-overrides"))


@pytest.fixture(scope="module")
def rt(tiny_dir: pathlib.Path) -> tta.Runtime:
    return tta.Runtime.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli-files")
    img = d / "img.png"
    cv2.imwrite(str(img), np.full((16, 16, 3), 120, np.uint8))
    np.savez(d / "obj.npz", instances=np.array([object()] * 3, dtype=object))
    (d / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    fifo = d / "fifo"
    os.mkfifo(fifo)
    return {"img": str(img), "obj": str(d / "obj.npz"), "bin": str(d / "bin.json"), "fifo": str(fifo), "dir": str(d)}


def state_of(runtime: tta.Runtime) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in runtime.model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`main(argv)` in-process: (exit status, stderr); argparse's exits included."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and lines[-1].startswith("error:"), err
    for n in needles:
        assert n in err, (n, err)


# ----------------------------------------------------------------------------------------------------
# Strict types and ranges


@pytest.mark.parametrize("kw", [{"steps": "3"}, {"steps": True}, {"lr": "0.1"}, {"steps": 2.0}, {"restore_prob": "0"},
                                {"seed": 2**64}, {"seed": -1}, {"weight_decay": 1e308}, {"lr": 1e9}, {"lr": math.nan},
                                {"steps": MAX_STEPS + 1}, {"steps": 100_000}, {"time_budget_ms": math.inf},
                                {"execution": {"compile_backend": "x"}}, {"recipe": 123}, {"recipe": None},
                                {"max_pixels": True}, {"load_calibration": "yes"}])
def test_overrides_are_strict_and_bounded(rt: tta.Runtime, tiny_dir: pathlib.Path, kw: dict[str, Any]) -> None:
    before = state_of(rt)
    with pytest.raises(ConfigError):
        rt.adapt_and_predict(np.zeros((16, 16, 3), np.uint8), **kw)
    with pytest.raises(ConfigError):
        tta.Runtime.from_pretrained(tiny_dir, **kw)
    assert same_state(before, state_of(rt))


def test_error_messages_name_the_field_and_the_allowed_values(tiny_dir: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"compile_backend.*'inductor', 'eager', 'aot_eager' or 'cudagraphs'.*got 'x'"):
        tta.Runtime.from_pretrained(tiny_dir, execution={"compile_backend": "x"})
    with pytest.raises(ConfigError, match=r"steps: Input should be a valid integer.*got '3'"):
        load_recipe("slot_tta", steps="3")
    with pytest.raises(ConfigError, match=r"steps: Input should be less than or equal to 10000"):
        load_recipe("slot_tta", steps=100_000)
    with pytest.raises(ConfigError, match=r"optimizer='sam'.*classifiers only"):
        tta.Runtime.from_pretrained(tiny_dir, optimizer="sam")


def test_sam_on_a_segmenter_is_refused_per_call_too(rt: tta.Runtime) -> None:
    before = state_of(rt)
    with pytest.raises(ConfigError, match="classifiers only"):
        rt.adapt_and_predict(np.zeros((16, 16, 3), np.uint8), optimizer="sam", steps=1)
    assert same_state(before, state_of(rt))


def test_an_int_is_a_float_and_files_still_parse() -> None:
    assert load_recipe("slot_tta", lr=1, steps=2).lr == 1.0
    assert validate(AdaptConfig, {"lr": np.float32(0.5), "steps": np.int64(3), "seed": np.int64(2**40)}, "r").steps == 3
    for name in list_recipes():
        load_recipe(name)
    assert validate(RuntimeOptions, {"max_pixels": 100}, "o").max_pixels == 100


def test_on_step_must_be_callable(rt: tta.Runtime) -> None:
    before = state_of(rt)
    for bad in (5, "print", [len]):
        with pytest.raises(ConfigError, match="on_step must be a callable"):
            rt.adapt_and_predict(np.zeros((16, 16, 3), np.uint8), on_step=bad, steps=2)
    assert same_state(before, state_of(rt))


# ----------------------------------------------------------------------------------------------------
# Caps on work, card bounds, unknown keywords


def test_export_limits() -> None:
    for bad in (0, 10**7, True, 2.0, "20"):
        with pytest.raises(ConfigError, match="n_verify must be an int from 1 to 1000"):
            check_n_verify(bad)
    assert check_n_verify(20) == 20
    for dyn in ("size=16:100000", {"batch": (1, 10**6)}, {"size": (16, True)}):
        with pytest.raises(ConfigError):
            parse_dynamic(dyn)
    assert parse_dynamic("batch=1:16,size=16:128").size == (16, 128)


@pytest.mark.parametrize("widths", [[-5], [0], [200000, 200000], [4096, 4096, 4096]])
def test_card_widths_are_bounded_before_building(widths: list[int]) -> None:
    card = {"name": "x", "task": "classification", "architecture": "cnn_classifier",
            "classifier": {"resolution": 32, "widths": widths, "num_classes": 10}, "preprocessing": {"size": 32},
            "weights": {"file": "w.safetensors", "sha256": "0" * 64}}
    with pytest.raises(ConfigError, match="widths"):
        validate(ModelCard, card, "model card")


def test_parameter_count_matches_the_built_model() -> None:
    from tta_runtime.models.classifier import CNNClassifier

    for cfg in (ClassifierConfig(), ClassifierConfig(widths=[8], rotation_head=False), ClassifierConfig(widths=[16, 8])):
        assert cfg.parameter_count() == sum(p.numel() for p in CNNClassifier(cfg).parameters())


def test_unknown_stream_keywords_are_a_config_error(rt: tta.Runtime) -> None:
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ConfigError, match=r"stream\(\) got unknown keyword\(s\) \['polcy'\]; it accepts .*'policy'"):
        rt.stream(frames, polcy="all")
    with pytest.raises(ConfigError, match="unknown keyword"):
        stream(rt, frames, bogus=1)


# ----------------------------------------------------------------------------------------------------
# Streams


def test_a_first_frame_over_max_pixels_is_skipped_and_counted(tiny_dir: pathlib.Path) -> None:
    small = tta.Runtime.from_pretrained(tiny_dir, max_pixels=32 * 32)
    frames = [np.zeros((48, 48, 3), np.uint8)] + [np.full((24, 24, 3), 90, np.uint8)] * 3
    with stream(small, frames, adapt="never") as s:
        out = list(s)
    assert len(out) == 3 and s.stats.frames_invalid == 1 and s.stats.frame_size == (24, 24)
    assert any("max_pixels" in w for w in s.stats.warnings)


def test_a_file_url_is_a_file_every_frame_processed(rt: tta.Runtime, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 20.0, (16, 16))
    for i in range(12):  # read as a live URL ('latest', buffer 1), most of these were dropped
        writer.write(np.full((16, 16, 3), i * 5, np.uint8))
    writer.release()
    with stream(rt, path.as_uri(), adapt="never") as s:
        n = sum(1 for _ in s)
    assert n == 12 and s.stats.frames_dropped == 0 and s.stats.policy == "all" and s.stats.source_kind == "file"


def test_a_fifo_source_is_refused_as_not_a_regular_file(rt: tta.Runtime, files: dict[str, str]) -> None:
    for src in (files["fifo"], pathlib.Path(files["fifo"]).as_uri()):
        with pytest.raises(StreamError, match="FIFO.*not a regular file"):
            stream(rt, src)
    with pytest.raises(StreamError, match="does not exist"):
        stream(rt, files["dir"] + "/missing.mp4")


def test_ground_truth_never_unpickles(files: dict[str, str]) -> None:
    with pytest.raises(InvalidInputError, match="allow_pickle=False|Object arrays"):
        load_ground_truth(files["obj"])
    with pytest.raises(InvalidInputError, match="not a regular file"):
        load_ground_truth(files["fifo"])
    with pytest.raises(InvalidInputError, match="integer instance maps"):
        load_ground_truth(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InvalidInputError, match="got int"):
        load_ground_truth(5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# The CLI: one line, exit 2


def cli_cases(f: dict[str, str]) -> list[tuple[list[str], str]]:
    return [
        (["demo", "--model", "digits-cnn-bn", "--no-progress"], "slot segmenter"),
        (["predict", f["img"], "--overlay", "out.xyz"], "ending in .png"),
        (["predict", f["img"], "--json", "/dev/null"], "not a regular file"),
        (["bench", "tta", "--batch-sizes", "0"], "--batch-sizes"),
        (["train", "unet", "--steps", "-1"], "steps"),
        (["train-feedforward", "--steps", "-1"], "steps"),
        (["export", "--dynamic", "size=16:100000"], "<= 4096"),
        (["export", "--n-verify", "10000000"], "n_verify"),
        (["stream", "--generate", f["dir"] + "/g.mp4", "--frames", "2", "--size", "32", "--ground-truth", f["obj"],
          "--no-progress"], "ground truth"),
        (["stream", f["fifo"]], "FIFO"),
        (["eval", "--check", f["bin"], "--no-progress"], "--check"),
        (["ood", "fit", "--tpr", "2"], "--tpr"),
        (["bench", "gate", "--n-images", "0"], "--n-images"),
        (["bench", "adapt", "--timing-size", "0"], "--timing-size"),
        (["bench", "prune", "--calls", "0"], "--calls"),
        (["train", "ftwt", "--r", "0.5", "--static-quantile", "5"], "--static-quantile"),
        (["predict"], "required"),
        (["predict", f["img"], "--steps", "3"], "unrecognized"),
    ]


def test_cli_errors_are_one_line_and_exit_2(files: dict[str, str], capsys: pytest.CaptureFixture[str],
                                            tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argv, needle in cli_cases(files):
        code, err = run_cli(argv, capsys)
        assert_one_error_line(code, err, needle)


def test_an_unexpected_exception_is_a_bug_with_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tta_runtime.cli import models

    def handler(args: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "_list", handler)
    monkeypatch.setattr(sys, "argv", ["tta-runtime"])
    with pytest.raises(RuntimeError, match="boom"):
        main(["list"])
    assert "this is a bug, please report it" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Fuzz: overrides

_KEYS = sorted(set(RuntimeOptions.model_fields) | set(AdaptConfig.model_fields) - {"mode"}) + ["stepz", "", "lr "]
_SMALL_WORK = {"steps", "warmup_steps", "early_stop_patience"}
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 4), st.integers(min_value=2**31, max_value=2**70).map(lambda v: v * -1 if v % 2 else v),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "3", "0.1", "yes", "cpu", "x" * 300, "re:(", "re:.*",
                                                                     "all", "norm", "adam", "sam", "cuda", "meta", "cosine"]),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.sampled_from(["batch_size", "compile", "compile_backend", "x"]),
                                                             st.one_of(st.integers(-1, 3), st.text(max_size=5)), max_size=2),
)


_VALID = st.fixed_dictionaries({}, optional={
    "steps": st.integers(0, 3), "lr": st.floats(1e-6, 10), "params": st.sampled_from(["all", "norm", "decoder", "no_encoder"]),
    "pixel_fraction": st.floats(0.01, 1), "seed": st.integers(0, 2**63 - 1), "restore_prob": st.floats(0, 1),
    "optimizer": st.sampled_from(["adam", "sgd"]), "grad_clip": st.none() | st.floats(1e-3, 1e6),
    "lr_schedule": st.sampled_from(["constant", "cosine"]), "weight_decay": st.floats(0, 1), "warmup_steps": st.integers(0, 3),
    "early_stop_patience": st.none() | st.integers(1, 3), "time_budget_ms": st.none() | st.floats(1, 1e3),
})


def _overrides() -> st.SearchStrategy[dict[str, Any]]:
    """Random keys and values of any type (mostly refused), or valid values of a few fields (mostly run)."""
    anything = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4).map(
        lambda kw: {k: (min(v, 3) if k in _SMALL_WORK and isinstance(v, int) and not isinstance(v, bool) else v)
                    for k, v in kw.items()}
    )
    return st.one_of(anything, _VALID)


FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FUZZ, max_examples=150)
@given(kw=_overrides())
def test_fuzz_adapt_and_predict_overrides(rt: tta.Runtime, kw: dict[str, Any]) -> None:
    before = state_of(rt)
    try:
        res = rt.adapt_and_predict(np.full((16, 16, 3), 77, np.uint8), **kw)
        assert res.segmentation.shape == (16, 16)
        event("success")
    except TYPED as e:
        event(type(e).__name__)
    finally:
        rt.reset()
    assert same_state(before, state_of(rt))


@FUZZ
@given(kw=_overrides())
def test_fuzz_from_pretrained_overrides(tiny_dir: pathlib.Path, kw: dict[str, Any]) -> None:
    try:
        tta.Runtime.from_pretrained(tiny_dir, **kw)
    except TYPED:
        pass


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(["slot_tta", "tent", "sar", "slot_tta_fast"]), kw=_overrides())
def test_fuzz_load_recipe_overrides(name: str, kw: dict[str, Any]) -> None:
    try:
        cfg = load_recipe(name, **kw)
    except TYPED:
        return
    assert 0 <= cfg.steps <= MAX_STEPS and math.isfinite(cfg.lr)


# ----------------------------------------------------------------------------------------------------
# Fuzz: the CLI, in-process (commands that train or benchmark for long are left out)

_BAD = st.sampled_from(["-1", "0", "nan", "inf", "1e309", "x", "", "99999999999", "0.5", "/dev/null", "a,b", "1:2"])


@st.composite
def _argv(draw: st.DrawFn, f: dict[str, str], model: str) -> list[str]:
    cmd = draw(st.sampled_from(["list", "info", "predict", "predict-adapt", "export", "stream", "doctor", "demo",
                                "bench", "train", "ood", "nothing"]))
    num = st.one_of(_BAD, st.sampled_from(["1", "2", "3"]))
    if cmd == "list" or cmd == "doctor":
        argv = [cmd] + draw(st.lists(st.sampled_from(["-q", "-v", "--json", "-", "--bogus"]), max_size=2))
    elif cmd == "info":
        argv = ["info", draw(st.sampled_from([model, "nope", "../..", f["fifo"], "", "slot-shapes-32"]))]
    elif cmd in ("predict", "predict-adapt"):
        argv = ["predict", draw(st.sampled_from([f["img"], f["fifo"], f["obj"], f["dir"], "missing.png"])), "--model", model]
        argv += draw(st.lists(st.sampled_from([["--recipe", "nope"], ["--recipe", "tent"], ["--device", "x"], ["--overlay", "o.xyz"],
                                               ["--overlay", "o.png"], ["--json", "r.json"], ["--json", "/dev/null"], ["-q"]]),
                              max_size=2).map(lambda xs: [a for x in xs for a in x]))
        argv += ["--adapt"] if cmd == "predict-adapt" else []
    elif cmd == "export":
        argv = ["export", model, "--out", draw(st.sampled_from(["m.onnx", "/dev/null", ".", "m.xyz"])), "--no-progress"]
        argv += [draw(st.sampled_from(["--dynamic", "--n-verify", "--opset", "--batch", "--workspace"])),
                 draw(st.one_of(num, st.sampled_from(["size=16:100000", "batch=0:4", "batch=1:2"])))]
        argv += draw(st.sampled_from([["--no-verify"], ["--n-verify", "1"], ["--part", "nope"]]))
    elif cmd == "stream":
        argv = ["stream", "--model", model, "--no-progress", "--max-frames", "2", "--steps-per-frame", "1"]
        argv += draw(st.sampled_from([[f["fifo"]], [f["img"]], [pathlib.Path(f["fifo"]).as_uri()], ["missing.mp4"],
                                      ["--generate", "g.mp4", "--frames", "2", "--size", "32"]]))
        argv += [draw(st.sampled_from(["--stride", "--buffer", "--reset-every", "--latency-budget-ms", "--read-timeout-s",
                                       "--restore-prob", "--steps-per-frame", "--ground-truth", "--frame-png", "--out"])),
                 draw(st.one_of(num, st.sampled_from([f["obj"], f["fifo"], "x.png", "x.mp4"])))]
    elif cmd == "demo":
        argv = ["demo", "--model", model, "--no-progress", "--steps", draw(st.sampled_from(["-1", "x", "100001", "1"])),
                "--out", draw(st.sampled_from(["d", "/dev/null"])), "--image", draw(st.sampled_from([f["img"], f["fifo"]]))]
    elif cmd == "bench":  # bad values only: each is refused before any work
        argv = draw(st.sampled_from([["bench", "tta", "--batch-sizes"], ["bench", "gate", "--n-images"],
                                     ["bench", "adapt", "--timing-size"], ["bench", "prune", "--calls"],
                                     ["bench", "stream", "--warmup"], ["bench", "tta", "--severities"]]))
        argv = [*argv, draw(st.sampled_from(["-1", "nan", "x", "a,b", "-5"]))]  # no "0": a valid --warmup
    elif cmd == "train":
        argv = draw(st.sampled_from([["train", "unet", "--steps"], ["train", "ftwt", "--r"], ["train", "segmenter", "--out", "o", "--lr"],
                                     ["train", "classifier", "--out", "o", "--widths"]]))
        argv = [*argv, draw(st.sampled_from(["-1", "0", "nan", "x", "-5", "1e309"]))]
    elif cmd == "ood":
        argv = ["ood", draw(st.sampled_from(["fit", "eval"])), "--n-images", draw(st.sampled_from(["-1", "0", "x"]))]
    else:
        argv = draw(st.lists(st.sampled_from(["--bogus", "-v", "predict", "train", "bench", "x"]), max_size=3))
    return argv


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cli-fuzz")


@pytest.fixture
def in_cli_dir(cli_dir: pathlib.Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(cli_dir)
    try:
        yield
    finally:
        os.chdir(old)


@settings(max_examples=220, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_cli(files: dict[str, str], tiny_dir: pathlib.Path, in_cli_dir: None, data: st.DataObject,
                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = data.draw(_argv(files, str(tiny_dir)))
    code, err = run_cli(argv, capsys)
    event(f"exit {code}")
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, (argv, err)


class _ServedFile:
    """An http(s) URL that declares a frame count, as OpenCV reports a file served over the network."""

    def __init__(self, n: int) -> None:
        self.left, self.n = n, n

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.full((16, 16, 3), 30 * self.left % 255, np.uint8)

    def grab(self) -> bool:
        return self.read()[0]

    def get(self, prop: int) -> float:
        return float(self.n) if prop == cv2.CAP_PROP_FRAME_COUNT else 20.0

    def release(self) -> None:
        pass


def test_an_http_url_with_a_frame_count_gets_every_frame(rt: tta.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from tta_runtime.video import sources

    monkeypatch.setattr(sources, "_open_capture", lambda source, timeout_ms: _ServedFile(12))
    with stream(rt, "https://host/clip.mp4", adapt="never") as s:
        n = sum(1 for _ in s)
    assert n == 12 and s.stats.frames_dropped == 0 and s.stats.policy == "all"
