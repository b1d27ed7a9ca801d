"""What one forward pass hands the OOD scorers: `OODFeatures`, and the traceable code that computes them.

    image (B, 3, S, S) in [0, 1] -> model.encode -> (B, N, D) -> model.forward_features -> SegmenterOutput
      -> features_from_output -> OODFeatures(recon_mse (B,), mask_entropy (B,), embedding (B, D'), ...)

Classifiers fill `logits` and `embedding` (their pooled features) themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch

from tta_runtime.errors import ConfigError, InvalidInputError

if TYPE_CHECKING:
    from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter

Array = np.ndarray | torch.Tensor
Embedding = Literal["slots", "encoder", "encoder_meanstd"]

# Which per-image vector `OODFeatures.embedding` holds for the slot segmenter: "encoder" (the encoder
# features mean-pooled over positions), "slots" (the mean of the K slots, order-free) or "encoder_meanstd"
# (the spatial mean and standard deviation of the encoder features, concatenated: 2D). On an early,
# collapsed model "encoder" and "slots" tie; on a trained one "encoder" separates the shifts clearly better.
# A calibration records the embedding it was fitted with, so changing this default never mixes the two.
DEFAULT_EMBEDDING: Embedding = "encoder"
_LOG_FLOOR = 1e-12  # masks are softmax outputs; this only guards log(0) after underflow


def as_float64(x: Array) -> np.ndarray:
    """A float64 numpy copy of an array or tensor (detached from any graph)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(eq=False)
class OODFeatures:
    """Per-image inputs of the scorers, batched; all numpy or all torch (`numpy()` / `torch()` convert).

    - `recon_mse`: (B,) mean over pixels and channels of (reconstruction - image)^2, image in [0, 1]
    - `mask_entropy`: (B,) mean over pixels of the entropy (nats) of the slot masks over K, in [0, ln K]
    - `embedding`: (B, D) one feature vector per image (`DEFAULT_EMBEDDING` says which, for the segmenter)
    - `logits`: (B, C) class logits, classifiers only
    - `mask_disagreement`: (B,) mean over foreground pixels of KL(decoder masks || slot-attention maps) in
      nats; foreground = pixels whose most likely slot (decoder) is not the slot with the most mask mass;
      0 when there is none. Slot models whose output carries the attention maps (not the ONNX frozen path's)
    - `stem`: (B, 2C) the per-channel mean and standard deviation over positions of a classifier's first
      convolution's output (`tta_runtime.frozen.first_conv`): the input's low-level statistics, which noise,
      blur, weather and photos move long before the pooled features do. Classifiers with a convolution only

    A field a model does not produce is None; scorers that need it raise a `ConfigError`.
    """

    recon_mse: Array | None = None
    mask_entropy: Array | None = None
    embedding: Array | None = None
    logits: Array | None = None
    mask_disagreement: Array | None = None
    stem: Array | None = None

    _FIELDS: ClassVar[dict[str, int]] = {
        "recon_mse": 1, "mask_entropy": 1, "embedding": 2, "logits": 2, "mask_disagreement": 1, "stem": 2,
    }

    def __post_init__(self) -> None:
        sizes = set()
        for name, ndim in self._FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value.ndim != ndim:
                raise InvalidInputError(f"OODFeatures.{name} must be {ndim}-D (batch first), got shape {tuple(value.shape)}")
            sizes.add(int(value.shape[0]))
        if len(sizes) > 1:
            raise InvalidInputError(f"OODFeatures fields disagree on the batch size: {sorted(sizes)}")
        if not sizes:
            raise InvalidInputError("OODFeatures needs at least one field")

    def __len__(self) -> int:
        return next(int(getattr(self, n).shape[0]) for n in self._FIELDS if getattr(self, n) is not None)

    def numpy(self) -> OODFeatures:
        """A float64 numpy copy (detached from any graph)."""
        return OODFeatures(*(None if (v := getattr(self, n)) is None else as_float64(v) for n in self._FIELDS))

    def torch(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> OODFeatures:
        """Tensors of `dtype` on `device` (for `torch_score`)."""

        def conv(v: Array | None) -> torch.Tensor | None:
            return None if v is None else torch.as_tensor(v).to(device=device, dtype=dtype)

        return OODFeatures(*(conv(getattr(self, n)) for n in self._FIELDS))

    @staticmethod
    def concat(parts: Sequence[OODFeatures]) -> OODFeatures:
        """Batches joined along the batch axis (numpy parts)."""
        if not parts:
            raise InvalidInputError("OODFeatures.concat needs at least one part")
        joined = []
        for n in OODFeatures._FIELDS:
            values = [getattr(p, n) for p in parts]
            joined.append(None if any(v is None for v in values) else np.concatenate([np.asarray(v) for v in values]))
        return OODFeatures(*joined)


def stem_statistics(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) activations -> (B, 2C): each channel's mean and standard deviation (ddof 0, so one position
    gives 0, not NaN) over positions, in float32 at least (a half-precision graph computes them as the runtime does)."""
    flat = h.flatten(2)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    mean = flat.mean(dim=2)
    centred = flat - mean.unsqueeze(2)  # two plain passes: ~10x faster than Tensor.std's on one CPU thread
    return torch.cat([mean, (centred * centred).mean(dim=2).sqrt()], dim=1)


def features_from_output(
    model: SlotSegmenter | None, image: torch.Tensor, out: SegmenterOutput, *, encoded: torch.Tensor | None = None,
    embedding: Embedding = DEFAULT_EMBEDDING,
) -> OODFeatures:
    """The scorers' inputs from a full-image forward pass, in plain tensor ops (traceable, graph kept).

    `image` (B, 3, S, S) in [0, 1]; `out` the model's output on it (all S*S pixels decoded);
    `encoded` (B, N, D) the encoder features, needed only for `embedding="encoder"` (without it the
    encoder runs again on `model`). Returns torch tensors in the output's dtype.
    """
    target = image.flatten(2).transpose(1, 2)  # (B, P, 3)
    if out.reconstruction.shape != target.shape:
        raise InvalidInputError(
            f"OOD features need every pixel decoded: reconstruction {tuple(out.reconstruction.shape)} vs image "
            f"pixels {tuple(target.shape)}; run the model without pixel_idx"
        )
    recon_mse = ((out.reconstruction - target) ** 2).mean(dim=(1, 2))  # (B,)
    masks = out.masks  # (B, K, P), softmax over K
    log_masks = torch.log(masks.clamp_min(_LOG_FLOOR))
    mask_entropy = -(masks * log_masks).sum(dim=1).mean(dim=1)  # (B,)
    disagreement = None
    if out.attention.shape == masks.shape:  # (B, K, S*S): the stride-1 encoder's positions are the pixels
        log_attn = torch.log(out.attention.clamp_min(_LOG_FLOOR))
        kl = (masks * (log_masks - log_attn)).sum(dim=1)  # (B, P) KL(decoder || attention) per pixel
        # foreground: pixels the decoder gives to another slot than the one with the most mass (the background)
        background = masks.sum(dim=2).argmax(dim=1, keepdim=True)  # (B, 1)
        fg = (masks.argmax(dim=1) != background).to(kl.dtype)  # (B, P)
        disagreement = (kl * fg).sum(dim=1) / fg.sum(dim=1).clamp_min(1.0)  # (B,)
    if embedding == "slots":
        emb = out.slots.mean(dim=1)  # (B, D): permutation-invariant over slots
    elif embedding in ("encoder", "encoder_meanstd"):
        if encoded is None:
            if model is None:
                raise ConfigError(f"embedding={embedding!r} needs `encoded` or the model to run the encoder")
            encoded = model.encode(image)
        emb = encoded.mean(dim=1)  # (B, D): mean over the S*S positions
        if embedding == "encoder_meanstd":  # (B, 2D): and the standard deviation (ddof 1) over them
            emb = torch.cat([emb, encoded.std(dim=1)], dim=1)
    else:
        raise ConfigError(f"embedding must be 'slots', 'encoder' or 'encoder_meanstd', got {embedding!r}")
    return OODFeatures(recon_mse=recon_mse, mask_entropy=mask_entropy, embedding=emb, mask_disagreement=disagreement)


def forward_with_features(
    model: SlotSegmenter, image: torch.Tensor, *, embedding: Embedding = DEFAULT_EMBEDDING
) -> tuple[SegmenterOutput, OODFeatures]:
    """One forward pass (encoder run once) and its OOD features (torch). Grad policy is the caller's."""
    encoded = model.encode(image)  # (B, N, D)
    out = model.forward_features(encoded)
    return out, features_from_output(model, image, out, encoded=encoded, embedding=embedding)
