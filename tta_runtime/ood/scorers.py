"""The OOD scorer interface, its registry, and the scorers that need no feature-space fit.

Sign convention, for every scorer: **higher score = more out of distribution**. Scorers published as
confidences (higher = more in-distribution, as in OpenOOD) are negated: MSP -> -max softmax,
MaxLogit -> -max logit, Energy -> -T*logsumexp(logits/T).

Each scorer writes its formula once, in the primitives of `tta_runtime.ood.ops`, and runs it on numpy
float64 (`score`, what the runtime reports) or on torch tensors (`torch_score`, plain tensor ops that an
exported graph carries, with the fitted state as constants). A scorer whose inputs are missing (e.g.
`energy` on a segmenter, which has no logits) raises a `ConfigError` naming what it needs.

Here: the slot model's own signals (reconstruction error, mask entropy, mask disagreement), z-scored
against the in-distribution fit data, and the logit scorers of classifiers: MSP (Hendrycks & Gimpel
2017), MaxLogit (Hendrycks et al. 2022), Energy (Liu et al. 2020), softmax entropy. The feature-space
scorers (KNN, Mahalanobis, relative Mahalanobis, ViM) are in `tta_runtime.ood.feature_scorers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from tta_runtime.errors import (
    ConfigError,
    InvalidInputError,
    ModelLoadError,
    TTARuntimeError,
)
from tta_runtime.ood.features import Array, OODFeatures
from tta_runtime.ood.ops import exp, log_softmax, logsumexp, max_softmax, rowmax
from tta_runtime.registry import Registry

# The scorer the runtime reports when a calibration holds several: the reconstruction-error z-score
# (needs nothing but the forward pass). No scorer is clearly better on every shift.
DEFAULT_SCORER = "recon_error"
# The scorer a classifier reports when its calibration holds several: chosen on far shifts (natural photos
# against digits) and near shifts (the corruption suite) together, on the validation split; the AUROC tables
# and their commands are in docs/custom_models.md. The logit scorers (energy, MSP) pass confident photos as
# digits; the pooled features miss most corruptions that the first convolution's statistics catch.
DEFAULT_CLASSIFIER_SCORER = "stem_mahalanobis"
STEM_SCORER = "stem_mahalanobis"  # reads the first convolution's statistics: models without one cannot have it
FALLBACK_CLASSIFIER_SCORER = "mahalanobis"  # the default of a classifier whose calibration lacks the default scorer
SEGMENTER_SCORERS: tuple[str, ...] = ("recon_error", "mask_entropy", "mask_disagreement", "knn", "mahalanobis")
CLASSIFIER_SCORERS: tuple[str, ...] = (
    "msp", "max_logit", "energy", "softmax_entropy", "mahalanobis", "rmd", "knn", "vim", STEM_SCORER
)


class OODScorer:
    """A score per input, higher = more out of distribution, fitted on in-distribution features.

    Subclasses set `name`, `requires` (the `OODFeatures` fields they read) and implement `_fit` (numpy,
    float64) and `_score` (in `tta_runtime.ood.ops` primitives, so it runs on numpy and torch alike; read
    the fitted state with `_param`). State is a flat dict of float64 arrays and floats, so it saves to
    JSON + npz without pickle.
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
        return self._score(feats)

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

    def _param(self, key: str, like: Array) -> Array:
        """The state array `key` in the kind of `like`: the float64 array itself for numpy, else a tensor of
        `like`'s dtype and device (cached; a constant when traced)."""
        if not isinstance(like, torch.Tensor):
            return self._state[key]  # type: ignore[return-value]
        cache_key = (key, like.dtype, like.device)
        if cache_key not in self._tensors:
            self._tensors[cache_key] = torch.as_tensor(self._state[key], dtype=like.dtype, device=like.device)
        return self._tensors[cache_key]

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        return {}

    def _score(self, features: OODFeatures) -> Array:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}){'' if self.fitted else ' [not fitted]'}"


SCORERS: Registry[type[OODScorer]] = Registry("OOD scorer")


def register(cls: type[OODScorer]) -> type[OODScorer]:
    """Class decorator: add a scorer to `SCORERS` under its `name` (a name twice is refused)."""
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

    state_keys = ("mean", "std")

    def _fit(self, features: OODFeatures, labels: np.ndarray | None) -> dict[str, np.ndarray | float]:
        (field,) = self.requires
        x = getattr(features, field)
        if len(x) < 2:
            raise ConfigError(f"OOD scorer {self.name!r} needs at least 2 in-distribution images to fit, got {len(x)}")
        std = float(x.std())
        if not std > 0:
            raise ConfigError(f"OOD scorer {self.name!r}: the in-distribution {field} is constant; cannot z-score")
        return {"mean": float(x.mean()), "std": std}

    def _score(self, features: OODFeatures) -> Array:
        (field,) = self.requires
        return (getattr(features, field) - self._state["mean"]) / self._state["std"]


@register
class ReconErrorScorer(_ZScored):
    """Per-image reconstruction MSE as a z-score (about 0 in distribution; > 3 is far out)."""

    name = "recon_error"
    requires = ("recon_mse",)


@register
class MaskEntropyScorer(_ZScored):
    """Mean per-pixel entropy of the slot masks as a z-score: unsure slot assignments score high."""

    name = "mask_entropy"
    requires = ("mask_entropy",)


@register
class MaskDisagreementScorer(_ZScored):
    """How far the decoder's masks are from the slot-attention maps on the objects, as a z-score: mean over
    foreground pixels of KL(decoder masks || attention maps) over the K slots. The decoder draws shapes it
    learned; the attention groups the encoder's features as they come: on unseen shapes the two part ways.
    (This runtime's own signal, not a published scorer.)"""

    name = "mask_disagreement"
    requires = ("mask_disagreement",)


# -- logit-based scorers (classifiers) -------------------------------------------------------------


class _LogitScorer(OODScorer):
    requires = ("logits",)
    needs_fit = False


@register
class MSPScorer(_LogitScorer):
    """-max softmax probability (Hendrycks & Gimpel 2017), in [-1, -1/C]."""

    name = "msp"

    def _score(self, features: OODFeatures) -> Array:
        return -max_softmax(features.logits)


@register
class MaxLogitScorer(_LogitScorer):
    """-max logit (Hendrycks et al. 2022)."""

    name = "max_logit"

    def _score(self, features: OODFeatures) -> Array:
        return -rowmax(features.logits)


@register
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

    def _score(self, features: OODFeatures) -> Array:
        t = self.temperature
        return -t * logsumexp(features.logits / t)


@register
class SoftmaxEntropyScorer(_LogitScorer):
    """Entropy (nats) of the softmax over classes, in [0, ln C]."""

    name = "softmax_entropy"

    def _score(self, features: OODFeatures) -> Array:
        logp = log_softmax(features.logits)
        return -(exp(logp) * logp).sum(1)
