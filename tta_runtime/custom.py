"""Your own classifier in the runtime: the parts `Runtime.from_module`, `from_architecture` and a
"python:package.module:function" folder are built from (model, card, options, recipe).

    from_module(net)          -> a copy of net, BatchNorm2d swapped for AdaptiveBatchNorm2d, wrapped
                                 (`WrappedClassifier`: preprocessing's mean/std/channel order, OOD features)
                              -> probed once (logits (B, C), feature width) -> a card, architecture "module"
    from_architecture(...)    -> torchvision / timm by name, local weights, the same wrapper
    from_pretrained(folder)   -> card "python:pkg.mod:function": refused unless trust_code=True (reading the
                                 card runs nothing); then pkg.mod is imported, function() builds the network
                                 and the folder's weights (sha256-checked safetensors) are loaded into it

Calibration (`tta_runtime.calibration_run`) and saving (`tta_runtime.save`) are separate modules.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta_runtime.config import (
    AdaptConfig,
    ModelCard,
    ModuleConfig,
    Preprocessing,
    WeightsSpec,
    builder_of,
    validate,
)
from tta_runtime.options import RuntimeOptions, split_overrides
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.hub import load_recipe
from tta_runtime.models.wrapped import WrappedClassifier, convert_batchnorm, import_builder

__all__ = ["architecture_parts", "check_trust", "folder_model", "folder_recipe", "module_parts", "python_model", "weights_bytes"]

Parts = tuple[nn.Module, ModelCard, RuntimeOptions, AdaptConfig]
RECIPE_FILE = "recipe.toml"


def preprocessing_of(preprocessing: Preprocessing | dict[str, Any] | None, input_size: int) -> Preprocessing:
    """A validated `Preprocessing` of size `input_size` (a dict may leave `size` out)."""
    if isinstance(preprocessing, Preprocessing):
        data = preprocessing.model_dump()
    elif preprocessing is None or isinstance(preprocessing, dict):
        data = dict(preprocessing or {})
    else:
        raise ConfigError(f"preprocessing must be a Preprocessing, a dict of its fields or None, got {type(preprocessing).__name__}")
    data.setdefault("size", input_size)
    if data["size"] != input_size:
        raise ConfigError(f"preprocessing size {data['size']!r} disagrees with input_size={input_size!r}; give one of them")
    return validate(Preprocessing, data, "preprocessing")


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of a network state dict (one metadata key: the same bytes, so the same sha256, every time)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def _recipe(recipe: str, overrides: dict[str, Any], what: str) -> tuple[RuntimeOptions, AdaptConfig]:
    runtime_kw, recipe_kw = split_overrides({"recipe": recipe, **overrides})
    options = validate(RuntimeOptions, {"load_calibration": False, **runtime_kw}, "runtime options")
    cfg = load_recipe(options.recipe, **recipe_kw)
    refuse_rotation(cfg, what)
    return options, cfg


def refuse_rotation(cfg: AdaptConfig, what: str) -> None:
    """Rotation TTT needs a rotation head trained with the classifier; a user's network has none."""
    if cfg.method == "rotation":
        raise ConfigError(
            f"recipe {cfg.name!r} uses rotation TTT, which needs a 4-way rotation head trained jointly with the classifier "
            f"(the shipped digits models have one); {what} has none. Use tent, eata, sar, memo or bn_stats"
        )


def module_parts(
    module: nn.Module, *, task: str, input_size: int, labels: list[str] | None, preprocessing: Any, recipe: str,
    features: str | None, name: str, overrides: dict[str, Any],
) -> Parts:
    """`Runtime.from_module`'s model, card, options and recipe (see its docstring)."""
    if task != "classification":
        raise ConfigError(f"from_module takes classifiers (task='classification'), got task={task!r}; slot segmenters load "
                          "from model folders (Runtime.from_pretrained)")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ConfigError(f"input_size must be an int (the square side the network takes), got {input_size!r}")
    pre = preprocessing_of(preprocessing, input_size)
    try:
        net = copy.deepcopy(module).cpu()  # the runtime owns its copy: swapping norm layers must not change the caller's
    except Exception as e:  # noqa: BLE001 - a module that cannot be copied (open handles, ...)
        raise ConfigError(f"from_module copies the module, and {type(module).__name__} cannot be deep-copied: {e}") from None
    convert_batchnorm(net)
    what = f"module {type(module).__name__}"
    model = WrappedClassifier(net, pre, features=features, what=what)
    num_classes, feature_dim = model.probe(input_size)
    options, cfg = _recipe(recipe, overrides, what)
    sha = hashlib.sha256(weights_bytes(model.weights())).hexdigest()
    card = validate(ModelCard, {
        "name": name, "task": "classification", "architecture": "module", "labels": list(labels or []),
        "module": ModuleConfig(num_classes=num_classes, features=features, feature_dim=feature_dim),
        "description": f"{type(module).__module__}.{type(module).__qualname__} given to Runtime.from_module",
        "preprocessing": pre, "weights": WeightsSpec(file="weights.safetensors", sha256=sha), "default_recipe": cfg.name,
    }, "model card")
    return model, card, options, cfg


def architecture_parts(
    source: str, name: str, *, weights: str | os.PathLike[str], num_classes: int, input_size: int,
    labels: list[str] | None, recipe: str, preprocessing: Any, overrides: dict[str, Any],
) -> Parts:
    """`Runtime.from_architecture`'s model, card, options and recipe (see its docstring)."""
    from tta_runtime.config import ExternalConfig
    from tta_runtime.hub import sha256_file
    from tta_runtime.models.encoders import build_external, load_into, load_state_dict_file

    pre = preprocessing_of(preprocessing, input_size)
    ext_data: dict[str, Any] = {"source": source, "name": name, "num_classes": num_classes, "resolution": input_size}
    if pre.mean is not None:
        ext_data.update(mean=pre.mean, std=pre.std)
    else:  # the wrapper normalises with ImageNet's statistics unless told otherwise: say so on the card
        pre = validate(Preprocessing, {**pre.model_dump(), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}, "preprocessing")
    ext = validate(ExternalConfig, ext_data, "architecture")
    model = build_external(ext, pre)  # first: a missing extra is the first thing to say
    path = Path(weights)
    state = load_state_dict_file(path)
    card = validate(ModelCard, {
        "name": re.sub(r"[^a-z0-9_.-]", "-", f"{source}-{name}".lower()), "task": "classification",
        "architecture": source, "external": ext, "labels": labels or [], "preprocessing": pre,
        "weights": WeightsSpec(file=path.name, sha256=sha256_file(path)), "default_recipe": recipe,
    }, "model card")
    options, cfg = _recipe(recipe, overrides, f"{source} model {name!r}")
    load_into(model, state, str(path))
    return model, card, options, cfg


def check_trust(card: ModelCard, folder: Path, trust_code: bool) -> None:
    """`ModelLoadError` for a folder whose card needs code to be run that the caller did not allow (nothing is
    imported or run here: the card is data)."""
    if card.architecture == "module":
        raise ModelLoadError(f"the card in {folder} describes an in-memory module (architecture 'module') and names no "
                             "builder; save it with rt.save(folder, builder='package.module:function')")
    builder = builder_of(card.architecture)
    if builder is not None and not trust_code:
        raise ModelLoadError(
            f"the model in {folder} is built by Python code ({card.architecture!r}): loading it imports "
            f"{builder.split(':')[0]!r} and runs {builder.split(':')[1]}(). Nothing was imported or run. If you trust that "
            "code, pass trust_code=True (Runtime.from_pretrained(folder, trust_code=True); CLI: `tta-runtime calibrate`, "
            "`export` and `serve` take --trust-code)"
        )


def python_model(card: ModelCard, folder: Path) -> WrappedClassifier:
    """The network of a "python:pkg.mod:function" card, built by that function (call `check_trust` first)."""
    spec = builder_of(card.architecture)
    assert spec is not None and card.module is not None  # the card validated its architecture and section
    try:
        net = import_builder(spec)()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's builder raises
        raise ModelLoadError(f"the builder {spec}() of the model in {folder} raised {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"the builder {spec}() returned {type(net).__name__}, not a torch.nn.Module")
    convert_batchnorm(net)
    model = WrappedClassifier(net, card.preprocessing, features=card.module.features, what=f"{spec}()")
    model.num_classes = card.module.num_classes
    return model


def folder_model(folder: Path, card: ModelCard, prune: str | None) -> nn.Module:
    """The card's architecture with the folder's weights (sha256 and finiteness checked before anything is built);
    a pruned variant's with `prune`. Call `check_trust` first."""
    from tta_runtime.hub import load_weights
    from tta_runtime.models.build import build_model
    from tta_runtime.models.wrapped import load_into
    from tta_runtime.prune import load_pruned

    if prune is not None:
        model, state = load_pruned(folder, card, prune)
    else:
        state = load_weights(folder, card)
        model = build_model(card) if card.module is None else python_model(card, folder)
    if isinstance(model, WrappedClassifier):
        load_into(model, state, str(folder))
        return model
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights in {folder} do not fit the card's architecture: {e}") from None
    return model


def folder_recipe(folder: Path) -> str | None:
    """The recipe a saved folder carries (`recipe.toml`, data only), if any."""
    path = folder / RECIPE_FILE
    return str(path) if path.is_file() else None
