"""Pruned variants in a model folder: ``<model>/prune/<name>/`` holds ``prune.json`` (a ``PruneCard``) and
``weights.safetensors`` (the base model's keys + ``predictors.*``). The base model's card and weights stay
untouched; ``build_pruned`` makes the module a variant's card describes (classifier or slot segmenter).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from tta_runtime.config import ModelCard, PruneCard, WeightsSpec, validate
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.files import atomic_write, is_plain_name, plain_name, read_json
from tta_runtime.hub import load_card, load_weights, sha256_file
from tta_runtime.prune.fixed import PrunedClassifier
from tta_runtime.prune.segmenter import PrunedSegmenter

__all__ = ["PRUNE_CARD", "PRUNE_DIR", "build_pruned", "load_prune_card", "load_pruned", "pruned_variants", "save_pruned"]

PRUNE_DIR = "prune"  # <model folder>/prune/<variant>/
PRUNE_CARD = "prune.json"


def save_pruned(
    model: nn.Module, base_folder: Path, name: str, *, part: str, r: float, masks: str = "predict",
    ks: Sequence[int] | None = None, training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict (base keys + ``predictors.*``) and its ``PruneCard`` to
    ``base_folder/prune/name/``; returns that folder. The base model's card and weights stay untouched."""
    plain_name(name, "pruned variant name", ConfigError)
    base = load_card(base_folder)
    out = base_folder / PRUNE_DIR / name
    wpath = out / "weights.safetensors"
    atomic_write(wpath, safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}), "pruned weights")
    card = PruneCard(
        name=name, base_model=base.name, base_sha256=base.weights.sha256, part=part, r=r, masks=masks,  # type: ignore[arg-type]
        ks=None if ks is None else [int(k) for k in ks], weights=WeightsSpec(file=wpath.name, sha256=sha256_file(wpath)),
        training=training or {}, metrics=metrics or {},
    )
    atomic_write(out / PRUNE_CARD, (card.model_dump_json(indent=2) + "\n").encode(), "prune card")
    return out


def pruned_variants(folder: Path) -> list[str]:
    """Names of the pruned variants in a model folder (sorted)."""
    root = folder / PRUNE_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_plain_name(p.name) and (p / PRUNE_CARD).is_file())


def load_prune_card(folder: Path, name: str) -> PruneCard:
    """The ``PruneCard`` of variant ``name`` in model folder ``folder``; a clear error lists what exists.
    ``name`` must be a plain name (``ConfigError`` otherwise): it is looked up in ``folder/prune/`` only."""
    plain_name(name, "pruned variant (prune=)", ConfigError)
    path = folder / PRUNE_DIR / name / PRUNE_CARD
    if not path.exists():
        have = pruned_variants(folder)
        hint = (f"this model has: {', '.join(have)}" if have else
                "this model has none; make one with `tta-runtime train ftwt --model <name> --r 0.6`")
        raise ModelLoadError(f"no pruned variant {name!r} in {folder / PRUNE_DIR} ({hint})")
    data = read_json(path, "prune card", error=ModelLoadError)
    try:
        return validate(PruneCard, data, f"prune card {path}")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


def build_pruned(card: ModelCard, prune: PruneCard) -> nn.Module:
    """The pruned module for a base ``ModelCard`` and a ``PruneCard`` (weights not loaded)."""
    if prune.part == "classifier":
        if card.classifier is None:
            raise ConfigError(f"prune variant {prune.name!r} is for a CNN classifier; {card.name!r} is a {card.architecture}")
        return PrunedClassifier(card.classifier, masks=prune.masks, ks=prune.ks)
    if card.segmenter is None:
        raise ConfigError(f"prune variant {prune.name!r} is for a slot segmenter; {card.name!r} is a {card.architecture}")
    return PrunedSegmenter(card.segmenter, masks=prune.masks, ks=prune.ks)


def load_pruned(folder: Path, card: ModelCard, name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The pruned variant `name` of the model in `folder`: its module and checked state dict."""
    prune = load_prune_card(folder, name)
    if prune.base_sha256 != card.weights.sha256:
        raise ModelLoadError(
            f"pruned variant {name!r} was made from other weights of {card.name!r} (sha256 {prune.base_sha256[:12]}..., "
            f"the card has {card.weights.sha256[:12]}...); retrain it with `tta-runtime train ftwt`"
        )
    model = build_pruned(card, prune)
    state = load_weights(folder / PRUNE_DIR / name, card, prune.weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights of pruned variant {name!r} do not fit {card.name!r}: {e}") from None
    return model, state
