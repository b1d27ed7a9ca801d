"""Issue #23, the input doors: every bad image, tensor, batch or call argument ends in a typed error or a
correct Result, with the weights bit-exact; big batches and big files cost bounded memory and time.

Tiny models (a 16x16 slot segmenter and a 16x16 CNN classifier, random init, written to disk as model
folders) keep the property-based part fast; the memory checks run in a fresh process (peak RSS).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file

import tta_runtime
from tta_runtime import runtime as runtime_module
from tta_runtime.config import (
    ClassifierConfig,
    ModelCard,
    Preprocessing,
    SegmenterConfig,
    WeightsSpec,
)
from tta_runtime.decode import image_header_size
from tta_runtime.errors import (
    ConfigError,
    InvalidInputError,
    ModelLoadError,
    TTARuntimeError,
)
from tta_runtime.frozen import ood_scores
from tta_runtime.hub import sha256_file
from tta_runtime.inputs import prepare_image
from tta_runtime.models.build import build_model
from tta_runtime.ood import Calibration, OODFeatures

TYPED = (InvalidInputError, ConfigError, ModelLoadError)
ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY_SEG = SegmenterConfig(
    resolution=16, num_slots=3, slot_dim=16, iters=1, encoder_channels=8, encoder_layers=2, decoder_width=16, decoder_blocks=1
)
TINY_CLF = ClassifierConfig(resolution=16, num_classes=4, widths=(4, 8), norm="batch", rotation_head=False)


def write_model(folder: pathlib.Path, kind: str, *, poison: float | None = None) -> pathlib.Path:
    """A model folder (card.json + weights.safetensors, the card's sha256 matching) of a seeded random init;
    `poison` writes that value (NaN, Inf) into one weight first."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "segmenter":
        card_kw = {"segmenter": TINY_SEG, "preprocessing": Preprocessing(size=16)}
    else:
        card_kw = {"task": "classification", "architecture": "cnn_classifier", "classifier": TINY_CLF,
                   "labels": ["a", "b", "c", "d"], "preprocessing": Preprocessing(size=16), "default_recipe": "tent"}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(ModelCard(name="tiny", weights=WeightsSpec(file="w", sha256="0" * 64), **card_kw))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if poison is not None:
        first = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[first].view(-1)[1] = poison
    weights = folder / "weights.safetensors"
    save_file(state, str(weights))
    card = ModelCard(name=f"tiny-{kind}", weights=WeightsSpec(file=weights.name, sha256=sha256_file(weights)), **card_kw)
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("reliability-models")
    return {kind: write_model(root / kind, kind) for kind in ("segmenter", "classifier")}


@pytest.fixture(scope="module")
def seg(models) -> tta_runtime.Runtime:
    return tta_runtime.Runtime.from_pretrained(str(models["segmenter"]), recipe="slot_tta", steps=1)


@pytest.fixture(scope="module")
def clf(models) -> tta_runtime.Runtime:
    return tta_runtime.Runtime.from_pretrained(str(models["classifier"]), recipe="tent", steps=1)


def snapshot(rt: tta_runtime.Runtime) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rt.model.state_dict().items()}


def assert_bit_exact(rt: tta_runtime.Runtime, snap: dict[str, torch.Tensor]) -> None:
    changed = [k for k, v in rt.model.state_dict().items() if not torch.equal(v, snap[k])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"


def images(n: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + i % 3, 3), dtype=np.uint8) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# 1. Big batches: chunks, same results, bounded memory


@pytest.mark.parametrize("kind", ["seg", "clf"])
def test_a_batch_longer_than_a_chunk_equals_image_by_image(kind, request):
    rt = request.getfixturevalue(kind)
    batch = images(runtime_module.PREDICT_CHUNK * 2 + 3)
    together = rt.predict(batch)
    assert len(together) == len(batch)
    for i in (0, runtime_module.PREDICT_CHUNK - 1, runtime_module.PREDICT_CHUNK, len(batch) - 1):
        alone = rt.predict(batch[i])
        if kind == "seg":
            np.testing.assert_allclose(together[i].masks, alone.masks, atol=1e-5)
        else:
            np.testing.assert_allclose(together[i].logits, alone.logits, atol=1e-5)
        assert together[i].ood_score == pytest.approx(alone.ood_score, rel=1e-4, abs=1e-5)


def test_a_classifier_adapts_a_long_batch_chunk_by_chunk(clf):
    """The documented behaviour: each CLASSIFIER_ADAPT_CHUNK images are one adaptation batch (episodic)."""
    n = runtime_module.CLASSIFIER_ADAPT_CHUNK
    batch = images(n + 5, seed=3)
    snap = snapshot(clf)
    together = clf.adapt_and_predict(batch)
    first, rest = clf.adapt_and_predict(batch[:n]), clf.adapt_and_predict(batch[n:])
    np.testing.assert_allclose(np.stack([r.logits for r in together]), np.stack([r.logits for r in first + rest]), atol=1e-5)
    assert together[0].adaptation.steps_run == 1 and together[-1].adaptation.steps_run == 1
    assert_bit_exact(clf, snap)


def _bomb_png(path: pathlib.Path, side: int = 20_000) -> pathlib.Path:
    """A valid side x side 1-bit gray PNG (all black), written without any image in memory (about 50 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + the packed bits
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_bomb_png_is_a_valid_image(tmp_path):
    """The bomb file itself is sound: the same construction at a small size decodes to what it says."""
    import cv2

    small = _bomb_png(tmp_path / "small.png", side=3000)
    decoded = cv2.imread(str(small), cv2.IMREAD_GRAYSCALE)
    assert decoded is not None and decoded.shape == (3000, 3000) and decoded.max() == 0
    assert image_header_size(_bomb_png(tmp_path / "big.png").read_bytes()) == (20_000, 20_000)


def test_big_batches_and_bombs_cost_bounded_memory_in_a_fresh_process(tmp_path):
    """predict on a long batch of mixed sizes grows the peak RSS by about one chunk's work, not the batch's
    (run with a chunk of 4 and a batch of 64: unchunked, the default model needs ~200 MB more); the
    20000x20000 PNG is refused in under 0.5 s with under 50 MB growth."""
    bomb = _bomb_png(tmp_path / "bomb.png")
    script = textwrap.dedent("""
        import json, resource, sys, time
        import numpy as np
        import tta_runtime
        from tta_runtime import runtime as runtime_module

        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        rt = tta_runtime.Runtime.from_pretrained("slot-shapes-32")
        out = {}
        rt.predict(np.zeros((16, 16, 3), np.uint8))  # warm: the bomb's growth is measured over a loaded runtime
        base = peak_mb()
        t0 = time.perf_counter()
        try:
            rt.predict(sys.argv[1])
            out["bomb"] = "accepted"
        except tta_runtime.InvalidInputError as e:
            out["bomb"] = str(e)
        out["bomb_s"], out["bomb_mb"] = time.perf_counter() - t0, peak_mb() - base
        runtime_module.PREDICT_CHUNK = 4
        batch = [np.zeros((1 + i % 40, 1 + i % 23, 3), np.uint8) for i in range(64)]
        rt.predict(batch[:4])
        base = peak_mb()
        out["n"] = len(rt.predict(batch))
        out["batch_mb"] = peak_mb() - base
        print(json.dumps(out))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "max_pixels" in out["bomb"] and "20000x20000" in out["bomb"], out
    assert out["bomb_s"] < 0.5 and out["bomb_mb"] < 50, out
    assert out["n"] == 64 and out["batch_mb"] < 60, out


# ----------------------------------------------------------------------------------------------------
# 2. Decompression bombs: the header is read before any decoding


def _encoded(ext: str, shape: tuple[int, ...] = (37, 53, 3), dtype: type = np.uint8) -> bytes:
    import cv2

    arr = np.full(shape, 100, dtype) if dtype == np.uint8 else np.full(shape, 0.4, dtype)
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp", ".gif", ".ppm", ".pgm", ".ras", ".jp2"])
def test_the_header_size_matches_the_decoded_size_and_is_checked_first(ext, tmp_path):
    data = _encoded(ext, (37, 53) if ext == ".pgm" else (37, 53, 3))
    assert image_header_size(data) == (37, 53)
    path = tmp_path / f"x{ext}"
    path.write_bytes(data)
    assert prepare_image(path, size=8).original_size == (37, 53)
    with pytest.raises(InvalidInputError, match="37x53 = 1961 pixels is more than max_pixels = 1960"):
        prepare_image(path, size=8, max_pixels=1960)


@pytest.mark.parametrize("ext", [".pfm", ".hdr"])
def test_float_formats_have_their_header_read_too(ext):
    assert image_header_size(_encoded(ext, (37, 53, 3), np.float32)) == (37, 53)


def test_a_png_whose_header_claims_a_huge_size_is_refused_without_decoding(tmp_path):
    data = bytearray(_encoded(".png"))
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height (the CRC is now wrong: never decoded)
    path = tmp_path / "claims.png"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match=r"100000x100000 = 10000000000 pixels is more than max_pixels"):
        prepare_image(path, size=8)


def test_unknown_formats_and_cut_headers_are_refused(tmp_path):
    for name, data in {"text.png": b"hello world, not an image", "cut.png": _encoded(".png")[:20],
                       "cut.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF"}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidInputError, match="is not a readable image"):
            prepare_image(tmp_path / name, size=8)


def test_a_pil_image_is_refused_by_its_size_before_its_pixels_are_read(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    (tmp_path / "x.png").write_bytes(_encoded(".png"))
    with pil.open(tmp_path / "x.png") as im, pytest.raises(InvalidInputError, match="37x53 = 1961 pixels is more than max_pixels = 10"):
        prepare_image(im, size=8, max_pixels=10)


# ----------------------------------------------------------------------------------------------------
# 3. Special files: refused before they are read


def _call_with_timeout(fn, timeout: float = 10.0):
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call blocked for over {timeout} s"
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_path_is_refused_without_blocking(tmp_path, seg):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    box = _call_with_timeout(lambda: seg.predict(str(fifo)))
    assert isinstance(box.get("error"), InvalidInputError) and "not a regular file" in str(box["error"])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_a_device_path_is_refused(seg):
    box = _call_with_timeout(lambda: seg.predict("/dev/zero"))
    assert isinstance(box.get("error"), InvalidInputError) and "not a regular file" in str(box["error"])


# ----------------------------------------------------------------------------------------------------
# 4. Raw exceptions that are typed now


def _odd_tensors() -> dict[str, torch.Tensor]:
    dense = torch.rand(3, 8, 8)
    out = {
        "meta": torch.empty(3, 8, 8, device="meta"),
        "sparse": dense.to_sparse(),
        "sparse_csr": torch.rand(8, 8).to_sparse_csr(),
        "nested": torch.nested.nested_tensor([dense, torch.rand(3, 4, 8)]),
        "jagged": torch.nested.nested_tensor([torch.rand(2, 3), torch.rand(4, 3)], layout=torch.jagged),
        "quantized": torch.quantize_per_tensor(dense, 0.1, 0, torch.quint8),
        "batch_sparse": torch.rand(2, 3, 8, 8).to_sparse(),
    }
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["meta", "sparse", "sparse_csr", "nested", "jagged", "quantized", "batch_sparse"])
@pytest.mark.parametrize("kind", ["seg", "clf"])
def test_meta_sparse_nested_and_quantized_tensors_are_refused(name, kind, request):
    rt = request.getfixturevalue(kind)
    snap = snapshot(rt)
    tensor = _odd_tensors()[name]
    for call in (rt.predict, rt.adapt_and_predict):
        with pytest.raises(InvalidInputError, match="dense tensors"):
            call(tensor)
    with pytest.raises(InvalidInputError, match="dense tensors"):
        rt.predict([torch.rand(3, 8, 8), tensor])
    assert_bit_exact(rt, snap)


@pytest.mark.parametrize("kind", ["seg", "clf"])
def test_on_step_must_be_callable(kind, request):
    rt = request.getfixturevalue(kind)
    with pytest.raises(ConfigError, match="on_step must be a callable.*got int 5"):
        rt.adapt_and_predict(images(1)[0], on_step=5)


@pytest.mark.parametrize("mode", ["episodic", "continual"])
@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
@pytest.mark.parametrize("inner", ["reset", "adapt_and_predict"])
def test_on_step_cannot_reset_or_adapt_re_entrantly(inner, kind, mode, models):
    rt = tta_runtime.Runtime.from_pretrained(str(models[kind]), steps=2, mode=mode)
    image = images(1)[0]
    rt.adapt_and_predict(image)  # continual: the call below starts from moved weights
    snap = snapshot(rt)

    def on_step(step, out):
        rt.predict(image)  # allowed (documented)
        rt.reset() if inner == "reset" else rt.adapt_and_predict(image)

    with pytest.raises(ConfigError, match=f"{inner}.*from inside an on_step callback"):
        rt.adapt_and_predict(image, on_step=on_step)
    assert_bit_exact(rt, snap)
    assert rt.adapt_and_predict(image).adaptation.steps_run == 2  # the runtime still works


def test_on_step_may_call_predict(seg):
    seen = []
    res = seg.adapt_and_predict(images(1)[0], on_step=lambda step, out: seen.append(seg.predict(images(1)[0])))
    assert res.adaptation.steps_run == 1 and len(seen) == 2


@pytest.mark.parametrize("recipe", [123, None, ["tent"], 1.5, {"a": 1}])
def test_a_per_call_recipe_of_the_wrong_type_names_the_field(recipe, clf):
    snap = snapshot(clf)
    with pytest.raises(ConfigError, match="recipe"):
        clf.adapt_and_predict(images(1)[0], recipe=recipe)
    assert_bit_exact(clf, snap)


# ----------------------------------------------------------------------------------------------------
# 5. Bad data no longer accepted silently


@pytest.mark.parametrize("shape", [(64, 64, 5), (64, 64, 2), (3, 64, 64), (4, 16, 16), (1, 16, 16), (10, 16, 16)])
@pytest.mark.parametrize("kind", ["seg", "clf"])
def test_ambiguous_3d_arrays_are_refused_with_the_forms_expected(shape, kind, request):
    rt = request.getfixturevalue(kind)
    with pytest.raises(InvalidInputError, match=r"\(N, H, W, 1\)"):
        rt.predict(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("kind", ["seg", "clf"])
def test_a_gray_batch_is_n_h_w_1(kind, request):
    rt = request.getfixturevalue(kind)
    gray = np.stack([im[:, :16, 0] for im in images(5)])[..., None]  # (5, 16, 16, 1)
    batch = rt.predict(gray)
    assert len(batch) == 5
    alone = rt.predict(gray[2])
    key = "masks" if kind == "seg" else "logits"
    np.testing.assert_allclose(getattr(batch[2], key), getattr(alone, key), atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_non_finite_weights_are_refused_at_load(value, kind, tmp_path):
    folder = write_model(tmp_path / kind, kind, poison=value)  # the card's sha256 matches the poisoned file
    with pytest.raises(ModelLoadError, match="NaN or (Inf|infinite)"):
        tta_runtime.Runtime.from_pretrained(str(folder))


def test_a_runtime_built_around_a_non_finite_model_is_refused(seg):
    """The runtime's own check covers every way in (a model object, torchvision/timm weights, pruned variants)."""
    model = build_model(seg.card)
    model.load_state_dict(seg.model.state_dict())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ModelLoadError, match="NaN or Inf"):
        tta_runtime.Runtime(model, seg.card)


def _features(seg, n: int = 2) -> OODFeatures:
    from tta_runtime.frozen import FeaturePass

    x = torch.rand(n, 3, 16, 16)
    with torch.inference_mode():
        return FeaturePass(seg.model, "segmentation", "encoder")(x)[1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("state,threshold", [
    ({"mean": float("nan"), "std": 0.01}, 1.0),   # NaN statistics: every score NaN, is_ood always False before
    ({"mean": 0.01, "std": 0.0}, 1.0),             # a std of 0: inf
    ({"mean": 0.01, "std": 0.01}, float("nan")),   # a NaN threshold
])
def test_scores_from_a_broken_calibration_are_refused(state, threshold, seg):
    cal = Calibration(scorer="recon_error", params={}, state=state, threshold=threshold)
    with pytest.raises(ModelLoadError, match="non-finite OOD scores"):
        ood_scores(_features(seg), cal, seg.card)
    good = Calibration(scorer="recon_error", params={}, state={"mean": 0.01, "std": 0.01}, threshold=1.0)
    assert all(math.isfinite(s.score) for s in ood_scores(_features(seg), good, seg.card))


def test_a_broken_calibration_in_the_model_folder_ends_typed(models, tmp_path):
    """Written into a model folder, NaN statistics are refused at load or on the first predict."""
    import shutil

    from tta_runtime.ood.calibration import save_calibration

    folder = tmp_path / "m"
    shutil.copytree(models["segmenter"], folder)
    sha = json.loads((folder / "card.json").read_text())["weights"]["sha256"]
    cal = Calibration(scorer="recon_error", params={}, state={"mean": 0.01, "std": 0.01}, threshold=1.0,
                      n_images=8, n_threshold=8, weights_sha256=sha)
    save_calibration(folder, {"recon_error": cal})
    path = folder / "ood" / "calibration.json"
    doc = json.loads(path.read_text())
    doc["calibrations"]["recon_error"]["scalars"]["mean"] = float("nan")  # written as NaN, which json reads back
    path.write_text(json.dumps(doc))
    with pytest.raises(TYPED):
        rt = tta_runtime.Runtime.from_pretrained(str(folder), adapt="when_ood", steps=1)
        rt.adapt_and_predict(images(1)[0])


# ----------------------------------------------------------------------------------------------------
# 6. A per-call continual override does not leak into the episodic calls


def test_a_per_call_continual_stream_does_not_move_later_episodic_calls(models):
    rt = tta_runtime.Runtime.from_pretrained(str(models["segmenter"]), recipe="slot_tta", steps=2)
    loaded = snapshot(rt)
    image, other = images(2, seed=5)
    frozen = rt.predict(other)
    episodic = rt.adapt_and_predict(other)
    rt.adapt_and_predict(image, mode="continual")
    moved = snapshot(rt)
    assert any(not torch.equal(moved[k], loaded[k]) for k in loaded)
    second = rt.adapt_and_predict(image, mode="continual")  # a stream carries its weights from call to call
    assert second.adaptation.mode == "continual"
    assert any(not torch.equal(v, moved[k]) for k, v in rt.model.state_dict().items())
    # the runtime's own (episodic) calls start from the loaded weights again
    np.testing.assert_array_equal(rt.predict(other).masks, frozen.masks)
    assert_bit_exact(rt, loaded)
    rt.adapt_and_predict(image, mode="continual")
    np.testing.assert_allclose(rt.adapt_and_predict(other).masks, episodic.masks, atol=1e-6)
    assert_bit_exact(rt, loaded)
    # predict inside a stream's on_step does not reset the stream under the loop's feet
    rt.adapt_and_predict(image, mode="continual")
    seen = []
    res = rt.adapt_and_predict(image, mode="continual", on_step=lambda step, out: seen.append(rt.predict(other)))
    assert res.adaptation.steps_run == 2 and len(seen) == 3
    assert any(not torch.equal(v, loaded[k]) for k, v in rt.model.state_dict().items())
    rt.reset()
    assert_bit_exact(rt, loaded)


# ----------------------------------------------------------------------------------------------------
# 7. The ONNX Runtime backend: any batch length, and weights always in step


@pytest.fixture(scope="module")
def ort_pair(models):
    pytest.importorskip("onnxruntime", reason="the ONNX Runtime backend needs the 'onnx' extra")
    folder = str(models["segmenter"])
    return (tta_runtime.Runtime.from_pretrained(folder, load_calibration=False),
            tta_runtime.Runtime.from_pretrained(folder, load_calibration=False, backend="onnxruntime", onnxruntime_threads=1))


def test_onnxruntime_takes_batches_longer_than_its_graph_range(ort_pair):
    torch_rt, ort_rt = ort_pair
    batch = images(70, seed=7)  # the graph's batch range is 1..64
    a, b = torch_rt.predict(batch), ort_rt.predict(batch)
    assert len(b) == 70 and b[0].backend == "onnxruntime"
    for i in (0, 63, 64, 69):
        np.testing.assert_allclose(b[i].masks, a[i].masks, atol=1e-4)


@pytest.mark.parametrize("how", ["data", "load_state_dict", "in_place"])
def test_onnxruntime_follows_weights_edited_outside_the_runtime(how, ort_pair):
    torch_rt, ort_rt = ort_pair
    image = images(1, seed=9)[0]
    loaded = snapshot(ort_rt)
    try:
        for rt in (torch_rt, ort_rt):
            params = dict(rt.model.named_parameters())
            name = next(n for n in params if n.startswith("decoder") and params[n].ndim == 2)
            new = params[name].detach() * 3.0 + 0.1
            if how == "data":
                params[name].data.copy_(new)  # no version counter sees this write
            elif how == "load_state_dict":
                rt.model.load_state_dict({**rt.model.state_dict(), name: new})
            else:
                with torch.no_grad():
                    params[name].copy_(new)
        a, b = torch_rt.predict(image), ort_rt.predict(image)
        np.testing.assert_allclose(b.masks, a.masks, atol=1e-4)
    finally:
        for rt in (torch_rt, ort_rt):
            rt.model.load_state_dict(loaded)
    np.testing.assert_allclose(ort_rt.predict(image).masks, torch_rt.predict(image).masks, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Property-based: any array, tensor or batch ends in a typed error or a sound Result, weights bit-exact

_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64,
           np.bool_, np.complex64]
_TORCH_OK = {np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64}


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    if draw(st.booleans()):  # an image layout (H, W[, C]), most of them valid
        side = st.integers(1, 9)
        shape = (draw(side), draw(side), *draw(st.sampled_from([(), (1,), (3,), (3,), (4,), (2,)])))
    else:
        ndim = draw(st.integers(0, 5))
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 9]), min_size=ndim, max_size=ndim)))
    elements = None
    if dtype.kind == "f":
        width = min(64, dtype.itemsize * 8)
        wild = st.floats(width=width, allow_nan=True, allow_infinity=True)
        elements = st.floats(0, 1, width=width) if draw(st.integers(0, 3)) else st.one_of(st.floats(0, 1, width=width), wild)
    elif dtype.kind in "iu" and draw(st.booleans()):
        elements = st.integers(0, min(255, int(np.iinfo(dtype).max)))
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if arr.ndim >= 2 and draw(st.booleans()):
        arr = arr[::-1, ::2]  # negative and skipping strides
    return arr


@st.composite
def inputs(draw) -> object:
    arr = draw(arrays())
    form = draw(st.sampled_from(["numpy", "tensor", "channels_first", "list", "tuple", "list_of_tensors", "none"]))
    as_tensor = arr.dtype.type in _TORCH_OK
    if form == "tensor" and as_tensor:
        return torch.from_numpy(arr.copy())
    if form == "channels_first" and arr.ndim == 3:
        return np.moveaxis(arr, -1, 0)
    if form in ("list", "tuple"):
        items = [arr, draw(arrays())]
        return items if form == "list" else tuple(items)
    if form == "list_of_tensors" and as_tensor:
        return [torch.from_numpy(arr.copy())] * draw(st.integers(1, 3))
    if form == "none":
        return draw(st.sampled_from([None, 3, "", b"png", [], [[1, 2], [3, 4]], object()]))
    return arr


def _check_sound(result: object, kind: str) -> None:
    results = result if isinstance(result, list) else [result]
    assert results and all(isinstance(r, tta_runtime.Result) for r in results)
    for r in results:
        if kind == "seg":
            assert np.isfinite(r.masks).all() and np.allclose(r.masks.sum(0), 1.0, atol=1e-4)
        else:
            assert np.isfinite(r.probs).all() and r.probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert math.isfinite(r.ood_score)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["seg", "clf"])
@settings(max_examples=700, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(image=inputs(), adapt=st.integers(0, 3), order=st.sampled_from(["rgb", "bgr", "bgr", "rgb", "RGB", "hsv"]))
def test_fuzz_any_input_ends_typed_or_sound(kind, image, adapt, order, request):
    rt = request.getfixturevalue(kind)
    snap = _SNAPSHOTS.setdefault(kind, snapshot(rt))
    try:
        out = (rt.adapt_and_predict if adapt == 0 else rt.predict)(image, channel_order=order)
    except TYPED:
        pass
    else:
        _check_sound(out, kind)
    assert_bit_exact(rt, snap)


_SNAPSHOTS: dict[str, dict[str, torch.Tensor]] = {}


def test_every_typed_error_is_a_runtime_error():
    assert all(issubclass(e, TTARuntimeError) for e in TYPED)
