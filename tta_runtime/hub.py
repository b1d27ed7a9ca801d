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
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import torch

from tta_runtime.config import AdaptConfig, ModelCard, WeightsSpec, validate
from tta_runtime.errors import ConfigError, ModelLoadError, UnknownNameError
from tta_runtime.registry import unknown_name_message

DEFAULT_MODEL = "slot-shapes-32"
CARD_FILE = "card.json"
_PKG = Path(__file__).resolve().parent


def _roots(kind: str, env: str) -> list[Path]:
    roots = [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p and Path(p).is_dir()]
    for candidate in (_PKG / "_shipped" / kind, _PKG.parent / kind):  # installed wheel, source checkout
        if candidate.is_dir():
            roots.append(candidate)
            break
    return roots


def sample_image_path() -> Path:
    """The bundled out-of-distribution sample image (96x96 PNG, textured background; see assets/README.md)."""
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


def find_model(name_or_path: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a model given by repository name, folder path, or path to its card or weights."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CARD_FILE).is_file():
            raise ModelLoadError(f"{path} is a folder but holds no {CARD_FILE}; a model folder needs a card and weights")
        return path
    if path.is_file():  # card.json or the weights file beside it
        if not (path.parent / CARD_FILE).is_file():
            raise ModelLoadError(f"{path} has no {CARD_FILE} beside it; a model needs its card")
        return path.parent
    name = str(name_or_path)
    for root in model_roots():
        if (root / name / CARD_FILE).is_file():
            return root / name
    if os.sep in name or name.endswith((".json", ".safetensors", ".pt")):
        raise ModelLoadError(f"no such model file or folder: {name}")
    raise UnknownNameError(unknown_name_message("model", name, list_models()))


def load_card(folder: Path) -> ModelCard:
    """Parse and validate `folder/card.json`."""
    path = folder / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read model card {path}: {e}") from None
    try:
        return validate(ModelCard, data, f"model card {path}")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


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
    """The state dict named by the card, after checking its sha256. Never unpickles arbitrary objects."""
    spec = spec or card.weights
    path = folder / spec.file
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} named by the card is missing")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelLoadError(
            f"weights file {path} does not match its card (sha256 {digest[:12]}..., card says "
            f"{spec.sha256[:12]}...): the file is corrupt, truncated or was changed; restore it or "
            f"update the card's sha256 if you replaced it on purpose"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise many kinds; all mean "not a valid weights file"
        raise ModelLoadError(f"cannot load weights {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a flat state dict of tensors")
    return state


def find_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"no such recipe file: {path}")
        return path
    for root in adapter_roots():
        if (root / f"{name_or_path}.toml").is_file():
            return root / f"{name_or_path}.toml"
    raise UnknownNameError(unknown_name_message("recipe", str(name_or_path), list_recipes()))


def load_recipe(name_or_path: str | os.PathLike[str], **overrides: Any) -> AdaptConfig:
    """A validated recipe from `adapters/<name>.toml` (or a .toml path), with field overrides."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    data.setdefault("name", path.stem)
    data.update(overrides)
    return validate(AdaptConfig, data, f"recipe {path.name}")
