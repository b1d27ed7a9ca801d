"""Issue #23, files: every card, recipe, calibration, manifest, npz and weights file ends in a typed error or a
correct load; nothing outside a model folder is read through a card; nothing but a regular file (or a new
path) is ever written. Regression tests for the listed cases, then a property-based fuzz over the files of a
copied shipped model (each case mutates one file and loads it through the public loaders)."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pathlib
import shutil
import stat
import time
import tomllib
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tta_runtime import Runtime
from tta_runtime.config import AdaptConfig, validate
from tta_runtime.deploy.export import _compare, export, verify
from tta_runtime.deploy.graph import (
    GraphFileError,
    load_manifest,
    load_proto,
    manifest_path,
)
from tta_runtime.deploy.options import ExportOptions, TensorSpec
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError
from tta_runtime.files import (
    atomic_write,
    inside,
    load_npz,
    read_json,
    read_toml,
    regular_file,
    writable_path,
)
from tta_runtime.hub import (
    adapter_roots,
    load_card,
    load_recipe,
    load_weights,
    model_roots,
    sha256_file,
)
from tta_runtime.ood import load_calibration
from tta_runtime.ood.features import OODFeatures
from tta_runtime.prune import load_prune_card, load_pruned

TYPED = (InvalidInputError, ConfigError, ModelLoadError)
SHIPPED = model_roots()[-1]
D, C = 64, 10  # digits-cnn-bn: embedding width, classes


@pytest.fixture(autouse=True)
def _no_user_repositories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTA_RUNTIME_MODELS", raising=False)
    monkeypatch.delenv("TTA_RUNTIME_ADAPTERS", raising=False)


def _copy_model(name: str, dest: pathlib.Path) -> pathlib.Path:
    """The files a runtime loads (card, weights, fisher, ood/, prune/), not the evaluation reports."""
    src, out = SHIPPED / name, dest / name
    out.mkdir(parents=True)
    card = json.loads((src / "card.json").read_text())
    for key in ("weights", "optimizer_state", "fisher"):
        if card.get(key):
            shutil.copy(src / card[key]["file"], out / card[key]["file"])
    shutil.copy(src / "card.json", out / "card.json")
    for sub in ("ood", "prune"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, out / sub)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of digits-cnn-bn (classifier with ood/ and prune/r0.6), shared by the module: tests restore what they change."""
    return _copy_model("digits-cnn-bn", tmp_path_factory.mktemp("repo"))


@pytest.fixture
def fresh(tmp_path: pathlib.Path) -> pathlib.Path:
    """A private copy of digits-cnn-bn for tests that leave it changed."""
    return _copy_model("digits-cnn-bn", tmp_path)


def _edit_card(folder: pathlib.Path, **changes: object) -> None:
    card = json.loads((folder / "card.json").read_text())
    card.update(changes)
    (folder / "card.json").write_text(json.dumps(card))


def _resign(folder: pathlib.Path) -> None:
    card = json.loads((folder / "card.json").read_text())
    card["weights"]["sha256"] = sha256_file(folder / card["weights"]["file"])
    (folder / "card.json").write_text(json.dumps(card))


def _typed(fn, *args, **kwargs):
    """fn(...) or the typed error it raised (any other exception fails the test)."""
    try:
        out = fn(*args, **kwargs)
    except TYPED as e:
        assert str(e), f"{type(e).__name__} without a message"
        out = e
    event(type(out).__name__)  # hypothesis statistics: how many cases load, how many are refused
    return out


# ----------------------------------------------------------------------------------------------------
# The door itself: regular files, limits, references, writes


def test_regular_file_refuses_fifos_directories_and_devices(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    for path, kind in ((fifo, "FIFO"), (tmp_path, "directory"), (pathlib.Path("/dev/null"), "character device")):
        with pytest.raises(ModelLoadError, match=kind):
            read_json(path, "model card")
    assert time.perf_counter() - t0 < 1  # never opened, so never blocks
    with pytest.raises(ModelLoadError, match="does not exist"):
        regular_file(tmp_path / "missing.json", "model card")


@pytest.mark.parametrize("content, words", [
    (b'{"name": "caf\xe9"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested more than 32"),
    (b"[1, 2]", "must hold an object"),
    (b"null", "got null"),
    (b'{"t": NaN}', "NaN"),
    (b'{"a": 1', "not valid JSON"),
])
def test_json_files_are_utf8_objects_of_bounded_depth(tmp_path: pathlib.Path, content: bytes, words: str) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=words):
        read_json(path, "model card")


def test_json_size_limit_is_checked_before_reading(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b"{}" + b" " * 2000)
    with pytest.raises(ModelLoadError, match="limit"):
        read_json(path, "model card", limit=1000)


@pytest.mark.parametrize("content, words", [
    (b"name = '\xff'", "not UTF-8"),
    (b"a = " + b"[" * 100_000, "nested too deeply"),
    (b"a = " + b"[" * 40 + b"]" * 40, "nested more than 32"),
    (b"a = ", "not valid TOML"),
])
def test_toml_files_are_utf8_with_bounded_depth(tmp_path: pathlib.Path, content: bytes, words: str) -> None:
    path = tmp_path / "r.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        read_toml(path, "recipe")
    with pytest.raises(ConfigError, match=words):
        load_recipe(path)


def test_inside_keeps_references_in_their_folder(tmp_path: pathlib.Path) -> None:
    folder, outside = tmp_path / "model", tmp_path / "other"
    folder.mkdir(), outside.mkdir()
    (outside / "w.safetensors").write_bytes(b"x")
    (folder / "link.safetensors").symlink_to(outside / "w.safetensors")
    assert inside(folder, "sub/w.safetensors") == folder / "sub" / "w.safetensors"
    for ref, words in (("../other/w.safetensors", r"\.\."), (str(outside / "w.safetensors"), "inside"),
                       ("link.safetensors", "outside"), ("", "relative"), (5, "relative"), ("a\0b", "relative")):
        with pytest.raises(ModelLoadError, match=words):
            inside(folder, ref, "weights.file")


def test_atomic_write_replaces_regular_files_and_makes_new_ones(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    atomic_write(target, b"one")
    atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]  # no temporary left behind


def test_atomic_write_refuses_anything_but_a_regular_file_or_a_new_path(tmp_path: pathlib.Path) -> None:
    fifo, link, real = tmp_path / "pipe", tmp_path / "link", tmp_path / "real"
    os.mkfifo(fifo)
    real.write_bytes(b"keep")
    link.symlink_to(real)
    cases = [("", "empty"), (tmp_path, "directory"), (fifo, "FIFO"), (link, "symbolic link"), ("/dev/full", "/dev"),
             ("/dev/null", "/dev"), ("/proc/self/x", "/proc"), ("/sys/x", "/sys"), (b"x", "str"), (5, "str"),
             ("x" * 5000, "4096")]
    for path, words in cases:
        with pytest.raises(ConfigError, match=words):
            atomic_write(path, b"data")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert real.read_bytes() == b"keep" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe", "real"]


def _npz_declaring(shape: tuple[int, ...], data: bytes = b"") -> bytes:
    """An npz whose one array's .npy header declares `shape` (float64) but stores only `data`."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("knn/bank.npy", npy.getvalue() + data)
    return buf.getvalue()


def test_npz_declaring_80_gb_fails_fast_without_allocating(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.npz"
    path.write_bytes(_npz_declaring((10_000_000, 1_000)))  # 80 GB of float64
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="limit"):
        load_npz(path, "OOD calibration arrays")
    path.write_bytes(_npz_declaring((100, 64), b"\0" * 64))  # declares 51 kB, stores 64 bytes
    with pytest.raises(ModelLoadError, match="truncated"):
        load_npz(path, "OOD calibration arrays")
    assert time.perf_counter() - t0 < 1


def test_npz_with_objects_or_garbage_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.npz"
    buf = io.BytesIO()
    np.savez(buf, a=np.array([{"x": 1}], dtype=object))
    path.write_bytes(buf.getvalue())
    with pytest.raises(ModelLoadError, match="dtype object"):
        load_npz(path, "arrays")
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ModelLoadError, match="truncated or not an npz"):
        load_npz(path, "arrays")


# ----------------------------------------------------------------------------------------------------
# Cards, weights and names


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[" * 100_000, b"[]", b"null", b'{"name": ' + b"[" * 50 + b"]" * 50 + b"}"])
def test_bad_card_files_are_load_errors(fresh: pathlib.Path, content: bytes) -> None:
    (fresh / "card.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match="model card"):
        Runtime.from_pretrained(fresh)


@pytest.mark.parametrize("widths", [[-5], [200000, 200000], [0]])
def test_card_with_absurd_widths_is_refused_before_building(fresh: pathlib.Path, widths: list[int]) -> None:
    card = json.loads((fresh / "card.json").read_text())
    card["classifier"]["widths"] = widths
    (fresh / "card.json").write_text(json.dumps(card))
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="widths"):
        Runtime.from_pretrained(fresh)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("arg, error", [(5, ConfigError), (b"digits-cnn-bn", ConfigError), ("x" * 5000, ConfigError),
                                        ("y" * 300, ModelLoadError), (["digits-cnn-bn"], ConfigError), ("a\0b", ConfigError)])
def test_from_pretrained_with_a_bad_name_is_a_typed_error(arg: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        Runtime.from_pretrained(arg)  # type: ignore[arg-type]


def test_weights_outside_the_model_folder_are_refused_without_reading_them(fresh: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(fresh / "weights.safetensors", other / "model.safetensors")
    secret = sha256_file(other / "model.safetensors")[:12]
    for ref in ("../other/model.safetensors", str(other / "model.safetensors")):
        _edit_card(fresh, weights={"file": ref, "sha256": "0" * 64})
        with pytest.raises(ModelLoadError) as info:
            Runtime.from_pretrained(fresh)
        assert "inside" in str(info.value) and secret not in str(info.value)
    (fresh / "link.safetensors").symlink_to(other / "model.safetensors")
    _edit_card(fresh, weights={"file": "link.safetensors", "sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="outside") as info:
        Runtime.from_pretrained(fresh)
    assert secret not in str(info.value)


def test_fisher_outside_the_folder_is_refused(fresh: pathlib.Path) -> None:
    _edit_card(fresh, fisher={"file": "/etc/passwd", "sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="fisher.file"):
        load_card(fresh)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_with_a_matching_sha_are_refused(fresh: pathlib.Path, value: float) -> None:
    shutil.rmtree(fresh / "ood")
    state = load_file(str(fresh / "weights.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = value
    save_file(state, str(fresh / "weights.safetensors"))
    _resign(fresh)
    with pytest.raises(ModelLoadError, match="NaN or infinite"):
        Runtime.from_pretrained(fresh)


def test_a_prune_name_that_is_a_path_is_refused(digits: pathlib.Path) -> None:
    for name in ("../../x", "/tmp/x", "r0.6/../../..", "R0.6", ""):
        with pytest.raises(ConfigError, match="plain name"):
            Runtime.from_pretrained(digits, prune=name, load_calibration=False)
    assert load_prune_card(digits, "r0.6").name == "r0.6"


def test_recipe_names_that_are_paths_do_not_leave_the_adapters_folder(tmp_path: pathlib.Path) -> None:
    evil = tmp_path / "evil.toml"
    evil.write_text('method = "entropy"\n')
    name = os.path.relpath(tmp_path / "evil", adapter_roots()[-1])  # ../../../tmp/.../evil: it would resolve to evil.toml
    for bad in (name, "../../../../tmp/x", "/tmp/x", "Tent", "tent/", ""):
        with pytest.raises(ConfigError):
            load_recipe(bad)
    for per_call in (123, None, ["tent"]):
        with pytest.raises(ConfigError):
            load_recipe(per_call)  # type: ignore[arg-type]
    assert load_recipe(evil).method == "entropy"  # an explicit .toml path is the caller's own file


@pytest.mark.parametrize("recipe", ["../../../../tmp/x", "/abs/x", "x.toml", "Tent"])
def test_card_default_recipe_must_be_a_plain_name(fresh: pathlib.Path, recipe: str) -> None:
    _edit_card(fresh, default_recipe=recipe)
    with pytest.raises(ModelLoadError, match="default_recipe"):
        Runtime.from_pretrained(fresh)


def test_prune_card_files_are_checked(digits: pathlib.Path) -> None:
    path = digits / "prune" / "r0.6" / "prune.json"
    good = path.read_bytes()
    try:
        for content in (b"\xff", b"[" * 10_000, b"[]", b"null", b"{}"):
            path.write_bytes(content)
            with pytest.raises(ModelLoadError, match="prune card"):
                Runtime.from_pretrained(digits, prune="r0.6", load_calibration=False)
        doc = json.loads(good)
        doc["weights"]["file"] = "../../weights.safetensors"
        path.write_text(json.dumps(doc))
        with pytest.raises(ModelLoadError, match="inside"):
            load_pruned(digits, load_card(digits), "r0.6")
    finally:
        path.write_bytes(good)


# ----------------------------------------------------------------------------------------------------
# Calibration


def _with_arrays(folder: pathlib.Path, **arrays: np.ndarray) -> None:
    npz = folder / "ood" / "state.npz"
    with np.load(npz) as z:
        data = {k: z[k] for k in z.files}
    data.update({k.replace("__", "/"): v for k, v in arrays.items()})
    np.savez(npz, **data)


@pytest.mark.parametrize("arrays, words", [
    ({"knn__bank": np.zeros((100, D + 1))}, "bank"),
    ({"knn__bank": np.zeros(100)}, "bank"),
    ({"mahalanobis__precision": np.eye(D)[:, :5]}, "precision"),
    ({"mahalanobis__means": np.zeros((C, D - 1))}, "means"),
    ({"vim__residual_basis": np.zeros((D, 0))}, "residual_basis"),
    ({"stem_mahalanobis__inv_scales": np.ones(5)}, "inv_scales"),
    ({"knn__bank": np.full((100, D), np.nan)}, "NaN"),
    ({"rmd__precision0": np.full((D, D), np.inf)}, "NaN or infinite"),
])
def test_calibration_arrays_of_the_wrong_shape_or_not_finite_are_refused_at_load(
    fresh: pathlib.Path, arrays: dict[str, np.ndarray], words: str
) -> None:
    _with_arrays(fresh, **arrays)
    with pytest.raises(ModelLoadError, match=words):
        load_calibration(fresh)
    with pytest.raises(ModelLoadError, match=words):
        Runtime.from_pretrained(fresh)


def _segmenter_calibration(tmp_path: pathlib.Path) -> pathlib.Path:
    """card.json + ood/ of slot-shapes-32 (z-scored scorers; its weights are not needed to load a calibration)."""
    out = tmp_path / "seg"
    out.mkdir()
    shutil.copy(SHIPPED / "slot-shapes-32" / "card.json", out / "card.json")
    shutil.copytree(SHIPPED / "slot-shapes-32" / "ood", out / "ood")
    return out


@pytest.mark.parametrize("std, words", [(0.0, "positive"), (-1.0, "positive"), ("nan", "NaN|finite|valid")])
def test_calibration_std_zero_or_nan_is_refused(tmp_path: pathlib.Path, std: object, words: str) -> None:
    folder = _segmenter_calibration(tmp_path)
    assert "recon_error" in load_calibration(folder)
    path = folder / "ood" / "calibration.json"
    text = path.read_text()
    doc = json.loads(text)
    old = doc["calibrations"]["recon_error"]["scalars"]["std"]
    path.write_text(text.replace(json.dumps(old), "NaN" if std == "nan" else json.dumps(std), 1))
    with pytest.raises(ModelLoadError, match=words):
        load_calibration(folder)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[" * 100_000, b"[]", b"null", b'{"format": 1}'])
def test_bad_calibration_json_is_a_load_error(fresh: pathlib.Path, content: bytes) -> None:
    (fresh / "ood" / "calibration.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match="OOD calibration"):
        load_calibration(fresh)


def test_truncated_or_huge_state_npz_fails_fast(fresh: pathlib.Path) -> None:
    npz = fresh / "ood" / "state.npz"
    data = npz.read_bytes()
    for content in (data[: len(data) // 2], data[:100], _npz_declaring((10_000_000, 1_000))):
        npz.write_bytes(content)
        t0 = time.perf_counter()
        with pytest.raises(ModelLoadError, match="state.npz"):
            load_calibration(fresh)
        assert time.perf_counter() - t0 < 1


# ----------------------------------------------------------------------------------------------------
# Exported graphs and manifests


@pytest.fixture(scope="module")
def seg_runtime() -> Runtime:
    return Runtime.from_pretrained("slot-shapes-32", load_calibration=False)


def test_export_to_a_special_or_empty_path_writes_nothing(seg_runtime: Runtime, tmp_path: pathlib.Path) -> None:
    before = {p: os.lstat(p).st_mode for p in ("/dev/full", "/dev/null")}
    for path in ("", tmp_path, "/proc/self/x.onnx", "/dev/full", "/dev/null", "/sys/x.onnx"):
        with pytest.raises(ConfigError):
            export(seg_runtime.model, seg_runtime.card, "onnx", path, verify=False)
    assert {p: os.lstat(p).st_mode for p in before} == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, words", [(b"[]", "object"), (b"null", "null"), (b"{}", "sha256"), (b"\xff", "UTF-8"),
                                            (b"[" * 100_000, "nested")])
def test_bad_manifests_are_load_errors(tmp_path: pathlib.Path, content: bytes, words: str) -> None:
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    manifest_path(onnx_file).write_bytes(content)
    with pytest.raises(GraphFileError, match=words) as info:
        load_manifest(onnx_file)
    assert isinstance(info.value, ModelLoadError)


def test_tampered_graph_with_nan_initializers_is_refused(seg_runtime: Runtime, tmp_path: pathlib.Path) -> None:
    onnx = pytest.importorskip("onnx")
    res = export(seg_runtime.model, seg_runtime.card, "onnx", tmp_path / "seg.onnx", verify=False)
    proto = onnx.load(str(res.onnx_path))
    init = next(i for i in proto.graph.initializer if i.data_type == 1)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.reshape(-1)[0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    data = proto.SerializeToString()
    res.onnx_path.write_bytes(data)
    with pytest.raises(GraphFileError, match="does not match the sha256"):  # manifest left as it was
        verify(res.onnx_path, seg_runtime.model, seg_runtime.card, n_images=1)
    m = load_manifest(res.onnx_path)
    m["sha256"] = __import__("hashlib").sha256(data).hexdigest()  # manifest edited to match
    manifest_path(res.onnx_path).write_text(json.dumps(m))
    for call in (lambda: verify(res.onnx_path, seg_runtime.model, seg_runtime.card, n_images=1), lambda: load_proto(res.onnx_path),
                 lambda: load_proto(data)):
        with pytest.raises(ModelLoadError, match="NaN or infinite"):
            call()
    manifest_path(res.onnx_path).unlink()  # manifest missing
    with pytest.raises(ModelLoadError):
        verify(res.onnx_path, seg_runtime.model, seg_runtime.card, n_images=1)


def test_verification_compares_nan_outputs_as_misses() -> None:
    tol = {"atol": 1e-4, "rtol": 1e-3}
    stats = _compare({"masks": np.array([np.nan, 0.0])}, {"masks": np.array([0.5, 0.0])}, tol)["masks"]
    assert stats["max_abs"] == math.inf and stats["worst_ratio"] == math.inf and not stats["finite"]


# ----------------------------------------------------------------------------------------------------
# Fuzz: one file of a copied model mutated per case, loaded through the public loaders

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
SPECIAL = [b"", b"\xff\xfe\x00", b"[" * 50_000, b"{" * 50_000, b"null", b"[]", b"5", b'"x"', b"\x00" * 64]


def _edits(valid: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(valid)
    for pos, byte in edits:
        out[pos % len(out)] = byte
    return bytes(out)


def byte_mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations, byte edits, insertions and a few hostile constants."""
    n = len(valid)
    return st.one_of(
        st.binary(max_size=300),
        st.integers(0, n - 1).map(lambda k: valid[:k]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=6).map(lambda e: _edits(valid, e)),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=8)).map(lambda t: valid[: t[0]] + t[1] + valid[t[0]:]),
        st.sampled_from(SPECIAL),
    )


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def doc_mutations(doc: dict) -> st.SearchStrategy[dict]:  # type: ignore[type-arg]
    """A valid document with one value replaced, one key deleted or one unknown key added."""
    paths = _paths(doc)[1:]

    def apply(args: tuple) -> dict:  # type: ignore[type-arg]
        path, action, value = args
        out = copy.deepcopy(doc)
        node = out
        for p in path[:-1]:
            node = node[p]
        if action == "replace":
            node[path[-1]] = value
        elif action == "delete":
            del node[path[-1]]
        elif isinstance(node, dict):
            node[f"unknown_{len(path)}"] = value
        return out

    return st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "replace", "delete", "add"]), JSON_VALUES).map(apply)


def number_mutations(doc: dict) -> st.SearchStrategy[dict]:  # type: ignore[type-arg]
    """A valid document with one number changed to another of the same kind (mostly loads, or is out of range)."""
    paths = [p for p in _paths(doc)[1:] if isinstance(_get(doc, p), (int, float)) and not isinstance(_get(doc, p), bool)]

    def apply(args: tuple) -> dict:  # type: ignore[type-arg]
        path, number = args
        out = copy.deepcopy(doc)
        node = _get(out, path[:-1])
        node[path[-1]] = int(number) if isinstance(node[path[-1]], int) else number
        return out

    return st.tuples(st.sampled_from(paths), st.floats(-1e6, 1e6)).map(apply)


def _get(doc: object, path: tuple) -> object:  # type: ignore[type-arg]
    for p in path:
        doc = doc[p]  # type: ignore[index]
    return doc


def json_mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    doc = json.loads(valid)
    return st.one_of(byte_mutations(valid), doc_mutations(doc).map(lambda d: json.dumps(d).encode()),
                     number_mutations(doc).map(lambda d: json.dumps(d).encode()))


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, (int, str)) or v is None:
        return json.dumps(v if v is not None else "")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"  # type: ignore[attr-defined]


def to_toml(doc: dict) -> str:  # type: ignore[type-arg]
    return "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items()) + "\n"


def _restoring(path: pathlib.Path, content: bytes, load):
    """Write `content` to `path`, run `load`, put the original back; the typed error or the loaded value."""
    original = path.read_bytes()
    try:
        path.write_bytes(content)
        return _typed(load)
    finally:
        path.write_bytes(original)


_RECIPE = (adapter_roots()[-1] / "slot_tta_batched.toml").read_text()  # has an [execution] table
FUZZ = settings(max_examples=130, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                        HealthCheck.too_slow])


def _shipped(name: str) -> bytes:
    return (SHIPPED / "digits-cnn-bn" / name).read_bytes()


@FUZZ
@given(content=json_mutations(_shipped("card.json")))
def test_fuzz_card(digits: pathlib.Path, content: bytes) -> None:
    out = _restoring(digits / "card.json", content, lambda: Runtime.from_pretrained(digits, load_calibration=False))
    assert isinstance(out, (Runtime, *TYPED))


@FUZZ
@given(content=st.one_of(byte_mutations(_RECIPE.encode()), doc_mutations(tomllib.loads(_RECIPE)).map(lambda d: to_toml(d).encode())))
def test_fuzz_recipe(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz_recipe.toml"
    path.write_bytes(content)
    out = _typed(load_recipe, path)
    assert isinstance(out, (AdaptConfig, *TYPED))


def _score_all(cals: dict) -> None:  # type: ignore[type-arg]
    """A calibration that loads must score a batch of the model's features (no error of any kind)."""
    rng = np.random.default_rng(0)
    with np.errstate(all="ignore"):
        for cal in cals.values():
            stem = rng.normal(size=(3, len(cal.state["inv_scales"]))) if "inv_scales" in cal.state else None
            feats = OODFeatures(embedding=rng.normal(size=(3, D)), logits=rng.normal(size=(3, C)), stem=stem)
            assert cal.score(feats).shape == (3,)
            assert math.isfinite(cal.threshold)


@FUZZ
@given(content=json_mutations(_shipped("ood/calibration.json")))
def test_fuzz_calibration_json(digits: pathlib.Path, content: bytes) -> None:
    out = _restoring(digits / "ood" / "calibration.json", content, lambda: load_calibration(digits))
    if isinstance(out, dict):
        _score_all(out)


def _npz_with(valid: bytes, key: str, arr: np.ndarray) -> bytes:
    with np.load(io.BytesIO(valid)) as z:
        data = {k: z[k] for k in z.files}
    data[key] = arr
    buf = io.BytesIO()
    np.savez(buf, **data)
    return buf.getvalue()


_NPZ = _shipped("ood/state.npz")
_NPZ_KEYS = sorted(np.load(io.BytesIO(_NPZ)).files)
ARRAYS = st.tuples(
    st.lists(st.integers(0, 80), min_size=0, max_size=3), st.sampled_from(["<f8", "<f4", "<i8", "|b1", "<f2"]),
    st.sampled_from([0.0, 1.0, np.nan, np.inf, 1e300]),
).map(lambda t: _array(*t))


def _scaled(key: str, factor: float) -> np.ndarray:
    with np.load(io.BytesIO(_NPZ)) as z:
        return z[key] * factor


def _array(shape: list[int], dtype: str, value: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.full(shape, value).astype(dtype)


@FUZZ
@given(content=st.one_of(
    byte_mutations(_NPZ),
    st.tuples(st.sampled_from(_NPZ_KEYS), ARRAYS).map(lambda t: _npz_with(_NPZ, t[0], t[1])),
    st.tuples(st.sampled_from(_NPZ_KEYS), st.floats(-1e3, 1e3)).map(lambda t: _npz_with(_NPZ, t[0], _scaled(t[0], t[1]))),
    st.tuples(st.integers(0, 2**40), st.integers(0, 2**20)).map(lambda t: _npz_declaring(t)),
))
def test_fuzz_state_npz(digits: pathlib.Path, content: bytes) -> None:
    out = _restoring(digits / "ood" / "state.npz", content, lambda: load_calibration(digits))
    if isinstance(out, dict):
        _score_all(out)


@FUZZ
@given(content=json_mutations(_shipped("prune/r0.6/prune.json")))
def test_fuzz_prune_card(digits: pathlib.Path, content: bytes) -> None:
    card = load_card(digits)

    def load():
        load_prune_card(digits, "r0.6")
        return load_pruned(digits, card, "r0.6")

    out = _restoring(digits / "prune" / "r0.6" / "prune.json", content, load)
    assert isinstance(out, (tuple, *TYPED))


MANIFEST = {
    "format_version": 1, "kind": "onnx", "file": "m.onnx", "sha256": "0" * 64, "model": "slot-shapes-32",
    "part": "predictor", "request": ExportOptions().model_dump(mode="json"), "precision": "fp32", "opset": 17,
    "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
    "outputs": [{"name": "masks", "dtype": "float32", "shape": ["batch", 8, 32, 32]}],
    "dynamic": {"batch": [1, 16], "size": None}, "model_size": 32,
    "weights": {"tensors": {"encoder.0.weight": {"shape": [32, 3, 5, 5], "dtype": "float32"}}, "digest": "x"},
    "verification": {"passed": True},
}


@FUZZ
@given(content=json_mutations(json.dumps(MANIFEST).encode()))
def test_fuzz_manifest(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    from tta_runtime.deploy.options import dynamic_ranges

    onnx_file = tmp_path_factory.getbasetemp() / "fuzz.onnx"
    manifest_path(onnx_file).write_bytes(content)

    def load():
        m = load_manifest(onnx_file)
        [TensorSpec.from_dict(d) for d in (*m["inputs"], *m["outputs"])]
        dynamic_ranges(m.get("dynamic"))
        int(m["model_size"])
        return validate(ExportOptions, m["request"], "request")

    out = _typed(load)
    assert isinstance(out, (ExportOptions, *TYPED))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=byte_mutations(_shipped("weights.safetensors")))
def test_fuzz_weights(digits: pathlib.Path, content: bytes) -> None:
    """Mutated weights, re-signed in the card (a deliberate replacement): parsed without pickle, checked finite."""
    card_path, weights = digits / "card.json", digits / "weights.safetensors"
    card_bytes = card_path.read_bytes()
    try:
        out = _restoring(weights, content, lambda: (_resign(digits), load_weights(digits, load_card(digits)))[1])
    finally:
        card_path.write_bytes(card_bytes)
    if isinstance(out, dict):
        assert all(isinstance(v, torch.Tensor) for v in out.values())
        assert all(bool(torch.isfinite(v).all()) for v in out.values() if v.is_floating_point())


def test_fuzz_left_the_copied_model_intact(digits: pathlib.Path) -> None:
    """Runs last in the module: every fuzz case restored the file it mutated (the copy still loads)."""
    assert isinstance(Runtime.from_pretrained(digits), Runtime)
    assert writable_path(digits / "new.onnx") == digits / "new.onnx"
