"""The U-Net baseline segmenter: a small U-Net that predicts K mask channels, no slot bottleneck.

Why it exists: critics of reconstruction-based TTA say its gains come from weak feed-forward models
(Diffusion-TTA makes the same point). It is trained on exactly the slot model's data and mask supervision
(`tta_runtime.training.feedforward`), so "before adaptation" numbers of the slot model can be put next to a
strong feed-forward segmenter on the same splits.

image (B, 3, S, S) in [0, 1]
  -> concatenate a 2-channel coordinate grid (x, y in [0, 1]; CoordConv, so that the network can
     order its output channels by position: a fully convolutional net is otherwise translation
     equivariant and cannot tell two identical objects which channel each one gets)
  -> U-Net: `depth` levels of (conv3x3 + GroupNorm + ReLU) x 2, max-pool down, transposed conv up,
     skip concatenation; channels base, 2 base, 4 base, ...
  -> 1x1 conv -> logits (B, K, S, S); masks = softmax over K

GroupNorm normalises each image on its own, so a prediction does not depend on the rest of the batch
(batch-1 inference gives the same numbers as batch-N inference).

A model folder holds `card.json` (`FeedForwardCard`) and `weights.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file

from tta_runtime.config import WeightsSpec, _Frozen, format_validation_error
from tta_runtime.errors import InvalidInputError, ModelLoadError
from tta_runtime.hub import sha256_file
from tta_runtime.models.segmenter import images_to_tensor as to_tensor
from tta_runtime.models.unet_body import UNetBody

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "FeedForwardCard",
    "FeedForwardConfig",
    "FeedForwardProvenance",
    "UNetSegmenter",
    "UNetShape",
    "WeightsCard",
    "load_checked_weights",
    "load_feedforward",
    "predict_segmentation",
]

T = TypeVar("T", bound="WeightsCard")

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"


class UNetShape(_Frozen):
    """A U-Net body's shape: input size, width, levels (the baseline's and a pretrained encoder's)."""

    resolution: int = Field(32, ge=8, le=512, description="square input size in pixels")
    base_channels: int = Field(32, ge=4, le=512, description="channels at full resolution; doubled per level")
    depth: int = Field(2, ge=1, le=6, description="number of down/up levels")

    @model_validator(mode="after")
    def _divisible(self) -> UNetShape:
        if self.resolution % (2**self.depth):
            raise ValueError(
                f"resolution ({self.resolution}) must be divisible by 2**depth ({2**self.depth}) so that "
                "every pooled map upsamples back to its skip connection's size"
            )
        return self


class FeedForwardConfig(UNetShape):
    """Architecture of the U-Net baseline."""

    num_slots: int = Field(8, ge=2, le=64, description="K mask channels (same K as the slot model)")


class WeightsCard(_Frozen):
    """What every card of a weights-only folder holds: a name, a description, the weights file (a plain name
    inside the folder) with its sha256, and measured metrics."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    weights: WeightsSpec
    metrics: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _plain_file(self) -> WeightsCard:
        if Path(self.weights.file).name != self.weights.file or self.weights.file in ("", ".", ".."):
            raise ValueError(f"weights.file must be a file name inside the folder, got {self.weights.file!r}")
        return self


class FeedForwardProvenance(_Frozen):
    """How the shipped weights were made."""

    command: str
    train_config: dict[str, Any] = Field(description="the trainer's FeedForwardTrainConfig, as JSON")
    steps_done: int = Field(ge=0)
    seed: int
    data: str
    validation: str
    seconds: float | None = Field(None, ge=0, description="training wall time (None: not recorded)")
    hardware: str


class FeedForwardCard(WeightsCard):
    """`card.json` of a feed-forward baseline folder."""

    task: Literal["segmentation"] = "segmentation"
    architecture: Literal["unet_feedforward"] = "unet_feedforward"
    model: FeedForwardConfig
    training: FeedForwardProvenance

    @model_validator(mode="after")
    def _same_model(self) -> FeedForwardCard:
        if self.training.train_config.get("model") != self.model.model_dump(mode="json"):
            raise ValueError("training.train_config.model differs from model")
        return self


# --------------------------------------------------------------------------------------------------
# Model


class UNetSegmenter(UNetBody):
    """U-Net with CoordConv input. `forward(image)`: (B, 3, S, S) float in [0, 1] -> logits (B, K, S, S).

    `masks(image)` is the softmax over K, (B, K, S, S) float in [0, 1] summing to 1 over K.
    Grad policy belongs to the caller: nothing here enables or disables gradients.
    """

    def __init__(self, cfg: FeedForwardConfig) -> None:
        super().__init__(cfg.resolution, cfg.num_slots, cfg.base_channels, cfg.depth)
        self.cfg = cfg

    def masks(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward(image).softmax(dim=1)


# --------------------------------------------------------------------------------------------------
# Inference and loading


def predict_segmentation(model: UNetSegmenter, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Argmax segmentation of uint8 images (N, S, S, 3) -> (N, S, S) int64 channel ids in [0, K).

    Runs under `torch.inference_mode()` in batches of `batch`; the model's own mode is left as it is
    (GroupNorm behaves the same in train and eval mode).
    """
    s = model.cfg.resolution
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
        got = f"{type(images).__name__} {getattr(images, 'shape', '')} {getattr(images, 'dtype', '')}"
        raise InvalidInputError(f"images must be a uint8 array of shape (N, {s}, {s}, 3); got {got.strip()}.")
    if batch < 1:
        raise InvalidInputError(f"batch must be >= 1; got {batch}.")
    device = next(model.parameters()).device
    out = np.empty(images.shape[:3], dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            logits = model(to_tensor(images[i : i + batch]).to(device))  # (b, K, S, S)
            out[i : i + batch] = logits.argmax(dim=1).cpu().numpy()
    return out


def load_checked_weights(folder: str | Path, card_type: type[T], what: str) -> tuple[T, dict[str, torch.Tensor]]:
    """The card (`card.json`, validated as `card_type`) and weights of a folder whose card names its weights file
    and their sha256. `ModelLoadError` when the card is missing or invalid, the weights are missing, or their
    sha256 differs from the card's. `what` names the folder's kind in errors ("feed-forward card")."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    try:
        card = card_type.model_validate_json(card_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"no {CARD_FILE} in {folder}") from None
    except ValidationError as e:
        raise ModelLoadError(format_validation_error(e, f"{what} {card_path}")) from None
    weights = folder / card.weights.file
    if not weights.is_file():
        raise ModelLoadError(f"weights file {weights} named by {card_path} does not exist")
    digest = sha256_file(weights)
    if digest != card.weights.sha256:
        raise ModelLoadError(
            f"sha256 of {weights} is {digest}, the card says {card.weights.sha256}: the weights were "
            "modified or belong to another card"
        )
    return card, load_file(str(weights))


def load_feedforward(folder: str | Path) -> UNetSegmenter:
    """Load a folder written by `save_feedforward`, in eval mode on CPU.

    Raises ModelLoadError when the card is missing or invalid, the weights are missing, their sha256
    differs from the card's, or they do not fit the card's architecture.
    """
    card, state = load_checked_weights(folder, FeedForwardCard, "feed-forward card")
    model = UNetSegmenter(card.model)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as e:
        raise ModelLoadError(f"the weights in {folder} do not fit the card's architecture {card.model}: {e}") from None
    return model.eval()
