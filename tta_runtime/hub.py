"""The model repository (`models/`) and the recipe folder (`adapters/`), found by name.

Search order for a name: the folders in `$TTA_RUNTIME_MODELS` (or `$TTA_RUNTIME_ADAPTERS`), separated
by the OS path separator, then the shipped folder. The shipped folders sit at the top of a source
checkout; an installed wheel carries them as `tta_runtime/_shipped/models` and `.../adapters`, so that
neither ever becomes a top-level importable package.

Weights are checked against the card's sha256 before anything parses them, and are loaded with
safetensors (or `torch.load(weights_only=True)`), so a tampered file is refused and cannot run code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from tta_runtime.config import AdaptConfig, ModelCard, WeightsSpec, validate
from tta_runtime.errors import ConfigError, ModelLoadError, UnknownNameError
from tta_runtime.files import (
    MAX_WEIGHTS_BYTES,
    inside,
    is_plain_name,
    path_arg,
    plain_name,
    read_json,
    read_toml,
    regular_file,
)
from tta_runtime.registry import unknown_name_message

DEFAULT_MODEL = "slot-flat-64"
CARD_FILE = "card.json"
_PKG = Path(__file__).resolve().parent


def _roots(kind: str, env: str) -> list[Path]:
    roots = [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p and Path(p).is_dir()]
    for candidate in (_PKG / "_shipped" / kind, _PKG.parent / kind):  # installed wheel, source checkout
        if candidate.is_dir():
            roots.append(candidate)
            break
    return roots


def sample_image_path(model: str | os.PathLike[str] | None = None) -> Path:
    """An out-of-distribution sample image: without `model`, the package's bundled one (96x96 PNG, a shapes-world
    scene on a textured background; see assets/README.md); with a model (name or folder), the demo sample its card
    names (`scope.demo_sample`, a scene of its own world), else the bundled one."""
    if model is not None:
        folder = find_model(model)
        scope = load_card(folder).scope
        if scope is not None and scope.demo_sample is not None and _is_file(folder / scope.demo_sample):
            return folder / scope.demo_sample
    return _PKG / "assets" / "ood_sample.png"


def model_roots() -> list[Path]:
    return _roots("models", "TTA_RUNTIME_MODELS")


def adapter_roots() -> list[Path]:
    return _roots("adapters", "TTA_RUNTIME_ADAPTERS")


def list_models() -> list[str]:
    """Names of the models in the repository (folders holding a `card.json`)."""
    names = {d.name for root in model_roots() for d in root.iterdir() if (d / CARD_FILE).is_file()}
    return sorted(names)


def list_recipes() -> list[str]:
    """Names of the adaptation recipes (`<name>.toml` in the adapters folders)."""
    return sorted({f.stem for root in adapter_roots() for f in root.glob("*.toml")})


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the file system, a permission: not a folder we can use
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def find_model(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a model given by repository name, folder path, or path to its card or weights.

    A repository name must be a plain name ([a-z0-9][a-z0-9_.-]*): it is looked up in each model root,
    never resolved as a path relative to one."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = path_arg(name_or_path, "model (a repository name or a model folder path)", ConfigError).expanduser()
    if _is_dir(path):
        if not _is_file(path / CARD_FILE):
            raise ModelLoadError(f"{path} is a folder but holds no {CARD_FILE}; a model folder needs a card and weights")
        return path
    if _is_file(path):  # card.json or the weights file beside it
        if not _is_file(path.parent / CARD_FILE):
            raise ModelLoadError(f"{path} has no {CARD_FILE} beside it; a model needs its card")
        return path.parent
    name = os.fspath(name_or_path)
    if is_plain_name(name):
        for root in model_roots():
            if _is_file(root / name / CARD_FILE):
                return root / name
    if not is_plain_name(name) or name.endswith((".json", ".safetensors", ".pt")):
        raise ModelLoadError(f"no such model file or folder: {path}; a repository name is a plain name such as {DEFAULT_MODEL!r}")
    raise UnknownNameError(unknown_name_message("model", name, list_models()))


def load_card(folder: Path) -> ModelCard:
    """Parse and validate `folder/card.json`; every file it names must lie inside `folder` and its
    default recipe must be a plain recipe name (ModelLoadError otherwise)."""
    path = Path(folder) / CARD_FILE
    data = read_json(path, "model card", error=ModelLoadError)
    if isinstance(data, dict) and data.get("task") == "encoder":
        raise ModelLoadError(
            f"{Path(folder)} is a pretrained encoder (task 'encoder'), not a model that predicts: initialise a segmenter "
            f"with it (tta-runtime train segmenter --encoder unet --init-encoder {Path(folder)}); "
            "tta_runtime.models.encoder_folder.load_encoder reads it"
        )
    try:
        card: ModelCard = validate(ModelCard, data, f"model card {path}")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    for key in ("weights", "optimizer_state", "fisher"):
        spec = getattr(card, key)
        if spec is not None:
            inside(folder, spec.file, f"{key}.file of model card {path}", ModelLoadError)
    recipe = plain_name(card.default_recipe, f"default_recipe of model card {path}", ModelLoadError)
    if recipe.endswith(".toml"):  # a plain name, but load_recipe would read it as a path
        raise ModelLoadError(f"default_recipe of model card {path} must be a recipe name without .toml, got {recipe!r}")
    return card


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_optimizer_state(folder: Path, card: ModelCard) -> dict[str, torch.Tensor] | None:
    """Adam moments saved at the end of training ('exp_avg/<param>', 'exp_avg_sq/<param>', 'step'), if shipped."""
    if card.optimizer_state is None:
        return None
    return load_weights(folder, card, card.optimizer_state)


def load_weights(folder: Path, card: ModelCard, spec: WeightsSpec | None = None) -> dict[str, torch.Tensor]:
    """The state dict named by the card, after checking its sha256. Never unpickles arbitrary objects.

    The file must lie inside `folder` (checked before it is opened) and be a regular file of at most
    `MAX_WEIGHTS_BYTES`; every floating tensor must be finite (NaN/Inf weights are refused)."""
    spec = spec or card.weights
    path = inside(folder, spec.file, "weights file named by the card", ModelLoadError)
    if not _is_file(path) and not path.exists():
        raise ModelLoadError(f"weights file {path} named by the card is missing")
    size = regular_file(path, "weights file", ModelLoadError).st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ModelLoadError(f"weights file {path} is {size:,} bytes; the limit is {MAX_WEIGHTS_BYTES:,}")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if digest != spec.sha256:
        raise ModelLoadError(
            f"weights file {path} does not match its card (sha256 {digest[:12]}..., card says "
            f"{spec.sha256[:12]}...): the file is corrupt, truncated or was changed; restore it or "
            f"update the card's sha256 if you replaced it on purpose"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise many kinds; all mean "not a valid weights file"
        raise ModelLoadError(f"cannot load weights {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelLoadError(f"{path} does not hold a flat state dict of tensors")
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelLoadError(
            f"weights file {path} holds NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[:3]}: the model "
            f"would output garbage; restore the file from its source"
        )
    return state


def find_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """The file of a recipe given by name (a plain name, looked up in the adapters folders) or by the path
    of a `.toml` file (the caller's own file)."""
    path = path_arg(name_or_path, "recipe (a recipe name or a .toml path)", ConfigError).expanduser()
    if path.suffix == ".toml":
        if not _is_file(path) and not path.exists():
            raise ConfigError(f"no such recipe file: {path}")
        regular_file(path, "recipe file", ConfigError)
        return path
    name = plain_name(os.fspath(name_or_path), "recipe name (or a path ending in .toml)", ConfigError)
    for root in adapter_roots():
        if _is_file(root / f"{name}.toml"):
            return root / f"{name}.toml"
    raise UnknownNameError(unknown_name_message("recipe", name, list_recipes()))


def load_recipe(name_or_path: str | os.PathLike[str], **overrides: Any) -> AdaptConfig:
    """A validated recipe from `adapters/<name>.toml` (or a .toml path), with field overrides."""
    path = find_recipe(name_or_path)
    data = read_toml(path, "recipe", error=ConfigError)
    data.setdefault("name", path.stem)
    data.update(overrides)
    return validate(AdaptConfig, data, f"recipe {path.name}")


def refuse_non_finite(tensors: dict[str, torch.Tensor], where: object) -> None:
    """`ModelLoadError` when a loaded float tensor (weights, buffers, optimizer moments, Fisher) holds NaN or
    Inf: such a model answers every input with NaN masks or probabilities, whatever its card's sha256 says."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelLoadError(f"the model in {where} has NaN or Inf values in {len(bad)} tensor(s), e.g. {bad[:3]}: the "
                             "weights are corrupt or diverged; re-download the model, or re-export it from a finite checkpoint")
