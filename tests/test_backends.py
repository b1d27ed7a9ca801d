"""Backends: ONNX Runtime sessions (providers named and checked, inputs validated, IOBinding), the
runtime's frozen path on ONNX Runtime (weights follow adaptation), the TensorRT layer up to the
TensorRT calls, the doctor and the backend benchmark."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tta_runtime
from tta_runtime.errors import ConfigError, InvalidInputError

pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX Runtime backend needs onnxruntime (dev extra)")

from tta_runtime.deploy import (  # noqa: E402 - after the importorskips
    BackendUnavailableError,
    ExportError,
    OnnxRuntimeBackend,
    OrtFrozenPath,
    OrtOptions,
    TensorRTBackend,
    TensorRTConfig,
    build_engine,
    cached_engine,
    doctor,
    engine_cache_key,
    export,
    load_manifest,
    manifest_path,
    network_flags,
    plan_engine,
    profile_shapes,
    providers_for_device,
    refit_plan,
    resolve_providers,
)
from tta_runtime.evaluation.bench_backends import bench_backends  # noqa: E402
from tta_runtime.models.segmenter import segmentation_masks  # noqa: E402

S = 32
ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE_THREAD = OrtOptions(intra_op_num_threads=1, inter_op_num_threads=1)
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def exported(runtime, tmp_path_factory):
    """The shipped predictor with a dynamic batch (1..8) and its manifest."""
    path = tmp_path_factory.mktemp("backends") / "seg.onnx"
    return export(runtime.model, runtime.card, "onnx", path, part="predictor", dynamic={"batch": (1, 8)}, batch=2)


@pytest.fixture(scope="module")
def backend(exported):
    return OnnxRuntimeBackend(exported.onnx_path, providers=["CPUExecutionProvider"], options=ONE_THREAD)


# ----------------------------------------------------------------------------------------------------
# Providers: named, checked, recorded


def test_provider_used_is_recorded(backend) -> None:
    assert backend.provider_used == "CPUExecutionProvider"
    assert backend.providers_used == ["CPUExecutionProvider"]
    assert "provider_used=CPUExecutionProvider" in repr(backend)


def test_alias_and_full_name_resolve_the_same() -> None:
    assert resolve_providers(["cpu"]) == resolve_providers(["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]
    assert providers_for_device("cpu") == ["CPUExecutionProvider"]
    assert providers_for_device("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1})]
    with pytest.raises(ConfigError, match="no ONNX Runtime provider"):
        providers_for_device("mps")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider present here")
def test_unavailable_provider_raises_instead_of_falling_back(exported) -> None:
    with pytest.raises(BackendUnavailableError, match=r"'CUDAExecutionProvider' is not available.*available: .*CPUExecutionProvider.*onnxruntime-gpu"):
        OnnxRuntimeBackend(exported.onnx_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("providers", "options", "words"),
    [
        ([], None, "non-empty list"),
        ("CPUExecutionProvider", None, "non-empty list"),
        (["cpu", "CPUExecutionProvider"], None, "named twice"),
        (["NoSuchExecutionProvider"], None, "not available"),
        (["cpu"], {"threads": 2}, "threads: unknown field"),
        (["cpu"], {"provider_options": {"CUDAExecutionProvider": {"device_id": 0}}}, "not requested"),
        (["cpu"], {"graph_optimization_level": "max"}, "graph_optimization_level"),
    ],
)
def test_bad_backend_requests(exported, providers, options, words) -> None:
    with pytest.raises(ConfigError, match=words):
        OnnxRuntimeBackend(exported.onnx_path, providers=providers, options=options)


# ----------------------------------------------------------------------------------------------------
# Inputs validated against the declared spec


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: np.zeros((1, 3, S, S), np.uint8), "must be float32 .*got an array of dtype uint8 .*divide uint8 images by 255"),
        (lambda: np.zeros((1, 3, S, S), np.float64), "dtype float64 .*astype"),
        (lambda: np.zeros((3, S, S), np.float32), "3 dims, expected 4"),
        (lambda: np.zeros((1, 4, S, S), np.float32), "dim 1 is 4, the graph fixes it to 3"),
        (lambda: np.zeros((1, 3, 31, S), np.float32), "dim 2 is 31, the graph fixes it to 32"),
        (lambda: np.zeros((9, 3, S, S), np.float32), r"batch 9 is outside the exported range \[1, 8\]"),
        (lambda: torch.zeros(1, 3, S, S), "got a torch tensor \\(use run_torch\\)"),
        (lambda: [[0.0]], "must be a numpy array"),
    ],
)
def test_inputs_are_checked_against_the_declared_spec(backend, make, words) -> None:
    with pytest.raises(InvalidInputError, match=words):
        backend.run(make())


def test_iobinding_path_matches_plain_run(backend) -> None:
    x = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(0))
    plain = backend.run(x.numpy())
    bound = backend.run_torch(x)
    assert list(bound) == ["masks", "reconstruction", "slots"]
    for name, value in bound.items():
        assert isinstance(value, torch.Tensor) and value.device == x.device
        np.testing.assert_allclose(value.numpy(), plain[name], atol=1e-6)
    with pytest.raises(InvalidInputError, match="float32"):
        backend.run_torch(x.half())


def test_bytes_without_manifest_take_the_sessions_declared_inputs(exported) -> None:
    be = OnnxRuntimeBackend(exported.onnx_path.read_bytes(), providers=["cpu"], options=ONE_THREAD)
    assert be.manifest is None and be.inputs[0].shape == ("batch", 3, S, S)
    out = be.run_torch(torch.rand(2, 3, S, S))
    assert out["masks"].shape == (2, 8, S, S)


def test_a_changed_file_does_not_pass_for_its_manifest(exported, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(exported.onnx_path.read_bytes())
    m = load_manifest(exported.onnx_path)
    m["sha256"] = "0" * 64
    manifest_path(path).write_text(json.dumps(m))
    with pytest.raises(ExportError, match="do not match the sha256"):
        OnnxRuntimeBackend(path, providers=["cpu"])


# ----------------------------------------------------------------------------------------------------
# The runtime's frozen path on ONNX Runtime


def test_ort_frozen_path_matches_the_torch_path_and_follows_adaptation(ood_image) -> None:
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta", steps=2, mode="continual")
    fp = OrtFrozenPath(rt.model, rt.card, calibration=rt.calibration, providers=["cpu"], options=ONE_THREAD, verify=False)
    assert fp.provider_used == "CPUExecutionProvider"
    x = torch.from_numpy(ood_image).permute(2, 0, 1)[None].float() / 255

    def same_as_torch() -> None:
        out, (ood,) = fp(x)
        # The graph scores with the weights it runs; the runtime's own path scores with the loaded weights once
        # continual adaptation has moved them (tests/test_runtime_backends.py): compare like with like here.
        moved, rt._weights_moved = rt._weights_moved, False
        ref, (ref_ood,) = rt._frozen_path(x)
        rt._weights_moved = moved
        assert out.masks.shape == ref.masks.shape and out.reconstruction.shape == ref.reconstruction.shape
        ref_masks = segmentation_masks(rt.model.cfg, ref)  # the graph's masks follow the card's mask source
        assert (out.masks - ref_masks).abs().max() <= 1e-4
        assert (out.reconstruction - ref.reconstruction).abs().max() <= 1e-4
        assert ood[0] == pytest.approx(ref_ood[0], abs=1e-3) and ood[1:3] == ref_ood[1:3]
        assert ood[3] == pytest.approx(ref_ood[3], rel=1e-4)

    same_as_torch()
    assert fp.resyncs == 0
    rt.adapt_and_predict(ood_image)  # continual: weights change in place
    same_as_torch()
    assert fp.resyncs == 1
    rt.reset()
    same_as_torch()
    assert fp.resyncs == 2
    same_as_torch()
    assert fp.resyncs == 2  # nothing changed since: no new session


def test_episodic_restore_does_not_rebuild_the_session(ood_image) -> None:
    rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32", steps=1)  # episodic: weights restored after the call
    fp = OrtFrozenPath(rt.model, rt.card, calibration=rt.calibration, providers=["cpu"], options=ONE_THREAD, verify=False)
    rt.adapt_and_predict(ood_image)
    assert fp.sync() is False and fp.resyncs == 0


# ----------------------------------------------------------------------------------------------------
# TensorRT: every step up to the TensorRT calls


def _manifest(dynamic=None, precision="fp32", shape=(1, 3, S, S)):
    return {"inputs": [{"name": "image", "dtype": "float32", "shape": list(shape)}], "dynamic": dynamic,
            "model_size": S, "precision": precision}


def test_profile_shapes_from_dynamic_ranges() -> None:
    static = profile_shapes(_manifest())
    assert static == {"image": {"min": [1, 3, S, S], "opt": [1, 3, S, S], "max": [1, 3, S, S]}}
    batch = profile_shapes(_manifest({"batch": [2, 16], "size": None}, shape=("batch", 3, S, S)), batch=4)
    assert batch == {"image": {"min": [2, 3, S, S], "opt": [4, 3, S, S], "max": [16, 3, S, S]}}
    both = profile_shapes(_manifest({"batch": [1, 8], "size": [16, 64]}, shape=("batch", 3, "height", "width")), batch=32)
    assert both == {"image": {"min": [1, 3, 16, 16], "opt": [8, 3, S, S], "max": [8, 3, 64, 64]}}  # opt clipped into range
    with pytest.raises(ExportError, match="no range"):
        profile_shapes(_manifest(None, shape=("batch", 3, S, S)))


def test_engine_cache_key_changes_with_each_thing_an_engine_is_tied_to() -> None:
    base = dict(onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                precision="fp16", profiles=profile_shapes(_manifest()), refittable=True)
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**dict(base)) and len(key) == 64
    changes = {"onnx_sha256": "b" * 64, "tensorrt_version": "11.0.0", "gpu_name": "H100", "compute_capability": "9.0",
               "precision": "fp32", "profiles": profile_shapes(_manifest({"batch": [1, 8]}, shape=("batch", 3, S, S))),
               "refittable": False}
    keys = {engine_cache_key(**{**base, k: v}) for k, v in changes.items()}
    assert len(keys) == len(changes) and key not in keys


def test_network_flags_for_tensorrt_10_and_11() -> None:
    flag = SimpleNamespace(STRONGLY_TYPED=1)  # TensorRT 10: opt-in bit 1 (EXPLICIT_BATCH is bit 0, never set)
    assert network_flags(SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=flag)) == 2
    assert network_flags(SimpleNamespace(__version__="11.1.0", NetworkDefinitionCreationFlag=flag)) == 2
    gone = SimpleNamespace()  # a TensorRT 11 without the flag: strong typing is unconditional
    assert network_flags(SimpleNamespace(__version__="11.4.0", NetworkDefinitionCreationFlag=gone)) == 0
    with pytest.raises(BackendUnavailableError, match="TensorRT 10 or newer"):
        network_flags(SimpleNamespace(__version__="8.6.1", NetworkDefinitionCreationFlag=gone))


def test_engine_plan_side_metadata_and_cache(exported, tmp_path) -> None:
    kw = dict(config={"cache_dir": str(tmp_path)}, batch=2, tensorrt_version="10.3.0", gpu_name="NVIDIA Orin", compute_capability="8.7")
    plan = plan_engine(exported.onnx_path, **kw)
    assert plan.path.parent == tmp_path and plan.path.name == f"seg-{plan.key[:16]}.engine"
    assert plan.dynamic and plan.profiles["image"] == {"min": [1, 3, S, S], "opt": [2, 3, S, S], "max": [8, 3, S, S]}
    assert plan.timing_cache_path.name == "timing-trt10.3.0-nvidia-orin-sm8.7.cache"
    meta = plan.metadata
    assert meta["onnx_sha256"] == load_manifest(exported.onnx_path)["sha256"] and meta["cache_key"] == plan.key
    assert meta["precision"] == "fp32" and meta["refittable"] is True
    assert meta["onnx_manifest"]["weights"]["tensors"]["decoder.out.1.weight"] == {"shape": [4, 64], "dtype": "float32"}
    assert cached_engine(plan) is None
    plan.path.write_bytes(b"engine bytes")  # what a build leaves behind: the engine and its side file
    import hashlib

    side = {**meta, "engine_sha256": hashlib.sha256(b"engine bytes").hexdigest()}
    plan.side_path.write_text(json.dumps(side))
    hit = cached_engine(plan)
    assert hit is not None and hit.cached and hit.path == plan.path
    other = plan_engine(exported.onnx_path, **{**kw, "tensorrt_version": "11.0.0"})
    assert other.key != plan.key and cached_engine(other) is None  # another TensorRT: another engine
    plan.path.write_bytes(b"engine bytes, corrupted")
    assert cached_engine(plan) is None


def test_precision_that_the_onnx_does_not_carry_is_refused(exported) -> None:
    with pytest.raises(ConfigError, match="fp32 graph.*half=True"):
        build_engine(exported.onnx_path, config={"precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16: unknown field"):
        build_engine(exported.onnx_path, config={"fp16": True})
    assert TensorRTConfig().precision == "auto"


def test_refit_plan_maps_adapted_weights_by_name(exported, runtime) -> None:
    tensors = load_manifest(exported.onnx_path)["weights"]["tensors"]
    adapted = {k: v + 0.5 for k, v in runtime.model.state_dict().items()}
    plan = refit_plan(adapted, tensors, refittable=list(tensors))
    assert set(plan) == set(runtime.model.state_dict())
    np.testing.assert_array_equal(plan["decoder.out.1.bias"], adapted["decoder.out.1.bias"].numpy())
    half = refit_plan(runtime.model, {k: {**v, "dtype": "float16"} for k, v in tensors.items()})
    assert all(a.dtype == np.float16 and a.flags.c_contiguous for a in half.values())
    name = "decoder.out.1.weight"
    with pytest.raises(ExportError, match="missing"):
        refit_plan({k: v for k, v in adapted.items() if k != name}, tensors)
    with pytest.raises(ExportError, match="unknown"):
        refit_plan({**adapted, "extra.weight": torch.zeros(1)}, tensors)
    with pytest.raises(ExportError, match="shape"):
        refit_plan({**adapted, name: torch.zeros(4, 63)}, tensors)
    with pytest.raises(ExportError, match="NaN"):
        refit_plan({**adapted, name: torch.full((4, 64), float("inf"))}, tensors)
    with pytest.raises(ExportError, match="refittable=True"):
        refit_plan(adapted, tensors, refittable=[k for k in tensors if k != name])


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_tensorrt_missing_names_the_extra(exported, tmp_path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tta-runtime\[tensorrt\]'"):
        build_engine(exported.onnx_path, tmp_path / "x.engine")
    with pytest.raises(BackendUnavailableError, match=r"tta-runtime\[tensorrt\]"):
        TensorRTBackend(tmp_path / "x.engine")


def test_tensorrt_build_run_and_refit(exported, runtime, tmp_path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT cannot be installed on this machine (NVIDIA index, GPU); runs where it is")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    built = build_engine(exported.onnx_path, tmp_path / "seg.engine", config={"cache_dir": str(tmp_path)}, batch=2)
    assert not built.cached and build_engine(exported.onnx_path, tmp_path / "seg.engine", config={"cache_dir": str(tmp_path)}, batch=2).cached
    be = TensorRTBackend(built.path)
    x = torch.rand(3, 3, S, S)
    ref = OnnxRuntimeBackend(exported.onnx_path, providers=["cpu"]).run(x.numpy())
    got = be.run(x.numpy())
    assert np.abs(got["masks"] - ref["masks"]).max() < 1e-3
    adapted = {k: v * 1.01 for k, v in runtime.model.state_dict().items()}
    assert sorted(be.refit(adapted)) == sorted(adapted)


# ----------------------------------------------------------------------------------------------------
# Doctor and benchmark


def test_doctor_reports_every_section_and_never_raises() -> None:
    report = doctor()
    assert set(report) >= {"torch", "onnx", "onnxruntime", "tensorrt", "opencv", "python", "tta_runtime"}
    assert report["onnxruntime"]["version"] == ort.__version__
    if not HAS_TRT:
        assert report["tensorrt"] == {"present": False, "install": "pip install 'tta-runtime[tensorrt]' (NVIDIA GPU machines; JetPack on Jetson)"}


def test_bench_backends_reports_latency_throughput_deviation_and_ratio(tiny_model_dir) -> None:
    report = bench_backends(str(tiny_model_dir), batches=(1, 2), repeats=3, warmup=1, threads=1)
    for name in ("pytorch_eager_cpu", "onnxruntime_cpu"):
        entry = report["backends"][name]
        assert entry["status"] == "ok" and set(entry["batches"]) == {"1", "2"}
        for r in entry["batches"].values():
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] and r["throughput_ips"] > 0 and r["max_abs_dev"] <= 1e-4
    assert report["ort_cpu_speedup_batch1"] == pytest.approx(
        report["backends"]["pytorch_eager_cpu"]["batches"]["1"]["median_ms"] / report["backends"]["onnxruntime_cpu"]["batches"]["1"]["median_ms"], rel=1e-2)
    if not torch.cuda.is_available():
        assert report["backends"]["tensorrt"]["status"].startswith("skipped")
    with pytest.raises(ConfigError, match="repeats >= 3"):
        bench_backends(str(tiny_model_dir), repeats=1)


def test_committed_backend_benchmark() -> None:
    """docs/results/backends_bench.json: written by `tta-runtime bench backends --json docs/results/backends_bench.json`."""
    report = json.loads((ROOT / "docs" / "results" / "backends_bench.json").read_text())
    assert report["model"] == "slot-shapes-32" and report["threads"] == 1
    for name in ("pytorch_eager_cpu", "onnxruntime_cpu"):
        assert set(report["backends"][name]["batches"]) == {"1", "8"}
    assert report["backends"]["onnxruntime_cpu"]["batches"]["1"]["max_abs_dev"] <= 1e-4
    assert isinstance(report["ort_cpu_speedup_batch1"], float) and report["target_speedup"] == 2.0
    assert report["ort_cpu_speedup_per_batch"]["1"] == report["ort_cpu_speedup_batch1"]
    assert report["meets_target"] == (report["ort_cpu_speedup_batch1"] >= 2.0)
    assert report["command"].startswith("tta-runtime bench backends")
