"""A pretrained encoder as its own model folder: `card.json` (`EncoderCard`) + `weights.safetensors`.

The encoder is the U-Net body (`tta_runtime.models.unet_body`) that the slot segmenter's "unet" encoder and
the feed-forward U-Net share, pretrained without labels (`tta-runtime train encoder`: masked image
modelling). A segmenter's training names it (`train segmenter --init-encoder NAME_OR_FOLDER`): every weight
of the body but its 1x1 output head (whose width is the pretext task's) initialises the segmenter's body,
and the segmenter's card records the encoder's name and sha256. Loading an encoder folder runs no code from
it: the card is JSON, the weights safetensors, checked against the card's sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.models.unet import UNetShape, WeightsCard, load_checked_weights
from tta_runtime.models.unet_body import UNetBody

__all__ = ["HEAD_PREFIX", "EncoderArch", "EncoderCard", "body_init", "load_encoder"]

HEAD_PREFIX = "head."
"""The body's 1x1 output conv: the pretext task's, never transferred."""


class EncoderArch(UNetShape):
    """The pretrained U-Net body's shape (its output head is the pretext task's: 3 channels, the pixels)."""

    resolution: int = Field(64, ge=8, le=512, description="square input size it was pretrained at")
    base_channels: int = Field(16, ge=4, le=512, description="channels at full resolution; doubled per level")


class EncoderCard(WeightsCard):
    """`card.json` of a pretrained-encoder folder."""

    task: Literal["encoder"] = "encoder"
    architecture: Literal["unet_body"] = "unet_body"
    model: EncoderArch
    training: dict[str, Any] = Field(default_factory=dict, description="command, config, data, seconds, hardware")


def load_encoder(folder: str | Path) -> tuple[EncoderCard, UNetBody]:
    """The card and the pretrained body (with its pretext head), in eval mode on the CPU.

    `folder`: an encoder folder, or the name of one in a model repository (`TTA_RUNTIME_MODELS`, models/).
    `ModelLoadError` when it is not an encoder folder or its weights do not fit its card."""
    from tta_runtime.hub import find_model

    path = find_model(str(folder))  # a folder, or a name in a model repository
    card, state = load_checked_weights(path, EncoderCard, "encoder card")
    body = UNetBody(card.model.resolution, 3, card.model.base_channels, card.model.depth)
    try:
        body.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as e:
        raise ModelLoadError(f"the weights in {path} do not fit the encoder card's architecture {card.model}: {e}") from None
    return card, body.eval()


def body_init(target: UNetBody, folder: str | Path) -> dict[str, str]:
    """Copy a pretrained encoder's body (all but the head) into `target`; returns {"name", "sha256"} for the card.

    `ConfigError` when the shapes differ (base channels, depth): the message names both."""
    card, body = load_encoder(folder)
    n_levels = len(target.down)
    base = target.down[0][0].out_channels
    if (base, n_levels) != (card.model.base_channels, card.model.depth):
        raise ConfigError(
            f"encoder {card.name!r} is a U-Net body with base {card.model.base_channels} channels and depth "
            f"{card.model.depth}; this model's has base {base} and depth {n_levels}: pretrain one of that shape "
            f"(tta-runtime train encoder --base-channels {base} --depth {n_levels}) or match --encoder-channels"
        )
    state = {k: v for k, v in body.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(HEAD_PREFIX) for k in missing):
        raise ConfigError(f"encoder {card.name!r} does not fit: missing {missing}, unexpected {unexpected}")
    return {"name": card.name, "sha256": card.weights.sha256}
