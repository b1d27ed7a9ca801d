"""Your own model and your own data (issue #21): a CNN defined here, trained briefly on the digits train split,
through `Runtime.from_module` -> `calibrate` -> `adapt_and_predict` -> `save` -> `from_pretrained(trust_code=True)`
-> `export` -> ONNX Runtime; loading without `trust_code` runs none of the folder's code; natural photos are
flagged OOD and clean digits are not, for this model and for the shipped digits models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import tta_runtime
from tta_runtime.data.digits import corrupt, load_digits
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.evaluation.ood_photos import natural_photos
from tta_runtime.inputs import prepare_image

LABELS = [str(d) for d in range(10)]
PRE = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "resize": "shorter_side"}
EPOCHS = 8


def small_cnn() -> nn.Module:
    """The user's network: plain BatchNorm2d, a Linear head; input normalised (x - 0.5) / 0.25."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


BUILDER = f"{__name__}:small_cnn"  # what the saved folder's card names; importable because pytest imported this file


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, two threads contending with other work ran the training 7x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    (x, y), (xt, yt) = load_digits("train"), load_digits("test")
    return {"x": x, "y": y, "xt": xt, "yt": yt}


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """Trained once per module (a few seconds): Adam, batch 64, the digits train split."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = small_cnn()
        x = (torch.from_numpy(digits["x"]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        y = torch.from_numpy(digits["y"])
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _ in range(EPOCHS):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                idx = perm[i : i + 64]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def calibrated(trained, digits):
    rt = tta_runtime.Runtime.from_module(trained, input_size=32, labels=LABELS, preprocessing=PRE)
    report = rt.calibrate(digits["x"])  # clean train images, no labels: the model's predictions stand in
    return rt, report


@pytest.fixture(scope="module")
def saved(calibrated, tmp_path_factory):
    rt, _ = calibrated
    return rt.save(tmp_path_factory.mktemp("custom") / "my-digits", builder=BUILDER)


def _error(results, labels) -> float:
    return float(np.mean(np.array([r.label for r in results]) != labels))


def test_from_module_wraps_a_copy_and_calibrates(trained, calibrated, digits) -> None:
    rt, report = calibrated
    assert rt.card.architecture == "module" and rt.card.module.num_classes == 10 and rt.card.module.feature_dim == 64
    assert type(trained[1]) is nn.BatchNorm2d  # the caller's module is untouched: the runtime swapped its own copy
    assert type(rt.model.net[1]).__name__ == "AdaptiveBatchNorm2d"
    assert report.default == rt.calibration.scorer == "stem_mahalanobis" and report.labels.startswith("pseudo")
    assert report.n_fit + report.n_threshold == len(digits["x"]) and report.fisher is not None
    assert set(report.fisher) == {"net.1.weight", "net.1.bias", "net.5.weight", "net.5.bias", "net.9.weight", "net.9.bias"}
    assert _error(rt.predict(digits["xt"]), digits["yt"]) < 0.1


def test_tent_on_a_corrupted_batch_lowers_the_error(calibrated, digits) -> None:
    rt, _ = calibrated
    x = corrupt(digits["xt"][:256], "frost", 5, seed=0)
    before = _error(rt.predict(x), digits["yt"][:256])
    after = _error(rt.adapt_and_predict(x), digits["yt"][:256])
    assert after <= 0.8 * before, (before, after)
    gated = rt.adapt_and_predict(x[:4], adapt="when_ood")  # frost is flagged, so the gate lets them adapt
    assert all(r.is_ood for r in gated) and all(r.adaptation.skipped is None for r in gated)


def test_photos_are_flagged_and_clean_digits_are_not(calibrated, digits) -> None:
    rt, _ = calibrated
    photos = natural_photos()
    assert len(photos) >= 20
    assert np.mean([r.is_ood for r in rt.predict(photos)]) >= 0.9
    assert np.mean([r.is_ood for r in rt.predict(digits["xt"])]) <= 0.05


def test_saved_folder_loads_with_trust_code_and_predicts_identically(calibrated, saved, digits) -> None:
    rt, _ = calibrated
    card = json.loads((saved / "card.json").read_text())
    assert card["architecture"] == f"python:{BUILDER}" and card["fisher"]["file"] == "fisher.safetensors"
    assert (saved / "ood" / "calibration.json").is_file() and (saved / "recipe.toml").is_file()
    loaded = tta_runtime.Runtime.from_pretrained(saved, trust_code=True)
    assert loaded.recipe == rt.recipe and loaded.calibration.scorer == rt.calibration.scorer
    images = [*digits["xt"][:16], *natural_photos()[:4]]
    for a, b in zip(rt.predict(images), loaded.predict(images)):
        assert np.array_equal(a.logits, b.logits) and a.ood_score == b.ood_score and a.is_ood == b.is_ood
    x = corrupt(digits["xt"][:64], "fog", 5, seed=1)
    for a, b in zip(rt.adapt_and_predict(x, recipe="eata"), loaded.adapt_and_predict(x, recipe="eata")):
        assert np.array_equal(a.logits, b.logits)  # the Fisher travelled with the folder


def _parity(session, rt, images) -> float:
    worst = 0.0
    for im in images:
        x = prepare_image(im, preprocessing=rt.card.preprocessing).tensor.numpy()
        logits, probs, score = session.run(None, {"image": x})
        r = rt.predict(im)
        worst = max(worst, float(np.abs(probs[0] - r.probs).max()), float(np.abs(logits[0] - r.logits).max()),
                    abs(float(score[0]) - r.ood_score) / max(1.0, abs(r.ood_score)))
    return worst


def test_export_matches_onnx_runtime_on_full_size_and_model_size_inputs(saved, digits, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    rt = tta_runtime.Runtime.from_pretrained(saved, trust_code=True)
    res = rt.export(tmp_path / "custom.onnx", part="predictor_ood", dynamic={"batch": (1, 8)})
    assert res.verification["passed"]
    assert res.manifest["preprocessing"]["card"]["resize"] == "shorter_side" and "centre" in res.manifest["preprocessing"]["resize"]
    session = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    full = [*natural_photos()[:4], np.kron(digits["xt"][0], np.ones((3, 2, 1), np.uint8))]  # 512x512 .. 96x64
    assert _parity(session, rt, full) <= 1e-4
    assert _parity(session, rt, list(digits["xt"][:8])) <= 1e-4


def _cli(argv: list[str]) -> int:
    from tta_runtime.cli.main import main

    return main(argv)


def test_cli_calibrate_and_export_a_python_folder(saved, digits, tmp_path) -> None:
    import shutil

    import cv2

    saved = Path(shutil.copytree(saved, tmp_path / "my-digits"))  # the module's folder stays as other tests expect it

    pytest.importorskip("onnxruntime")
    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(digits["x"][:200]):
        cv2.imwrite(str(images / f"{i:04d}.png"), im[..., ::-1])
    before = (saved / "ood" / "calibration.json").read_text()
    out = tmp_path / "cal.json"
    assert _cli(["calibrate", "--model", str(saved), "--images", str(images), "--trust-code", "-q", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 200 and report["default"] == "stem_mahalanobis" and report["n_threshold"] == 40
    assert (saved / "ood" / "calibration.json").read_text() != before
    rt = tta_runtime.Runtime.from_pretrained(saved, trust_code=True)
    assert rt.calibration.n_images == 160  # the folder now holds the calibration just fitted
    from tta_runtime.cli.main import main

    onnx_path = tmp_path / "cli.onnx"
    assert main(["export", str(saved), "--trust-code", "--part", "predictor_ood", "--out", str(onnx_path), "-q", "--n-verify", "4"]) == 0
    assert json.loads(onnx_path.with_suffix(".onnx.json").read_text())["verification"]["passed"]
    assert main(["export", str(saved), "--out", str(tmp_path / "refused.onnx"), "-q"]) == 2  # no --trust-code


def test_loading_without_trust_code_runs_none_of_the_folders_code(saved, tmp_path, monkeypatch) -> None:
    # A builder module that writes a file when imported and when called: refusing must leave no trace.
    marker = tmp_path / "ran.txt"
    (tmp_path / "pkg_writes_a_file.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from {__name__} import small_cnn

        def build():
            pathlib.Path({str(marker)!r}).write_text("called")
            return small_cnn()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    card = json.loads((saved / "card.json").read_text())
    folder = tmp_path / "untrusted"
    folder.mkdir()
    for f in saved.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    card["architecture"], card["module"]["builder"] = "python:pkg_writes_a_file:build", "pkg_writes_a_file:build"
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="trust_code=True") as err:
        tta_runtime.Runtime.from_pretrained(folder)
    assert "pkg_writes_a_file" in str(err.value) and "Nothing was imported or run" in str(err.value)
    assert not marker.exists() and "pkg_writes_a_file" not in sys.modules
    # the control: trusting the folder does run its builder (so the check above could have failed)
    tta_runtime.Runtime.from_pretrained(folder, trust_code=True, load_calibration=False)
    assert marker.read_text() == "called"
    sys.modules.pop("pkg_writes_a_file", None)


@pytest.mark.parametrize("model", ["digits-cnn-bn", "digits-cnn-gn"])
def test_shipped_digits_models_flag_photos_not_clean_digits(model, digits) -> None:
    rt = tta_runtime.Runtime.from_pretrained(model)
    assert rt.calibration.scorer == "stem_mahalanobis"
    assert np.mean([r.is_ood for r in rt.predict(natural_photos())]) >= 0.9
    assert np.mean([r.is_ood for r in rt.predict(digits["xt"])]) <= 0.05


# -- what from_module takes and refuses (untrained networks: contracts only) -------------------------------


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: torch.Tensor


class DictNet(nn.Module):
    def __init__(self, as_dataclass: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 5)
        self.as_dataclass = as_dataclass

    def forward(self, x):
        f = self.body(x)
        return Out(self.head(f), f) if self.as_dataclass else {"logits": self.head(f), "features": f}


@pytest.mark.parametrize("as_dataclass", [False, True])
def test_dict_and_dataclass_outputs_and_groupnorm_affine_adaptation(as_dataclass, state) -> None:
    rt = tta_runtime.Runtime.from_module(DictNet(as_dataclass), input_size=16, features="body.1")
    assert rt.card.module.num_classes == 5 and rt.card.module.feature_dim == 8  # GroupNorm output, averaged spatially
    x = np.random.default_rng(0).integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
    snap = state.snapshot(rt.model)
    res = rt.adapt_and_predict(x, steps=2)
    assert res[0].adaptation.params_adapted == 16 and res[0].adaptation.steps_run == 2  # GroupNorm weight + bias
    state.assert_bit_exact(rt.model, snap)  # episodic
    with pytest.raises(ConfigError, match="rotation head"):
        tta_runtime.Runtime.from_module(DictNet(), input_size=16, recipe="rotation")


def test_from_module_refuses_what_it_cannot_use() -> None:
    with pytest.raises(ConfigError, match="names no submodule"):
        tta_runtime.Runtime.from_module(DictNet(), input_size=16, features="body.9")
    with pytest.raises(ConfigError, match="no nn.Linear"):
        tta_runtime.Runtime.from_module(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_size=8)
    with pytest.raises(ConfigError, match="logits"):
        tta_runtime.Runtime.from_module(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(8, 3)), input_size=8)  # (B, 4, 8, 3)
    with pytest.raises(ConfigError, match="mean"):
        tta_runtime.Runtime.from_module(small_cnn(), input_size=32, preprocessing={"mean": (0.5, 0.5, 0.5)})
    rt = tta_runtime.Runtime.from_module(small_cnn(), input_size=32)
    with pytest.raises(ConfigError, match="calibrate"):
        rt.adapt_and_predict(np.zeros((2, 32, 32, 3), np.uint8), adapt="when_ood")
    with pytest.raises(ConfigError, match="builder"):
        rt.save("unused-folder")
    with pytest.raises(ConfigError, match="at least 3"):
        rt.calibrate(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match="__main__"):
        rt.save("unused-folder", builder="__main__:small_cnn")


class UnusedLastLinear(nn.Module):
    """The head runs, a Linear registered after it never does: its input cannot be the OOD features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 5)
        self.proj = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_features_from_a_layer_that_never_runs_are_refused_not_replaced_by_logits() -> None:
    with pytest.raises(ConfigError, match="never ran its submodule 'proj'"):
        tta_runtime.Runtime.from_module(UnusedLastLinear(), input_size=16)
    rt = tta_runtime.Runtime.from_module(UnusedLastLinear(), input_size=16, features="body")
    assert rt.predict(np.zeros((16, 16, 3), np.uint8)).probs.shape == (5,)


class MyBatchNorm(nn.BatchNorm2d):
    """A user's own BatchNorm subclass."""


def test_batchnorm_subclasses_are_made_adaptive_too() -> None:
    from tta_runtime.models.classifier import AdaptiveBatchNorm2d

    net = nn.Sequential(nn.Conv2d(3, 4, 3), MyBatchNorm(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    rt = tta_runtime.Runtime.from_module(net, input_size=16, recipe="bn_stats")
    assert sum(isinstance(m, AdaptiveBatchNorm2d) for m in rt.model.modules()) == 1
    x = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    before = [r.probs for r in rt.predict(x)]
    after = [r.probs for r in rt.adapt_and_predict(x)]
    assert not np.allclose(before, after)  # batch statistics took effect


def test_shorter_side_resize_and_centre_crop() -> None:
    from tta_runtime.config import Preprocessing

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 30:50] = 255  # a white band in the centre columns
    pre = Preprocessing(size=16, resize="shorter_side", resize_to=20, interpolation="nearest")
    x = prepare_image(img, preprocessing=pre).tensor  # 40x80 -> 20x40 -> centre 16x16 (columns 12..27)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x[0, 0, 0], torch.tensor([0.0] * 3 + [1.0] * 10 + [0.0] * 3))
    square = prepare_image(img, preprocessing=Preprocessing(size=16))  # the default: the whole image, squashed
    assert float(square.tensor[0, 0, 0, 0]) == 0.0 and square.tensor.shape == (1, 3, 16, 16)


def test_from_architecture_takes_the_same_preprocessing_and_calibration(digits, tmp_path) -> None:
    import importlib.util

    try:
        torchvision = importlib.import_module("torchvision") if importlib.util.find_spec("torchvision") else None
    except Exception:  # noqa: BLE001 - torchvision beside a torch build it was not made for
        torchvision = None
    if torchvision is None:
        pytest.skip("torchvision is not importable here (optional extra 'torchvision'; see the README, 'what runs where')")
    from safetensors.torch import save_file

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    rt = tta_runtime.Runtime.from_architecture("torchvision", "resnet18", weights=weights, num_classes=10, input_size=32,
                                               preprocessing=PRE)
    assert rt.card.preprocessing.mean == PRE["mean"] and rt.card.external.mean == PRE["mean"]
    report = rt.calibrate(digits["x"][:200], digits["y"][:200], fisher=True)
    assert report.labels == "given" and rt.predict(natural_photos()[0]).is_ood is not None



def test_eata_says_when_it_has_no_fisher(caplog) -> None:
    """The issue's gap: EATA silently dropped its anti-forgetting term when no Fisher was there."""
    x = np.random.default_rng(1).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    # The level is set around the whole life of the runtime: an earlier CLI test may have left the root at ERROR.
    with caplog.at_level("WARNING", logger="tta_runtime.adapt.methods.eata"):
        bare = tta_runtime.Runtime.from_module(small_cnn(), input_size=32, recipe="eata")
        rep = bare.adapt_and_predict(x)[0].adaptation
    assert rep.method_info["fisher"].startswith("absent") and "anti-forgetting term is off" in caplog.text
    shipped = tta_runtime.Runtime.from_pretrained("digits-cnn-bn", recipe="eata")
    assert shipped.adapt_and_predict(x)[0].adaptation.method_info["fisher"] == "used"


def test_serve_runs_the_folders_code_only_with_trust_code(saved, digits, tmp_path) -> None:
    """A real server in a child process: without --trust-code the folder is refused (readiness says why, naming the
    flag); with it, /v1/predict answers what the Runtime in this process answers."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import cv2

    from tta_runtime.serve import ServeSettings
    from tta_runtime.serve.engine import Engine
    from tta_runtime.serve.process import ServerProcess

    engine = Engine(ServeSettings(models=(str(saved),), warmup=False))
    engine.start()
    assert not engine.wait_ready(60) and "--trust-code" in engine.failed and "Nothing was imported" in engine.failed
    engine.shutdown()
    image = digits["xt"][0]
    local = tta_runtime.Runtime.from_pretrained(saved, trust_code=True).predict(image)
    env = {"PYTHONPATH": str(Path(__file__).parent)}  # where the card's builder (this module) imports from
    with ServerProcess(["--model", str(saved), "--trust-code"], env=env, log=tmp_path / "server.log") as srv:
        body = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
        status, data = srv.json("POST", "/v1/predict", body, {"Content-Type": "image/png"})
    assert status == 200, data
    assert data["classification"]["label"] == local.label
    assert data["classification"]["probs"] == pytest.approx(local.probs.tolist(), abs=1e-5)


def test_save_overwrite_swaps_the_whole_folder_or_leaves_it_bit_exact(calibrated, tmp_path) -> None:
    """overwrite=True replaces the folder in one rename (keeping what save does not write); a save that fails while
    writing leaves the old folder byte for byte as it was, and no staging folder behind."""
    import dataclasses

    from tta_runtime.save import save_folder

    rt, _ = calibrated
    folder = rt.save(tmp_path / "m", builder=BUILDER)
    (folder / "NOTES.md").write_text("mine")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a model"):
        rt.save(folder, builder=BUILDER)
    broken = {n: dataclasses.replace(c, threshold=float("nan")) for n, c in rt._calibrations.items()}
    with pytest.raises(ConfigError, match="non-finite"):
        save_folder(folder, model=rt.model, card=rt.card, recipe=rt.recipe, calibrations=broken, fisher=rt._fisher,
                    builder=BUILDER, name="renamed", overwrite=True)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    rt.save(folder, builder=BUILDER, name="renamed", overwrite=True)
    assert json.loads((folder / "card.json").read_text())["name"] == "renamed" and (folder / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and oct(folder.stat().st_mode & 0o777) == "0o755"
    assert tta_runtime.Runtime.from_pretrained(folder, trust_code=True).name == "renamed"
