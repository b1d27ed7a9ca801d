"""`Runtime.save`: a model folder that `Runtime.from_pretrained(folder, trust_code=True)` loads.

    <folder>/card.json            architecture "python:package.module:function", preprocessing, labels, sha256s
    <folder>/weights.safetensors  the network's own state dict (what function() returns loads it strictly)
    <folder>/fisher.safetensors   EATA's diagonal Fisher, when `calibrate` computed one
    <folder>/ood/                 every calibrated OOD scorer (`tta_runtime.ood.save_calibration`)
    <folder>/recipe.toml          the runtime's recipe, with its overrides (data: TOML, no code)

Before anything is written, the builder is imported and called (the caller's own code, in the caller's own
session), the weights are loaded into what it returns and one forward is compared with the runtime's model:
a folder that would not load, or would predict differently, is never written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tta_runtime.config import AdaptConfig, ModelCard, ModuleConfig, WeightsSpec, validate
from tta_runtime.custom import RECIPE_FILE, weights_bytes
from tta_runtime.errors import ConfigError
from tta_runtime.files import atomic_write, writable_path
from tta_runtime.hub import CARD_FILE
from tta_runtime.models.wrapped import WrappedClassifier, convert_batchnorm, import_builder, load_into
from tta_runtime.ood import CALIBRATION_DIR, Calibration, save_calibration

__all__ = ["recipe_toml", "save_folder", "write_calibration"]

WEIGHTS_FILE, FISHER_FILE = "weights.safetensors", "fisher.safetensors"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"recipe value {v!r} is not finite")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    raise ConfigError(f"cannot write recipe value {v!r} ({type(v).__name__}) to TOML")


def recipe_toml(cfg: AdaptConfig) -> str:
    """The recipe as TOML that `load_recipe` reads back to an equal `AdaptConfig` (None fields are left out:
    every one of them defaults to None)."""
    data = cfg.model_dump()
    table = data.pop("execution")
    lines = ["# written by Runtime.save: the runtime's recipe with its overrides"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None]
    if table is not None:
        lines += ["", "[execution]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _check_builder(builder: str, model: WrappedClassifier, card: ModelCard, state: dict[str, torch.Tensor]) -> None:
    """Build with `builder`, load `state`, compare one forward with `model`: `ConfigError` on any difference."""
    rebuilt = import_builder(builder)()
    if not isinstance(rebuilt, torch.nn.Module):
        raise ConfigError(f"builder {builder}() returned {type(rebuilt).__name__}, not a torch.nn.Module")
    convert_batchnorm(rebuilt)
    features = card.module.features if card.module is not None else None
    other = WrappedClassifier(rebuilt, card.preprocessing, features=features, what=f"{builder}()")
    try:
        load_into(other, state, "the runtime's model")
    except Exception as e:  # noqa: BLE001 - ModelLoadError naming the keys; say it is the builder's fault
        raise ConfigError(f"builder {builder}() does not build this model's network: {e}") from None
    x = torch.rand((2, 3, card.preprocessing.size, card.preprocessing.size), generator=torch.Generator().manual_seed(0))
    ref_device = next(model.parameters()).device
    other.to(ref_device).eval()
    with torch.no_grad():
        a, b = model(x.to(ref_device)), other(x.to(ref_device))
    if not torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5):
        raise ConfigError(f"builder {builder}() with this model's weights predicts differently (max logit difference "
                          f"{float((a.logits - b.logits).abs().max()):.3g}): it builds another network, or keeps state "
                          "outside its state_dict")


def save_folder(
    folder: Path, *, model: torch.nn.Module, card: ModelCard, recipe: AdaptConfig, calibrations: dict[str, Calibration],
    fisher: dict[str, torch.Tensor] | None, builder: str | None, name: str | None = None, overwrite: bool = False,
) -> Path:
    """Write the model folder (see the module docstring); returns `folder`."""
    if not isinstance(model, WrappedClassifier) or card.module is None:
        raise ConfigError(f"save() writes folders for models given to Runtime.from_module; this runtime holds a "
                          f"{card.architecture!r} model, which already lives in its own folder ({card.name})")
    if builder is None:
        raise ConfigError("save() needs builder='package.module:function': a function returning the network (the folder "
                          "holds its weights); loading the folder imports it (trust_code=True)")
    if str(builder).split(":")[0] == "__main__":
        raise ConfigError(f"builder {builder!r} lives in the running script (__main__), which another process cannot "
                          "import: move the function into an importable module, e.g. 'mypackage.models:build_net'")
    module_cfg = validate(ModuleConfig, {**card.module.model_dump(), "builder": builder}, "builder")
    folder = Path(folder)
    if (folder / CARD_FILE).exists() and not overwrite:
        raise ConfigError(f"{folder} already holds a model ({CARD_FILE}); pass overwrite=True to replace it")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder")
    state = model.weights()
    _check_builder(builder, model, card, state)
    data = weights_bytes(state)
    sha = hashlib.sha256(data).hexdigest()
    new = validate(ModelCard, {
        **card.model_dump(), "name": name or card.name, "architecture": f"python:{builder}", "module": module_cfg,
        "weights": WeightsSpec(file=WEIGHTS_FILE, sha256=sha), "fisher": None, "default_recipe": _plain_recipe(recipe),
        "training": {**card.training, "saved_by": "Runtime.save", "builder": builder},
    }, "model card")
    writable_path(folder / CARD_FILE, "model folder file")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.saving-"))
        staging.chmod(0o755)  # mkdtemp's 0700 would become the model folder's mode
    except OSError as e:
        raise ConfigError(f"cannot write the model folder {folder}: {e.strerror or e}") from None
    try:
        atomic_write(staging / WEIGHTS_FILE, data, "weights")
        if fisher is not None:
            fdata = weights_bytes(fisher)
            atomic_write(staging / FISHER_FILE, fdata, "Fisher information")
            new = new.model_copy(update={"fisher": WeightsSpec(file=FISHER_FILE, sha256=hashlib.sha256(fdata).hexdigest())})
        if calibrations:  # fitted for these very weights: say so, so load_calibration accepts them
            save_calibration(staging, {n: dataclasses.replace(c, weights_sha256=sha) for n, c in calibrations.items()})
        atomic_write(staging / RECIPE_FILE, recipe_toml(recipe).encode(), "recipe")
        atomic_write(staging / CARD_FILE, (json.dumps(new.model_dump(mode="json"), indent=2) + "\n").encode(), "model card")
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


_WRITTEN = {WEIGHTS_FILE, FISHER_FILE, CARD_FILE, RECIPE_FILE, CALIBRATION_DIR}


def _swap_in(staging: Path, folder: Path) -> None:
    """Make the complete `staging` folder `folder`: readers see the old folder or the new one, never a mix. What
    an existing folder holds beyond what `save` writes (a pruned variant, notes) moves into the new one."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    extras = [f for f in folder.iterdir() if f.name not in _WRITTEN and not f.name.startswith(".")]
    for f in extras:
        os.rename(f, staging / f.name)
    backup = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    try:
        os.rename(folder, backup / folder.name)
        try:
            os.rename(staging, folder)
        except OSError:
            os.rename(backup / folder.name, folder)
            raise
    except OSError as e:
        for f in extras:  # put them back: the old folder stays as it was
            os.rename(staging / f.name, folder / f.name)
        raise ConfigError(f"cannot replace the model folder {folder}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def _plain_recipe(recipe: AdaptConfig) -> str:
    """The card's default_recipe: a plain recipe name (the folder's recipe.toml holds the recipe itself)."""
    from tta_runtime.files import is_plain_name

    return recipe.name if is_plain_name(recipe.name) and not recipe.name.endswith(".toml") else "tent"


def write_calibration(folder: Path, card: ModelCard, calibrations: dict[str, Calibration],
                      fisher: dict[str, torch.Tensor] | None) -> list[Path]:
    """Calibrations fitted on the weights `card` names, into `folder/ood/` (replacing what was there); a Fisher too
    when the card names none (an existing one is kept: it may come from labelled data). Returns what was written."""
    folder = Path(folder)
    written = [save_calibration(folder, {n: dataclasses.replace(c, weights_sha256=card.weights.sha256) for n, c in calibrations.items()})]
    if fisher is not None and card.fisher is None:
        data = weights_bytes(fisher)
        atomic_write(folder / FISHER_FILE, data, "Fisher information")
        new = card.model_copy(update={"fisher": WeightsSpec(file=FISHER_FILE, sha256=hashlib.sha256(data).hexdigest())})
        atomic_write(folder / CARD_FILE, (json.dumps(new.model_dump(mode="json"), indent=2) + "\n").encode(), "model card")
        written += [folder / FISHER_FILE, folder / CARD_FILE]
    return written
