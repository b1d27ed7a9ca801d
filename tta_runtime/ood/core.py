"""Out-of-distribution scoring: per-input scores, their calibration, and a window-level collapse monitor.

Sign convention, everywhere in this module: **higher score = more out of distribution**. Published
scorers that are defined as confidences (higher = more in-distribution, as in OpenOOD) are negated:
MSP -> -max softmax, MaxLogit -> -max logit, Energy -> -T*logsumexp(logits/T), ViM -> alpha*||residual||
- logsumexp(logits), KNN -> +distance, Mahalanobis -> +squared distance.

    one forward pass -> `OODFeatures` (recon MSE, mask entropy, embedding, [logits])
      -> a registered `OODScorer` fitted on in-distribution features (`SCORERS`)
      -> a `Calibration`: the fitted state + the threshold at a chosen in-distribution TPR
      -> saved in the model folder (`<model>/ood/calibration.json` + `state.npz`, no pickle)

    >>> cals = fit_ood(rt.model, weights_sha256=rt.card.weights.sha256)  # validation scenes, never test
    >>> save_calibration(rt.folder, cals)
    >>> cals = load_calibration(rt.folder)                              # ModelLoadError if absent
    >>> out, feats = forward_with_features(rt.model, x)                 # x (B, 3, S, S) in [0, 1]
    >>> scores = cals["knn"].score(feats); flagged = cals["knn"].is_ood(scores)

Every scorer needs only one forward pass and has two implementations: `score` in float64 numpy (the
reference, what the runtime reports) and `torch_score` in plain tensor ops (matmul, logsumexp, topk,
norms) so an exported graph can carry it, with the fitted state as constants. A scorer whose inputs are
missing (e.g. `energy` on a segmenter, which has no logits) raises a `ConfigError` naming what it needs.

`RankMeMonitor` is different in kind: a set-level statistic over a sliding window of embeddings (low =
collapsed representations), for streams; it compares windows of equal size only.

Definitions follow the papers (see `shared/reference/ftwt_ood.md`): MSP (Hendrycks & Gimpel 2017),
MaxLogit (Hendrycks et al. 2022), Energy (Liu et al. 2020), Mahalanobis with a shared covariance (Lee et
al. 2018), relative Mahalanobis (Ren et al. 2021), KNN on L2-normalised features (Sun et al. 2022), ViM
(Wang et al. 2022), RankMe (Garrido et al. 2023). Reconstruction error and slot-mask entropy are the slot
model's own signals, z-scored against the in-distribution fit data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from tta_runtime.config import _Frozen, validate
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError, TTARuntimeError, UnknownNameError
from tta_runtime.registry import Registry
from tta_runtime.data.scenes import OOD_SPLITS, VAL_SEED, generate_scenes
from tta_runtime.models.segmenter import images_to_tensor as to_tensor

if TYPE_CHECKING:
    from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_SCORERS",
    "DEFAULT_EMBEDDING",
    "DEFAULT_SCORER",
    "FAR_SHIFT_SPLITS",
    "SCORERS",
    "SEGMENTER_SCORERS",
    "Calibration",
    "OODFeatures",
    "OODScorer",
    "RankMeMonitor",
    "aupr",
    "auroc",
    "calibrate",
    "eval_ood",
    "features_from_output",
    "fit_ood",
    "forward_with_features",
    "fpr_at_tpr",
    "load_calibration",
    "make_scorer",
    "rankme",
    "save_calibration",
    "scene_features",
    "threshold_at_tpr",
    "vim_dim",
]

Array = np.ndarray | torch.Tensor
Embedding = Literal["slots", "encoder", "encoder_meanstd"]

# Which per-image vector `OODFeatures.embedding` holds for the slot segmenter: "encoder" (the encoder
# features mean-pooled over positions) or "slots" (the mean of the K slots, order-free). Measured with
# KNN / Mahalanobis, 256 in_dist validation scenes fitted, 64 test scenes per split: on the provisional
# shipped slot-shapes-32 (a collapsed early model) the two tie within noise (far-shift min AUROC, KNN
# 0.42 vs 0.40, Mahalanobis 0.60 vs 0.56); on the retraining run's step-750 checkpoint "encoder" wins
# clearly (KNN 0.53 vs 0.27, and 0.58-0.86 vs 0.27-0.57 on every split). A calibration records the
# embedding it was fitted with, so changing this default never mixes the two.
# "encoder_meanstd": the spatial mean and standard deviation of the encoder features, concatenated (2D).
DEFAULT_EMBEDDING: Embedding = "encoder"
# Scorers fitted on another embedding than DEFAULT_EMBEDDING by `fit_ood`. Mahalanobis on mean + std: on
# selection scenes (seed 1500, scripts/explore_ood_mask_signals.py) textured backgrounds 0.947 against 0.930
# for the mean alone, and no worse on any other split (docs/ood_mask_signals.json).
SCORER_EMBEDDINGS: dict[str, Embedding] = {"mahalanobis": "encoder_meanstd"}
# The scorer the runtime reports when a calibration holds several: the reconstruction-error z-score the
# runtime already reported (needs nothing but the forward pass). No scorer is clearly better yet.
DEFAULT_SCORER = "recon_error"
SEGMENTER_SCORERS: tuple[str, ...] = ("recon_error", "mask_entropy", "mask_disagreement", "knn", "mahalanobis")
CLASSIFIER_SCORERS: tuple[str, ...] = (
    "msp", "max_logit", "energy", "softmax_entropy", "mahalanobis", "rmd", "knn", "vim"
)
# The far shifts the acceptance criterion names (best scorer's AUROC >= 0.95 on both).
FAR_SHIFT_SPLITS: tuple[str, ...] = ("textured_background", "unseen_shapes")
DEFAULT_TPR = 0.95
CALIBRATION_DIR = "ood"
CALIBRATION_JSON = "calibration.json"
CALIBRATION_NPZ = "state.npz"
_FORMAT = 1
_LOG_FLOOR = 1e-12  # masks are softmax outputs; this only guards log(0) after underflow


# --------------------------------------------------------------------------------------------------
# Features: what one forward pass hands a scorer


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

    A field a model does not produce is None; scorers that need it raise a `ConfigError`.
    """

    recon_mse: Array | None = None
    mask_entropy: Array | None = None
    embedding: Array | None = None
    logits: Array | None = None
    mask_disagreement: Array | None = None

    _FIELDS: ClassVar[dict[str, int]] = {
        "recon_mse": 1, "mask_entropy": 1, "embedding": 2, "logits": 2, "mask_disagreement": 1,
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

        def conv(v: Array | None) -> np.ndarray | None:
            if v is None:
                return None
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().double().numpy()
            return np.asarray(v, dtype=np.float64)

        return OODFeatures(*(conv(getattr(self, n)) for n in self._FIELDS))

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


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def scene_features(
    model: SlotSegmenter, split: str, n_images: int, seed: int, *, start: int = 0, batch_size: int = 64,
    embedding: Embedding = DEFAULT_EMBEDDING, progress: bool = False,
) -> OODFeatures:
    """Float64 numpy features of generated scenes `start .. start+n_images-1` of `split` (frozen path)."""
    from tqdm.auto import tqdm

    size = model.cfg.resolution
    images, _ = generate_scenes(split, n_images, seed=seed, size=size, start=start)
    device = _model_device(model)
    parts = []
    with torch.inference_mode():
        for i in tqdm(range(0, n_images, batch_size), desc=split, disable=not progress, leave=False):
            x = to_tensor(images[i : i + batch_size]).to(device)
            parts.append(forward_with_features(model, x, embedding=embedding)[1].numpy())
    return OODFeatures.concat(parts)


# --------------------------------------------------------------------------------------------------
# Scorers


class OODScorer:
    """A score per input, higher = more out of distribution, fitted on in-distribution features.

    Subclasses set `name`, `requires` (the `OODFeatures` fields they read) and implement `_fit`,
    `_score` (numpy, float64) and `_torch_score` (plain tensor ops). State is a flat dict of float64
    arrays and floats, so it saves to JSON + npz without pickle.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]
    needs_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray | float] = {}
        self._tensors: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    # -- public API ---------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready): `SCORERS.get(name)(**params)` rebuilds an unfitted scorer."""
        return {}

    @property
    def fitted(self) -> bool:
        return not self.needs_fit or bool(self._state)

    def fit(self, features: OODFeatures, labels: np.ndarray | None = None) -> None:
        """Fit on in-distribution features (numpy or torch). `labels` (N,) int: classes, where used."""
        feats = self._checked(features).numpy()
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(feats),):
                raise InvalidInputError(f"labels must have shape ({len(feats)},), got {labels.shape}")
        elif self.needs_labels:
            raise ConfigError(f"OOD scorer {self.name!r} needs class labels to fit: fit(features, labels)")
        self._state = self._fit(feats, labels)
        self._tensors.clear()

    def score(self, features: OODFeatures) -> np.ndarray:
        """(B,) float64 scores, higher = more out of distribution."""
        self._require_fitted()
        return self._score(self._checked(features).numpy())

    def torch_score(self, features: OODFeatures) -> torch.Tensor:
        """(B,) scores from torch features, in their dtype and device; the same numbers as `score`."""
        self._require_fitted()
        feats = self._checked(features)
        for n in self.requires:
            if not isinstance(getattr(feats, n), torch.Tensor):
                raise InvalidInputError(f"torch_score needs torch tensors; OODFeatures.{n} is not one (use .torch())")
        return self._torch_score(feats)

    def state_dict(self) -> dict[str, np.ndarray | float]:
        """The fitted state: float64 arrays and floats (copies)."""
        return {k: (v.copy() if isinstance(v, np.ndarray) else float(v)) for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray | float]) -> None:
        missing, unexpected = set(self.state_keys) - set(state), set(state) - set(self.state_keys)
        if missing or unexpected:
            raise ModelLoadError(
                f"state of OOD scorer {self.name!r} does not fit: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        self._state = {
            k: (np.array(v, dtype=np.float64) if isinstance(v, np.ndarray) and v.ndim > 0 else float(v))
            for k, v in state.items()
        }
        self._tensors.clear()

    # -- helpers ------------------------------------------------------------------------------------
    def _checked(self, features: OODFeatures) -> OODFeatures:
        missing = [n for n in self.requires if getattr(features, n) is None]
        if missing:
            raise ConfigError(
                f"OOD scorer {self.name!r} needs OODFeatures.{', '.join(missing)}, which this model does not produce "
                f"(segmenter scorers: {', '.join(SEGMENTER_SCORERS)})"
            )
        return features

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise TTARuntimeError(f"OOD scorer {self.name!r} is not fitted: call fit(...) or load a calibration")

    def _const(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The state entry `key` as a tensor matching `like` (cached; a constant when traced)."""
        cache_key = (key, like.dtype, like.device)
        if cache_key not in self._tensors:
            self._tensors[cache_key] = torch.as_tensor(self._state[key], dtype=like.dtype, device=like.device)
        return self._tensors[cache_key]

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        return {}

    def _score(self, features: OODFeatures) -> np.ndarray:
        raise NotImplementedError

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}){'' if self.fitted else ' [not fitted]'}"


SCORERS: Registry[type[OODScorer]] = Registry("OOD scorer")


def _register(cls: type[OODScorer]) -> type[OODScorer]:
    return SCORERS.register(cls.name)(cls)


def make_scorer(name: str, **params: Any) -> OODScorer:
    """An unfitted scorer by registered name; unknown names list the known ones."""
    cls = SCORERS.get(name)
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters {params} for OOD scorer {name!r}: {e}") from None


# -- slot-model signals ----------------------------------------------------------------------------


class _ZScored(OODScorer):
    """A per-image statistic z-scored against the in-distribution fit data: (x - mean) / std (ddof 0)."""

    field_name: ClassVar[str]
    state_keys = ("mean", "std")

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        x = getattr(features, self.field_name)
        if len(x) < 2:
            raise ConfigError(f"OOD scorer {self.name!r} needs at least 2 in-distribution images to fit, got {len(x)}")
        std = float(x.std())
        if not std > 0:
            raise ConfigError(f"OOD scorer {self.name!r}: the in-distribution {self.field_name} is constant; cannot z-score")
        return {"mean": float(x.mean()), "std": std}

    def _score(self, features: OODFeatures) -> np.ndarray:
        return (getattr(features, self.field_name) - self._state["mean"]) / self._state["std"]

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        x = getattr(features, self.field_name)
        return (x - float(self._state["mean"])) / float(self._state["std"])


@_register
class ReconErrorScorer(_ZScored):
    """Per-image reconstruction MSE as a z-score (about 0 in distribution; > 3 is far out)."""

    name = "recon_error"
    requires = ("recon_mse",)
    field_name = "recon_mse"


@_register
class MaskEntropyScorer(_ZScored):
    """Mean per-pixel entropy of the slot masks as a z-score: unsure slot assignments score high."""

    name = "mask_entropy"
    requires = ("mask_entropy",)
    field_name = "mask_entropy"


@_register
class MaskDisagreementScorer(_ZScored):
    """How far the decoder's masks are from the slot-attention maps on the objects, as a z-score: mean over
    foreground pixels of KL(decoder masks || attention maps) over the K slots. The decoder draws shapes it
    learned; the attention groups the encoder's features as they come: on unseen shapes the two part ways.
    (Our own signal, not a published scorer; chosen on selection scenes, scripts/explore_ood_mask_signals.py
    and scripts/explore_ood_disagreement.py.)"""

    name = "mask_disagreement"
    requires = ("mask_disagreement",)
    field_name = "mask_disagreement"


# -- feature-space scorers -------------------------------------------------------------------------


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)  # (as Sun et al.'s code)


def _pinvh(cov: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix (what sklearn's EmpiricalCovariance.precision_ uses)."""
    from scipy.linalg import pinvh

    return np.asarray(pinvh(cov), dtype=np.float64)


def _sq_mahalanobis(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(B, C): (x_b - mu_c)^T P (x_b - mu_c)."""
    diff = x[:, None, :] - means[None]  # (B, C, D)
    return np.einsum("bcd,de,bce->bc", diff, precision, diff)


def _torch_sq_mahalanobis(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    diff = x[:, None, :] - means[None]  # (B, C, D)
    return ((diff @ precision) * diff).sum(dim=-1)  # (B, C)


def _class_gaussians(x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Class means (C, D) and the shared (tied) covariance's pseudo-inverse (D, D), MLE (ddof 0)."""
    labels = np.zeros(len(x), dtype=np.int64) if labels is None else labels
    classes, index = np.unique(labels, return_inverse=True)
    means = np.stack([x[index == c].mean(axis=0) for c in range(len(classes))])  # (C, D)
    centred = x - means[index]  # (N, D)
    cov = centred.T @ centred / len(x)  # (D, D)
    return means, _pinvh(cov)


@_register
class KNNScorer(OODScorer):
    """Distance from the L2-normalised embedding to its k-th nearest normalised in-distribution one.

    Sun et al. 2022 (their score is the negated distance). k is clipped to the bank size.
    """

    name = "knn"
    requires = ("embedding",)
    state_keys = ("bank",)

    def __init__(self, k: int = 50) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"knn: k must be a positive int, got {k!r}")
        self.k = k

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def _k(self) -> int:
        return min(self.k, len(self._state["bank"]))  # type: ignore[arg-type]

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        bank = _l2_normalise(features.embedding)
        if len(bank) < self.k:
            log.warning("knn: bank of %d embeddings is smaller than k=%d; using k=%d", len(bank), self.k, len(bank))
        return {"bank": bank}

    def _score(self, features: OODFeatures) -> np.ndarray:
        q, bank = _l2_normalise(features.embedding), self._state["bank"]
        d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T  # (B, N)
        dist = np.sqrt(np.clip(d2, 0, None))
        k = self._k()
        return np.partition(dist, k - 1, axis=1)[:, k - 1]

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        x = features.embedding
        q = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)
        bank = self._const("bank", q)
        d2 = (q * q).sum(1, keepdim=True) + (bank * bank).sum(1)[None] - 2 * q @ bank.T  # (B, N)
        dist = d2.clamp_min(0).sqrt()
        return torch.topk(dist, self._k(), dim=1, largest=False).values[:, -1]


@_register
class MahalanobisScorer(OODScorer):
    """min over classes of (f - mu_c)^T Sigma^-1 (f - mu_c), Sigma shared (Lee et al. 2018).

    Without labels (the segmenter) it is one Gaussian over all in-distribution embeddings.
    """

    name = "mahalanobis"
    requires = ("embedding",)
    state_keys = ("means", "precision")

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        means, precision = _class_gaussians(features.embedding, labels)
        return {"means": means, "precision": precision}

    def _score(self, features: OODFeatures) -> np.ndarray:
        return _sq_mahalanobis(features.embedding, self._state["means"], self._state["precision"]).min(axis=1)

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        x = features.embedding
        return _torch_sq_mahalanobis(x, self._const("means", x), self._const("precision", x)).min(dim=1).values


@_register
class RelativeMahalanobisScorer(OODScorer):
    """min_c MD_c(f) - MD_0(f): class-conditional (shared Sigma) minus a class-agnostic Gaussian (Ren et al. 2021)."""

    name = "rmd"
    requires = ("embedding",)
    needs_labels = True
    state_keys = ("means", "precision", "mean0", "precision0")

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        x = features.embedding
        means, precision = _class_gaussians(x, labels)
        mean0, precision0 = _class_gaussians(x, None)
        return {"means": means, "precision": precision, "mean0": mean0, "precision0": precision0}

    def _score(self, features: OODFeatures) -> np.ndarray:
        x, s = features.embedding, self._state
        md = _sq_mahalanobis(x, s["means"], s["precision"]).min(axis=1)
        return md - _sq_mahalanobis(x, s["mean0"], s["precision0"])[:, 0]

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        x = features.embedding
        md = _torch_sq_mahalanobis(x, self._const("means", x), self._const("precision", x)).min(dim=1).values
        return md - _torch_sq_mahalanobis(x, self._const("mean0", x), self._const("precision0", x))[:, 0]


# -- logit-based scorers (classifiers) -------------------------------------------------------------


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - _logsumexp(z)[:, None]


class _LogitScorer(OODScorer):
    requires = ("logits",)
    needs_fit = False


@_register
class MSPScorer(_LogitScorer):
    """-max softmax probability (Hendrycks & Gimpel 2017), in [-1, -1/C]."""

    name = "msp"

    def _score(self, features: OODFeatures) -> np.ndarray:
        return -np.exp(_log_softmax(features.logits).max(axis=1))

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        return -features.logits.softmax(dim=1).max(dim=1).values


@_register
class MaxLogitScorer(_LogitScorer):
    """-max logit (Hendrycks et al. 2022)."""

    name = "max_logit"

    def _score(self, features: OODFeatures) -> np.ndarray:
        return -features.logits.max(axis=1)

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        return -features.logits.max(dim=1).values


@_register
class EnergyScorer(_LogitScorer):
    """Free energy -T * logsumexp(logits / T) (Liu et al. 2020), T = 1 by default."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"energy: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _score(self, features: OODFeatures) -> np.ndarray:
        t = self.temperature
        return -t * _logsumexp(features.logits / t)

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        t = self.temperature
        return -t * torch.logsumexp(features.logits / t, dim=1)


@_register
class SoftmaxEntropyScorer(_LogitScorer):
    """Entropy (nats) of the softmax over classes, in [0, ln C]."""

    name = "softmax_entropy"

    def _score(self, features: OODFeatures) -> np.ndarray:
        logp = _log_softmax(features.logits)
        return -(np.exp(logp) * logp).sum(axis=1)

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        logp = features.logits.log_softmax(dim=1)
        return -(logp.exp() * logp).sum(dim=1)


def _np64(x: Array) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def vim_dim(feature_dim: int) -> int:
    """Principal-subspace size as in the ViM code: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


@_register
class ViMScorer(OODScorer):
    """Virtual-logit matching (Wang et al. 2022): alpha * ||residual of f - o|| - logsumexp(logits).

    The residual is the part of (f - o) outside the top-`dim` eigenvectors of the in-distribution
    (uncentred about o) covariance; alpha = mean max logit / mean residual norm on the fit data. The
    origin o is -pinv(W) b when the classifier's last layer (weight (C, D), bias (C,)) is given to
    `fit`, as in the paper; otherwise the in-distribution mean.
    """

    name = "vim"
    requires = ("embedding", "logits")
    state_keys = ("origin", "residual_basis", "alpha")

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ConfigError(f"vim: dim must be a positive int or None (the paper's rule), got {dim!r}")
        self.dim = dim
        self._head: tuple[np.ndarray, np.ndarray] | None = None  # classifier (weight, bias), set by fit

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def fit(  # type: ignore[override]
        self, features: OODFeatures, labels: np.ndarray | None = None, *, weight: Array | None = None,
        bias: Array | None = None,
    ) -> None:
        if (weight is None) != (bias is None):
            raise ConfigError("vim: give both the classifier's weight (C, D) and bias (C,), or neither")
        self._head = None if weight is None else (_np64(weight), _np64(bias))
        super().fit(features, labels)

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        x, logits = features.embedding, features.logits
        d = x.shape[1]
        dim = vim_dim(d) if self.dim is None else self.dim
        if not 0 < dim < d:
            raise ConfigError(f"vim: principal dim {dim} must be in [1, {d - 1}] for {d}-D features")
        head = self._head
        origin = x.mean(axis=0) if head is None else -np.linalg.pinv(head[0]) @ head[1]
        centred = x - origin  # (N, D)
        eigval, eigvec = np.linalg.eigh(centred.T @ centred / len(x))
        order = np.argsort(eigval)[::-1]
        basis = np.ascontiguousarray(eigvec[:, order[dim:]])  # (D, D - dim): the residual space
        residual = np.linalg.norm(centred @ basis, axis=1)
        alpha = float(logits.max(axis=1).mean() / residual.mean())
        return {"origin": origin, "residual_basis": basis, "alpha": alpha}

    def _score(self, features: OODFeatures) -> np.ndarray:
        s = self._state
        residual = np.linalg.norm((features.embedding - s["origin"]) @ s["residual_basis"], axis=1)
        return s["alpha"] * residual - _logsumexp(features.logits)

    def _torch_score(self, features: OODFeatures) -> torch.Tensor:
        x = features.embedding
        residual = torch.linalg.vector_norm((x - self._const("origin", x)) @ self._const("residual_basis", x), dim=1)
        return float(self._state["alpha"]) * residual - torch.logsumexp(features.logits, dim=1)


# --------------------------------------------------------------------------------------------------
# RankMe: a window statistic for streams


def rankme(embeddings: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023) of an (N, D) matrix: exp(-sum p log p), p = s / sum(s) + eps.

    In [~1, min(N, D)]: ~1 for rank-1 (collapsed) embeddings, near min(N, D) for isotropic ones.
    """
    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2:
        raise InvalidInputError(f"rankme needs an (N, D) matrix, got shape {z.shape}")
    s = np.linalg.svd(z, compute_uv=False)
    total = s.sum()
    p = (s / total if total > 0 else np.zeros_like(s)) + eps
    return float(np.exp(-(p * np.log(p)).sum()))


class RankMeMonitor:
    """RankMe over a sliding window of the last `window` embeddings (a drift / collapse monitor).

    `update` returns None until the window is full, then the window's RankMe. Compare values only
    between windows of the same size: RankMe grows with the window up to the embedding width.
    """

    def __init__(self, window: int, eps: float = 1e-7) -> None:
        if not isinstance(window, int) or window < 2:
            raise ConfigError(f"RankMeMonitor: window must be an int >= 2, got {window!r}")
        self.window, self.eps = window, eps
        self._buffer: deque[np.ndarray] = deque(maxlen=window)
        self.value: float | None = None

    def update(self, embedding: Array) -> float | None:
        """Add one (D,) embedding; the window's RankMe once `window` embeddings have been seen."""
        if isinstance(embedding, torch.Tensor):
            embedding = embedding.detach().cpu().double().numpy()
        e = np.asarray(embedding, dtype=np.float64)
        if e.ndim != 1 or (self._buffer and e.shape != self._buffer[0].shape):
            want = f"({self._buffer[0].shape[0]},)" if self._buffer else "(D,)"
            raise InvalidInputError(f"RankMeMonitor.update takes one {want} embedding, got shape {e.shape}")
        self._buffer.append(e)
        self.value = rankme(np.stack(self._buffer), self.eps) if len(self._buffer) == self.window else None
        return self.value

    def reset(self) -> None:
        self._buffer.clear()
        self.value = None

    def __len__(self) -> int:
        return len(self._buffer)


# --------------------------------------------------------------------------------------------------
# Detection metrics (positives = OOD, the higher-scoring class)


def _two_sets(in_scores: Array, ood_scores: Array) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(s, dtype=np.float64).ravel() for s in (in_scores, ood_scores))
    if not len(a) or not len(b):
        raise InvalidInputError(f"need in-distribution and OOD scores, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InvalidInputError("OOD scores must be finite")
    return a, b


def auroc(in_scores: Array, ood_scores: Array) -> float:
    """Area under the ROC curve for OOD = positive: the Mann-Whitney U / (n_in n_ood), ties count 1/2."""
    a, b = _two_sets(in_scores, ood_scores)
    x = np.concatenate([a, b])
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average ranks
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def aupr(in_scores: Array, ood_scores: Array) -> float:
    """Average precision with OOD = positive (AUPR-Out), as sklearn's `average_precision_score`."""
    a, b = _two_sets(in_scores, ood_scores)
    s = np.concatenate([a, b])
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_at_tpr(in_scores: Array, tpr: float = DEFAULT_TPR) -> float:
    """The smallest in-distribution score t with at least `tpr` of `in_scores` <= t.

    Flagging `score > t` as OOD then keeps at least `tpr` of in-distribution inputs (e.g. 95 %).
    """
    if not 0 < tpr <= 1:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr!r}")
    s = np.sort(np.asarray(in_scores, dtype=np.float64).ravel())
    if not len(s) or not np.isfinite(s).all():
        raise InvalidInputError("threshold_at_tpr needs finite in-distribution scores")
    k = max(math.ceil(tpr * len(s) - 1e-9), 1)  # the guard keeps 0.95 * 100 from rounding up to 96
    return float(s[k - 1])


def fpr_at_tpr(in_scores: Array, ood_scores: Array, tpr: float = DEFAULT_TPR) -> float:
    """Fraction of OOD inputs accepted as in-distribution at the threshold keeping `tpr` of in-dist ones."""
    a, b = _two_sets(in_scores, ood_scores)
    return float(np.mean(b <= threshold_at_tpr(a, tpr)))


# --------------------------------------------------------------------------------------------------
# Calibration: a fitted scorer + its threshold, saved in the model folder


@dataclass(frozen=True, eq=False)
class Calibration:
    """One scorer fitted on in-distribution scenes and thresholded at `tpr` of held-out ones.

    `threshold`: inputs with score > threshold are OOD (about 1 - tpr of in-distribution inputs are).
    Provenance: scorer fitted on `n_images` scenes of `split` with `seed` (indices 0..n_images-1),
    threshold from the next `n_threshold`; `embedding` says which vector the embedding scorers saw;
    `weights_sha256` the weights it was fitted for (checked against the card on load).
    """

    scorer: str
    params: dict[str, Any]
    state: dict[str, np.ndarray | float]
    threshold: float
    tpr: float = DEFAULT_TPR
    n_images: int = 0
    n_threshold: int = 0
    split: str = "in_dist"
    seed: int = VAL_SEED
    embedding: Embedding = DEFAULT_EMBEDDING
    weights_sha256: str | None = None
    _built: list[OODScorer] = field(default_factory=list, init=False, repr=False)

    def build(self) -> OODScorer:
        """The fitted scorer (built once)."""
        if not self._built:
            scorer = make_scorer(self.scorer, **self.params)
            scorer.load_state_dict(self.state)
            self._built.append(scorer)
        return self._built[0]

    def score(self, features: OODFeatures) -> np.ndarray:
        """(B,) float64 scores, higher = more OOD."""
        return self.build().score(features)

    def torch_score(self, features: OODFeatures) -> torch.Tensor:
        return self.build().torch_score(features)

    def is_ood(self, scores: Array) -> np.ndarray | torch.Tensor:
        """scores > threshold (bool, same kind as `scores`)."""
        return scores > self.threshold


class _CalibrationRecord(_Frozen):
    scorer: str
    params: dict[str, float | int | str | None]
    scalars: dict[str, float]
    arrays: list[str]
    threshold: float
    tpr: float = Field(gt=0, le=1)
    n_images: int = Field(ge=0)
    n_threshold: int = Field(ge=0)
    split: str
    seed: int
    embedding: Literal["slots", "encoder", "encoder_meanstd"]
    weights_sha256: str | None = None


class _CalibrationFile(_Frozen):
    format: Literal[1]
    sign: Literal["higher = more out of distribution"] = "higher = more out of distribution"
    calibrations: dict[str, _CalibrationRecord]


def calibrate(
    scorer: OODScorer, threshold_features: OODFeatures, *, tpr: float = DEFAULT_TPR, n_images: int,
    split: str = "in_dist", seed: int = VAL_SEED, embedding: Embedding = DEFAULT_EMBEDDING,
    weights_sha256: str | None = None,
) -> Calibration:
    """A `Calibration` from a fitted scorer and held-out in-distribution features for the threshold."""
    threshold = threshold_at_tpr(scorer.score(threshold_features), tpr)
    return Calibration(
        scorer=scorer.name, params=scorer.params(), state=scorer.state_dict(), threshold=threshold, tpr=tpr,
        n_images=n_images, n_threshold=len(threshold_features), split=split, seed=seed, embedding=embedding,
        weights_sha256=weights_sha256,
    )


def _atomic_write(path: Path, write: Any) -> None:
    """Write beside `path` then rename, so a reader never sees half a file (modes follow the umask)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_calibration(folder: str | os.PathLike[str], calibrations: Mapping[str, Calibration]) -> Path:
    """Write `folder/ood/calibration.json` (readable metadata) and `state.npz` (arrays); returns `folder/ood`."""
    out = Path(folder) / CALIBRATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    records, arrays = {}, {}
    for name, cal in calibrations.items():
        if name != cal.scorer:
            raise ConfigError(f"calibration stored under {name!r} is for scorer {cal.scorer!r}")
        scalars = {k: float(v) for k, v in cal.state.items() if not isinstance(v, np.ndarray)}
        keys = sorted(k for k, v in cal.state.items() if isinstance(v, np.ndarray))
        arrays.update({f"{name}/{k}": np.asarray(cal.state[k], dtype=np.float64) for k in keys})
        records[name] = _CalibrationRecord(
            scorer=cal.scorer, params=cal.params, scalars=scalars, arrays=keys, threshold=float(cal.threshold),
            tpr=cal.tpr, n_images=cal.n_images, n_threshold=cal.n_threshold, split=cal.split, seed=cal.seed,
            embedding=cal.embedding, weights_sha256=cal.weights_sha256,
        )
    doc = _CalibrationFile(format=_FORMAT, calibrations=records).model_dump(mode="json")
    _atomic_write(out / CALIBRATION_NPZ, lambda f: np.savez(f, **arrays))
    _atomic_write(out / CALIBRATION_JSON, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))
    return out


def _fit_hint(folder: Path) -> str:
    """The `--model` argument that names `folder`: its repository name when that resolves back to it."""
    from tta_runtime.hub import find_model

    try:
        if find_model(folder.name).resolve() == folder.resolve():
            return folder.name
    except TTARuntimeError:
        pass
    return str(folder)


def load_calibration(folder: str | os.PathLike[str]) -> dict[str, Calibration]:
    """The calibrations saved in a model folder, by scorer name.

    Raises `ModelLoadError` when there are none (with the command that fits them), when the files are
    malformed, or when they were fitted for other weights than the folder's card names.
    """
    folder = Path(folder)
    meta, npz = folder / CALIBRATION_DIR / CALIBRATION_JSON, folder / CALIBRATION_DIR / CALIBRATION_NPZ
    if not meta.is_file():
        raise ModelLoadError(f"no OOD calibration in {folder}; fit one with `tta-runtime ood fit --model {_fit_hint(folder)}`")
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read OOD calibration {meta}: {e}") from None
    try:
        doc: _CalibrationFile = validate(_CalibrationFile, data, f"OOD calibration {meta}")
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: np.array(z[k], dtype=np.float64) for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read OOD calibration arrays {npz}: {e}") from None

    card_sha = None
    if (folder / "card.json").is_file():
        from tta_runtime.hub import load_card

        card_sha = load_card(folder).weights.sha256
    result = {}
    for name, rec in doc.calibrations.items():
        if card_sha is not None and rec.weights_sha256 is not None and rec.weights_sha256 != card_sha:
            raise ModelLoadError(
                f"OOD calibration {name!r} in {meta.parent} was fitted for weights {rec.weights_sha256[:12]}..., but the "
                f"card names {card_sha[:12]}...; refit with `tta-runtime ood fit --model {_fit_hint(folder)}`"
            )
        missing = [k for k in rec.arrays if f"{name}/{k}" not in arrays]
        if missing:
            raise ModelLoadError(f"OOD calibration {name!r}: arrays {missing} missing from {npz}")
        state: dict[str, np.ndarray | float] = {k: arrays[f"{name}/{k}"] for k in rec.arrays}
        state.update(rec.scalars)
        try:
            cal = Calibration(
                scorer=rec.scorer, params=dict(rec.params), state=state, threshold=rec.threshold, tpr=rec.tpr,
                n_images=rec.n_images, n_threshold=rec.n_threshold, split=rec.split, seed=rec.seed,
                embedding=rec.embedding, weights_sha256=rec.weights_sha256,
            )
            cal.build()  # fail here, not on the first request
        except (UnknownNameError, ConfigError) as e:
            raise ModelLoadError(f"OOD calibration {name!r} in {meta}: {e}") from None
        result[name] = cal
    return result


# --------------------------------------------------------------------------------------------------
# Fitting and evaluating on generated scenes


def _test_seed() -> int:
    from tta_runtime.data.scenes import TEST_SEED

    return TEST_SEED


def fit_ood(
    model: SlotSegmenter, *, n_images: int = 256, n_threshold: int | None = None, seed: int = VAL_SEED,
    scorers: Iterable[str] = SEGMENTER_SCORERS, params: Mapping[str, Mapping[str, Any]] | None = None,
    tpr: float = DEFAULT_TPR, embedding: Embedding = DEFAULT_EMBEDDING, batch_size: int = 64,
    weights_sha256: str | None = None, progress: bool = False, embeddings: Mapping[str, Embedding] | None = None,
) -> dict[str, Calibration]:
    """Fit segmenter scorers on generated in_dist validation scenes and threshold them at `tpr`.

    Scorers are fitted on scenes 0..n_images-1 of `seed` and thresholded on the next `n_threshold`
    (default n_images), so the threshold comes from images the scorer has not seen (a KNN bank would
    otherwise find each fit image at distance 0). The test seed is refused. Pass the card's
    `weights.sha256` so `load_calibration` can tell when the model has been retrained since.
    `embeddings` names a scorer's embedding where it is not `embedding` (default: `SCORER_EMBEDDINGS` when
    `embedding` is `DEFAULT_EMBEDDING`, else none).
    """
    if seed == _test_seed():
        raise ConfigError(f"seed {seed} is the test seed; calibrate on validation scenes (default seed {VAL_SEED})")
    n_threshold = n_images if n_threshold is None else n_threshold
    if n_images < 2 or n_threshold < 1:
        raise ConfigError(f"fit_ood needs n_images >= 2 and n_threshold >= 1, got {n_images} and {n_threshold}")
    params = params or {}
    built = [make_scorer(name, **params.get(name, {})) for name in scorers]
    for s in built:
        if s.needs_labels:
            raise ConfigError(f"OOD scorer {s.name!r} needs class labels; the segmenter's scorers are {', '.join(SEGMENTER_SCORERS)}")
    if embeddings is None:  # the measured per-scorer choices go with the default embedding only
        embeddings = SCORER_EMBEDDINGS if embedding == DEFAULT_EMBEDDING else {}
    per_scorer = dict(embeddings)
    kind_of = {s.name: per_scorer.get(s.name, embedding) for s in built}
    fit_feats, thr_feats = {}, {}
    for kind in sorted(set(kind_of.values())):
        kw: dict[str, Any] = {"batch_size": batch_size, "embedding": kind, "progress": progress}
        fit_feats[kind] = scene_features(model, "in_dist", n_images, seed, **kw)
        thr_feats[kind] = scene_features(model, "in_dist", n_threshold, seed, start=n_images, **kw)
    out = {}
    for s in built:
        kind = kind_of[s.name]
        s.fit(fit_feats[kind])
        out[s.name] = calibrate(
            s, thr_feats[kind], tpr=tpr, n_images=n_images, seed=seed, embedding=kind, weights_sha256=weights_sha256
        )
        log.info("OOD scorer %s fitted on %d in_dist scenes; threshold %.4g", s.name, n_images, out[s.name].threshold)
    return out


def eval_ood(
    model: SlotSegmenter, calibrations: Mapping[str, Calibration], *, splits: Sequence[str] = OOD_SPLITS,
    n_images: int = 256, seed: int | None = None, batch_size: int = 64, progress: bool = False,
) -> dict[str, Any]:
    """Detection metrics on test scenes: in_dist as negatives, each OOD split as positives.

    Returns {"seed", "n_images", "in_dist": {scorer: {"flagged"}}, "splits": {split: {scorer: {"auroc",
    "aupr", "fpr95", "flagged"}}}, "far_shift": {...}}; `flagged` is the fraction over the calibrated
    threshold. `seed` defaults to the test seed (`tta_runtime.scenes.TEST_SEED`).
    """
    seed = _test_seed() if seed is None else seed
    if any(c.seed == seed and c.split == "in_dist" for c in calibrations.values()):
        log.warning("eval_ood: seed %d is the seed the calibration was fitted on", seed)
    kinds = sorted({c.embedding for c in calibrations.values()})

    def feats(split: str) -> dict[str, OODFeatures]:
        return {
            k: scene_features(model, split, n_images, seed, batch_size=batch_size, embedding=k, progress=progress)  # type: ignore[arg-type]
            for k in kinds
        }

    def scores(split: str) -> dict[str, np.ndarray]:
        f = feats(split)
        return {name: c.score(f[c.embedding]) for name, c in calibrations.items()}

    from tqdm.auto import tqdm

    base = scores("in_dist")
    report: dict[str, Any] = {
        "seed": seed, "n_images": n_images, "sign": "higher = more out of distribution",
        "in_dist": {n: {"flagged": round(float(np.mean(calibrations[n].is_ood(s))), 6)} for n, s in base.items()},
        "splits": {},
    }
    for split in tqdm(splits, desc="ood eval", disable=not progress, leave=False):
        shifted = scores(split)
        report["splits"][split] = {
            n: {
                "auroc": round(auroc(base[n], shifted[n]), 6),
                "aupr": round(aupr(base[n], shifted[n]), 6),
                "fpr95": round(fpr_at_tpr(base[n], shifted[n]), 6),
                "flagged": round(float(np.mean(calibrations[n].is_ood(shifted[n]))), 6),
            }
            for n in calibrations
        }
    far = [s for s in FAR_SHIFT_SPLITS if s in report["splits"]]
    if far:
        per = {
            n: {**{s: report["splits"][s][n]["auroc"] for s in far}, "min": min(report["splits"][s][n]["auroc"] for s in far)}
            for n in calibrations
        }
        best = max(per, key=lambda n: per[n]["min"])
        # the best scorer of each shift family on its own (a runtime picks one scorer; a user who knows the
        # shift they face may pick another)
        per_split = {}
        for s in far:
            top = max(calibrations, key=lambda n: per[n][s])
            per_split[s] = {"scorer": top, "auroc": per[top][s], "meets_target": per[top][s] >= 0.95}
        report["far_shift"] = {
            "splits": far, "auroc": per, "best": best, "best_min_auroc": per[best]["min"], "target": 0.95,
            "meets_target": per[best]["min"] >= 0.95, "best_per_split": per_split,
            "meets_target_per_split": all(v["meets_target"] for v in per_split.values()),
        }
    return report
