"""Build a model's architecture from its card (weights are loaded afterwards by the caller).

The card's sizes are bounded by its validated config (config.py: ranges per field, a parameter cap for
classifiers), and callers check the weights' sha256 (`hub.load_weights`) before building; an
architecture that still cannot be built is a `ModelLoadError` naming the card.
"""

from __future__ import annotations

import torch

from tta_runtime.config import ModelCard
from tta_runtime.errors import ModelLoadError, TTARuntimeError
from tta_runtime.models.segmenter import SlotSegmenter


def build_model(card: ModelCard) -> torch.nn.Module:
    """The card's architecture with freshly initialised weights (load the state dict after)."""
    if card.external is not None:
        from tta_runtime.models.encoders import build_external

        return build_external(card.external, card.preprocessing)
    try:
        if card.task == "classification":
            from tta_runtime.models.classifier import build_classifier

            return build_classifier(card.classifier)
        return SlotSegmenter(card.segmenter)  # type: ignore[arg-type]
    except TTARuntimeError:
        raise
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise ModelLoadError(f"model card {card.name!r} describes an architecture that cannot be built: {type(e).__name__}: {e}") from None
