"""Export stage: the shipped segmenter to ONNX, checked against PyTorch; adapted weights written by name;
every bad request refused with a clear error. Real ONNX Runtime sessions throughout (CPU provider)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tta_runtime
from tta_runtime.errors import ConfigError, TTARuntimeError

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
ort = pytest.importorskip("onnxruntime", reason="parity checks run on ONNX Runtime (dev extra)")

from tta_runtime.deploy import (  # noqa: E402 - after the importorskips
    MAX_OPSET,
    MIN_OPSET,
    TOLERANCES,
    ExportError,
    export,
    initializer_map,
    load_manifest,
    manifest_path,
    verify,
    write_weights,
)
from tta_runtime.deploy.kinds import SegmenterGraph  # noqa: E402
from tta_runtime.cli.main import COMMANDS, main  # noqa: E402
from tta_runtime.hub import sha256_file  # noqa: E402
from tta_runtime.models.segmenter import segmentation_masks  # noqa: E402

S = 32  # the shipped model's input size


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _torch_predictor(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The frozen path computed straight from the model (not through the export wrapper)."""
    with torch.inference_mode():
        out = model(x)
    b, k, _ = out.masks.shape
    s = model.cfg.resolution
    return {
        "masks": segmentation_masks(model.cfg, out).reshape(b, k, s, s).numpy(),  # the card's mask source
        "reconstruction": out.reconstruction.transpose(1, 2).reshape(b, 3, s, s).numpy(),
        "slots": out.slots.numpy(),
    }


@pytest.fixture(scope="module")
def static_export(runtime, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "seg.onnx"
    return export(runtime.model, runtime.card, "onnx", path, part="predictor")


@pytest.fixture(scope="module")
def dynamic_export(runtime, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "seg-dyn.onnx"
    return export(runtime.model, runtime.card, "onnx", path, part="predictor", dynamic={"batch": (1, 8), "size": (16, 64)}, batch=2)


# ----------------------------------------------------------------------------------------------------
# 1. The shipped segmenter exports and matches PyTorch


def test_shipped_predictor_matches_pytorch_on_20_fresh_random_images(static_export, runtime) -> None:
    path = static_export.onnx_path
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["masks", "reconstruction", "slots"]
    gen = torch.Generator().manual_seed(2026)  # not the export's own verification seed
    worst = {}
    for _ in range(20):
        x = torch.rand(1, 3, S, S, generator=gen)
        got = dict(zip(["masks", "reconstruction", "slots"], sess.run(None, {"image": x.numpy()}), strict=True))
        for name, ref in _torch_predictor(runtime.model, x).items():
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got[name] - ref).max()))
    assert max(worst.values()) <= 1e-4, worst
    assert got["masks"].shape == (1, 8, S, S)
    np.testing.assert_allclose(got["masks"].sum(axis=1), 1.0, atol=1e-5)


def test_manifest_records_what_was_exported_and_checked(static_export, runtime) -> None:
    m = load_manifest(static_export.onnx_path)
    assert static_export.manifest_path == manifest_path(static_export.onnx_path)
    assert m["sha256"] == sha256_file(static_export.onnx_path)
    assert m["card"]["name"] == runtime.card.name == m["model"]
    assert m["opset"] == 17 and m["precision"] == "fp32" and m["part"] == "predictor"
    assert m["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 3, S, S], "description": "RGB in [0, 1]"}]
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"]) and m["versions"]["onnx"] == onnx.__version__
    v = m["verification"]
    assert v["passed"] is True and v["n_images"] == 20 and v["tolerance"]["atol"] == TOLERANCES["fp32"]["atol"] == 1e-4
    assert all(o["max_abs"] <= 1e-4 for o in v["outputs"].values())
    assert set(m["weights"]["tensors"]) == set(runtime.model.state_dict())


def test_dynamic_batch(dynamic_export, runtime) -> None:
    sess = _session(dynamic_export.onnx_path)
    dims = sess.get_inputs()[0].shape
    assert dims == ["batch", 3, "height", "width"]
    gen = torch.Generator().manual_seed(7)
    for b in (1, 3, 8):
        x = torch.rand(b, 3, S, S, generator=gen)  # at the model size the graph's resize is the identity
        got = sess.run(["masks", "reconstruction", "slots"], {"image": x.numpy()})
        ref = _torch_predictor(runtime.model, x)
        for g, name in zip(got, ["masks", "reconstruction", "slots"], strict=True):
            assert g.shape[0] == b
            assert np.abs(g - ref[name]).max() <= 1e-4, (b, name)


def test_dynamic_image_size_resizes_inside_the_graph(dynamic_export, runtime) -> None:
    sess = _session(dynamic_export.onnx_path)
    x = torch.rand(2, 3, 24, 56, generator=torch.Generator().manual_seed(3))
    masks, recon, slots = sess.run(["masks", "reconstruction", "slots"], {"image": x.numpy()})
    assert masks.shape == (2, 8, 24, 56) and recon.shape == (2, 3, 24, 56) and slots.shape == (2, 8, 64)
    np.testing.assert_allclose(masks.sum(axis=1), 1.0, atol=1e-5)  # still a distribution over slots
    small = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
    ref = _torch_predictor(runtime.model, small)
    ref_masks = F.interpolate(torch.from_numpy(ref["masks"]), size=(24, 56), mode="bilinear", align_corners=False).numpy()
    assert np.abs(masks - ref_masks).max() <= 1e-4
    assert np.abs(slots - ref["slots"]).max() <= 1e-4
    m = dynamic_export.manifest
    assert m["resize_in_graph"] is True and m["dynamic"] == {"batch": [1, 8], "size": [16, 64]}
    assert {tuple(s[2:]) for s in m["verification"]["input_shapes"]} >= {(16, 64), (64, 16), (S, S)}


def test_predictor_ood_carries_the_runtimes_score(runtime, scene, tmp_path) -> None:
    res = export(runtime.model, runtime.card, "onnx", tmp_path / "ood.onnx", part="predictor_ood", calibration=runtime.calibration)
    assert res.manifest["ood"]["scorer"] == (runtime.calibration.scorer if runtime.calibration else "recon_mse_z")
    sess = _session(res.onnx_path)
    image = scene("textured_background", 1)  # 32x32: no resizing on either side
    x = image.astype(np.float32)[None].transpose(0, 3, 1, 2) / 255.0
    score, mse = sess.run(["ood_score", "recon_mse"], {"image": x})
    ref = runtime.predict(image)
    assert ref.ood_score == pytest.approx(float(score[0]), abs=1e-3)  # runtime scores in float64
    assert ref.recon_mse == pytest.approx(float(mse[0]), rel=1e-4)


def test_half_precision_encoder(runtime, tmp_path) -> None:
    res = export(runtime.model, runtime.card, "onnx", tmp_path / "enc16.onnx", part="encoder", half=True)
    sess = _session(res.onnx_path)
    assert sess.get_inputs()[0].type == "tensor(float16)" and sess.get_outputs()[0].name == "features"
    assert res.manifest["weights"]["tensors"].keys() == {k for k in runtime.model.state_dict() if k.startswith("encoder.")}
    v = res.verification
    assert v["passed"] and v["tolerance"]["atol"] == TOLERANCES["fp16"]["atol"] and v["outputs"]["features"]["max_abs"] < 1e-2


def test_every_parameter_is_one_named_initializer_and_no_random_op(static_export, runtime) -> None:
    proto = onnx.load(str(static_export.onnx_path))
    params = dict(runtime.model.named_parameters())
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert set(inits) == set(params)  # nothing folded, nothing renamed, nothing else
    assert all(inits[n] == tuple(p.shape) for n, p in params.items())
    assert initializer_map(proto, runtime.model) == {n: n for n in params}
    assert not {n.op_type for n in proto.graph.node} & {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
    assert "slot_attention.slots_init" in inits  # the learned initial slots, not sampled ones


def test_export_leaves_the_model_untouched(runtime, source_state, state, tmp_path) -> None:
    export(runtime.model, runtime.card, "onnx", tmp_path / "h.onnx", part="predictor", half=True, verify=False)
    state.assert_bit_exact(runtime.model, source_state)
    assert next(runtime.model.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# 2. Adapted weights written by name reproduce the adapted model, without re-export


def test_written_weights_reproduce_the_adapted_model(tmp_path, ood_image) -> None:
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", steps=5, mode="continual")
    path = tmp_path / "seg.onnx"
    res = export(rt.model, rt.card, "onnx", path, part="predictor", dynamic={"batch": (1, 4)})
    graph_before = [(n.op_type, list(n.input), list(n.output)) for n in onnx.load(str(path)).graph.node]
    sha_before = res.manifest["sha256"]
    loaded = {k: v.clone() for k, v in rt.model.state_dict().items()}

    rt.adapt_and_predict(ood_image)  # continual: rt.model now holds adapted weights
    adapted = rt.model.state_dict()
    changed = [k for k in adapted if not torch.equal(adapted[k], loaded[k])]
    assert len(changed) == len(adapted), "every parameter adapts under the default recipe"

    report = write_weights(path, rt.model)
    assert sorted(report["written"]) == sorted(adapted)
    proto = onnx.load(str(path))
    assert [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node] == graph_before  # same graph
    m = load_manifest(path)
    assert m["sha256"] == report["sha256"] == sha256_file(path) != sha_before
    assert m["weights"]["source"] == "write_weights" and "stale" in m["verification"]

    sess = _session(path)
    gen = torch.Generator().manual_seed(11)
    moved = 0.0
    for _ in range(5):
        x = torch.rand(4, 3, S, S, generator=gen)
        got = dict(zip(["masks", "reconstruction", "slots"], sess.run(None, {"image": x.numpy()}), strict=True))
        for name, ref in _torch_predictor(rt.model, x).items():
            assert np.abs(got[name] - ref).max() <= 1e-4, name
        moved = max(moved, float(np.abs(got["slots"] - _torch_predictor_from(loaded, rt, x)["slots"]).max()))
    assert moved > 1e-3, "the written graph must differ from the shipped one"
    assert verify(path, rt.model, rt.card)["passed"] and "stale" not in load_manifest(path)["verification"]


def _torch_predictor_from(state: dict, rt: tta_runtime.Runtime, x: torch.Tensor) -> dict[str, np.ndarray]:
    from tta_runtime.models.segmenter import SlotSegmenter

    model = SlotSegmenter(rt.card.segmenter)
    model.load_state_dict(state)
    return _torch_predictor(model.eval(), x)


def test_write_weights_refuses_what_does_not_fit(static_export, runtime, tmp_path) -> None:
    path = tmp_path / "w.onnx"
    path.write_bytes(static_export.onnx_path.read_bytes())
    manifest_path(path).write_text(manifest_path(static_export.onnx_path).read_text())
    sha = sha256_file(path)
    good = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    name = "decoder.out.1.weight"
    cases = {
        "shape": ({**good, name: torch.zeros(5, 64)}, "shape"),
        "unknown": ({**good, "decoder.extra.weight": torch.zeros(3)}, "unknown"),
        "missing": ({k: v for k, v in good.items() if k != name}, "missing"),
        "nan": ({**good, name: torch.full_like(good[name], float("nan"))}, "NaN"),
    }
    for case, (weights, words) in cases.items():
        with pytest.raises(ExportError, match=words):
            write_weights(path, weights)
        assert sha256_file(path) == sha, f"{case}: a refused write must leave the file as it was"
    written = write_weights(path, {name: good[name] * 2}, strict=False)["written"]
    assert written == [name]


# ----------------------------------------------------------------------------------------------------
# 4. Bad requests: clear errors


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"part": "decoder_only"}, "unknown slot_segmenter export part 'decoder_only'.*predictor"),
        ({"opset": 11}, "opset 11 is too low.*einsum.*opset 12"),
        ({"dynamic": {"batch": (8, 1)}}, "inverted: min 8 > max 1"),
        ({"dynamic": "size=64:16"}, "inverted: min 64 > max 16"),
        ({"dynamic": "batch=1-8"}, "expected AXIS=MIN:MAX"),
        ({"dynamic": {"channels": (1, 3)}}, "channels: unknown field"),
        ({"dynamic": {"batch": (1, 4)}, "batch": 8}, "batch 8 .* must lie in the dynamic batch range"),
        ({"workspace": 2.0}, "format='tensorrt' only"),
        ({"format": "tflite"}, "format"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
        ({"opset": 24}, "above 23"),
    ],
)
def test_bad_export_requests_raise_clear_errors(runtime, tmp_path, kwargs, words) -> None:
    kwargs = dict(kwargs)
    fmt = kwargs.pop("format", "onnx")
    with pytest.raises(ConfigError, match=words):
        export(runtime.model, runtime.card, fmt, tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_tensorrt_missing_names_the_extra(runtime, tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the missing-package error cannot occur")
    with pytest.raises(ConfigError, match=r"tta-runtime\[tensorrt\]"):
        export(runtime.model, runtime.card, "tensorrt", tmp_path / "x.engine")
    assert not (tmp_path / "x.onnx").exists()  # refused before any work


def test_opset_range_is_the_exporters(runtime) -> None:
    """The stated minimum is the exporter's, not ours: opset 11 fails on einsum, 12 exports."""
    graph = SegmenterGraph(runtime.model, "predictor", resize=False, ood=None).eval()
    x = torch.rand(1, 3, S, S)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="einsum"):
            torch.onnx.export(graph, (x,), io.BytesIO(), dynamo=False, opset_version=MIN_OPSET - 1, do_constant_folding=False)
        torch.onnx.export(graph, (x,), io.BytesIO(), dynamo=False, opset_version=MIN_OPSET, do_constant_folding=False)
    from torch.onnx import _constants

    assert MAX_OPSET == _constants.ONNX_MAX_OPSET  # update MAX_OPSET with torch


def test_not_an_onnx_file_is_refused(tmp_path, runtime) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ExportError, match="not an ONNX model|manifest"):
        initializer_map(bad, runtime.model)
    with pytest.raises(ExportError, match="no manifest"):
        write_weights(bad, runtime.model)


# ----------------------------------------------------------------------------------------------------
# Command line


def _cli(argv: list[str]) -> int:
    """The command line as `tta-runtime` runs it."""
    return main(argv)


def test_cli_export_uses_the_same_argument_names(tiny_model_dir, tmp_path, capsys) -> None:
    assert {"export", "doctor", "bench backends"} <= {c.path for c in COMMANDS}
    out = tmp_path / "tiny.onnx"
    rc = _cli(["export", str(tiny_model_dir), "--format", "onnx", "--part", "predictor_ood", "--out", str(out),
               "--dynamic", "batch=1:4", "--opset", "13", "--batch", "2", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verify" in printed and "next:" in printed and "OnnxRuntimeBackend" in printed
    m = json.loads(manifest_path(out).read_text())
    assert m["request"] == {"format": "onnx", "part": "predictor_ood", "half": False, "dynamic": {"batch": [1, 4], "size": None},
                            "opset": 13, "batch": 2, "device": "cpu", "workspace": None}
    assert m["verification"]["passed"] and m["ood"]["scorer"] == "recon_mse"  # tiny card: no OOD stats
    assert m["metadata"]["command"].startswith("tta-runtime export")


def test_cli_doctor_never_crashes(capsys) -> None:
    assert _cli(["doctor", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnxruntime"]["present"] and "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert report["torch"]["version"] == torch.__version__ and report["onnx"]["version"] == onnx.__version__
    assert "present" in report["tensorrt"] and "present" in report["opencv"]
    assert _cli(["doctor"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_errors_are_runtime_errors() -> None:
    assert issubclass(ExportError, TTARuntimeError)


def test_equal_valued_parameters_stay_separate_initializers(tiny_model_dir, tmp_path) -> None:
    """Untrained LayerNorms hold equal weights (all ones); the exporter would merge them into one
    initializer, and writing one adapted LayerNorm would then change the others."""
    rt = tta_runtime.Runtime.from_pretrained(tiny_model_dir)
    state = rt.model.state_dict()
    assert torch.equal(state["slot_attention.norm_slots.weight"], state["slot_attention.norm_mlp.weight"])
    path = tmp_path / "tiny.onnx"
    export(rt.model, rt.card, "onnx", path, verify=False)
    write_weights(path, {"slot_attention.norm_slots.weight": state["slot_attention.norm_slots.weight"] * 3}, strict=False)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert set(inits) == set(state)
    np.testing.assert_array_equal(inits["slot_attention.norm_slots.weight"], 3.0)
    np.testing.assert_array_equal(inits["slot_attention.norm_mlp.weight"], 1.0)
