"""Packaging: the built wheel carries the models, recipes and assets inside the package and works installed.

The installed-wheel test also checks that `import tta_runtime` (in that fresh interpreter) loads none of
the optional backends (onnxruntime, tensorrt, scikit-image, OpenCV): they are imported on first use.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

import tta_runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TTA_RUNTIME_MODELS", "TTA_RUNTIME_ADAPTERS")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _python(code: str, *, cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_env(**env), capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A wheel built from this checkout, the way `pip wheel` builds it for users."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    wheels = list(out.glob("tta_runtime-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_contents(wheel: pathlib.Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "tta_runtime/__init__.py",
        "tta_runtime/py.typed",
        "tta_runtime/assets/ood_sample.png",
        "tta_runtime/serve/static/index.html",  # the server's page travels inside the package
        "tta_runtime/serve/static/app.js",
        "tta_runtime/serve/static/style.css",
        "tta_runtime/_shipped/models/slot-shapes-32/card.json",
        "tta_runtime/_shipped/adapters/slot_tta.toml",
        "tta_runtime/_shipped/adapters/slot_tta_fast.toml",
        "tta_runtime/_shipped/adapters/entropy.toml",
    ):
        assert required in names, required
    # The card's weights file travels with it, byte for byte.
    card = json.loads((ROOT / "models" / "slot-shapes-32" / "card.json").read_text())
    assert f"tta_runtime/_shipped/models/slot-shapes-32/{card['weights']['file']}" in names
    # Nothing at the top level but the package and its metadata: no `models`/`adapters` to shadow users' own.
    tops = {n.split("/", 1)[0] for n in names} - {"tta_runtime"}
    assert len(tops) == 1 and tops.pop().endswith(".dist-info")
    assert not any(n.startswith(("models/", "adapters/", "tests/", "runs/")) for n in names)
    # Entry point for the CLI.
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tta-runtime = tta_runtime.cli.main:main" in entry


@pytest.mark.slow
def test_installed_wheel_works_without_the_checkout(wheel: pathlib.Path, tmp_path: pathlib.Path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The dev venv's editable install puts the checkout on sys.path (a .pth file); drop it so that only
    # the installed wheel can answer, as on a user's machine.
    code = f"""
        import json, pathlib, sys
        root = pathlib.Path({str(ROOT)!r}).resolve()
        sys.path = [p for p in sys.path if p and pathlib.Path(p).resolve() != root]
        import tta_runtime
        eager = sorted(m for m in ("onnxruntime", "tensorrt", "skimage", "cv2") if m in sys.modules)
        print("eager", json.dumps(eager))
        from tta_runtime.hub import sample_image_path
        site = pathlib.Path({str(site)!r}).resolve()
        assert pathlib.Path(tta_runtime.__file__).resolve().is_relative_to(site), tta_runtime.__file__
        assert sample_image_path().resolve().is_relative_to(site), sample_image_path()
        print("models", json.dumps(tta_runtime.list_models()))
        print("recipes", json.dumps(tta_runtime.list_recipes()))
        rt = tta_runtime.Runtime.from_pretrained()
        assert rt.folder.resolve().is_relative_to(site / "tta_runtime" / "_shipped"), rt.folder
        res = rt.predict(sample_image_path())
        print("predict", res.masks.shape, res.segmentation.shape, round(float(res.masks.sum(0).mean()), 4))
        for name in ("models", "adapters"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                print("no module", name)
            else:
                print("IMPORTABLE", name)
    """
    run = _python(code, cwd=work, PYTHONPATH=str(site))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    found = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines}
    assert json.loads(found["eager"]) == []  # optional backends load on first use, not on import
    assert "slot-shapes-32" in json.loads(found["models"])
    assert {"entropy", "slot_tta", "slot_tta_fast"} <= set(json.loads(found["recipes"]))
    assert "predict (8, 96, 96) (96, 96) 1.0" in lines
    assert "no module models" in lines and "no module adapters" in lines


def test_public_api_is_small_and_importable():
    names = tta_runtime.__all__
    assert len(names) <= 15
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(tta_runtime, name) is not None, name
    assert isinstance(tta_runtime.__version__, str)


def test_py_typed_marker_is_in_the_package():
    assert (pathlib.Path(tta_runtime.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("folder", ["models", "adapters"])
def test_model_and_recipe_folders_are_not_packages(folder: str):
    assert (ROOT / folder).is_dir()
    assert not list((ROOT / folder).rglob("__init__.py"))
    assert not list((ROOT / folder).rglob("*.py"))
