"""Build a model's architecture from its card (weights are loaded afterwards by the caller)."""

from __future__ import annotations

import torch

from tta_runtime.config import ModelCard
from tta_runtime.models.segmenter import SlotSegmenter


def build_model(card: ModelCard) -> torch.nn.Module:
    """The card's architecture with freshly initialised weights (load the state dict after)."""
    if card.external is not None:
        from tta_runtime.models.encoders import build_external

        return build_external(card.external)
    if card.task == "classification":
        from tta_runtime.models.classifier import build_classifier

        return build_classifier(card.classifier)
    return SlotSegmenter(card.segmenter)  # type: ignore[arg-type]
